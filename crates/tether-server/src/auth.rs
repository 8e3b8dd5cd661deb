//! Credentials: the agent and client token tables, mutual-TLS agents, the
//! JWT verifier and the policy, swapped as a whole on reload
//! ([`AuthStore`]), and how a request carries a credential ([`bearer`]).

use anyhow::{bail, Context};
use foldhash::HashMap;
use http::{header, HeaderMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::{AgentCredential, ClientCredential, Protocol, ServerConfig};
use crate::identity::{ClientIdentity, IdentityKind};
use crate::jwt::{looks_like_jwt, JwtError, JwtVerifier};
use crate::policy::{Decision, Policy};

/// Why a client credential was refused (for the log only: the client learns
/// no more than "invalid client token"; no variant holds the credential).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CredentialError {
    /// Neither a configured token nor a JWT.
    #[error("unknown token")]
    Unknown,
    /// A JWT the verifier refused.
    #[error(transparent)]
    Jwt(#[from] JwtError),
}

impl CredentialError {
    /// Whether the credential is not one of ours at all (no token of the
    /// config, no JWT for this server's keys, issuer or audience), rather
    /// than one of ours refused (expired, not yet valid, a claim missing):
    /// a service's own bearer token beside a browser login.
    pub(crate) fn is_foreign(&self) -> bool {
        match self {
            CredentialError::Unknown => true,
            CredentialError::Jwt(e) => matches!(
                e,
                JwtError::BadHeader(_)
                    | JwtError::Crit
                    | JwtError::NoKey(_)
                    | JwtError::BadSignature
                    | JwtError::AlgorithmMismatch
                    | JwtError::Malformed(_)
                    | JwtError::WrongIssuer
                    | JwtError::WrongAudience
            ),
        }
    }
}

/// SHA-256 of a token, as 32 bytes. Tokens are compared by hash so that the
/// comparison time says nothing about the token, and configs can hold hashes.
pub(crate) fn token_hash(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// [`token_hash`] as lowercase hex, as `token_sha256` in the config wants it.
pub fn token_hash_hex(token: &str) -> String {
    token_hash(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_hex32(s: &str) -> anyhow::Result<[u8; 32]> {
    let s = s.trim();
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("a SHA-256 hash is written in hex digits");
    }
    if s.len() != 64 {
        bail!("a SHA-256 hash has 64 hex digits, got {}", s.len());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).context("not hex")?;
    }
    Ok(out)
}

fn credential_hash(
    who: &str,
    token: &Option<String>,
    hash: &Option<String>,
) -> anyhow::Result<[u8; 32]> {
    match (token, hash) {
        (Some(t), None) if !t.is_empty() => Ok(token_hash(t)),
        (None, Some(h)) => {
            let hash = parse_hex32(h).with_context(|| format!("{who}: token_sha256"))?;
            // An empty credential (`Authorization: Bearer` with nothing
            // after it, `?token=`, an empty login form) hashes to this:
            // such an entry would let anyone in.
            if hash == token_hash("") {
                bail!("{who}: token_sha256 is the SHA-256 of an empty token (was the secret unset when it was hashed?)");
            }
            Ok(hash)
        }
        _ => bail!("{who}: set exactly one of token / token_sha256"),
    }
}

/// The server's credential tables and policy. Rebuilt as a whole on reload.
#[derive(Debug, Default)]
pub(crate) struct Authenticator {
    agents: HashMap<[u8; 32], String>,
    /// Agents that may authenticate with a client certificate naming them.
    mtls_agents: std::collections::HashSet<String>,
    /// Every configured agent's name, sorted, once per configuration (the
    /// console lists them every second for each open console).
    agent_names: Vec<String>,
    clients: HashMap<[u8; 32], String>,
    policy: Policy,
    jwt: Option<JwtVerifier>,
    /// Configured secrets in clear text (warned about at load).
    plaintext_secrets: Vec<String>,
}

impl Authenticator {
    /// The clock skew a JWT is accepted with past its `exp` (zero without
    /// `[jwt]`).
    pub(crate) fn jwt_leeway(&self) -> std::time::Duration {
        self.jwt
            .as_ref()
            .map_or(std::time::Duration::ZERO, JwtVerifier::leeway)
    }

    /// Logs one warning per credential configured in clear text (at start
    /// and on every reload).
    pub(crate) fn warn_plaintext(&self) {
        for who in &self.plaintext_secrets {
            tracing::warn!("{who}: token in clear text (config file or flag); store token_sha256 instead (tether token hash)");
        }
    }

    /// Builds the tables, rejecting incomplete or duplicate credentials.
    pub(crate) fn from_config(cfg: &ServerConfig) -> anyhow::Result<Self> {
        let mut a = Authenticator::default();
        for AgentCredential {
            name,
            token,
            token_sha256,
            mtls,
        } in &cfg.agents
        {
            validate_name(name)?;
            if token.is_some() {
                a.plaintext_secrets.push(format!("agent {name}"));
            }
            if *mtls {
                a.mtls_agents.insert(name.clone());
                if token.is_none() && token_sha256.is_none() {
                    continue;
                }
            }
            let h = credential_hash(&format!("agent {name}"), token, token_sha256)?;
            if a.agents.insert(h, name.clone()).is_some() {
                bail!("agent {name}: the same token is configured twice");
            }
        }
        let mut allows = vec![];
        let mut names = std::collections::HashSet::new();
        for ClientCredential {
            name,
            token,
            token_sha256,
            allow,
        } in &cfg.clients
        {
            if token.is_some() {
                a.plaintext_secrets.push(format!("client {name}"));
            }
            let h = credential_hash(&format!("client {name}"), token, token_sha256)?;
            if a.clients.insert(h, name.clone()).is_some() {
                bail!("client {name}: the same token is configured twice");
            }
            // The same name may appear twice with two tokens (rotation);
            // both entries' allow lists apply to it.
            names.insert(name.clone());
            allows.push((name.clone(), allow.clone()));
        }
        a.policy = Policy::new(&cfg.rules, &allows)?.with_admins(&cfg.admins)?;
        if let Some(j) = &cfg.jwt {
            a.jwt = Some(JwtVerifier::new(j)?);
        }
        let mut names: Vec<String> = a
            .agents
            .values()
            .chain(a.mtls_agents.iter())
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        a.agent_names = names;
        Ok(a)
    }

    /// The agent name this token belongs to.
    pub(crate) fn agent(&self, token: &str) -> Option<&str> {
        self.agents.get(&token_hash(token)).map(String::as_str)
    }

    /// The agent a verified client certificate names (one of its DNS
    /// names is an agent configured with `mtls = true`).
    pub(crate) fn agent_by_cert<'a>(
        &self,
        dns_names: impl IntoIterator<Item = &'a str>,
    ) -> Option<String> {
        dns_names
            .into_iter()
            .find(|n| self.mtls_agents.contains(*n))
            .map(str::to_owned)
    }

    /// Whether an agent session that authenticated as `name` (by token hash
    /// `hash`, or by certificate when `None`) is still allowed in.
    pub(crate) fn agent_still_valid(&self, name: &str, hash: Option<&[u8; 32]>) -> bool {
        match hash {
            Some(h) => self.agents.get(h).is_some_and(|n| n == name),
            None => self.mtls_agents.contains(name),
        }
    }

    /// The client a bearer credential (static token or JWT) belongs to; the
    /// error is for the log and never contains the credential.
    pub(crate) fn client(&self, credential: &str) -> Result<ClientIdentity, CredentialError> {
        let hash = token_hash(credential);
        if let Some(name) = self.clients.get(&hash) {
            return Ok(ClientIdentity::new(
                name.clone(),
                vec![],
                IdentityKind::Token { hash },
            ));
        }
        match &self.jwt {
            Some(j) if looks_like_jwt(credential) => Ok(j.verify(credential)?),
            _ => Err(CredentialError::Unknown),
        }
    }

    /// Whether a live identity still holds after a reload: like
    /// [`Authenticator::client_still_valid`], and a JWT must verify against
    /// the current keys (a removed signing key ends its sessions).
    /// (One identity; a reload's pass over many uses one [`Revalidation`].)
    pub(crate) fn client_revalidate(&self, id: &ClientIdentity) -> bool {
        self.revalidation().holds(id)
    }

    /// A [`Revalidation`] against this configuration, for one reload's pass
    /// over every live stream, session and browser login.
    pub(crate) fn revalidation(&self) -> Revalidation<'_> {
        Revalidation {
            auth: self,
            jwts: HashMap::default(),
        }
    }

    /// Whether a live identity still holds (cheap, per request): its token is
    /// still configured under its name, or its JWT has not expired (and JWTs
    /// are still accepted). A JWT accepted within the clock-skew leeway
    /// holds to the leeway's end, as its streams and sessions do.
    pub(crate) fn client_still_valid(&self, id: &ClientIdentity) -> bool {
        match &id.kind {
            IdentityKind::Token { hash } => self.clients.get(hash).is_some_and(|n| *n == id.name),
            IdentityKind::Jwt { .. } => self.jwt.as_ref().is_some_and(|j| {
                let now = tokio::time::Instant::now();
                id.expires_at_within(now, j.leeway())
                    .is_none_or(|at| at > now)
            }),
        }
    }

    /// Decides one open.
    pub(crate) fn decide(
        &self,
        id: &ClientIdentity,
        agent: &str,
        service: &str,
        proto: Protocol,
    ) -> Decision {
        self.policy.decide(id, agent, service, proto)
    }

    /// Whether `id` may use the admin API (`admins` in the config).
    pub(crate) fn is_admin(&self, id: &ClientIdentity) -> bool {
        self.policy.is_admin(id)
    }

    /// Whether the console shows `agent` to `id`.
    pub(crate) fn may_see_agent(&self, id: &ClientIdentity, agent: &str) -> bool {
        self.policy.may_see_agent(id, agent)
    }

    /// Names of every configured agent, sorted.
    pub(crate) fn agent_names(&self) -> &[String] {
        &self.agent_names
    }

    /// Whether an agent may register under `name` (a token or certificate
    /// names it).
    pub(crate) fn is_agent_name(&self, name: &str) -> bool {
        self.agent_names
            .binary_search_by(|n| n.as_str().cmp(name))
            .is_ok()
    }
}

