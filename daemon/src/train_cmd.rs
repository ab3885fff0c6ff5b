//! `byol train`: the loader feeding the BYOL step, with metrics and checkpoints.
//!
//! Nothing beside the step may lose the training: side inputs (`[monitor]`) are checked
//! before the first step, and an error after it, or SIGINT/SIGTERM, checkpoints the last
//! completed step before the process exits.
//!
//! Under `mpirun -np N` (built with the `mpi` feature) the N processes train one model
//! data-parallel: each loads its share of every global batch; rank 0 runs this command
//! (it decides when to stop, from signals and `--minutes`, and alone writes under the
//! run folder and prints) and the other ranks follow its orders (`byol_run::replica`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use byol_augment::Augmenter;
use byol_ingest::Dataset;
use byol_loader::{Loader, Output};
use byol_run::continuous::{Controls, DaemonSettings, Settings, TrainSettings};
use byol_run::replica::{FollowerParts, Leader, Order};
use byol_run::{
    CheckpointPolicy, FaultPoints, Monitor, RETRY_AFTER, Run, RunDir, RunParts, StepReport, resume,
    schedule_change,
};
use byol_trainer::Trainer;
use byol_trainer::dist;
use byol_trainer::input::InputSpec;

use crate::cli::TrainArgs;
use crate::config::Config;
use crate::progress::Bar;
use crate::signals;

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
    let group = dist::init()?;
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    // The first SIGINT/SIGTERM stops after the current step (with a checkpoint); a
    // second one ends the process at once (the daemon's mechanism, `signals`).
    let controls = Arc::new(Controls::new(Settings {
        train: TrainSettings::from_train(&cfg.train),
        daemon: DaemonSettings {
            idle_after_epochs: 0,
        },
    }));
    let _signals = signals::spawn(controls.clone(), signals::Handlers::default())?;
    if let Some(method) = args.method {
        cfg.train.method = method;
    }
    if let Some(init) = &args.init {
        cfg.train.init = Some(std::path::absolute(init).unwrap_or_else(|_| init.clone()));
    }
    let trainer_cfg = cfg.trainer();
    trainer_cfg.validate()?;
    let mut loader_cfg = cfg.loader.clone();
    loader_cfg.output = Output::F32;
    loader_cfg.part = byol_run::replica::share(group);
    let aug = Augmenter::new(cfg.augment.clone().unwrap_or_default())
        .context("invalid [augment] settings")?;
    let dir = RunDir::new(&args.run);
    let ckpt_dir = dir.checkpoints();
    if !group.is_main() {
        byol_run::replica::follow(
            FollowerParts {
                trainer: Trainer::new(trainer_cfg, loader_cfg.batch_size)?,
                data: args.data.clone(),
                augmenter: aug,
                loader: loader_cfg,
                checkpoints: ckpt_dir,
            },
            group,
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let leader = Leader::of_group(group);
    let dataset = Dataset::open(&args.data)
        .with_context(|| format!("cannot open dataset {}", args.data.display()))?;
    let input = InputSpec::of_views(aug.config());
    let view_size = input.size;
    // A memory bank or queue must fit the dataset (before the run folder is touched).
    let memory_warning = trainer_cfg
        .check_memory_fits(dataset.live_records().count())
        .with_context(|| format!("dataset {}", args.data.display()))?;
    // Side inputs are checked before anything is trained.
    let monitor = match &cfg.monitor {
        Some(m) => Some(Monitor::open(m, &input)?),
        None => None,
    };
    let has_checkpoints = !byol_trainer::checkpoint::list(&ckpt_dir).is_empty();
    if has_checkpoints && !args.resume {
        bail!(
            "{} already has checkpoints ({}); pass --resume to continue, or choose another --run",
            args.run.display(),
            ckpt_dir.display()
        );
    }
    let init = trainer_cfg.train.init.clone();
    let mut trainer = Trainer::new(trainer_cfg, loader_cfg.batch_size)?;
    // A fresh run starts from `[train] init` when set; a file that does not fit is
    // refused before the run folder is written to.
    if let Some(init) = init.as_ref().filter(|_| !args.resume) {
        let report = trainer
            .start_from(init)
            .context("cannot start from [train] init")?;
        println!("{report}");
    }
    let _lock = dir.lock()?;
    let state = if args.resume {
        let resumed = resume(&mut trainer, &ckpt_dir)
            .context("cannot resume")?
            .with_context(|| format!("--resume: no checkpoint in {}", ckpt_dir.display()))?;
        leader.send(&Order::Resume {
            step: Some(resumed.meta.step),
        });
        for (path, reason) in &resumed.skipped {
            eprintln!("warning: passed over {}: {reason}", path.display());
        }
        println!(
            "resumed from {} (step {})",
            resumed.path.display(),
            resumed.meta.step
        );
        if let Some(init) = &init {
            eprintln!("note: {}", byol_run::init_ignored(init, &resumed.path));
        }
        // A `--minutes` run refits the schedules to its budget on purpose.
        if let Some(change) =
            schedule_change(&resumed.meta, &trainer).filter(|_| args.minutes.is_none())
        {
            eprintln!("warning: {change}");
        }
        resumed.run.loader
    } else {
        leader.send(&Order::Resume { step: None });
        None
    };
    leader.send(&Order::Start {
        manifest: std::borrow::Cow::Borrowed(dataset.manifest()),
    });
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
        memory_warning,
    ];
    for warning in warnings.into_iter().flatten() {
        eprintln!("warning: {warning}");
        tracing::info!("{warning}");
    }
    let (run, dropped) = Run::start(RunParts {
        dir,
        trainer,
        loader,
        input,
        policy: CheckpointPolicy::from_train(&cfg.train),
        log_every: cfg.train.log_every,
        monitor,
        export_latest: false,
        faults: FaultPoints::from_env(),
        batch_trace: std::env::var_os(byol_run::TRACE_BATCHES_ENV).map(Into::into),
        retry: RETRY_AFTER,
        leader,
    })?;
    if dropped > 0 {
        println!(
            "dropped {dropped} metrics line(s) past step {} (written by a run that stopped before checkpointing them)",
            run.trainer().steps_done()
        );
    }
    let mut train = TrainLoop {
        run,
        controls,
        budget: args.minutes.map(|m| Budget {
            deadline: Instant::now() + Duration::from_secs_f64(m * 60.0),
            calibrated: false,
        }),
    };
    if leader.has_followers() {
        println!(
            "data-parallel: {} processes, {} images each of every global batch of {}",
            leader.world(),
            cfg.loader.batch_size / leader.world(),
            cfg.loader.batch_size
        );
    }
    let started = Instant::now();
    let outcome = train.steps(target);
    // The other ranks may wait in a collective of the step that failed: the job ends at
    // once (the binary aborts every rank), keeping the last checkpoint.
    if leader.has_followers()
        && let Err(e) = &outcome
        && !matches!(e, byol_run::RunError::NonFiniteLoss { .. })
    {
        return Err(outcome.unwrap_err().into());
    }
    let run = &mut train.run;
    // Whatever ended the loop, the last completed step is kept, with its metrics lines
    // (the daemon's path too).
    let mut finished = run.finish();
    // `--steps 0` on a fresh run: the encoder it starts from (random, or `init`) as
    // checkpoint step 0, for `byol eval`, `embed` and `export`.
    if target == 0 && outcome.is_ok() && run.trainer().steps_done() == 0 && !has_checkpoints {
        finished.checkpoint = Some(run.checkpoint());
    }
    leader.send(&Order::Stop);
    if let Err(e) = &finished.metrics {
        eprintln!(
            "error: metrics lines could not be written ({}): {e}",
            e.kind()
        );
    }
    if let Some(Ok(saved)) = &finished.checkpoint {
        for (operation, e) in saved.failures() {
            eprintln!(
                "warning: {} failed after the checkpoint ({}): {e}",
                operation.as_str(),
                e.kind()
            );
        }
    }
    let saved = finished.checkpoint.map(|c| c.map(|c| c.path));
    let step = run.trainer().steps_done();
    match (outcome, saved) {
        (Err(e), Some(Ok(path))) => Err(anyhow::Error::from(e).context(format!(
            "training stopped after step {step}; checkpoint written to {} (resume with --resume)",
            path.display()
        ))),
        (Err(e), Some(Err(save_err))) => Err(anyhow::Error::from(e).context(format!(
            "training stopped after step {step}, and its checkpoint failed too: {save_err:#}"
        ))),
        (Err(e), None) => Err(e.into()),
        (Ok(_), Some(Err(save_err))) => Err(save_err.into()),
        (Ok(stop), _) => {
            let how = match stop {
                Some(sig) => format!("stopped by signal {sig} at step"),
                None => "trained to step".into(),
            };
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{how} {step} in {secs:.1} s; metrics in {}, checkpoints in {}",
                run.dir().metrics().display(),
                ckpt_dir.display()
            );
            if group.reduces_gradients() {
                let t = group.sync_times();
                println!(
                    "data-parallel sync on rank 0: gradients {:.1} s ({:.1}%), BatchNorm {:.1} s ({:.1}%), other {:.1} s ({:.1}%) of {secs:.1} s",
                    t.gradients,
                    100.0 * t.gradients / secs,
                    t.batch_norm,
                    100.0 * t.batch_norm / secs,
                    t.other,
                    100.0 * t.other / secs
                );
            }
            Ok(match stop {
                Some(sig) => ExitCode::from(128 + sig as u8),
                None => ExitCode::SUCCESS,
            })
        }
    }
}

