//! Operator-facing session timing (the `[session]` table of every config).

use serde::Deserialize;
use std::time::Duration;

/// Heartbeat settings. Lower them behind load balancers that cut idle
/// connections early; both ends should agree roughly (the idle timeout must
/// exceed the peer's heartbeat interval).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionTuning {
    /// PING interval in milliseconds (default 10000).
    pub heartbeat_ms: Option<u64>,
    /// Silence after which the session is declared dead, in milliseconds
    /// (default 30000).
    pub idle_timeout_ms: Option<u64>,
}

impl SessionTuning {
    /// Applies the overrides to a protocol config.
    pub fn apply(&self, cfg: &mut tether_proto::Config) {
        if let Some(ms) = self.heartbeat_ms {
            cfg.ping_interval = Duration::from_millis(ms.max(100));
        }
        if let Some(ms) = self.idle_timeout_ms {
            cfg.idle_timeout = Duration::from_millis(ms.max(200));
        }
    }
}
