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

use std::fmt::{self, Write as _};
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{debug_fn, Writer};
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
            .init(),
        LogFormat::Text => {
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout())
                && std::env::var_os("NO_COLOR").is_none();
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_target(false)
                .with_ansi(terminal);
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
        name => write!(w, "{}={value:?}", name.strip_prefix("r#").unwrap_or(name)),
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
    fn control_characters_in_messages_are_escaped() {
        let mut out = String::new();
        write!(Escaped(&mut out), "peer said \x1b[2J\nbye\u{9b}\tok").unwrap();
        assert_eq!(out, "peer said \\x1b[2J\\x0abye\\x9b\tok");
    }
}
