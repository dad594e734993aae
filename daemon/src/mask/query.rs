//! A request's query as the audit log keeps it: an exec's or attach's `command`
//! parameters are a command line (`kubectl exec p -- mysql --password hunter2`), so
//! they get the argv rules (the value after a credential flag), and every value the
//! detectors.
use super::{Masking, PLACEHOLDER, names::is_credential_flag};

impl Masking {
    /// `query` with credentials in its values masked; unchanged without detectors.
    pub fn mask_query(&self, query: &str) -> String {
        let Some(d) = &self.detectors else {
            return query.to_owned();
        };
        if query.is_empty() {
            return String::new();
        }
        let mut after_flag = false;
        let mut changed = false;
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| {
                let masked = if k == "command" {
                    let m = if after_flag {
                        PLACEHOLDER.to_owned()
                    } else {
                        String::from_utf8_lossy(&d.apply(v.as_bytes())).into_owned()
                    };
                    after_flag = is_credential_flag(v.as_bytes());
                    m
                } else {
                    String::from_utf8_lossy(&d.apply(v.as_bytes())).into_owned()
                };
                changed |= masked != v;
                (k.into_owned(), masked)
            })
            .collect();
        if !changed {
            // As the agent sent it (replay re-issues it).
            return query.to_owned();
        }
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_command_lines_are_masked_as_argv() {
        let m = Masking::new(true, None, Vec::new());
        let q = "command=mysql&command=--password&command=canary-1&command=-e&command=select+1&command=--api-token%3Dcanary-2&container=main&stdout=true";
        let out = m.mask_query(q);
        assert!(!out.contains("canary"), "{out}");
        assert!(
            out.contains("command=select+1") && out.contains("container=main"),
            "{out}"
        );
        for q in [
            "watch=1&resourceVersion=5",
            "fieldSelector=metadata.name%3Dx&labelSelector=a+in+(b)",
        ] {
            assert_eq!(m.mask_query(q), q, "kept byte for byte");
        }
        assert_eq!(
            Masking::new(false, None, Vec::new()).mask_query("a=b"),
            "a=b"
        );
    }
}
