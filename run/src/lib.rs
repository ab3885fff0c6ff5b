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
mod resume;
mod run;

pub use layout::{RunDir, RunLock};
pub use metrics::{MetricsLine, MetricsSink};
pub use monitor::{Measurement, Monitor, MonitorConfig};
pub use policy::CheckpointPolicy;
pub use resume::{Resumed, RunMeta, resume};
pub use run::{CHECKPOINT_RETRY, FaultPoints, Run, RunParts, StepReport, TRACE_BATCHES_ENV};

use std::path::PathBuf;

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
    /// Another process trains into this run folder.
    #[error("{path}: another byol train or daemon holds this run folder")]
    Locked {
        /// The run folder.
        path: PathBuf,
    },
}

/// The `Io` error for `path`.
pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_owned(),
        source,
    }
}
