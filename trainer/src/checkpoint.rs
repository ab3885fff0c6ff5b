//! Checkpoints: online, target and optimizer state as safetensors, plus `meta.json`.
//!
//! A checkpoint is a folder `step-NNNNNNNNNN/` written as `step-NNNNNNNNNN.tmp/`, every
//! file fsynced, then renamed (and the parent fsynced): a killed write leaves only a
//! `.tmp` folder, which loaders ignore and [`prune`] removes. `meta.json` holds the
//! blake3 of every tensor file, so a damaged checkpoint is detected ([`verify`]) rather
//! than loaded. This module is the IO; which checkpoints to keep is the caller's policy
//! ([`prune`]), and what else a run records (loader position, epoch) is the caller's
//! JSON, kept in [`CheckpointMeta::run`].

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use byol_ingest::fsutil;
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

/// Folder of a run folder that holds its checkpoints (`RUN/checkpoints/`).
pub const RUN_CHECKPOINTS_DIR: &str = "checkpoints";

/// The JSON part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// [`CHECKPOINT_VERSION`].
    pub format_version: u32,
    /// Optimizer steps done.
    pub step: u64,
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
    /// blake3 (hex) of each tensor file by name; empty in checkpoints written before
    /// checksums were recorded (those load unverified).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checksums: BTreeMap<String, String>,
    /// What the run that wrote it records beside the weights (its other top-level keys:
    /// the loader's resume state and epoch, for `byol train` and the daemon).
    #[serde(flatten)]
    pub run: serde_json::Map<String, serde_json::Value>,
}

/// What is wrong with a checkpoint ([`TrainError::Checkpoint`]).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointProblem {
    /// A file's bytes do not match the checksum in `meta.json`.
    #[error("checksum mismatch (the file is damaged)")]
    ChecksumMismatch,
    /// A file does not parse (JSON or safetensors), or cannot be serialised.
    #[error("unreadable: {0}")]
    Unreadable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Written by a checkpoint format this build does not read.
    #[error("checkpoint format {found} is not supported (this build reads {CHECKPOINT_VERSION})")]
    UnsupportedVersion {
        /// The version in `meta.json`.
        found: u32,
    },
    /// The file holds another number of tensors than the model.
    #[error("{found} tensors, the model has {expected}")]
    TensorCount {
        /// Tensors in the file.
        found: usize,
        /// Tensors of the model.
        expected: usize,
    },
    /// A tensor of the model is not in the file.
    #[error("{0} is missing")]
    MissingTensor(String),
    /// A tensor has another shape than the model's.
    #[error("{name} has shape {found:?}, the model has {expected:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// Its shape in the file.
        found: Vec<usize>,
        /// The model's.
        expected: Vec<usize>,
    },
    /// Made with another model, optimizer or batch size than this run.
    #[error("was made with {what} {theirs}, this run has {ours}")]
    Mismatch {
        /// `model`, `optimizer` or `batch size`.
        what: &'static str,
        /// The checkpoint's value.
        theirs: String,
        /// This run's.
        ours: String,
    },
}

impl CheckpointProblem {
    /// True for damage (a checksum, an unparsable file, missing or misshapen tensors),
    /// false for a checkpoint that is whole but does not suit this build or run.
    pub fn is_damage(&self) -> bool {
        !matches!(
            self,
            CheckpointProblem::UnsupportedVersion { .. } | CheckpointProblem::Mismatch { .. }
        )
    }
}

fn problem(path: &Path, problem: CheckpointProblem) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_owned(),
        problem,
    }
}

fn unreadable(
    path: &Path,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> TrainError + '_ {
    move |e| problem(path, CheckpointProblem::Unreadable(e))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_owned(),
        source,
    }
}

fn checksum(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn safetensors_bytes(tensors: &[(String, Tensor)], file: &Path) -> Result<Vec<u8>, TrainError> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&candle_core::Device::Cpu)?)))
        .collect::<Result<_, TrainError>>()?;
    let views = cpu.iter().map(|(n, t)| (n.as_str(), t));
    safetensors::serialize(views, None).map_err(|e| unreadable(file)(e.into()))
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

/// Writes a checkpoint of `trainer` into `dir` as `step-NNNNNNNNNN/`; `view_size` and
/// the caller's `run` JSON go into its meta. Returns its folder. Retention is
/// [`prune`]'s job.
///
/// Errors: a file cannot be written ([`TrainError::Io`], naming it).
pub fn save(
    dir: &Path,
    trainer: &Trainer,
    view_size: Option<u32>,
    run: serde_json::Map<String, serde_json::Value>,
) -> Result<PathBuf, TrainError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let name = format!("step-{:010}", trainer.steps_done());
    let tmp = dir.join(format!("{name}.tmp"));
    let done = dir.join(&name);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    // A failed write (a full disk) leaves nothing behind to fill the disk further.
    if let Err(e) = write_files(&tmp, trainer, view_size, run) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if done.exists() {
        fs::remove_dir_all(&done).map_err(io(&done))?;
    }
    fsutil::rename_durable(&tmp, &done).map_err(io(&done))?;
    Ok(done)
}

