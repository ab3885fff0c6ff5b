//! `byol daemon` and `byol validate`: the shell around continuous training. Signals,
//! the folder watcher and the ingest thread live here; the logic is in the libraries
//! (`byol_ingest::IngestLoop`, `byol_run::continuous`).
//!
//! Signals: SIGTERM/SIGINT finish the step, checkpoint and exit 0 (a second one exits
//! at once, status 128 + signal); SIGUSR1 checkpoints; SIGHUP reloads the config.
//!
//! Output: typed log events through tracing on stderr (`event` = listening,
//! ingest_batch, reject, ingest_failed, compaction, resume, waiting, training, step,
//! checkpoint, write_failed, metrics_written, pause, rollback, reload, stop, …), each
//! emitted once; the console lines for people are derived from them (`console`);
//! metrics on `[daemon] listen`; the systemd notify protocol.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use byol_augment::Augmenter;
use byol_ingest::{Follower, IngestEvent, IngestLoop, IngestReport, Reopen};
use byol_loader::Output;
use byol_run::continuous::{self, Controls, DaemonSettings, Event, Settings, Setup, TrainSettings};
use byol_run::replica::{FollowerParts, Leader};
use byol_run::{FaultPoints, Monitor, Operation, RunDir};
use byol_trainer::Trainer;
use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::cli::{DaemonArgs, ValidateArgs};
use crate::config::{Config, DaemonConfig};
use crate::metrics::{Metrics, serve};
use crate::service::{Notifier, stopping};
use crate::signals;
use crate::watch::{CHECK_EVERY, Change, Watchers, watch};

