//! `byol train`: the loader feeding the BYOL step, with metrics and checkpoints.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use byol_augment::Augmenter;
use byol_ingest::Dataset;
use byol_loader::{Loader, Output};
use byol_trainer::{Trainer, TrainerConfig, checkpoint};
use serde::Serialize;

use crate::cli::TrainArgs;
use crate::config::Config;
use crate::monitor::Monitor;
use crate::progress::Bar;

/// File of metrics lines in the run folder (JSON Lines, appended).
pub const METRICS_FILE: &str = "metrics.jsonl";

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
    /// kNN top-1 of the `[monitor]` datasets, on the steps it measures.
    #[serde(skip_serializing_if = "Option::is_none")]
    knn_accuracy: Option<f64>,
}

/// Runs `byol train`.
pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
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
    let ckpt_dir = args.run.join("checkpoints");
    let latest = checkpoint::latest(&ckpt_dir);
    let mut trainer = Trainer::new(trainer_cfg, loader_cfg.batch_size)?;
    let state = match (&latest, args.resume) {
        (Some(path), true) => {
            let meta = trainer
                .load_checkpoint(path)
                .with_context(|| format!("cannot resume from {}", path.display()))?;
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
    let view_size = aug.size();
    let size = view_size as usize;
    let monitor = match &cfg.monitor {
        Some(m) => Some(Monitor::open(m, view_size)?),
        None => None,
    };
    let mut loader = Loader::new(dataset, aug, loader_cfg, state)?;
    let target = match (args.steps, args.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => e * loader.batches_per_epoch(),
        (None, None) => cfg.train.total_steps,
    };
    std::fs::create_dir_all(&args.run)
        .with_context(|| format!("cannot create {}", args.run.display()))?;
    let metrics_path = args.run.join(METRICS_FILE);
    let mut metrics = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("cannot open {}", metrics_path.display()))?;

    let train = &cfg.train;
    let bar = Bar::new(target.saturating_sub(trainer.steps_done()), "train");
    let started = Instant::now();
    let mut window = (Instant::now(), 0u64, Duration::ZERO);
    let mut last_ckpt = (Instant::now(), trainer.steps_done());
    let mut epoch = loader.state().epoch;
    while trainer.steps_done() < target {
        let wait_start = Instant::now();
        let batch = loader.next_batch();
        window.2 += wait_start.elapsed();
        let stats = trainer.step(batch.view1(), batch.view2(), size)?;
        window.1 += batch.len() as u64;
        epoch = batch.epoch;
        drop(batch);
        bar.inc(1);
        let knn_accuracy = match &monitor {
            Some(m) if m.due(stats.step) => Some(m.measure(&trainer)?),
            _ => None,
        };
        if stats.step % train.log_every == 0 || stats.step == target || knn_accuracy.is_some() {
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
                knn_accuracy,
            };
            writeln!(metrics, "{}", serde_json::to_string(&line)?)?;
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
                knn_accuracy,
                "step"
            );
            window = (Instant::now(), 0, Duration::ZERO);
        }
        let by_steps = train.checkpoint_every_steps > 0
            && stats.step - last_ckpt.1 >= train.checkpoint_every_steps;
        let by_time = train.checkpoint_every_minutes > 0.0
            && last_ckpt.0.elapsed().as_secs_f64() >= train.checkpoint_every_minutes * 60.0;
        if by_steps || by_time {
            save(&ckpt_dir, &trainer, epoch, &loader, view_size)?;
            last_ckpt = (Instant::now(), stats.step);
        }
    }
    bar.finish();
    if last_ckpt.1 != trainer.steps_done() {
        save(&ckpt_dir, &trainer, epoch, &loader, view_size)?;
    }
    println!(
        "trained to step {} in {:.1} s; metrics in {}, checkpoints in {}",
        trainer.steps_done(),
        started.elapsed().as_secs_f64(),
        metrics_path.display(),
        ckpt_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn save(
    dir: &Path,
    trainer: &Trainer,
    epoch: u64,
    loader: &Loader,
    view_size: u32,
) -> anyhow::Result<()> {
    let path = checkpoint::save(dir, trainer, epoch, Some(loader.state()), Some(view_size))?;
    tracing::info!(path = %path.display(), "checkpoint written");
    Ok(())
}
