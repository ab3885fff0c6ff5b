//! Open-ended training on a dataset that keeps growing: the daemon's loop.
//!
//! The loop owns the [`Run`]; the daemon's other threads steer it through
//! [`Controls`]: a stop (SIGTERM/SIGINT), a checkpoint request (SIGUSR1), "the dataset
//! changed" (the ingester, after each commit), and reloaded [`Settings`] (SIGHUP).
//!
//! - **Schedule.** Open-ended: `[optim] schedule = "constant"` (linear warm-up, then a
//!   constant learning rate and a fixed τ = `[byol] tau_base`); a cosine schedule would reach
//!   learning rate 0 and stop learning, so [`check_schedule`] refuses it.
//! - **New data.** The ingester commits new shards; the loader samples them from its
//!   next refresh boundary (`[loader] refresh_every_batches`), and `newest_share` of
//!   every batch replays the `newest_records` most recent records.
//! - **Idle.** After `idle_after_epochs` epochs with nothing new, the loop checkpoints
//!   and sleeps until the dataset changes (no step, no CPU or GPU time).
//! - **Divergence.** A non-finite loss never reaches a checkpoint: the run rolls back
//!   to the newest good checkpoint and goes on with the next batch.
//! - **Failed writes.** A checkpoint or metrics write that fails (a full disk) is an
//!   [`Event::Failed`] and is tried again after [`Setup::retry`]; training goes on, and
//!   nothing written before is lost. A prune or export that fails after a good save is
//!   its own failure, not a failed checkpoint.
//! - **Liveness.** While it waits for data or is paused, the loop reports
//!   [`Event::Heartbeat`] every [`Setup::heartbeat`] from its own thread, so a watchdog
//!   fed from it learns that the loop itself is alive.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use byol_augment::Augmenter;
use byol_ingest::Dataset;
use byol_loader::{Loader, LoaderConfig};
use byol_trainer::input::InputSpec;
use byol_trainer::{OptimConfig, Schedule, TrainConfig, Trainer};
use serde::Serialize;

use crate::replica::{Leader, Order};
use crate::{
    CheckpointOutcome, CheckpointPolicy, FaultPoints, Monitor, Operation, Run, RunDir, RunError,
    RunParts, StepReport,
};

/// Consecutive rollbacks without a good step in between before the loop gives up.
const MAX_ROLLBACKS_IN_A_ROW: u32 = 3;
/// How often a waiting loop looks at its controls when nothing wakes it.
const WAIT_TICK: Duration = Duration::from_millis(500);

/// The loop's settings that a reload may change while it runs, by config table. The
/// field names are the config keys: what a reload applies is derived from this type
/// ([`Settings::reloadable_keys`]); every other changed key needs a restart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Settings {
    /// The `[train]` keys.
    pub train: TrainSettings,
    /// The `[daemon]` keys.
    pub daemon: DaemonSettings,
}

/// The reloadable `[train]` keys: logging, checkpoint cadence and retention.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TrainSettings {
    /// Metrics line every this many steps.
    pub log_every: u64,
    /// Checkpoint after this many steps since the last one (0: never by steps).
    pub checkpoint_every_steps: u64,
    /// Checkpoint when this many minutes passed since the last one (0: never by time).
    pub checkpoint_every_minutes: f64,
    /// Checkpoints kept (the newest).
    pub keep_last: usize,
}

/// The reloadable `[daemon]` keys: pausing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DaemonSettings {
    /// Pause after this many epochs without new data (0: never pause).
    pub idle_after_epochs: u64,
}

impl TrainSettings {
    /// The reloadable keys of a `[train]` table.
    pub fn from_train(t: &TrainConfig) -> Self {
        TrainSettings {
            log_every: t.log_every,
            checkpoint_every_steps: t.checkpoint_every_steps,
            checkpoint_every_minutes: t.checkpoint_every_minutes,
            keep_last: t.keep_last,
        }
    }
}

impl Settings {
    /// The checkpoint policy these settings make.
    pub fn policy(&self) -> CheckpointPolicy {
        CheckpointPolicy {
            every_steps: self.train.checkpoint_every_steps,
            every_minutes: self.train.checkpoint_every_minutes,
            keep_last: self.train.keep_last.max(1),
        }
    }

