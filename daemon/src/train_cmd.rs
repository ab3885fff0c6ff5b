//! `byol train`: the loader feeding the BYOL step, with metrics and checkpoints.
//!
//! Nothing beside the step may lose the training: side inputs (`[monitor]`) are checked
//! before the first step, and an error after it, or SIGINT/SIGTERM, checkpoints the last
//! completed step before the process exits.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use byol_augment::Augmenter;
use byol_ingest::Dataset;
use byol_loader::{Loader, LoaderState, Output};
use byol_trainer::{Trainer, TrainerConfig, checkpoint};
use serde::Serialize;

use crate::cli::TrainArgs;
use crate::config::Config;
use crate::monitor::Monitor;
use crate::progress::Bar;

/// File of metrics lines in the run folder (JSON Lines, appended).
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Test hook: abort the process (as `kill -9` would) right after this step's metrics
/// line, so a test can crash a run at a known step.
const ABORT_AT_STEP_ENV: &str = "BYOL_TEST_ABORT_AT_STEP";
/// Test hook: fail with an error right after this step's metrics line, so a test can
/// check what an error beside training leaves behind.
const FAIL_AT_STEP_ENV: &str = "BYOL_TEST_FAIL_AT_STEP";

fn step_from_env(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

#[derive(Serialize)]
struct MetricsLine {
    step: u64,
    epoch: u64,
    loss: f32,
    lr: f64,
    tau: f64,
    collapse: f32,
    images_per_sec: f64,
    data_wait_secs: f64,
    elapsed_secs: f64,
    /// Records the loader skipped so far because they are corrupt (each counted once).
    #[serde(skip_serializing_if = "is_zero")]
    skipped_records: u64,
    /// kNN top-1 of the `[monitor]` datasets, on the steps it measures.
    #[serde(skip_serializing_if = "Option::is_none")]
    knn_accuracy: Option<f64>,
    /// Monitor records skipped on that measurement because they are corrupt.
    #[serde(skip_serializing_if = "Option::is_none")]
    knn_skipped_records: Option<u64>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Steps of a `--minutes` run timed before the schedules are fitted to the budget.
const CALIBRATION_STEPS: u64 = 10;

/// A wall-clock budget (`--minutes`).
struct Budget {
    deadline: Instant,
    /// The schedules have been fitted to the steps that fit.
    calibrated: bool,
}

/// Runs `byol train`.
pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    // The first SIGINT/SIGTERM stops after the current step (with a checkpoint); a
    // second one ends the process at once.
    let signal = Arc::new(AtomicUsize::new(0));
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, stopping.clone())
            .and_then(|_| signal_hook::flag::register(sig, stopping.clone()))
            .and_then(|_| signal_hook::flag::register_usize(sig, signal.clone(), sig as usize))
            .context("cannot install the signal handlers")?;
    }
    let cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let trainer_cfg = TrainerConfig {
        model: cfg.model.clone(),
        optim: cfg.optim.clone(),
        train: cfg.train.clone(),
    };
    trainer_cfg.validate()?;
    let mut loader_cfg = cfg.loader.clone();
    loader_cfg.output = Output::F32;
    let aug = Augmenter::new(cfg.augment.clone().unwrap_or_default())
        .context("invalid [augment] settings")?;
    let dataset = Dataset::open(&args.data)
        .with_context(|| format!("cannot open dataset {}", args.data.display()))?;
    let view_size = aug.size();
    // Side inputs are checked before anything is trained.
    let monitor = match &cfg.monitor {
        Some(m) => Some(Monitor::open(m, view_size)?),
        None => None,
    };
    let ckpt_dir = args.run.join("checkpoints");
    let latest = checkpoint::latest(&ckpt_dir);
    let mut trainer = Trainer::new(trainer_cfg, loader_cfg.batch_size)?;
    let state = match (&latest, args.resume) {
        (Some(path), true) => {
            let meta = trainer.load_checkpoint(path).context("cannot resume")?;
            println!("resumed from {} (step {})", path.display(), meta.step);
            meta.loader
        }
        (None, true) => bail!("--resume: no checkpoint in {}", ckpt_dir.display()),
        (Some(path), false) => bail!(
            "{} already has checkpoints ({}); pass --resume to continue, or choose another --run",
            args.run.display(),
            path.display()
        ),
        (None, false) => None,
    };
    let short_side = median_short_side(&dataset);
    let loader = Loader::new(dataset, aug, loader_cfg, state)?;
    let target = match (args.steps, args.epochs, args.minutes) {
        (Some(s), _, _) => s,
        (None, Some(e), _) => e * loader.batches_per_epoch(),
        (None, None, Some(m)) if m > 0.0 && m.is_finite() => u64::MAX,
        (None, None, Some(m)) => bail!("--minutes must be a positive number, not {m}"),
        (None, None, None) => cfg.train.total_steps,
    };
    let warnings = [
        schedule_warning(&cfg.train, &cfg.optim, target).filter(|_| args.minutes.is_none()),
        size_warning(&args.data, short_side, view_size),
    ];
    for warning in warnings.into_iter().flatten() {
        eprintln!("warning: {warning}");
        tracing::info!("{warning}");
    }
    std::fs::create_dir_all(&args.run)
        .with_context(|| format!("cannot create {}", args.run.display()))?;
    let metrics_path = args.run.join(METRICS_FILE);
    // Lines past the step we resume from were written by the run that crashed: the
    // resumed run writes those steps again.
    let dropped = truncate_metrics(&metrics_path, trainer.steps_done())?;
    if dropped > 0 {
        println!(
            "dropped {dropped} metrics line(s) past step {} (written by a run that stopped before checkpointing them)",
            trainer.steps_done()
        );
    }
    let metrics = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("cannot open {}", metrics_path.display()))?;

    let resumed = loader.state();
    let mut run = TrainLoop {
        trainer,
        last_epoch: resumed.epoch,
        last_state: resumed,
        last_ckpt: (Instant::now(), u64::MAX),
        loader,
        monitor,
        metrics,
        ckpt_dir: ckpt_dir.clone(),
        view_size,
        signal,
        budget: args.minutes.map(|m| Budget {
            deadline: Instant::now() + Duration::from_secs_f64(m * 60.0),
            calibrated: false,
        }),
        abort_at: step_from_env(ABORT_AT_STEP_ENV),
        fail_at: step_from_env(FAIL_AT_STEP_ENV),
    };
    run.last_ckpt.1 = run.trainer.steps_done();
    let started = Instant::now();
    let outcome = run.steps(&cfg.train, target);
    // Whatever ended the loop, the last completed step is kept.
    let saved = if run.trainer.steps_done() != run.last_ckpt.1 {
        Some(run.save())
    } else {
        None
    };
    match (outcome, saved) {
        (Err(e), Some(Ok(path))) => Err(e.context(format!(
            "training stopped after step {}; checkpoint written to {} (resume with --resume)",
            run.trainer.steps_done(),
            path.display()
        ))),
        (Err(e), Some(Err(save_err))) => Err(e.context(format!(
            "training stopped after step {}, and its checkpoint failed too: {save_err:#}",
            run.trainer.steps_done()
        ))),
        (Err(e), None) => Err(e),
        (Ok(_), Some(Err(save_err))) => Err(save_err),
        (Ok(stop), _) => {
            let how = match stop {
                Some(sig) => format!("stopped by signal {sig} at step"),
                None => "trained to step".into(),
            };
            println!(
                "{how} {} in {:.1} s; metrics in {}, checkpoints in {}",
                run.trainer.steps_done(),
                started.elapsed().as_secs_f64(),
                metrics_path.display(),
                ckpt_dir.display()
            );
            Ok(match stop {
                Some(sig) => ExitCode::from(128 + sig as u8),
                None => ExitCode::SUCCESS,
            })
        }
    }
}

