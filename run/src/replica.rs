//! Data-parallel training as one leader and its followers.
//!
//! Rank 0 runs the single-process run ([`Run`](crate::Run), the daemon's loop, `byol
//! train`'s loop) and decides everything that depends on time, the disk or the outside
//! world: settings, the data generation, signals, the checkpoint clock, when a run
//! stops. Where the other ranks must act with it, it sends them one [`Order`] through
//! its [`Leader`]; [`follow`] is every other rank's whole life, and needs no policy.
//! The collectives inside a step (gradient buckets, synced BatchNorm, the health
//! gather) stay in the trainer: an order says which of them comes next, so every rank
//! calls them in the same sequence. A follower's own error ends the whole job, as rank
//! 0's does (the binary aborts every rank).
//!
//! On the wire an order is [`HEADER_WORDS`] words broadcast from rank 0, followed by a
//! manifest (JSON) only when the order carries one: a new one, at most once per change
//! of the dataset.

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Duration;

use byol_augment::Augmenter;
use byol_ingest::{Dataset, Manifest};
use byol_loader::{Loader, LoaderConfig, LoaderState};
use byol_trainer::dist::ProcessGroup;
use byol_trainer::input::InputSpec;
use byol_trainer::{Trainer, checkpoint};

use crate::{MANIFEST_PATIENCE, RunError, RunMeta};

/// What rank 0 tells the other ranks to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Order<'a> {
    /// Start the trainer afresh (from `[train] seed`, then `[train] init` when set), or
    /// from the checkpoint of this step: a run's start, and a rollback after a
    /// non-finite loss. Every rank goes on from the same weights.
    Resume {
        /// The checkpoint's step (`None`: afresh).
        step: Option<u64>,
    },
    /// Open the dataset as of rank 0's manifest and start the loader where the last
    /// resume left it.
    Start {
        /// Rank 0's manifest.
        manifest: Cow<'a, Manifest>,
    },
    /// Take one step on this rank's share of the next batch.
    Step {
        /// The dataset view the loader plans its next boundaries with, when it changed
        /// (rank 0's refresh).
        manifest: Option<Cow<'a, Manifest>>,
        /// The schedules' length (`--minutes` fits it once the pace is measured).
        total_steps: u64,
        /// Read the trainer's health after the step (a log step, or a checkpoint).
        read_health: bool,
    },
    /// Read the trainer's health (before a checkpoint, or the last step's line).
    ReadHealth,
    /// Nothing to do for about this long: rank 0 waits for data, or is paused.
    Wait {
        /// Milliseconds.
        millis: u64,
    },
    /// The run is over: return.
    Stop,
}

/// Words of an order's fixed-size part.
pub const HEADER_WORDS: usize = 4;

const RESUME: u64 = 1;
const START: u64 = 2;
const STEP: u64 = 3;
const READ_HEALTH: u64 = 4;
const WAIT: u64 = 5;
const STOP: u64 = 6;

impl Order<'_> {
    /// The fixed-size words, and the manifest that follows them, if any.
    fn encode(&self) -> ([u64; HEADER_WORDS], Option<&Manifest>) {
        // Every order is destructured in full: a new field does not compile until it
        // is sent too.
        match self {
            Order::Resume { step } => (
                [RESUME, u64::from(step.is_some()), step.unwrap_or(0), 0],
                None,
            ),
            Order::Start { manifest } => ([START, 0, 0, 0], Some(manifest)),
            Order::Step {
                manifest,
                total_steps,
                read_health,
            } => (
                [
                    STEP,
                    u64::from(manifest.is_some()),
                    *total_steps,
                    u64::from(*read_health),
                ],
                manifest.as_deref(),
            ),
            Order::ReadHealth => ([READ_HEALTH, 0, 0, 0], None),
            Order::Wait { millis } => ([WAIT, *millis, 0, 0], None),
            Order::Stop => ([STOP, 0, 0, 0], None),
        }
    }

    /// Whether the order of these words carries a manifest after them.
    fn carries_manifest(words: &[u64; HEADER_WORDS]) -> bool {
        words[0] == START || (words[0] == STEP && words[1] == 1)
    }

    /// The order of `words` (and its manifest's JSON, when it carries one).
    ///
    /// Errors: an unknown order, or a manifest that does not parse.
    fn decode(
        words: [u64; HEADER_WORDS],
        manifest: Option<&[u8]>,
    ) -> Result<Order<'static>, RunError> {
        let manifest = manifest
            .map(|bytes| {
                serde_json::from_slice::<Manifest>(bytes)
                    .map(Cow::Owned)
                    .map_err(|e| RunError::Peer(format!("rank 0's manifest: {e}")))
            })
            .transpose()?;
        Ok(match (words[0], manifest) {
            (RESUME, _) => Order::Resume {
                step: (words[1] == 1).then_some(words[2]),
            },
            (START, Some(manifest)) => Order::Start { manifest },
            (STEP, manifest) => Order::Step {
                manifest,
                total_steps: words[2],
                read_health: words[3] == 1,
            },
            (READ_HEALTH, _) => Order::ReadHealth,
            (WAIT, _) => Order::Wait { millis: words[1] },
            (STOP, _) => Order::Stop,
            _ => {
                return Err(RunError::Peer(format!(
                    "an order this rank does not know: {words:?}"
                )));
            }
        })
    }
}

