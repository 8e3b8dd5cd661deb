//! A connection's last bearer credential, and who it proved to be.
//!
//! An API client on a keep-alive connection sends the same token with
//! every request, and hashing it (SHA-256, to look it up among the
//! configured ones) was about 3 % of the server's instructions per proxied
//! request. The connection remembers the last token and its identity, and
//! a request presenting the same one skips the hash. It is kept per
//! connection, so no token outlives the connection that sent it, and it is
//! used only while it would be judged the same afresh: the credential
//! tables have not been reloaded since, and the identity still holds (a
//! token still configured under its name, a JWT not expired).

use std::sync::Mutex;

use http::HeaderMap;
use subtle::ConstantTimeEq;

use super::login::{identify, identify_beside, Via};
use super::Web;
use crate::auth::bearer;
use crate::identity::ClientIdentity;

/// What one HTTP connection remembers of its last bearer credential.
#[derive(Default)]
pub(crate) struct ConnectionCredential(Mutex<Option<Remembered>>);

struct Remembered {
    /// The credential tables' generation it was checked against.
    generation: u64,
    token: String,
    identity: ClientIdentity,
}

impl ConnectionCredential {
    fn lookup(&self, generation: u64, token: &str) -> Option<ClientIdentity> {
        let slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let r = slot.as_ref()?;
        (r.generation == generation && same_secret(&r.token, token)).then(|| r.identity.clone())
    }

    fn remember(&self, generation: u64, token: String, identity: &ClientIdentity) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Remembered {
            generation,
            token,
            identity: identity.clone(),
        });
    }
}

/// Like [`identify`], remembering a bearer credential on `conn`.
pub(crate) fn identify_on(
    web: &Web,
    h: &HeaderMap,
    conn: &ConnectionCredential,
) -> Option<(ClientIdentity, Via)> {
    let Some(token) = bearer(h) else {
        return identify(web, h);
    };
    // The generation first: tables installed after this read have a newer
    // one, so what is remembered now is not used under them.
    let generation = web.auth.generation();
    let auth = web.auth.get();
    if let Some(id) = conn.lookup(generation, &token) {
        if auth.client_still_valid(&id) {
            return Some((id, Via::Bearer));
        }
    }
    let id = match auth.client(&token) {
        Ok(id) => id,
        Err(e) => return identify_beside(web, h, &e),
    };
    conn.remember(generation, token, &id);
    Some((id, Via::Bearer))
}

/// Compares two secrets in time that depends on their lengths only (a
/// shared upstream proxy may carry several users' requests on one
/// connection).
fn same_secret(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("alice-token", "alice-token"));
        assert!(!same_secret("alice-token", "alice-tokeN"));
        assert!(!same_secret("alice-token", "Alice-token"));
        assert!(!same_secret("alice-token", "alice-token2"));
        assert!(same_secret("", ""));
    }
}
