//! Pattern detectors for credentials inside strings and text: PEM private keys, JWTs,
//! cloud and SaaS access keys, `Authorization:` values and `Bearer` tokens,
//! `password=`/`token:` pairs, card numbers passing the Luhn check; and, from
//! `context.rs`, pairs and flags whose name is a credential's (`DB_PASS=x`,
//! `--db-password x`) and URL userinfo passwords. Built for throughput: one SIMD
//! literal pass says whether any token pattern can match, pair keywords are found from
//! their separators, and the card prefilter skips most of a text.
use std::borrow::Cow;

use regex::bytes::Regex;

use super::{
    context, names,
    search::{self, Searches},
};

/// Pattern detectors for credentials inside strings and text.
#[derive(Debug)]
pub struct Detectors {
    /// All token patterns in one: a single literal-prefiltered pass (the regex crate's
    /// SIMD multi-literal search over their prefixes) says whether any can match.
    token_any: Regex,
    /// The fewest bytes a token pattern matches: shorter texts skip the pass.
    token_min_len: usize,
    patterns: Vec<(Regex, &'static str)>,
    /// The pair pattern anchored at its keyword: run only where a keyword stands before
    /// a `=` or `:` (see [`pair_keyword_before`]).
    pair_at: Regex,
    /// [`PAIR_HEAD`] anchored: where a pair's value starts, without the capture search.
    pair_head_at: Regex,
    pair_tails: PairTails,
    card: Regex,
    pub(super) pem_begin: Regex,
    pub(super) pem_end: Regex,
    /// `://`, where a URL's userinfo may start.
    url: memchr::memmem::Finder<'static>,
    /// The searches for separators and dashes, set up once.
    search: Searches,
}

/// Every spelling the pair pattern's keyword group accepts (ASCII case-insensitive,
/// lower case here; tested against the pattern).
const PAIR_KEYWORDS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "api_key",
    "api-key",
    "apikey",
    "access_key",
    "access-key",
    "accesskey",
    "private_key",
    "private-key",
    "privatekey",
    "credential",
    "credentials",
];

/// The pair pattern's head: key, separator (optionally quoted, also JSON-escaped
/// quotes); [`PAIR_VALUE`] follows ([`pair_pattern`]). No pattern crosses a line:
/// blanks around a separator are white space within a line, the same set as
/// `context::blank` (a `Bearer` at the end of one log line once swallowed the next
/// line's `password` keyword, leaving its value unmasked; found by the `text_mask`
/// fuzz target). The value stops before a backslash so an escape sequence is never
/// cut. It starts at the keyword; a prefix such as `db.` or `DB_` stays in place
/// untouched. The keyword folds ASCII case only, exactly as the trigger automaton does.
const PAIR_HEAD: &str = r#"(?i-u:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)(?:\\?["'])?[ \t\x0b\x0c\r]*[=:][ \t\x0b\x0c\r]*(?:\\?["'])?"#;
const PAIR_VALUE: &str = r#"(?-u:[^\s"'\\,;&}\]])+"#;

/// The pair pattern: keyword, separator, value, the first two as group 1.
fn pair_pattern() -> String {
    format!("({PAIR_HEAD})({PAIR_VALUE})")
}

/// Texts up to this long are read byte by byte for [`BYTE_CLASS`] first.
const SHORT_TEXT: usize = 64;
/// [`BYTE_CLASS`] bits: what a detector needs in a text to match at all (pairs and
/// names a separator, flags a dash, URLs `://`, cards 13 digits).
const EQUALS: u8 = 1;
const COLON: u8 = 2;
const DASH: u8 = 4;
const DIGIT: u8 = 8;
static BYTE_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    t[b'=' as usize] = EQUALS;
    t[b':' as usize] = COLON;
    t[b'-' as usize] = DASH;
    let mut d = b'0';
    while d <= b'9' {
        t[d as usize] = DIGIT;
        d += 1;
    }
    t
};

