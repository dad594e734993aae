//! Searches for the bytes detectors start from (`=` and `:`, `-`). In logs these
//! bytes are dense (a separator every twenty bytes or so), so a search that starts
//! again for each one found (`memchr`: 50-60 instructions a start) costs more than
//! reading the text: here each 64-byte block is classified at once into a bitmask
//! (`wide`'s safe vectors: SSE2 on x86_64, NEON on aarch64) and the positions are taken
//! from its bits. (Eight bytes at a time without vectors was tried: slower.) The card
//! prefilter reads long texts the same way: digits and separators into bitmasks, the
//! windows a card number needs found by shifting them.
use wide::u8x16;

/// The byte searches the detectors make.
#[derive(Debug, Default)]
pub(super) struct Searches;

impl Searches {
    pub(super) fn new() -> Self {
        Searches
    }

    /// Every `=` and `:` in `s`, in order.
    pub(super) fn separators<'h>(&self, s: &'h [u8]) -> Hits<'h> {
        Hits::new(s, b'=', b':')
    }

    /// Every `-` in `s`, in order.
    pub(super) fn dashes<'h>(&self, s: &'h [u8]) -> Hits<'h> {
        Hits::new(s, b'-', b'-')
    }
}

const BLOCK: usize = 64;

/// Bit `i` set where `block[i]` is `a` or `b`.
fn block_mask(block: &[u8; BLOCK], a: u8x16, b: u8x16) -> u64 {
    let mut m = 0u64;
    for (k, c) in block.chunks_exact(16).enumerate() {
        let v = u8x16::new(c.try_into().unwrap_or([0; 16]));
        let hit = v.cmp_eq(a) | v.cmp_eq(b);
        // One bit per lane: the low 16 bits.
        m |= u64::from(hit.move_mask() as u16) << (16 * k);
    }
    m
}

/// Whether `s` holds four digits, then a digit, space or dash, then four digits: nine
/// bytes that every match of the card pattern holds (`4111 1111`, `411111111`).
/// Blocks of 64 bytes start every 56, so every nine-byte window lies whole in one;
/// a window starting at bit `i` of a block needs digits at `i..i + 4` and
/// `i + 5..i + 9` and a digit, space or dash at `i + 4`.
pub(super) fn card_window(s: &[u8]) -> bool {
    const WINDOW: usize = 9;
    const STEP: usize = BLOCK - (WINDOW - 1);
    let mut at = 0;
    while at + WINDOW <= s.len() {
        let rest = &s[at..];
        let (digits, seps) = match rest.first_chunk::<BLOCK>() {
            Some(block) => digit_masks(block),
            None => {
                // Padded with a byte that is neither a digit nor a separator.
                let mut block = [b'x'; BLOCK];
                block[..rest.len()].copy_from_slice(rest);
                digit_masks(&block)
            }
        };
        let fours = digits & digits >> 1 & digits >> 2 & digits >> 3;
        if fours & (digits | seps) >> 4 & fours >> 5 != 0 {
            return true;
        }
        at += STEP;
    }
    false
}

/// Bit `i` set where `block[i]` is an ASCII digit; and where it is a space or `-`.
fn digit_masks(block: &[u8; BLOCK]) -> (u64, u64) {
    let (zero, nine) = (u8x16::splat(b'0'), u8x16::splat(9));
    let (space, dash) = (u8x16::splat(b' '), u8x16::splat(b'-'));
    let (mut digits, mut seps) = (0u64, 0u64);
    for (k, c) in block.chunks_exact(16).enumerate() {
        let v = u8x16::new(c.try_into().unwrap_or([0; 16]));
        // `b - '0'` wraps below `'0'`: a digit is what stays at most 9.
        let off = v - zero;
        let digit = off.min(nine).cmp_eq(off);
        let sep = v.cmp_eq(space) | v.cmp_eq(dash);
        digits |= u64::from(digit.move_mask() as u16) << (16 * k);
        seps |= u64::from(sep.move_mask() as u16) << (16 * k);
    }
    (digits, seps)
}

/// Positions of either of two bytes in a text, in order.
pub(super) struct Hits<'h> {
    s: &'h [u8],
    needles: [u8; 2],
    a: u8x16,
    b: u8x16,
    /// Where the block in `found` starts.
    at: usize,
    /// Bits of the positions found in the current block, not yet given out.
    found: u64,
}