/// How orders travel from rank 0 to the other ranks: a broadcast (MPI's through
/// [`ProcessGroup`]; a channel in tests). Rank 0 sends what it passes; every other rank
/// receives into it.
pub trait Link: Sync {
    /// Broadcasts `words` (the same length on every rank).
    fn broadcast_u64(&self, words: &mut [u64]);
    /// Broadcasts `bytes` (receivers' are resized to rank 0's length).
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>);
}

impl Link for ProcessGroup {
    fn broadcast_u64(&self, words: &mut [u64]) {
        ProcessGroup::broadcast_u64(self, words);
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
        ProcessGroup::broadcast_bytes(self, bytes);
    }
}

/// Rank 0's end: sends [`Order`]s to the followers (none in a world of one, where
/// sending costs nothing).
#[derive(Clone, Copy)]
pub struct Leader {
    link: Option<&'static dyn Link>,
    world: usize,
}

impl std::fmt::Debug for Leader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leader")
            .field("world", &self.world)
            .finish()
    }
}

impl Leader {
    /// A leader without followers (one process).
    pub fn alone() -> Self {
        Leader {
            link: None,
            world: 1,
        }
    }

    /// Rank 0 of `group`: its followers are the group's other ranks.
    pub fn of_group(group: &'static ProcessGroup) -> Self {
        if group.world() == 1 {
            return Self::alone();
        }
        Leader {
            link: Some(group),
            world: group.world(),
        }
    }

    /// A leader whose orders go through `link` to `world - 1` followers.
    pub fn with_link(link: &'static dyn Link, world: usize) -> Self {
        Leader {
            link: (world > 1).then_some(link),
            world,
        }
    }

    /// Processes in the job, this one included (each trains an equal share of every
    /// global batch).
    pub fn world(&self) -> usize {
        self.world
    }

    /// Other ranks follow this one.
    pub fn has_followers(&self) -> bool {
        self.link.is_some()
    }

    /// Sends `order` to every follower (nothing without followers).
    pub fn send(&self, order: &Order) {
        let Some(link) = self.link else {
            return;
        };
        let (mut words, manifest) = order.encode();
        link.broadcast_u64(&mut words);
        if let Some(manifest) = manifest {
            let mut bytes = serde_json::to_vec(manifest).expect("a manifest serialises");
            link.broadcast_bytes(&mut bytes);
        }
    }
}

/// This process's share of every global batch in `group` (the loader's
/// [`byol_loader::Part`]): every rank, rank 0 included, loads its own.
pub fn share(group: &ProcessGroup) -> byol_loader::Part {
    byol_loader::Part {
        rank: group.rank(),
        world: group.world(),
    }
}

/// Receives rank 0's next order (a follower's end of [`Leader::send`]).
///
/// Errors: an unknown order, or a manifest that does not parse.
pub fn receive(link: &dyn Link) -> Result<Order<'static>, RunError> {
    let mut words = [0u64; HEADER_WORDS];
    link.broadcast_u64(&mut words);
    if Order::carries_manifest(&words) {
        let mut bytes = Vec::new();
        link.broadcast_bytes(&mut bytes);
        Order::decode(words, Some(&bytes))
    } else {
        Order::decode(words, None)
    }
}

/// What a follower trains with: what rank 0's run is built from, from the same config.
pub struct FollowerParts {
    /// A fresh trainer of the run's config (the first [`Order::Resume`] sets it).
    pub trainer: Trainer,
    /// The dataset folder.
    pub data: PathBuf,
    /// BYOL's two views.
    pub augmenter: Augmenter,
    /// Batches, with this rank's part of each.
    pub loader: LoaderConfig,
    /// The run's checkpoint folder (read only).
    pub checkpoints: PathBuf,
}

