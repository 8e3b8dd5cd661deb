//! One log line a second for an event a peer can repeat at will (a refused
//! connection, a wrong token, a login over its rate): the metric counts
//! every one, the log says it once a second, so that nobody can fill the
//! disk or drown other lines by repeating a mistake.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// A gate for one kind of log line (a `static` at the line's call site).
pub struct LogGate {
    /// Milliseconds since [`epoch`] of the last line let through, plus one
    /// (0: none yet).
    last: AtomicU64,
    /// Lines held back since then.
    skipped: AtomicU64,
}

/// The time base of every gate.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Default for LogGate {
    fn default() -> Self {
        LogGate::new()
    }
}

impl LogGate {
    /// A gate that lets its first line through.
    pub const fn new() -> LogGate {
        LogGate {
            last: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written now: the first, then at most one a
    /// second (whichever caller claims the second writes it). `Some` holds
    /// how many lines were held back since the last one, for its
    /// `skipped` field.
    pub fn allow(&self) -> Option<u64> {
        let now = epoch().elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let due = (last == 0 || now >= last + 1000)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if due {
            Some(self.skipped.swap(0, Ordering::Relaxed))
        } else {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LogGate;

    #[test]
    fn one_line_a_second() {
        let gate = LogGate::new();
        assert_eq!(gate.allow(), Some(0), "the first line");
        assert_eq!(gate.allow(), None, "a second one at once");
        assert_eq!(gate.allow(), None);
        std::thread::sleep(std::time::Duration::from_millis(1010));
        assert_eq!(
            gate.allow(),
            Some(2),
            "a line a second later, with the count"
        );
        assert_eq!(gate.allow(), None);
    }
}
