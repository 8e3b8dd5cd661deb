//! `[[listener]]`: a public port on the server bound to one `AGENT/SERVICE`.

use ipnet::IpNet;
use serde::Deserialize;
use std::net::SocketAddr;
use tether_proto::target::ClientTarget;

/// Default for `max_connections_per_source`: a whole office behind one NAT
/// address holds a few hundred connections; one source still cannot take
/// all of an agent's 8192 streams.
pub(crate) const MAX_CONNECTIONS_PER_SOURCE: usize = 1024;

/// One `[[listener]]` of the server config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Public address to listen on.
    pub listen: SocketAddr,
    /// `agent/service` (or `agent/host:port`) the connections go to.
    pub target: String,
    /// Source networks allowed to connect; empty means anyone.
    #[serde(default)]
    pub allow_from: Vec<IpNet>,
    /// Send a PROXY protocol v2 header to the service first, so it sees the
    /// real client address (TCP only).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// `tcp` (default) or `udp`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Most TCP connections one source address may have open through this
    /// listener at once (default 1024), so one source cannot take the agent's
    /// streams from everyone else.
    #[serde(default = "default_per_source")]
    pub max_connections_per_source: usize,
    /// New TCP connections per second one source address may make through
    /// this listener, in bursts of twice that; past it the connection is
    /// closed at accept. Default: half of `[limits] opens_per_sec` (the
    /// listener's whole rate), so one source (or one NAT, one balancer that
    /// hides its clients) cannot spend all of it, and a server whose rate
    /// was raised raises this too. TCP listeners only.
    #[serde(default)]
    pub opens_per_sec_per_source: Option<f64>,
    /// Send what a connection has already written with its open (early
    /// data, PROTOCOL.md 6.3; TCP only): a round trip less per connection.
    /// Off, a retry after a lost agent session can never repeat a byte to
    /// the service (a PROXY header then goes after OPEN_OK too).
    #[serde(default = "default_early_data")]
    pub early_data: bool,
}

fn default_early_data() -> bool {
    true
}

fn default_protocol() -> String {
    "tcp".into()
}

fn default_per_source() -> usize {
    MAX_CONNECTIONS_PER_SOURCE
}

impl ListenerConfig {
    /// The agent the target names.
    pub(crate) fn agent(&self) -> &str {
        self.target.split_once('/').map_or("", |(a, _)| a)
    }

    /// Whether this is a UDP listener.
    pub(crate) fn is_udp(&self) -> bool {
        self.protocol == "udp"
    }

    /// Checks the protocol and the target: it must be `AGENT/SERVICE` in the
    /// one spelling every open is parsed with, so that no open through the
    /// listener can fail on it later.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.protocol != "tcp" && self.protocol != "udp" {
            anyhow::bail!("listener {}: protocol must be tcp or udp", self.listen);
        }
        if self.listen.port() == 0 {
            // Each time its agent connected it would bind another random
            // port, which no client could know.
            anyhow::bail!(
                "listener {}: needs a port (0 would pick a new one each time its agent connects)",
                self.listen
            );
        }
        if self.is_udp() && self.proxy_protocol {
            anyhow::bail!(
                "listener {}: proxy_protocol is for TCP listeners",
                self.listen
            );
        }
        if let Err(e) = ClientTarget::parse(&self.target) {
            anyhow::bail!("listener {}: {e}", self.listen);
        }
        if self.max_connections_per_source == 0 {
            anyhow::bail!(
                "listener {}: max_connections_per_source = 0 would refuse every connection (default {MAX_CONNECTIONS_PER_SOURCE})",
                self.listen
            );
        }
        if let Some(rate) = self.opens_per_sec_per_source {
            if !(rate.is_finite() && rate > 0.0) {
                anyhow::bail!(
                    "listener {}: opens_per_sec_per_source must be a number above 0 (leave it out for half of [limits] opens_per_sec)",
                    self.listen
                );
            }
            if self.is_udp() {
                anyhow::bail!(
                    "listener {}: opens_per_sec_per_source is for TCP listeners (a UDP source can be spoofed)",
                    self.listen
                );
            }
        }
        Ok(())
    }

    /// Whether a connection (or datagram) from `peer` may use the listener.
    /// On a dual-stack `[::]` socket an IPv4 peer is `::ffff:a.b.c.d`, which
    /// no IPv4 network contains: it is judged as the IPv4 address it is.
    pub(crate) fn allows(&self, peer: &SocketAddr) -> bool {
        // (A network written in the mapped form, `::ffff:10.0.0.0/104`,
        // still takes the peer as the socket gave it.)
        let ip = peer.ip().to_canonical();
        self.allow_from.is_empty()
            || self
                .allow_from
                .iter()
                .any(|n| n.contains(&ip) || n.contains(&peer.ip()))
    }
}

