//! Checkpoints: online, target and optimizer state as safetensors, plus `meta.json`.
//!
//! A checkpoint is a folder `step-NNNNNNNNNN/` written as `step-NNNNNNNNNN.tmp/`, every
//! file fsynced, then renamed (and the parent fsynced): a killed write leaves only a
//! `.tmp` folder, which loaders ignore and the next save removes.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use byol_loader::LoaderState;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::config::TrainerConfig;
use crate::trainer::Trainer;

/// Version of the checkpoint layout; loading another version is refused.
pub const CHECKPOINT_VERSION: u32 = 1;
pub(crate) const ONLINE: &str = "online.safetensors";
const TARGET: &str = "target.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
pub(crate) const META: &str = "meta.json";

/// The JSON part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    /// [`CHECKPOINT_VERSION`].
    pub format_version: u32,
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch the loader is in.
    pub epoch: u64,
    /// Where the loader resumes (None for checkpoints made without a loader).
    pub loader: Option<LoaderState>,
    /// Batch size the schedules were scaled for.
    pub batch_size: usize,
    /// The trainer config (model, optimizer, schedule, seed).
    pub config: TrainerConfig,
    /// Side in pixels of the views the encoder was trained on, evaluation's default input
    /// size; `None` when not recorded (runs without a loader, older checkpoints).
    #[serde(default)]
    pub view_size: Option<u32>,
    /// Seconds since the Unix epoch when written.
    pub created_unix: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>, TrainError> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&candle_core::Device::Cpu)?)))
        .collect::<Result<_, TrainError>>()?;
    let views = cpu.iter().map(|(n, t)| (n.as_str(), t));
    safetensors::serialize(views, None)
        .map_err(|e| TrainError::Checkpoint(format!("serialising: {e}")))
}

fn named(vars: Vec<(String, Var)>) -> Vec<(String, Tensor)> {
    vars.into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect()
}

/// Checkpoint folders in `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join(META).is_file().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint in `dir`.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    list(dir).pop().map(|(_, p)| p)
}

/// Writes a checkpoint of `trainer` into `dir` and keeps the newest `keep_last`; `epoch`,
/// `loader` and `view_size` are recorded in its meta.
pub fn save(
    dir: &Path,
    trainer: &Trainer,
    epoch: u64,
    loader: Option<LoaderState>,
    view_size: Option<u32>,
) -> Result<PathBuf, TrainError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let name = format!("step-{:010}", trainer.steps_done());
    let tmp = dir.join(format!("{name}.tmp"));
    let done = dir.join(&name);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let model = trainer.model();
    write_synced(
        &tmp.join(ONLINE),
        &safetensors_bytes(&named(model.online_named()))?,
    )?;
    write_synced(
        &tmp.join(TARGET),
        &safetensors_bytes(&named(model.target_named()))?,
    )?;
    write_synced(
        &tmp.join(OPTIMIZER),
        &safetensors_bytes(&trainer.optimizer().state())?,
    )?;
    let meta = CheckpointMeta {
        format_version: CHECKPOINT_VERSION,
        step: trainer.steps_done(),
        epoch,
        loader,
        batch_size: trainer.batch_size(),
        config: trainer.config().clone(),
        view_size,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
    write_synced(&tmp.join(META), &json)?;
    File::open(&tmp)
        .and_then(|d| d.sync_all())
        .map_err(io(&tmp))?;
    if done.exists() {
        fs::remove_dir_all(&done).map_err(io(&done))?;
    }
    fs::rename(&tmp, &done).map_err(io(&done))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    prune(dir, trainer.config().train.keep_last)?;
    Ok(done)
}

/// Removes all but the newest `keep` checkpoints, and leftover `.tmp` folders.
fn prune(dir: &Path, keep: usize) -> Result<(), TrainError> {
    let all = list(dir);
    for (_, p) in &all[..all.len().saturating_sub(keep)] {
        fs::remove_dir_all(p).map_err(io(p))?;
    }
    for e in fs::read_dir(dir).map_err(io(dir))?.flatten() {
        if e.file_name().to_string_lossy().ends_with(".tmp") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    Ok(())
}

/// Reads the meta of the checkpoint at `path`.
pub fn read_meta(path: &Path) -> Result<CheckpointMeta, TrainError> {
    let file = path.join(META);
    let bytes = fs::read(&file).map_err(io(&file))?;
    let meta: CheckpointMeta = serde_json::from_slice(&bytes)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", file.display())))?;
    if meta.format_version != CHECKPOINT_VERSION {
        return Err(TrainError::Checkpoint(format!(
            "{}: checkpoint format {} is not supported (this build reads {CHECKPOINT_VERSION})",
            file.display(),
            meta.format_version
        )));
    }
    Ok(meta)
}

fn load_tensors(path: &Path, trainer: &Trainer) -> Result<HashMap<String, Tensor>, TrainError> {
    candle_core::safetensors::load(path, trainer.device())
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))
}

pub(crate) fn restore_vars(
    vars: Vec<(String, Var)>,
    tensors: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<(), TrainError> {
    if vars.len() != tensors.len() {
        return Err(TrainError::Checkpoint(format!(
            "{}: {} tensors, the model has {}",
            file.display(),
            tensors.len(),
            vars.len()
        )));
    }
    for (name, var) in vars {
        let t = tensors.get(&name).ok_or_else(|| {
            TrainError::Checkpoint(format!("{}: {name} is missing", file.display()))
        })?;
        if t.dims() != var.dims() {
            return Err(TrainError::Checkpoint(format!(
                "{}: {name} has shape {:?}, the model has {:?}",
                file.display(),
                t.dims(),
                var.dims()
            )));
        }
        var.set(t)?;
    }
    Ok(())
}

impl Trainer {
    /// Restores weights, optimizer state and step from the checkpoint at `path`.
    ///
    /// Refuses a checkpoint made with another model, optimizer or batch size, naming the
    /// difference; nothing is changed then.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<CheckpointMeta, TrainError> {
        let meta = read_meta(path)?;
        let mismatch = |what: &str, theirs: String, ours: String| {
            TrainError::Checkpoint(format!(
                "{} was made with {what} {theirs}, this run has {ours}",
                path.display()
            ))
        };
        if meta.config.model != self.config().model {
            return Err(mismatch(
                "model",
                format!("{:?}", meta.config.model),
                format!("{:?}", self.config().model),
            ));
        }
        if meta.config.optim.optimizer != self.config().optim.optimizer {
            return Err(mismatch(
                "optimizer",
                format!("{:?}", meta.config.optim.optimizer),
                format!("{:?}", self.config().optim.optimizer),
            ));
        }
        if meta.batch_size != self.batch_size() {
            return Err(mismatch(
                "batch size",
                meta.batch_size.to_string(),
                self.batch_size().to_string(),
            ));
        }
        let online = load_tensors(&path.join(ONLINE), self)?;
        let target = load_tensors(&path.join(TARGET), self)?;
        let optim = load_tensors(&path.join(OPTIMIZER), self)?;
        let (model, optimizer, step) = self.parts_mut();
        restore_vars(model.online_named(), &online, &path.join(ONLINE))?;
        restore_vars(model.target_named(), &target, &path.join(TARGET))?;
        optimizer.load_state(&optim)?;
        *step = meta.step;
        Ok(meta)
    }
}
