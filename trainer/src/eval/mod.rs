//! Evaluation of a pretrained encoder: frozen features, a linear probe, kNN, and the
//! export of the encoder in torchvision's layout.
//!
//! - [`encoder`]: the frozen online encoder of a checkpoint (or a seeded random one);
//! - [`features`]: the evaluation preprocessing and feature extraction over a dataset;
//! - [`linear`]: standardisation and multinomial logistic regression with an L2 search;
//! - [`knn`]: weighted kNN on cosine similarity;
//! - [`embed`]: the encoder's features of every record, written as `.npy` + `.jsonl` or
//!   lightly's `.csv`;
//! - [`export`]: the encoder as a torchvision `state_dict` in safetensors.

pub mod embed;
pub mod encoder;
pub mod export;
pub mod features;
pub mod knn;
pub mod linear;

use std::path::PathBuf;

pub use embed::{EmbedFormat, EmbedReport, RowInfo, embed};
pub use encoder::{Encoder, InputOverrides, ResolvedInput, checkpoint_input, resolve_checkpoint};
pub use export::{export_encoder, torchvision_state};
pub use features::{Features, Preprocess, extract, pixel_features};
pub use knn::{KnnConfig, knn_accuracy, knn_predict};
pub use linear::{
    LogisticRegression, ProbeConfig, ProbeResult, Standardizer, Whitener, linear_probe,
};

/// Errors of evaluation and export.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Building or loading the model failed.
    #[error(transparent)]
    Train(#[from] crate::TrainError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The dataset is unreadable.
    #[error(transparent)]
    Dataset(#[from] byol_ingest::DatasetError),
    /// A dataset cannot be evaluated on (no labels, unknown classes, a bad image).
    #[error("{path}: {reason}")]
    Data {
        /// The dataset folder.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Features or labels given to a classifier do not fit together.
    #[error("{0}")]
    Input(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}