impl Detectors {
    pub fn new() -> Self {
        let re = |s: &str| Regex::new(s).expect("static pattern");
        // Header values first: `Authorization: Bearer <jwt>` loses the whole value.
        // Case variants are spelled out so every pattern keeps a literal prefix (the
        // combined prefilter needs one from each).
        let patterns = vec![
            (
                re(
                    r#"((?:Authorization|authorization|AUTHORIZATION)(?:\\?["'])?[ \t\x0b\x0c\r]*[:=][ \t\x0b\x0c\r]*(?:\\?["'])?(?:(?:Basic|basic|Bearer|bearer|Token|token|Digest|digest)[ \t\x0b\x0c\r]+)?)[^\s"'\\,;\[]+"#,
                ),
                "${1}[masked]",
            ),
            (
                re(r"\b((?:Bearer|bearer|BEARER)[ \t\x0b\x0c\r]+)[A-Za-z0-9._~+/-]{8,}=*"),
                "${1}[masked]",
            ),
            (
                re(r"hooks\.slack\.com/services/[A-Za-z0-9/_-]+"),
                "[masked:slack-webhook]",
            ),
            (
                re(
                    r"(?s)-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END[A-Z0-9 ]*PRIVATE KEY-----|\z)",
                ),
                "[masked:private-key]",
            ),
            (
                re(r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{8,}"),
                "[masked:jwt]",
            ),
            (re(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "[masked:aws-key]"),
            (re(r"\bAIza[0-9A-Za-z_-]{35}"), "[masked:gcp-key]"),
            (
                re(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),
                "[masked:github-token]",
            ),
            (
                re(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
                "[masked:slack-token]",
            ),
            (re(r"\bsk_live_[A-Za-z0-9]{16,}"), "[masked:stripe-key]"),
        ];
        let any = patterns
            .iter()
            .map(|(r, _)| format!("(?:{})", r.as_str()))
            .collect::<Vec<_>>()
            .join("|");
        let token_min_len = regex_syntax::ParserBuilder::new()
            .utf8(false)
            .build()
            .parse(&any)
            .expect("static pattern")
            .properties()
            .minimum_len()
            .unwrap_or(usize::MAX);
        Detectors {
            token_any: re(&any),
            token_min_len,
            patterns,
            pair_at: re(&format!("^{}", pair_pattern())),
            pair_head_at: re(&format!("^{PAIR_HEAD}")),
            pair_tails: pair_tails(),
            card: re(
                r"\b(?:\d{4}[ -]\d{4}[ -]\d{4}[ -]\d{4}(?:\d{3})?|\d{4}[ -]\d{6}[ -]\d{5}|\d{13,19})\b",
            ),
            pem_begin: re(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----"),
            pem_end: re(r"-----END[A-Z0-9 ]*PRIVATE KEY-----"),
            url: memchr::memmem::Finder::new("://"),
            search: Searches::new(),
        }
    }

    /// Where pair detectors could match in `s`: the start of every pair keyword that
    /// stands before a separator (ascending), and whether some other separator follows
    /// a credential's name.
    fn separators(&self, s: &[u8]) -> Separated {
        let mut found = Separated::default();
        let judge = |sep: usize| {
            // Most separators in logs follow `status`, `user`, a time of day: one walk
            // back says no for both checks below (tested against them alone).
            if !marked_name_before(s, sep) {
                return;
            }
            match pair_keyword_before(&self.pair_tails, s, sep) {
                Some(k) => found.keys.push(k),
                None => found.names = found.names || context::credential_before(s, sep),
            }
        };
        self.search.separators(s).for_each(judge);
        found
    }

    /// `s` with every `password=value` pair's value masked, trying the pattern only at
    /// the keyword starts `keys` (ascending). Same result as a leftmost-first
    /// replace-all of the pattern: every match starts at a keyword.
    fn mask_pairs<'a>(&self, s: Cow<'a, [u8]>, keys: &[usize]) -> Cow<'a, [u8]> {
        let mut out = Vec::new();
        if self.mask_pairs_into(&s, keys, &mut out) {
            Cow::Owned(out)
        } else {
            s
        }
    }

    /// [`Self::mask_pairs`] appending to `out`, and only if a pair is masked (whether
    /// one was is returned).
    fn mask_pairs_into(&self, s: &[u8], keys: &[usize], out: &mut Vec<u8>) -> bool {
        let mut done = 0;
        for &k in keys {
            if k < done {
                continue;
            }
            // No pair crosses a line: the search ends at the line's end. Where the
            // value starts is where the head alone ends (its optional quote and blanks
            // can never start a value; tested against the capture group), so two DFA
            // searches stand in for a capture search.
            let line = &s[k..memchr::memchr(b'\n', &s[k..]).map_or(s.len(), |n| k + n)];
            if let Some(whole) = self.pair_at.find(line)
                && let Some(head) = self.pair_head_at.find(line)
            {
                out.extend_from_slice(&s[done..k]);
                out.extend_from_slice(head.as_bytes());
                out.extend_from_slice(b"[masked]");
                done = k + whole.end();
            }
        }
        if done == 0 {
            return false;
        }
        out.extend_from_slice(&s[done..]);
        true
    }

    /// `s` with every credential found replaced by a `[masked:...]` marker.
    pub fn apply<'a>(&self, s: &'a [u8]) -> Cow<'a, [u8]> {
        let mut owned = Vec::new();
        match self.rewrite(s, &mut owned) {
            Rewritten::Here(text) => text,
            Rewritten::Into => Cow::Owned(owned),
        }
    }

