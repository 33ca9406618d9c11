//! JSON string escaping.

/// Escapes like Newtonsoft.Json's default `StringEscapeHandling`: `"` and `\`, the C0 control
/// characters (short forms where JSON has them, else `\u00xx` in lower case), and U+0085,
/// U+2028, U+2029. Everything else, non-ASCII included, is written as UTF-8.
pub fn write_newtonsoft_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Runs of plain bytes are copied whole; only bytes that may start an escape are looked
    // at. In UTF-8, U+0085 is C2 85 and U+2028/2029 are E2 80 A8/A9, and 0xC2 and 0xE2 only
    // ever occur as lead bytes, so checking the bytes after them is exact.
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Eight bytes at a time to the next byte that may start an escape.
        while let Some(word) = bytes.get(i..i + 8) {
            let found = escape_starts(u64::from_le_bytes(word.try_into().unwrap_or_default()));
            if found != 0 {
                i += found.trailing_zeros() as usize / 8;
                break;
            }
            i += 8;
        }
        let Some(&b) = bytes.get(i) else {
            break;
        };
        let (esc, len): (Option<&[u8]>, usize) = match b {
            b'"' => (Some(b"\\\""), 1),
            b'\\' => (Some(b"\\\\"), 1),
            b'\n' => (Some(b"\\n"), 1),
            b'\r' => (Some(b"\\r"), 1),
            b'\t' => (Some(b"\\t"), 1),
            0x08 => (Some(b"\\b"), 1),
            0x0c => (Some(b"\\f"), 1),
            0x00..=0x1f => (None, 1),
            0xc2 if bytes.get(i + 1) == Some(&0x85) => (None, 2),
            0xe2 if bytes.get(i + 1) == Some(&0x80)
                && matches!(bytes.get(i + 2), Some(0xa8 | 0xa9)) =>
            {
                (None, 3)
            }
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[start..i]);
        match esc {
            Some(e) => out.extend_from_slice(e),
            None => {
                let ch = s[i..].chars().next().unwrap_or_default();
                out.extend_from_slice(format!("\\u{:04x}", ch as u32).as_bytes());
            }
        }
        i += len;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The top bit of each byte of the result is set exactly where `word` (little-endian) has a
/// byte that may start an escape: a C0 control, `"`, `\`, or the lead bytes 0xC2 and 0xE2.
fn escape_starts(word: u64) -> u64 {
    use crate::swar::{splat, zero_bytes};
    // A C0 control is a byte with none of its top three bits set.
    zero_bytes(word & splat(0xe0))
        | zero_bytes(word ^ splat(b'"'))
        | zero_bytes(word ^ splat(b'\\'))
        | zero_bytes(word ^ splat(0xc2))
        | zero_bytes(word ^ splat(0xe2))
}

/// Plain JSON string for envelopes (messages, keys); the same escaping serves.
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    write_newtonsoft_string(out, s);
}
