//! Masking of everything the API server sends an agent, before the agent sees it.
//!
//! JSON bodies are rewritten by a streaming scanner ([`JsonMasker`]) fed chunk by chunk,
//! so a watch stream is masked event by event and a large list without holding it whole:
//! memory is the current string plus the container stack, whatever the body size.
//! Numbers, keys and structure pass through byte for byte; string values are rewritten
//! when
//! - a path rule covers them (built in: Secret `data` and `stringData`; configurable per
//!   resource), anchored at every place an object appears in a response (the document,
//!   `items[*]` of a list, a watch event's `object`, a Table row's `object`, a watched
//!   Table's rows), replaced by a placeholder that keeps the document valid (valid
//!   base64 where the field is base64);
//! - they are the `kubectl.kubernetes.io/last-applied-configuration` annotation, which
//!   holds a whole applied object: it is parsed and masked with the same rules;
//! - their key names a credential (`password`, `clientSecret`, `token`, ...) or they are
//!   the `value` beside such a `name` (container env), or
//! - a pattern detector finds a credential inside them (PEM private keys, JWTs, cloud
//!   access keys, `password=`/`token:` pairs, card numbers passing the Luhn check).
//!
//! Text bodies (pod logs, `logs -f`) are masked line by line by [`TextMasker`], with a
//! PEM private key spanning lines removed whole.
//!
//! Placeholders never contain or derive from the value, unless a fingerprint key is
//! configured: then they carry a keyed HMAC-SHA256 fingerprint (8 bytes), so equal
//! values can be recognised without being revealed.
use std::{borrow::Cow, sync::Arc};

use base64::Engine;
use regex::bytes::Regex;

use crate::{
    request_info::RequestInfo,
    util::{is_json, media_type},
};

/// The placeholder text; base64-encoded where the field is base64.
pub const PLACEHOLDER: &str = "portcullis-masked";
/// [`PLACEHOLDER`] as a JSON string, and its base64 (Secret `data`) as one.
const PLACEHOLDER_JSON: &str = "\"portcullis-masked\"";
const PLACEHOLDER_B64_JSON: &str = "\"cG9ydGN1bGxpcy1tYXNrZWQ=\"";
/// The annotation `kubectl apply` stores the whole applied object in.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Deepest JSON nesting accepted; the API server's own decoder stops well before this.
const MAX_DEPTH: usize = 512;
/// Longest string value held while deciding how to mask it.
const MAX_STRING: usize = 64 << 20;
/// Longest log line held before it is masked and passed on without its end.
const MAX_LINE: usize = 256 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaskError {
    #[error("response body is not valid JSON at byte {offset}: {why}")]
    Syntax { offset: u64, why: &'static str },
    #[error("response body nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("a string in the response body is longer than {MAX_STRING} bytes")]
    TooLong,
    #[error("path rule {rule:?}: {why}")]
    Rule { rule: String, why: &'static str },
}

pub use crate::config::Encoding;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(Vec<u8>),
    Any,
}

/// A path below an object, e.g. `data.*` or `metadata.annotations[example.com/key]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path(Vec<Seg>);

impl std::str::FromStr for Path {
    type Err = MaskError;
    fn from_str(s: &str) -> Result<Self, MaskError> {
        let bad = |why| MaskError::Rule {
            rule: s.to_owned(),
            why,
        };
        let mut segs = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix('[') {
                let end = r.find(']').ok_or_else(|| bad("unclosed ["))?;
                segs.push(Seg::Key(r.as_bytes()[..end].to_vec()));
                rest = r[end + 1..].strip_prefix('.').unwrap_or(&r[end + 1..]);
                continue;
            }
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            let seg = &rest[..end];
            if seg.is_empty() {
                return Err(bad("empty segment"));
            }
            segs.push(if seg == "*" {
                Seg::Any
            } else {
                Seg::Key(seg.as_bytes().to_vec())
            });
            rest = rest[end..].strip_prefix('.').unwrap_or(&rest[end..]);
        }
        if segs.is_empty() {
            return Err(bad("empty path"));
        }
        Ok(Path(segs))
    }
}

/// Where objects sit in the responses the API server sends: the document itself, a
/// list's items, a watch event's object, a Table row's object, a watched Table's rows.
const ROOTS: &[&[Option<&str>]] = &[
    &[],
    &[Some("items"), None],
    &[Some("object")],
    &[Some("object"), Some("items"), None],
    &[Some("rows"), None, Some("object")],
    &[Some("object"), Some("rows"), None, Some("object")],
];

/// What the masker applies to one response.
#[derive(Debug, Clone)]
pub struct Plan {
    paths: Vec<(Path, Encoding)>,
    detectors: Option<std::sync::Arc<Detectors>>,
    fingerprint: Option<ring::hmac::Key>,
    /// The deepest a value below an object root can be and still be masked by path
    /// (or be the last-applied annotation, 3 deep): deeper values skip the path checks.
    max_rel_depth: usize,
    /// Bit n (n < 64) set: some path (or the annotation) is exactly n deep.
    rel_depths: u64,
}

impl Plan {
    pub fn new(
        paths: Vec<(Path, Encoding)>,
        detectors: Option<std::sync::Arc<Detectors>>,
        fingerprint: Option<ring::hmac::Key>,
    ) -> Self {
        let max_rel_depth = paths
            .iter()
            .map(|(p, _)| p.0.len())
            .max()
            .unwrap_or(0)
            .max(3);
        let rel_depths = paths
            .iter()
            .filter(|(p, _)| p.0.len() < 64)
            .fold(1u64 << 3, |a, (p, _)| a | 1 << p.0.len());
        Plan {
            paths,
            detectors,
            fingerprint,
            max_rel_depth,
            rel_depths,
        }
    }

    /// The built-in rule for core/v1 Secrets.
    pub fn secret_paths() -> Vec<(Path, Encoding)> {
        vec![
            (Path(vec![Seg::Key(b"data".to_vec())]), Encoding::Base64),
            (Path(vec![Seg::Key(b"stringData".to_vec())]), Encoding::Text),
        ]
    }

