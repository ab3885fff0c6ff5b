//! Resuming a run: the newest checkpoint that passes its checksums, and the loader
//! position it recorded.

use std::path::{Path, PathBuf};

use byol_loader::LoaderState;
use byol_trainer::{
    CheckpointMeta, CheckpointProblem, Schedule, TrainError, Trainer, checkpoint, schedule,
};
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
    /// Processes that trained it, data-parallel (`None` in checkpoints written before
    /// it was recorded: one). Informational: the global batch (`loader.batch_size`) is
    /// what the schedules and the loader position depend on, so a run resumes with
    /// another world size and the same global batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<u64>,
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
        // One made with other settings (the load checks them first, from the meta) is a
        // config error: falling back would not fix it. Anything else (an unreadable
        // meta, a failed checksum, a tensor that does not fit) passes it over, since the
        // older ones are complete. The tensor files are read once, by the load.
        match trainer.load_checkpoint(&path) {
            Ok(meta) => {
                let run = RunMeta::from_checkpoint(&meta, &path)?;
                return Ok(Some(Resumed {
                    path,
                    meta,
                    run,
                    skipped,
                }));
            }
            Err(
                e @ TrainError::Checkpoint {
                    problem: CheckpointProblem::Mismatch { .. },
                    ..
                },
            ) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(checkpoint = %path.display(), reason = %e, "checkpoint passed over");
                skipped.push((path, e.to_string()));
            }
        }
    }
    let reasons: Vec<String> = skipped.iter().map(|(_, r)| r.clone()).collect();
    Err(RunError::Resume(format!(
        "no usable checkpoint in {}: {}",
        dir.display(),
        reasons.join("; ")
    )))
}

/// How a run starts: from its newest usable checkpoint ([`resume`]), else, when
/// `[train] init` names pretrained weights, from those ([`Trainer::start_from`]), else
/// from the seeded random init. A resume ignores `init` (the checkpoint wins) and says
/// so on the log, once per call: a changed or removed `init` never stops a resume.
///
/// Data-parallel, rank 0 decides; it then sends the other ranks
/// [`Order::Resume`](crate::replica::Order::Resume) with the step it chose.
///
/// Errors: as [`resume`]; the init file is unreadable or does not fit the model.
pub fn resume_or_init(trainer: &mut Trainer, dir: &Path) -> Result<Option<Resumed>, RunError> {
    start(trainer, dir, true)
}

/// [`resume_or_init`]; `say` whether a resume ignoring `init` is logged (a rollback
/// does not say it again).
pub(crate) fn start(
    trainer: &mut Trainer,
    dir: &Path,
    say: bool,
) -> Result<Option<Resumed>, RunError> {
    let resumed = resume(trainer, dir)?;
    let Some(init) = trainer.config().train.init.clone() else {
        return Ok(resumed);
    };
    match &resumed {
        Some(r) if say => tracing::warn!(
            init = %init.display(),
            checkpoint = %r.path.display(),
            "{}",
            init_ignored(&init, &r.path)
        ),
        Some(_) => {}
        None => {
            let report = trainer.start_from(&init)?;
            tracing::info!(init = %init.display(), "{report}");
        }
    }
    Ok(resumed)
}

/// The notice of a resume that ignores `[train] init`.
pub fn init_ignored(init: &Path, checkpoint: &Path) -> String {
    format!(
        "train.init = {} ignored: resuming from {} (a checkpoint's weights win over init)",
        init.display(),
        checkpoint.display()
    )
}

/// Before a run writes to its folder: when it will start fresh (no checkpoint in
/// `checkpoints`) and `cfg` names `[train] init`, checks that the file fits the model
/// (read, mapped, every shape), so a file that does not fit is refused before anything
/// is written. `Ok(None)` when there is nothing to check.
///
/// Errors: the init file is unreadable or does not fit ([`byol_trainer::TrainError::Init`],
/// naming the first tensor that does not fit and what the model expects).
pub fn check_init(
    cfg: &byol_trainer::TrainerConfig,
    checkpoints: &Path,
) -> Result<Option<byol_trainer::pretrained::InitReport>, RunError> {
    match &cfg.train.init {
        Some(init) if checkpoint::list(checkpoints).is_empty() => Ok(Some(
            byol_trainer::pretrained::check_file(init, &cfg.model)?,
        )),
        _ => Ok(None),
    }
}

/// A resume whose `train.total_steps` differs from the checkpoint's: under the cosine
/// schedules the learning rate and τ at the resumed step change with it (the learning
/// rate jumps back up, τ drops), so the run says so. See [`schedule_change`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleChange {
    /// The resumed step.
    pub step: u64,
    /// `total_steps` of the checkpoint.
    pub old_total_steps: u64,
    /// `total_steps` of this run.
    pub new_total_steps: u64,
    /// Learning rate at `step` under the checkpoint's schedule, then this run's.
    pub lr: (f64, f64),
    /// τ at `step` under the checkpoint's schedule, then this run's (objectives with an
    /// EMA target).
    pub tau: Option<(f64, f64)>,
}

impl std::fmt::Display for ScheduleChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "resuming at step {} with train.total_steps = {} (the checkpoint had {}): the \
             cosine schedules move, learning rate {:.6} -> {:.6}",
            self.step, self.new_total_steps, self.old_total_steps, self.lr.0, self.lr.1,
        )?;
        if let Some((old, new)) = self.tau {
            write!(f, " and tau {old:.6} -> {new:.6}")?;
        }
        write!(f, " at this step")
    }
}

/// The change of schedule a resume from `meta` makes, when `trainer` (already resumed)
/// runs cosine schedules with another `train.total_steps`; `None` for the same length or
/// a constant schedule. A caller that refits the length on purpose (`--minutes`) does
/// not ask.
pub fn schedule_change(meta: &CheckpointMeta, trainer: &Trainer) -> Option<ScheduleChange> {
    let cfg = trainer.config();
    let (old, new) = (meta.config.train.total_steps, cfg.train.total_steps);
    if cfg.optim.schedule == Schedule::Constant || old == new {
        return None;
    }
    let (step, batch) = (meta.step, trainer.batch_size());
    let lr = |total| schedule::learning_rate(&cfg.optim, batch, total, step);
    Some(ScheduleChange {
        step,
        old_total_steps: old,
        new_total_steps: new,
        lr: (lr(old), lr(new)),
        tau: schedule::tau_at(cfg, old, step)
            .zip(schedule::tau_at(cfg, new, step))
            .filter(|(a, b)| a != b),
    })
}
