//! The objective seam changed no arithmetic: BYOL after the extraction reproduces, bit for
//! bit, weights and losses recorded before it (`tests/data/before-seam/`), from scratch
//! and resumed from a format-1 checkpoint written then.

mod common;

use common::step_loss;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use byol_trainer::config::{ModelConfig, OptimizerKind, Schedule};
use byol_trainer::{
    CheckpointProblem, Objective, OptimConfig, TrainConfig, TrainError, Trainer, TrainerConfig,
    checkpoint,
};
use candle_core::{DType, Device, Tensor};

/// The config the fixtures were written with (τ through the deprecated `[optim]` key, as
/// configs of the time wrote it).
fn tiny(kind: OptimizerKind) -> TrainerConfig {
    TrainerConfig {
        model: ModelConfig {
            width: 4,
            projector_hidden: 32,
            projection_dim: 16,
            predictor_hidden: 32,
            ..ModelConfig::small(4)
        },
        optim: OptimConfig {
            optimizer: kind,
            base_lr: if kind == OptimizerKind::Adamw {
                1e-3
            } else {
                0.5
            },
            weight_decay: 1e-4,
            warmup_steps: 2,
            schedule: Schedule::Cosine,
            tau_base: Some(0.9),
            ..OptimConfig::default()
        },
        train: TrainConfig {
            total_steps: 20,
            device: "cpu".into(),
            seed: 7,
            ..TrainConfig::default()
        },
        ..TrainerConfig::default()
    }
}

fn views(seed: u64) -> (Tensor, Tensor) {
    common::views(4, 8, seed)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/before-seam")
}

fn name(kind: OptimizerKind) -> &'static str {
    match kind {
        OptimizerKind::Lars => "lars",
        OptimizerKind::Adamw => "adamw",
        OptimizerKind::Sgd => unreachable!("no fixture"),
    }
}

/// Every online and target tensor as `online.*` / `target.*`, with the counters.
fn state(t: &Trainer) -> HashMap<String, Tensor> {
    let Objective::Byol(byol) = t.objective() else {
        unreachable!("a BYOL trainer")
    };
    let online = t
        .online_named()
        .into_iter()
        .map(|(n, v)| (format!("online.{n}"), v));
    let target = byol
        .target_named()
        .into_iter()
        .map(|(n, v)| (format!("target.{n}"), v));
    online
        .chain(target)
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect()
}

/// Asserts `t` holds exactly the reference's tensors and has made `steps` steps, each
/// BatchNorm counting two training-mode forwards per step.
fn assert_matches_reference(t: &Trainer, kind: OptimizerKind, losses: &[f32], steps: i64) {
    let file = fixtures().join(format!("{}-after-6-steps.safetensors", name(kind)));
    let reference = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let got = state(t);
    let flat = |t: &Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    let want_losses: Vec<f32> = reference["loss"].to_vec1().unwrap();
    let tail = &want_losses[want_losses.len() - losses.len()..];
    assert_eq!(
        losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        tail.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        "{kind:?} losses {losses:?} vs {tail:?}"
    );
    for (n, want) in reference.iter().filter(|(n, _)| *n != "loss") {
        let have = got
            .get(n)
            .unwrap_or_else(|| panic!("{kind:?}: {n} is missing"));
        assert_eq!(flat(have), flat(want), "{kind:?}: {n} differs");
    }
    // Beyond the reference: only the counters, which format 1 did not keep.
    for (n, t) in &got {
        if !reference.contains_key(n) {
            assert!(n.ends_with(".num_batches_tracked"), "{kind:?}: extra {n}");
            assert_eq!(t.dtype(), DType::I64);
            assert_eq!(t.to_scalar::<i64>().unwrap(), 2 * steps, "{n}");
        }
    }
}

