//! One training run between steps: [`Run::step`] takes a batch, steps the trainer,
//! logs, and checkpoints when the policy says so.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use byol_loader::{Loader, LoaderState};
use byol_trainer::eval::{Encoder, export_encoder};
use byol_trainer::input::InputSpec;
use byol_trainer::{StepStats, Trainer, checkpoint};

use crate::replica::{Leader, Order};
use crate::{
    CheckpointPolicy, MetricsLine, MetricsSink, Monitor, Operation, RunDir, RunError, RunMeta,
};

/// Test hook: abort the process (as `kill -9` would) right after this step's metrics
/// line, so a test can crash a run at a known step.
const ABORT_AT_STEP_ENV: &str = "BYOL_TEST_ABORT_AT_STEP";
/// Test hook: fail with an error right after this step's metrics line.
const FAIL_AT_STEP_ENV: &str = "BYOL_TEST_FAIL_AT_STEP";
/// Test hook: report this step's loss as NaN (what a diverging run produces), once.
const NAN_AT_STEP_ENV: &str = "BYOL_TEST_NAN_AT_STEP";

/// Deterministic fault points for tests, read from the environment
/// (`BYOL_TEST_ABORT_AT_STEP`, `BYOL_TEST_FAIL_AT_STEP`, `BYOL_TEST_NAN_AT_STEP`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPoints {
    /// Abort the process after this step.
    pub abort_at: Option<u64>,
    /// Return [`RunError::InjectedFault`] after this step.
    pub fail_at: Option<u64>,
    /// Report this step's loss as NaN (the first time the step is reached).
    pub nan_at: Option<u64>,
}

impl FaultPoints {
    /// The fault points set in the environment (none in normal use).
    pub fn from_env() -> Self {
        let step = |key: &str| std::env::var(key).ok().and_then(|v| v.parse().ok());
        FaultPoints {
            abort_at: step(ABORT_AT_STEP_ENV),
            fail_at: step(FAIL_AT_STEP_ENV),
            nan_at: step(NAN_AT_STEP_ENV),
        }
    }
}

/// What a run is made of.
pub struct RunParts {
    /// The run folder (locked by the caller).
    pub dir: RunDir,
    /// The trainer, resumed or fresh.
    pub trainer: Trainer,
    /// The loader, started from the resumed position.
    pub loader: Loader,
    /// The views' preprocessing (side, normalisation, filter): recorded in checkpoints.
    pub input: InputSpec,
    /// When to checkpoint and how many to keep.
    pub policy: CheckpointPolicy,
    /// Log (metrics line, `tracing` event) every this many steps.
    pub log_every: u64,
    /// kNN accuracy every N steps, when configured.
    pub monitor: Option<Monitor>,
    /// Write `RUN/encoder-latest.safetensors` after every checkpoint.
    pub export_latest: bool,
    /// Test fault points.
    pub faults: FaultPoints,
    /// Append each batch's records to this JSON Lines file (`BYOL_TRACE_BATCHES`, a
    /// measurement hook: when does a new record first reach a batch).
    pub batch_trace: Option<PathBuf>,
    /// How long after a failed checkpoint or metrics write the next try waits
    /// ([`RETRY_AFTER`] for `byol train`, `[daemon] retry_secs` for the daemon).
    pub retry: Duration,
    /// The other ranks of a data-parallel job, told what to do at each step
    /// ([`Leader::alone`] in one process).
    pub leader: Leader,
}

/// Environment variable naming the batch trace file ([`RunParts::batch_trace`]).
pub const TRACE_BATCHES_ENV: &str = "BYOL_TRACE_BATCHES";

