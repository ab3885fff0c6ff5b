//! A BYOL training run as a library: what `byol train` and `byol daemon` share.
//!
//! - [`RunDir`]: the run folder's layout (`checkpoints/`, `metrics.jsonl`,
//!   `encoder-latest.safetensors`, the lock), named in one place;
//! - [`Run`]: the step loop's state between steps (trainer, loader, metrics sink,
//!   checkpoint policy, optional kNN [`Monitor`]); [`Run::step`] is one step,
//!   [`Run::checkpoint`] writes the last completed one;
//! - [`CheckpointPolicy`]: when to checkpoint and how many to keep, apart from the
//!   checkpoint IO (`byol_trainer::checkpoint`);
//! - [`MetricsSink`]: `metrics.jsonl`, one [`MetricsLine`] per logged step, cut back to
//!   the step a run resumes from;
//! - [`resume()`]: the newest checkpoint that passes its checksums, falling back to older
//!   ones, and the loader position it recorded ([`RunMeta`]);
//! - [`replica`]: data-parallel training as rank 0 leading and the other ranks
//!   following its [`replica::Order`]s ([`replica::follow`] is their whole life);
//! - [`continuous`]: open-ended training on a growing dataset, paused when idle, rolled
//!   back on a non-finite loss, driven by [`continuous::Controls`] (the daemon's signals
//!   and its ingester set them).
//!
//! Library errors are [`RunError`]; progress goes out as `tracing` events.

pub mod continuous;
mod layout;
mod metrics;
mod monitor;
mod policy;
pub mod replica;
mod resume;
mod run;

pub use layout::{RunDir, RunLock};
pub use metrics::{MetricsLine, MetricsSink};
pub use monitor::{Measurement, Monitor, MonitorConfig};
pub use policy::CheckpointPolicy;
pub use resume::{
    Resumed, RunMeta, ScheduleChange, check_init, init_ignored, resume, resume_or_init,
    schedule_change,
};
pub use run::{
    CheckpointOutcome, FaultPoints, Finished, MANIFEST_PATIENCE, RETRY_AFTER, Run, RunParts,
    StepReport, TRACE_BATCHES_ENV,
};

use std::path::PathBuf;

use byol_ingest::fsutil::FailureKind;

/// The jobs of a run that write to disk, each with its own outcome and policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Writing a checkpoint (retried after the retry interval when it fails).
    Checkpoint,
    /// Removing checkpoints past `keep_last` (tried again at the next checkpoint).
    Prune,
    /// Writing `encoder-latest.safetensors` (written again at the next checkpoint).
    Export,
    /// Appending to `metrics.jsonl` (the lines wait; retried after the retry interval).
    Metrics,
}

impl Operation {
    /// The label value: `checkpoint`, `prune`, `export`, `metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Checkpoint => "checkpoint",
            Operation::Prune => "prune",
            Operation::Export => "export",
            Operation::Metrics => "metrics",
        }
    }
}

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The trainer failed (a step, a checkpoint read or write).
    #[error(transparent)]
    Train(#[from] byol_trainer::TrainError),
    /// The loader could not start or resume.
    #[error(transparent)]
    Loader(#[from] byol_loader::LoaderError),
    /// The dataset could not be opened.
    #[error(transparent)]
    Dataset(#[from] byol_ingest::DatasetError),
    /// Evaluation (the monitor, the latest encoder's export) failed.
    #[error(transparent)]
    Eval(#[from] byol_trainer::eval::EvalError),
    /// A file of the run folder cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The `[monitor]` cannot work (checked before the first step).
    #[error("[monitor]: {0}")]
    Monitor(String),
    /// The loss of a step was NaN or infinite: its update must not be kept.
    #[error("non-finite loss ({loss}) at step {step}")]
    NonFiniteLoss {
        /// The step that produced it.
        step: u64,
        /// The loss.
        loss: f32,
    },
    /// A test fault point fired ([`FaultPoints`]).
    #[error("injected fault after step {step} ({key})")]
    InjectedFault {
        /// The step after which it fired.
        step: u64,
        /// The environment variable that set it.
        key: &'static str,
    },
    /// A setting does not suit this kind of run (a cosine schedule for the daemon).
    #[error("{0}")]
    Config(String),
    /// The weights hold a non-finite step's update: nothing is checkpointed until
    /// [`Run::rollback`].
    #[error("not checkpointing step {step}: a non-finite loss reached the weights")]
    Diverged {
        /// The step whose update the weights hold.
        step: u64,
    },
    /// No checkpoint to resume from, or none usable.
    #[error("{0}")]
    Resume(String),
    /// Another rank of a data-parallel job failed at a decision this one shares (rank 0
    /// could not write a checkpoint, say).
    #[error("data-parallel: {0}")]
    Peer(String),
    /// Another process trains into this run folder.
    #[error("{path}: another byol train or daemon holds this run folder")]
    Locked {
        /// The run folder.
        path: PathBuf,
    },
}

impl RunError {
    /// What kind of failure this is: a full disk, a permission, damage, or other (see
    /// [`FailureKind`]); the daemon's policy and its failure counters go by it.
    pub fn kind(&self) -> FailureKind {
        match self {
            RunError::Train(e) => e.kind(),
            RunError::Dataset(e) => e.kind(),
            RunError::Loader(e) => FailureKind::of_chain(e),
            RunError::Eval(e) => FailureKind::of_chain(e),
            RunError::Io { source, .. } => FailureKind::of_io(source),
            _ => FailureKind::Other,
        }
    }
}

/// The `Io` error for `path`.
pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_owned(),
        source,
    }
}
