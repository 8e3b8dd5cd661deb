//! How log lines are written: `--log-format text` (the default) or `json`.
//!
//! Text lines keep tracing-subscriber's layout (time, level, message,
//! `name=value` fields), with colours only on a terminal. Off a terminal
//! (a file, journald, a container's log) the fields are written by a plain
//! formatter: the default one styles every field name and `=` through the
//! colour library even when the style is empty, which cost the server
//! about 6 % of its instructions per proxied request, most of it in the
//! audit line. Messages carry text from the network (refusal reasons, peer
//! names), so their control characters are escaped either way: a log line
//! cannot drive the terminal that shows it.
//!
//! Timestamps keep their format; the date and time of day are formatted
//! once per second and reused ([`CachedSecondClock`]): formatting the whole
//! timestamp was about 2 400 instructions per line.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{debug_fn, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::EnvFilter;

/// The format chosen with `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the process's log subscriber (`RUST_LOG` filters; `info` by
/// default). Lines go to standard output.
pub(crate) fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_current_span(false)
            .with_timer(CachedSecondClock)
            .init(),
        LogFormat::Text => {
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::env::var_os("NO_COLOR").is_none();
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_target(false)
                .with_ansi(terminal)
                .with_timer(CachedSecondClock);
            if terminal {
                builder.init()
            } else {
                builder
                    .fmt_fields(debug_fn(plain_field).delimited(" "))
                    .init()
            }
        }
    }
}

/// One field as `name=value` (the message alone, escaped).
fn plain_field(
    w: &mut Writer<'_>,
    field: &tracing::field::Field,
    value: &dyn fmt::Debug,
) -> fmt::Result {
    match field.name() {
        "message" => write!(Escaped(w), "{value:?}"),
        name if name.starts_with("log.") => Ok(()), // metadata of `log` records, shown already
        name => {
            w.write_str(name.strip_prefix("r#").unwrap_or(name))?;
            w.write_char('=')?;
            write!(w, "{value:?}")
        }
    }
}

/// tracing-subscriber's UTC timestamps (`2026-12-02T07:01:14.304169Z`),
/// with everything up to the second formatted once per second per thread.
struct CachedSecondClock;

thread_local! {
    /// The unix second last formatted, and its text up to the second.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for CachedSecondClock {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let cached = SECOND.with(|c| {
            let c = c.borrow();
            (c.0 == now.as_secs()).then(|| write!(w, "{}.{:06}Z", c.1, now.subsec_micros()))
        });
        if let Some(written) = cached {
            return written;
        }
        // A new second: the library formats it (the calendar is its job),
        // and its text is kept when the second did not change meanwhile.
        let mut text = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut text))?;
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if after.as_secs() == now.as_secs() {
            if let Some((prefix, _)) = text.split_once('.') {
                SECOND.with(|c| *c.borrow_mut() = (now.as_secs(), prefix.to_owned()));
            }
        }
        w.write_str(&text)
    }
}

/// Writes through to `W`, escaping the control characters a terminal acts
/// on (C0 except tab, so newlines too, and C1), as `\xNN`.
struct Escaped<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(|c: char| is_terminal_control(c)) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or(' ');
            write!(self.0, "\\x{:02x}", c as u32)?;
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

fn is_terminal_control(c: char) -> bool {
    (c.is_control() && c != '\t') || ('\u{80}'..='\u{9f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_timestamps_read_like_the_library_s() {
        let mut lib = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut lib))
            .unwrap();
        // Twice: a fresh second, then (almost always) the cached one.
        for _ in 0..2 {
            let mut ours = String::new();
            CachedSecondClock
                .format_time(&mut Writer::new(&mut ours))
                .unwrap();
            assert_eq!(ours.len(), lib.len(), "{ours} vs {lib}");
            for (i, (o, l)) in ours.bytes().zip(lib.bytes()).enumerate() {
                assert_eq!(
                    o.is_ascii_digit(),
                    l.is_ascii_digit(),
                    "{ours} vs {lib} at {i}"
                );
                if !l.is_ascii_digit() {
                    assert_eq!(o, l, "{ours} vs {lib} at {i}");
                }
            }
        }
    }

    #[test]
    fn control_characters_in_messages_are_escaped() {
        let mut out = String::new();
        write!(Escaped(&mut out), "peer said \x1b[2J\nbye\u{9b}\tok").unwrap();
        assert_eq!(out, "peer said \\x1b[2J\\x0abye\\x9b\tok");
    }
}
