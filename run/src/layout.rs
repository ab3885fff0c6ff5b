//! The run folder: where a run's checkpoints, metrics and latest encoder live.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use byol_trainer::checkpoint::RUN_CHECKPOINTS_DIR;

use crate::{RunError, io};

/// Metrics file of a run folder (JSON Lines, appended).
const METRICS_FILE: &str = "metrics.jsonl";
/// The online encoder of the last checkpoint under torchvision names.
const ENCODER_LATEST: &str = "encoder-latest.safetensors";
/// Lock file: one process trains into a run folder at a time.
const LOCK_FILE: &str = ".lock";

/// A run folder (`RUN/`):
///
/// ```text
/// RUN/checkpoints/step-NNNNNNNNNN/   checkpoints (byol_trainer::checkpoint)
/// RUN/metrics.jsonl                  one MetricsLine per logged step
/// RUN/encoder-latest.safetensors     the last checkpoint's online encoder (torchvision names)
/// RUN/.lock                          held by the process training into it
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// The run folder at `root` (nothing is created).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RunDir { root: root.into() }
    }

    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `RUN/checkpoints`.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join(RUN_CHECKPOINTS_DIR)
    }

    /// `RUN/metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }

    /// `RUN/encoder-latest.safetensors`.
    pub fn encoder_latest(&self) -> PathBuf {
        self.root.join(ENCODER_LATEST)
    }

    /// Creates the folder and takes its lock, held while the returned guard lives.
    ///
    /// Errors: [`RunError::Locked`] when another process holds it, [`RunError::Io`]
    /// when the folder cannot be created.
    pub fn lock(&self) -> Result<RunLock, RunError> {
        fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        let path = self.root.join(LOCK_FILE);
        let f = File::create(&path).map_err(io(&path))?;
        match f.try_lock() {
            Ok(()) => Ok(RunLock(f)),
            Err(fs::TryLockError::WouldBlock) => Err(RunError::Locked {
                path: self.root.clone(),
            }),
            Err(fs::TryLockError::Error(e)) => Err(io(&path)(e)),
        }
    }
}

/// Holds a run folder's lock until dropped (or the process ends, however it ends).
pub struct RunLock(#[allow(dead_code)] File);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_run_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path().join("run"));
        let held = run.lock().unwrap();
        assert!(matches!(run.lock(), Err(RunError::Locked { .. })));
        drop(held);
        run.lock().unwrap();
    }
}
