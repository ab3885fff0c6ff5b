//! Checkpoints: the online variables, the objective's state and the optimizer's state as
//! safetensors, plus `meta.json`.
//!
//! Format versions this build reads ([`READABLE_VERSIONS`]):
//! - **2** (written now): `online.safetensors` (the shared network `encoder.*`,
//!   `projector.*` and the objective's trained heads, e.g. BYOL's `predictor.*`, with
//!   BatchNorm's running statistics including `num_batches_tracked`),
//!   `objective.safetensors` (the method's state: BYOL's target as `target.*`, MSF's
//!   also its bank as `bank.*`, MoCo v2's key encoder `key.*` and queue `queue.*`; empty
//!   for SimSiam, SimCLR and Barlow Twins),
//!   `optimizer.safetensors`, and `meta.json` naming the `method`.
//! - **1**: BYOL only: `online.safetensors` without `num_batches_tracked` (taken as 2 per
//!   step, the training-mode forwards a step made), `target.safetensors` (the target
//!   under its own names), `optimizer.safetensors`; no `method` (BYOL).
//!
//! This module is the IO of a [`TrainerState`] (the trainer gives and takes the state:
//! [`crate::Trainer::state`], [`crate::Trainer::restore`]); format 1 is upgraded to the
//! state's terms as it is read.
//!
//! A checkpoint is a folder `step-NNNNNNNNNN/` written as `step-NNNNNNNNNN.tmp/`, every
//! file fsynced, then renamed (and the parent fsynced): a killed write leaves only a
//! `.tmp` folder, which loaders ignore and [`prune`] removes. `meta.json` holds the
//! blake3 of every tensor file, so a damaged checkpoint is detected ([`verify`]) rather
//! than loaded. This module is the IO; which checkpoints to keep is the caller's policy
//! ([`prune`]), and what else a run records (loader position, epoch) is the caller's
//! JSON, kept in [`CheckpointMeta::run`].

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use byol_ingest::fsutil;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::config::{Method, TrainerConfig};
use crate::input::InputSpec;
use crate::state::{RestoreError, StateDict, StateError, StateOrigin, StatePart, TrainerState};

/// Version of the checkpoint layout written (see the module docs for what each holds).
pub const CHECKPOINT_VERSION: u32 = 2;
/// Versions this build loads; others are refused.
pub const READABLE_VERSIONS: [u32; 2] = [1, 2];
pub(crate) const ONLINE: &str = "online.safetensors";
const OBJECTIVE: &str = "objective.safetensors";
/// Format 1's target network (format 2 keeps it in `objective.safetensors`).
const V1_TARGET: &str = "target.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
pub(crate) const META: &str = "meta.json";

/// Folder of a run folder that holds its checkpoints (`RUN/checkpoints/`).
pub const RUN_CHECKPOINTS_DIR: &str = "checkpoints";

/// The JSON part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// [`CHECKPOINT_VERSION`] when written by this build; one of [`READABLE_VERSIONS`].
    pub format_version: u32,
    /// The objective (`byol`, …); format 1 checkpoints are BYOL's.
    #[serde(default = "byol_method")]
    pub method: String,
    /// Optimizer steps done.
    pub step: u64,
    /// Batch size the schedules were scaled for.
    pub batch_size: usize,
    /// The trainer config (model, optimizer, schedule, seed).
    pub config: TrainerConfig,
    /// Side in pixels of the views the encoder was trained on, evaluation's default input
    /// size; `None` when not recorded (runs without a loader, older checkpoints). Written
    /// beside [`CheckpointMeta::input`] (its `size`) for readers that know only this.
    #[serde(default)]
    pub view_size: Option<u32>,
    /// The preprocessing the encoder expects (the views' size, normalisation and resize
    /// filter); `None` in checkpoints written before it was recorded and in runs without
    /// a loader: see [`CheckpointMeta::input_or_imagenet`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<InputSpec>,
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

impl CheckpointMeta {
    /// The recorded preprocessing, or, for a checkpoint without a record, ImageNet's
    /// statistics at the recorded view size (else `default_size`); the flag says which.
    pub fn input_or_imagenet(&self, default_size: u32) -> (InputSpec, bool) {
        match &self.input {
            Some(input) => (input.clone(), true),
            None => (
                InputSpec::imagenet(self.view_size.unwrap_or(default_size)),
                false,
            ),
        }
    }
}

