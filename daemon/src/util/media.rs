//! Media types from `Content-Type` values, compared the way RFC 9110 says: the type
//! and subtype case-insensitively, parameters ignored.

/// The media type of a `Content-Type` value, lower case, without parameters
/// (`Application/JSON; charset=utf-8` is `application/json`).
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// JSON, or a `+json` structured syntax (`application/merge-patch+json`).
pub fn is_json(media: &str) -> bool {
    media == "application/json" || media.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_compare_without_case_or_parameters() {
        assert_eq!(
            media_type("Application/JSON; charset=utf-8"),
            "application/json"
        );
        assert_eq!(media_type(""), "");
        assert!(is_json(&media_type("application/json;stream=watch")));
        assert!(is_json(&media_type(
            "application/strategic-merge-patch+json"
        )));
        assert!(!is_json(&media_type("application/vnd.kubernetes.protobuf")));
    }
}
