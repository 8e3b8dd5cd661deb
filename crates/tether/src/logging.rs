//! How log lines are written: `--log-format text` (the default) or `json`.
//!
//! Text lines keep tracing-subscriber's layout (time, level, message,
//! `name=value` fields), with colours (of the time and level) only on a
//! terminal. The fields are written by a plain formatter: the library's
//! styles every field name and `=` through the colour library even when the
//! style is empty, which cost the server about 6 % of its instructions per
//! proxied request, most of it in the audit line. Messages and fields carry
//! text from the network (OPEN addresses, refusal reasons, peer names), so
//! their control characters are escaped: a line cannot drive the terminal
//! that shows it, nor start a line of the sender's making.
//!
//! Timestamps keep their format; the date and time of day are formatted
//! once per second and reused ([`CachedSecondClock`]): formatting the whole
//! timestamp was about 2 400 instructions per line.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::EnvFilter;

/// The format chosen with `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The filter without `RUST_LOG`: `info`, but kube-runtime's watcher only
/// at `error`. It warns at every retry of a list the API server refuses
/// with 403 (a missing Role), which tether's discovery says once itself.
const DEFAULT_FILTER: &str = "info,kube_runtime::watcher=error";

/// Installs the process's log subscriber (`RUST_LOG` filters;
/// [`DEFAULT_FILTER`] by default). Lines go to standard output.
pub(crate) fn init(format: LogFormat) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v).unwrap_or_else(|e| {
            // Said on standard error: the log is not set up yet.
            eprintln!("RUST_LOG={v:?} is not a log filter ({e}); logging at info");
            EnvFilter::new(DEFAULT_FILTER)
        }),
        _ => EnvFilter::new(DEFAULT_FILTER),
    };
    match format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_current_span(false)
            .with_timer(CachedSecondClock)
            .init(),
        LogFormat::Text => {
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout())
                // no-color.org: only a non-empty NO_COLOR turns colours off.
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_target(false)
                .with_ansi(terminal)
                .with_timer(CachedSecondClock);
            // Plain fields on a terminal too: the library's own escape
            // neither newlines nor `%` fields.
            builder.fmt_fields(PlainFields).init()
        }
    }
}

/// The fields of a line as `name=value`, separated by spaces (the message
/// alone, escaped). Numbers and plain strings are written directly rather
/// than through `fmt`'s machinery: the audit line of a proxied request has
/// a dozen fields, and formatting each through `Debug` cost 350-450
/// instructions (callgrind). They are written into a scratch string kept
/// per thread and go to the line in one piece: each small write through
/// the line's `dyn Write` cost about as much as the text it wrote.
struct PlainFields;

thread_local! {
    /// The scratch string of [`PlainFields`].
    static FIELDS: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The most a thread's scratch string keeps between lines; a longer line
/// lets go of what it grew.
const FIELDS_KEPT: usize = 16 * 1024;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let write = |buf: &mut String, writer: &mut Writer<'_>| {
            buf.clear();
            let mut v = PlainVisitor {
                w: buf,
                seen: false,
                result: Ok(()),
            };
            fields.record(&mut v);
            v.result.and_then(|()| writer.write_str(buf))
        };
        let shared = FIELDS.try_with(|cell| {
            let mut buf = cell.try_borrow_mut().ok()?;
            let written = write(&mut buf, &mut writer);
            if buf.capacity() > FIELDS_KEPT {
                *buf = String::new();
            }
            Some(written)
        });
        match shared {
            Ok(Some(written)) => written,
            // A field's formatting wrote a line of its own, or the thread
            // is ending: a string of its own.
            _ => write(&mut String::new(), &mut writer),
        }
    }
}

/// Writes one line's fields (see [`PlainFields`]).
struct PlainVisitor<'a> {
    w: &'a mut String,
    /// A field was written (the next one needs a space).
    seen: bool,
    /// The first error; nothing more is written after it.
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Writes the separator and `name=`, or returns `false` for a field
    /// that is not shown.
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return false; // metadata of `log` records, shown already
        }
        if std::mem::replace(&mut self.seen, true) {
            self.w.push(' ');
        }
        if name != "message" {
            self.w.push_str(name.strip_prefix("r#").unwrap_or(name));
            self.w.push('=');
        }
        true
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            // Every field, not the message alone: `%target` and the like
            // carry text from the network, and a newline in one would
            // start a line of the sender's making (a forged audit line).
            let at = self.w.len();
            self.result = write!(Escaped(&mut *self.w), "{value:?}");
            if field.name() != "message" {
                quote_if_ambiguous(self.w, at);
            }
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) {
            push_decimal(self.w, value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            if value < 0 {
                self.w.push('-');
            }
            push_decimal(self.w, value.unsigned_abs());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        // As `Debug` writes it (quoted), without `fmt` when nothing in it
        // needs escaping.
        let plain = value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\');
        if !plain || field.name() == "message" {
            return self.record_debug(field, &value);
        }
        if self.start(field) {
            self.w.push('"');
            self.w.push_str(value);
            self.w.push('"');
        }
    }
}

/// Quotes the field value written from `at` on when a logfmt reader would
/// not take it as one value: a `%target` of `prod/x decision="allowed"`
/// would otherwise read as a field of the sender's making. A value that
/// is already one quoted string (a `?` field's `Debug` of text) stays.
fn quote_if_ambiguous(w: &mut String, at: usize) {
    let value = &w.as_bytes()[at..];
    let ambiguous = value
        .iter()
        .any(|b| matches!(b, b' ' | b'\t' | b'"' | b'\\' | b'='));
    if !ambiguous || is_one_quoted_string(value) {
        return;
    }
    let raw = w.split_off(at);
    w.reserve(raw.len() + 2);
    w.push('"');
    for c in raw.chars() {
        if c == '"' || c == '\\' {
            w.push('\\');
        }
        w.push(c);
    }
    w.push('"');
}

