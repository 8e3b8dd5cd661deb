//! Client identities minted by an identity provider: JWTs (HS256, RS256,
//! ES256) checked against keys from a file or a JWKS file, with `iss`, `aud`
//! and `exp` required and checked.
//!
//! Each key is bound to one algorithm (from the key's type, or the JWKS
//! entry's `alg`), and a token is only tried with keys of the algorithm its
//! header names, so an RSA public key can never be used as an HMAC secret.
//!
//! A token whose header has a `crit` parameter is refused: `crit` lists
//! extensions the recipient must understand (RFC 7515 4.1.11), and we
//! understand none.

use anyhow::{bail, Context};
use jsonwebtoken::errors::ErrorKind;
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

    /// Checks a token; the error says why it was refused (for the log only:
    /// callers tell the client no more than "invalid token"; it never
    /// contains the token).
    pub fn verify(&self, token: &str) -> Result<ClientIdentity, String> {
        refuse_crit(token)?;
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| format!("bad JWT header: {e}"))?;
        let mut last = format!("JWT refused: no key for algorithm {:?}", header.alg);
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
                // The signature matched this key and a claim failed: that is
                // the answer. Trying the remaining keys would only replace it
                // with "bad signature".
                Err(e) if signature_checked(e.kind()) => return Err(refusal(e.kind())),
                Err(e) => last = refusal(e.kind()),
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

/// Whether a decoding error comes from the claims, i.e. after the signature
/// was verified with the key tried (`jsonwebtoken` checks the signature
/// first).
fn signature_checked(kind: &ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ExpiredSignature
            | ErrorKind::ImmatureSignature
            | ErrorKind::InvalidIssuer
            | ErrorKind::InvalidAudience
            | ErrorKind::InvalidSubject
            | ErrorKind::MissingRequiredClaim(_)
    )
}

/// Why a JWT was refused, in words for the log (the library's names read
/// badly: an expired token is `ExpiredSignature`).
fn refusal(kind: &ErrorKind) -> String {
    let why = match kind {
        ErrorKind::ExpiredSignature => "expired (exp is in the past)".to_owned(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf is in the future)".to_owned(),
        ErrorKind::InvalidIssuer => "wrong issuer (iss)".to_owned(),
        ErrorKind::InvalidAudience => "wrong audience (aud)".to_owned(),
        ErrorKind::InvalidSubject => "wrong subject (sub)".to_owned(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing required claim {c}"),
        ErrorKind::InvalidSignature => "bad signature".to_owned(),
        ErrorKind::InvalidAlgorithm => "algorithm does not match the key".to_owned(),
        other => format!("malformed ({other:?})"),
    };
    format!("JWT refused: {why}")
}

/// Refuses a token whose protected header has a `crit` parameter: it names
/// extensions that change how the token must be read, and we implement none
/// (`jsonwebtoken` ignores the parameter, so it is checked here).
fn refuse_crit(token: &str) -> Result<(), String> {
    let head = token.split('.').next().unwrap_or("");
    let bytes = b64url_decode(head).ok_or("bad JWT header: not base64url")?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|_| "bad JWT header: not a JSON object")?;
    if header.contains_key("crit") {
        return Err(
            "JWT refused: its header has a crit parameter (no extension is supported)".into(),
        );
    }
    Ok(())
}

/// Decodes unpadded base64url (the JWS compact encoding); `None` on any
/// character outside the alphabet or an impossible length.
fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32)
    }
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET_A: &[u8] = b"secret-a-that-is-at-least-32-bytes-long";
    const SECRET_B: &[u8] = b"secret-b-that-is-at-least-32-bytes-long";

    fn verifier() -> JwtVerifier {
        let hs = |s: &[u8]| Key {
            kid: None,
            alg: Algorithm::HS256,
            key: DecodingKey::from_secret(s),
        };
        JwtVerifier {
            // Two keys of one algorithm without kids: a token is tried with both.
            keys: vec![hs(SECRET_A), hs(SECRET_B)],
            cfg: JwtConfig {
                issuer: "https://idp.test".into(),
                audience: "tether".into(),
                secret_file: None,
                public_key_file: None,
                jwks_file: None,
                name_claim: default_name_claim(),
                groups_claim: default_groups_claim(),
                leeway_secs: 0,
            },
        }
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    fn claims(exp_in: i64) -> serde_json::Value {
        serde_json::json!({"sub": "bob", "iss": "https://idp.test", "aud": "tether", "exp": now() + exp_in})
    }

    fn b64(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for c in data.chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..=c.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            }
        }
        out
    }

    /// An HS256 token with a header of our choosing (`jsonwebtoken` cannot
    /// write `crit`).
    fn signed(header: serde_json::Value, claims: serde_json::Value, secret: &[u8]) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let sig = ring::hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", b64(sig.as_ref()))
    }

    #[test]
    fn good_tokens_pass_with_either_key() {
        let v = verifier();
        for s in [SECRET_A, SECRET_B] {
            let t = encode(
                &Header::default(),
                &claims(60),
                &EncodingKey::from_secret(s),
            )
            .unwrap();
            assert_eq!(v.verify(&t).unwrap().name, "bob");
        }
        let t = signed(
            serde_json::json!({"alg": "HS256", "typ": "JWT"}),
            claims(60),
            SECRET_A,
        );
        assert!(v.verify(&t).is_ok(), "the hand-made token is well formed");
    }

    #[test]
    fn an_expired_token_is_reported_as_expired() {
        let v = verifier();
        // Signed with the first key: the second key's "bad signature" must
        // not hide the real reason.
        let t = encode(
            &Header::default(),
            &claims(-60),
            &EncodingKey::from_secret(SECRET_A),
        )
        .unwrap();
        let why = v.verify(&t).unwrap_err();
        assert!(why.contains("expired"), "{why}");
        let t = encode(
            &Header::default(),
            &claims(-60),
            &EncodingKey::from_secret(SECRET_B),
        )
        .unwrap();
        assert!(v.verify(&t).unwrap_err().contains("expired"));
        let mut c = claims(60);
        c["aud"] = "other".into();
        let t = encode(&Header::default(), &c, &EncodingKey::from_secret(SECRET_A)).unwrap();
        assert!(v.verify(&t).unwrap_err().contains("wrong audience"));
        let t = encode(
            &Header::default(),
            &claims(60),
            &EncodingKey::from_secret(b"another-key-of-at-least-32-bytes!!"),
        )
        .unwrap();
        assert!(v.verify(&t).unwrap_err().contains("bad signature"));
    }

    #[test]
    fn a_crit_header_is_refused() {
        let v = verifier();
        for crit in [
            serde_json::json!(["exp"]),
            serde_json::json!([]),
            serde_json::json!("b64"),
        ] {
            let t = signed(
                serde_json::json!({"alg": "HS256", "typ": "JWT", "crit": crit, "exp": 1}),
                claims(60),
                SECRET_A,
            );
            let why = v.verify(&t).unwrap_err();
            assert!(why.contains("crit"), "{why}");
        }
    }

    #[test]
    fn base64url_decodes_or_refuses() {
        assert_eq!(b64url_decode("").unwrap(), b"");
        assert_eq!(b64url_decode("YQ").unwrap(), b"a");
        assert_eq!(b64url_decode("YWI").unwrap(), b"ab");
        assert_eq!(b64url_decode("YWJj").unwrap(), b"abc");
        assert_eq!(b64url_decode("-_8").unwrap(), [0xfb, 0xff]);
        assert!(b64url_decode("YWJjZ").is_none());
        assert!(b64url_decode("YW=").is_none());
        assert!(b64url_decode("YW+/").is_none());
    }
}
