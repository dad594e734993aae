//! `${NAME}` in the config file: replaced by the environment variable NAME before
//! parsing, so one ConfigMap serves every node of a DaemonSet (the node's address,
//! name and the pod's UID come from the downward API as environment variables).
//! `$${` writes a literal `${`. An unset or malformed name is an error naming it.
//! Whole-line comments (`#` first) are left as they are, so a comment may mention
//! `${NAME}` (a comment after a value on the same line is not: YAML is not parsed here).

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("line {line}: `${{{name}}}` is not set in the environment")]
    Unset { line: usize, name: String },
    #[error("line {line}: `${{` starts a variable but `{text}` is not NAME}} (letters, digits, _)")]
    Malformed { line: usize, text: String },
}

/// The text with every `${NAME}` outside whole-line comments replaced by `lookup(NAME)`.
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, EnvError> {
    let mut out = String::with_capacity(text.len());
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if l.trim_start().starts_with('#') {
            out.push_str(l);
        } else {
            expand_line(l, i + 1, &lookup, &mut out)?;
        }
    }
    Ok(out)
}

fn expand_line(
    text: &str,
    line: usize,
    lookup: &impl Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), EnvError> {
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        if at > 0 && rest.as_bytes()[at - 1] == b'$' {
            // `$${` is an escaped literal.
            out.push_str(&rest[..at - 1]);
            out.push_str("${");
            rest = &rest[at + 2..];
            continue;
        }
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after.find('}');
        let name = end.map(|e| &after[..e]).filter(|n| {
            !n.is_empty()
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !n.starts_with(|c: char| c.is_ascii_digit())
        });
        let (Some(name), Some(end)) = (name, end) else {
            return Err(EnvError::Malformed {
                line,
                text: after.chars().take(24).collect(),
            });
        };
        let value = lookup(name).ok_or_else(|| EnvError::Unset {
            line,
            name: name.into(),
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(n: &str) -> Option<String> {
        match n {
            "HOST_IP" => Some("10.0.0.7".into()),
            "NODE_NAME" => Some("n1".into()),
            _ => None,
        }
    }

    #[test]
    fn replaces_names_and_keeps_the_rest() {
        let t = "listen:\n  ipv4: \"${HOST_IP}:15443\"\nname: ${NODE_NAME}-x $5\n";
        assert_eq!(
            expand(t, env).unwrap(),
            "listen:\n  ipv4: \"10.0.0.7:15443\"\nname: n1-x $5\n"
        );
        assert_eq!(expand("a $${HOST_IP} b", env).unwrap(), "a ${HOST_IP} b");
    }

    #[test]
    fn whole_line_comments_are_left_alone() {
        let t = "# ${NAME} comes from the environment\n  # ${ALSO}\nx: ${NODE_NAME}\n";
        assert_eq!(
            expand(t, env).unwrap(),
            "# ${NAME} comes from the environment\n  # ${ALSO}\nx: n1\n"
        );
    }

    #[test]
    fn unset_and_malformed_are_named_with_their_line() {
        assert_eq!(
            expand("a\nb: ${NOPE}\n", env),
            Err(EnvError::Unset {
                line: 2,
                name: "NOPE".into()
            })
        );
        assert!(matches!(
            expand("x: ${HOST-IP}", env),
            Err(EnvError::Malformed { line: 1, .. })
        ));
        assert!(matches!(
            expand("x: ${HOST_IP", env),
            Err(EnvError::Malformed { .. })
        ));
    }
}