    /// [`Self::apply`] appending to `out`: where pairs are all that is masked (a log
    /// chunk holding a `password=`), the text is written there once rather than
    /// built and then copied.
    pub fn apply_into(&self, s: &[u8], out: &mut Vec<u8>) {
        if let Rewritten::Here(text) = self.rewrite(s, out) {
            out.extend_from_slice(&text);
        }
    }

    /// `s` masked, returned or, where only pairs are masked, appended to `sink`.
    fn rewrite<'a>(&self, s: &'a [u8], sink: &mut Vec<u8>) -> Rewritten<'a> {
        // Nothing shorter can hold a credential the patterns know (`pwd=x`), nor can a
        // timestamp (no detector matches one: `timestamps_pass_every_detector`).
        if s.len() < 5 || is_timestamp(s) {
            return Rewritten::Here(Cow::Borrowed(s));
        }
        self.rewrite_all(s, sink)
    }

    /// [`Self::rewrite`] without its shortcuts for texts no detector can match.
    fn rewrite_all<'a>(&self, s: &'a [u8], sink: &mut Vec<u8>) -> Rewritten<'a> {
        // Short texts (most JSON values) are read once for the bytes each detector
        // needs; a vector search per detector costs more to start than they take.
        let present = if s.len() <= SHORT_TEXT {
            s.iter().fold(0, |seen, &b| seen | BYTE_CLASS[b as usize])
        } else {
            u8::MAX
        };
        let mut card = present & DIGIT != 0 && card_candidate(s);
        let token = s.len() >= self.token_min_len && self.token_any.is_match(s);
        let Separated {
            mut keys,
            mut names,
        } = if present & (EQUALS | COLON) != 0 {
            self.separators(s)
        } else {
            Separated::default()
        };
        let mut flags = present & DASH != 0 && context::flag_candidate(s, self.search.dashes(s));
        let mut url = present & COLON != 0 && context::url_candidate(s, &self.url);
        if !token && keys.is_empty() && !card && !names && !flags && !url {
            return Rewritten::Here(Cow::Borrowed(s));
        }
        if !token && !card && !names && !flags && !url {
            return if self.mask_pairs_into(s, &keys, sink) {
                Rewritten::Into
            } else {
                Rewritten::Here(Cow::Borrowed(s))
            };
        }
        let mut cur: Cow<[u8]> = Cow::Borrowed(s);
        if token {
            for (re, marker) in &self.patterns {
                if re.is_match(&cur) {
                    cur = Cow::Owned(re.replace_all(&cur, marker.as_bytes()).into_owned());
                }
            }
            if matches!(cur, Cow::Owned(_)) {
                // Replacements moved the text and made new boundaries (a marker's `]`
                // before `--S_KEY=x` makes a flag): every candidate is found again, so
                // what is masked never depends on what else the text held (a log
                // masked whole or in chunks gives the same; found by `text_mask`).
                Separated { keys, names } = self.separators(&cur);
                flags = context::flag_candidate(&cur, self.search.dashes(&cur));
                url = context::url_candidate(&cur, &self.url);
                card = card_candidate(&cur);
            }
        }
        if !keys.is_empty() {
            cur = self.mask_pairs(cur, &keys);
        }
        if url {
            cur = context::mask_url_passwords(cur, &self.url);
        }
        if flags {
            cur = context::mask_flags(cur);
        }
        if names {
            cur = context::mask_name_pairs(cur);
        }
        if card && self.card.is_match(&cur) {
            let replaced = self.card.replace_all(&cur, |c: &regex::bytes::Captures| {
                if luhn(&c[0]) {
                    b"[masked:card]".to_vec()
                } else {
                    c[0].to_vec()
                }
            });
            if let Cow::Owned(o) = replaced {
                cur = Cow::Owned(o);
            }
        }
        Rewritten::Here(cur)
    }
}

/// What the separators of a text say (see [`Detectors::separators`]).
#[derive(Default)]
struct Separated {
    /// Where a pair keyword starts before its separator, ascending.
    keys: Vec<usize>,
    /// Whether a credential's name stands before a separator (`DB_PASS=`).
    names: bool,
}

/// What [`Detectors::rewrite`] did with a text.
enum Rewritten<'a> {
    /// The masked text (borrowed where nothing was masked).
    Here(Cow<'a, [u8]>),
    /// The masked text was appended to the sink.
    Into,
}

impl Default for Detectors {
    fn default() -> Self {
        Self::new()
    }
}