    fn placeholder(&self, enc: Encoding, value: &[u8], out: &mut Vec<u8>) {
        if self.fingerprint.is_none() {
            // The common case, without encoding anything per value.
            out.extend_from_slice(match enc {
                Encoding::Text => PLACEHOLDER_JSON.as_bytes(),
                Encoding::Base64 => PLACEHOLDER_B64_JSON.as_bytes(),
            });
            return;
        }
        let text: Cow<str> = match &self.fingerprint {
            None => Cow::Borrowed(PLACEHOLDER),
            Some(k) => {
                let tag = ring::hmac::sign(k, value);
                Cow::Owned(format!("{PLACEHOLDER}:{}", hex::encode(&tag.as_ref()[..8])))
            }
        };
        out.push(b'"');
        match enc {
            Encoding::Text => out.extend_from_slice(text.as_bytes()),
            Encoding::Base64 => out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(text.as_bytes())
                    .as_bytes(),
            ),
        }
        out.push(b'"');
    }
}

/// Pattern detectors for credentials inside strings and text.
#[derive(Debug)]
pub struct Detectors {
    /// All token patterns in one: a single literal-prefiltered pass (the regex crate's
    /// SIMD multi-literal search over their prefixes) says whether any can match.
    token_any: Regex,
    patterns: Vec<(Regex, &'static str)>,
    /// The pair pattern anchored at its keyword: run only where a keyword stands before
    /// a `=` or `:` (see [`pair_keyword_before`]).
    pair_at: Regex,
    pair_tails: PairTails,
    card: Regex,
    pem_begin: Regex,
    pem_end: Regex,
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

/// Key names whose string values are credentials (compared case-insensitively, as the
/// whole key or its ending: `clientSecret`, `DB_PASSWORD`, `api-key`). Each ends in
/// d, t, n, y, s or l ([`is_secret_name`] relies on it; tested).
const SECRET_KEY_ENDINGS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "apikey",
    "api_key",
    "api-key",
    "accesskey",
    "access_key",
    "secretkey",
    "secret_key",
    "privatekey",
    "private_key",
    "credentials",
    "credential",
];

/// Keys whose values are opaque identifiers clients depend on, never credentials.
const EXEMPT_KEYS: &[&[u8]] = &[
    b"resourceVersion",
    b"uid",
    b"continue",
    b"selfLink",
    b"creationTimestamp",
    b"generateName",
];

/// A key that names a credential: `password`, `clientSecret`, `DB_PASSWORD`, but not
/// `secretName` (a reference, not a value).
pub fn is_secret_name(key: &[u8]) -> bool {
    // Every ending ends in one of these letters: most keys are out at once.
    if !key
        .last()
        .is_some_and(|b| matches!(b | 0x20, b'd' | b't' | b'n' | b'y' | b's' | b'l'))
    {
        return false;
    }
    SECRET_KEY_ENDINGS.iter().any(|e| {
        key.len() >= e.len() && key[key.len() - e.len()..].eq_ignore_ascii_case(e.as_bytes())
    })
}

/// key, separator (optionally quoted, also JSON-escaped quotes), value. The value stops
/// before a backslash so an escape sequence is never cut. It starts at the keyword; a
/// prefix such as `db.` or `DB_` stays in place untouched. The keyword folds ASCII case
/// only, exactly as the trigger automaton does.
const PAIR: &str = r#"((?i-u:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)(?:\\?["'])?\s*[=:]\s*(?:\\?["'])?)([^\s"'\\,;&}\]]+)"#;

impl Detectors {
    pub fn new() -> Self {
        let re = |s: &str| Regex::new(s).expect("static pattern");
        let patterns = vec![
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
        Detectors {
            token_any: re(&any),
            patterns,
            pair_at: re(&format!("^{PAIR}")),
            pair_tails: pair_tails(),
            card: re(
                r"\b(?:\d{4}[ -]\d{4}[ -]\d{4}[ -]\d{4}(?:\d{3})?|\d{4}[ -]\d{6}[ -]\d{5}|\d{13,19})\b",
            ),
            pem_begin: re(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----"),
            pem_end: re(r"-----END[A-Z0-9 ]*PRIVATE KEY-----"),
        }
    }

    /// Where detectors could match in `s`: whether a token pattern does, and the start
    /// of every pair keyword that stands before a separator, ascending.
    fn scan(&self, s: &[u8]) -> (bool, Vec<usize>) {
        let token = self.token_any.is_match(s);
        let keys = memchr::memchr2_iter(b'=', b':', s)
            .filter_map(|sep| pair_keyword_before(&self.pair_tails, s, sep))
            .collect();
        (token, keys)
    }

    /// `s` with every `password=value` pair's value masked, trying the pattern only at
    /// the keyword starts `keys` (ascending). Same result as a leftmost-first
    /// replace-all of the pattern: every match starts at a keyword.
    fn mask_pairs<'a>(&self, s: Cow<'a, [u8]>, keys: &[usize]) -> Cow<'a, [u8]> {
        let mut out: Vec<u8> = Vec::new();
        let mut done = 0;
        for &k in keys {
            if k < done {
                continue;
            }
            // The anchored DFA rejects a keyword without a separator at once; only a
            // real pair pays for the capture groups.
            if !self.pair_at.is_match(&s[k..]) {
                continue;
            }
            if let Some(c) = self.pair_at.captures(&s[k..])
                && let (Some(whole), Some(head)) = (c.get(0), c.get(1))
            {
                out.extend_from_slice(&s[done..k]);
                out.extend_from_slice(head.as_bytes());
                out.extend_from_slice(b"[masked]");
                done = k + whole.end();
            }
        }
        if done == 0 {
            return s;
        }
        out.extend_from_slice(&s[done..]);
        Cow::Owned(out)
    }

