//! Which service a browser request is for: host routing
//! (`SERVICE.AGENT.BASE_DOMAIN`) or path routing (`/a/AGENT/SERVICE/...`).

use super::{split_port, PATH_PREFIX};

/// Which service a browser request is for, and how it was addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebRoute {
    /// The agent.
    pub agent: String,
    /// The service on it.
    pub service: String,
    /// `/a/AGENT/SERVICE` for path routing (stripped before forwarding);
    /// `None` for host routing.
    pub prefix: Option<String>,
}

/// Host routing: `SERVICE.AGENT.BASE` (the host without its port).
pub fn route_by_host(base: &str, host: &str) -> Option<WebRoute> {
    let (h, _) = split_port(host);
    let labels = h.strip_suffix(base)?.strip_suffix('.')?;
    let (service, agent) = labels.split_once('.')?;
    if service.is_empty() || agent.is_empty() {
        return None;
    }
    Some(WebRoute {
        agent: agent.to_owned(),
        service: service.to_owned(),
        prefix: None,
    })
}

/// Whether [`route_by_host`] leads back to `agent`'s `service` from the
/// host name `SERVICE.AGENT.BASE`: the service's name is one label (the
/// split is at its first dot) and neither name has capitals (browsers
/// send host names in lower case, and names compare exactly).
pub fn host_routable(agent: &str, service: &str) -> bool {
    !service.contains('.')
        && !agent.bytes().any(|b| b.is_ascii_uppercase())
        && !service.bytes().any(|b| b.is_ascii_uppercase())
}

/// Path routing: `/a/AGENT/SERVICE[/rest]`. Returns the route and the rest
/// of the path (`None` when the path stops right after the service name,
/// which gets a redirect to the slash form so relative links resolve).
pub fn route_by_path(path: &str) -> Option<(WebRoute, Option<&str>)> {
    let rest = path.strip_prefix(PATH_PREFIX)?;
    let (agent, rest) = rest.split_once('/')?;
    let (service, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i..])),
        None => (rest, None),
    };
    if agent.is_empty() || service.is_empty() {
        return None;
    }
    // `/a/AGENT/SERVICE` is the start of `path` itself.
    let prefix_len = PATH_PREFIX.len() + agent.len() + 1 + service.len();
    Some((
        WebRoute {
            agent: agent.to_owned(),
            service: service.to_owned(),
            prefix: Some(path[..prefix_len].to_owned()),
        },
        tail,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route_by_host("tether.test", "grafana.prod.tether.test:8443"),
            Some(WebRoute {
                agent: "prod".into(),
                service: "grafana".into(),
                prefix: None
            })
        );
        assert_eq!(
            route_by_host("tether.test", "web.eu.prod.tether.test").map(|r| r.agent),
            Some("eu.prod".into())
        );
        assert_eq!(route_by_host("tether.test", "tether.test"), None);
        assert_eq!(route_by_host("tether.test", "prod.tether.test"), None);
        assert_eq!(route_by_host("tether.test", "a.b.eviltether.test"), None);
        let (r, rest) = route_by_path("/a/prod/grafana/d/x?y=1").unwrap();
        assert_eq!((r.agent.as_str(), r.service.as_str()), ("prod", "grafana"));
        assert_eq!(r.prefix.as_deref(), Some("/a/prod/grafana"));
        assert_eq!(rest, Some("/d/x?y=1"));
        assert_eq!(route_by_path("/a/prod/grafana").unwrap().1, None);
        assert!(route_by_path("/a/prod").is_none());
        assert!(route_by_path("/a//x/").is_none());
    }

    #[test]
    fn a_host_link_leads_back_only_to_names_a_host_name_keeps() {
        for (agent, service) in [("prod", "grafana"), ("eu.prod", "web"), ("p_1", "my-svc")] {
            assert!(host_routable(agent, service), "{agent}/{service}");
            let host = format!("{service}.{agent}.tether.test");
            let r = route_by_host("tether.test", &host).unwrap();
            assert_eq!((r.agent.as_str(), r.service.as_str()), (agent, service));
        }
        // `api.v2` on `prod` would be `api` on `v2.prod`; a browser asks for
        // `prod`, not `Prod`.
        for (agent, service) in [("prod", "api.v2"), ("Prod", "web"), ("prod", "Grafana")] {
            assert!(!host_routable(agent, service), "{agent}/{service}");
        }
    }
}
