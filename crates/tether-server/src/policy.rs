//! Who may open what: one policy, evaluated on every open (CLI streams, raw
//! WebSocket, SOCKS/HTTP-proxy streams from the CLI, browser requests).
//!
//! Deny by default. A request is allowed when some rule allows it and no rule
//! denies it. A rule names:
//!
//! * **who**: identity names (`alice`, globs allowed), `group:NAME` for a
//!   JWT group claim, or `*`;
//! * **what**: `AGENT/SERVICE` globs (the service part may be `host:port`
//!   for raw targets the agent allows);
//! * **how**: protocols (`tcp`, `udp`, `http`); all when absent.
//!
//! A `[[client]]`'s own `allow` list is a rule for that token identity only,
//! so a JWT whose subject happens to be `alice` does not inherit it.
//!
//! The agent checks its own allow-list again on every open, so even a
//! compromised server reaches nothing the agent does not allow.

use anyhow::bail;
use foldhash::HashMap;
use tether_net::pattern::glob_match;

use crate::config::{Protocol, RuleConfig};
use crate::identity::{ClientIdentity, IdentityKind};

#[derive(Debug, Clone)]
enum Subject {
    /// Any identity with this name (glob).
    Name(String),
    /// Identities carrying this group (glob).
    Group(String),
    /// Only the token identity `[[client]] name = ...`.
    TokenClient(String),
}