    /// `s` with every credential found replaced by a `[masked:...]` marker.
    pub fn apply<'a>(&self, s: &'a [u8]) -> Cow<'a, [u8]> {
        // Nothing shorter can hold a credential the patterns know (`pwd=x`).
        if s.len() < 5 {
            return Cow::Borrowed(s);
        }
        let card = card_candidate(s);
        let (token, mut keys) = self.scan(s);
        if !token && keys.is_empty() && !card {
            return Cow::Borrowed(s);
        }
        let mut cur: Cow<[u8]> = Cow::Borrowed(s);
        if token {
            for (re, marker) in &self.patterns {
                if re.is_match(&cur) {
                    cur = Cow::Owned(re.replace_all(&cur, marker.as_bytes()).into_owned());
                }
            }
            if matches!(cur, Cow::Owned(_)) {
                // Replacements moved the text: find the keywords again.
                keys = self.scan(&cur).1;
            }
        }
        if !keys.is_empty() {
            cur = self.mask_pairs(cur, &keys);
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
        cur
    }
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
/// walks back over what [`PAIR`] allows between keyword and separator (whitespace, then
/// an optionally escaped quote). Whitespace includes every byte >= 0x80, so Unicode
/// spaces are never missed (a wrong guess only costs one anchored match attempt).
/// Separators come in ascending order and keywords hold neither `=` nor `:`, so the
/// starts found are ascending too.
/// `tails` is [`PAIR_KEYWORDS`] grouped by their last two letters ([`pair_tails`]).
fn pair_keyword_before(tails: &PairTails, s: &[u8], sep: usize) -> Option<usize> {
    let mut e = sep;
    while e > 0
        && matches!(
            s[e - 1],
            b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c | 0x80..
        )
    {
        e -= 1;
    }
    if e > 0 && matches!(s[e - 1], b'"' | b'\'') {
        e -= 1;
        if e > 0 && s[e - 1] == b'\\' {
            e -= 1;
        }
    }
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

/// Whether `s` has a run of 13 or more digits (single spaces or dashes between them
/// allowed): the only place a card number can be.
fn card_candidate(s: &[u8]) -> bool {
    // 1: digit, 2: separator, 0: anything else.
    const fn classes() -> [u8; 256] {
        let mut t = [0u8; 256];
        let mut d = b'0';
        while d <= b'9' {
            t[d as usize] = 1;
            d += 1;
        }
        t[b' ' as usize] = 2;
        t[b'-' as usize] = 2;
        t
    }
    static CLASS: [u8; 256] = classes();
    // Such a run spans at least 13 bytes of digits and separators. Probe the last byte
    // of the 13-byte window starting at `i` (always just after a byte of class 0): if
    // it is of class 0 no run starting in the window is long enough, so skip the window
    // whole; otherwise measure the run through the probe. Text with few digits is read
    // about one byte in thirteen.
    const SPAN: usize = 13;
    let mut i = 0;
    while i + SPAN <= s.len() {
        let probe = i + SPAN - 1;
        if CLASS[s[probe] as usize] == 0 {
            i = probe + 1;
            continue;
        }
        let mut start = probe;
        while start > i && CLASS[s[start - 1] as usize] != 0 {
            start -= 1;
        }
        // Digits in a row, kept across one separator, reset by two.
        let (mut run, mut sep, mut end) = (0u32, false, start);
        while end < s.len() {
            match CLASS[s[end] as usize] {
                1 => {
                    run += 1;
                    sep = false;
                    if run >= 13 {
                        return true;
                    }
                }
                2 if !sep => sep = true,
                2 => run = 0,
                _ => break,
            }
            end += 1;
        }
        i = end + 1;
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

/// How the value now starting is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Detectors run over it.
    Plain,
    /// Replaced (the whole subtree for a container).
    Mask(Encoding),
    /// The last-applied annotation: parsed and masked as an object.
    LastApplied,
    /// An identifier clients depend on: passed as is.
    Exempt,
}

#[derive(Debug)]
struct Frame {
    array: bool,
    /// The current key (objects), as it appears in the body (escaped).
    key: Vec<u8>,
    /// Set when the whole container is masked.
    masked: Option<Encoding>,
    expect_key: bool,
    /// A `name` field in this object named a credential: its `value` is masked.
    secret_name: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Between,
    Str { key: bool, mode: Mode, esc: bool },
    Lit { masked: bool },
}

/// Streaming JSON masker; feed it the body chunk by chunk. Several top-level values in
/// a row (a watch stream's events) are handled like one.
pub struct JsonMasker {
    plan: Arc<Plan>,
    frames: Vec<Frame>,
    lex: Lex,
    sbuf: Vec<u8>,
    /// Key buffers of closed objects, reused by the next ones (no allocation per
    /// object once the stack has been as deep).
    spare_keys: Vec<Vec<u8>>,
    offset: u64,
    out: Vec<u8>,
}

impl JsonMasker {
    pub fn new(plan: Arc<Plan>) -> Self {
        JsonMasker {
            plan,
            frames: Vec::new(),
            lex: Lex::Between,
            sbuf: Vec::new(),
            spare_keys: Vec::new(),
            offset: 0,
            out: Vec::new(),
        }
    }

    /// Masks `input`, returning what can be sent now.
    pub fn feed(&mut self, input: &[u8]) -> Result<Vec<u8>, MaskError> {
        self.out.reserve(input.len() + 64);
        let mut i = 0;
        while i < input.len() {
            match self.lex {
                Lex::Between => {
                    let b = input[i];
                    match b {
                        b' ' | b'\t' | b'\r' | b'\n' => self.out.push(b),
                        b'{' | b'[' => {
                            let mode = self.value_mode(true);
                            if self.frames.len() >= MAX_DEPTH {
                                return Err(MaskError::TooDeep);
                            }
                            let masked = match mode {
                                Mode::Mask(e) => Some(e),
                                _ => None,
                            };
                            let mut key = self.spare_keys.pop().unwrap_or_default();
                            key.clear();
                            self.frames.push(Frame {
                                array: b == b'[',
                                key,
                                masked,
                                expect_key: b == b'{',
                                secret_name: false,
                            });
                            self.out.push(b);
                        }
                        b'}' | b']' => {
                            match self.frames.pop() {
                                Some(f) if f.array == (b == b']') => self.spare_keys.push(f.key),
                                _ => return Err(self.syntax(i, "unbalanced bracket")),
                            }
                            self.out.push(b);
                        }
                        b':' => self.out.push(b),
                        b',' => {
                            if let Some(f) = self.frames.last_mut()
                                && !f.array
                            {
                                f.expect_key = true;
                            }
                            self.out.push(b);
                        }
                        b'"' => {
                            let is_key =
                                self.frames.last().is_some_and(|f| !f.array && f.expect_key);
                            let mode = if is_key {
                                Mode::Exempt
                            } else {
                                self.value_mode(false)
                            };
                            if mode == Mode::Exempt && !is_key {
                                self.out.push(b'"');
                            }
                            self.sbuf.clear();
                            self.lex = Lex::Str {
                                key: is_key,
                                mode,
                                esc: false,
                            };
                        }
                        b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                            let masked = matches!(self.value_mode(false), Mode::Mask(_))
                                && (b == b'-' || b.is_ascii_digit());
                            self.out.push(if masked { b'0' } else { b });
                            self.lex = Lex::Lit { masked };
                        }
                        _ => return Err(self.syntax(i, "unexpected character")),
                    }
                    i += 1;
                }
                Lex::Lit { masked } => {
                    let b = input[i];
                    if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n') {
                        self.lex = Lex::Between;
                        continue;
                    }
                    if !masked {
                        self.out.push(b);
                    }
                    i += 1;
                }
                Lex::Str { key, mode, esc } => {
                    let mut start = i;
                    if esc {
                        // The byte after a backslash is part of the escape.
                        self.take(mode, key, &input[i..i + 1])?;
                        i += 1;
                        start = i;
                    }
                    match memchr::memchr2(b'"', b'\\', &input[i..]) {
                        None => {
                            self.take(mode, key, &input[start..])?;
                            self.lex = Lex::Str {
                                key,
                                mode,
                                esc: false,
                            };
                            i = input.len();
                        }
                        Some(j) => {
                            let at = i + j;
                            self.take(mode, key, &input[start..at])?;
                            if input[at] == b'\\' {
                                self.take(mode, key, b"\\")?;
                                if at + 1 < input.len() {
                                    self.take(mode, key, &input[at + 1..at + 2])?;
                                    i = at + 2;
                                    self.lex = Lex::Str {
                                        key,
                                        mode,
                                        esc: false,
                                    };
                                } else {
                                    i = at + 1;
                                    self.lex = Lex::Str {
                                        key,
                                        mode,
                                        esc: true,
                                    };
                                }
                            } else {
                                self.end_string(key, mode)?;
                                self.lex = Lex::Between;
                                i = at + 1;
                            }
                        }
                    }
                }
            }
        }
        self.offset += input.len() as u64;
        Ok(std::mem::take(&mut self.out))
    }

    /// The end of the body: what remains, or an error if it ended inside a value.
    pub fn finish(mut self) -> Result<Vec<u8>, MaskError> {
        match self.lex {
            Lex::Str { .. } => Err(self.syntax(0, "the body ends inside a string")),
            _ if !self.frames.is_empty() => {
                Err(self.syntax(0, "the body ends inside an object or array"))
            }
            _ => Ok(std::mem::take(&mut self.out)),
        }
    }

    fn syntax(&self, at: usize, why: &'static str) -> MaskError {
        MaskError::Syntax {
            offset: self.offset + at as u64,
            why,
        }
    }

    /// String content: passed on at once (keys are kept for paths; exempt values go
    /// straight out), held (to decide on the whole string) or dropped (masked).
    fn take(&mut self, mode: Mode, key: bool, bytes: &[u8]) -> Result<(), MaskError> {
        if mode == Mode::Exempt && !key {
            self.out.extend_from_slice(bytes);
            return Ok(());
        }
        if matches!(mode, Mode::Mask(_)) && self.plan.fingerprint.is_none() {
            return Ok(());
        }
        if self.sbuf.len() + bytes.len() > MAX_STRING {
            return Err(MaskError::TooLong);
        }
        self.sbuf.extend_from_slice(bytes);
        Ok(())
    }

    fn end_string(&mut self, key: bool, mode: Mode) -> Result<(), MaskError> {
        if key {
            self.out.push(b'"');
            self.out.extend_from_slice(&self.sbuf);
            self.out.push(b'"');
            // The buffers trade places: the key is kept without a copy.
            // A key is only read inside an object, so the frame is there.
            if let Some(f) = self.frames.last_mut() {
                std::mem::swap(&mut f.key, &mut self.sbuf);
                f.expect_key = false;
            }
            return Ok(());
        }
        match mode {
            Mode::Exempt => self.out.push(b'"'),
            Mode::Mask(enc) => {
                let sbuf = std::mem::take(&mut self.sbuf);
                self.plan.placeholder(enc, &sbuf, &mut self.out);
                self.sbuf = sbuf;
            }
            Mode::LastApplied => {
                let masked = self.mask_embedded();
                self.out.extend_from_slice(&masked);
            }
            Mode::Plain => {
                if let Some(f) = self.frames.last_mut()
                    && !f.array
                    && f.key == b"name"
                    && is_secret_name(&self.sbuf)
                {
                    f.secret_name = true;
                }
                self.out.push(b'"');
                match &self.plan.detectors {
                    Some(d) => {
                        let masked = d.apply(&self.sbuf);
                        self.out.extend_from_slice(&masked);
                    }
                    None => self.out.extend_from_slice(&self.sbuf),
                }
                self.out.push(b'"');
            }
        }
        Ok(())
    }

    /// The last-applied annotation (in `sbuf`, escaped): the object inside masked with
    /// the same plan, re-encoded as a JSON string. If it is not JSON, detectors only.
    fn mask_embedded(&self) -> Vec<u8> {
        let mut quoted = Vec::with_capacity(self.sbuf.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(&self.sbuf);
        quoted.push(b'"');
        let inner: Option<String> = serde_json::from_slice(&quoted).ok();
        let masked = inner.and_then(|doc| {
            let mut m = JsonMasker::new(self.plan.clone());
            let mut out = m.feed(doc.as_bytes()).ok()?;
            out.extend(m.finish().ok()?);
            String::from_utf8(out).ok()
        });
        match masked {
            Some(s) => serde_json::to_vec(&s).unwrap_or_else(|_| b"\"\"".to_vec()),
            None => {
                // Not JSON: treat it as text. Without detectors, hide it whole.
                let mut out = vec![b'"'];
                match &self.plan.detectors {
                    Some(d) => out.extend_from_slice(&d.apply(&self.sbuf)),
                    None => out.extend_from_slice(PLACEHOLDER.as_bytes()),
                }
                out.push(b'"');
                out
            }
        }
    }

    /// The treatment of the value that starts now (an object or array if `container`),
    /// from its path.
    fn value_mode(&self, container: bool) -> Mode {
        let Some(top) = self.frames.last() else {
            return Mode::Plain;
        };
        if let Some(e) = top.masked {
            return Mode::Mask(e);
        }
        if !top.array && !container {
            if top.key == b"value" && top.secret_name {
                return Mode::Mask(Encoding::Text);
            }
            if EXEMPT_KEYS.contains(&top.key.as_slice()) {
                return Mode::Exempt;
            }
        }
        for root in ROOTS {
            if self.frames.len() < root.len()
                || self.frames.len() - root.len() > self.plan.max_rel_depth
                || (self.frames.len() - root.len() < 64
                    && self.plan.rel_depths & 1 << (self.frames.len() - root.len()) == 0)
                || !self.matches_root(root)
            {
                continue;
            }
            let rel = &self.frames[root.len()..];
            for (path, enc) in &self.plan.paths {
                if rel.len() == path.0.len()
                    && rel.iter().zip(&path.0).all(|(f, s)| match s {
                        Seg::Any => true,
                        Seg::Key(k) => !f.array && f.key == *k,
                    })
                {
                    return Mode::Mask(*enc);
                }
            }
            if rel.len() == 3
                && !rel[0].array
                && rel[0].key == b"metadata"
                && !rel[1].array
                && rel[1].key == b"annotations"
                && !rel[2].array
                && rel[2].key == LAST_APPLIED.as_bytes()
            {
                return Mode::LastApplied;
            }
        }
        // A credential-named field: its scalar value (a nested object keeps its
        // structure and is checked field by field).
        if !top.array && !container && is_secret_name(&top.key) {
            return Mode::Mask(Encoding::Text);
        }
        Mode::Plain
    }

    fn matches_root(&self, root: &[Option<&str>]) -> bool {
        root.iter().zip(&self.frames).all(|(r, f)| match r {
            None => f.array,
            Some(k) => !f.array && f.key == k.as_bytes(),
        })
    }
}

/// Masks a text stream (pod logs) line by line.
pub struct TextMasker {
    detectors: Arc<Detectors>,
    line: Vec<u8>,
    in_pem: bool,
}

impl TextMasker {
    pub fn new(detectors: Arc<Detectors>) -> Self {
        TextMasker {
            detectors,
            line: Vec::new(),
            in_pem: false,
        }
    }

    /// Masks every complete line in `input`; a partial last line waits for its end
    /// (or for [`MAX_LINE`] bytes).
    pub fn feed(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() + 32);
        let mut rest = input;
        // The line the last chunk left open ends first.
        if !self.line.is_empty() {
            let Some(nl) = memchr::memchr(b'\n', rest) else {
                self.line.extend_from_slice(rest);
                self.flush_long(&mut out);
                return out;
            };
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(&rest[..=nl]);
            self.mask_line(&line, &mut out);
            line.clear();
            self.line = line;
            rest = &rest[nl + 1..];
        }
        // Then the complete lines: in one pass of the detectors (no pattern spans lines)
        // up to a private-key header; from there line by line until the key ends.
        while let Some(last_nl) = memchr::memrchr(b'\n', rest) {
            if !self.in_pem {
                let complete = &rest[..=last_nl];
                let upto = match memchr::memmem::find(complete, b"-----BEGIN") {
                    None => complete.len(),
                    Some(b) => memchr::memrchr(b'\n', &complete[..b]).map_or(0, |i| i + 1),
                };
                if upto > 0 {
                    out.extend_from_slice(&self.detectors.apply(&rest[..upto]));
                    rest = &rest[upto..];
                    continue;
                }
            }
            // A newline is left (`last_nl`): never breaks.
            let Some(nl) = memchr::memchr(b'\n', rest) else {
                break;
            };
            self.mask_line(&rest[..=nl], &mut out);
            rest = &rest[nl + 1..];
        }
        self.line.extend_from_slice(rest);
        self.flush_long(&mut out);
        out
    }

    /// A line longer than [`MAX_LINE`] is masked as it stands rather than held.
    fn flush_long(&mut self, out: &mut Vec<u8>) {
        if self.line.len() >= MAX_LINE {
            let line = std::mem::take(&mut self.line);
            self.mask_line(&line, out);
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let line = std::mem::take(&mut self.line);
        if !line.is_empty() {
            self.mask_line(&line, &mut out);
        }
        out
    }

    fn mask_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let d = self.detectors.clone();
        if self.in_pem {
            // Inside a private key: drop lines up to and including its end.
            if let Some(m) = d.pem_end.find(line) {
                self.in_pem = false;
                let rest = &line[m.end()..];
                if !rest.iter().all(u8::is_ascii_whitespace) {
                    out.extend_from_slice(&d.apply(rest));
                }
            }
            return;
        }
        if memchr::memmem::find(line, b"-----BEGIN").is_some()
            && let Some(b) = d.pem_begin.find(line)
            && !d.pem_end.is_match(&line[b.end()..])
        {
            self.in_pem = true;
            out.extend_from_slice(&d.apply(&line[..b.start()]));
            out.extend_from_slice(b"[masked:private-key]\n");
            return;
        }
        out.extend_from_slice(&d.apply(line));
    }
}

/// What is masked in which responses: built once from `proxy.masking`.
pub struct Masking {
    detectors: Option<Arc<Detectors>>,
    fingerprint: Option<ring::hmac::Key>,
    rules: Vec<ResourceRule>,
    /// Shared plans for the common cases (no configured rule applies).
    secrets: Arc<Plan>,
    others: Arc<Plan>,
}

/// Configured paths for some resources.
#[derive(Debug, Clone)]
pub struct ResourceRule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub paths: Vec<(Path, Encoding)>,
}