/// [`PAIR_KEYWORDS`] grouped by their last two letters (a handful of groups).
type PairTails = Vec<([u8; 2], Vec<&'static str>)>;

fn pair_tails() -> PairTails {
    let mut t: PairTails = Vec::new();
    for k in PAIR_KEYWORDS {
        let b = k.as_bytes();
        let tail = [b[b.len() - 2], b[b.len() - 1]];
        match t.iter_mut().find(|(x, _)| *x == tail) {
            Some((_, ks)) => ks.push(k),
            None => t.push((tail, vec![k])),
        }
    }
    t
}

/// Where a pair keyword would start if the separator at `sep` ends a pair's head:
/// walks back over what [`PAIR_HEAD`] allows between keyword and separator (whitespace, then
/// an optionally escaped quote). Whitespace includes every byte >= 0x80, so Unicode
/// spaces are never missed (a wrong guess only costs one anchored match attempt).
/// Separators come in ascending order and keywords hold neither `=` nor `:`, so the
/// starts found are ascending too.
/// `tails` is [`PAIR_KEYWORDS`] grouped by their last two letters ([`pair_tails`]).
fn pair_keyword_before(tails: &PairTails, s: &[u8], sep: usize) -> Option<usize> {
    let e = context::name_end_before(s, sep, pair_space);
    // The last two letters pick the few keywords worth comparing (most separators in
    // logs follow `status`, `user`, digits...). `| 0x20` lowercases letters and maps no
    // other byte onto one.
    if e < 3 {
        return None;
    }
    let tail = [s[e - 2] | 0x20, s[e - 1] | 0x20];
    let (_, candidates) = tails.iter().find(|(t, _)| *t == tail)?;
    candidates.iter().find_map(|k| {
        let k = k.as_bytes();
        (e >= k.len() && s[e - k.len()..e].eq_ignore_ascii_case(k)).then(|| e - k.len())
    })
}

/// Whether the name-byte run before the separator at `sep` holds one of the markers of
/// [`names::marker_window`], after walking back what may stand between a name and its
/// separator (`context::name_end_before`, over white space as [`pair_keyword_before`]
/// walks it). Where it does not, neither that function finds a pair keyword (every
/// keyword holds a marker and ends that run) nor `context::credential_before` a
/// credential's name (`names::is_credential_name` wants a marker; its walk over blanks
/// stops no later). Names longer than `context`'s limit are looked at whole.
fn marked_name_before(s: &[u8], sep: usize) -> bool {
    // Most separators follow a name byte at once (`status=`, `10:00`): no white space
    // or quote to walk back over, and a name byte that is not a letter is out.
    let mut e = match s[..sep].last() {
        Some(&b) if b.is_ascii_alphabetic() => sep,
        Some(&b) if NAME_CLASS[b as usize] != 0 => return false,
        _ => context::name_end_before(s, sep, pair_space),
    };
    // Both want a letter last (`10:00`, `200,` are out at once).
    if e == 0 || !s[e - 1].is_ascii_alphabetic() {
        return false;
    }
    // Walking back, a marker is found when its first letter is looked at: only there,
    // and after its second letter, are the three bytes from it on (lower-cased; none
    // past the name) compared.
    let end = e;
    let lower = |i: usize| if i < end { s[i] | 0x20 } else { 0 };
    while e > 0 {
        let class = NAME_CLASS[s[e - 1] as usize];
        if class == 0 {
            break;
        }
        e -= 1;
        if class == MARKER_FIRST && names::marker_start(lower(e), lower(e + 1)) {
            let w =
                u32::from(lower(e)) << 16 | u32::from(lower(e + 1)) << 8 | u32::from(lower(e + 2));
            if names::marker_window(w) {
                return true;
            }
        }
    }
    false
}

/// [`NAME_CLASS`]: a name byte (`context::name_byte`), and one that may begin a marker
/// of [`names::marker_window`] (`p`, `s`, `t`, `c`, `k`, either case).
const NAME_BYTE: u8 = 1;
const MARKER_FIRST: u8 = 2;
static NAME_CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        if context::name_byte(b as u8) {
            t[b] = match (b as u8) | 0x20 {
                b'p' | b's' | b't' | b'c' | b'k' if (b as u8).is_ascii_alphabetic() => MARKER_FIRST,
                _ => NAME_BYTE,
            };
        }
        b += 1;
    }
    t
};

/// What [`pair_keyword_before`] walks back over between a keyword and its separator
/// (wider than [`PAIR_HEAD`] allows: Unicode spaces are never missed, and a wrong guess
/// only costs one anchored match attempt).
fn pair_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c | 0x80..)
}

