//! Who a client is, once its credential checked out ([`ClientIdentity`]).
//!
//! A leaf module: the credential tables ([`crate::auth`]), the JWT verifier
//! ([`crate::jwt`]) and the policy ([`crate::policy`]) all speak of
//! identities, and none of them needs the others to do so.

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How a client proved who it is.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum IdentityKind {
    /// A static token (`[[client]]`); `hash` is its SHA-256, so a reload can
    /// tell whether this token is still configured.
    Token {
        /// SHA-256 of the token.
        hash: [u8; 32],
    },
    /// A JWT from the identity provider, valid until `expires` (Unix seconds).
    Jwt {
        /// The token's `exp`.
        expires: u64,
        /// The JWT itself, kept in memory only so that a reload can verify
        /// it again against the new keys (never logged: see `Debug`).
        token: Arc<str>,
    },
}

impl std::fmt::Debug for IdentityKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentityKind::Token { .. } => f.write_str("Token"),
            IdentityKind::Jwt { expires, .. } => write!(f, "Jwt {{ expires: {expires} }}"),
        }
    }
}

/// A client that presented a valid credential. Made by
/// [`ClientIdentity::new`] and not changed after: its limits key is made
/// from its name and kind then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientIdentity {
    /// Its name (`[[client]] name`, or the JWT's name claim).
    pub(crate) name: String,
    /// Its groups (JWT group claim; empty for token clients).
    pub(crate) groups: Vec<String>,
    /// Token or JWT.
    pub(crate) kind: IdentityKind,
    /// See [`ClientIdentity::key`]; made once, as the identity is (it is
    /// asked for at every request and stream).
    key: Arc<str>,
}

impl ClientIdentity {
    /// The identity `name` (in `groups`) proved with a credential of `kind`.
    pub(crate) fn new(name: String, groups: Vec<String>, kind: IdentityKind) -> Self {
        let prefix = match kind {
            IdentityKind::Token { .. } => "token:",
            IdentityKind::Jwt { .. } => "jwt:",
        };
        let key = [prefix, &name].concat().into();
        ClientIdentity {
            name,
            groups,
            kind,
            key,
        }
    }

    /// The key its limits and stream slots are counted under: a token
    /// client and a JWT subject of the same name are different identities.
    pub(crate) fn key(&self) -> &Arc<str> {
        &self.key
    }

    /// Time until the credential expires (`None`: it does not).
    pub(crate) fn expires_in(&self) -> Option<Duration> {
        match self.kind {
            IdentityKind::Token { .. } => None,
            IdentityKind::Jwt { expires, .. } => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                Some(Duration::from_secs(expires.saturating_sub(now)))
            }
        }
    }

    /// When the credential expires on this process's clock, counted from
    /// `now`; `None` when it does not, or only beyond what an [`Instant`]
    /// can hold (a signed JWT may carry an `exp` of 10^19 seconds: adding
    /// that to an `Instant` would panic). A credential accepted within
    /// `leeway` after its `exp` (clock skew) lasts to the end of the
    /// leeway, not a moment (a proxied request would be cut as it starts).
    pub(crate) fn expires_at_within(&self, now: Instant, leeway: Duration) -> Option<Instant> {
        let IdentityKind::Jwt { expires, .. } = self.kind else {
            return None;
        };
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let left = if expires > unix_now {
            expires - unix_now
        } else {
            expires
                .saturating_add(leeway.as_secs())
                .saturating_sub(unix_now)
        };
        now.checked_add(Duration::from_secs(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt_until(expires: u64) -> ClientIdentity {
        let kind = IdentityKind::Jwt {
            expires,
            token: "t".into(),
        };
        ClientIdentity::new("bob".into(), vec![], kind)
    }

    #[test]
    fn an_expiry_beyond_the_clock_is_no_expiry_not_a_panic() {
        let now = Instant::now();
        assert_eq!(
            jwt_until(10_000_000_000_000_000_000).expires_at_within(now, Duration::ZERO),
            None
        );
        assert_eq!(
            jwt_until(u64::MAX).expires_at_within(now, Duration::ZERO),
            None
        );
        let token = ClientIdentity::new("ci".into(), vec![], IdentityKind::Token { hash: [0; 32] });
        assert_eq!(token.expires_at_within(now, Duration::ZERO), None);
        assert_eq!(token.expires_at_within(now, Duration::from_secs(30)), None);
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        // Expired 5 s ago, accepted within a 30 s leeway: about 25 s left.
        let late = jwt_until(unix_now - 5)
            .expires_at_within(now, Duration::from_secs(30))
            .unwrap();
        assert!(late >= now + Duration::from_secs(24) && late <= now + Duration::from_secs(26));
        // Not yet expired: its `exp`, no leeway added.
        let soon = jwt_until(unix_now + 60)
            .expires_at_within(now, Duration::from_secs(30))
            .unwrap();
        assert!(soon <= now + Duration::from_secs(61));
        // An ordinary `exp` an hour from now is an hour from now.
        let in_an_hour = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        let at = jwt_until(in_an_hour)
            .expires_at_within(now, Duration::ZERO)
            .unwrap();
        let left = at - now;
        assert!(
            left > Duration::from_secs(3590) && left <= Duration::from_secs(3600),
            "{left:?}"
        );
    }
}