impl ResourceRule {
    fn matches(&self, group: &str, resource: &str) -> bool {
        let any = |v: &[String], x: &str| v.iter().any(|s| s == "*" || s == x);
        any(&self.api_groups, group) && any(&self.resources, resource)
    }
}

/// How a response body is treated.
pub enum BodyMasker {
    Json(JsonMasker),
    Text(TextMasker),
}

impl BodyMasker {
    pub fn feed(&mut self, b: &[u8]) -> Result<Vec<u8>, MaskError> {
        match self {
            BodyMasker::Json(m) => m.feed(b),
            BodyMasker::Text(m) => Ok(m.feed(b)),
        }
    }
    pub fn finish(self) -> Result<Vec<u8>, MaskError> {
        match self {
            BodyMasker::Json(m) => m.finish(),
            BodyMasker::Text(m) => Ok(m.finish()),
        }
    }
}

/// The decision for one response.
pub enum ForResponse {
    /// Nothing to inspect (no body, or a schema document).
    Pass,
    Mask(BodyMasker),
    /// A body that cannot be inspected: refused, with the reason.
    Refuse(Unmaskable),
}

/// Why a response body cannot be inspected for masking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unmaskable {
    /// A content encoding (gzip, ...).
    #[error("the API server sent a {0} encoded body, which Portcullis cannot inspect for masking")]
    Encoded(String),
    /// Neither JSON nor text (protobuf, ...); `no content type` when there is none.
    #[error(
        "the API server answered with {0}, which Portcullis cannot inspect for masking; request application/json"
    )]
    MediaType(String),
}