/// What a checkpoint's jobs did: the save succeeded; then pruning and the export (when
/// asked for) each have their own outcome, so a failed export is not a failed checkpoint.
#[derive(Debug)]
pub struct CheckpointOutcome {
    /// The checkpoint folder.
    pub path: PathBuf,
    /// Its step.
    pub step: u64,
    /// When it was written, in seconds since the Unix epoch.
    pub unix_secs: f64,
    /// Removing checkpoints past `keep_last` (and leftover `.tmp` folders).
    pub pruned: Result<(), RunError>,
    /// Writing `encoder-latest.safetensors` (`None`: not asked for).
    pub exported: Option<Result<PathBuf, RunError>>,
}

impl CheckpointOutcome {
    /// The jobs after the save that failed, with their errors.
    pub fn failures(&self) -> impl Iterator<Item = (Operation, &RunError)> {
        let prune = self.pruned.as_ref().err().map(|e| (Operation::Prune, e));
        let export = match &self.exported {
            Some(Err(e)) => Some((Operation::Export, e)),
            _ => None,
        };
        prune.into_iter().chain(export)
    }
}

/// What [`Run::finish`] (or [`Run::retry_due_writes`]) did.
#[derive(Debug)]
pub struct Finished {
    /// Writing the waiting metrics lines.
    pub metrics: Result<(), RunError>,
    /// The checkpoint of the last completed step, when one was due.
    pub checkpoint: Option<Result<CheckpointOutcome, RunError>>,
}

/// One step's outcome.
#[derive(Debug)]
pub struct StepReport {
    /// Loss, learning rate, τ, collapse indicator and the step number.
    pub stats: StepStats,
    /// Loader epoch of the batch.
    pub epoch: u64,
    /// Images in the batch.
    pub images: usize,
    /// The metrics line, when this step was logged.
    pub line: Option<MetricsLine>,
    /// This step was a log step.
    pub logged: bool,
    /// The checkpoint the policy asked for after this step, if it did: written (with
    /// its prune and export outcomes), or why it failed (a full disk, say; it is tried
    /// again after the retry interval, and the previous checkpoints are intact).
    pub checkpoint: Option<Result<CheckpointOutcome, RunError>>,
    /// Why this step's metrics line could not be written (a full disk, say): it waits
    /// in memory with the next ones and is written after the retry interval.
    pub metrics_error: Option<RunError>,
    /// Finished batches waiting in the loader after this step.
    pub queue_depth: usize,
    /// How full the objective's memory (MSF's bank, MoCo's queue) is after this step.
    pub memory: Option<byol_trainer::objective::MemoryFill>,
}

/// How long after a failed checkpoint or metrics write `byol train` tries again.
pub const RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long a data-parallel rank waits for its manifest to show the records rank 0
/// decided on (a commit rank 0 saw first, on shared storage).
pub const MANIFEST_PATIENCE: Duration = Duration::from_secs(60);

/// A training run between steps (see the crate docs).
///
/// Single-process code: data-parallel, rank 0 alone runs it, decides what depends on
/// time or on the disk (dataset growth, wall-clock checkpoints) and alone writes under
/// the run folder (metrics, checkpoints, exports); before each step and health read it
/// sends the other ranks their [`Order`] ([`crate::replica`]).
pub struct Run {
    /// The other ranks (none outside `mpirun`).
    leader: Leader,
    dir: RunDir,
    trainer: Trainer,
    loader: Loader,
    /// `metrics.jsonl`.
    metrics: MetricsSink,
    policy: CheckpointPolicy,
    log_every: u64,
    monitor: Option<Monitor>,
    export_latest: bool,
    faults: FaultPoints,
    input: InputSpec,
    /// Loader state and epoch after the last completed step (what a checkpoint records).
    last_state: LoaderState,
    last_epoch: u64,
    /// When, and at which step, the last checkpoint was written (or the run started).
    last_ckpt: (Instant, u64),
    /// Images and data wait since the last logged step.
    window: Window,
    started: Instant,
    /// A step produced a non-finite loss (this step, this loss) and the weights hold its
    /// update: nothing may be checkpointed, and no step taken, until [`Run::rollback`].
    poisoned: Option<(u64, f32)>,
    /// The trainer's health was last read after this many steps.
    health_read_at: u64,
    /// The fault point `nan_at` was reached at this step: the next health read reports
    /// a non-finite loss there.
    injected_non_finite: Option<u64>,
    /// After a failed checkpoint, the policy waits until then.
    retry_at: Option<Instant>,
    retry: Duration,
    batch_trace: Option<std::fs::File>,
}

