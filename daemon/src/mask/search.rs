//! Searches for the bytes detectors start from (`=` and `:`, `-`), set up once. In
//! logs these bytes are dense: the generic `memchr` functions pick their
//! implementation and set up their vectors again for every one found, which cost more
//! than the search itself; where the CPU has AVX2 the searcher is made once instead.
//! (Reading eight bytes at a time without vectors was tried: 26% more instructions
//! and 7% slower on the log stream of `bench mask`.)
use memchr::{Memchr, Memchr2};

#[cfg(target_arch = "x86_64")]
use memchr::arch::x86_64::avx2::memchr::{One, OneIter, Two, TwoIter};

/// The byte searches the detectors make.
#[derive(Debug)]
pub(super) struct Searches {
    #[cfg(target_arch = "x86_64")]
    separators: Option<Two>,
    #[cfg(target_arch = "x86_64")]
    dashes: Option<One>,
}

impl Searches {
    pub(super) fn new() -> Self {
        Searches {
            #[cfg(target_arch = "x86_64")]
            separators: Two::new(b'=', b':'),
            #[cfg(target_arch = "x86_64")]
            dashes: One::new(b'-'),
        }
    }

    /// Every `=` and `:` in `s`, in order.
    pub(super) fn separators<'a, 'h>(&'a self, s: &'h [u8]) -> Hits<'a, 'h> {
        #[cfg(target_arch = "x86_64")]
        if let Some(two) = &self.separators {
            return Hits::Two(two.iter(s));
        }
        Hits::Generic2(memchr::memchr2_iter(b'=', b':', s))
    }

    /// Every `-` in `s`, in order.
    pub(super) fn dashes<'a, 'h>(&'a self, s: &'h [u8]) -> Hits<'a, 'h> {
        #[cfg(target_arch = "x86_64")]
        if let Some(one) = &self.dashes {
            return Hits::One(one.iter(s));
        }
        Hits::Generic1(memchr::memchr_iter(b'-', s))
    }
}

/// Positions found by one of [`Searches`].
pub(super) enum Hits<'a, 'h> {
    #[cfg(target_arch = "x86_64")]
    One(OneIter<'a, 'h>),
    #[cfg(target_arch = "x86_64")]
    Two(TwoIter<'a, 'h>),
    Generic1(Memchr<'h>),
    Generic2(Memchr2<'h>),
    /// Holds the searcher's lifetime where no variant above does.
    #[allow(dead_code)]
    Never(std::marker::PhantomData<&'a ()>),
}

impl Iterator for Hits<'_, '_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match self {
            #[cfg(target_arch = "x86_64")]
            Hits::One(it) => it.next(),
            #[cfg(target_arch = "x86_64")]
            Hits::Two(it) => it.next(),
            Hits::Generic1(it) => it.next(),
            Hits::Generic2(it) => it.next(),
            Hits::Never(_) => None,
        }
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
