//! What the run's integration tests build a run from: a small ingested dataset, a tiny
//! trainer and its loader.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use byol_augment::{AugmentConfig, Augmenter};
use byol_ingest::{Dataset, IngestOptions, NoProgress, ingest};
use byol_loader::{Loader, LoaderConfig, Output};
use byol_run::replica::Leader;
use byol_run::{CheckpointPolicy, FaultPoints, RunDir, RunParts};
use byol_trainer::config::{ModelConfig, OptimizerKind};
use byol_trainer::{OptimConfig, TrainConfig, Trainer, TrainerConfig};

/// The views' side.
pub const SIZE: u32 = 16;
/// Images per batch.
pub const BATCH: usize = 8;

/// Writes small labelled PNGs `first..first + n` under `src/a` and `src/b`.
pub fn images(src: &Path, first: u32, n: u32) {
    for i in first..first + n {
        let class = if i % 2 == 0 { "a" } else { "b" };
        std::fs::create_dir_all(src.join(class)).unwrap();
        image::RgbImage::from_fn(20 + i % 5, 18, |x, y| {
            image::Rgb([(x * 9 + i) as u8, (y * 13 + i * 3) as u8, (i * 31) as u8])
        })
        .save(src.join(class).join(format!("{i:03}.png")))
        .unwrap();
    }
}

/// Ingests `dir/src` into `dir/ds` (again: the new files are added); returns `dir/ds`.
pub fn ingest_src(dir: &Path) -> PathBuf {
    let out = dir.join("ds");
    let mut o = IngestOptions::new(vec![dir.join("src")], out.clone());
    o.settings.max_side = Some(0);
    ingest(&o, &NoProgress).unwrap();
    out
}

/// 32 small labelled PNGs, ingested.
pub fn dataset(dir: &Path) -> PathBuf {
    images(&dir.join("src"), 0, 32);
    ingest_src(dir)
}

/// A width-4 ResNet-18 (heads 32 → 16) trained by AdamW on the CPU, batch [`BATCH`].
pub fn trainer() -> Trainer {
    Trainer::new(
        TrainerConfig {
            model: ModelConfig {
                width: 4,
                projector_hidden: 32,
                projection_dim: 16,
                predictor_hidden: 32,
                ..ModelConfig::small(4)
            },
            optim: OptimConfig {
                optimizer: OptimizerKind::Adamw,
                base_lr: 1e-3,
                ..OptimConfig::default()
            },
            train: TrainConfig {
                device: "cpu".into(),
                total_steps: 100,
                ..TrainConfig::default()
            },
            ..TrainerConfig::default()
        },
        BATCH,
    )
    .unwrap()
}

/// The small-image views at [`SIZE`] px.
pub fn augmenter() -> Augmenter {
    Augmenter::new(AugmentConfig::small(SIZE)).unwrap()
}

/// Batches of [`BATCH`] from one loader thread.
pub fn loader_config() -> LoaderConfig {
    LoaderConfig {
        batch_size: BATCH,
        threads: 1,
        output: Output::F32,
        ..LoaderConfig::default()
    }
}

/// A loader of the dataset at `data`.
pub fn loader(data: &Path) -> Loader {
    Loader::new(
        Dataset::open(data).unwrap(),
        augmenter(),
        loader_config(),
        None,
    )
    .unwrap()
}

/// The parts of a run in `dir/run`, logging every 5 steps and checkpointing every
/// `checkpoint_every` steps (0: never by policy).
pub fn parts(
    dir: &Path,
    trainer: Trainer,
    loader: Loader,
    faults: FaultPoints,
    checkpoint_every: u64,
    leader: Leader,
) -> RunParts {
    std::fs::create_dir_all(dir.join("run")).unwrap();
    RunParts {
        dir: RunDir::new(dir.join("run")),
        trainer,
        loader,
        input: byol_trainer::input::InputSpec::of_views(&AugmentConfig::small(SIZE)),
        policy: CheckpointPolicy {
            every_steps: checkpoint_every,
            every_minutes: 0.0,
            keep_last: 2,
        },
        log_every: 5,
        monitor: None,
        export_latest: false,
        faults,
        batch_trace: None,
        retry: Duration::from_secs(1),
        leader,
    }
}
