//! The BYOL step, optimizers, EMA, checkpoints and resume, on tiny models.

mod common;

use common::{step_loss, tiny_model, views};

use std::collections::HashMap;

use byol_trainer::config::{OptimizerKind, Schedule};
use byol_trainer::model::is_running_stat;
use byol_trainer::objective::Byol;
use byol_trainer::optim::Lars;
use byol_trainer::{
    CheckpointProblem, Objective, OptimConfig, TrainConfig, TrainError, Trainer, TrainerConfig,
    checkpoint,
};
use candle_core::{DType, Device, Tensor, Var};

fn tiny() -> TrainerConfig {
    TrainerConfig {
        model: tiny_model(),
        optim: OptimConfig {
            optimizer: OptimizerKind::Lars,
            base_lr: 0.5,
            weight_decay: 1e-4,
            warmup_steps: 2,
            schedule: Schedule::Cosine,
            ..OptimConfig::default()
        },
        train: TrainConfig {
            total_steps: 20,
            device: "cpu".into(),
            seed: 7,
            ..TrainConfig::default()
        },
        byol: byol_trainer::ByolConfig { tau_base: 0.9 },
        ..TrainerConfig::default()
    }
}

/// BYOL's heads of a trainer.
fn byol(t: &Trainer) -> &Byol {
    let Objective::Byol(b) = t.objective() else {
        unreachable!("a BYOL trainer")
    };
    b
}

