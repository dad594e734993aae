//! Deterministic pseudo-random inputs for the masker's equivalence tests (an
//! xorshift64 stream: the same texts every run, so a threshold on how many of them
//! exercise a case is stable).

/// An xorshift64 stream.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Moves the stream on one step.
    pub(super) fn step(&mut self) {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
    }

    /// One of `parts`, after a step.
    pub(super) fn pick<'p, P>(&mut self, parts: &'p [P]) -> &'p P {
        self.step();
        &parts[(self.0 % parts.len() as u64) as usize]
    }

    /// Fewer than `most` of `parts` joined (how many from the stream as it stands),
    /// then a step.
    pub(super) fn joined<P: AsRef<[u8]>>(&mut self, parts: &[P], most: u64) -> Vec<u8> {
        let mut s = Vec::new();
        for _ in 0..self.0 % most {
            s.extend_from_slice(self.pick(parts).as_ref());
        }
        self.step();
        s
    }
}
