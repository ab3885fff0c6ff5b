//! The crate's error type.

use thiserror::Error;

/// What can go wrong when building an [`Augmenter`](crate::Augmenter) or running it.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum AugmentError {
    /// A configuration value is out of range; `key` is its dotted path (`view2.blur_p`).
    #[error("invalid augment config `{key}`: {reason}")]
    InvalidConfig {
        /// Dotted path of the offending key, e.g. `view1.scale`.
        key: String,
        /// What is wrong with it and what is allowed.
        reason: String,
    },
    /// The source image does not match its stated size, or has no pixels.
    #[error("bad input image: {0}")]
    BadInput(String),
    /// A caller-provided output slot has the wrong length.
    #[error("output slot `{slot}` has length {got}, expected {expected}")]
    BadOutput {
        /// Which slot (`view1.chw`, `view2.hwc`, ...).
        slot: &'static str,
        /// Its length.
        got: usize,
        /// The length the configured output size needs.
        expected: usize,
    },
    /// The resize backend refused the job (should not happen with validated input).
    #[error("resize failed: {0}")]
    Resize(String),
}

pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> AugmentError {
    AugmentError::InvalidConfig {
        key: key.into(),
        reason: reason.into(),
    }
}