impl Masking {
    pub fn new(
        detectors: bool,
        fingerprint: Option<ring::hmac::Key>,
        rules: Vec<ResourceRule>,
    ) -> Self {
        let detectors = detectors.then(|| Arc::new(Detectors::new()));
        Masking {
            secrets: Arc::new(Plan::new(
                Plan::secret_paths(),
                detectors.clone(),
                fingerprint.clone(),
            )),
            others: Arc::new(Plan::new(
                Vec::new(),
                detectors.clone(),
                fingerprint.clone(),
            )),
            detectors,
            fingerprint,
            rules,
        }
    }

    /// The plan for a request's response; `None` for the server's schema documents
    /// (OpenAPI), which describe types and carry no object data, and are served as the
    /// client asked (often protobuf).
    pub fn plan(&self, info: &RequestInfo) -> Option<Arc<Plan>> {
        if !info.is_resource_request
            && (info.path == "/openapi/v2" || info.path.starts_with("/openapi/v3"))
        {
            return None;
        }
        let secret = info.api_group.is_empty() && info.resource == "secrets";
        let extra: Vec<&ResourceRule> = if info.is_resource_request {
            self.rules
                .iter()
                .filter(|r| r.matches(&info.api_group, &info.resource))
                .collect()
        } else {
            Vec::new()
        };
        if extra.is_empty() {
            return Some(if secret {
                self.secrets.clone()
            } else {
                self.others.clone()
            });
        }
        let mut paths = if secret {
            Plan::secret_paths()
        } else {
            Vec::new()
        };
        paths.extend(extra.into_iter().flat_map(|r| r.paths.iter().cloned()));
        Some(Arc::new(Plan::new(
            paths,
            self.detectors.clone(),
            self.fingerprint.clone(),
        )))
    }

