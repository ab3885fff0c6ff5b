//! Per-image random streams: every draw depends only on (run seed, epoch, sample index, view).
//!
//! Seed mixing: each input word goes through the SplitMix64 finaliser (a bijection on u64
//! with full avalanche) before it is folded into the running state, so nearby keys
//! (index 7 vs 8, epoch 0 vs 1) give unrelated streams:
//!
//! ```text
//! s = mix64(run_seed ^ 0x6A09E667F3BCC908)
//! s = mix64(s ^ mix64(epoch ^ 0xBB67AE8584CAA73B))
//! s = mix64(s ^ mix64(index ^ 0x3C6EF372FE94F82B))
//! view v (0 or 1): Xoshiro256PlusPlus::seed_from_u64(mix64(s ^ mix64(v ^ 0xA54FF53A5F1D36F1)))
//! ```
//!
//! Nothing depends on which thread runs the sample or in which order samples are run.

use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// The SplitMix64 output function (Steele, Lea, Flood 2014): a bijective 64-bit mixer.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Identifies one sample of one epoch of one run; the only source of randomness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SampleKey {
    /// The run's seed (from the config).
    pub seed: u64,
    /// Epoch number.
    pub epoch: u64,
    /// Index of the sample in the data set (not its position in the shuffled order).
    pub index: u64,
}

impl SampleKey {
    /// A key from its three parts.
    pub fn new(seed: u64, epoch: u64, index: u64) -> Self {
        Self { seed, epoch, index }
    }

    /// The mixed 64-bit seed of this sample (see the module docs).
    pub fn mixed(&self) -> u64 {
        let s = mix64(self.seed ^ 0x6A09_E667_F3BC_C908);
        let s = mix64(s ^ mix64(self.epoch ^ 0xBB67_AE85_84CA_A73B));
        mix64(s ^ mix64(self.index ^ 0x3C6E_F372_FE94_F82B))
    }

    /// The random stream of view `view` (0 = T, 1 = T') of this sample.
    pub fn view_rng(&self, view: u64) -> ViewRng {
        let s = mix64(self.mixed() ^ mix64(view ^ 0xA54F_F53A_5F1D_36F1));
        ViewRng(Xoshiro256PlusPlus::seed_from_u64(s))
    }
}

/// The random stream of one view: xoshiro256++ (fast, 256-bit state, well tested).
#[derive(Debug, Clone)]
pub struct ViewRng(Xoshiro256PlusPlus);

impl ViewRng {
    /// Uniform f32 in [0, 1): the top 24 bits of one 64-bit output, times 2^-24.
    #[inline]
    pub fn uniform(&mut self) -> f32 {
        (self.0.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform f32 in [lo, hi), computed like `tf.random.uniform`: `u * (hi - lo) + lo`.
    #[inline]
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        self.uniform() * (hi - lo) + lo
    }

    /// `true` with probability `p` (one draw, always consumed).
    #[inline]
    pub fn bernoulli(&mut self, p: f32) -> bool {
        self.uniform() < p
    }
}
