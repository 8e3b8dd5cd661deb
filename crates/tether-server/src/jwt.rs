//! Client identities minted by an identity provider: JWTs (HS256, RS256,
//! ES256) checked against keys from a file or a JWKS file, with `iss`, `aud`
//! and `exp` required and checked.
//!
//! Each key is bound to one algorithm (from the key's type, or the JWKS
//! entry's `alg`), and a token is only tried with keys of the algorithm its
//! header names, so an RSA public key can never be used as an HMAC secret.

use anyhow::{bail, Context};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::path::PathBuf;

use crate::auth::{ClientIdentity, IdentityKind};

/// `[jwt]` in the server config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// File holding the HS256 shared secret (its bytes, trailing newline trimmed).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// PEM public key (RSA → RS256, EC P-256 → ES256).
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// JWKS file (`{"keys": [...]}`), e.g. a copy of the provider's
    /// `jwks_uri`; reloaded with the config.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Claim holding the identity name (default `sub`).
    #[serde(default = "default_name_claim")]
    pub name_claim: String,
    /// Claim holding the groups, a string array or one string (default `groups`).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Clock skew tolerated on `exp` / `nbf`, in seconds (default 30).
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
}

fn default_name_claim() -> String {
    "sub".into()
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_leeway() -> u64 {
    30
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Checks JWTs against the configured keys.
pub struct JwtVerifier {
    keys: Vec<Key>,
    cfg: JwtConfig,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "JwtVerifier({} keys, iss {})",
            self.keys.len(),
            self.cfg.issuer
        )
    }
}

/// Whether a bearer credential looks like a JWT (three base64url parts)
/// rather than a static token.
pub fn looks_like_jwt(t: &str) -> bool {
    t.starts_with("ey")
        && t.split('.').count() == 3
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl JwtVerifier {
    /// Loads the keys.
    pub fn new(cfg: &JwtConfig) -> anyhow::Result<JwtVerifier> {
        let mut keys = vec![];
        if let Some(p) = &cfg.secret_file {
            let raw =
                std::fs::read(p).with_context(|| format!("[jwt] secret_file {}", p.display()))?;
            let secret = raw.strip_suffix(b"\n").unwrap_or(&raw);
            if secret.len() < 32 {
                bail!("[jwt] secret_file: an HS256 secret needs at least 32 bytes");
            }
            keys.push(Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret),
            });
        }
        if let Some(p) = &cfg.public_key_file {
            let pem = std::fs::read(p)
                .with_context(|| format!("[jwt] public_key_file {}", p.display()))?;
            let (alg, key) = match DecodingKey::from_rsa_pem(&pem) {
                Ok(k) => (Algorithm::RS256, k),
                Err(_) => (
                    Algorithm::ES256,
                    DecodingKey::from_ec_pem(&pem)
                        .context("[jwt] public_key_file: neither an RSA nor an EC public key")?,
                ),
            };
            keys.push(Key {
                kid: None,
                alg,
                key,
            });
        }
        if let Some(p) = &cfg.jwks_file {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("[jwt] jwks_file {}", p.display()))?;
            let set: JwkSet =
                serde_json::from_str(&text).context("[jwt] jwks_file is not a JWKS")?;
            for jwk in &set.keys {
                let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                    (Some(KeyAlgorithm::RS256), _) => Algorithm::RS256,
                    (Some(KeyAlgorithm::ES256), _) => Algorithm::ES256,
                    (Some(KeyAlgorithm::HS256), _) => Algorithm::HS256,
                    (Some(other), _) => {
                        tracing::warn!(kid = ?jwk.common.key_id, alg = ?other, "[jwt] JWKS key with an unsupported algorithm skipped");
                        continue;
                    }
                    (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                    (None, AlgorithmParameters::EllipticCurve(_)) => Algorithm::ES256,
                    (None, AlgorithmParameters::OctetKey(_)) => Algorithm::HS256,
                    (None, _) => continue,
                };
                let key = DecodingKey::from_jwk(jwk).context("[jwt] bad JWKS key")?;
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key,
                });
            }
        }
        if keys.is_empty() {
            bail!("[jwt]: set secret_file, public_key_file or jwks_file");
        }
        Ok(JwtVerifier {
            keys,
            cfg: cfg.clone(),
        })
    }

    /// Checks a token; the error says why it was refused (for the log; it
    /// never contains the token).
    pub fn verify(&self, token: &str) -> Result<ClientIdentity, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("bad JWT header: {e}"))?;
        let mut last = format!("no key for algorithm {:?}", header.alg);
        for k in self.keys.iter().filter(|k| k.alg == header.alg) {
            if let (Some(want), Some(have)) = (&header.kid, &k.kid) {
                if want != have {
                    continue;
                }
            }
            let mut v = Validation::new(k.alg);
            v.set_issuer(&[&self.cfg.issuer]);
            v.set_audience(&[&self.cfg.audience]);
            v.set_required_spec_claims(&["exp", "iss", "aud"]);
            v.leeway = self.cfg.leeway_secs;
            v.validate_nbf = true;
            match jsonwebtoken::decode::<serde_json::Value>(token, &k.key, &v) {
                Ok(data) => return self.identity(&data.claims, token),
                Err(e) => last = format!("JWT refused: {e}"),
            }
        }
        Err(last)
    }

    fn identity(&self, claims: &serde_json::Value, token: &str) -> Result<ClientIdentity, String> {
        let name = claims
            .get(&self.cfg.name_claim)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("JWT has no {} claim", self.cfg.name_claim))?;
        let groups = match claims.get(&self.cfg.groups_claim) {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            _ => vec![],
        };
        // `exp` may be fractional (the library accepts that too).
        let expires = claims
            .get("exp")
            .and_then(|v| v.as_f64())
            .map(|f| f.max(0.0) as u64)
            .unwrap_or(0);
        Ok(ClientIdentity {
            name: name.to_owned(),
            groups,
            kind: IdentityKind::Jwt {
                expires,
                token: token.into(),
            },
        })
    }
}
