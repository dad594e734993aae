//! Names that say their value is a credential: object keys (`clientSecret`,
//! `DB_PASSWORD`), the `name` beside an env `value`, command-line flags
//! (`--db-password`). One rule for all three, so a credential is recognised by its name
//! wherever a name stands next to it.
//!
//! A name is a credential's when
//! - it ends in one of [`SECRET_KEY_ENDINGS`] (`dbpassword`, `x-api-key`), or
//! - split into words (`_`, `-`, `.`, `/`, camelCase), one word is a credential word
//!   ([`STRONG`]: `password`, `secret`, `token`, ...) and the last word does not say the
//!   value is about the credential rather than the credential itself ([`ABOUT`]:
//!   `secretName`, `TOKEN_FILE`, `passwordSecretRef`, `tokenExpirationSeconds`), or
//! - its last word is a weak one ([`WEAK_LAST`]: `pass`, `pwd`, `pw`) after another word
//!   (`DB_PASS`, `MYSQL_PWD`; not `PWD`, the shell's working directory), or
//! - its last word is `key` after a word that makes it a credential ([`KEY_KINDS`]:
//!   `apiKey`, `SSH_KEY`, `signingKey`; not `topologyKey`, `kubeletConfigKey`), or, for
//!   an environment-style name (upper case and `_`), after any word but a few
//!   ([`NOT_KEY_KINDS`]: `STRIPE_KEY` yes, `PUBLIC_KEY` no).
use super::paths::SECRET_KEY_ENDINGS;

/// Words that make a name a credential's wherever they stand.
const STRONG: &[&str] = &[
    "password",
    "passwords",
    "passwd",
    "passphrase",
    "secret",
    "secrets",
    "token",
    "tokens",
    "credential",
    "credentials",
    "creds",
    "apikey",
    "apikeys",
    "privatekey",
    "secretkey",
    "accesskey",
    "authkey",
];

/// Words that make a name a credential's only as its last word, after another word.
const WEAK_LAST: &[&str] = &["pass", "pwd", "pw"];

/// Last words that say the value is about a credential, not the credential: where it
/// is (`secretName`, `TOKEN_FILE`, `tokenUrl`), what it is (`tokenType`), how long it
/// lives (`tokenExpirationSeconds`), whether it is on (`passwordEnabled`).
const ABOUT: &[&str] = &[
    "name",
    "names",
    "ref",
    "refs",
    "file",
    "files",
    "path",
    "paths",
    "dir",
    "namespace",
    "url",
    "uri",
    "endpoint",
    "header",
    "prefix",
    "type",
    "kind",
    "class",
    "format",
    "version",
    "enabled",
    "disabled",
    "required",
    "mode",
    "policy",
    "ttl",
    "seconds",
    "expiration",
    "duration",
    "timeout",
    "length",
    "len",
    "size",
    "count",
    "audience",
    "audiences",
    "issuer",
    "provider",
    "source",
    "selector",
    "id",
    "requests",
    "rotation",
];

/// Words before `key` that make it a credential (`apiKey`, `SSH_KEY`, `signingKey`).
const KEY_KINDS: &[&str] = &[
    "api",
    "access",
    "secret",
    "private",
    "ssh",
    "signing",
    "encryption",
    "master",
    "client",
    "auth",
    "license",
    "hmac",
    "account",
    "storage",
    "session",
    "service",
    "app",
    "admin",
    "crypt",
];

/// Words before `KEY` in an environment-style name that do not make it a credential.
const NOT_KEY_KINDS: &[&str] = &[
    "public",
    "pub",
    "partition",
    "sort",
    "primary",
    "routing",
    "cache",
    "topology",
    "config",
    "label",
    "node",
    "group",
    "idempotency",
    "object",
    "foreign",
];

/// Longest name split into words; longer names are judged by their ending only.
const MAX_NAME: usize = 128;

/// Whether `name` names a credential (see the module documentation).
pub fn is_credential_name(name: &[u8]) -> bool {
    // Every word and ending the rules know holds one of a few letter pairs: most
    // names (`status`, `duration`, `image`) are out after one pass.
    if name.len() < 3 || !might_hold_a_word(name) {
        return false;
    }
    if ends_in_secret(name) {
        return true;
    }
    if name.len() > MAX_NAME {
        return false;
    }
    let (spans, n) = word_spans(name);
    if n == 0 {
        return false;
    }
    let word = |i: usize| &name[spans[i].0..spans[i].1];
    let is = |w: &[u8], set: &[&str]| set.iter().any(|s| w.eq_ignore_ascii_case(s.as_bytes()));
    let last = word(n - 1);
    if is(last, ABOUT) {
        return false;
    }
    if (0..n).any(|i| is(word(i), STRONG)) {
        return true;
    }
    if n < 2 {
        return false;
    }
    let prev = word(n - 2);
    if is(last, WEAK_LAST) {
        return true;
    }
    if last.eq_ignore_ascii_case(b"key") {
        return is(prev, KEY_KINDS) || (env_style(name) && !is(prev, NOT_KEY_KINDS));
    }
    false
}