fn byol_method() -> String {
    Method::Byol.as_str().to_owned()
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
    #[error("checkpoint format {found} is not supported (this build reads {READABLE_VERSIONS:?})")]
    UnsupportedVersion {
        /// The version in `meta.json`.
        found: u32,
    },
    /// Made with an objective this build does not know.
    #[error("was made with method {0}, which this build does not know")]
    UnknownMethod(String),
    /// The file's tensors do not fit the model: a count, a name or a shape, or a value
    /// out of range (a memory's pointer).
    #[error(transparent)]
    Tensors(Box<StateError>),
    /// Made with another method, model, optimizer or batch size than this run.
    #[error("was made with {what} {theirs}, this run has {ours}")]
    Mismatch {
        /// `method`, `model`, `optimizer`, `batch size`, or a memory's size key.
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
            CheckpointProblem::UnsupportedVersion { .. }
                | CheckpointProblem::UnknownMethod(_)
                | CheckpointProblem::Mismatch { .. }
        )
    }
}

fn problem(path: &Path, problem: CheckpointProblem) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_owned(),
        problem,
    }
}

/// A [`StateError`] about the checkpoint file (or folder) `path` as a [`TrainError`]: a
/// [`TrainError::Checkpoint`] with the same problem, or the device's error.
pub(crate) fn state_error(path: &Path, e: StateError) -> TrainError {
    let p = match e {
        StateError::Candle(e) => return TrainError::Candle(e),
        StateError::Mismatch { what, theirs, ours } => {
            CheckpointProblem::Mismatch { what, theirs, ours }
        }
        tensors => CheckpointProblem::Tensors(Box::new(tensors)),
    };
    problem(path, p)
}

/// A refused restore of the checkpoint at `path` (`meta` read from it), naming the file
/// of the refused part (the folder for its settings). Only the settings give a
/// [`CheckpointProblem::Mismatch`]; every other part's refusal is damage.
pub(crate) fn restore_error(path: &Path, meta: &CheckpointMeta, e: RestoreError) -> TrainError {
    let file = match e.part {
        StatePart::Origin => path.to_owned(),
        StatePart::Online => path.join(ONLINE),
        StatePart::Objective if meta.format_version == 1 => path.join(V1_TARGET),
        StatePart::Objective => path.join(OBJECTIVE),
        StatePart::Optimizer => path.join(OPTIMIZER),
    };
    match e.error {
        // The settings fit (checked from the meta first): a file that disagrees with
        // them, a memory of another size, is damage, not a config error.
        mismatch @ StateError::Mismatch { .. } if e.part != StatePart::Origin => {
            problem(&file, CheckpointProblem::Tensors(Box::new(mismatch)))
        }
        error => state_error(&file, error),
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

fn safetensors_bytes(tensors: &StateDict, file: &Path) -> Result<Vec<u8>, TrainError> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.to_owned(), crate::host::to_cpu(t)?)))
        .collect::<Result<_, TrainError>>()?;
    let views = cpu.iter().map(|(n, t)| (n.as_str(), t));
    safetensors::serialize(views, None).map_err(|e| unreadable(file)(e.into()))
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

/// The folder of step `step`'s checkpoint in `dir`: `step-NNNNNNNNNN` (ten digits).
pub fn folder(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:010}"))
}

