//! Text that came from the network, made safe to print on a terminal.

/// `s` with control characters and Unicode's direction overrides escaped
/// (`\u{1b}`): a newline that forges a line of output, an escape sequence
/// that drives the terminal or a right-to-left override that hides a name's
/// end are shown, never passed to the terminal.
pub(crate) fn printable(s: &str) -> String {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(unsafe_char) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if unsafe_char(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
