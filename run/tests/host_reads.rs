//! The training path reads nothing from the device between log steps: the loss, the
//! non-finite flag and the embeddings' health are read at log steps and before
//! checkpoints only (every read counted by `byol_trainer::host`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use byol_augment::{AugmentConfig, Augmenter};
use byol_ingest::{Dataset, IngestOptions, NoProgress, ingest};
use byol_loader::{Loader, LoaderConfig, Output};
use byol_run::{CheckpointPolicy, FaultPoints, Run, RunDir, RunError, RunParts};
use byol_trainer::config::{ModelConfig, OptimizerKind};
use byol_trainer::host::reads_on_this_thread;
use byol_trainer::{OptimConfig, TrainConfig, Trainer, TrainerConfig};

/// 32 small labelled PNGs, ingested.
fn dataset(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    for i in 0..32u32 {
        let class = if i % 2 == 0 { "a" } else { "b" };
        std::fs::create_dir_all(src.join(class)).unwrap();
        image::RgbImage::from_fn(20 + i % 5, 18, |x, y| {
            image::Rgb([(x * 9 + i) as u8, (y * 13 + i * 3) as u8, (i * 31) as u8])
        })
        .save(src.join(class).join(format!("{i:03}.png")))
        .unwrap();
    }
    let out = dir.join("ds");
    let mut o = IngestOptions::new(vec![src], out.clone());
    o.settings.max_side = Some(0);
    ingest(&o, &NoProgress).unwrap();
    out
}

/// A width-4 ResNet-18 on 16-px views, batch 8, logging every 5 steps, no checkpoint by
/// policy.
fn run(dir: &Path, faults: FaultPoints) -> Run {
    let trainer = Trainer::new(
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
        8,
    )
    .unwrap();
    let loader = Loader::new(
        Dataset::open(&dataset(dir)).unwrap(),
        Augmenter::new(AugmentConfig::small(16)).unwrap(),
        LoaderConfig {
            batch_size: 8,
            threads: 1,
            output: Output::F32,
            ..LoaderConfig::default()
        },
        None,
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("run")).unwrap();
    Run::start(RunParts {
        dir: RunDir::new(dir.join("run")),
        trainer,
        loader,
        input: byol_trainer::input::InputSpec::of_views(&AugmentConfig::small(16)),
        policy: CheckpointPolicy {
            every_steps: 0,
            every_minutes: 0.0,
            keep_last: 2,
        },
        log_every: 5,
        monitor: None,
        export_latest: false,
        faults,
        batch_trace: None,
        retry: Duration::from_secs(1),
    })
    .unwrap()
    .0
}

#[test]
fn steps_between_log_steps_read_nothing_from_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = run(dir.path(), FaultPoints::default());
    for step in 1..=12u64 {
        let before = reads_on_this_thread();
        let report = run.step(false).unwrap();
        let reads = reads_on_this_thread() - before;
        if step % 5 == 0 {
            // The loss and the non-finite flag, the embeddings' collapse and rank.
            assert!(reads > 0, "step {step} logs");
            let line = report.line.expect("a log step");
            assert!(line.loss.is_finite(), "{line:?}");
        } else {
            assert_eq!(reads, 0, "step {step} read the device {reads} times");
            assert!(report.line.is_none());
        }
    }
    // A checkpoint reads the flag of the steps since the last read, then the tensors.
    let before = reads_on_this_thread();
    run.checkpoint().unwrap();
    assert!(reads_on_this_thread() > before);
}

#[test]
fn a_non_finite_loss_is_found_at_the_next_log_step_and_never_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultPoints {
        nan_at: Some(7),
        ..FaultPoints::default()
    };
    let mut run = run(dir.path(), faults);
    for _ in 1..=9 {
        run.step(false).unwrap();
    }
    // Step 10 logs: the read finds step 7's loss.
    match run.step(false) {
        Err(RunError::NonFiniteLoss { step: 7, loss }) => assert!(loss.is_nan()),
        other => panic!("expected the non-finite loss of step 7, got {other:?}"),
    }
    assert!(matches!(
        run.checkpoint(),
        Err(RunError::Diverged { step: 10 })
    ));
    assert!(
        matches!(
            run.step(false),
            Err(RunError::NonFiniteLoss { step: 7, .. })
        ),
        "no step until the rollback"
    );
    assert_eq!(
        run.rollback().unwrap(),
        None,
        "no checkpoint: back to the seed"
    );
    assert_eq!(run.trainer().steps_done(), 0);
    run.step(false).unwrap();
}

#[test]
fn a_checkpoint_between_log_steps_checks_the_steps_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultPoints {
        nan_at: Some(2),
        ..FaultPoints::default()
    };
    let mut run = run(dir.path(), faults);
    for _ in 0..3 {
        run.step(false).unwrap();
    }
    assert!(matches!(
        run.checkpoint(),
        Err(RunError::Diverged { step: 3 })
    ));
    assert!(!dir.path().join("run/checkpoints/step-0000000003").exists());
}
