//! Operator-facing session timing (the `[session]` table of every config).

use serde::Deserialize;
use std::time::Duration;

/// Heartbeat settings. Lower them behind load balancers that cut idle
/// connections early. A server asks its version 7 agents and clients for
/// its own values (a HEARTBEAT frame), so one setting there serves the
/// fleet; an agent or client that sets its own keeps them, and pings at
/// least as often as the server asks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionTuning {
    /// PING interval in milliseconds (default 10000).
    pub heartbeat_ms: Option<u64>,
    /// Silence after which the session is declared dead, in milliseconds
    /// (default 30000).
    pub idle_timeout_ms: Option<u64>,
}

impl SessionTuning {
    /// Applies the overrides to a protocol config. A config that sets
    /// either value keeps it against the server's HEARTBEAT.
    pub fn apply(&self, cfg: &mut tether_proto::Config) {
        if let Some(ms) = self.heartbeat_ms {
            cfg.ping_interval = Duration::from_millis(ms.max(MIN_HEARTBEAT_MS));
        }
        if let Some(ms) = self.idle_timeout_ms {
            cfg.idle_timeout = Duration::from_millis(ms.max(MIN_IDLE_TIMEOUT_MS));
        }
        if self.heartbeat_ms.is_some() || self.idle_timeout_ms.is_some() {
            cfg.adopt_peer_heartbeat = false;
        }
    }

    /// Checks that the idle timeout this gives is longer than the PING
    /// interval (otherwise the session would end between two PINGs, and a
    /// server could not ask its peers for the pair).
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut cfg = tether_proto::Config::default();
        self.apply(&mut cfg);
        if cfg.idle_timeout <= cfg.ping_interval {
            anyhow::bail!(
                "[session] idle_timeout_ms ({} ms) must be longer than heartbeat_ms ({} ms): the session would end between two PINGs",
                cfg.idle_timeout.as_millis(),
                cfg.ping_interval.as_millis()
            );
        }
        Ok(())
    }
}

/// The shortest PING interval a config may set (a HEARTBEAT's minimum too).
const MIN_HEARTBEAT_MS: u64 = tether_proto::Heartbeat::MIN_INTERVAL_MS as u64;
/// The shortest idle timeout a config may set.
const MIN_IDLE_TIMEOUT_MS: u64 = 200;

#[cfg(test)]
mod tests {
    use super::*;

    fn tuning(heartbeat_ms: Option<u64>, idle_timeout_ms: Option<u64>) -> SessionTuning {
        SessionTuning {
            heartbeat_ms,
            idle_timeout_ms,
        }
    }

    #[test]
    fn an_idle_timeout_must_outlast_the_heartbeat() {
        assert!(tuning(None, None).validate().is_ok());
        assert!(tuning(Some(60_000), Some(180_000)).validate().is_ok());
        assert!(tuning(Some(200), Some(1_500)).validate().is_ok());
        // Against the other value's default (10 s / 30 s).
        let e = tuning(None, Some(5_000))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("idle_timeout_ms (5000 ms)") && e.contains("heartbeat_ms (10000 ms)"),
            "{e}"
        );
        assert!(tuning(Some(30_000), None).validate().is_err());
        assert!(tuning(Some(1_000), Some(1_000)).validate().is_err());
    }

    #[test]
    fn setting_either_value_keeps_them_against_the_server() {
        let mut cfg = tether_proto::Config::default();
        tuning(None, None).apply(&mut cfg);
        assert!(cfg.adopt_peer_heartbeat);
        tuning(None, Some(40_000)).apply(&mut cfg);
        assert!(!cfg.adopt_peer_heartbeat);
        assert_eq!(cfg.idle_timeout, Duration::from_secs(40));
    }
}
