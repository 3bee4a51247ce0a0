//! The host random generator: masking noise and initialization come from here, seeded, so every
//! backend sees the same numbers and a run can be repeated exactly.

/// SplitMix64 (Steele, Lea, Flood 2014): 64 bits of state, passes BigCrush, and its state is one
/// integer that a checkpoint can store.
///
/// ```
/// let mut a = mae::rng::Rng::new(7);
/// let mut b = mae::rng::Rng::new(7);
/// assert_eq!(a.uniform(), b.uniform());
/// let u = a.uniform();
/// assert!((0.0..1.0).contains(&u));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator whose whole future is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// The state, for checkpoints; [`Rng::new`] of it resumes the same sequence.
    pub fn state(&self) -> u64 {
        self.state
    }

    /// An independent generator for sub-stream `stream` (for example one per tensor), so adding a
    /// consumer does not shift the numbers every other consumer sees.
    pub fn fork(&self, stream: u64) -> Rng {
        let mut mixer = Rng::new(self.state ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        Rng::new(mixer.next_u64())
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 random bits, like `torch.rand` in float32.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform_f64()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.uniform_f64();
        let u2 = self.uniform_f64();
        libm::sqrt(-2.0 * libm::log(u1)) * libm::cos(2.0 * core::f64::consts::PI * u2)
    }

    /// Fills `out` with uniform [0, 1) noise (the masking noise of `random_masking`).
    pub fn fill_uniform(&mut self, out: &mut [f32]) {
        for x in out {
            *x = self.uniform();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_are_right() {
        let mut rng = Rng::new(1);
        let n = 200_000;
        let (mut s, mut s2) = (0.0, 0.0);
        for _ in 0..n {
            let x = rng.normal();
            s += x;
            s2 += x * x;
        }
        assert!((s / n as f64).abs() < 0.01);
        assert!((s2 / n as f64 - 1.0).abs() < 0.01);
        let mean_u: f64 = (0..n).map(|_| rng.uniform() as f64).sum::<f64>() / n as f64;
        assert!((mean_u - 0.5).abs() < 0.005);
    }

    #[test]
    fn forks_differ_and_repeat() {
        let rng = Rng::new(5);
        assert_ne!(rng.fork(1).next_u64(), rng.fork(2).next_u64());
        assert_eq!(rng.fork(3).next_u64(), rng.fork(3).next_u64());
    }
}