/// Runs `byol validate`: the config is parsed and every value checked.
pub fn validate(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(&args.config)?;
    let daemon = cfg.daemon.is_some();
    let cfg = if daemon { cfg.for_daemon() } else { cfg };
    cfg.validate(daemon)
        .with_context(|| format!("invalid config {}", args.config.display()))?;
    println!("{}: valid", args.config.display());
    if let Some(d) = cfg.daemon.as_ref().filter(|_| daemon) {
        for note in d.own_folder_notes(cfg.ingest.layout()) {
            println!("note: {note}");
        }
    }
    if daemon && !cfg.schedule_written {
        println!(
            "note: [optim] schedule is unset: the daemon trains with schedule = \"constant\" \
             (warm-up, then a constant learning rate and tau = [byol] tau_base)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The daemon's compaction policy: off with `compact_min_shards = 0`, and with
/// `[loader] order = "shard-windows"`, whose epoch order depends on shard boundaries
/// (a compaction would change the order of an epoch being resumed).
fn compact_policy(
    cfg: &Config,
    d: &DaemonConfig,
    shard_bytes: u64,
) -> Option<byol_ingest::CompactPolicy> {
    if d.compact_min_shards == 0 {
        return None;
    }
    if cfg.loader.order != byol_loader::Order::Global {
        eprintln!("warning: no background compaction with [loader] order = \"shard-windows\"");
        return None;
    }
    Some(byol_ingest::CompactPolicy::for_shard_bytes(
        shard_bytes,
        d.compact_min_shards,
    ))
}

/// The reloadable settings of a config.
fn settings(cfg: &Config, d: &DaemonConfig) -> Settings {
    Settings {
        train: TrainSettings::from_train(&cfg.train),
        daemon: DaemonSettings {
            idle_after_epochs: d.idle_after_epochs,
        },
    }
}

/// Runs `byol daemon`.
pub fn run(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    // Data-parallel (under mpirun): rank 0 runs the daemon (it alone holds the run
    // folder, watches, ingests, serves metrics and takes signals and reloads); every
    // other rank trains its share of each batch on rank 0's orders (`replica::follow`).
    let group = byol_trainer::dist::init()?;
    let cfg = Config::load_for_daemon(&args.config)?;
    cfg.validate(true)
        .with_context(|| format!("invalid config {}", args.config.display()))?;
    let d = cfg.daemon.clone().expect("validated");
    let dir = RunDir::new(&d.run);
    // Thread budget: the loader gets it all, ingest half of it at a lower priority.
    let budget = match d.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut loader_cfg = cfg.loader.clone();
    loader_cfg.output = Output::F32;
    loader_cfg.part = byol_run::replica::share(group);
    if loader_cfg.threads == 0 {
        loader_cfg.threads = budget;
    }
    if loader_cfg.refresh_every_batches == 0 {
        loader_cfg.refresh_every_batches = d.new_data_within_steps.max(1);
    }
    let augmenter = Augmenter::new(cfg.augment.clone().unwrap_or_default())?;
    let healthy = Arc::new(AtomicBool::new(true));
    let controls = Arc::new(Controls::new(settings(&cfg, &d)));
    if !group.is_main() {
        // mpirun forwards signals to every rank: a follower takes them (a second one
        // still ends it at once) and goes on until rank 0's stop order.
        let _signals = spawn_signals(&args.config, controls, healthy, d.stop_timeout_secs)?;
        let parts = FollowerParts {
            trainer: Trainer::new(cfg.trainer(), loader_cfg.batch_size)?,
            data: d.data.clone(),
            augmenter,
            loader: loader_cfg,
            checkpoints: dir.checkpoints(),
        };
        byol_run::replica::follow(parts, group)?;
        return Ok(ExitCode::SUCCESS);
    }
    // `[train] init` that does not fit is refused before the run folder is written to.
    byol_run::check_init(&cfg.trainer(), &dir.checkpoints())?;
    let _lock = dir.lock().with_context(|| {
        format!(
            "cannot start: is another byol daemon running on {}?",
            d.run.display()
        )
    })?;
    let metrics = Arc::new(Metrics::new());
    let stop_ingest = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::unbounded();
    let services = start_services(
        &cfg,
        &d,
        budget,
        &metrics,
        &healthy,
        &controls,
        &stop_ingest,
        (&tx, rx),
    )?;
    let signals = spawn_signals(
        &args.config,
        controls.clone(),
        healthy.clone(),
        d.stop_timeout_secs,
    )?;

    let monitor = match &cfg.monitor {
        Some(m) => Some(Monitor::open(
            m,
            &byol_trainer::input::InputSpec::of_views(augmenter.config()),
        )?),
        None => None,
    };
    let trainer = Trainer::new(cfg.trainer(), loader_cfg.batch_size)?;
    let notifier = Notifier::from_env();
    let setup = Setup {
        dir,
        trainer,
        data: d.data.clone(),
        augmenter,
        loader: loader_cfg,
        monitor,
        faults: FaultPoints::from_env(),
        retry: Duration::from_secs_f64(d.retry_secs),
        // Ticks at half the ping interval, so a tick that lands just short of it
        // delays the ping by a tick at most: one arrives within half the watchdog's.
        heartbeat: notifier
            .ping_every()
            .map_or(Duration::from_millis(500), |p| p / 2),
        leader: Leader::of_group(group),
    };
    let started = Instant::now();
    let mut reporter = Reporter {
        metrics: metrics.clone(),
        notifier,
    };
    let outcome = continuous::train_continuously(setup, &controls, &mut |e| reporter.on_event(e));
    healthy.store(false, Ordering::SeqCst);
    stop_ingest.store(true, Ordering::SeqCst);
    drop(tx);
    let (ingest, _server) = services;
    let ingest_result = ingest.join().expect("the ingest thread does not panic");
    drop(signals);
    let sig = outcome?;
    ingest_result?;
    println!(
        "stopped by signal {sig} after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Rank 0's services (the only process's outside data-parallel training): the dataset
/// follower and its start-up scan, the metrics endpoint, the folder watches and the
/// ingest thread (with half the thread `budget`, at a lower priority). Returns the ingest
/// thread and the endpoint's.
#[allow(clippy::too_many_arguments)]
fn start_services(
    cfg: &Config,
    d: &DaemonConfig,
    budget: usize,
    metrics: &Arc<Metrics>,
    healthy: &Arc<AtomicBool>,
    controls: &Arc<Controls>,
    stop_ingest: &Arc<AtomicBool>,
    (tx, rx): (&crossbeam_channel::Sender<Change>, Receiver<Change>),
) -> anyhow::Result<(JoinHandle<anyhow::Result<()>>, JoinHandle<()>)> {
    let mut ingest_cfg = cfg.ingest.clone();
    ingest_cfg.threads = Some(ingest_cfg.threads.unwrap_or((budget / 2).max(1)));
    let mut ingest_opts = ingest_cfg.ingester_options()?;
    ingest_opts.background = true;
    ingest_opts.duty = d.ingest_duty;
    let roots: Vec<(PathBuf, byol_ingest::Layout)> = d
        .watch
        .iter()
        .map(|w| w.resolve(cfg.ingest.layout()))
        .collect();
    let shard_bytes = ingest_opts.shard_bytes;
    let mut follower = Follower::open(&d.data, &roots, ingest_opts.clone())
        .with_context(|| format!("cannot open dataset {}", d.data.display()))?;
    // What the daemon writes is never its data (the dataset is excluded by the follower).
    follower.exclude([d.run.clone()]);
    for note in d.own_folder_notes(cfg.ingest.layout()) {
        tracing::info!(event = "own_folders", "{note}");
    }
    let (bound, server) = serve(d.listen_addr()?, metrics.clone(), healthy.clone())?;
    tracing::info!(event = "listening", address = %bound, "metrics on http://{bound}/metrics");
    let watched: Vec<PathBuf> = follower.roots().iter().map(|r| r.path.clone()).collect();
    // Watch first, then scan: a file that lands during the scan is seen by one or the
    // other (or both: an unchanged file costs a stat).
    let watchers = watch(
        &watched,
        d.poll,
        Duration::from_secs_f64(d.poll_interval_secs),
        tx,
    )?;
    let report = follower
        .scan_all()
        .context("start-up scan of the watched folders")?;
    log_ingest("start-up scan", &report);
    metrics.on_ingest(&report, follower.live_records());
    for w in &report.summary.warnings {
        eprintln!("warning: {w}");
    }

    // A new folder's files may predate its watch: the ingest thread scans new folders.
    let settle = Duration::from_secs_f64(d.settle_secs);
    let ingest_loop = IngestLoop::new(
        follower,
        Reopen {
            data: d.data.clone(),
            roots,
            options: ingest_opts,
        },
        settle,
        Duration::from_secs_f64(d.retry_secs),
        compact_policy(cfg, d, shard_bytes),
    );
    let ingest = spawn_ingest(
        IngestThread {
            ingest: ingest_loop,
            watchers,
            controls: controls.clone(),
            metrics: metrics.clone(),
            stop: stop_ingest.clone(),
        },
        rx,
        settle,
    )?;
    Ok((ingest, server))
}

/// Logs (once: the console line is derived, see `console`), counts and notifies what
/// the training loop reports.
struct Reporter {
    metrics: Arc<Metrics>,
    notifier: Notifier,
}

impl Reporter {
    fn on_event(&mut self, e: Event) {
        self.metrics.on_event(&e);
        self.notifier.alive();
        match e {
            Event::Resumed {
                path,
                step,
                skipped,
                ..
            } => {
                for (p, why) in skipped {
                    tracing::warn!(event = "checkpoint_passed_over", checkpoint = %p.display(), reason = %why, "passed over checkpoint {}: {why}", p.display());
                }
                tracing::info!(event = "resume", step, checkpoint = %path.display(), "resumed from {} (step {step})", path.display());
            }
            Event::Waiting { records, needed } => {
                tracing::info!(
                    event = "waiting",
                    records,
                    needed,
                    "waiting for images: {records} of the {needed} one batch needs"
                );
                let status = format!("waiting for images: {records} of {needed}");
                self.notifier.ready(&status);
                self.notifier.status(&status);
            }
            Event::MemoryFilling {
                key,
                size,
                filled,
                records,
            } => {
                tracing::info!(
                    event = "memory_filling",
                    key,
                    size,
                    filled,
                    records,
                    "{key} = {size} is larger than the dataset's {records} live records: \
                     until it fills ({filled} of {size} now), only its filled entries are used"
                );
            }
            Event::Training { step } => {
                tracing::info!(event = "training", step, "training from step {step}");
                self.notifier.ready(&format!("training from step {step}"));
            }
            Event::Step(r) => {
                if let Some(line) = &r.line {
                    self.notifier.status(&format!(
                        "step {} loss {:.4} {:.0} img/s",
                        line.step, line.loss, line.images_per_sec
                    ));
                }
            }
            Event::Checkpoint(c) => {
                tracing::info!(event = "checkpoint", step = c.step, path = %c.path.display(), "checkpoint step {}: {}", c.step, c.path.display());
            }
            Event::Failed {
                operation,
                error,
                retry_in,
            } => {
                let kind = error.kind();
                let then = match (operation, retry_in) {
                    (Operation::Checkpoint, Some(t)) => {
                        format!(
                            "the previous ones are intact; retrying in {:.0} s",
                            t.as_secs_f64()
                        )
                    }
                    (Operation::Metrics, Some(t)) => format!(
                        "the lines wait in memory; retrying in {:.0} s",
                        t.as_secs_f64()
                    ),
                    (Operation::Prune, _) => {
                        "the checkpoint is written; pruning again at the next one".into()
                    }
                    (Operation::Export, _) => {
                        "the checkpoint is written; exporting again at the next one".into()
                    }
                    (_, None) => "not retried".into(),
                };
                tracing::error!(
                    event = "write_failed",
                    operation = operation.as_str(),
                    kind = kind.as_str(),
                    error = %error,
                    retry_secs = retry_in.map(|t| t.as_secs_f64()),
                    "{} failed ({kind}; {then}): {error}",
                    operation.as_str()
                );
            }
            Event::Paused { epochs } => {
                tracing::info!(
                    event = "pause",
                    epochs,
                    "paused: nothing new for {epochs} epochs; waiting for images"
                );
                self.notifier
                    .status(&format!("paused: nothing new for {epochs} epochs"));
            }
            Event::RolledBack { step, to, to_step } => {
                let to = to.map_or("a fresh start".to_owned(), |p| p.display().to_string());
                tracing::warn!(
                    event = "rollback",
                    step,
                    to_step,
                    checkpoint = %to,
                    "non-finite loss at step {step}: rolled back to {to} (step {to_step})"
                );
            }
            Event::Heartbeat => {}
        }
    }
}

/// The typed log events of one ingest batch (`what`: "start-up scan" or "ingest"): the
/// batch, then each reject.
fn log_ingest(what: &str, r: &IngestReport) {
    let s = &r.summary;
    tracing::info!(
        event = "ingest_batch",
        ingested = s.ingested,
        rejected = s.rejected_total(),
        retired = s.retired,
        relabelled = s.relabelled,
        duplicates = s.duplicates,
        "{what}: {}",
        describe(r)
    );
    for j in &r.rejects {
        tracing::warn!(
            event = "reject",
            path = %j.path.display(),
            reason = j.reason.as_str(),
            detail = %j.detail,
            "rejected {}: {} ({})",
            j.path.display(),
            j.reason.as_str(),
            j.detail
        );
    }
}

/// One line on what an ingest batch did.
fn describe(r: &IngestReport) -> String {
    let s = &r.summary;
    let mut parts = vec![format!("{} new image(s)", s.ingested)];
    if s.rejected_total() > 0 {
        let reasons: Vec<String> = s
            .rejected
            .iter()
            .map(|(reason, n)| format!("{n} {}", reason.as_str()))
            .collect();
        parts.push(format!("rejected {}", reasons.join(", ")));
    }
    if s.retired > 0 {
        parts.push(format!("retired {}", s.retired));
    }
    if s.relabelled > 0 {
        parts.push(format!("relabelled {}", s.relabelled));
    }
    if s.duplicates > 0 {
        parts.push(format!("{} duplicate(s)", s.duplicates));
    }
    parts.join(", ")
}

/// What the ingest thread owns.
struct IngestThread {
    ingest: IngestLoop,
    /// The folder watchers, checked every `watch::CHECK_EVERY`.
    watchers: Watchers,
    controls: Arc<Controls>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
}

/// The ingest thread: feeds the watcher's changes to the [`IngestLoop`] and logs,
/// counts and signals what it reports (the loop's policies live in `byol_ingest`).
fn spawn_ingest(
    t: IngestThread,
    rx: Receiver<Change>,
    settle: Duration,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let tick = (settle / 4).clamp(Duration::from_millis(50), Duration::from_millis(250));
    let body = move || -> anyhow::Result<()> {
        let IngestThread {
            mut ingest,
            mut watchers,
            controls,
            metrics,
            stop,
        } = t;
        // This thread appends and commits; like the ingest workers, it yields to training.
        byol_ingest::lower_thread_priority();
        let mut checked = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            if checked.elapsed() >= CHECK_EVERY {
                checked = Instant::now();
                watchers.check();
            }
            match rx.recv_timeout(tick) {
                Ok(Change::Paths(paths)) => {
                    let now = Instant::now();
                    for (p, complete) in paths {
                        ingest.note(p, complete, now);
                    }
                }
                Ok(Change::Rescan) => ingest.request_rescan(),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            for event in ingest.tick(Instant::now()) {
                report_ingest(event, &controls, &metrics);
            }
        }
        Ok(())
    };
    std::thread::Builder::new()
        .name("byol-ingest".into())
        .spawn(body)
        .context("cannot start the ingest thread")
}

/// Counts a failed ingest-side job (`operation`: `ingest` or `compaction`) and logs it
/// once as `{operation}_failed`, with its kind and when it is tried again.
fn log_failure(
    metrics: &Metrics,
    operation: &'static str,
    error: &byol_ingest::IngestError,
    retry_in: Duration,
    what: &str,
) {
    let kind = error.kind();
    metrics.on_failure(operation, kind);
    let event = if operation == "compaction" {
        "compaction_failed"
    } else {
        "ingest_failed"
    };
    tracing::error!(
        event,
        kind = kind.as_str(),
        error = %error,
        retry_secs = retry_in.as_secs_f64(),
        "{what} ({kind}; retrying in {retry_in:?}): {error}"
    );
}

/// Logs (once), counts and signals one event of the ingest loop.
fn report_ingest(event: IngestEvent, controls: &Controls, metrics: &Metrics) {
    match event {
        IngestEvent::Reopened => tracing::info!(
            event = "ingest_reopened",
            "ingest: dataset reopened; rescanning the watched folders"
        ),
        IngestEvent::ReopenFailed { error, retry_in } => log_failure(
            metrics,
            "ingest",
            &error,
            retry_in,
            "cannot reopen the dataset",
        ),
        IngestEvent::Batch {
            report,
            live_records,
            changed,
        } => {
            metrics.on_ingest(&report, live_records);
            if changed || report.summary.rejected_total() > 0 {
                log_ingest("ingest", &report);
            }
            if changed {
                controls.data_changed();
            }
        }
        IngestEvent::Failed { error, retry_in } => log_failure(
            metrics,
            "ingest",
            &error,
            retry_in,
            "ingest failed, the dataset keeps its last commit",
        ),
        IngestEvent::Compacted(c) => tracing::info!(
            event = "compaction",
            shards_before = c.shards_before,
            shards_after = c.shards_after,
            bytes_before = c.bytes_before,
            bytes_after = c.bytes_after,
            reclaimed_records = c.reclaimed_records,
            "compacted: {} shards -> {}, {:.1} -> {:.1} MiB, {} retired records reclaimed",
            c.shards_before,
            c.shards_after,
            c.bytes_before as f64 / (1 << 20) as f64,
            c.bytes_after as f64 / (1 << 20) as f64,
            c.reclaimed_records
        ),
        IngestEvent::CompactionFailed { error, retry_in } => log_failure(
            metrics,
            "compaction",
            &error,
            retry_in,
            "compaction failed, the dataset is unchanged",
        ),
    }
}

/// The daemon's signals (see the module docs and `signals`): the shared stop, plus
/// marking the daemon unhealthy, STOPPING=1 and the stop's time limit; SIGUSR1; SIGHUP.
fn spawn_signals(
    config: &Path,
    controls: Arc<Controls>,
    healthy: Arc<AtomicBool>,
    stop_timeout: f64,
) -> anyhow::Result<signal_hook::iterator::Handle> {
    let config = config.to_owned();
    let mut current = toml_tables(&config).unwrap_or_default();
    let reload_controls = controls.clone();
    let on_stop = move |sig: i32| {
        tracing::info!(
            event = "stop",
            signal = sig,
            "signal {sig}: finishing the step, checkpointing, stopping"
        );
        stopping(&format!("signal {sig}: checkpointing and stopping"));
        healthy.store(false, Ordering::SeqCst);
        let limit = Duration::from_secs_f64(stop_timeout);
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            eprintln!(
                "error: the stop took longer than stop_timeout_secs = {}; exiting",
                limit.as_secs_f64()
            );
            std::process::exit(1);
        });
    };
    signals::spawn(
        controls,
        signals::Handlers {
            on_stop: Some(Box::new(on_stop)),
            checkpoint_on_usr1: true,
            on_reload: Some(Box::new(move || {
                reload(&config, &mut current, &reload_controls)
            })),
        },
    )
}

/// The config file as TOML tables (for comparing a reload with what runs).
fn toml_tables(path: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path)?;
    Ok(toml::from_str(&text)?)
}

/// SIGHUP: the config is read and validated again; a bad one is reported and the
/// running one kept. Reloadable keys apply before the next step; changes to other keys
/// are named as needing a restart.
fn reload(path: &Path, current: &mut toml::Table, controls: &Controls) {
    let checked = Config::load_for_daemon(path).and_then(|cfg| {
        cfg.validate(true)?;
        Ok((cfg, toml_tables(path)?))
    });
    let (cfg, tables) = match checked {
        Ok(ok) => ok,
        Err(e) => {
            tracing::error!(
                event = "reload",
                error = format!("{e:#}"),
                "reload refused, the running config is kept: {e:#}"
            );
            return;
        }
    };
    let d = cfg.daemon.as_ref().expect("validated");
    let new_settings = settings(&cfg, d);
    let reloadable = new_settings.reloadable_keys();
    let mut needs_restart = Vec::new();
    let empty = toml::Table::new();
    let names: std::collections::BTreeSet<&String> = current.keys().chain(tables.keys()).collect();
    for name in names {
        let old = current
            .get(name)
            .and_then(|v| v.as_table())
            .unwrap_or(&empty);
        let new = tables
            .get(name)
            .and_then(|v| v.as_table())
            .unwrap_or(&empty);
        let reloadable = reloadable
            .iter()
            .find(|(t, _)| t == name)
            .map_or(&[][..], |(_, keys)| keys.as_slice());
        for key in old.keys().chain(new.keys()) {
            if old.get(key) != new.get(key) && !reloadable.contains(key) {
                needs_restart.push(format!("[{name}] {key}"));
            }
        }
    }
    needs_restart.sort();
    needs_restart.dedup();
    controls.update(new_settings);
    *current = tables;
    tracing::info!(
        event = "reload",
        needs_restart = needs_restart.join(", "),
        "config reloaded from {}",
        path.display()
    );
    if !needs_restart.is_empty() {
        tracing::warn!(
            event = "reload_needs_restart",
            keys = needs_restart.join(", "),
            "changed keys that apply at the next restart: {}",
            needs_restart.join(", ")
        );
    }
}
