//! JSON string escaping.

/// Escapes like Newtonsoft.Json's default `StringEscapeHandling`: `"` and `\`, the C0 control
/// characters (short forms where JSON has them, else `\u00xx` in lower case), and U+0085,
/// U+2028, U+2029. Everything else, non-ASCII included, is written as UTF-8.
pub fn write_newtonsoft_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, ch) in s.char_indices() {
        let esc: Option<&[u8]> = match ch {
            '"' => Some(b"\\\""),
            '\\' => Some(b"\\\\"),
            '\n' => Some(b"\\n"),
            '\r' => Some(b"\\r"),
            '\t' => Some(b"\\t"),
            '\u{8}' => Some(b"\\b"),
            '\u{c}' => Some(b"\\f"),
            _ => None,
        };
        let needs_u = matches!(ch, '\u{0}'..='\u{1f}' | '\u{85}' | '\u{2028}' | '\u{2029}');
        if esc.is_none() && !needs_u {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match esc {
            Some(e) => out.extend_from_slice(e),
            None => out.extend_from_slice(format!("\\u{:04x}", ch as u32).as_bytes()),
        }
        start = i + ch.len_utf8();
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Plain JSON string for envelopes (messages, keys); the same escaping serves.
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    write_newtonsoft_string(out, s);
}
