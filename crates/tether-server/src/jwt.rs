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

use crate::config::JwtConfig;
use crate::identity::{ClientIdentity, IdentityKind};

/// The shortest HS256 shared secret taken, from `secret_file` or a JWKS
/// `oct` key: RFC 7518 3.2 asks for a key as long as the hash (256 bits).
const MIN_HS256_SECRET: usize = 32;

/// Why a JWT was refused, in words for the log (the library's names read
/// badly: an expired token is `ExpiredSignature`). Callers tell the client
/// no more than "invalid token", and no variant holds the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JwtError {
    /// The header is not base64url JSON, or the library could not read it.
    #[error("bad JWT header: {0}")]
    BadHeader(String),
    /// The header has a `crit` parameter.
    #[error("JWT refused: its header has a crit parameter (no extension is supported)")]
    Crit,
    /// No configured key is for the header's algorithm.
    #[error("JWT refused: no key for algorithm {0:?}")]
    NoKey(Algorithm),
    /// `exp` is in the past.
    #[error("JWT refused: expired (exp is in the past)")]
    Expired,
    /// `nbf` is in the future.
    #[error("JWT refused: not valid yet (nbf is in the future)")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("JWT refused: wrong issuer (iss)")]
    WrongIssuer,
    /// No `aud` is the configured audience.
    #[error("JWT refused: wrong audience (aud)")]
    WrongAudience,
    /// `sub` failed a check.
    #[error("JWT refused: wrong subject (sub)")]
    WrongSubject,
    /// A required claim is missing.
    #[error("JWT refused: missing required claim {0}")]
    MissingClaim(String),
    /// No key of the algorithm verified the signature.
    #[error("JWT refused: bad signature")]
    BadSignature,
    /// The algorithm does not match the key.
    #[error("JWT refused: algorithm does not match the key")]
    AlgorithmMismatch,
    /// Anything else the library refused.
    #[error("JWT refused: malformed ({0})")]
    Malformed(String),
    /// The token has no usable name claim.
    #[error("JWT has no {0} claim")]
    NoName(String),
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Checks JWTs against the configured keys.
pub(crate) struct JwtVerifier {
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
pub(crate) fn looks_like_jwt(t: &str) -> bool {
    t.starts_with("ey")
        && t.split('.').count() == 3
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl JwtVerifier {
    /// The clock skew allowed past a token's `exp` (`leeway_secs`).
    pub(crate) fn leeway(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.cfg.leeway_secs)
    }

    /// Loads the keys (shared secrets of at least [`MIN_HS256_SECRET`]).
    pub(crate) fn new(cfg: &JwtConfig) -> anyhow::Result<JwtVerifier> {
        cfg.validate()?;
        let mut keys = vec![];
        if let Some(p) = &cfg.secret_file {
            let raw =
                std::fs::read(p).with_context(|| format!("[jwt] secret_file {}", p.display()))?;
            let secret = raw.strip_suffix(b"\n").unwrap_or(&raw);
            if secret.len() < MIN_HS256_SECRET {
                bail!("[jwt] secret_file: an HS256 secret needs at least {MIN_HS256_SECRET} bytes");
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
                // A key for encryption verifies no signature (a provider's
                // JWKS may carry one beside its signing keys).
                if matches!(
                    jwk.common.public_key_use,
                    Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
                ) {
                    continue;
                }
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
                // A shared secret from the JWKS is held to the secret
                // file's minimum: an empty `k` would let anyone sign.
                if let AlgorithmParameters::OctetKey(oct) = &jwk.algorithm {
                    // Unpadded base64url: 3 bytes per 4 characters.
                    let bytes = oct.value.trim_end_matches('=').len() * 3 / 4;
                    if bytes < MIN_HS256_SECRET {
                        bail!(
                            "[jwt] jwks_file: shared-secret key {:?} has {bytes} bytes; HS256 needs at least {MIN_HS256_SECRET}",
                            jwk.common.key_id.as_deref().unwrap_or("(no kid)")
                        );
                    }
                }
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
    pub(crate) fn verify(&self, token: &str) -> Result<ClientIdentity, JwtError> {
        refuse_crit(token)?;
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| JwtError::BadHeader(e.to_string()))?;
        let mut last = JwtError::NoKey(header.alg);
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

    fn identity(
        &self,
        claims: &serde_json::Value,
        token: &str,
    ) -> Result<ClientIdentity, JwtError> {
        let name = claims
            .get(&self.cfg.name_claim)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| JwtError::NoName(self.cfg.name_claim.clone()))?;
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
        Ok(ClientIdentity::new(
            name.to_owned(),
            groups,
            IdentityKind::Jwt {
                expires,
                token: token.into(),
            },
        ))
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

/// The refusal for a decoding error.
fn refusal(kind: &ErrorKind) -> JwtError {
    match kind {
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
        ErrorKind::InvalidAudience => JwtError::WrongAudience,
        ErrorKind::InvalidSubject => JwtError::WrongSubject,
        ErrorKind::MissingRequiredClaim(c) => JwtError::MissingClaim(c.clone()),
        ErrorKind::InvalidSignature => JwtError::BadSignature,
        ErrorKind::InvalidAlgorithm => JwtError::AlgorithmMismatch,
        other => JwtError::Malformed(format!("{other:?}")),
    }
}

/// Refuses a token whose protected header has a `crit` parameter: it names
/// extensions that change how the token must be read, and we implement none
/// (`jsonwebtoken` ignores the parameter, so it is checked here).
fn refuse_crit(token: &str) -> Result<(), JwtError> {
    let head = token.split('.').next().unwrap_or("");
    let bytes = b64url_decode(head).ok_or(JwtError::BadHeader("not base64url".into()))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes)
        .map_err(|_| JwtError::BadHeader("not a JSON object".into()))?;
    if header.contains_key("crit") {
        return Err(JwtError::Crit);
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
                name_claim: "sub".into(),
                groups_claim: "groups".into(),
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

    /// A JWKS shared secret shorter than the secret file's minimum (an
    /// empty one would let anyone sign) stops the load; a long one loads,
    /// and a key for encryption is skipped whatever its length.
    #[test]
    fn a_short_jwks_shared_secret_is_refused() {
        let dir = std::env::temp_dir().join(format!("tether-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let load = |k: &str| {
            let file = dir.join("jwks.json");
            // Beside it, an empty encryption key: not a signing key, skipped.
            let set = serde_json::json!({"keys": [
                {"kty": "oct", "kid": "e", "use": "enc", "k": ""},
                {"kty": "oct", "kid": "s", "alg": "HS256", "k": k},
            ]});
            std::fs::write(&file, set.to_string()).unwrap();
            let mut cfg = verifier().cfg;
            cfg.jwks_file = Some(file);
            JwtVerifier::new(&cfg)
        };
        for short in ["", &b64(&SECRET_A[..31])] {
            let Err(e) = load(short) else {
                panic!("a short shared secret loaded")
            };
            assert!(e.to_string().contains("needs at least 32"), "{e}");
        }
        let v = load(&b64(SECRET_A)).unwrap();
        let t = encode(
            &Header::new(Algorithm::HS256),
            &claims(60),
            &EncodingKey::from_secret(SECRET_A),
        )
        .unwrap();
        assert_eq!(v.verify(&t).unwrap().name, "bob");
        let _ = std::fs::remove_dir_all(&dir);
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
        let why = v.verify(&t).unwrap_err().to_string();
        assert!(why.contains("expired"), "{why}");
        let t = encode(
            &Header::default(),
            &claims(-60),
            &EncodingKey::from_secret(SECRET_B),
        )
        .unwrap();
        assert_eq!(v.verify(&t).unwrap_err(), JwtError::Expired);
        let mut c = claims(60);
        c["aud"] = "other".into();
        let t = encode(&Header::default(), &c, &EncodingKey::from_secret(SECRET_A)).unwrap();
        assert_eq!(v.verify(&t).unwrap_err(), JwtError::WrongAudience);
        let t = encode(
            &Header::default(),
            &claims(60),
            &EncodingKey::from_secret(b"another-key-of-at-least-32-bytes!!"),
        )
        .unwrap();
        assert_eq!(v.verify(&t).unwrap_err(), JwtError::BadSignature);
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
            assert_eq!(why, JwtError::Crit);
            assert!(why.to_string().contains("crit"), "{why}");
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