/// Writes the tensor files and the meta of a checkpoint into `tmp`, each fsynced, then
/// the folder.
fn write_files(
    tmp: &Path,
    trainer: &Trainer,
    view_size: Option<u32>,
    run: serde_json::Map<String, serde_json::Value>,
) -> Result<(), TrainError> {
    let model = trainer.model();
    let files = [
        (
            ONLINE,
            safetensors_bytes(&named(model.online_named()), &tmp.join(ONLINE))?,
        ),
        (
            TARGET,
            safetensors_bytes(&named(model.target_named()), &tmp.join(TARGET))?,
        ),
        (
            OPTIMIZER,
            safetensors_bytes(&trainer.optimizer().state(), &tmp.join(OPTIMIZER))?,
        ),
    ];
    let mut checksums = BTreeMap::new();
    for (file, bytes) in &files {
        let path = tmp.join(file);
        fsutil::write_synced(&path, bytes).map_err(io(&path))?;
        checksums.insert((*file).to_owned(), checksum(bytes));
        byol_ingest::fault::abort_if("BYOL_TEST_ABORT_IN_CHECKPOINT", trainer.steps_done());
    }
    let meta = CheckpointMeta {
        format_version: CHECKPOINT_VERSION,
        step: trainer.steps_done(),
        batch_size: trainer.batch_size(),
        config: trainer.config().clone(),
        view_size,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        checksums,
        run,
    };
    let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
    let meta_path = tmp.join(META);
    fsutil::write_synced(&meta_path, &json).map_err(io(&meta_path))?;
    fsutil::sync_dir(tmp).map_err(io(tmp))
}

/// Removes all but the newest `keep` checkpoints in `dir`, and leftover `.tmp` folders
/// of interrupted writes.
pub fn prune(dir: &Path, keep: usize) -> Result<(), TrainError> {
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

/// Reads the meta of the checkpoint at `path` and checks every tensor file against
/// its recorded checksum: a damaged checkpoint (a flipped bit, a truncated file, a file
/// missing) is an error naming the file, not weights that load wrong.
pub fn verify(path: &Path) -> Result<CheckpointMeta, TrainError> {
    let meta = read_meta(path)?;
    for file in meta.checksums.keys() {
        let p = path.join(file);
        check_sum(&p, &fs::read(&p).map_err(io(&p))?, &meta)?;
    }
    Ok(meta)
}

/// Checks the bytes of the checkpoint file `path` against its checksum in `meta` (files
/// of checkpoints without checksums pass).
fn check_sum(path: &Path, bytes: &[u8], meta: &CheckpointMeta) -> Result<(), TrainError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    match meta.checksums.get(name.as_ref()) {
        Some(expected) if checksum(bytes) != *expected => {
            Err(problem(path, CheckpointProblem::ChecksumMismatch))
        }
        _ => Ok(()),
    }
}

/// Reads the meta of the checkpoint at `path`.
pub fn read_meta(path: &Path) -> Result<CheckpointMeta, TrainError> {
    let file = path.join(META);
    let bytes = fs::read(&file).map_err(io(&file))?;
    let meta: CheckpointMeta =
        serde_json::from_slice(&bytes).map_err(|e| unreadable(&file)(e.into()))?;
    if meta.format_version != CHECKPOINT_VERSION {
        return Err(problem(
            &file,
            CheckpointProblem::UnsupportedVersion {
                found: meta.format_version,
            },
        ));
    }
    Ok(meta)
}

/// The tensors of one file of a checkpoint, checked against `meta`'s checksum.
pub(crate) fn load_tensors(
    path: &Path,
    meta: &CheckpointMeta,
    device: &candle_core::Device,
) -> Result<HashMap<String, Tensor>, TrainError> {
    let bytes = fs::read(path).map_err(io(path))?;
    check_sum(path, &bytes, meta)?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| unreadable(path)(e.into()))
}

pub(crate) fn restore_vars(
    vars: Vec<(String, Var)>,
    tensors: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<(), TrainError> {
    if vars.len() != tensors.len() {
        return Err(problem(
            file,
            CheckpointProblem::TensorCount {
                found: tensors.len(),
                expected: vars.len(),
            },
        ));
    }
    for (name, var) in vars {
        let Some(t) = tensors.get(&name) else {
            return Err(problem(file, CheckpointProblem::MissingTensor(name)));
        };
        if t.dims() != var.dims() {
            return Err(problem(
                file,
                CheckpointProblem::Shape {
                    name,
                    found: t.dims().to_vec(),
                    expected: var.dims().to_vec(),
                },
            ));
        }
        var.set(t)?;
    }
    Ok(())
}

impl Trainer {
    /// Restores weights, optimizer state and step from the checkpoint at `path`.
    ///
    /// Refuses a checkpoint made with another model, optimizer or batch size, naming the
    /// difference, or one whose files fail their checksums; nothing is changed then.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<CheckpointMeta, TrainError> {
        let meta = read_meta(path)?;
        self.check_fits(&meta, path)?;
        let device = self.device().clone();
        let online = load_tensors(&path.join(ONLINE), &meta, &device)?;
        let target = load_tensors(&path.join(TARGET), &meta, &device)?;
        let optim = load_tensors(&path.join(OPTIMIZER), &meta, &device)?;
        let (model, optimizer, step) = self.parts_mut();
        restore_vars(model.online_named(), &online, &path.join(ONLINE))?;
        restore_vars(model.target_named(), &target, &path.join(TARGET))?;
        optimizer.load_state(&optim)?;
        *step = meta.step;
        Ok(meta)
    }

    /// Refuses a checkpoint (its `meta`, read from `path`) made with another model,
    /// optimizer or batch size, naming the difference.
    pub fn check_fits(&self, meta: &CheckpointMeta, path: &Path) -> Result<(), TrainError> {
        let mismatch = |what: &'static str, theirs: String, ours: String| {
            problem(path, CheckpointProblem::Mismatch { what, theirs, ours })
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
        Ok(())
    }
}