/// The state of a training run between steps.
struct TrainLoop {
    trainer: Trainer,
    loader: Loader,
    monitor: Option<Monitor>,
    metrics: File,
    ckpt_dir: PathBuf,
    view_size: u32,
    /// Loader state and epoch after the last completed step (what a checkpoint records).
    last_state: LoaderState,
    last_epoch: u64,
    /// When, and at which step, the last checkpoint was written.
    last_ckpt: (Instant, u64),
    /// Signal number received (0: none).
    signal: Arc<AtomicUsize>,
    budget: Option<Budget>,
    abort_at: Option<u64>,
    fail_at: Option<u64>,
}

impl TrainLoop {
    /// Steps until `target`, a signal (its number is returned), or an error.
    fn steps(
        &mut self,
        train: &byol_trainer::TrainConfig,
        mut target: u64,
    ) -> anyhow::Result<Option<i32>> {
        let size = self.view_size as usize;
        let first_step = self.trainer.steps_done();
        let bar = Bar::new(target.saturating_sub(first_step).min(1 << 40), "train");
        let started = Instant::now();
        let mut window = (Instant::now(), 0u64, Duration::ZERO);
        // When and at which step the calibration of a `--minutes` run started timing
        // (after its first step, which pays one-off costs).
        let mut calibration = (Instant::now(), first_step);
        while self.trainer.steps_done() < target {
            let sig = self.signal.load(Ordering::Relaxed);
            if sig != 0 {
                bar.finish();
                return Ok(Some(sig as i32));
            }

            let wait_start = Instant::now();
            let batch = self.loader.next_batch();
            window.2 += wait_start.elapsed();
            let stats = self.trainer.step(batch.view1(), batch.view2(), size)?;
            window.1 += batch.len() as u64;
            let epoch = batch.epoch;
            drop(batch);
            self.last_state = self.loader.state();
            self.last_epoch = epoch;
            bar.inc(1);
            if let Some(fitted) = self.fit_budget(first_step, &mut calibration) {
                target = fitted;
                bar.set_length(fitted - first_step);
            }
            let knn = match &self.monitor {
                Some(m) if m.due(stats.step) => Some(m.measure(&self.trainer)?),
                _ => None,
            };
            // The last step of a `--minutes` run is the one that reaches the deadline.
            let out_of_time = self
                .budget
                .as_ref()
                .is_some_and(|b| Instant::now() >= b.deadline);
            if stats.step % train.log_every == 0
                || stats.step == target
                || out_of_time
                || knn.is_some()
            {
                let secs = window.0.elapsed().as_secs_f64().max(1e-9);
                let line = MetricsLine {
                    step: stats.step,
                    epoch,
                    loss: stats.loss,
                    lr: stats.lr,
                    tau: stats.tau,
                    collapse: stats.collapse,
                    images_per_sec: window.1 as f64 / secs,
                    data_wait_secs: window.2.as_secs_f64(),
                    elapsed_secs: started.elapsed().as_secs_f64(),
                    skipped_records: self.loader.stats().skipped,
                    knn_accuracy: knn.map(|k| k.accuracy),
                    knn_skipped_records: knn.map(|k| k.skipped as u64),
                };
                writeln!(self.metrics, "{}", serde_json::to_string(&line)?)
                    .context("cannot append to metrics.jsonl")?;
                bar.message(&format!(
                    "loss {:.4} collapse {:.3} lr {:.4} {:.0} img/s",
                    stats.loss, stats.collapse, stats.lr, line.images_per_sec
                ));
                tracing::info!(
                    step = stats.step,
                    loss = stats.loss,
                    collapse = stats.collapse,
                    lr = stats.lr,
                    tau = stats.tau,
                    knn_accuracy = line.knn_accuracy,
                    "step"
                );
                window = (Instant::now(), 0, Duration::ZERO);
            }
            if self.abort_at == Some(stats.step) {
                std::process::abort();
            }
            if self.fail_at == Some(stats.step) {
                bail!(
                    "injected fault after step {} ({FAIL_AT_STEP_ENV})",
                    stats.step
                );
            }
            let by_steps = train.checkpoint_every_steps > 0
                && stats.step - self.last_ckpt.1 >= train.checkpoint_every_steps;
            let by_time = train.checkpoint_every_minutes > 0.0
                && self.last_ckpt.0.elapsed().as_secs_f64()
                    >= train.checkpoint_every_minutes * 60.0;
            if by_steps || by_time {
                self.save()?;
            }
            if out_of_time {
                break;
            }
        }
        bar.finish();
        Ok(None)
    }