/// Whether `s` is a timestamp as the API server writes one: RFC 3339 in UTC, a
/// `metav1.Time` (`2006-01-02T15:04:05Z`) or a `MicroTime` (up to nine digits of a
/// second). Every object holds several that are not exempt (managedFields' `time`,
/// conditions' `lastTransitionTime`, containers' `startedAt`), and each one would
/// otherwise start the separator, flag, card and token searches (its colons, dashes
/// and digits): ~700 instructions a string (callgrind). Exact shape only: anything
/// before, after or inside it goes through every detector.
fn is_timestamp(s: &[u8]) -> bool {
    const SHAPE: &[u8; 19] = b"0000-00-00T00:00:00";
    let Some((head, tail)) = s.split_first_chunk::<19>() else {
        return false;
    };
    let shaped = head.iter().zip(SHAPE).all(|(&b, &p)| {
        if p == b'0' {
            b.is_ascii_digit()
        } else {
            b == p
        }
    });
    shaped
        && match tail {
            [b'Z'] => true,
            [b'.', fraction @ .., b'Z'] => {
                (1..=9).contains(&fraction.len()) && fraction.iter().all(u8::is_ascii_digit)
            }
            _ => false,
        }
}

/// Whether `s` may hold a card number: every match of the card pattern holds four
/// digits, a digit, space or dash, and four more (`4111 1111`, `411111111`), in nine
/// bytes. Most texts are read about one byte in nine.
fn card_candidate(s: &[u8]) -> bool {
    // Long texts (logs: digit-heavy timestamps, durations, addresses) are classified
    // 64 bytes at a time instead.
    if s.len() > SHORT_TEXT {
        return search::card_window(s);
    }
    const SPAN: usize = 9;
    let sep = |b: u8| b == b' ' || b == b'-';
    let digits = |a: usize, b: usize| b <= s.len() && s[a..b].iter().all(u8::is_ascii_digit);
    // Every window starting before `p - 8` is ruled out; each one starting in
    // `p - 8 ..= p` holds the probe `p`.
    let mut p = SPAN - 1;
    while p < s.len() {
        let b = s[p];
        if b.is_ascii_digit() {
            // A window holding a digit of this run matches only if the run is nine
            // digits long, or four or more with a separator and four digits beside it.
            let mut start = p;
            while start > 0 && s[start - 1].is_ascii_digit() {
                start -= 1;
            }
            let mut end = p + 1;
            while end < s.len() && s[end].is_ascii_digit() {
                end += 1;
            }
            if end - start >= SPAN
                || end - start >= 4
                    && (end < s.len() && sep(s[end]) && digits(end + 1, end + 5)
                        || start >= 5 && sep(s[start - 1]) && digits(start - 5, start - 1))
            {
                return true;
            }
            // Windows starting at the run's end hold a non-digit first.
            p = end + SPAN;
            continue;
        }
        // A separator only stands in the middle.
        if sep(b) && p >= 4 && digits(p - 4, p) && digits(p + 1, p + 5) {
            return true;
        }
        p += SPAN;
    }
    false
}

