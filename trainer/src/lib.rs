//! Self-supervised training in candle: ResNet encoders in torchvision's layout with a
//! projector MLP, objectives (BYOL, MSF, SimSiam, SimCLR, Barlow Twins, MoCo v2: one file
//! per method under [`objective`]), LARS, AdamW and SGD, schedules, and checkpoints.
//! The only crate that uses candle. CPU by default; CUDA with `--features cuda`.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod dist;
pub mod embedding;
pub mod eval;
pub mod host;
pub mod input;
pub mod kernels;
pub mod loss;
pub mod memory;
pub mod model;
pub mod objective;
pub mod optim;
pub mod pretrained;
pub mod schedule;
pub mod state;
mod trainer;

pub use checkpoint::{
    CheckpointMeta, CheckpointProblem, latest as latest_checkpoint, save as save_checkpoint,
};
pub use config::{
    Arch, BarlowTwinsConfig, ByolConfig, ConvInit, HeadNorm, Kernels, MemorySize, Method,
    MocoV2Config, ModelConfig, MsfConfig, OptimConfig, OptimizerKind, Precision, Schedule,
    SimClrConfig, SimSiamConfig, TrainConfig, TrainerConfig,
};
pub use embedding::EmbeddingStats;
pub use objective::{Objective, ObjectiveStats};
pub use state::{StateDict, TrainerState};
pub use trainer::{Health, StepStats, Trainer};

/// Errors of the trainer.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A config value is out of range.
    #[error("invalid setting {key}: {reason}")]
    Config {
        /// The config key.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An op of the per-op check (`bench::op_check`) failed to run.
    #[error("{case}: {reason}")]
    OpCheck {
        /// The op and its shape.
        case: String,
        /// Why.
        reason: String,
    },
    /// A checkpoint file is damaged, unreadable, or does not fit this run.
    #[error("checkpoint {path}: {problem}")]
    Checkpoint {
        /// The checkpoint file (or folder, for a mismatch with this run).
        path: std::path::PathBuf,
        /// What is wrong.
        problem: checkpoint::CheckpointProblem,
    },
    /// A file of pretrained weights (`[train] init`) cannot start this encoder.
    #[error("init weights {path}: {problem}")]
    Init {
        /// The weights file.
        path: std::path::PathBuf,
        /// What is wrong (boxed: the error stays small).
        problem: Box<pretrained::InitProblem>,
    },
}

impl TrainError {
    /// What kind of failure this is: the IO error's kind, damage for a checkpoint that
    /// fails its checks (see [`byol_ingest::fsutil::FailureKind`]).
    pub fn kind(&self) -> byol_ingest::fsutil::FailureKind {
        use byol_ingest::fsutil::FailureKind;
        match self {
            TrainError::Io { source, .. } => FailureKind::of_io(source),
            TrainError::Checkpoint { problem, .. } if problem.is_damage() => FailureKind::Damaged,
            _ => FailureKind::Other,
        }
    }
}