/// Writes a checkpoint of `state` (a [`crate::Trainer::state`]) into `dir` as
/// `step-NNNNNNNNNN/`; `input` (the preprocessing the encoder was trained with) and the
/// caller's `run` JSON go into its meta. Returns its folder. Retention is [`prune`]'s
/// job.
///
/// Errors: a file cannot be written ([`TrainError::Io`], naming it).
pub fn save(
    dir: &Path,
    state: &TrainerState,
    input: Option<&InputSpec>,
    run: serde_json::Map<String, serde_json::Value>,
) -> Result<PathBuf, TrainError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let done = folder(dir, state.step);
    let tmp = done.with_extension("tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    // A failed write (a full disk) leaves nothing behind to fill the disk further.
    if let Err(e) = write_files(&tmp, state, input, run) {
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
    state: &TrainerState,
    input: Option<&InputSpec>,
    run: serde_json::Map<String, serde_json::Value>,
) -> Result<(), TrainError> {
    let files = [
        (ONLINE, safetensors_bytes(&state.online, &tmp.join(ONLINE))?),
        (
            OBJECTIVE,
            safetensors_bytes(&state.objective, &tmp.join(OBJECTIVE))?,
        ),
        (
            OPTIMIZER,
            safetensors_bytes(&state.optimizer, &tmp.join(OPTIMIZER))?,
        ),
    ];
    let mut checksums = BTreeMap::new();
    for (file, bytes) in &files {
        let path = tmp.join(file);
        fsutil::write_synced(&path, bytes).map_err(io(&path))?;
        checksums.insert((*file).to_owned(), checksum(bytes));
        byol_ingest::fault::abort_if("BYOL_TEST_ABORT_IN_CHECKPOINT", state.step);
    }
    let meta = CheckpointMeta {
        format_version: CHECKPOINT_VERSION,
        method: state.origin.method.as_str().to_owned(),
        step: state.step,
        batch_size: state.origin.batch_size,
        config: state.origin.config.clone(),
        view_size: input.map(|i| i.size),
        input: input.cloned(),
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
///
/// Errors: unreadable; a format version this build does not read, or a method it does
/// not know (each named, before the rest of the meta is parsed).
pub fn read_meta(path: &Path) -> Result<CheckpointMeta, TrainError> {
    /// The keys that say whether the rest can be read at all.
    #[derive(Deserialize)]
    struct Head {
        format_version: u32,
        #[serde(default = "byol_method")]
        method: String,
    }
    let file = path.join(META);
    let bytes = fs::read(&file).map_err(io(&file))?;
    let head: Head = serde_json::from_slice(&bytes).map_err(|e| unreadable(&file)(e.into()))?;
    if !READABLE_VERSIONS.contains(&head.format_version) {
        return Err(problem(
            &file,
            CheckpointProblem::UnsupportedVersion {
                found: head.format_version,
            },
        ));
    }
    if head.method.parse::<Method>().is_err() {
        return Err(problem(
            &file,
            CheckpointProblem::UnknownMethod(head.method),
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| unreadable(&file)(e.into()))
}

/// What the checkpoint `meta` (read from `path`) was made with.
///
/// Errors: a method this build does not know ([`CheckpointProblem::UnknownMethod`]).
pub fn origin(meta: &CheckpointMeta, path: &Path) -> Result<StateOrigin, TrainError> {
    let method = meta.method.parse::<Method>().map_err(|_| {
        problem(
            &path.join(META),
            CheckpointProblem::UnknownMethod(meta.method.clone()),
        )
    })?;
    Ok(StateOrigin {
        method,
        batch_size: meta.batch_size,
        config: meta.config.clone(),
    })
}

/// The state of the checkpoint at `path` (`meta` read from it and `origin` from
/// [`origin`]), every file checked against its checksum; format 1 upgraded (BYOL's target
/// under [`crate::objective::byol::TARGET_PREFIX`] in the objective's state, the missing
/// `num_batches_tracked` filled in).
///
/// Errors: a file unreadable, or failing its checksum (naming it).
pub fn read_state(
    path: &Path,
    meta: &CheckpointMeta,
    origin: StateOrigin,
    device: &candle_core::Device,
) -> Result<TrainerState, TrainError> {
    let online = load_online(path, meta, device)?;
    let objective = if meta.format_version == 1 {
        let mut target = load_tensors(&path.join(V1_TARGET), meta, device)?;
        add_batch_counts(&mut target, meta.step, device)?;
        target.with_prefix(crate::objective::byol::TARGET_PREFIX)
    } else {
        load_tensors(&path.join(OBJECTIVE), meta, device)?
    };
    Ok(TrainerState {
        origin,
        step: meta.step,
        online,
        objective,
        optimizer: load_tensors(&path.join(OPTIMIZER), meta, device)?,
    })
}

/// The online variables of the checkpoint at `path` (`meta` read from it), format 1's
/// missing `num_batches_tracked` filled in.
pub(crate) fn load_online(
    path: &Path,
    meta: &CheckpointMeta,
    device: &candle_core::Device,
) -> Result<StateDict, TrainError> {
    let mut tensors = load_tensors(&path.join(ONLINE), meta, device)?;
    if meta.format_version == 1 {
        add_batch_counts(&mut tensors, meta.step, device)?;
    }
    Ok(tensors)
}

/// Format 1 kept no `num_batches_tracked`: each BatchNorm (one per `running_mean`) gets
/// the training-mode forwards of `step` BYOL steps, two (one per view).
fn add_batch_counts(
    tensors: &mut StateDict,
    step: u64,
    device: &candle_core::Device,
) -> Result<(), TrainError> {
    let count = i64::try_from(step.saturating_mul(2)).unwrap_or(i64::MAX);
    let layers: Vec<String> = tensors
        .iter()
        .filter_map(|(n, _)| n.strip_suffix(".running_mean").map(str::to_owned))
        .collect();
    for layer in layers {
        let name = format!("{layer}.num_batches_tracked");
        if !tensors.contains(&name) {
            tensors.insert(name, Tensor::new(count, device)?);
        }
    }
    Ok(())
}

/// The tensors of one file of a checkpoint, checked against `meta`'s checksum.
pub(crate) fn load_tensors(
    path: &Path,
    meta: &CheckpointMeta,
    device: &candle_core::Device,
) -> Result<StateDict, TrainError> {
    let bytes = fs::read(path).map_err(io(path))?;
    check_sum(path, &bytes, meta)?;
    candle_core::safetensors::load_buffer(&bytes, device)
        .map(StateDict::from)
        .map_err(|e| unreadable(path)(e.into()))
}
