//! Where values are masked by position: paths below an object (`data.*`,
//! `metadata.annotations[example.com/dsn]`), the places objects sit in the responses
//! the API server sends, and the keys whose names say what their values are.
use super::MaskError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(Vec<u8>),
    Any,
}

/// A path below an object, e.g. `data.*` or `metadata.annotations[example.com/key]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path(pub(super) Vec<Seg>);

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
pub(super) const ROOTS: &[&[Option<&str>]] = &[
    &[],
    &[Some("items"), None],
    &[Some("object")],
    &[Some("object"), Some("items"), None],
    &[Some("rows"), None, Some("object")],
    &[Some("object"), Some("rows"), None, Some("object")],
];

/// Key names whose string values are credentials (compared case-insensitively, as the
/// whole key or its ending: `clientSecret`, `DB_PASSWORD`, `api-key`). Each ends in
/// d, t, n, y, s or l (`names::is_credential_name` relies on it; tested).
pub(super) const SECRET_KEY_ENDINGS: &[&str] = &[
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
pub(super) const EXEMPT_KEYS: &[&[u8]] = &[
    b"resourceVersion",
    b"uid",
    b"continue",
    b"selfLink",
    b"creationTimestamp",
    b"generateName",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_are_recognised_by_every_ending() {
        use crate::mask::is_credential_name;
        for e in SECRET_KEY_ENDINGS {
            assert!(
                matches!(
                    e.as_bytes().last(),
                    Some(b'd' | b't' | b'n' | b'y' | b's' | b'l')
                ),
                "{e}"
            );
            assert!(is_credential_name(e.as_bytes()), "{e}");
            assert!(
                is_credential_name(format!("DB_{}", e.to_uppercase()).as_bytes()),
                "{e}"
            );
        }
        for k in ["secretName", "name", "value", "tokenRef", ""] {
            assert!(!is_credential_name(k.as_bytes()), "{k}");
        }
    }

    #[test]
    fn paths_parse_with_brackets_and_report_errors() {
        let p: Path = "metadata.annotations[a.b/c].x".parse().unwrap();
        assert_eq!(p.0.len(), 4);
        assert!("a..b".parse::<Path>().is_err());
        assert!("a[b".parse::<Path>().is_err());
        assert!("".parse::<Path>().is_err());
    }
}