    /// The config keys a reload applies, by table (`train`, `daemon`): the field names
    /// of these types.
    pub fn reloadable_keys(&self) -> Vec<(String, Vec<String>)> {
        let serde_json::Value::Object(tables) =
            serde_json::to_value(self).expect("settings serialise")
        else {
            unreachable!("a struct serialises to an object")
        };
        tables
            .into_iter()
            .map(|(table, keys)| {
                let keys = keys
                    .as_object()
                    .map_or(Vec::new(), |k| k.keys().cloned().collect());
                (table, keys)
            })
            .collect()
    }
}

/// What the daemon's other threads tell the training loop (thread-safe, shared).
pub struct Controls {
    stop: AtomicI32,
    checkpoint: AtomicBool,
    generation: AtomicU64,
    settings: Mutex<Settings>,
    wake: (Mutex<()>, Condvar),
}

impl Controls {
    /// Controls with the first settings.
    pub fn new(settings: Settings) -> Self {
        Controls {
            stop: AtomicI32::new(0),
            checkpoint: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            settings: Mutex::new(settings),
            wake: (Mutex::new(()), Condvar::new()),
        }
    }

    /// Stop after the current step, with a checkpoint; `signal` is reported back.
    pub fn request_stop(&self, signal: i32) {
        self.stop.store(signal.max(1), Ordering::SeqCst);
        self.wake();
    }