impl Subject {
    fn matches(&self, id: &ClientIdentity) -> bool {
        match self {
            Subject::Name(p) => glob_match(p, &id.name),
            Subject::Group(p) => id.groups.iter().any(|g| glob_match(p, g)),
            Subject::TokenClient(n) => {
                matches!(id.kind, IdentityKind::Token { .. }) && *n == id.name
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    who: Vec<Subject>,
    targets: Vec<String>,
    deny: bool,
    protocols: Vec<Protocol>,
    /// For decisions: where the rule came from.
    label: String,
}

impl Rule {
    fn applies(&self, id: &ClientIdentity, target: &str, proto: Protocol) -> bool {
        (self.protocols.is_empty() || self.protocols.contains(&proto))
            && self.who.iter().any(|s| s.matches(id))
            && self.targets.iter().any(|p| target_matches(p, target))
    }
}

/// Whether a rule's `AGENT/SERVICE` pattern covers a target. A raw target
/// (`HOST:PORT`) is covered only by a pattern that names one (its service
/// part has a `:`): `prod/*` means prod's named services, so a deny of
/// `prod/db` cannot be walked around by dialing db's address through
/// `prod/*`; raw access needs a rule such as `prod/*.svc.cluster.local:*`.
fn target_matches(pattern: &str, target: &str) -> bool {
    let raw_target = target.split_once('/').is_some_and(|(_, s)| s.contains(':'));
    let raw_pattern = pattern
        .split_once('/')
        .is_some_and(|(_, s)| s.contains(':'));
    (raw_pattern || !raw_target) && glob_match(pattern, target)
}

/// `agent/service`: how a target is named in rules, audit lines and
/// refusals. Built without `fmt`, which took ~700 instructions for these
/// two strings, on every proxied request (twice).
pub(crate) fn target_name(agent: &str, service: &str) -> String {
    let mut t = String::with_capacity(agent.len() + 1 + service.len());
    t.push_str(agent);
    t.push('/');
    t.push_str(service);
    t
}

/// `AGENT/SERVICE` as the policy compares it: a raw `host:port` service is
/// lowercased (DNS names are case-insensitive and the agent lowercases them
/// too, so `PROD.example:80` must not slip past a rule about `prod.example`).
fn normalize_target(t: &str) -> String {
    match t.split_once('/') {
        Some((agent, service)) if service.contains(':') => {
            format!("{agent}/{}", service.to_ascii_lowercase())
        }
        _ => t.to_owned(),
    }
}

/// A rule's target pattern in the form it is compared in. A raw target
/// without wildcards is written in the one spelling targets arrive in
/// (`[::ffff:10.0.0.5]:22` becomes `10.0.0.5:22`), or refused when it is
/// not a valid target, so that no rule silently never matches.
fn rule_pattern(t: &str) -> Result<String, String> {
    let t = normalize_target(t);
    match t.split_once('/') {
        Some((agent, service)) if service.contains(':') && !service.contains(['*', '?']) => {
            tether_proto::target::RawTarget::parse(service)
                .map(|raw| format!("{agent}/{raw}"))
                .map_err(|e| e.to_string())
        }
        _ => Ok(t),
    }
}

/// The outcome of a check, with a reason fit for the requester and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    /// Whether the open may proceed.
    pub(crate) allowed: bool,
    /// Why the open is refused (which deny rule, or that no rule allows
    /// it), for the refusal and the audit line; empty when allowed (built
    /// only when needed: this runs for every open and request).
    pub(crate) reason: String,
}

/// The compiled policy.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    /// The `[[rule]]`s, in order.
    rules: Vec<Rule>,
    /// Each token client's own `allow` list, by name: looked up, not walked,
    /// so that a config with thousands of clients costs an open no more than
    /// one with a few (they only ever allow, and only their own client).
    client_allows: HashMap<String, Rule>,
    /// Who may use the admin API (`admins` in the config).
    admins: Vec<Subject>,
}

/// A `who` entry: `group:NAME` or a name, both globs.
fn subject(w: &str) -> Subject {
    match w.strip_prefix("group:") {
        Some(g) => Subject::Group(g.to_owned()),
        None => Subject::Name(w.to_owned()),
    }
}

impl Policy {
    /// Compiles `[[rule]]`s and the `allow` lists of token clients
    /// (`(name, patterns)`).
    pub(crate) fn new(
        rules: &[RuleConfig],
        client_allows: &[(String, Vec<String>)],
    ) -> anyhow::Result<Policy> {
        let mut out = vec![];
        for (i, r) in rules.iter().enumerate() {
            if r.who.is_empty() {
                bail!("[[rule]] #{}: `who` is empty", i + 1);
            }
            if r.allow.is_empty() == r.deny.is_empty() {
                bail!("[[rule]] #{}: set exactly one of `allow` / `deny`", i + 1);
            }
            let who = r.who.iter().map(|w| subject(w)).collect();
            let deny = !r.deny.is_empty();
            let targets = if deny { &r.deny } else { &r.allow }
                .iter()
                .map(|t| rule_pattern(t))
                .collect::<Result<Vec<String>, String>>()
                .map_err(|e| anyhow::anyhow!("[[rule]] #{}: {e}", i + 1))?;
            for t in &targets {
                if !t.contains('/') {
                    bail!("[[rule]] #{}: target {t:?} is not AGENT/SERVICE", i + 1);
                }
            }
            out.push(Rule {
                who,
                targets,
                deny,
                protocols: r.protocols.clone(),
                label: format!("rule #{}", i + 1),
            });
        }
        let mut own = HashMap::default();
        for (name, allow) in client_allows {
            if allow.is_empty() {
                continue;
            }
            let targets = allow
                .iter()
                .map(|t| rule_pattern(t))
                .collect::<Result<Vec<String>, String>>()
                .map_err(|e| anyhow::anyhow!("client {name}'s allow list: {e}"))?;
            own.entry(name.clone())
                .or_insert_with(|| Rule {
                    who: vec![Subject::TokenClient(name.clone())],
                    targets: vec![],
                    deny: false,
                    protocols: vec![],
                    label: format!("client {name}'s allow list"),
                })
                .targets
                .extend(targets);
        }
        Ok(Policy {
            rules: out,
            client_allows: own,
            admins: vec![],
        })
    }

    /// The policy with `admins` (names and `group:NAME`s, globs, as in a
    /// rule's `who`) allowed to use the admin API.
    pub(crate) fn with_admins(mut self, admins: &[String]) -> anyhow::Result<Policy> {
        for w in admins {
            if w.is_empty() || w == "group:" {
                bail!("admins: an empty entry");
            }
        }
        self.admins = admins.iter().map(|w| subject(w)).collect();
        Ok(self)
    }

    /// Whether `id` may use the admin API.
    pub(crate) fn is_admin(&self, id: &ClientIdentity) -> bool {
        self.admins.iter().any(|s| s.matches(id))
    }