impl<'h> Hits<'h> {
    fn new(s: &'h [u8], a: u8, b: u8) -> Self {
        let mut h = Hits {
            s,
            needles: [a, b],
            a: u8x16::splat(a),
            b: u8x16::splat(b),
            at: 0,
            found: 0,
        };
        h.found = h.block_hits();
        h
    }

    /// The positions found in the block at `at` (a short last block is padded with a
    /// byte that is neither needle, and bits past the end are cleared).
    fn block_hits(&self) -> u64 {
        let rest = self.s.get(self.at..).unwrap_or(&[]);
        if let Some(block) = rest.first_chunk::<BLOCK>() {
            return block_mask(block, self.a, self.b);
        }
        if rest.is_empty() {
            return 0;
        }
        let pad = (0..=u8::MAX)
            .find(|p| !self.needles.contains(p))
            .unwrap_or(0);
        let mut block = [pad; BLOCK];
        block[..rest.len()].copy_from_slice(rest);
        block_mask(&block, self.a, self.b) & ((1u64 << rest.len()) - 1)
    }
}

impl Iterator for Hits<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while self.found == 0 {
            self.at += BLOCK;
            if self.at >= self.s.len() {
                return None;
            }
            self.found = self.block_hits();
        }
        let i = self.at + self.found.trailing_zeros() as usize;
        self.found &= self.found - 1;
        Some(i)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::mask::testgen::Rng;

    /// Whether `s` holds a card window, byte by byte: what the prefilters must say.
    pub(in crate::mask) fn card_window_reference(s: &[u8]) -> bool {
        s.windows(9).any(|w| {
            w[..4].iter().all(u8::is_ascii_digit)
                && matches!(w[4], b'0'..=b'9' | b' ' | b'-')
                && w[5..].iter().all(u8::is_ascii_digit)
        })
    }

    /// Whichever search the CPU gets, it finds what a byte-by-byte scan finds.
    #[test]
    fn searches_find_every_byte_in_order() {
        let s = Searches::new();
        // Dense hits, then every byte value beside every needle.
        let mut text: Vec<u8> = (0..5000u32)
            .map(|i| b"ab=c:d-e  x"[(i * 7 % 11) as usize])
            .collect();
        for b in 0..=255u8 {
            text.extend_from_slice(&[b, b'=', b, b':', b, b'-', b, b, 0x80 | b]);
        }
        for len in [0, 1, 7, 8, 9, 31, 32, 33, 64, 100, 5000, text.len()] {
            let t = &text[..len];
            let want = |f: fn(u8) -> bool| -> Vec<usize> {
                t.iter()
                    .enumerate()
                    .filter(|(_, b)| f(**b))
                    .map(|(i, _)| i)
                    .collect()
            };
            assert_eq!(
                s.separators(t).collect::<Vec<_>>(),
                want(|b| b == b'=' || b == b':')
            );
            assert_eq!(s.dashes(t).collect::<Vec<_>>(), want(|b| b == b'-'));
        }
    }

    /// The block search finds a card window exactly where a byte-by-byte scan does,
    /// wherever it lies against the blocks (every offset and length around them).
    #[test]
    fn card_windows_agree_with_a_byte_by_byte_scan() {
        let parts: [&[u8]; 11] = [
            b"1", b"23", b"4567", b" ", b"-", b"x", b"--", b"8901", b"/", b":", b"\xff",
        ];
        let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
        let mut text = Vec::new();
        while text.len() < 20_000 {
            text.extend_from_slice(rng.pick::<&[u8]>(&parts));
        }
        let (mut positives, mut checked) = (0, 0);
        for start in (0..text.len() - 300).step_by(37) {
            for len in [
                0, 8, 9, 10, 55, 56, 63, 64, 65, 72, 119, 120, 121, 128, 200, 300,
            ] {
                let t = &text[start..start + len];
                let want = card_window_reference(t);
                assert_eq!(card_window(t), want, "{:?}", String::from_utf8_lossy(t));
                positives += usize::from(want);
                checked += 1;
            }
        }
        assert!(
            positives > checked / 5 && positives < checked * 4 / 5,
            "the text exercises few windows or too many: {positives} of {checked}"
        );
        // A window at every offset of a long digit-free text, and none without it.
        let mut t = vec![b'a'; 300];
        assert!(!card_window(&t));
        for at in 0..t.len() - 9 {
            t[at..at + 9].copy_from_slice(b"4111-1111");
            assert!(card_window(&t), "window at {at}");
            t[at..at + 9].fill(b'a');
        }
    }
}
