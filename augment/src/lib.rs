//! BYOL augmentation: two asymmetric views per image (pure image ops, no IO).
//!
//! One call turns a decoded RGB8 image into BYOL's two views (T and T'), written into
//! caller-provided slots as normalised f32 CHW and/or u8 HWC. Every random draw comes from
//! a stream seeded by (run seed, epoch, sample index), so results never depend on threads.
//!
//! ```
//! use byol_augment::{AugmentConfig, Augmenter, SampleKey, Scratch, ViewOut};
//!
//! let aug = Augmenter::new(AugmentConfig::byol(64)).unwrap();
//! let (w, h) = (80u32, 60u32);
//! let rgb = vec![128u8; (w * h * 3) as usize]; // a decoded image, HWC
//! let mut scratch = Scratch::new(); // one per worker thread, reused
//! let (mut v1, mut v2) = (vec![0f32; aug.view_len()], vec![0f32; aug.view_len()]);
//! let key = SampleKey::new(42, 0, 7); // run seed, epoch, sample index
//! let params = aug
//!     .two_views(&rgb, w, h, key, &mut scratch, [ViewOut::f32(&mut v1), ViewOut::f32(&mut v2)])
//!     .unwrap();
//! assert!(params[0].crop.w <= w);
//! ```
//!
//! **Invariant:** `augment` does no IO and knows nothing of candle.

#[macro_use]
mod simd;

pub mod blur;
pub mod color_jitter;
pub mod crop;
mod error;
pub mod flip;
pub mod grayscale;
pub mod layout;
pub mod normalize;
mod pipeline;
pub mod resample;
pub mod rng;
pub mod solarize;
pub mod spec;
pub mod transpose;

pub use color_jitter::ColorParams;
pub use crop::{CropBox, Interpolation};
pub use error::AugmentError;
pub use pipeline::{Augmenter, Scratch, ViewOut, ViewParams, postprocess};
pub use rng::SampleKey;
pub use spec::{AugmentConfig, Preset, ViewSpec};
