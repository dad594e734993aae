//! Errors with their causes.

/// `e` and every source below it, `: `-separated (hyper's and rustls's errors say
/// little on their own; the cause is in the chain).
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(super::source_chain(&e), "outer: inner");
    }
}