/// `byol train`'s loop around the run: a target step, signals, a time budget.
struct TrainLoop {
    run: Run,
    /// The stop a signal asks for.
    controls: Arc<Controls>,
    budget: Option<Budget>,
}

impl TrainLoop {
    /// Steps until `target`, a signal (its number is returned), or an error.
    fn steps(&mut self, mut target: u64) -> Result<Option<i32>, byol_run::RunError> {
        let first_step = self.run.trainer().steps_done();
        let bar = Bar::new(target.saturating_sub(first_step).min(1 << 40), "train");
        // When and at which step the calibration of a `--minutes` run started timing
        // (after its first step, which pays one-off costs).
        let mut calibration = (Instant::now(), first_step);
        while self.run.trainer().steps_done() < target {
            // A stop is rank 0's decision (mpirun forwards signals to every rank, but not
            // at the same step; the others ignore theirs).
            if let Some(sig) = self.controls.stop_requested() {
                bar.finish();
                return Ok(Some(sig));
            }
            // The last step of a `--minutes` run is the one that reaches the deadline,
            // and the last step of the target is logged.
            let next = self.run.trainer().steps_done() + 1;
            let out_of_time =
                |b: &Option<Budget>| b.as_ref().is_some_and(|b| Instant::now() >= b.deadline);
            let report = self.run.step(next == target)?;
            report_failures(&report, self.run.retry_interval());
            bar.inc(1);
            if let Some(fitted) = self.fit_budget(first_step, &mut calibration) {
                target = fitted;
                bar.set_length(fitted - first_step);
            }
            // The last step: the deadline's, or the target's (also one that a
            // `--minutes` fit has just moved to the step done, after its step was
            // taken without a forced log).
            let last = out_of_time(&self.budget) || self.run.trainer().steps_done() >= target;
            let logged = match (report.logged, last) {
                (true, _) => report.line.clone(),
                (false, true) => match self.run.log_last(&report)? {
                    (line, Ok(())) => Some(line),
                    // Data-parallel, a failed metrics write is not the job's end (the
                    // other ranks could not take the last checkpoint with it); `finish`
                    // retries.
                    (line, Err(e)) if self.run.leader().has_followers() => {
                        eprintln!("warning: the last metrics line waits ({}): {e}", e.kind());
                        Some(line)
                    }
                    (_, Err(e)) => return Err(e),
                },
                (false, false) => None,
            };
            if let Some(line) = logged {
                bar.message(&format!(
                    "loss {:.4} collapse {:.3} lr {:.4} {:.0} img/s",
                    line.loss, line.collapse, line.lr, line.images_per_sec
                ));
            }
            if last {
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
        let (now, done) = (Instant::now(), self.run.trainer().steps_done());
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
        self.run.trainer_mut().set_total_steps(fitted);
        let line = format!(
            "--minutes: {:.2} s/step over {CALIBRATION_STEPS} steps; schedules fitted to {fitted} steps",
            per_step
        );
        println!("{line}");
        tracing::info!("{line}");
        Some(fitted)
    }
}

/// Says what failed beside a step (a full disk): the metrics line (it waits), the
/// checkpoint (tried again), a prune after a good checkpoint. Training goes on.
fn report_failures(report: &StepReport, retry: Duration) {
    if let Some(e) = &report.metrics_error {
        eprintln!(
            "error: metrics line not written ({}; it waits, retrying in {:.0} s): {e}",
            e.kind(),
            retry.as_secs_f64()
        );
    }
    match &report.checkpoint {
        Some(Err(e)) => eprintln!(
            "error: checkpoint failed ({}; the previous ones are intact; retrying in {:.0} s): {e}",
            e.kind(),
            retry.as_secs_f64()
        ),
        Some(Ok(saved)) => {
            for (operation, e) in saved.failures() {
                eprintln!(
                    "warning: {} failed after the checkpoint ({}): {e}",
                    operation.as_str(),
                    e.kind()
                );
            }
        }
        None => {}
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
fn size_warning(
    data: &std::path::Path,
    median_short_side: Option<u32>,
    view_size: u32,
) -> Option<String> {
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