    /// How to treat a response with these headers under `plan`.
    pub fn for_response(
        &self,
        plan: Option<&Arc<Plan>>,
        status: http::StatusCode,
        headers: &http::HeaderMap,
        head_request: bool,
    ) -> ForResponse {
        let Some(plan) = plan else {
            return ForResponse::Pass;
        };
        let no_body = head_request
            || status == http::StatusCode::NO_CONTENT
            || status == http::StatusCode::NOT_MODIFIED
            || headers
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() == b"0");
        if no_body {
            return ForResponse::Pass;
        }
        if let Some(enc) = headers.get(http::header::CONTENT_ENCODING)
            && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            return ForResponse::Refuse(Unmaskable::Encoded(
                String::from_utf8_lossy(enc.as_bytes()).into_owned(),
            ));
        }
        let media = media_type(
            headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
        );
        if is_json(&media) {
            ForResponse::Mask(BodyMasker::Json(JsonMasker::new(plan.clone())))
        } else if media == "text/plain" {
            match &self.detectors {
                Some(d) => ForResponse::Mask(BodyMasker::Text(TextMasker::new(d.clone()))),
                None => ForResponse::Pass,
            }
        } else {
            ForResponse::Refuse(Unmaskable::MediaType(if media.is_empty() {
                "no content type".into()
            } else {
                media
            }))
        }
    }
}