    /// The rules that may allow `id`: the `[[rule]]`s, then its own allow
    /// list if it is a token client that has one.
    fn allow_rules<'a>(&'a self, id: &ClientIdentity) -> impl Iterator<Item = &'a Rule> {
        let own = match id.kind {
            IdentityKind::Token { .. } => self.client_allows.get(&id.name),
            _ => None,
        };
        self.rules.iter().filter(|r| !r.deny).chain(own)
    }

    /// Decides whether `id` may open `agent/service` over `proto`.
    pub(crate) fn decide(
        &self,
        id: &ClientIdentity,
        agent: &str,
        service: &str,
        proto: Protocol,
    ) -> Decision {
        let target = if service.contains(':') {
            normalize_target(&target_name(agent, service))
        } else {
            target_name(agent, service) // nothing to normalise: one allocation
        };
        if let Some(r) = self
            .rules
            .iter()
            .find(|r| r.deny && r.applies(id, &target, proto))
        {
            return Decision {
                allowed: false,
                reason: format!(
                    "{} may not open {target} ({}): denied by {}",
                    id.name,
                    proto.as_str(),
                    r.label
                ),
            };
        }
        match self.allow_rules(id).find(|r| r.applies(id, &target, proto)) {
            Some(_) => Decision {
                allowed: true,
                reason: String::new(),
            },
            None => Decision {
                allowed: false,
                reason: format!(
                    "{} may not open {target} ({}): no rule allows it",
                    id.name,
                    proto.as_str()
                ),
            },
        }
    }

    /// Whether any allow rule for `id` can reach something on `agent` (the
    /// console lists only those agents).
    pub(crate) fn may_see_agent(&self, id: &ClientIdentity, agent: &str) -> bool {
        self.allow_rules(id).any(|r| {
            r.who.iter().any(|s| s.matches(id))
                && r.targets.iter().any(|t| {
                    let agent_part = t.split_once('/').map_or(t.as_str(), |(a, _)| a);
                    glob_match(agent_part, agent)
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `[[rule]]`s of a TOML text.
    fn parse_rules(toml: &str) -> Vec<RuleConfig> {
        toml::from_str::<toml::Table>(toml).unwrap()["rule"]
            .clone()
            .try_into()
            .unwrap()
    }

    fn token(name: &str) -> ClientIdentity {
        ClientIdentity::new(name.into(), vec![], IdentityKind::Token { hash: [0; 32] })
    }

    fn jwt(name: &str, groups: &[&str]) -> ClientIdentity {
        ClientIdentity::new(
            name.into(),
            groups.iter().map(|g| g.to_string()).collect(),
            IdentityKind::Jwt {
                expires: u64::MAX,
                token: "".into(),
            },
        )
    }

    fn policy() -> Policy {
        let rules = parse_rules(
            r#"
            [[rule]]
            who = ["group:sre"]
            allow = ["prod/*", "staging/*"]
            [[rule]]
            who = ["group:sre"]
            deny = ["prod/vault"]
            [[rule]]
            who = ["dev-*"]
            allow = ["staging/web"]
            protocols = ["http"]
            "#,
        );
        Policy::new(&rules, &[("alice".into(), vec!["prod/db".into()])]).unwrap()
    }

    #[test]
    fn deny_by_default_deny_wins_protocols_matter() {
        let p = policy();
        let sre = jwt("bob", &["sre"]);
        assert!(p.decide(&sre, "prod", "grafana", Protocol::Http).allowed);
        assert!(p.decide(&sre, "staging", "db", Protocol::Tcp).allowed);
        let d = p.decide(&sre, "prod", "vault", Protocol::Http);
        assert!(!d.allowed);
        assert!(d.reason.contains("denied by rule #2"), "{}", d.reason);
        assert!(!p.decide(&sre, "other", "x", Protocol::Tcp).allowed);

        let dev = jwt("dev-carol", &[]);
        assert!(p.decide(&dev, "staging", "web", Protocol::Http).allowed);
        assert!(!p.decide(&dev, "staging", "web", Protocol::Tcp).allowed);

        // The [[client]] allow list belongs to the token identity only.
        assert!(
            p.decide(&token("alice"), "prod", "db", Protocol::Tcp)
                .allowed
        );
        assert!(
            !p.decide(&jwt("alice", &[]), "prod", "db", Protocol::Tcp)
                .allowed
        );
        let d = p.decide(&token("alice"), "prod", "web", Protocol::Http);
        assert!(d.reason.contains("no rule allows"), "{}", d.reason);

        // Raw host targets compare case-insensitively, like DNS.
        let rules = parse_rules("[[rule]]\nwho = [\"*\"]\nallow = [\"prod/*:80\"]\n[[rule]]\nwho = [\"*\"]\ndeny = [\"prod/Vault.internal:*\"]");
        let q = Policy::new(&rules, &[]).unwrap();
        assert!(
            q.decide(&sre, "prod", "web.internal:80", Protocol::Tcp)
                .allowed
        );
        assert!(
            !q.decide(&sre, "prod", "VAULT.internal:80", Protocol::Tcp)
                .allowed
        );
        assert!(
            !q.decide(&sre, "prod", "vault.INTERNAL:80", Protocol::Tcp)
                .allowed
        );

        assert!(p.may_see_agent(&sre, "staging"));
        assert!(!p.may_see_agent(&dev, "prod"));
    }

    #[test]
    fn thousands_of_client_allow_lists_each_open_only_their_own_targets() {
        let allows: Vec<(String, Vec<String>)> = (0..5000)
            .map(|i| (format!("c{i}"), vec![format!("a{i}/*")]))
            .collect();
        let rules = parse_rules("[[rule]]\nwho = [\"*\"]\ndeny = [\"a4999/secret\"]");
        let p = Policy::new(&rules, &allows).unwrap();
        for i in [0, 2500, 4999] {
            let me = token(&format!("c{i}"));
            assert!(
                p.decide(&me, &format!("a{i}"), "web", Protocol::Http)
                    .allowed
            );
            assert!(p.may_see_agent(&me, &format!("a{i}")));
            let other = format!("a{}", (i + 1) % 5000);
            let d = p.decide(&me, &other, "web", Protocol::Http);
            assert!(
                !d.allowed && d.reason.contains("no rule allows"),
                "{}",
                d.reason
            );
            assert!(!p.may_see_agent(&me, &other));
        }
        // A [[rule]] deny still wins over a client's own allow list.
        let d = p.decide(&token("c4999"), "a4999", "secret", Protocol::Tcp);
        assert!(!d.allowed && d.reason.contains("rule #1"), "{}", d.reason);
        // The same name from a JWT is another identity.
        assert!(
            !p.decide(&jwt("c7", &[]), "a7", "web", Protocol::Http)
                .allowed
        );
    }

    #[test]
    fn raw_rule_targets_are_written_in_the_one_spelling() {
        let rules = parse_rules("[[rule]]\nwho = [\"*\"]\nallow = [\"a/*:*\"]\n[[rule]]\nwho = [\"*\"]\ndeny = [\"a/[::ffff:10.0.0.5]:22\", \"a/[2001:db8:0:0::1]:22\"]");
        let p = Policy::new(&rules, &[]).unwrap();
        let who = token("alice");
        assert!(!p.decide(&who, "a", "10.0.0.5:22", Protocol::Tcp).allowed);
        assert!(
            !p.decide(&who, "a", "[2001:db8::1]:22", Protocol::Tcp)
                .allowed
        );
        assert!(p.decide(&who, "a", "10.0.0.6:22", Protocol::Tcp).allowed);
        // A rule that no target could ever match is refused at load.
        let bad = parse_rules("[[rule]]\nwho = [\"*\"]\ndeny = [\"a/10.0.0.5:022\"]");
        assert!(Policy::new(&bad, &[]).is_err());
    }

    #[test]
    fn agent_star_covers_named_services_only() {
        let rules = parse_rules("[[rule]]\nwho = [\"*\"]\nallow = [\"a/*\"]\n[[rule]]\nwho = [\"*\"]\ndeny = [\"a/db\"]");
        let p = Policy::new(&rules, &[]).unwrap();
        let who = token("alice");
        assert!(p.decide(&who, "a", "web", Protocol::Tcp).allowed);
        assert!(!p.decide(&who, "a", "db", Protocol::Tcp).allowed);
        // db's address through `a/*`: no rule names raw targets.
        let d = p.decide(&who, "a", "127.0.0.2:8002", Protocol::Tcp);
        assert!(
            !d.allowed && d.reason.contains("no rule allows"),
            "{}",
            d.reason
        );
        // A token client's `allow` list follows the same rule.
        let q = Policy::new(&[], &[("bob".into(), vec!["a/*".into(), "a/*:443".into()])]).unwrap();
        assert!(
            !q.decide(&token("bob"), "a", "10.0.0.1:80", Protocol::Tcp)
                .allowed
        );
        assert!(
            q.decide(&token("bob"), "a", "10.0.0.1:443", Protocol::Tcp)
                .allowed
        );
    }

    #[test]
    fn bad_rules_are_refused() {
        let r = |s: &str| -> anyhow::Result<Policy> {
            let rules = parse_rules(s);
            Policy::new(&rules, &[])
        };
        assert!(r("[[rule]]\nwho = []\nallow = [\"a/b\"]").is_err());
        assert!(r("[[rule]]\nwho = [\"x\"]").is_err());
        assert!(r("[[rule]]\nwho = [\"x\"]\nallow = [\"a/b\"]\ndeny = [\"a/c\"]").is_err());
        assert!(r("[[rule]]\nwho = [\"x\"]\nallow = [\"nothing\"]").is_err());
    }
}
