//! Shuffled, exactly resumable two-view batches from memory-mapped shards.
//!
//! A fixed pool of `batches_ahead + 2` batch buffers is filled by long-lived workers
//! (one per thread of a rayon pool) that decode records straight from the mapped shards
//! and augment them into their place in the batch; finished batches reach the consumer
//! through a bounded crossbeam channel, in order, and their buffers are reused once the
//! consumer drops them. Nothing is allocated per batch in steady state.
//!
//! Order and augmentation are pure functions of (seed, epoch, record), so a run resumed
//! from a [`LoaderState`] yields bit-identical batches, whatever the thread count.
//!
//! ```no_run
//! use byol_augment::{AugmentConfig, Augmenter};
//! use byol_ingest::Dataset;
//! use byol_loader::{Loader, LoaderConfig};
//!
//! let ds = Dataset::open("data/photos".as_ref())?;
//! let aug = Augmenter::new(AugmentConfig::byol(224))?;
//! let mut loader = Loader::new(ds, aug, LoaderConfig::default(), None)?;
//! for _ in 0..10 {
//!     let batch = loader.next_batch();
//!     let (v1, v2) = (batch.view1(), batch.view2()); // f32 NCHW each
//!     # let _ = (v1, v2);
//! }
//! let state = loader.state(); // serialise it with a checkpoint; pass it back to resume
//! # let _ = state;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Sampling policy for continuous training
//! Epochs run over the records their domain was decided with; shards added meanwhile
//! join at the next epoch or refresh boundary once the step loop applies the growth with
//! [`Loader::refresh`] (or [`Loader::apply_manifest`], rank 0's manifest in
//! data-parallel training) at a step boundary: the workers never look at the manifest,
//! so the batches depend on the steps at which growth was applied, never on when a
//! commit landed. Data-parallel ranks each load their contiguous share of every global
//! batch (`LoaderConfig::part`). With `newest_share > 0`, that share of each
//! batch is drawn from the `newest_records` most recently ingested records (seeded per
//! slot), the rest follows the epoch order; an epoch then has fewer records per batch
//! from the order, hence more batches.

mod config;
mod loader;
mod plan;
mod slots;

pub use config::{LoaderConfig, Order, Output, Part};
pub use loader::{Batch, Loader, LoaderState, LoaderStats};

/// Errors starting a loader.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// A config value is out of range.
    #[error("invalid loader setting {key}: {reason}")]
    Config {
        /// The config key.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// The dataset has fewer records than one batch.
    #[error("the dataset has {records} records, fewer than one batch of {batch_size}")]
    TooFewRecords {
        /// Records in the dataset.
        records: u64,
        /// Configured batch size.
        batch_size: usize,
    },
    /// A resume state does not fit this dataset or config.
    #[error("cannot resume: {0}")]
    State(String),
    /// Reading the dataset failed.
    #[error(transparent)]
    Dataset(#[from] byol_ingest::DatasetError),
    /// The worker thread could not be started.
    #[error("cannot start loader workers: {0}")]
    Spawn(std::io::Error),
}