#[test]
fn byol_after_the_seam_reproduces_the_weights_from_before_it() {
    for kind in [OptimizerKind::Lars, OptimizerKind::Adamw] {
        let mut t = Trainer::new(tiny(kind), 4).unwrap();
        assert_eq!(t.config().byol.tau_base, 0.9, "the deprecated key is read");
        let losses: Vec<f32> = (0..6)
            .map(|i| {
                let (a, b) = views(100 + i);
                step_loss(&mut t, &a, &b)
            })
            .collect();
        assert_matches_reference(&t, kind, &losses, 6);
    }
}

/// A copy of the format-1 fixture checkpoint in a temporary folder.
fn v1_checkpoint(kind: OptimizerKind, into: &Path) -> PathBuf {
    let from = fixtures().join(format!("{}-checkpoints/step-0000000003", name(kind)));
    let to = into.join("step-0000000003");
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(&from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

#[test]
fn a_format_1_checkpoint_resumes_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [OptimizerKind::Lars, OptimizerKind::Adamw] {
        let ck = v1_checkpoint(kind, &dir.path().join(name(kind)));
        let meta = checkpoint::read_meta(&ck).unwrap();
        assert_eq!((meta.format_version, meta.method.as_str()), (1, "byol"));
        let mut t = Trainer::new(tiny(kind), 4).unwrap();
        assert_eq!(t.load_checkpoint(&ck).unwrap().step, 3);
        let losses: Vec<f32> = (3..6)
            .map(|i| {
                let (a, b) = views(100 + i);
                step_loss(&mut t, &a, &b)
            })
            .collect();
        assert_matches_reference(&t, kind, &losses, 6);
        // Its next checkpoint is written in today's format, and loads as well.
        let next = checkpoint::save(
            &dir.path().join("next"),
            &t.state().unwrap(),
            None,
            Default::default(),
        )
        .unwrap();
        let meta = checkpoint::read_meta(&next).unwrap();
        assert_eq!(meta.format_version, checkpoint::CHECKPOINT_VERSION);
        let mut again = Trainer::new(tiny(kind), 4).unwrap();
        again.load_checkpoint(&next).unwrap();
        assert_matches_reference(&again, kind, &losses, 6);
        std::fs::remove_dir_all(dir.path().join("next")).unwrap();
    }
}

#[test]
fn a_checkpoint_of_another_method_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(tiny(OptimizerKind::Lars), 4).unwrap();
    let (a, b) = views(1);
    t.step_tensors(&a, &b).unwrap();
    let ck = checkpoint::save(dir.path(), &t.state().unwrap(), None, Default::default()).unwrap();
    let meta_file = ck.join("meta.json");
    let bytes = std::fs::read_to_string(&meta_file).unwrap();
    // A method this build knows nothing of (e.g. written by a later build).
    let edited = bytes.replace("\"method\": \"byol\"", "\"method\": \"swav\"");
    assert_ne!(edited, bytes);
    std::fs::write(&meta_file, &edited).unwrap();
    let mut fresh = Trainer::new(tiny(OptimizerKind::Lars), 4).unwrap();
    let before = state(&fresh);
    let files_before: Vec<Vec<u8>> = ["online.safetensors", "objective.safetensors", "meta.json"]
        .iter()
        .map(|f| std::fs::read(ck.join(f)).unwrap())
        .collect();
    let err = fresh.load_checkpoint(&ck).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("method swav"), "{message}");
    assert!(
        matches!(
            err,
            TrainError::Checkpoint {
                problem: CheckpointProblem::UnknownMethod(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(fresh.steps_done(), 0);
    let after = state(&fresh);
    for (n, t) in &before {
        let same = t
            .to_dtype(DType::F32)
            .unwrap()
            .eq(&after[n].to_dtype(DType::F32).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(same, 1.0, "{n} changed");
    }
    let files_after: Vec<Vec<u8>> = ["online.safetensors", "objective.safetensors", "meta.json"]
        .iter()
        .map(|f| std::fs::read(ck.join(f)).unwrap())
        .collect();
    assert!(files_before == files_after, "the checkpoint was rewritten");
}
