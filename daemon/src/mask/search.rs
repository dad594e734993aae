//! Searches for the bytes detectors start from (`=` and `:`, `-`). In logs these
//! bytes are dense (a separator every twenty bytes or so), so a search that starts
//! again for each one found (`memchr`: 50-60 instructions a start) costs more than
//! reading the text: here each 64-byte block is classified at once into a bitmask
//! (`wide`'s safe vectors: SSE2 on x86_64, NEON on aarch64) and the positions are taken
//! from its bits. (Eight bytes at a time without vectors was tried: slower.)
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
mod tests {
    use super::*;

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
}