fn snapshot(vars: Vec<(String, Var)>) -> HashMap<String, Vec<f32>> {
    vars.into_iter()
        .map(|(n, v)| {
            (
                n,
                v.as_tensor()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn gradients_reach_the_online_network_and_never_the_target() {
    let t = Trainer::new(tiny(), 6).unwrap();
    let (v1, v2) = views(6, 8, 1);
    let (_, grads) = t.loss_and_grads(&v1, &v2).unwrap();
    let trainable = t.trainable_named();
    assert!(trainable.iter().any(|(n, _)| n.starts_with("predictor.")));
    for (name, var) in trainable {
        let g = grads
            .get(&var)
            .unwrap_or_else(|| panic!("no gradient for online {name}"));
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "{name}"
        );
    }
    for (name, var) in byol(&t).target_named() {
        assert!(grads.get(&var).is_none(), "target {name} got a gradient");
    }
}

#[test]
fn ema_update_matches_the_formula_and_skips_running_stats() {
    let trainer = Trainer::new(tiny(), 6).unwrap();
    // Make online and target differ: perturb the weights.
    for (_, v) in trainer.trainable_named() {
        let t = (v.as_tensor() * 1.5).unwrap();
        v.set(&t.affine(1.0, 0.25).unwrap()).unwrap();
    }
    let online = snapshot(trainer.online_named());
    let target = snapshot(byol(&trainer).target_named());
    byol(&trainer)
        .update_target(trainer.online_vars(), 0.9)
        .unwrap();
    let after = snapshot(byol(&trainer).target_named());
    for (name, t) in &target {
        let o = &online[name];
        for i in 0..t.len() {
            let expected = if is_running_stat(name) {
                t[i]
            } else {
                0.9 * t[i] + 0.1 * o[i]
            };
            assert!((after[name][i] - expected).abs() < 1e-6, "{name}[{i}]");
        }
    }
}

#[test]
fn lars_step_matches_a_hand_computed_step() {
    let dev = Device::Cpu;
    let w = Var::from_vec(vec![1.0f32, 2.0, -2.0, 1.0], (2, 2), &dev).unwrap();
    let b = Var::from_vec(vec![0.5f32, -1.0], 2, &dev).unwrap();
    let gw = [0.3f32, -0.1, 0.2, 0.4];
    let gb = [1.0f32, 2.0];
    let cfg = OptimConfig {
        momentum: 0.9,
        weight_decay: 0.01,
        trust_coefficient: 1e-3,
        ..OptimConfig::default()
    };
    let mut lars = Lars::new(&cfg, vec![("w".into(), w.clone()), ("b".into(), b.clone())]).unwrap();
    let (mut wh, mut bh) = ([1.0f64, 2.0, -2.0, 1.0], [0.5f64, -1.0]);
    let (mut mw, mut mb) = ([0.0f64; 4], [0.0f64; 2]);
    let lr = 0.1;
    for _ in 0..2 {
        // loss = Σ w·gw + Σ b·gb has exactly these gradients.
        let loss = ((w.as_tensor()
            * Tensor::new(&[[gw[0], gw[1]], [gw[2], gw[3]]], &dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
            + (b.as_tensor() * Tensor::new(&gb, &dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
        lars.step(&loss.backward().unwrap(), lr).unwrap();
        // By hand: w is adapted and decayed, b (rank 1) is plain momentum SGD.
        let g: Vec<f64> = (0..4).map(|i| gw[i] as f64 + 0.01 * wh[i]).collect();
        let wn = wh.iter().map(|x| x * x).sum::<f64>().sqrt();
        let gn = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        let trust = 1e-3 * wn / gn;
        for i in 0..4 {
            mw[i] = 0.9 * mw[i] + g[i] * trust;
            wh[i] -= lr * mw[i];
        }
        for i in 0..2 {
            mb[i] = 0.9 * mb[i] + gb[i] as f64;
            bh[i] -= lr * mb[i];
        }
    }
    let got_w = w
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let got_b = b.as_tensor().to_vec1::<f32>().unwrap();
    for i in 0..4 {
        assert!(
            (got_w[i] as f64 - wh[i]).abs() < 1e-6,
            "w[{i}]: {} vs {}",
            got_w[i],
            wh[i]
        );
    }
    for i in 0..2 {
        assert!(
            (got_b[i] as f64 - bh[i]).abs() < 1e-6,
            "b[{i}]: {} vs {}",
            got_b[i],
            bh[i]
        );
    }
}

#[test]
fn resume_from_a_checkpoint_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [OptimizerKind::Lars, OptimizerKind::Adamw] {
        let mut cfg = tiny();
        cfg.optim.optimizer = kind;
        if kind == OptimizerKind::Adamw {
            cfg.optim.base_lr = 1e-3;
        }
        let batches: Vec<(Tensor, Tensor)> = (0..6).map(|i| views(4, 8, 100 + i)).collect();
        let mut straight = Trainer::new(cfg.clone(), 4).unwrap();
        for (a, b) in &batches {
            straight.step_tensors(a, b).unwrap();
        }
        let mut first = Trainer::new(cfg.clone(), 4).unwrap();
        for (a, b) in &batches[..3] {
            first.step_tensors(a, b).unwrap();
        }
        let ckdir = dir.path().join(format!("{kind:?}"));
        let path =
            checkpoint::save(&ckdir, &first.state().unwrap(), None, Default::default()).unwrap();
        drop(first);
        let mut resumed = Trainer::new(cfg.clone(), 4).unwrap();
        let meta = resumed.load_checkpoint(&path).unwrap();
        assert_eq!(meta.step, 3);
        for (a, b) in &batches[3..] {
            resumed.step_tensors(a, b).unwrap();
        }
        assert_eq!(
            snapshot(straight.online_named()),
            snapshot(resumed.online_named()),
            "{kind:?} online"
        );
        assert_eq!(
            snapshot(byol(&straight).target_named()),
            snapshot(byol(&resumed).target_named()),
            "{kind:?} target"
        );
    }
}

#[test]
fn a_killed_checkpoint_write_leaves_the_previous_one_loadable() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(tiny(), 4).unwrap();
    let (a, b) = views(4, 8, 3);
    t.step_tensors(&a, &b).unwrap();
    let good = checkpoint::save(dir.path(), &t.state().unwrap(), None, Default::default()).unwrap();
    // A write killed half-way: a temp folder with a partial file, never renamed.
    let partial = dir.path().join("step-0000000002.tmp");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("online.safetensors"), b"partial").unwrap();
    assert_eq!(checkpoint::latest(dir.path()), Some(good.clone()));
    let mut fresh = Trainer::new(tiny(), 4).unwrap();
    assert_eq!(fresh.load_checkpoint(&good).unwrap().step, 1);
    // Pruning removes the leftover and all but the newest checkpoints.
    let mut t = Trainer::new(tiny(), 4).unwrap();
    for _ in 0..3 {
        t.step_tensors(&a, &b).unwrap();
        checkpoint::save(dir.path(), &t.state().unwrap(), None, Default::default()).unwrap();
        checkpoint::prune(dir.path(), 2).unwrap();
    }
    assert!(!partial.exists());
    let steps: Vec<u64> = checkpoint::list(dir.path())
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(steps, vec![2, 3]);
}

#[test]
fn an_incompatible_checkpoint_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let t = Trainer::new(tiny(), 4).unwrap();
    let path = checkpoint::save(dir.path(), &t.state().unwrap(), None, Default::default()).unwrap();
    let mut other = tiny();
    other.model.width = 8;
    let mut wider = Trainer::new(other, 4).unwrap();
    let before = snapshot(wider.online_named());
    match wider.load_checkpoint(&path) {
        Err(e @ TrainError::Checkpoint { .. }) => {
            assert!(e.to_string().contains("model"), "{e}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|m| m.step)),
    }
    assert_eq!(before, snapshot(wider.online_named()), "nothing changed");
    let mut other_batch = Trainer::new(tiny(), 8).unwrap();
    assert!(
        matches!(other_batch.load_checkpoint(&path), Err(TrainError::Checkpoint { problem: CheckpointProblem::Mismatch { what, .. }, .. }) if what == "batch size")
    );
    std::fs::write(path.join("meta.json"), b"{ not json").unwrap();
    assert!(matches!(
        Trainer::new(tiny(), 4).unwrap().load_checkpoint(&path),
        Err(TrainError::Checkpoint {
            problem: CheckpointProblem::Unreadable(_),
            ..
        })
    ));
}

#[test]
fn impossible_settings_name_their_key() {
    let mut c = tiny();
    c.optim.base_lr = -1.0;
    assert!(matches!(
        Trainer::new(c, 4),
        Err(TrainError::Config {
            key: "optim.base_lr",
            ..
        })
    ));
    let mut c = tiny();
    c.train.device = "tpu".into();
    assert!(matches!(
        Trainer::new(c, 4),
        Err(TrainError::Config {
            key: "train.device",
            ..
        })
    ));
    assert!(matches!(
        Trainer::new(tiny(), 1),
        Err(TrainError::Config { .. })
    ));
}

#[test]
fn encoder_names_and_shapes_are_torchvision_s() {
    let Some(lists) = common::torchvision_lists() else {
        return;
    };
    for list in lists {
        // BatchNorm's num_batches_tracked included: a running statistic of each layer.
        let mut expected: Vec<(String, Vec<usize>)> = list.params;
        let cfg = TrainerConfig {
            model: list.model.clone(),
            train: TrainConfig {
                device: "cpu".into(),
                ..TrainConfig::default()
            },
            ..TrainerConfig::default()
        };
        let trainer = Trainer::new(cfg, 2).unwrap();
        let mut got: Vec<(String, Vec<usize>)> = trainer
            .online_named()
            .into_iter()
            .filter_map(|(n, v)| Some((n.strip_prefix("encoder.")?.to_string(), v.dims().to_vec())))
            .collect();
        got.sort();
        expected.sort();
        assert_eq!(got, expected, "{}", list.file);
    }
}

#[test]
fn a_tiny_model_lowers_its_loss_without_collapsing() {
    let mut cfg = tiny();
    cfg.optim.optimizer = OptimizerKind::Adamw;
    cfg.optim.base_lr = 2e-3;
    cfg.optim.weight_decay = 0.0;
    cfg.optim.warmup_steps = 0;
    cfg.optim.schedule = Schedule::Constant;
    cfg.byol.tau_base = 0.99;
    let mut t = Trainer::new(cfg, 16).unwrap();
    // Two fixed batches of views: the online network learns to predict the target.
    let data: Vec<(Tensor, Tensor)> = (0..2).map(|i| views(16, 8, 50 + i)).collect();
    let mut losses = Vec::new();
    let mut last = None;
    for step in 0..40 {
        let (a, b) = &data[step % 2];
        let s = t.step_tensors(a, b).unwrap();
        losses.push(t.read_health().unwrap().loss);
        last = Some(s);
    }
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let end: f32 = losses[35..].iter().sum::<f32>() / 5.0;
    assert!(end < first * 0.8, "loss {first} -> {end}");
    assert!(last.unwrap().objective.tau == Some(0.99));
    let health = t.embedding_stats().unwrap().unwrap();
    assert!(
        health.collapse > 0.1,
        "collapse indicator {}",
        health.collapse
    );
    assert!(
        health.effective_rank > 2.0,
        "effective rank {}",
        health.effective_rank
    );
    assert!(losses.iter().all(|l| l.is_finite()));
}

#[test]
fn bf16_steps_track_fp32_and_keep_master_weights_in_f32() {
    let (v1, v2) = views(8, 16, 3);
    let run = |precision| {
        let mut cfg = tiny();
        cfg.train.precision = precision;
        let mut t = Trainer::new(cfg, 8).unwrap();
        let losses: Vec<f32> = (0..6).map(|_| step_loss(&mut t, &v1, &v2)).collect();
        (t, losses)
    };
    let (fp32, l32) = run(byol_trainer::Precision::Fp32);
    let (bf16, l16) = run(byol_trainer::Precision::Bf16);
    // The first loss (same weights, same batch) agrees to bf16's precision.
    assert!(
        (l16[0] - l32[0]).abs() / l32[0] < 1e-2,
        "{l16:?} vs {l32:?}"
    );
    // Training works: the loss goes down as in f32.
    assert!(l16.iter().all(|l| l.is_finite()), "{l16:?}");
    assert!(l16[5] < l16[0] && l32[5] < l32[0], "{l16:?} / {l32:?}");
    // Master weights (and so checkpoints) stay f32, and differ from the f32 run's.
    for ((name, a), (_, b)) in fp32.trainable_named().iter().zip(bf16.trainable_named()) {
        assert_eq!(b.dtype(), candle_core::DType::F32, "{name}");
        assert_eq!(a.dims(), b.dims(), "{name}");
    }
}

#[test]
fn a_damaged_checkpoint_fails_its_checksum_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(tiny(), 4).unwrap();
    let (a, b) = views(4, 8, 3);
    t.step_tensors(&a, &b).unwrap();
    let input = byol_trainer::input::InputSpec {
        mean: [0.25, 0.5, 0.75],
        ..byol_trainer::input::InputSpec::imagenet(8)
    };
    let path = checkpoint::save(
        dir.path(),
        &t.state().unwrap(),
        Some(&input),
        Default::default(),
    )
    .unwrap();
    let meta = checkpoint::verify(&path).unwrap();
    assert_eq!(meta.step, 1);
    // The preprocessing is recorded, with the size also where older readers look.
    assert_eq!(meta.input.as_ref(), Some(&input));
    assert_eq!(meta.view_size, Some(8));
    assert_eq!(meta.input_or_imagenet(32), (input, true));
    // One flipped byte in the middle of the objective state (the target network).
    let file = path.join("objective.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&file, &bytes).unwrap();
    match checkpoint::verify(&path) {
        Err(e @ TrainError::Checkpoint { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains("objective.safetensors") && m.contains("checksum"),
                "{m}"
            );
            assert_eq!(e.kind(), byol_ingest::fsutil::FailureKind::Damaged);
        }
        other => panic!("expected a checksum error, got {:?}", other.map(|m| m.step)),
    }
    let mut fresh = Trainer::new(tiny(), 4).unwrap();
    let before = snapshot(fresh.online_named());
    assert!(fresh.load_checkpoint(&path).is_err());
    assert_eq!(fresh.steps_done(), 0);
    assert_eq!(before, snapshot(fresh.online_named()));
}

#[test]
fn each_heads_normalisation_has_its_layers_its_batch_coupling_and_trains() {
    use byol_trainer::HeadNorm;
    let (v1, v2) = views(8, 8, 21);
    for (norm, middle) in [
        (
            HeadNorm::Batch,
            &[
                "bias",
                "num_batches_tracked",
                "running_mean",
                "running_var",
                "weight",
            ][..],
        ),
        (HeadNorm::GroupWs, &["bias", "weight"][..]),
        (HeadNorm::None, &[][..]),
    ] {
        let mut cfg = tiny();
        cfg.model.head_norm = norm;
        let mut t = Trainer::new(cfg, 8).unwrap();
        for head in ["projector", "predictor"] {
            let prefix = format!("{head}.1.");
            let names: Vec<String> = t
                .online_named()
                .into_iter()
                .filter_map(|(n, _)| n.strip_prefix(&prefix).map(str::to_owned))
                .collect();
            assert_eq!(names, middle, "{norm:?} {head}");
        }
        // Batch statistics couple the samples of a batch; GroupNorm and no
        // normalisation leave each sample's projection its own.
        let h = Tensor::randn(0f32, 1.0, (6, 32), &Device::Cpu).unwrap();
        let projector = &t.network().projector;
        let whole = projector.forward_t(&h, true).unwrap().get(0).unwrap();
        let alone = projector
            .forward_t(&h.narrow(0, 0, 2).unwrap(), true)
            .unwrap()
            .get(0)
            .unwrap();
        let gap = (whole - alone)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if norm == HeadNorm::Batch {
            assert!(gap > 1e-3, "{norm:?}: {gap}");
        } else {
            assert!(gap < 1e-5, "{norm:?}: {gap}");
        }
        let losses: Vec<f32> = (0..8).map(|_| step_loss(&mut t, &v1, &v2)).collect();
        assert!(losses.iter().all(|l| l.is_finite()), "{norm:?} {losses:?}");
        assert!(losses[7] < losses[0], "{norm:?} {losses:?}");
    }
}

#[test]
fn group_ws_needs_hidden_sizes_divisible_by_its_groups() {
    let mut cfg = tiny();
    cfg.model.head_norm = byol_trainer::HeadNorm::GroupWs;
    cfg.model.predictor_hidden = 40;
    match Trainer::new(cfg, 4) {
        Err(TrainError::Config { key, reason }) => {
            assert_eq!(key, "model.head_norm");
            assert!(reason.contains("40"), "{reason}");
        }
        other => panic!("expected a config error, got {:?}", other.err()),
    }
}

#[test]
fn the_deprecated_tau_key_is_read_and_a_contradiction_named() {
    let mut cfg = tiny();
    cfg.byol = byol_trainer::ByolConfig::default();
    cfg.optim.tau_base = Some(0.97);
    let t = Trainer::new(cfg.clone(), 4).unwrap();
    assert_eq!(t.config().byol.tau_base, 0.97);
    assert_eq!(t.config().optim.tau_base, None);
    cfg.byol.tau_base = 0.95;
    match Trainer::new(cfg, 4) {
        Err(TrainError::Config { key, reason }) => {
            assert_eq!(key, "optim.tau_base");
            assert!(reason.contains("byol.tau_base"), "{reason}");
        }
        other => panic!("expected a config error, got {:?}", other.err()),
    }
}

/// A restore refused in any part changes nothing: not the online variables (restored
/// first when nothing is refused), not the objective's state, not the step. Each part
/// is refused in turn by a state whose settings fit but whose tensors do not; through
/// a checkpoint, the error names the refused part's file.
#[test]
fn a_refused_restore_changes_nothing_whichever_part_refuses() {
    use byol_trainer::state::StatePart;
    let mut trained = Trainer::new(tiny(), 4).unwrap();
    let (a, b) = views(4, 16, 1);
    trained.step_tensors(&a, &b).unwrap();
    let good = trained.state().unwrap();
    type Spoil = fn(&mut byol_trainer::TrainerState);
    let cases: [(StatePart, Spoil); 4] = [
        (StatePart::Online, |s| {
            let last = s.online.iter().last().map(|(n, _)| n.to_owned()).unwrap();
            s.online.retain(|n| n != last)
        }),
        (StatePart::Objective, |s| {
            let t = s.objective.get("target.encoder.conv1.weight").unwrap();
            let wrong = t.flatten_all().unwrap();
            s.objective.insert("target.encoder.conv1.weight", wrong);
        }),
        (StatePart::Optimizer, |s| {
            s.optimizer
                .retain(|n| !n.ends_with(".momentum") || !n.starts_with("predictor."))
        }),
        (StatePart::Origin, |s| s.origin.batch_size = 8),
    ];
    for (part, spoil) in cases {
        let mut fresh = Trainer::new(tiny(), 4).unwrap();
        let online = snapshot(fresh.online_named());
        let target = snapshot(byol(&fresh).target_named());
        let mut state = good.clone();
        spoil(&mut state);
        let e = fresh.restore(state).unwrap_err();
        assert_eq!(e.part, part, "{e}");
        assert_eq!(online, snapshot(fresh.online_named()), "{part:?}: online");
        assert_eq!(
            target,
            snapshot(byol(&fresh).target_named()),
            "{part:?}: target"
        );
        assert_eq!(fresh.steps_done(), 0, "{part:?}: step");
    }
    // The good state restores whole.
    let mut fresh = Trainer::new(tiny(), 4).unwrap();
    fresh.restore(good).unwrap();
    assert_eq!(fresh.steps_done(), 1);
    assert_eq!(
        snapshot(fresh.online_named()),
        snapshot(trained.online_named())
    );
}
