//! Resuming a run: the newest checkpoint that passes its checksums, and the loader
//! position it recorded.

use std::path::{Path, PathBuf};

use byol_loader::LoaderState;
use byol_trainer::{CheckpointMeta, Trainer, checkpoint};
use serde::{Deserialize, Serialize};

use crate::RunError;

/// What a run records in a checkpoint beside the weights (top-level keys of its
/// `meta.json`, [`CheckpointMeta::run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunMeta {
    /// Loader epoch after the last completed step.
    pub epoch: u64,
    /// Where the loader resumes (`None` for checkpoints made without a loader).
    pub loader: Option<LoaderState>,
}

impl RunMeta {
    /// As JSON keys for [`byol_trainer::checkpoint::save`].
    pub fn to_json(self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self).expect("run meta serialises") {
            serde_json::Value::Object(map) => map,
            _ => unreachable!("a struct serialises to an object"),
        }
    }

    /// Read back from a checkpoint's meta. Errors name the checkpoint.
    pub fn from_checkpoint(meta: &CheckpointMeta, path: &Path) -> Result<Self, RunError> {
        let map = serde_json::Value::Object(meta.run.clone());
        serde_json::from_value(map).map_err(|e| {
            RunError::Resume(format!(
                "{}: unreadable loader state in meta.json: {e}",
                path.display()
            ))
        })
    }
}

/// A run resumed from a checkpoint.
#[derive(Debug, Clone)]
pub struct Resumed {
    /// The checkpoint folder.
    pub path: PathBuf,
    /// Its meta.
    pub meta: CheckpointMeta,
    /// The run's part of it.
    pub run: RunMeta,
    /// Newer checkpoints passed over, each with the reason (damaged, unreadable).
    pub skipped: Vec<(PathBuf, String)>,
}

/// Loads into `trainer` the newest checkpoint in `dir` whose files pass their checksums;
/// damaged ones are passed over (and listed in [`Resumed::skipped`]), since the older
/// ones are complete. `Ok(None)` when `dir` holds no checkpoint.
///
/// Errors: no checkpoint is usable (each one's reason is named), or the usable one does
/// not fit this trainer (another model, optimizer or batch size): that is a config
/// error, and falling back further would not fix it.
pub fn resume(trainer: &mut Trainer, dir: &Path) -> Result<Option<Resumed>, RunError> {
    let all = checkpoint::list(dir);
    if all.is_empty() {
        return Ok(None);
    }
    let mut skipped = Vec::new();
    for (_, path) in all.into_iter().rev() {
        // A meta that cannot be read, or tensor files that fail their checksums, pass
        // the checkpoint over; one made for another model is a config error. The
        // tensor files are read once, by the load.
        let mut pass_over = |path: PathBuf, e: byol_trainer::TrainError| {
            tracing::warn!(checkpoint = %path.display(), reason = %e, "checkpoint passed over");
            skipped.push((path, e.to_string()));
        };
        let meta = match checkpoint::read_meta(&path) {
            Ok(meta) => meta,
            Err(e) => {
                pass_over(path, e);
                continue;
            }
        };
        trainer.check_fits(&meta, &path)?;
        if let Err(e) = trainer.load_checkpoint(&path) {
            pass_over(path, e);
            continue;
        }
        let run = RunMeta::from_checkpoint(&meta, &path)?;
        return Ok(Some(Resumed {
            path,
            meta,
            run,
            skipped,
        }));
    }
    let reasons: Vec<String> = skipped.iter().map(|(_, r)| r.clone()).collect();
    Err(RunError::Resume(format!(
        "no usable checkpoint in {}: {}",
        dir.display(),
        reasons.join("; ")
    )))
}