/// A follower rank's whole life: carries out rank 0's orders until [`Order::Stop`], and
/// returns its trainer as the run left it. Rank 0 calls the same collectives in the
/// same sequence for each order (its [`Leader`] sends an order before each).
///
/// Errors: an order cannot be carried out here (the checkpoint rank 0 resumed from is
/// not in the folder, the dataset or its shards cannot be opened within
/// [`MANIFEST_PATIENCE`], a step failed), or an order makes no sense here (a step
/// before the start). The job then ends, as for rank 0's errors.
pub fn follow(parts: FollowerParts, link: &dyn Link) -> Result<Trainer, RunError> {
    let FollowerParts {
        mut trainer,
        data,
        augmenter,
        loader: loader_cfg,
        checkpoints,
    } = parts;
    let size = InputSpec::of_views(augmenter.config()).size as usize;
    let mut augmenter = Some(augmenter);
    let mut resumed_at: Option<LoaderState> = None;
    let mut loader: Option<Loader> = None;
    loop {
        match receive(link)? {
            Order::Resume { step } => {
                let (fresh, state) = restart(&trainer, step, &checkpoints)?;
                trainer = fresh;
                resumed_at = state;
            }
            Order::Start { manifest } => {
                let augmenter = augmenter
                    .take()
                    .ok_or_else(|| RunError::Peer("rank 0 started the loader twice".into()))?;
                let dataset = open_as(&data, manifest.into_owned())?;
                loader = Some(Loader::new(
                    dataset,
                    augmenter,
                    loader_cfg.clone(),
                    resumed_at,
                )?);
            }
            Order::Step {
                manifest,
                total_steps,
                read_health,
            } => {
                let loader = loader
                    .as_mut()
                    .ok_or_else(|| RunError::Peer("rank 0 stepped before the start".into()))?;
                if let Some(manifest) = manifest {
                    loader.apply_manifest(manifest.into_owned(), MANIFEST_PATIENCE)?;
                }
                if trainer.config().train.total_steps != total_steps {
                    trainer.set_total_steps(total_steps);
                }
                let batch = loader.next_batch();
                trainer.step(batch.view1(), batch.view2(), size)?;
                drop(batch);
                if read_health {
                    // A non-finite loss is rank 0's to act on (it sends a resume).
                    trainer.read_health()?;
                }
            }
            Order::ReadHealth => {
                trainer.read_health()?;
            }
            Order::Wait { millis } => std::thread::sleep(Duration::from_millis(millis)),
            Order::Stop => return Ok(trainer),
        }
    }
}

/// `trainer`'s config started afresh (seed, then `[train] init`), or from the
/// checkpoint of `step` in `checkpoints`, with the loader position it recorded.
fn restart(
    trainer: &Trainer,
    step: Option<u64>,
    checkpoints: &std::path::Path,
) -> Result<(Trainer, Option<LoaderState>), RunError> {
    let mut fresh = Trainer::new(trainer.config().clone(), trainer.batch_size())?;
    let Some(step) = step else {
        if let Some(init) = fresh.config().train.init.clone() {
            fresh.start_from(&init)?;
        }
        return Ok((fresh, None));
    };
    let path = checkpoint::list(checkpoints)
        .into_iter()
        .find(|(s, _)| *s == step)
        .map(|(_, p)| p)
        .ok_or_else(|| {
            RunError::Resume(format!(
                "rank 0 resumed from step {step}, which is not in {}",
                checkpoints.display()
            ))
        })?;
    let meta = fresh.load_checkpoint(&path)?;
    let run = RunMeta::from_checkpoint(&meta, &path)?;
    Ok((fresh, run.loader))
}

/// The dataset at `data` as of rank 0's `manifest`: retried, with the shards it lists,
/// for up to [`MANIFEST_PATIENCE`] (a commit rank 0 saw first, on shared storage).
fn open_as(data: &std::path::Path, manifest: Manifest) -> Result<Dataset, RunError> {
    let deadline = std::time::Instant::now() + MANIFEST_PATIENCE;
    loop {
        let attempt = Dataset::open(data)
            .and_then(|ds| Ok(ds.with_manifest(manifest.clone())?.unwrap_or(ds)));
        match attempt {
            Ok(ds) => return Ok(ds),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