    /// The stop asked for, if any (its signal number).
    pub fn stop_requested(&self) -> Option<i32> {
        Some(self.stop.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }

    /// Checkpoint after the current step.
    pub fn request_checkpoint(&self) {
        self.checkpoint.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// The dataset changed (records added, retired or relabelled).
    pub fn data_changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.wake();
    }

    /// Replaces the reloadable settings; they apply before the next step.
    pub fn update(&self, settings: Settings) {
        *self.settings.lock().unwrap() = settings;
        self.wake();
    }

    /// The current settings.
    pub fn settings(&self) -> Settings {
        *self.settings.lock().unwrap()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Takes the checkpoint request (the loop acts on it).
    fn take_checkpoint(&self) -> bool {
        self.checkpoint.swap(false, Ordering::SeqCst)
    }

    fn wake(&self) {
        let _guard = self.wake.0.lock().unwrap();
        self.wake.1.notify_all();
    }

    /// Sleeps until woken or `timeout`.
    fn wait(&self, timeout: Duration) {
        let guard = self.wake.0.lock().unwrap();
        let _ = self.wake.1.wait_timeout(guard, timeout).unwrap();
    }
}

/// What the loop reports as it goes (the daemon logs it and shows it).
#[derive(Debug)]
pub enum Event<'a> {
    /// Resumed from a checkpoint (passing over damaged newer ones).
    Resumed {
        /// The checkpoint.
        path: &'a Path,
        /// Its step.
        step: u64,
        /// When it was written, in seconds since the Unix epoch.
        unix_secs: f64,
        /// Newer checkpoints passed over, with the reason.
        skipped: &'a [(PathBuf, String)],
    },
    /// Waiting for the dataset to hold one batch of records.
    Waiting {
        /// Live records now.
        records: usize,
        /// Records needed.
        needed: usize,
    },
    /// The objective's memory (MSF's bank, MoCo's queue) is larger than the dataset:
    /// until it has filled, only its filled entries are used.
    MemoryFilling {
        /// Its config key (`msf.bank_size`, `mocov2.queue_size`).
        key: &'static str,
        /// Its size.
        size: usize,
        /// Entries filled now.
        filled: usize,
        /// Live records of the dataset now.
        records: usize,
    },
    /// Training (again).
    Training {
        /// Steps done.
        step: u64,
    },
    /// A step was taken.
    Step(&'a StepReport),
    /// A checkpoint was written (a failed prune or export after it follows as its own
    /// [`Event::Failed`]).
    Checkpoint(&'a CheckpointOutcome),
    /// Paused: nothing new for `epochs` epochs.
    Paused {
        /// Epochs without new data.
        epochs: u64,
    },
    /// A job that writes failed (a full disk, say); training goes on. A checkpoint
    /// leaves the previous ones intact; metrics lines wait in memory.
    Failed {
        /// The job.
        operation: Operation,
        /// Why ([`RunError::kind`] tells a full disk from damage or a permission).
        error: &'a RunError,
        /// When it is tried again (`None`: at the next checkpoint).
        retry_in: Option<Duration>,
    },
    /// The loop is alive while it waits (for data, or paused): a watchdog's heartbeat.
    Heartbeat,
    /// A non-finite loss was rolled back.
    RolledBack {
        /// The step that diverged.
        step: u64,
        /// The checkpoint restored (`None`: restarted from the seed).
        to: Option<&'a Path>,
        /// The step restored.
        to_step: u64,
    },
}

/// Everything the loop needs to start.
pub struct Setup {
    /// The run folder (locked by the caller).
    pub dir: RunDir,
    /// A fresh trainer (the loop resumes it from the run's checkpoints).
    pub trainer: Trainer,
    /// The dataset folder the ingester fills.
    pub data: PathBuf,
    /// BYOL's two views.
    pub augmenter: Augmenter,
    /// Batches and sampling.
    pub loader: LoaderConfig,
    /// Optional kNN monitor.
    pub monitor: Option<Monitor>,
    /// Test fault points.
    pub faults: FaultPoints,
    /// How long after a failed checkpoint or metrics write the next try waits.
    pub retry: Duration,
    /// How often [`Event::Heartbeat`] is reported while the loop waits or is paused
    /// (at most every half second; a watchdog's interval over 4, say).
    pub heartbeat: Duration,
    /// The other ranks of a data-parallel job, which follow this loop's orders
    /// ([`crate::replica::follow`]; [`Leader::alone`] in one process).
    pub leader: Leader,
}

/// Refuses a schedule that ends: open-ended training needs `schedule = "constant"`.
pub fn check_schedule(optim: &OptimConfig) -> Result<(), RunError> {
    if optim.schedule == Schedule::Cosine {
        return Err(RunError::Config(
            "[optim] schedule = \"cosine\" decays the learning rate to 0 at total_steps and \
             stops learning; continuous training needs schedule = \"constant\" (warm-up, then \
             a constant learning rate and a fixed tau)"
                .into(),
        ));
    }
    Ok(())
}

/// Trains until [`Controls::request_stop`]: resumes from the run's newest good
/// checkpoint, waits for one batch of records, then steps, checkpoints, pauses and
/// rolls back as the module docs say. Returns the stop's signal number after the
/// last step is checkpointed.
///
/// Errors: no usable checkpoint where there are some, a checkpoint for another model,
/// the loader cannot start, a step or a write failed (the last good step is
/// checkpointed first when it can be), or rollbacks keep failing.
pub fn train_continuously(
    setup: Setup,
    controls: &Controls,
    on_event: &mut dyn FnMut(Event),
) -> Result<i32, RunError> {
    let Setup {
        dir,
        mut trainer,
        data,
        augmenter,
        loader: loader_cfg,
        monitor,
        faults,
        retry,
        heartbeat,
        leader,
    } = setup;
    let tick = heartbeat.min(WAIT_TICK);
    let resumed = crate::resume_or_init(&mut trainer, &dir.checkpoints())?;
    leader.send(&Order::Resume {
        step: resumed.as_ref().map(|r| r.meta.step),
    });
    if let Some(r) = &resumed {
        on_event(Event::Resumed {
            path: &r.path,
            step: r.meta.step,
            unix_secs: r.meta.created_unix as f64,
            skipped: &r.skipped,
        });
    }
    let state = resumed.and_then(|r| r.run.loader);
    let needed_shards = state.map_or(0, |s| s.shards as usize);
    // The loader needs one batch of records (and, resuming, the shards it had).
    let mut waiting_reported = None;
    let dataset = loop {
        if let Some(sig) = controls.stop_requested() {
            leader.send(&Order::Stop);
            return Ok(sig);
        }
        if let Ok(ds) = Dataset::open(&data) {
            let records = ds.live_records().count();
            if records >= loader_cfg.batch_size && ds.shards().len() >= needed_shards {
                break ds;
            }
            if waiting_reported != Some(records) {
                waiting_reported = Some(records);
                on_event(Event::Waiting {
                    records,
                    needed: loader_cfg.batch_size,
                });
            }
        }
        on_event(Event::Heartbeat);
        wait(controls, leader, tick);
    };
    // Every rank plans with the records this manifest lists.
    leader.send(&Order::Start {
        manifest: std::borrow::Cow::Borrowed(dataset.manifest()),
    });
    let records = dataset.live_records().count();
    if let Some(m) = trainer.objective().memory()
        && m.capacity() > records
    {
        on_event(Event::MemoryFilling {
            key: m.key(),
            size: m.capacity(),
            filled: m.filled(),
            records,
        });
    }
    let settings = controls.settings();
    let input = InputSpec::of_views(augmenter.config());
    let loader = Loader::new(dataset, augmenter, loader_cfg, state)?;
    let (mut run, dropped) = Run::start(RunParts {
        dir,
        trainer,
        loader,
        input,
        policy: settings.policy(),
        log_every: settings.train.log_every,
        monitor,
        export_latest: true,
        faults,
        batch_trace: std::env::var_os(crate::TRACE_BATCHES_ENV).map(PathBuf::from),
        retry,
        leader,
    })?;
    if dropped > 0 {
        tracing::info!(dropped, "metrics lines past the resumed step dropped");
    }
    on_event(Event::Training {
        step: run.trainer().steps_done(),
    });
    let outcome = steps(&mut run, controls, settings, tick, on_event);
    // Data-parallel, the other ranks may wait in a collective of the step that failed,
    // so no order reaches them and the last checkpoint (which reads every rank's
    // health) cannot be taken; the caller ends the job (`dist::abort`), keeping the
    // checkpoints written so far.
    if leader.has_followers()
        && outcome
            .as_ref()
            .is_err_and(|e| !matches!(e, RunError::NonFiniteLoss { .. }))
    {
        return outcome;
    }
    // Whatever ended the loop, the last good step is kept, with its metrics lines.
    let finished = run.finish();
    if let Err(error) = &finished.metrics {
        on_event(Event::Failed {
            operation: Operation::Metrics,
            error,
            retry_in: None,
        });
    }
    match finished.checkpoint {
        Some(Ok(saved)) => report_checkpoint(&saved, on_event),
        Some(Err(e)) if outcome.is_ok() => return Err(e),
        Some(Err(e)) => tracing::error!(error = %e, "the last checkpoint failed too"),
        None => {}
    }
    leader.send(&Order::Stop);
    outcome
}

/// Waits for `tick` (or until the controls wake the loop), the other ranks told to
/// wait as long.
fn wait(controls: &Controls, leader: Leader, tick: Duration) {
    leader.send(&Order::Wait {
        millis: tick.as_millis() as u64,
    });
    controls.wait(tick);
}

/// The events of [`Run::retry_due_writes`]: a metrics write that failed again, and the
/// checkpoint attempt.
fn report_retries(run: &mut Run, on_event: &mut dyn FnMut(Event)) {
    let retried = run.retry_due_writes();
    if let Err(error) = &retried.metrics {
        on_event(Event::Failed {
            operation: Operation::Metrics,
            error,
            retry_in: Some(run.retry_interval()),
        });
    }
    if let Some(attempt) = &retried.checkpoint {
        report_attempt(attempt, run.retry_interval(), on_event);
    }
}

/// The events of a written checkpoint: the checkpoint, then a failed prune or export.
fn report_checkpoint(saved: &CheckpointOutcome, on_event: &mut dyn FnMut(Event)) {
    on_event(Event::Checkpoint(saved));
    for (operation, error) in saved.failures() {
        on_event(Event::Failed {
            operation,
            error,
            retry_in: None,
        });
    }
}

/// The events of a checkpoint attempt: [`report_checkpoint`]'s, or its failure.
fn report_attempt(
    attempt: &Result<CheckpointOutcome, RunError>,
    retry: Duration,
    on_event: &mut dyn FnMut(Event),
) {
    match attempt {
        Ok(saved) => report_checkpoint(saved, on_event),
        Err(error) => on_event(Event::Failed {
            operation: Operation::Checkpoint,
            error,
            retry_in: Some(retry),
        }),
    }
}

fn steps(
    run: &mut Run,
    controls: &Controls,
    mut settings: Settings,
    tick: Duration,
    on_event: &mut dyn FnMut(Event),
) -> Result<i32, RunError> {
    let mut seen_generation = controls.generation();
    let mut last_new_epoch = run.epoch();
    let mut rollbacks = 0;
    loop {
        if let Some(sig) = controls.stop_requested() {
            return Ok(sig);
        }
        let reloaded = controls.settings();
        if reloaded != settings {
            settings = reloaded;
            run.set_policy(settings.policy());
            run.set_log_every(settings.train.log_every);
            tracing::info!(?settings, "settings reloaded");
        }
        if controls.take_checkpoint() && run.has_unsaved_steps() {
            checkpoint_now(run, on_event);
        }
        let generation = controls.generation();
        if generation != seen_generation {
            seen_generation = generation;
            last_new_epoch = run.epoch();
        }
        let idle_epochs = run.epoch().saturating_sub(last_new_epoch);
        let idle_after = settings.daemon.idle_after_epochs;
        if idle_after > 0 && idle_epochs >= idle_after {
            if run.has_unsaved_steps() {
                checkpoint_now(run, on_event);
            }
            on_event(Event::Paused {
                epochs: idle_epochs,
            });
            let generation = loop {
                if let Some(sig) = controls.stop_requested() {
                    return Ok(sig);
                }
                let generation = controls.generation();
                if generation != seen_generation {
                    break generation;
                }
                on_event(Event::Heartbeat);
                report_retries(run, on_event);
                wait(controls, run.leader(), tick);
            };
            seen_generation = generation;
            last_new_epoch = run.epoch();
            on_event(Event::Training {
                step: run.trainer().steps_done(),
            });
            continue;
        }
        match run.step(false) {
            Ok(report) => {
                rollbacks = 0;
                on_event(Event::Step(&report));
                if let Some(error) = &report.metrics_error {
                    on_event(Event::Failed {
                        operation: Operation::Metrics,
                        error,
                        retry_in: Some(run.retry_interval()),
                    });
                }
                if let Some(attempt) = &report.checkpoint {
                    report_attempt(attempt, run.retry_interval(), on_event);
                }
            }
            Err(RunError::NonFiniteLoss { step, loss }) => {
                rollbacks += 1;
                tracing::warn!(step, loss, "non-finite loss: rolling back");
                if rollbacks > MAX_ROLLBACKS_IN_A_ROW {
                    return Err(RunError::NonFiniteLoss { step, loss });
                }
                let to = run.rollback()?;
                on_event(Event::RolledBack {
                    step,
                    to: to.as_deref(),
                    to_step: run.trainer().steps_done(),
                });
            }
            Err(e) => return Err(e),
        }
    }
}

/// A checkpoint asked for outside the policy (SIGUSR1, pausing); a failure is reported
/// and training goes on (the previous checkpoints are intact).
fn checkpoint_now(run: &mut Run, on_event: &mut dyn FnMut(Event)) {
    let attempt = run.checkpoint();
    report_attempt(&attempt, run.retry_interval(), on_event);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reloadable `[train]` keys are keys of `[train]` (a renamed setting cannot
    /// leave a reload applying a key the config no longer has).
    #[test]
    fn reloadable_train_keys_are_train_config_keys() {
        let train = TrainConfig::default();
        let settings = Settings {
            train: TrainSettings::from_train(&train),
            daemon: DaemonSettings {
                idle_after_epochs: 3,
            },
        };
        let config = serde_json::to_value(&train).unwrap();
        let keys = settings.reloadable_keys();
        let (_, train_keys) = keys.iter().find(|(t, _)| t == "train").unwrap();
        assert_eq!(train_keys.len(), 4);
        for key in train_keys {
            assert!(config.get(key).is_some(), "[train] has no {key}");
        }
        let (_, daemon_keys) = keys.iter().find(|(t, _)| t == "daemon").unwrap();
        assert_eq!(daemon_keys, &["idle_after_epochs".to_owned()]);
    }
}