/// [`is_credential_name`] for object keys, remembered: a list repeats the same few
/// dozen keys in every item, and a key is judged for each value under it. Direct
/// mapped, keyed by the whole name (names longer than a slot are judged each time).
/// The judgement depends on the name alone, so one memo per thread serves every
/// answer masked on it: a small answer's keys (`apiVersion`, `metadata`, `name`, …)
/// are judged once per thread, not once per answer, and no answer allocates one.
#[derive(Default)]
pub(super) struct NameMemo {
    slots: Vec<MemoSlot>,
}

/// Longest name a [`NameMemo`] slot holds.
const MEMO_NAME: usize = 30;
const MEMO_SLOTS: usize = 64;

#[derive(Clone, Copy)]
struct MemoSlot {
    /// 0: empty (no name is).
    len: u8,
    secret: bool,
    name: [u8; MEMO_NAME],
}

thread_local! {
    static THREAD_MEMO: std::cell::RefCell<NameMemo> = std::cell::RefCell::new(NameMemo::default());
}

/// [`is_credential_name`] through this thread's [`NameMemo`].
pub(super) fn is_credential_key(name: &[u8]) -> bool {
    THREAD_MEMO.with(|m| match m.try_borrow_mut() {
        Ok(mut memo) => memo.is_credential_name(name),
        // Not reentrant, but never wrong: judged without the memo.
        Err(_) => is_credential_name(name),
    })
}

impl NameMemo {
    pub(super) fn is_credential_name(&mut self, name: &[u8]) -> bool {
        let (Some(&first), Some(&last)) = (name.first(), name.last()) else {
            return false;
        };
        // As short a name as `k` is out at once, without a slot.
        if name.len() < 3 {
            return false;
        }
        if name.len() > MEMO_NAME {
            return is_credential_name(name);
        }
        if self.slots.is_empty() {
            self.slots = vec![
                MemoSlot {
                    len: 0,
                    secret: false,
                    name: [0; MEMO_NAME],
                };
                MEMO_SLOTS
            ];
        }
        let mix = (name.len() as u32)
            ^ u32::from(first) << 5
            ^ u32::from(name[name.len() / 2]) << 10
            ^ u32::from(last) << 15;
        let slot = &mut self.slots[(mix.wrapping_mul(0x9e37_79b9) >> 26) as usize];
        if usize::from(slot.len) == name.len() && slot.name[..name.len()] == *name {
            return slot.secret;
        }
        let secret = is_credential_name(name);
        slot.len = name.len() as u8;
        slot.secret = secret;
        slot.name[..name.len()].copy_from_slice(name);
        secret
    }
}

/// A command-line flag naming a credential, with its value in the next argument:
/// `--db-password`, `-token`, `--api-key` (not `--password-file`, not `--db-password=x`,
/// whose value the text detectors find).
pub fn is_credential_flag(arg: &[u8]) -> bool {
    let name = match arg {
        [b'-', b'-', rest @ ..] => rest,
        [b'-', rest @ ..] => rest,
        _ => return false,
    };
    name.len() >= 3
        && name[0].is_ascii_alphanumeric()
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && is_credential_name(name)
}