/// What the next metrics line averages over: since the last logged step.
struct Window {
    /// When the window opened.
    since: Instant,
    /// Images trained in it.
    images: u64,
    /// Time spent waiting for batches in it.
    data_wait: Duration,
}

impl Window {
    fn open() -> Self {
        Window {
            since: Instant::now(),
            images: 0,
            data_wait: Duration::ZERO,
        }
    }
}

impl Run {
    /// Starts a run: opens `metrics.jsonl`, dropping lines past the trainer's step.
    /// Returns the run and the number of dropped lines.
    pub fn start(parts: RunParts) -> Result<(Self, usize), RunError> {
        let step = parts.trainer.steps_done();
        let batch_trace = match &parts.batch_trace {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(crate::io(p))?,
            ),
            None => None,
        };
        let (metrics, dropped) = MetricsSink::open(&parts.dir.metrics(), step, parts.retry)?;
        let state = parts.loader.state();
        let now = Instant::now();
        Ok((
            Run {
                leader: parts.leader,
                dir: parts.dir,
                last_epoch: state.epoch,
                last_state: state,
                trainer: parts.trainer,
                loader: parts.loader,
                metrics,
                policy: parts.policy,
                log_every: parts.log_every.max(1),
                monitor: parts.monitor,
                export_latest: parts.export_latest,
                faults: parts.faults,
                input: parts.input,
                last_ckpt: (now, step),
                window: Window::open(),
                started: now,
                poisoned: None,
                health_read_at: step,
                injected_non_finite: None,
                retry_at: None,
                retry: parts.retry,
                batch_trace,
            },
            dropped,
        ))
    }

    /// One step: the next batch through the trainer; a metrics line every `log_every`
    /// steps (or when `force_log`, or when the monitor measures); a checkpoint when the
    /// policy says so. The device is read only at those steps (the loss, the non-finite
    /// flag, the embeddings' health): between them a step queues its work and returns.
    ///
    /// Errors: the step failed; [`RunError::NonFiniteLoss`] when a step since the last
    /// read had a NaN or infinite loss, found at the next log step or checkpoint
    /// (nothing is checkpointed from then until [`Run::rollback`]). A failed metrics
    /// write or checkpoint is not an error of the step: the report carries it, and
    /// training goes on.
    pub fn step(&mut self, force_log: bool) -> Result<StepReport, RunError> {
        if let Some((step, loss)) = self.poisoned {
            return Err(RunError::NonFiniteLoss { step, loss });
        }
        let size = self.input.size as usize;
        let step = self.trainer.steps_done() + 1;
        let checkpoint_due = self.checkpoint_due_after_step();
        let measure = self.monitor.as_ref().is_some_and(|m| m.due(step));
        let log_due = force_log || step.is_multiple_of(self.log_every) || measure;
        self.order_step(log_due || checkpoint_due);
        let wait_start = Instant::now();
        let batch = self.loader.next_batch();
        self.window.data_wait += wait_start.elapsed();
        let stats = self.trainer.step(batch.view1(), batch.view2(), size)?;
        let images = batch.len();
        let epoch = batch.epoch;
        if let Some(f) = &mut self.batch_trace {
            // Global record indices (newest-pool draws carry their slot above bit 32).
            let records: Vec<u64> = batch.records().iter().map(|r| r & 0xFFFF_FFFF).collect();
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let line =
                serde_json::json!({"step": stats.step, "unix_ms": unix_ms, "records": records});
            use std::io::Write;
            let _ = writeln!(f, "{line}");
        }
        drop(batch);
        // Throughput counts the global batch: every rank loads an equal share of it.
        self.window.images += (images * self.leader.world()) as u64;
        self.last_state = self.loader.state();
        self.last_epoch = epoch;
        if self.faults.nan_at == Some(stats.step) {
            self.faults.nan_at = None;
            self.injected_non_finite = Some(stats.step);
        }
        debug_assert_eq!(stats.step, step);
        let loss = if log_due || checkpoint_due {
            Some(self.read_health()?)
        } else {
            None
        };
        let knn = match &self.monitor {
            Some(m) if measure => Some(m.measure(&self.trainer)?),
            _ => None,
        };
        let (line, metrics_error) = match loss {
            Some(loss) if log_due => {
                let (line, written) = self.log(&stats, loss, epoch, knn);
                (Some(line), written.err())
            }
            _ => (None, None),
        };
        if self.faults.abort_at == Some(stats.step) {
            std::process::abort();
        }
        if self.faults.fail_at == Some(stats.step) {
            return Err(RunError::InjectedFault {
                step: stats.step,
                key: FAIL_AT_STEP_ENV,
            });
        }
        let checkpoint = checkpoint_due.then(|| self.checkpoint());
        Ok(StepReport {
            stats,
            epoch,
            images,
            line,
            logged: log_due,
            checkpoint,
            metrics_error,
            queue_depth: self.loader.stats().queue_depth,
            memory: self.trainer.objective().memory().map(|m| m.fill()),
        })
    }

    /// Refreshes the dataset view the loader plans its next boundaries with (a failed
    /// refresh keeps the records known so far) and orders the other ranks' step: the
    /// new view when it changed (they apply it with [`Loader::apply_manifest`]: same
    /// records, retirements and shards everywhere), the schedules' length, and whether
    /// the health is read after it.
    fn order_step(&mut self, read_health: bool) {
        let changed = self.loader.refresh_shared().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "dataset refresh failed; the next epochs keep the records known so far");
            None
        });
        self.leader.send(&Order::Step {
            manifest: changed
                .as_deref()
                .map(|ds| std::borrow::Cow::Borrowed(ds.manifest())),
            total_steps: self.trainer.config().train.total_steps,
            read_health,
        });
    }

    /// True when the policy wants a checkpoint after the coming step (and no failed one
    /// waits to be retried).
    fn checkpoint_due_after_step(&self) -> bool {
        let done = self.trainer.steps_done() + 1;
        self.retry_at.is_none_or(|t| Instant::now() >= t)
            && self.policy.due(
                done - self.last_ckpt.1.min(done),
                self.last_ckpt.0.elapsed(),
            )
    }

    /// Writes the metrics line of a step that [`Run::step`] did not log (the last step
    /// of a run that ends on a deadline): the line, and whether it reached
    /// `metrics.jsonl` (a failed write keeps it waiting, see [`Run::finish`]). Errors: a
    /// step since the last read had a non-finite loss ([`RunError::NonFiniteLoss`]).
    pub fn log_last(
        &mut self,
        report: &StepReport,
    ) -> Result<(MetricsLine, Result<(), RunError>), RunError> {
        self.leader.send(&Order::ReadHealth);
        let loss = self.read_health()?;
        Ok(self.log(&report.stats, loss, report.epoch, None))
    }

    /// Reads the trainer's health: the last step's loss, or [`RunError::NonFiniteLoss`]
    /// (the first such step since the last read) and the run poisoned until
    /// [`Run::rollback`]. The other ranks read theirs at the same point (a step's order
    /// says so, or an [`Order::ReadHealth`] before this).
    fn read_health(&mut self) -> Result<f32, RunError> {
        let health = self.trainer.read_health()?;
        self.health_read_at = self.trainer.steps_done();
        let injected = self.injected_non_finite.take();
        let first = match (health.non_finite_at, injected) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match first {
            Some(step) => {
                let loss = if injected.is_some() {
                    f32::NAN
                } else {
                    health.loss
                };
                self.poisoned = Some((step, loss));
                Err(RunError::NonFiniteLoss { step, loss })
            }
            None => Ok(health.loss),
        }
    }

    /// Ends the run keeping its last good step, the one way `byol train` and the daemon
    /// both stop: the metrics lines a failed write left waiting are written, then the
    /// last completed step is checkpointed when steps were taken since the last
    /// checkpoint (`None` when there were none).
    pub fn finish(&mut self) -> Finished {
        Finished {
            metrics: self.metrics.flush(),
            checkpoint: self.has_unsaved_steps().then(|| self.checkpoint()),
        }
    }

    /// Tries again, while the loop does not step (paused), the checkpoint or metrics
    /// write that failed, once its retry interval has passed. Returns what was tried.
    pub fn retry_due_writes(&mut self) -> Finished {
        let now = Instant::now();
        let metrics = if self.metrics.retry_due(now) {
            self.metrics.flush()
        } else {
            Ok(())
        };
        let due = self.retry_at.is_some_and(|t| now >= t) && self.has_unsaved_steps();
        Finished {
            metrics,
            checkpoint: due.then(|| self.checkpoint()),
        }
    }

    /// The metrics line of a step, and whether it reached `metrics.jsonl` (a failed
    /// write keeps it waiting for the next try).
    fn log(
        &mut self,
        stats: &StepStats,
        loss: f32,
        epoch: u64,
        knn: Option<crate::Measurement>,
    ) -> (MetricsLine, Result<(), RunError>) {
        let secs = self.window.since.elapsed().as_secs_f64().max(1e-9);
        // Read from the device at log steps only.
        let health = match self.trainer.embedding_stats() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("embedding statistics of step {}: {e}", stats.step);
                None
            }
        };
        let (collapse, effective_rank) =
            health.map_or((f32::NAN, f32::NAN), |h| (h.collapse, h.effective_rank));
        let tau = stats.objective.tau;
        let line = MetricsLine {
            step: stats.step,
            epoch,
            loss,
            lr: stats.lr,
            tau,
            collapse,
            effective_rank,
            images_per_sec: self.window.images as f64 / secs,
            data_wait_secs: self.window.data_wait.as_secs_f64(),
            elapsed_secs: self.started.elapsed().as_secs_f64(),
            skipped_records: self.loader.stats().skipped,
            knn_accuracy: knn.map(|k| k.accuracy),
            knn_skipped_records: knn.map(|k| k.skipped as u64),
        };
        let written = self.metrics.append(&line);
        let tau_text = tau.map(|t| format!(" tau {t:.4}")).unwrap_or_default();
        tracing::info!(
            event = "step",
            step = stats.step,
            epoch,
            loss,
            collapse,
            effective_rank,
            lr = stats.lr,
            tau,
            images_per_sec = line.images_per_sec,
            knn_accuracy = line.knn_accuracy,
            "step {} epoch {epoch} loss {:.4} lr {:.4}{tau_text} {:.0} img/s",
            stats.step,
            loss,
            stats.lr,
            line.images_per_sec
        );
        self.window = Window::open();
        (line, written)
    }

    /// True when steps were taken since the last checkpoint (or the start).
    pub fn has_unsaved_steps(&self) -> bool {
        self.trainer.steps_done() != self.last_ckpt.1
    }

    /// Checkpoints the last completed step; after a good save, keeps the newest
    /// `keep_last` and (when asked for) writes `encoder-latest.safetensors`, each with
    /// its own outcome in the [`CheckpointOutcome`].
    ///
    /// Errors: the weights hold a non-finite step's update (see [`Run::rollback`]), or
    /// the checkpoint cannot be written (the policy tries again after the retry
    /// interval); the previous checkpoints are intact either way.
    pub fn checkpoint(&mut self) -> Result<CheckpointOutcome, RunError> {
        let step = self.trainer.steps_done();
        // Never a diverged state: the steps since the last read are checked first.
        if self.poisoned.is_none() && self.health_read_at != step {
            self.leader.send(&Order::ReadHealth);
            match self.read_health() {
                Ok(_) | Err(RunError::NonFiniteLoss { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if self.poisoned.is_some() {
            return Err(RunError::Diverged { step });
        }
        let dir = self.dir.checkpoints();
        let meta = RunMeta {
            epoch: self.last_epoch,
            loader: Some(self.last_state),
            world_size: Some(self.leader.world() as u64),
        };
        let saved = self
            .trainer
            .state()
            .and_then(|state| checkpoint::save(&dir, &state, Some(&self.input), meta.to_json()))
            .map_err(RunError::from);
        let path = match saved {
            Ok(path) => path,
            Err(e) => {
                self.retry_at = Some(Instant::now() + self.retry);
                return Err(e);
            }
        };
        self.last_ckpt = (Instant::now(), step);
        self.retry_at = None;
        let unix_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let pruned = checkpoint::prune(&dir, self.policy.keep_last).map_err(RunError::from);
        let exported = self.export_latest.then(|| self.export());
        Ok(CheckpointOutcome {
            path,
            step,
            unix_secs,
            pruned,
            exported,
        })
    }

    /// Writes the online encoder to `RUN/encoder-latest.safetensors`.
    fn export(&self) -> Result<PathBuf, RunError> {
        let enc = Encoder::from_trainer(&self.trainer)?;
        let path = self.dir.encoder_latest();
        export_encoder(&enc, Some(&self.input), &path)?;
        Ok(path)
    }

    /// Puts the weights, optimizer and step back to the newest usable checkpoint (after
    /// a non-finite loss); the loader goes on from where it is, so the batch that
    /// diverged is not replayed. Without a checkpoint the trainer starts afresh (from
    /// `[train] init`, else its seed). Metrics lines past the restored step are
    /// dropped. Returns the checkpoint used.
    pub fn rollback(&mut self) -> Result<Option<PathBuf>, RunError> {
        let mut fresh = Trainer::new(self.trainer.config().clone(), self.trainer.batch_size())?;
        // Without a checkpoint, the run's start again: `[train] init` or the seed.
        let resumed = crate::resume::start(&mut fresh, &self.dir.checkpoints(), false)?;
        self.leader.send(&Order::Resume {
            step: resumed.as_ref().map(|r| r.meta.step),
        });
        self.trainer = fresh;
        self.poisoned = None;
        self.health_read_at = self.trainer.steps_done();
        self.metrics.truncate_to(self.trainer.steps_done())?;
        self.last_ckpt = (Instant::now(), self.trainer.steps_done());
        Ok(resumed.map(|r| r.path))
    }

    /// How long after a failed checkpoint or metrics write the next try waits.
    pub fn retry_interval(&self) -> Duration {
        self.retry
    }

    /// The trainer.
    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// The trainer, mutably (e.g. to fit the schedules to a time budget).
    pub fn trainer_mut(&mut self) -> &mut Trainer {
        &mut self.trainer
    }

    /// The other ranks of a data-parallel job.
    pub fn leader(&self) -> Leader {
        self.leader
    }

    /// The loader.
    pub fn loader(&self) -> &Loader {
        &self.loader
    }

    /// The run folder.
    pub fn dir(&self) -> &RunDir {
        &self.dir
    }

    /// Replaces the checkpoint policy (a reloaded config).
    pub fn set_policy(&mut self, policy: CheckpointPolicy) {
        self.policy = policy;
    }

    /// Replaces the logging interval (a reloaded config).
    pub fn set_log_every(&mut self, every: u64) {
        self.log_every = every.max(1);
    }

    /// Loader epoch after the last completed step.
    pub fn epoch(&self) -> u64 {
        self.last_epoch
    }
}
