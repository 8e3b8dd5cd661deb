//! `[jwt]`: client identities minted by an identity provider. Verified by
//! [`crate::jwt::JwtVerifier`].

use serde::Deserialize;
use std::path::PathBuf;

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

/// The most clock skew `leeway_secs` may allow: a day. More is no skew
/// any clock has, and a leeway past the Unix time itself would overflow
/// the JWT library's `now - leeway`.
const MAX_LEEWAY_SECS: u64 = 24 * 3600;

impl JwtConfig {
    /// Checks the leeway (the keys are checked as they load).
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.leeway_secs > MAX_LEEWAY_SECS {
            anyhow::bail!(
                "[jwt] leeway_secs = {} is more clock skew than any clock has (at most {MAX_LEEWAY_SECS}, a day)",
                self.leeway_secs
            );
        }
        Ok(())
    }
}
