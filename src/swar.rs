//! Byte tests on eight bytes at a time (SIMD within a register), for the scanners of form
//! input (`request`) and JSON strings (`wire::json`): no `unsafe`, no vector instructions.

/// `b` in every byte of a word.
pub(crate) const fn splat(b: u8) -> u64 {
    0x0101_0101_0101_0101 * b as u64
}

/// The top bit of each byte of the result is set exactly where `w` has a zero byte: the exact
/// form, with no false positives after a true zero, unlike the shorter `(w - ONES) & !w`.
pub(crate) const fn zero_bytes(w: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    !(((w & LOW7) + LOW7) | w | LOW7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_bytes_marks_exactly_the_zero_bytes() {
        // Every byte value at every position, among bytes of every other kind.
        for fill in [0x00u8, 0x01, 0x7f, 0x80, 0xff] {
            for pos in 0..8 {
                for v in 0..=255u8 {
                    let mut bytes = [fill; 8];
                    bytes[pos] = v;
                    let want = bytes
                        .iter()
                        .enumerate()
                        .filter(|(_, &b)| b == 0)
                        .fold(0u64, |m, (i, _)| m | 0x80 << (8 * i));
                    assert_eq!(zero_bytes(u64::from_le_bytes(bytes)), want, "{bytes:?}");
                }
            }
        }
        assert_eq!(splat(b'&'), u64::from_le_bytes([b'&'; 8]));
    }
}
