//! Credentials found by what stands next to them in text, where no pattern of their
//! own gives them away (`pc-7f3a` could be anything):
//! - a `NAME=value` / `NAME: value` pair whose name is a credential's by
//!   [`is_credential_name`] (`DB_PASS=x`, `stripe_key: x`; the keywords of the pair
//!   detector are handled there);
//! - a command-line flag naming a credential and its value, `--db-password x`,
//!   `--db-pass=x`, `-token 'x'` (in `sh -c` strings, logs, event messages);
//! - the password of a URL's userinfo, `postgres://user:x@db`;
//! - `Authorization:` header values and `Bearer` tokens.
//!
//! Each rewrites its value to `[masked]` and keeps the rest of the text. Strings here
//! may be JSON-escaped (the masker works on the escaped form), so a value stops before
//! a backslash and an escaped quote counts as a quote.
use std::borrow::Cow;

use super::names::is_credential_name;

/// What replaces a value.
const MASKED: &[u8] = b"[masked]";

/// Longest name looked at before a separator or after a dash.
const MAX_NAME: usize = 128;

/// Whether a value ends at `b` (as the pair detector's value does).
/// White space within a line, as the detectors' patterns have it (`[ \t\x0b\x0c\r]`):
/// one definition, so a pair found by a pattern and by this module's scans is the same
/// pair (a vertical tab once counted as a blank for one and not the other, and what was
/// masked then depended on the rest of the log; found by `text_mask`).
pub(super) fn blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | 0x0b | 0x0c | b'\r')
}

fn ends_value(b: u8) -> bool {
    blank(b)
        || matches!(
            b,
            b'\n' | b'"' | b'\'' | b'\\' | b',' | b';' | b'&' | b'}' | b']'
        )
}

pub(super) const fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// Where the value after a separator at `sep` starts: spaces, then an optionally
/// escaped quote.
fn value_start(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && blank(s[i]) {
        i += 1;
    }
    if i + 1 < s.len() && s[i] == b'\\' && matches!(s[i + 1], b'"' | b'\'') {
        i += 2;
    } else if i < s.len() && matches!(s[i], b'"' | b'\'') {
        i += 1;
    }
    i
}

fn value_end(s: &[u8], start: usize) -> usize {
    let mut e = start;
    while e < s.len() && !ends_value(s[e]) {
        e += 1;
    }
    e
}

/// Where a name ends if the separator at `sep` follows it: walks back over white space
/// (`space`), then an optionally escaped quote. Every check of a name before a
/// separator walks the same way, so they agree on where the name is.
pub(super) fn name_end_before(s: &[u8], sep: usize, space: impl Fn(u8) -> bool) -> usize {
    let mut e = sep;
    while e > 0 && space(s[e - 1]) {
        e -= 1;
    }
    if e > 0 && matches!(s[e - 1], b'"' | b'\'') {
        e -= 1;
        if e > 0 && s[e - 1] == b'\\' {
            e -= 1;
        }
    }
    e
}

/// The name that ends just before the separator at `sep` (an optionally escaped quote
/// and spaces may stand between), if it names a credential.
pub(super) fn credential_before(s: &[u8], sep: usize) -> bool {
    let e = name_end_before(s, sep, blank);
    if e == 0 || !s[e - 1].is_ascii_alphabetic() {
        return false;
    }
    let mut b = e;
    while b > 0 && name_byte(s[b - 1]) && e - b <= MAX_NAME {
        b -= 1;
    }
    if e - b > MAX_NAME {
        return false;
    }
    // Leading dashes belong to a flag (`--db-pass=x`), not to the name.
    let name = &s[b..e];
    let name = &name[name.iter().take_while(|&&c| c == b'-').count()..];
    is_credential_name(name)
}

/// `s` with the value of every `NAME=value` / `NAME: value` pair whose name is a
/// credential's masked (values already masked are left alone).
pub(super) fn mask_name_pairs<'a>(s: Cow<'a, [u8]>) -> Cow<'a, [u8]> {
    let mut spans = Vec::new();
    for sep in memchr::memchr2_iter(b'=', b':', &s) {
        // `://` is a URL, `==` a comparison.
        if s.get(sep + 1).is_some_and(|&b| b == b'/' || b == b'=') {
            continue;
        }
        if !credential_before(&s, sep) {
            continue;
        }
        let start = value_start(&s, sep + 1);
        let end = value_end(&s, start);
        if end > start && !s[start..].starts_with(b"[masked") {
            spans.push((start, end));
        }
    }
    replace(s, &spans)
}

