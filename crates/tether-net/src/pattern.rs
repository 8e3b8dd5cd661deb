//! Glob matching for allow-lists (`prod/*`, `*.svc.cluster.local`).

/// Matches `text` against `pattern`, where `*` matches any run of characters
/// (including none) and `?` exactly one. Case-sensitive.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    // Classic two-pointer match with backtracking to the last star, over
    // byte offsets that always sit on character boundaries (no allocation:
    // the policy runs this for every open and every proxied request).
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while let Some(t) = char_at(text, ti) {
        match char_at(pattern, pi) {
            // A star first: a `*` in the text is no reason to read the
            // pattern's star as a literal one.
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
                continue;
            }
            Some(p) if p == '?' || p == t => {
                pi += p.len_utf8();
                ti += t.len_utf8();
                continue;
            }
            _ => {}
        }
        let Some((sp, st)) = star else {
            return false;
        };
        // The star takes one more character of the text.
        let next = st + char_at(text, st).map_or(1, char::len_utf8);
        pi = sp + 1;
        ti = next;
        star = Some((sp, next));
    }
    pattern[pi..].bytes().all(|b| b == b'*')
}

/// The character starting at byte offset `i` of `s`, if any.
fn char_at(s: &str, i: usize) -> Option<char> {
    s.get(i..).and_then(|rest| rest.chars().next())
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("prod/*", "prod/db"));
        assert!(!glob_match("prod/*", "staging/db"));
        assert!(glob_match("*", ""));
        assert!(glob_match(
            "*.svc.cluster.local",
            "pg.default.svc.cluster.local"
        ));
        assert!(!glob_match(
            "*.svc.cluster.local",
            "svc.cluster.local.evil.com"
        ));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*/db", "prod/db"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        // `?` and `*` take whole characters, not bytes.
        assert!(glob_match("caf?", "café"));
        assert!(!glob_match("caf??", "café"));
        assert!(glob_match("*é*", "aébé"));
        assert!(glob_match("ü*x", "üaéx"));
        assert!(!glob_match("ü*x", "üaéy"));
        assert!(glob_match("**", ""));
        assert!(!glob_match("", "a"));
        // A star in the text is a character like any other.
        assert!(glob_match("a*", "a*b"));
        assert!(glob_match("*", "*"));
        assert!(glob_match("a*c", "a*c"));
        assert!(!glob_match("a*c", "a*b"));
    }
}