/// The Luhn checksum over the digits of `s` (separators ignored), for 13-19 digits.
pub fn luhn(s: &[u8]) -> bool {
    let digits: Vec<u32> = s
        .iter()
        .filter(|b| b.is_ascii_digit())
        .map(|b| u32::from(b - b'0'))
        .collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{search::tests::card_window_reference, testgen::Rng};

    /// Deterministic pseudo-random strings over an alphabet that makes the edge cases
    /// (digit runs, separators, keywords, quotes) common.
    fn fuzz_inputs(alphabet: &[&str], n: usize) -> Vec<Vec<u8>> {
        let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
        rng.step();
        (0..n).map(|_| rng.joined(alphabet, 40)).collect()
    }

    /// Timestamps skip the detectors ([`is_timestamp`]): every one of them, digits
    /// drawn at random (card numbers' among them) with every fraction length, passes
    /// all of them unchanged.
    #[test]
    fn timestamps_pass_every_detector() {
        let d = Detectors::new();
        let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
        let digits = ["0", "1", "4", "5", "9"];
        let mut seen = 0;
        for n in 0..4_000 {
            let mut s = Vec::new();
            for p in b"0000-00-00T00:00:00" {
                match p {
                    b'0' => s.extend_from_slice(rng.pick(&digits).as_bytes()),
                    _ => s.push(*p),
                }
            }
            let fraction = n % 10;
            if fraction > 0 {
                s.push(b'.');
                for _ in 0..fraction {
                    s.extend_from_slice(rng.pick(&digits).as_bytes());
                }
            }
            s.push(b'Z');
            assert!(is_timestamp(&s), "{:?}", String::from_utf8_lossy(&s));
            let mut sink = Vec::new();
            match d.rewrite_all(&s, &mut sink) {
                Rewritten::Here(t) => assert_eq!(&t[..], &s[..]),
                Rewritten::Into => panic!("{:?} was masked", String::from_utf8_lossy(&s)),
            }
            seen += 1;
        }
        assert_eq!(seen, 4_000);
    }

    /// Only the exact shape skips them: a byte changed anywhere, anything before or
    /// after, an offset instead of `Z`, ten fraction digits, and the credential
    /// beside a timestamp is masked.
    #[test]
    fn only_the_exact_timestamp_shape_skips_the_detectors() {
        let d = Detectors::new();
        for ok in [&b"2026-12-01T10:00:00Z"[..], b"2026-12-01T10:00:00.123456Z"] {
            assert!(is_timestamp(ok));
            for i in 0..ok.len() {
                for b in [
                    b'x', b'Z', b'0', b'-', b':', b'T', b'.', b' ', b'=', b'z', b't',
                ] {
                    let mut s = ok.to_vec();
                    if s[i] == b {
                        continue;
                    }
                    s[i] = b;
                    let digit_for_digit = ok[i].is_ascii_digit() && b.is_ascii_digit();
                    assert_eq!(
                        is_timestamp(&s),
                        digit_for_digit,
                        "{:?}",
                        String::from_utf8_lossy(&s)
                    );
                }
            }
            for (before, after) in [("", "x"), ("x", ""), (" ", ""), ("", " "), ("", "Z")] {
                let s = [before.as_bytes(), ok, after.as_bytes()].concat();
                assert!(!is_timestamp(&s), "{:?}", String::from_utf8_lossy(&s));
            }
        }
        for no in [
            &b"2026-12-01T10:00:00+01:00"[..],
            b"2026-12-01T10:00:00.1234567890Z",
            b"2026-12-01T10:00:00.Z",
            b"2026-12-01T10:00:00",
            b"2026-12-01 10:00:00Z",
            b"2026-12-01T10:00:00z",
        ] {
            assert!(!is_timestamp(no), "{:?}", String::from_utf8_lossy(no));
        }
        for s in [
            "2026-12-01T10:00:00Z password=hunter22",
            "password=hunter22 2026-12-01T10:00:00Z",
            "2026-12-01T10:00:00Z AKIAIOSFODNN7EXAMPLE",
        ] {
            let masked = d.apply(s.as_bytes());
            assert!(
                !String::from_utf8_lossy(&masked).contains("hunter22")
                    && !String::from_utf8_lossy(&masked).contains("AKIAIOSFODNN7EXAMPLE"),
                "{s:?} -> {:?}",
                String::from_utf8_lossy(&masked)
            );
        }
    }

    #[test]
    fn skipping_card_prefilter_agrees_with_a_byte_by_byte_scan() {
        let alphabet = ["1", "23", "4567", " ", "-", "x", "--", "  ", "8901", "Z"];
        let inputs = fuzz_inputs(&alphabet, 20_000);
        let mut positives = 0;
        for s in &inputs {
            let want = card_window_reference(s);
            positives += usize::from(want);
            assert_eq!(card_candidate(s), want, "{:?}", String::from_utf8_lossy(s));
        }
        assert!(positives > 500, "the inputs exercise few runs: {positives}");
    }

    /// The prefilter never says no where the card pattern matches (it only gates it).
    #[test]
    fn card_prefilter_passes_every_card_pattern_match() {
        let d = Detectors::new();
        let alphabet = [
            "1", "23", "4567", " ", "-", "x", "--", "8901", "411111", "Z",
        ];
        let mut matches = 0;
        for s in fuzz_inputs(&alphabet, 30_000) {
            if d.card.is_match(&s) {
                matches += 1;
                assert!(card_candidate(&s), "{:?}", String::from_utf8_lossy(&s));
            }
        }
        assert!(matches > 500, "the inputs exercise few cards: {matches}");
    }

    /// Long texts take the block search: still never a no where the card pattern
    /// matches, and the same answer as the short texts' skipping probe.
    #[test]
    fn long_texts_card_prefilter_agrees() {
        let d = Detectors::new();
        let alphabet = [
            "1", "23", "4567", " ", "-", "x", "--", "8901", "411111", "Z",
        ];
        let inputs = fuzz_inputs(&alphabet, 24_000);
        let mut matches = 0;
        for group in inputs.chunks(6) {
            let s = group.concat();
            let probed = group.iter().any(|p| card_candidate(p));
            let whole = card_candidate(&s);
            // Joining texts can only make windows, never lose one.
            assert!(whole || !probed, "{:?}", String::from_utf8_lossy(&s));
            if d.card.is_match(&s) {
                matches += 1;
                assert!(whole, "{:?}", String::from_utf8_lossy(&s));
            }
        }
        assert!(matches > 500, "the inputs exercise few cards: {matches}");
    }

    /// A token's marker can make a new boundary (`]` before a flag): the result is
    /// the same whatever else the text holds.
    #[test]
    fn masking_a_line_does_not_depend_on_its_neighbours() {
        let d = Detectors::new();
        let line = "AKIAIOSFODNN7EXAMPLE--DB_KEY=abc";
        let alone = d.apply(line.as_bytes()).into_owned();
        let beside = d
            .apply(format!("{line}\nx --token y\n").as_bytes())
            .into_owned();
        assert_eq!(
            String::from_utf8_lossy(&alone),
            "[masked:aws-key]--DB_KEY=[masked]"
        );
        assert!(
            beside.starts_with(&alone),
            "{}",
            String::from_utf8_lossy(&beside)
        );
    }

    #[test]
    fn every_pair_keyword_is_found_before_every_separator_form() {
        let pair = Regex::new(&pair_pattern()).expect("the pair pattern compiles");
        let tails = pair_tails();
        for k in PAIR_KEYWORDS {
            for form in ["=", ":", " = ", "\"=", "\\\":", "'\u{b}=", "\t:\r"] {
                let upper = k.to_ascii_uppercase();
                for kw in [k.to_string(), upper] {
                    let s = format!("x.{kw}{form}v");
                    let sep = s.rfind(['=', ':']).unwrap();
                    assert_eq!(
                        pair_keyword_before(&tails, s.as_bytes(), sep),
                        Some(2),
                        "{s}"
                    );
                    // The pattern agrees that a pair starts there.
                    assert!(
                        pair.find(s.as_bytes()).is_some_and(|m| m.start() == 2),
                        "{s}"
                    );
                }
            }
        }
        assert_eq!(pair_keyword_before(&tails, b"status=200", 6), None);
    }

    /// Appending the masked text gives what returning it gives, whichever detectors
    /// mask it (pairs alone are written straight into the output).
    #[test]
    fn apply_into_appends_what_apply_returns() {
        let d = Detectors::new();
        let alphabet = [
            "password=",
            "x",
            " ",
            "\n",
            "token: ",
            "AKIAIOSFODNN7EXAMPLE",
            "--db-pass ",
            "https://u:p@h/",
            "4111 1111 1111 1111",
            "DB_PASS=",
            "v4l",
        ];
        let (mut pairs_only, mut others) = (0, 0);
        for s in fuzz_inputs(&alphabet, 10_000) {
            let mut out = b"head:".to_vec();
            d.apply_into(&s, &mut out);
            let want = [&b"head:"[..], &d.apply(&s)].concat();
            assert_eq!(out, want, "{:?}", String::from_utf8_lossy(&s));
            let text = String::from_utf8_lossy(&s);
            if text.contains("password=x") && !text.contains("AKIA") && !text.contains("--") {
                pairs_only += 1;
            } else {
                others += 1;
            }
        }
        assert!(pairs_only > 50 && others > 5_000, "{pairs_only} / {others}");
    }

    #[test]
    fn pairs_found_at_keywords_match_a_plain_replace_all() {
        let d = Detectors::new();
        let plain = Regex::new(&pair_pattern()).expect("the pair pattern compiles");
        let alphabet = [
            "password",
            "PassWord",
            "pwd",
            "secret",
            "token",
            "api-key",
            "apikey",
            "Private_Key",
            "privatekey",
            "credentials",
            "sec",
            "o",
            "=",
            ":",
            " ",
            "\\\"",
            "'",
            "\"",
            "v4lue",
            ",",
            "\n",
            "é",
            "\t",
            "\u{a0}",
            "\u{2003}",
            "Credential",
        ];
        let mut masked = 0;
        for s in fuzz_inputs(&alphabet, 20_000) {
            let want = plain.replace_all(&s, &b"${1}[masked]"[..]);
            let keys = d.separators(&s).keys;
            let got = d.mask_pairs(Cow::Borrowed(&s[..]), &keys);
            masked += usize::from(matches!(want, Cow::Owned(_)));
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&s));
        }
        assert!(masked > 2000, "the inputs exercise few pairs: {masked}");
        // Keywords overlapping each other, and the spellings the old trigger list missed.
        for (input, want) in [
            ("secretoken=abc", "secretoken=[masked]"),
            ("privatekey=abc", "privatekey=[masked]"),
            ("access-key: abc", "access-key: [masked]"),
            ("db.Password = 'x y'", "db.Password = '[masked] y'"),
        ] {
            assert_eq!(d.apply(input.as_bytes()), want.as_bytes(), "{input}");
        }
    }

    /// The walk's byte classes: name bytes as `context::name_byte` has them, and the
    /// first letters of the markers, either case.
    #[test]
    fn name_classes_are_name_bytes_and_marker_first_letters() {
        let firsts: Vec<u8> = names::NAME_MARKERS
            .iter()
            .map(|m| m.as_bytes()[0])
            .collect();
        for b in 0..=255u8 {
            let want = match (
                context::name_byte(b),
                firsts.contains(&b.to_ascii_lowercase()),
            ) {
                (false, _) => 0,
                (true, false) => NAME_BYTE,
                (true, true) => MARKER_FIRST,
            };
            assert_eq!(NAME_CLASS[b as usize], want, "byte {b:#04x}");
        }
    }

    #[test]
    fn the_marker_check_passes_every_separator_a_full_check_takes() {
        let d = Detectors::new();
        let alphabet = [
            "password", "PassWd", "db_", "-", "pwd", "x", "Secret", "tok", "en", "api", "_key",
            "KEY", "cred", "entials", "status", "user", "=", ":", " ", "\\\"", "\"", "'", "\\",
            "\n", "\t", "\u{a0}", "é", ".", "v4lue", ",", "Pas", "s", "pA", "w", "K", "ey", "sE",
            "c", "T", "ok", "cR", "e", "P", "aS",
        ];
        let mut taken = 0;
        for s in fuzz_inputs(&alphabet, 30_000) {
            for sep in memchr::memchr2_iter(b'=', b':', &s) {
                let full = pair_keyword_before(&d.pair_tails, &s, sep).is_some()
                    || context::credential_before(&s, sep);
                let quick = marked_name_before(&s, sep);
                assert!(quick || !full, "{:?} at {sep}", String::from_utf8_lossy(&s));
                taken += usize::from(full);
            }
        }
        assert!(taken > 3000, "the inputs exercise few names: {taken}");
        // Every pair keyword and credential name holds a marker.
        for k in PAIR_KEYWORDS {
            assert!(
                marked_name_before(format!("{k}=").as_bytes(), k.len()),
                "{k}"
            );
        }
        for no in [
            "status=",
            "user=",
            "10:00:",
            "p-1: ",
            "duration =",
            "pa=",
            "se'=",
            "to k=",
        ] {
            let sep = no.find(['=', ':']).unwrap_or(no.len());
            assert!(!marked_name_before(no.as_bytes(), sep), "{no}");
        }
    }

    #[test]
    fn short_and_long_texts_are_masked_alike() {
        let d = Detectors::new();
        let alphabet = [
            "password",
            "=",
            ":",
            " ",
            "x",
            "-",
            "--db-pass",
            "4111",
            "1111",
            "//",
            "http",
            "@",
            "user",
            "Bearer ",
            "abcdefgh",
            "AKIA",
            "ABCDEFGHIJKLMNOP",
            "token",
            "\"",
            "eyJhbGciOi",
            ".",
            "Authorization",
            "5",
            "é",
            "\t",
        ];
        // A newline and blanks after a text change nothing before it (no detector crosses
        // a line), so the long path must give the short one's result, padded.
        let pad = format!("\n{}", " ".repeat(SHORT_TEXT));
        let mut masked = 0;
        for s in fuzz_inputs(&alphabet, 20_000) {
            if s.len() > SHORT_TEXT {
                continue;
            }
            let short = d.apply(&s).into_owned();
            let long = [&s[..], pad.as_bytes()].concat();
            let got = d.apply(&long);
            masked += usize::from(short != s);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&[&short[..], pad.as_bytes()].concat()),
                "{:?}",
                String::from_utf8_lossy(&s)
            );
        }
        assert!(
            masked > 500,
            "the inputs exercise few credentials: {masked}"
        );
        // The shortest text a token pattern matches is not skipped.
        let xox = format!("xoxb-{}", "1".repeat(10));
        assert_eq!(xox.len(), d.token_min_len);
        assert_eq!(d.apply(xox.as_bytes()), &b"[masked:slack-token]"[..]);
    }

    #[test]
    fn card_candidates_need_two_groups_of_four_digits() {
        assert!(card_candidate(b"pay 4111 1111 1111 1111 now"));
        assert!(card_candidate(b"4111-1111-1111-1111"));
        assert!(card_candidate(b"4111111111111"));
        assert!(!card_candidate(
            b"2026-11-22T10:00:00Z status=200 duration=12ms"
        ));
        assert!(
            !card_candidate(b"4111  1111 x 1111--1111 123-4567 1-2-3-4-5-6-7-8-9-0-1-2-3"),
            "double separators, short groups"
        );
        assert!(card_candidate(b"x 4111 1111"));
    }

    #[test]
    fn luhn_checks() {
        assert!(luhn(b"4111111111111111"));
        assert!(luhn(b"4111-1111-1111-1111"));
        assert!(!luhn(b"4111111111111112"));
        assert!(!luhn(b"1234"));
    }
}