/// Whether `s` may hold a credential flag: a dash (of `dashes`, every one in `s`) after
/// a boundary, before a letter or a second dash.
pub(super) fn flag_candidate(s: &[u8], mut dashes: impl Iterator<Item = usize>) -> bool {
    dashes.any(|i| flag_at(s, i))
}

fn flag_at(s: &[u8], i: usize) -> bool {
    let before = i == 0
        || matches!(
            s[i - 1],
            b' ' | b'\t' | b'\n' | b'"' | b'\'' | b'(' | b'[' | b',' | b'='
        )
        || (i >= 2 && s[i - 2] == b'\\' && matches!(s[i - 1], b'n' | b't' | b'"'));
    before
        && s.get(i + 1)
            .is_some_and(|&b| b == b'-' || b.is_ascii_alphabetic())
}

/// `s` with the value after every credential flag masked: `--db-password x`,
/// `--db-password=x`, `-token "x"`. A value that is itself a flag is left alone.
pub(super) fn mask_flags<'a>(s: Cow<'a, [u8]>) -> Cow<'a, [u8]> {
    let mut spans = Vec::new();
    let mut i = 0;
    while let Some(j) = memchr::memchr(b'-', &s[i..]) {
        let at = i + j;
        i = at + 1;
        if !flag_at(&s, at) {
            continue;
        }
        let dashes = if s.get(at + 1) == Some(&b'-') { 2 } else { 1 };
        let name_start = at + dashes;
        let mut e = name_start;
        while e < s.len() && name_byte(s[e]) && e - name_start <= MAX_NAME {
            e += 1;
        }
        let name = &s[name_start..e];
        if name.len() < 3 || !name[0].is_ascii_alphanumeric() || !is_credential_name(name) {
            i = e.max(i);
            continue;
        }
        let start = match s.get(e) {
            Some(b'=') => value_start(&s, e + 1),
            Some(&b) if blank(b) => {
                let v = value_start(&s, e);
                // The next argument is another flag, or nothing.
                if s.get(v).is_none_or(|&b| b == b'-') {
                    i = e;
                    continue;
                }
                v
            }
            // `\n` between a flag and its value, JSON-escaped.
            Some(b'\\') if s.get(e + 1) == Some(&b'n') => {
                let v = value_start(&s, e + 2);
                if s.get(v).is_none_or(|&b| b == b'-') {
                    i = e;
                    continue;
                }
                v
            }
            _ => {
                i = e;
                continue;
            }
        };
        let end = value_end(&s, start);
        if end > start && !s[start..].starts_with(b"[masked") {
            spans.push((start, end));
        }
        i = end.max(e);
    }
    replace(s, &spans)
}

/// Whether `s` holds a `scheme://`.
pub(super) fn url_candidate(s: &[u8], finder: &memchr::memmem::Finder) -> bool {
    finder.find(s).is_some()
}

/// `s` with the password of every URL's userinfo masked
/// (`postgres://app:x@db:5432/app` → `postgres://app:[masked]@db:5432/app`).
pub(super) fn mask_url_passwords<'a>(
    s: Cow<'a, [u8]>,
    finder: &memchr::memmem::Finder,
) -> Cow<'a, [u8]> {
    let mut spans = Vec::new();
    for at in finder.find_iter(&s) {
        // A scheme: a letter, then letters, digits, `+`, `-`, `.`.
        let mut b = at;
        while b > 0 && (s[b - 1].is_ascii_alphanumeric() || matches!(s[b - 1], b'+' | b'-' | b'.'))
        {
            b -= 1;
        }
        if b == at || !s[b].is_ascii_alphabetic() {
            continue;
        }
        let auth = at + 3;
        let mut end = auth;
        while end < s.len()
            && !matches!(s[end], b'@' | b'"' | b'\'' | b'\\')
            && !s[end].is_ascii_whitespace()
        {
            end += 1;
        }
        if s.get(end) != Some(&b'@') {
            continue;
        }
        let userinfo = &s[auth..end];
        let Some(colon) = memchr::memchr(b':', userinfo) else {
            continue;
        };
        let pass = &userinfo[colon + 1..];
        // `host:8080/path@x` is a port and a path, not a password.
        let digits = pass.iter().take_while(|b| b.is_ascii_digit()).count();
        let slash_first =
            userinfo[..colon].contains(&b'/') || (digits > 0 && pass.get(digits) == Some(&b'/'));
        if pass.is_empty() || slash_first || pass.starts_with(b"[masked") {
            continue;
        }
        spans.push((auth + colon + 1, end));
    }
    replace(s, &spans)
}