/// The built-in endings, compared case-insensitively (`DBPASSWORD`, `x-api-key`).
fn ends_in_secret(key: &[u8]) -> bool {
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

/// Letter runs of which every word and ending the rules know holds one, compared
/// ASCII case-insensitively (tested against the lists): `pas`, `pw`, `sec`, `tok`,
/// `cre`, `key`. A name without one is no credential's; the detectors use the same
/// check before looking at a separator's name (`detectors::marked_name_before`).
#[cfg(test)]
pub(super) const NAME_MARKERS: &[&str] = &["pas", "pw", "sec", "tok", "cre", "key"];

/// Three bytes in a window, the first in bits 16..24.
const fn w3(m: &[u8; 3]) -> u32 {
    ((m[0] as u32) << 16) | ((m[1] as u32) << 8) | m[2] as u32
}

/// Whether three consecutive bytes of a name, lower-cased with `| 0x20` (which maps
/// no other byte onto a letter) and packed as by [`w3`], are a marker or begin or end
/// with `pw`. Compared without branching: it runs on every byte of a name.
pub(super) fn marker_window(w: u32) -> bool {
    const PW: u32 = w3(b"\0pw");
    (w >> 8 == PW)
        | (w & 0xffff == PW)
        | (w == w3(b"pas"))
        | (w == w3(b"sec"))
        | (w == w3(b"tok"))
        | (w == w3(b"cre"))
        | (w == w3(b"key"))
}

/// Whether two lower-cased bytes are how a marker begins (every marker's first two
/// letters; tested): a cheaper first look than [`marker_window`] where names are
/// walked from the end, which meets a marker's first letter last.
pub(super) fn marker_start(a: u8, b: u8) -> bool {
    matches!(
        (a, b),
        (b'p', b'a' | b'w') | (b's', b'e') | (b't', b'o') | (b'c', b'r') | (b'k', b'e')
    )
}

/// A quick no: whether `name` holds a marker ([`marker_window`]).
fn might_hold_a_word(name: &[u8]) -> bool {
    let mut w = 0u32;
    name.iter().any(|&b| {
        w = ((w << 8) | u32::from(b | 0x20)) & 0x00ff_ffff;
        marker_window(w)
    })
}

/// An environment-variable-style name: upper case letters, digits and `_`.
fn env_style(name: &[u8]) -> bool {
    name.iter()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
}

/// Most words a name is split into; the rest of a longer name is one word.
const MAX_WORDS: usize = 16;

/// Where the words of `name` are: split at separators and camelCase boundaries
/// (`dbPassword` → db, Password; `APIKey` → API, Key; `DB_PASS` → DB, PASS).
fn word_spans(name: &[u8]) -> ([(usize, usize); MAX_WORDS], usize) {
    let mut spans = [(0, 0); MAX_WORDS];
    let mut n = 0;
    let mut start: Option<usize> = None;
    for (i, &b) in name.iter().enumerate() {
        let boundary = if !b.is_ascii_alphanumeric() {
            true
        } else if b.is_ascii_uppercase() && start.is_some() && n + 1 < MAX_WORDS {
            let prev = name[i - 1];
            let next_lower = name.get(i + 1).is_some_and(u8::is_ascii_lowercase);
            prev.is_ascii_lowercase()
                || prev.is_ascii_digit()
                || (prev.is_ascii_uppercase() && next_lower)
        } else {
            false
        };
        if boundary && let Some(s) = start.take() {
            spans[n] = (s, i);
            n += 1;
            if n == MAX_WORDS {
                return (spans, n);
            }
        }
        if b.is_ascii_alphanumeric() && start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        spans[n] = (s, name.len());
        n += 1;
    }
    (spans, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::testgen::Rng;

    /// `marker_start` lets every marker's first two letters through, and not others.
    #[test]
    fn every_marker_begins_as_marker_start_says() {
        for m in NAME_MARKERS {
            let m = m.as_bytes();
            assert!(marker_start(m[0], m[1]), "{}", String::from_utf8_lossy(m));
        }
        assert!(!marker_start(b's', b't') && !marker_start(b'p', b'o'));
    }

    /// The memo gives what the rule gives, for names seen once or again, colliding or
    /// not, short or longer than a slot.
    #[test]
    fn the_name_memo_agrees_with_the_rule() {
        let parts = [
            "db", "Password", "PASS", "_", "-", "name", "Secret", "key", "api", "token", "File",
            "x", "status", "SSH", "Key", "pwd", "é", "creds", "public",
        ];
        let mut memo = NameMemo::default();
        let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
        let mut secrets = 0;
        for _ in 0..40_000 {
            let name = rng.joined(&parts, 5);
            let want = is_credential_name(&name);
            secrets += usize::from(want);
            assert_eq!(
                memo.is_credential_name(&name),
                want,
                "{}",
                String::from_utf8_lossy(&name)
            );
        }
        assert!(secrets > 5_000, "few credential names generated: {secrets}");
        // The thread's memo, shared by every masker on the thread, agrees too.
        let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let name = rng.joined(&parts, 5);
            assert_eq!(
                is_credential_key(&name),
                is_credential_name(&name),
                "{}",
                String::from_utf8_lossy(&name)
            );
        }
    }

    fn words(name: &str) -> Vec<&str> {
        let (spans, n) = word_spans(name.as_bytes());
        spans[..n].iter().map(|&(s, e)| &name[s..e]).collect()
    }

    #[test]
    fn words_split_at_separators_and_camel_case() {
        assert_eq!(words("dbPassword"), ["db", "Password"]);
        assert_eq!(words("APIKey"), ["API", "Key"]);
        assert_eq!(words("DB_PASS"), ["DB", "PASS"]);
        assert_eq!(
            words("example.com/db-token"),
            ["example", "com", "db", "token"]
        );
        assert_eq!(
            words("gmsaCredentialSpecName"),
            ["gmsa", "Credential", "Spec", "Name"]
        );
        assert_eq!(words("--x"), ["x"]);
    }

    #[test]
    fn credential_names() {
        for n in [
            "password",
            "DB_PASSWORD",
            "dbPassword",
            "clientSecret",
            "token",
            "GITHUB_TOKEN",
            "api-key",
            "apiKey",
            "APIKey",
            "OPENAI_API_KEY",
            "AWS_SECRET_ACCESS_KEY",
            "SECRET_KEY_BASE",
            "JWT_SECRET",
            "DB_PASS",
            "dbPass",
            "MYSQL_PWD",
            "REDIS_PW",
            "STRIPE_KEY",
            "SSH_KEY",
            "sshKey",
            "signingKey",
            "db.password",
            "example.com/db-password",
            "credentials",
            "REGISTRY_CREDS",
            "passphrase",
            "db-passwords",
        ] {
            assert!(is_credential_name(n.as_bytes()), "{n}");
        }
        for n in [
            "",
            "name",
            "value",
            "key",
            "KEY",
            "PWD",
            "pass",
            "bypass",
            "passThrough",
            "secretName",
            "SECRET_NAME",
            "secretRef",
            "secretKeyRef",
            "secretNamespace",
            "secretFile",
            "TOKEN_FILE",
            "passwordFile",
            "tokenExpirationSeconds",
            "serviceAccountName",
            "topologyKey",
            "kubeletConfigKey",
            "capacityKey",
            "pkixPublicKey",
            "PUBLIC_KEY",
            "CACHE_KEY",
            "keyring",
            "keyPath",
            "gmsaCredentialSpecName",
            "credentialBundlePath",
            "secretProviderClass",
            "image",
            "resourceVersion",
            "tokenRef",
        ] {
            assert!(!is_credential_name(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn every_listed_word_passes_the_quick_check() {
        for w in STRONG
            .iter()
            .chain(WEAK_LAST)
            .chain(SECRET_KEY_ENDINGS)
            .chain(["key"].iter())
        {
            assert!(might_hold_a_word(w.as_bytes()), "{w}");
        }
        for w in [
            "status", "user", "duration", "attempt", "pa", "se", "keY_", "PwD",
        ] {
            let holds = NAME_MARKERS
                .iter()
                .any(|m| w.to_ascii_lowercase().contains(m));
            assert_eq!(might_hold_a_word(w.as_bytes()), holds, "{w}");
        }
        // The window check is exactly the marker list, on every 3-byte window over
        // the markers' letters in both cases and a few others.
        let letters = b"pwasectokryPWASECTOKRY_-0@`P";
        let mut marked = 0;
        for &a in letters {
            for &b in letters {
                for &c in letters {
                    let low = [a | 0x20, b | 0x20, c | 0x20];
                    let text = [a, b, c].to_ascii_lowercase();
                    let want = NAME_MARKERS
                        .iter()
                        .any(|m| text.windows(m.len()).any(|x| x == m.as_bytes()));
                    assert_eq!(marker_window(w3(&low)), want, "{:?}", [a, b, c]);
                    marked += usize::from(want);
                }
            }
        }
        assert!(marked > 100, "{marked}");
    }

    #[test]
    fn credential_flags() {
        for f in [
            "--db-password",
            "--password",
            "-password",
            "--token",
            "--api-key",
            "--client-secret",
            "--bearer-token",
            "--db-pass",
            "--AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(is_credential_flag(f.as_bytes()), "{f}");
        }
        for f in [
            "--password-file",
            "--db-password=x",
            "--key",
            "--tls-private-key-file",
            "-p",
            "password",
            "--secret-name",
            "--",
            "---password",
            "--verbose",
        ] {
            assert!(!is_credential_flag(f.as_bytes()), "{f}");
        }
    }
}
