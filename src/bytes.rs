//! Byte helpers at the bottom of the house: escaping bytes for a log line, decimal and hex
//! digits. Nothing here knows of sockets, the protocol or the store; everything above may use
//! it. Finding a byte is `memchr`'s, and writing a number is `itoa`'s: both are already in the
//! build, under `serde_json`.

/// Appends `n` in decimal, through a buffer on the stack rather than a formatted `String`
/// (the log writes a connection id on every line).
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `bytes` in lower-case hex, two digits a byte.
pub fn hex(bytes: &[u8]) -> Vec<u8> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|&b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]])
        .collect()
}

/// Appends `bytes` with everything but printable ASCII escaped: `\n`, `\r`, `\t`, `\\`, `\xNN`,
/// so that bytes a client sent can never forge a line of a log or a dump. Runs of printable
/// bytes are copied whole: a reply's only escape is usually its final `\n`.
pub fn escape_into(out: &mut Vec<u8>, mut bytes: &[u8]) {
    while let Some(at) = first_to_escape(bytes) {
        out.extend_from_slice(&bytes[..at]);
        match bytes[at] {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b => {
                out.extend_from_slice(b"\\x");
                out.extend_from_slice(&hex(&[b]));
            }
        }
        bytes = &bytes[at + 1..];
    }
    out.extend_from_slice(bytes);
}

/// Eight copies of the byte 1: `ONES * b` is eight copies of the byte `b`.
const ONES: u64 = 0x0101_0101_0101_0101;
/// Eight copies of a byte's top bit, where the word tricks leave their answer.
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The top bit of every byte of `w` that is zero, and maybe of some bytes above a zero one: a
/// borrow can mark bytes above a real zero, never below.
fn zero_bytes(w: u64) -> u64 {
    w.wrapping_sub(ONES) & !w & HIGHS
}

/// The first byte that is not printable ASCII or is a backslash. Every logged line goes through
/// here, so it looks at eight bytes at a time: the classic bit tricks below say, exactly,
/// whether any byte of a word is below 0x20, has its top bit set, or equals 0x7f or `\`.
fn first_to_escape(bytes: &[u8]) -> Option<usize> {
    let any_zero = |w: u64| zero_bytes(w) != 0;
    let needs = |b: u8| !(0x20..0x7f).contains(&b) || b == b'\\';
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in words.by_ref() {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(word);
        let w = u64::from_le_bytes(eight);
        let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGHS != 0;
        if below_space
            || w & HIGHS != 0
            || any_zero(w ^ (ONES * 0x7f))
            || any_zero(w ^ (ONES * u64::from(b'\\')))
        {
            // Reached about once a line (at its `\n`), so finding the byte one at a time
            // costs little.
            return word.iter().position(|&b| needs(b)).map(|i| at + i);
        }
        at += 8;
    }
    // The last zero to seven bytes, which make no whole word.
    words
        .remainder()
        .iter()
        .position(|&b| needs(b))
        .map(|i| at + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_at_a_time_scan_finds_the_first_byte_to_escape() {
        for b in 0u8..=255 {
            for len in 1..20 {
                for at in 0..len {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    let needs = !(0x20..0x7f).contains(&b) || b == b'\\';
                    assert_eq!(
                        first_to_escape(&bytes),
                        needs.then_some(at),
                        "{b:#x} at {at} of {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn client_bytes_cannot_forge_lines() {
        let mut out = Vec::new();
        escape_into(&mut out, b"a\nFAKE\\ \x1b[31m\xff");
        assert_eq!(out, b"a\\nFAKE\\\\ \\x1b[31m\\xff");
    }

    #[test]
    fn decimals_and_hex() {
        let mut out = Vec::new();
        push_decimal(&mut out, 0);
        out.push(b' ');
        push_decimal(&mut out, u64::MAX);
        assert_eq!(out, format!("0 {}", u64::MAX).as_bytes());
        assert_eq!(hex(&[0x00, 0x9f, 0xff]), b"009fff");
    }
}