/// The agent's Accept header with every encoding the daemon cannot mask (protobuf,
/// YAML) asked for as JSON instead, parameters kept (`as=Table;g=meta.k8s.io;v=v1`).
pub fn json_accept(v: &http::HeaderValue) -> http::HeaderValue {
    let Ok(s) = v.to_str() else {
        return http::HeaderValue::from_static("application/json");
    };
    let mut out = Vec::new();
    for entry in s.split(',') {
        let entry = entry.trim();
        let (media, params) = entry.split_once(';').unwrap_or((entry, ""));
        let media = media.trim().to_ascii_lowercase();
        let json = match media.as_str() {
            "application/vnd.kubernetes.protobuf" | "application/yaml" => "application/json",
            _ => {
                if !out.iter().any(|e| e == entry) {
                    out.push(entry.to_owned());
                }
                continue;
            }
        };
        let e = if params.is_empty() {
            json.to_owned()
        } else {
            format!("{json};{params}")
        };
        if !out.contains(&e) {
            out.push(e);
        }
    }
    http::HeaderValue::from_str(&out.join(","))
        .unwrap_or_else(|_| http::HeaderValue::from_static("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets_plan() -> Arc<Plan> {
        Arc::new(Plan::new(
            Plan::secret_paths(),
            Some(Arc::new(Detectors::new())),
            None,
        ))
    }

    fn mask_chunks(plan: &Arc<Plan>, body: &[u8], chunk: usize) -> Vec<u8> {
        let mut m = JsonMasker::new(plan.clone());
        let mut out = Vec::new();
        for c in body.chunks(chunk.max(1)) {
            out.extend(m.feed(c).unwrap());
        }
        out.extend(m.finish().unwrap());
        out
    }

    fn mask(plan: &Arc<Plan>, body: &str) -> String {
        let whole = mask_chunks(plan, body.as_bytes(), body.len());
        // Every chunking gives the same result.
        for chunk in [1, 2, 3, 7, 64] {
            assert_eq!(
                mask_chunks(plan, body.as_bytes(), chunk),
                whole,
                "chunk size {chunk}"
            );
        }
        String::from_utf8(whole).unwrap()
    }

    const B64_PLACEHOLDER: &str = "cG9ydGN1bGxpcy1tYXNrZWQ=";

    #[test]
    fn secret_names_are_recognised_by_every_ending() {
        for e in SECRET_KEY_ENDINGS {
            assert!(is_secret_name(e.as_bytes()), "{e}");
            assert!(
                is_secret_name(format!("DB_{}", e.to_uppercase()).as_bytes()),
                "{e}"
            );
        }
        for k in ["secretName", "name", "value", "tokenRef", ""] {
            assert!(!is_secret_name(k.as_bytes()), "{k}");
        }
    }

    #[test]
    fn placeholder_constants_are_the_placeholder() {
        use base64::Engine;
        assert_eq!(PLACEHOLDER_JSON, format!("\"{PLACEHOLDER}\""));
        let b64 = base64::engine::general_purpose::STANDARD.encode(PLACEHOLDER);
        assert_eq!(PLACEHOLDER_B64_JSON, format!("\"{b64}\""));
        assert_eq!(B64_PLACEHOLDER, b64);
    }

    #[test]
    fn secret_get_list_watch_and_table_are_masked() {
        let p = secrets_plan();
        let get = r#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"s","resourceVersion":"1234567890123456"},"data":{"a":"Q0FOQVJZ","b\"x":"Q0FOQVJZMg=="},"stringData":{"c":"CANARY3"},"type":"Opaque"}"#;
        let out = mask(&p, get);
        assert!(
            !out.contains("Q0FOQVJZ") && !out.contains("CANARY3"),
            "{out}"
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["data"]["a"], B64_PLACEHOLDER);
        assert_eq!(v["data"]["b\"x"], B64_PLACEHOLDER);
        assert_eq!(v["stringData"]["c"], PLACEHOLDER);
        assert_eq!(v["metadata"]["resourceVersion"], "1234567890123456");
        // Valid base64 for clients that decode it.
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(B64_PLACEHOLDER)
                .unwrap(),
            PLACEHOLDER.as_bytes()
        );

        let list = r#"{"kind":"SecretList","items":[{"metadata":{"name":"a"},"data":{"k":"Q0FOQVJZ"}},{"metadata":{"name":"b"},"data":{"k":"Q0FOQVJZ"}}]}"#;
        assert!(!mask(&p, list).contains("Q0FOQVJZ"));
        let watch = "{\"type\":\"ADDED\",\"object\":{\"data\":{\"k\":\"Q0FOQVJZ\"}}}\n{\"type\":\"MODIFIED\",\"object\":{\"data\":{\"k\":\"Q0FOQVJZ\"}}}\n";
        let out = mask(&p, watch);
        assert!(!out.contains("Q0FOQVJZ"));
        assert_eq!(out.lines().count(), 2);
        let table = r#"{"kind":"Table","rows":[{"cells":["a","Opaque",1],"object":{"kind":"Secret","data":{"k":"Q0FOQVJZ"}}}]}"#;
        let out = mask(&p, table);
        assert!(
            !out.contains("Q0FOQVJZ") && out.contains(r#"["a","Opaque",1]"#),
            "{out}"
        );
        let watched_table = r#"{"type":"ADDED","object":{"kind":"Table","rows":[{"cells":[],"object":{"data":{"k":"Q0FOQVJZ"}}}]}}"#;
        assert!(!mask(&p, watched_table).contains("Q0FOQVJZ"));
    }

    #[test]
    fn last_applied_annotation_is_masked_inside() {
        let p = secrets_plan();
        let applied = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s", "namespace": "e2e"},
            "data": {"k": "Q0FOQVJZ"}, "stringData": {"p": "CANARY-TEXT"}
        })
        .to_string();
        let body = serde_json::json!({
            "kind": "Secret",
            "metadata": {"name": "s", "annotations": {LAST_APPLIED: applied}},
            "data": {"k": "Q0FOQVJZ"}
        })
        .to_string();
        let out = mask(&p, &body);
        assert!(
            !out.contains("Q0FOQVJZ") && !out.contains("CANARY-TEXT"),
            "{out}"
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let inner: serde_json::Value =
            serde_json::from_str(v["metadata"]["annotations"][LAST_APPLIED].as_str().unwrap())
                .unwrap();
        assert_eq!(inner["data"]["k"], B64_PLACEHOLDER);
        assert_eq!(inner["metadata"]["namespace"], "e2e");
    }

    #[test]
    fn configmap_and_env_credentials_are_found_by_detectors_and_names() {
        let p = Arc::new(Plan::new(
            Vec::new(),
            Some(Arc::new(Detectors::new())),
            None,
        ));
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlc2lnbmF0dXJl";
        let body = serde_json::json!({
            "kind": "ConfigMap",
            "data": {
                "app.properties": "db.host=x\ndb.password=hunter2\nmode=fast",
                "key.pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIEabc\n-----END RSA PRIVATE KEY-----\nafter",
                "jwt": format!("Bearer {jwt}"),
                "aws": "AKIAIOSFODNN7EXAMPLE",
                "card": "paid with 4111 1111 1111 1111 today",
                "notcard": "4111 1111 1111 1112",
                "clientSecret": "s3cr3t-value",
                "secretName": "my-secret",
                "yaml": "token: abc.def\nuser: x",
            },
            "spec": {"containers": [{"env": [
                {"name": "DB_PASSWORD", "value": "hunter3"},
                {"name": "MODE", "value": "fast"}
            ]}]}
        })
        .to_string();
        let out = mask(&p, &body);
        for leaked in [
            "hunter2",
            "MIIEabc",
            jwt,
            "AKIAIOSFODNN7EXAMPLE",
            "4111 1111 1111 1111",
            "s3cr3t",
            "abc.def",
            "hunter3",
        ] {
            assert!(!out.contains(leaked), "{leaked} leaked: {out}");
        }
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["data"]["app.properties"],
            "db.host=x\ndb.password=[masked]\nmode=fast"
        );
        assert_eq!(v["data"]["key.pem"], "[masked:private-key]\nafter");
        assert_eq!(
            v["data"]["notcard"], "4111 1111 1111 1112",
            "fails Luhn: kept"
        );
        assert_eq!(
            v["data"]["secretName"], "my-secret",
            "a reference, not a value"
        );
        assert_eq!(v["spec"]["containers"][0]["env"][1]["value"], "fast");
    }

    #[test]
    fn configured_paths_and_fingerprints() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k");
        let p = Arc::new(Plan::new(
            vec![
                ("spec.connection.*".parse().unwrap(), Encoding::Text),
                (
                    "metadata.annotations[example.com/dsn]".parse().unwrap(),
                    Encoding::Text,
                ),
            ],
            None,
            Some(key),
        ));
        let body = r#"{"items":[{"metadata":{"annotations":{"example.com/dsn":"pg://u:CANARY@h","other":"x"}},"spec":{"connection":{"host":"CANARY1","port":5432},"keep":"y"}},{"spec":{"connection":{"host":"CANARY1"}}}]}"#;
        let out = mask(&p, body);
        assert!(!out.contains("CANARY"), "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let a = v["items"][0]["spec"]["connection"]["host"]
            .as_str()
            .unwrap();
        let b = v["items"][1]["spec"]["connection"]["host"]
            .as_str()
            .unwrap();
        assert!(a.starts_with("portcullis-masked:") && a == b, "{a} {b}");
        assert_eq!(v["items"][0]["spec"]["connection"]["port"], 0);
        assert_eq!(v["items"][0]["spec"]["keep"], "y");
        assert_eq!(v["items"][0]["metadata"]["annotations"]["other"], "x");
    }

    #[test]
    fn invalid_json_is_an_error_never_passed_through() {
        let p = secrets_plan();
        let mut m = JsonMasker::new(p.clone());
        assert!(matches!(
            m.feed(b"{\"data\":{\"k\":\"abc\"}}}"),
            Err(MaskError::Syntax { .. })
        ));
        let mut m = JsonMasker::new(p.clone());
        m.feed(b"{\"data\":{\"k\":\"ab").unwrap();
        assert!(m.finish().is_err());
        let mut m = JsonMasker::new(p.clone());
        assert!(m.feed(b"<html>").is_err());
        let mut m = JsonMasker::new(p.clone());
        assert_eq!(m.feed(&[b'['; MAX_DEPTH + 1]), Err(MaskError::TooDeep));
    }

    #[test]
    fn paths_parse_with_brackets_and_report_errors() {
        let p: Path = "metadata.annotations[a.b/c].x".parse().unwrap();
        assert_eq!(p.0.len(), 4);
        assert!("a..b".parse::<Path>().is_err());
        assert!("a[b".parse::<Path>().is_err());
        assert!("".parse::<Path>().is_err());
    }

    #[test]
    fn log_lines_are_masked_incrementally_and_pem_blocks_dropped() {
        let d = Arc::new(Detectors::new());
        let log = "start\nconnecting with password=hunter2 now\n-----BEGIN PRIVATE KEY-----\nMIIEvQ\nABCD\n-----END PRIVATE KEY-----\nafter AKIAIOSFODNN7EXAMPLE\n-----BEGIN CERTIFICATE----- token: abc\nlast pwd=x\npartial tok";
        // Every chunking gives the same result: lines cut anywhere, several per chunk.
        for size in [1, 5, 7, 13, 40, 64, log.len()] {
            let mut m = TextMasker::new(d.clone());
            let mut out = Vec::new();
            for c in log.as_bytes().chunks(size) {
                out.extend(m.feed(c));
            }
            out.extend(m.finish());
            let s = String::from_utf8(out).unwrap();
            assert_eq!(
                s,
                "start\nconnecting with password=[masked] now\n[masked:private-key]\nafter [masked:aws-key]\n-----BEGIN CERTIFICATE----- token: [masked]\nlast pwd=[masked]\npartial tok",
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn accept_asks_json_instead_of_protobuf_keeping_parameters() {
        let v = http::HeaderValue::from_static(
            "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        );
        assert_eq!(
            json_accept(&v),
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        );
        let v = http::HeaderValue::from_static("application/vnd.kubernetes.protobuf");
        assert_eq!(json_accept(&v), "application/json");
    }

    #[test]
    fn responses_that_cannot_be_inspected_are_refused() {
        let m = Masking::new(true, None, Vec::new());
        let plan = m.others.clone();
        let ok = http::StatusCode::OK;
        let h = |pairs: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let kind = |r: ForResponse| match r {
            ForResponse::Pass => "pass",
            ForResponse::Mask(BodyMasker::Json(_)) => "json",
            ForResponse::Mask(BodyMasker::Text(_)) => "text",
            ForResponse::Refuse(_) => "refuse",
        };
        let json = h(&[("content-type", "application/json;stream=watch")]);
        assert_eq!(kind(m.for_response(Some(&plan), ok, &json, false)), "json");
        let pb = h(&[("content-type", "application/vnd.kubernetes.protobuf")]);
        assert_eq!(kind(m.for_response(Some(&plan), ok, &pb, false)), "refuse");
        let gz = h(&[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ]);
        assert_eq!(kind(m.for_response(Some(&plan), ok, &gz, false)), "refuse");
        let text = h(&[("content-type", "text/plain; charset=utf-8")]);
        assert_eq!(kind(m.for_response(Some(&plan), ok, &text, false)), "text");
        assert_eq!(kind(m.for_response(None, ok, &pb, false)), "pass");
        assert_eq!(kind(m.for_response(Some(&plan), ok, &pb, true)), "pass");
    }

    /// Deterministic pseudo-random strings over an alphabet that makes the edge cases
    /// (digit runs, separators, keywords, quotes) common.
    fn fuzz_inputs(alphabet: &[&str], n: usize) -> Vec<Vec<u8>> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = (x % 40) as usize;
                (0..len)
                    .flat_map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        alphabet[(x % alphabet.len() as u64) as usize]
                            .bytes()
                            .collect::<Vec<_>>()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn skipping_card_prefilter_agrees_with_a_byte_by_byte_scan() {
        fn reference(s: &[u8]) -> bool {
            let (mut run, mut sep, mut max) = (0, false, 0);
            for &b in s {
                if b.is_ascii_digit() {
                    run += 1;
                    sep = false;
                } else if (b == b' ' || b == b'-') && !sep {
                    sep = true;
                } else {
                    run = 0;
                    sep = b == b' ' || b == b'-';
                }
                max = std::cmp::max(max, run);
            }
            max >= 13
        }
        let alphabet = ["1", "23", "4567", " ", "-", "x", "--", "  ", "8901", "Z"];
        let inputs = fuzz_inputs(&alphabet, 20_000);
        let mut positives = 0;
        for s in &inputs {
            let want = reference(s);
            positives += usize::from(want);
            assert_eq!(card_candidate(s), want, "{:?}", String::from_utf8_lossy(s));
        }
        assert!(positives > 500, "the inputs exercise few runs: {positives}");
    }

    #[test]
    fn every_pair_keyword_is_found_before_every_separator_form() {
        let pair = Regex::new(PAIR).unwrap();
        let tails = pair_tails();
        for k in PAIR_KEYWORDS {
            for form in ["=", ":", " = ", "\"=", "\\\":", "'\u{a0}="] {
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

    #[test]
    fn pairs_found_at_keywords_match_a_plain_replace_all() {
        let d = Detectors::new();
        let plain = Regex::new(PAIR).unwrap();
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
            let (_, keys) = d.scan(&s);
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

    #[test]
    fn card_candidates_need_thirteen_grouped_digits() {
        assert!(card_candidate(b"pay 4111 1111 1111 1111 now"));
        assert!(card_candidate(b"4111-1111-1111-1111"));
        assert!(card_candidate(b"4111111111111"));
        assert!(!card_candidate(
            b"2026-11-22T10:00:00Z status=200 duration=12ms"
        ));
        assert!(
            !card_candidate(b"4111  1111 1111 1111"),
            "double separator breaks a run"
        );
    }

    #[test]
    fn luhn_checks() {
        assert!(luhn(b"4111111111111111"));
        assert!(luhn(b"4111-1111-1111-1111"));
        assert!(!luhn(b"4111111111111112"));
        assert!(!luhn(b"1234"));
    }
}