/// `s` with `spans` (ascending, not overlapping) replaced by [`MASKED`].
fn replace<'a>(s: Cow<'a, [u8]>, spans: &[(usize, usize)]) -> Cow<'a, [u8]> {
    if spans.is_empty() {
        return s;
    }
    let mut out = Vec::with_capacity(s.len());
    let mut done = 0;
    for &(a, b) in spans {
        if a < done {
            continue;
        }
        out.extend_from_slice(&s[done..a]);
        out.extend_from_slice(MASKED);
        done = b;
    }
    out.extend_from_slice(&s[done..]);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(s: &str) -> String {
        String::from_utf8(mask_name_pairs(Cow::Borrowed(s.as_bytes())).into_owned()).unwrap()
    }
    fn flags(s: &str) -> String {
        String::from_utf8(mask_flags(Cow::Borrowed(s.as_bytes())).into_owned()).unwrap()
    }
    fn urls(s: &str) -> String {
        let f = memchr::memmem::Finder::new("://");
        String::from_utf8(mask_url_passwords(Cow::Borrowed(s.as_bytes()), &f).into_owned()).unwrap()
    }

    #[test]
    fn name_pairs_by_credential_names() {
        assert_eq!(
            pairs("export DB_PASS=hunter2 && run"),
            "export DB_PASS=[masked] && run"
        );
        assert_eq!(
            pairs("stripe_key: sk-1 x"),
            "stripe_key: sk-1 x",
            "not a credential name"
        );
        assert_eq!(pairs("STRIPE_KEY: sk-1 x"), "STRIPE_KEY: [masked] x");
        assert_eq!(
            pairs(r#"{\"dbPass\": \"v1\"}"#),
            r#"{\"dbPass\": \"[masked]\"}"#
        );
        assert_eq!(pairs("--db-pass=v"), "--db-pass=[masked]");
        assert_eq!(pairs("secretName: my-secret"), "secretName: my-secret");
        assert_eq!(
            pairs("https://x:y@h time=10:00"),
            "https://x:y@h time=10:00"
        );
        assert_eq!(pairs("password=[masked]"), "password=[masked]");
    }

    #[test]
    fn flags_and_their_values() {
        assert_eq!(
            flags("psql --db-password hunter2 --host db"),
            "psql --db-password [masked] --host db"
        );
        assert_eq!(
            flags("run --api-token=abc.def -v"),
            "run --api-token=[masked] -v"
        );
        assert_eq!(
            flags(r#"sh -c \"app -token x\""#),
            r#"sh -c \"app -token [masked]\""#
        );
        assert_eq!(
            flags(r#"app -token \"x y\""#),
            r#"app -token \"[masked] y\""#
        );
        assert_eq!(flags("--token --verbose"), "--token --verbose");
        assert_eq!(flags("--password-file /run/pw"), "--password-file /run/pw");
        assert_eq!(
            flags("2026-11-22 --client-secret s3"),
            "2026-11-22 --client-secret [masked]"
        );
        assert_eq!(
            flags("a-token b"),
            "a-token b",
            "no boundary before the dash"
        );
        assert_eq!(flags(r"x\n--db-password\nv"), r"x\n--db-password\n[masked]");
    }

    #[test]
    fn url_passwords() {
        assert_eq!(
            urls("DATABASE_URL=postgres://app:s3cr3t@db:5432/app"),
            "DATABASE_URL=postgres://app:[masked]@db:5432/app"
        );
        assert_eq!(
            urls("redis://:pw@cache:6379"),
            "redis://:[masked]@cache:6379"
        );
        assert_eq!(
            urls("see http://host:8080/a@b now"),
            "see http://host:8080/a@b now"
        );
        assert_eq!(urls("https://example.com/x"), "https://example.com/x");
        assert_eq!(urls("https://user@host"), "https://user@host");
        assert_eq!(
            urls(r#"\"amqp://u:p%40ss@mq\""#),
            r#"\"amqp://u:[masked]@mq\""#
        );
    }
}
