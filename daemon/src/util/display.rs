//! Text that came from an agent or a token, made safe to show a human: in a terminal
//! (no control characters, so no ANSI escape sequences that move the cursor, recolour
//! or rewrite what is shown), anywhere (no bidirectional overrides or invisible
//! characters that make text read differently than it is), and in a chat message (no
//! markup: Slack's `<!channel>`, `<@user>`, `<url|label>`, mentions, formatting).
//! What is replaced is shown as `\u{XX}` escapes, so nothing disappears silently.
use std::borrow::Cow;

/// Characters that are not shown as themselves: C0 and C1 controls, DEL, and the
/// invisible or reordering format characters.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}')
}

/// For a terminal or a web page: every hidden character as a visible escape.
pub fn escape_text(s: &str) -> Cow<'_, str> {
    if !s.chars().any(hidden) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if hidden(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// For a Slack (mrkdwn) message: [`escape_text`], then inside a code span, where
/// formatting is not applied: `&`, `<`, `>` as entities (no `<!channel>`, `<@U1>` or
/// links), backticks that would end the span as `'`, `@` as `＠` (no mentions).
pub fn slack_code(s: &str) -> String {
    let t = escape_text(s);
    let mut out = String::with_capacity(t.len() + 2);
    out.push('`');
    for c in t.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '`' => out.push('\''),
            '@' => out.push('＠'),
            c => out.push(c),
        }
    }
    out.push('`');
    out
}

/// Every string in a JSON value (keys included) through [`escape_text`].
pub fn escape_json(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::String(s) => {
            if let Cow::Owned(e) = escape_text(s) {
                *s = e;
            }
        }
        Value::Array(a) => a.iter_mut().for_each(escape_json),
        Value::Object(o) => {
            let entries: Vec<(String, Value)> = std::mem::take(o).into_iter().collect();
            for (k, mut x) in entries {
                escape_json(&mut x);
                o.insert(escape_text(&k).into_owned(), x);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_ansi_bidi_and_invisibles_are_shown_as_escapes() {
        assert_eq!(escape_text("plain name-1"), "plain name-1");
        let hostile = "a\u{1b}[2J\u{1b}]0;pwned\u{7}b\rc\u{9b}31md\u{202e}txt.exe\u{200b}e\u{7f}\n";
        let e = escape_text(hostile);
        assert!(!e.chars().any(hidden), "{e:?}");
        for want in [
            "\\u{1b}[2J",
            "\\u{7}",
            "\\u{d}",
            "\\u{9b}",
            "\\u{202e}",
            "\\u{200b}",
            "\\u{7f}",
            "\\u{a}",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
        // Idempotent: escaping escaped text changes nothing.
        assert_eq!(escape_text(&e), e);
    }

    #[test]
    fn slack_markup_cannot_ping_link_or_break_out() {
        let s = slack_code("x <!channel> <@U123> <https://evil|click> @here `code` *b* &amp;");
        assert!(s.starts_with('`') && s.ends_with('`'));
        let inner = &s[1..s.len() - 1];
        assert!(
            !inner.contains('<') && !inner.contains('>') && !inner.contains('`'),
            "{s}"
        );
        assert!(!inner.contains('@'), "{s}");
        assert!(
            inner.contains("&lt;!channel&gt;") && inner.contains("&amp;amp;"),
            "{s}"
        );
        assert_eq!(slack_code("a\u{1b}b"), "`a\\u{1b}b`");
    }

    #[test]
    fn json_strings_and_keys_are_escaped() {
        let mut v = serde_json::json!({"name\u{1b}": ["ok", "\u{202e}x"], "n": 1});
        escape_json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"name\\u{1b}": ["ok", "\\u{202e}x"], "n": 1})
        );
    }
}