/// Whether `name` is a plain name, safe in paths and host labels: 1-63
/// letters, digits, `-`, `_`, `.` (agent names, and the service names the
/// console links to).
pub(crate) fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Agent names are path and label safe ([`is_plain_name`]).
fn validate_name(name: &str) -> anyhow::Result<()> {
    if !is_plain_name(name) {
        bail!("invalid agent name {name:?}: use 1-63 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

/// The credential tables in force. A reload swaps them whole; an open
/// reads the generation before deciding, so that one admitted under old
/// tables can tell it must be checked again ([`AuthStore::generation`]).
#[derive(Default)]
pub(crate) struct AuthStore {
    current: RwLock<Arc<Authenticator>>,
    generation: AtomicU64,
}

impl AuthStore {
    /// A store holding `a`.
    pub(crate) fn new(a: Authenticator) -> AuthStore {
        AuthStore {
            current: RwLock::new(Arc::new(a)),
            generation: AtomicU64::new(0),
        }
    }

    /// The current credential tables and policy.
    pub(crate) fn get(&self) -> Arc<Authenticator> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Installs new credential tables and policy.
    pub(crate) fn set(&self, a: Authenticator) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(a);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Bumped by every [`AuthStore::set`]; read it *before* deciding.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

/// The credential of an `Authorization: Bearer` header. The scheme is
/// matched in any letter case and may be followed by any run of spaces and
/// tabs (RFC 9110 5.6.3, 11.4): a bearer header the server failed to
/// recognise would not count as the credential, and would go on to the
/// service, token and all. A bearer header without a credential yields an
/// empty one, which is then refused rather than ignored. Every
/// `Authorization` header is looked at, not the first only: a token in a
/// second one, behind a `Basic` header, would otherwise not count as the
/// credential, and would reach the service.
pub(crate) fn bearer(h: &HeaderMap) -> Option<String> {
    h.get_all(header::AUTHORIZATION)
        .iter()
        .find_map(bearer_of)
        .map(|c| String::from_utf8_lossy(c).into_owned())
}

/// Whether `h` carries more than one bearer `Authorization` value.
pub(crate) fn several_bearers(h: &HeaderMap) -> bool {
    h.get_all(header::AUTHORIZATION)
        .iter()
        .filter(|v| bearer_of(v).is_some())
        .nth(1)
        .is_some()
}

/// The credential of one `Authorization` value when it is a bearer one.
fn bearer_of(v: &header::HeaderValue) -> Option<&[u8]> {
    let v = v.as_bytes().trim_ascii();
    let end = v
        .iter()
        .position(|b| *b == b' ' || *b == b'\t')
        .unwrap_or(v.len());
    let (scheme, credential) = v.split_at(end);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| credential.trim_ascii())
}

/// Removes the bearer `Authorization` values (what [`bearer`] reads: the
/// tether credential), keeping any other, such as a service's own `Basic`.
pub(crate) fn strip_bearer(h: &mut HeaderMap) {
    let mut values = h.get_all(header::AUTHORIZATION).iter();
    if let (Some(only), None) = (values.next(), values.next()) {
        // The usual case: one header, the credential.
        if bearer_of(only).is_some() {
            h.remove(header::AUTHORIZATION);
        }
        return;
    }
    let kept: Vec<header::HeaderValue> = h
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter(|v| bearer_of(v).is_none())
        .cloned()
        .collect();
    h.remove(header::AUTHORIZATION);
    for v in kept {
        h.append(header::AUTHORIZATION, v);
    }
}

/// [`Authenticator::client_revalidate`] for many identities at once, each
/// distinct JWT verified once: a reload re-checks every live stream, session
/// and browser login, most of them sharing a few tokens, and a signature
/// check (tens of µs for RS256) per stream would hold the stream table's lock
/// for seconds at 100 000 streams.
pub(crate) struct Revalidation<'a> {
    auth: &'a Authenticator,
    /// Each JWT checked so far (one signature check each): its verified
    /// subject and groups, or `None` where it no longer verifies.
    jwts: HashMap<Arc<str>, Option<(String, Vec<String>)>>,
}

impl Revalidation<'_> {
    /// The configuration it checks against.
    pub(crate) fn auth(&self) -> &Authenticator {
        self.auth
    }

    /// Whether `id` still holds: like [`Authenticator::client_still_valid`],
    /// and a JWT must verify against the current keys (a removed signing key
    /// ends its sessions) and still name `id`, in the same groups: a reload
    /// that reads the groups from another claim must not leave sessions
    /// deciding with the groups read before (they end, and reconnect with
    /// the new ones).
    pub(crate) fn holds(&mut self, id: &ClientIdentity) -> bool {
        let IdentityKind::Jwt { token, .. } = &id.kind else {
            return self.auth.client_still_valid(id);
        };
        let auth = self.auth;
        let verified = self.jwts.entry(token.clone()).or_insert_with(|| {
            auth.jwt
                .as_ref()
                .and_then(|j| j.verify(token).ok())
                .map(|v| (v.name, v.groups))
        });
        verified
            .as_ref()
            .is_some_and(|(name, groups)| *name == id.name && *groups == id.groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A credential that is not ours at all may be a service's own beside a
    /// login; one of ours that was refused (an expired JWT) never is.
    #[test]
    fn only_credentials_not_ours_count_as_foreign() {
        let foreign = [
            CredentialError::Unknown,
            JwtError::BadSignature.into(),
            JwtError::WrongAudience.into(),
            JwtError::WrongIssuer.into(),
            JwtError::Malformed("x".into()).into(),
        ];
        assert!(foreign.iter().all(CredentialError::is_foreign));
        let ours = [
            JwtError::Expired.into(),
            JwtError::NotYetValid.into(),
            JwtError::MissingClaim("sub".into()).into(),
            JwtError::WrongSubject.into(),
        ];
        assert!(!ours.iter().any(CredentialError::is_foreign));
    }

    #[test]
    fn tokens_and_allow_lists() {
        let cfg: ServerConfig = toml::from_str(&format!(
            r#"
            [[agent]]
            name = "prod"
            token = "agent-secret"
            [[client]]
            name = "alice"
            token_sha256 = "{}"
            allow = ["prod/db", "staging/*"]
            "#,
            hex(&token_hash("alice-secret"))
        ))
        .unwrap();
        let a = Authenticator::from_config(&cfg).unwrap();
        assert_eq!(a.agent("agent-secret"), Some("prod"));
        assert_eq!(a.agent("nope"), None);
        let alice = a.client("alice-secret").unwrap();
        let may = |agent: &str, svc: &str| a.decide(&alice, agent, svc, Protocol::Tcp).allowed;
        assert!(may("prod", "db"));
        assert!(!may("prod", "redis"));
        assert!(may("staging", "anything"));
        assert!(a.client("agent-secret").is_err());
        assert!(a.client_still_valid(&alice));
        assert_eq!(a.plaintext_secrets, vec!["agent prod".to_owned()]);
    }

    #[test]
    fn the_hash_of_an_empty_token_is_refused() {
        for kind in ["agent", "client"] {
            let cfg: ServerConfig = toml::from_str(&format!(
                "[[{kind}]]\nname = \"x\"\ntoken_sha256 = \"{}\"\n",
                hex(&token_hash(""))
            ))
            .unwrap();
            let e = Authenticator::from_config(&cfg).unwrap_err();
            assert!(format!("{e:#}").contains("empty token"), "{kind}: {e:#}");
        }
    }

    #[test]
    fn a_reload_verifies_each_distinct_jwt_once() {
        let dir = std::env::temp_dir().join(format!("tether-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = b"a-test-secret-of-at-least-32-bytes!!";
        let file = dir.join("hs.secret");
        std::fs::write(&file, secret).unwrap();
        let cfg = |with_jwt: bool| -> ServerConfig {
            let jwt = format!(
                "[jwt]\nissuer = \"https://idp.test\"\naudience = \"tether\"\nsecret_file = {:?}\n",
                file.display().to_string()
            );
            toml::from_str(if with_jwt { &jwt } else { "" }).unwrap()
        };
        let a = Authenticator::from_config(&cfg(true)).unwrap();
        let sign = |sub: &str| {
            let claims = serde_json::json!({"sub": sub, "iss": "https://idp.test", "aud": "tether",
                "exp": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600});
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(secret),
            )
            .unwrap()
        };
        let bob = a.client(&sign("bob")).unwrap();
        let carol = a.client(&sign("carol")).unwrap();
        // A thousand streams of bob's and one of carol's: two signature checks.
        let mut check = a.revalidation();
        for _ in 0..1000 {
            assert!(check.holds(&bob));
        }
        assert!(check.holds(&carol));
        assert_eq!(check.jwts.len(), 2);
        // Bob's token under another name does not hold (the subject is compared).
        let mut impostor = bob.clone();
        impostor.name = "mallory".into();
        assert!(!check.holds(&impostor));
        // Nor in other groups than the token's (the groups claim changed).
        let mut regrouped = bob.clone();
        regrouped.groups = vec!["admins".into()];
        assert!(!check.holds(&regrouped));
        // Without the key, none holds; still one check per token.
        let b = Authenticator::from_config(&cfg(false)).unwrap();
        let mut check = b.revalidation();
        assert!(!check.holds(&bob) && !check.holds(&bob) && !check.holds(&carol));
        assert_eq!(check.jwts.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_hashes_are_errors_not_panics() {
        assert!(parse_hex32(&"é".repeat(32)).is_err());
        assert!(parse_hex32("zz").is_err());
        assert!(parse_hex32(&"a".repeat(64)).is_ok());
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn bearer_is_recognised_in_any_case_and_spacing() {
        let auth = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                header::HeaderValue::from_bytes(v).unwrap(),
            );
            bearer(&h)
        };
        for v in [
            &b"Bearer tok"[..],
            b"bearer tok",
            b"BEARER  tok",
            b"Bearer\ttok",
            b"Bearer \t tok ",
            b" bEaReR\t\ttok\t",
        ] {
            assert_eq!(auth(v).as_deref(), Some("tok"), "{v:?}");
        }
        // A bearer header without a usable credential is still a bearer
        // header (refused later), never passed over.
        assert_eq!(auth(b"Bearer").as_deref(), Some(""));
        assert_eq!(auth(b"Bearer   ").as_deref(), Some(""));
        assert!(auth(b"Bearer tok\xff").is_some());
        assert_eq!(auth(b"Basic dXNlcjpwYXNz"), None);
        assert_eq!(auth(b"Bearertok"), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
        // A token in a second header, behind one for the service.
        let mut h = HeaderMap::new();
        h.append(header::AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().unwrap());
        h.append(header::AUTHORIZATION, "Bearer tok".parse().unwrap());
        assert_eq!(bearer(&h).as_deref(), Some("tok"));
        // The credential goes, the service's own header stays.
        strip_bearer(&mut h);
        let left: Vec<_> = h.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(left, ["Basic dXNlcjpwYXNz"]);
    }
}