    /// For a `--minutes` run, once [`CALIBRATION_STEPS`] steps are timed: the step the
    /// budget reaches at the measured pace, which becomes the schedules' length and the
    /// run's target. `None` before (and after) that moment.
    fn fit_budget(&mut self, first_step: u64, calibration: &mut (Instant, u64)) -> Option<u64> {
        let budget = self.budget.as_mut().filter(|b| !b.calibrated)?;
        let (now, done) = (Instant::now(), self.trainer.steps_done());
        if done == first_step + 1 {
            *calibration = (now, done);
        }
        if done < calibration.1 + CALIBRATION_STEPS || done == first_step + 1 {
            return None;
        }
        budget.calibrated = true;
        let per_step = (now - calibration.0).as_secs_f64() / (done - calibration.1) as f64;
        let remaining = budget.deadline.saturating_duration_since(now).as_secs_f64();
        let fitted = done + (remaining / per_step.max(1e-9)).floor() as u64;
        self.trainer.set_total_steps(fitted);
        let line = format!(
            "--minutes: {:.2} s/step over {CALIBRATION_STEPS} steps; schedules fitted to {fitted} steps",
            per_step
        );
        println!("{line}");
        tracing::info!("{line}");
        Some(fitted)
    }

    /// Checkpoints the last completed step.
    fn save(&mut self) -> anyhow::Result<PathBuf> {
        let path = checkpoint::save(
            &self.ckpt_dir,
            &self.trainer,
            self.last_epoch,
            Some(self.last_state),
            Some(self.view_size),
        )?;
        tracing::info!(path = %path.display(), "checkpoint written");
        self.last_ckpt = (Instant::now(), self.trainer.steps_done());
        Ok(path)
    }
}