/// Refuses two listeners of one protocol that want the same port (the same
/// address, or one of them on every address), and a TCP listener on the
/// server's own port. Whichever bound first would win, and the other would
/// take the port over when the first one's agent left: connections meant
/// for one service reaching another.
pub(crate) fn no_overlaps(
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    listeners: &[ListenerConfig],
) -> anyhow::Result<()> {
    // `0.0.0.0` covers IPv4 addresses; `::` covers both (dual stack).
    let covers = |any: SocketAddr, b: SocketAddr| {
        any.ip().is_unspecified() && (any.is_ipv6() || b.is_ipv4())
    };
    let overlap = |a: SocketAddr, b: SocketAddr| {
        a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
    };
    if let Some(m) = metrics_listen.filter(|&m| overlap(m, listen)) {
        anyhow::bail!("metrics_listen {m}: the server itself listens on {listen}");
    }
    for (i, l) in listeners.iter().enumerate() {
        if !l.is_udp() && overlap(l.listen, listen) {
            anyhow::bail!(
                "listener {} ({}): the server itself listens on {listen}",
                l.listen,
                l.target
            );
        }
        if let Some(m) = metrics_listen.filter(|&m| !l.is_udp() && overlap(l.listen, m)) {
            anyhow::bail!(
                "listener {} ({}): metrics_listen is {m}",
                l.listen,
                l.target
            );
        }
        if let Some(o) = listeners[..i]
            .iter()
            .find(|o| o.is_udp() == l.is_udp() && overlap(o.listen, l.listen))
        {
            anyhow::bail!(
                "listeners {} ({}) and {} ({}) want the same {} port",
                o.listen,
                o.target,
                l.listen,
                l.target,
                l.protocol
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(listen: &str, protocol: &str) -> ListenerConfig {
        ListenerConfig {
            listen: listen.parse().unwrap(),
            target: "prod/db".into(),
            allow_from: vec![],
            proxy_protocol: false,
            protocol: protocol.into(),
            max_connections_per_source: MAX_CONNECTIONS_PER_SOURCE,
            opens_per_sec_per_source: None,
            early_data: true,
        }
    }

    #[test]
    fn an_ipv4_client_of_a_dual_stack_listener_is_judged_by_its_ipv4_address() {
        let mut l = listener("[::]:5432", "tcp");
        l.allow_from = vec![
            "127.0.0.0/8".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
            "::ffff:10.1.0.0/112".parse().unwrap(),
        ];
        let allows = |peer: &str| l.allows(&peer.parse().unwrap());
        assert!(allows("[::ffff:127.0.0.1]:4000"));
        assert!(allows("127.0.0.1:4000"));
        assert!(allows("[fd00::1]:4000"));
        assert!(!allows("[::ffff:10.0.0.1]:4000"));
        assert!(allows("[::ffff:10.1.0.9]:4000"), "the mapped spelling");
        assert!(!allows("[fe80::1]:4000"));
    }

    #[test]
    fn listeners_that_want_one_port_are_refused() {
        let main: SocketAddr = "0.0.0.0:7700".parse().unwrap();
        let ok = |ls: &[ListenerConfig]| no_overlaps(main, None, ls).is_ok();
        // TCP and UDP may share a port (DNS); other ports and families too.
        assert!(ok(&[
            listener("0.0.0.0:53", "tcp"),
            listener("0.0.0.0:53", "udp")
        ]));
        assert!(ok(&[
            listener("127.0.0.1:5432", "tcp"),
            listener("127.0.0.2:5432", "tcp")
        ]));
        assert!(ok(&[
            listener("0.0.0.0:5432", "tcp"),
            listener("[::1]:5432", "tcp")
        ]));
        assert!(ok(&[listener("0.0.0.0:7700", "udp")]));
        // The same address twice, or one on every address.
        assert!(!ok(&[
            listener("0.0.0.0:5432", "tcp"),
            listener("0.0.0.0:5432", "tcp")
        ]));
        assert!(!ok(&[
            listener("0.0.0.0:5432", "tcp"),
            listener("127.0.0.1:5432", "tcp")
        ]));
        assert!(!ok(&[
            listener("[::]:5432", "tcp"),
            listener("127.0.0.1:5432", "tcp")
        ]));
        assert!(!ok(&[
            listener("127.0.0.1:53", "udp"),
            listener("0.0.0.0:53", "udp")
        ]));
        // No port.
        assert!(listener("0.0.0.0:0", "tcp").validate().is_err());
        assert!(listener("0.0.0.0:5432", "tcp").validate().is_ok());
        // A per-source cap of 0.
        let mut zero = listener("0.0.0.0:5432", "tcp");
        zero.max_connections_per_source = 0;
        assert!(zero.validate().is_err());
        // A rate of 0, or one that is not a number.
        for rate in [0.0, f64::NAN, f64::INFINITY] {
            let mut l = listener("0.0.0.0:5432", "tcp");
            l.opens_per_sec_per_source = Some(rate);
            assert!(l.validate().is_err(), "{rate}");
        }
        // A UDP listener has no per-source rate (its sources can be spoofed).
        let mut udp = listener("0.0.0.0:53", "udp");
        udp.opens_per_sec_per_source = Some(1.0);
        assert!(udp.validate().is_err());
        udp.protocol = "tcp".into();
        assert!(udp.validate().is_ok());
        // The server's own port.
        let e = no_overlaps(main, None, &[listener("127.0.0.1:7700", "tcp")]).unwrap_err();
        assert!(e.to_string().contains("the server itself listens"), "{e}");
        // The metrics port: not the server's, not a TCP listener's.
        let metrics = Some("127.0.0.1:9090".parse().unwrap());
        let e = no_overlaps(main, metrics, &[listener("0.0.0.0:9090", "tcp")]).unwrap_err();
        assert!(
            e.to_string().contains("metrics_listen is 127.0.0.1:9090"),
            "{e}"
        );
        assert!(no_overlaps(main, metrics, &[listener("0.0.0.0:9090", "udp")]).is_ok());
        let e = no_overlaps(main, Some("127.0.0.1:7700".parse().unwrap()), &[]).unwrap_err();
        assert!(e.to_string().contains("the server itself listens"), "{e}");
    }
}