/// `"…"` with every `"` inside escaped: what `Debug` writes for text.
fn is_one_quoted_string(v: &[u8]) -> bool {
    let [b'"', inner @ .., b'"'] = v else {
        return false;
    };
    let mut escaped = false;
    for &b in inner {
        match (escaped, b) {
            (true, _) => escaped = false,
            (false, b'\\') => escaped = true,
            (false, b'"') => return false,
            _ => {}
        }
    }
    !escaped
}

/// Appends `n` in decimal to `w`.
fn push_decimal(w: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    w.extend(digits[i..].iter().map(|&d| char::from(d)));
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
            let mut c = c.try_borrow_mut().ok()?;
            if c.0 != now.as_secs() {
                return None;
            }
            // The second's text, then `.micros` and `Z` for this line
            // (`fmt`'s zero padding cost ~400 instructions a line).
            let second = c.1.len();
            c.1.push('.');
            let micros = now.subsec_micros();
            for place in [100_000, 10_000, 1_000, 100, 10, 1] {
                c.1.push(char::from(b'0' + (micros / place % 10) as u8));
            }
            c.1.push('Z');
            let written = w.write_str(&c.1);
            c.1.truncate(second);
            Some(written)
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
                SECOND.with(|c| {
                    if let Ok(mut c) = c.try_borrow_mut() {
                        *c = (now.as_secs(), prefix.to_owned());
                    }
                });
            }
        }
        w.write_str(&text)
    }
}

/// Writes through to `W`, escaping the control characters a terminal acts
/// on (C0 except tab, so newlines too, and C1) as `\xNN`, and the Unicode
/// characters that reorder or break what a viewer shows (bidi controls,
/// line and paragraph separators) as `\u{NNNN}`.
struct Escaped<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Most text is printable ASCII: a byte test, not a char scan (the
        // audit line's fields cost ~900 instructions a request without it).
        if s.bytes().all(|b| (b' '..=b'~').contains(&b) || b == b'\t') {
            return self.0.write_str(s);
        }
        let mut rest = s;
        while let Some(i) = rest.find(|c: char| is_terminal_control(c)) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or(' ');
            if u32::from(c) <= 0xff {
                write!(self.0, "\\x{:02x}", u32::from(c))?;
            } else {
                write!(self.0, "\\u{{{:04x}}}", u32::from(c))?;
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

fn is_terminal_control(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
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

    /// Formats one event's fields with [`PlainFields`].
    fn fields_of(event: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || SharedBuf(sink.clone()))
            .with_ansi(false)
            .without_time()
            .with_level(false)
            .with_target(false)
            .fmt_fields(PlainFields)
            .finish();
        tracing::subscriber::with_default(subscriber, event);
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn fields_read_as_debug_writes_them() {
        let who = "alice";
        let odd = "say \"hi\"\n";
        let line = fields_of(|| {
            tracing::info!(identity = %who, quoted = who, odd, bytes = 1234567890u64, zero = 0u64,
                neg = -42i64, min = i64::MIN, status = 200u16, ok = true, r#type = "x", "done: {}", "\x1b[2J")
        });
        assert_eq!(
            line,
            "done: \\x1b[2J identity=alice quoted=\"alice\" odd=\"say \\\"hi\\\"\\n\" bytes=1234567890 zero=0 neg=-42 min=-9223372036854775808 status=200 ok=true type=\"x\"\n"
        );
    }

    #[test]
    fn long_fields_are_written_whole() {
        let long = "a".repeat(300);
        let line = fields_of(|| tracing::info!(long = long.as_str(), n = 7u64, "m"));
        assert_eq!(line, format!("m long={long:?} n=7\n"));
    }

    #[test]
    fn control_characters_in_messages_are_escaped() {
        let mut out = String::new();
        write!(Escaped(&mut out), "peer said \x1b[2J\nbye\u{9b}\tok").unwrap();
        assert_eq!(out, "peer said \\x1b[2J\\x0abye\\x9b\tok");
    }

    #[test]
    fn network_text_in_display_fields_cannot_start_a_line() {
        // An OPEN address is any UTF-8 a client sends; refusals log it.
        let target = "a/b\n2026-12-07T00:00:00Z INFO audit identity=admin\u{202e}";
        let line = fields_of(|| tracing::info!(target = %target, "refused"));
        assert_eq!(
            line,
            "refused target=\"a/b\\\\x0a2026-12-07T00:00:00Z INFO audit identity=admin\\\\u{202e}\"\n"
        );
    }

    #[test]
    fn network_text_in_display_fields_cannot_add_a_field() {
        // A service name may hold spaces, `=` and quotes.
        let target = r#"staging/db protocol="tcp" decision="allowed" identity=root"#;
        let line = fields_of(
            || tracing::info!(identity = %"alice", target = %target, decision = "denied", "audit"),
        );
        assert_eq!(
            line,
            r#"audit identity=alice target="staging/db protocol=\"tcp\" decision=\"allowed\" identity=root" decision="denied""#.to_owned() + "\n"
        );
        // Text quoted by `Debug` stays as it is; a value that only looks
        // quoted does not.
        let odd = "\"a\" b=\"c\"";
        let line = fields_of(|| tracing::info!(d = ?odd, s = %odd, "m"));
        assert_eq!(
            line,
            r#"m d="\"a\" b=\"c\"" s="\"a\" b=\"c\"""#.to_owned() + "\n"
        );
    }
}