/// A warning when the run would train past the end of its cosine schedules, where the
/// learning rate is 0 and τ is 1: those steps change nothing.
fn schedule_warning(
    train: &byol_trainer::TrainConfig,
    optim: &byol_trainer::OptimConfig,
    target: u64,
) -> Option<String> {
    let cosine = optim.schedule == byol_trainer::Schedule::Cosine;
    (cosine && target > train.total_steps).then(|| {
        format!(
            "training to step {target}, but the cosine schedules end at train.total_steps = {}: \
             steps past it run at learning rate 0 and change nothing; raise total_steps in the \
             [train] table (or use schedule = \"constant\")",
            train.total_steps
        )
    })
}

/// A warning when the dataset's images were stored smaller than the views: every view
/// is then upsampled, and the detail the view size pays for is not there.
fn size_warning(data: &Path, median_short_side: Option<u32>, view_size: u32) -> Option<String> {
    let m = median_short_side?;
    (2 * m < view_size).then(|| {
        format!(
            "half of the images in {} have a short side of {m} px or less, under half the \
             {view_size} px views: their views are upsampled at least 2x; train at a smaller \
             [augment] size, or ingest larger images (--max-side)",
            data.display()
        )
    })
}

/// The median short side of the dataset's live images (`None` when it has none).
fn median_short_side(dataset: &Dataset) -> Option<u32> {
    let mut sides: Vec<u32> = dataset
        .live_records()
        .map(|r| {
            let m = dataset.meta(r);
            m.width.min(m.height)
        })
        .collect();
    if sides.is_empty() {
        return None;
    }
    let mid = sides.len() / 2;
    Some(*sides.select_nth_unstable(mid).1)
}

/// Rewrites `metrics.jsonl` without the lines past `step` (and a torn last line),
/// atomically; returns how many lines were dropped. A missing file is fine.
fn truncate_metrics(path: &Path, step: u64) -> anyhow::Result<usize> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut kept = Vec::new();
    let mut dropped = 0;
    for line in BufReader::new(file).lines() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        let line_step = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v["step"].as_u64());
        match line_step {
            Some(s) if s <= step => {
                kept.extend_from_slice(line.as_bytes());
                kept.push(b'\n');
            }
            _ => dropped += 1,
        }
    }
    if dropped > 0 {
        byol_ingest::fsutil::write_atomic(path, &kept)
            .with_context(|| format!("cannot rewrite {}", path.display()))?;
    }
    Ok(dropped)
}
