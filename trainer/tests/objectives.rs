//! The objectives beside BYOL on tiny models: their relations to BYOL's loss, exact
//! resume with their state (an EMA network, a bank, a queue), and bad settings.

mod common;

use common::{step_loss, tiny_model, views};

use byol_trainer::config::{OptimizerKind, Schedule};
use byol_trainer::loss::regression_loss;
use byol_trainer::{
    Method, Objective, OptimConfig, TrainConfig, TrainError, Trainer, TrainerConfig, checkpoint,
};
use candle_core::{DType, Tensor, Var};

/// A width-4 ResNet-18 on 8-px views, AdamW, with small memories (a bank of 12 and a
/// queue of 10, so batches of 4 wrap around them).
fn tiny(method: Method) -> TrainerConfig {
    let mut cfg = TrainerConfig {
        model: tiny_model(),
        optim: OptimConfig {
            optimizer: OptimizerKind::Adamw,
            base_lr: 1e-3,
            warmup_steps: 2,
            schedule: Schedule::Cosine,
            ..OptimConfig::default()
        },
        train: TrainConfig {
            method,
            total_steps: 20,
            device: "cpu".into(),
            seed: 7,
            ..TrainConfig::default()
        },
        ..TrainerConfig::default()
    };
    cfg.msf.bank_size = 12;
    cfg.msf.k = 3;
    cfg.mocov2.queue_size = 10;
    cfg.simclr.temperature = 0.5;
    cfg
}

/// Every value of every tensor, as bits.
fn bits(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<(String, Vec<u32>)> = tensors
        .into_iter()
        .map(|(n, t)| {
            let t = t.flatten_all().unwrap();
            let values = match t.dtype() {
                DType::I64 => t
                    .to_vec1::<i64>()
                    .unwrap()
                    .iter()
                    .map(|&x| x as u32)
                    .collect(),
                _ => t
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            };
            (n, values)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn vars(vars: Vec<(String, Var)>) -> Vec<(String, Tensor)> {
    vars.into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect()
}

/// Relative L2 distance of two tensors of the same shape.
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let norm = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    (diff / norm.max(1e-30)).sqrt()
}

#[test]
fn every_method_trains_and_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let batches: Vec<(Tensor, Tensor)> = (0..6).map(|i| views(4, 8, 200 + i)).collect();
    for method in Method::ALL {
        let cfg = tiny(method);
        let mut straight = Trainer::new(cfg.clone(), 4).unwrap();
        let mut losses = Vec::new();
        for (a, b) in &batches {
            let loss = step_loss(&mut straight, a, b);
            assert!(loss.is_finite(), "{method}: loss {loss}");
            losses.push(loss);
        }
        let mut first = Trainer::new(cfg.clone(), 4).unwrap();
        for (a, b) in &batches[..3] {
            first.step_tensors(a, b).unwrap();
        }
        let path = checkpoint::save(
            &dir.path().join(method.as_str()),
            &first.state().unwrap(),
            None,
            Default::default(),
        )
        .unwrap();
        drop(first);
        let mut resumed = Trainer::new(cfg, 4).unwrap();
        resumed.load_checkpoint(&path).unwrap();
        for ((a, b), want) in batches[3..].iter().zip(&losses[3..]) {
            let got = step_loss(&mut resumed, a, b);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{method}: loss {got} vs {want}"
            );
        }
        assert!(
            bits(vars(straight.online_named())) == bits(vars(resumed.online_named())),
            "{method}: online variables"
        );
        let state = straight.objective().state().unwrap();
        assert!(
            bits(state.clone()) == bits(resumed.objective().state().unwrap()),
            "{method}: objective state"
        );
        let names: Vec<&str> = state.iter().map(|(n, _)| n).collect();
        match method {
            Method::Msf => assert!(
                names.contains(&"bank.entries") && names.contains(&"target.encoder.conv1.weight")
            ),
            Method::Mocov2 => assert!(
                names.contains(&"queue.pointer") && names.contains(&"key.encoder.conv1.weight")
            ),
            Method::Byol => assert!(names.iter().all(|n| n.starts_with("target."))),
            _ => assert!(names.is_empty(), "{method}: {names:?}"),
        }
        if let Some(memory) = straight.objective().memory() {
            // Six batches of 4 have filled a memory of 10 or 12 entries and wrapped.
            assert_eq!(memory.filled(), memory.capacity(), "{method}");
        }
    }
}

#[test]
fn every_method_trains_in_bf16() {
    let (a, b) = views(4, 8, 300);
    for method in Method::ALL {
        let mut cfg = tiny(method);
        cfg.train.precision = byol_trainer::Precision::Bf16;
        let mut t = Trainer::new(cfg, 4).unwrap();
        for _ in 0..3 {
            let loss = step_loss(&mut t, &a, &b);
            assert!(loss.is_finite(), "{method} in bf16: loss {loss}");
        }
    }
}

#[test]
fn msf_with_k_one_is_byols_one_direction_loss_and_gradients() {
    let byol_cfg = tiny(Method::Byol);
    let mut msf_cfg = tiny(Method::Msf);
    msf_cfg.msf.k = 1;
    let byol = Trainer::new(byol_cfg, 4).unwrap();
    let msf = Trainer::new(msf_cfg, 4).unwrap();
    let (v1, v2) = views(4, 8, 11);
    let Objective::Byol(heads) = byol.objective() else {
        unreachable!("a BYOL trainer")
    };
    let p1 = heads
        .predictor()
        .forward_t(&byol.network().forward_t(&v1, true).unwrap(), true)
        .unwrap();
    let t2 = heads.target().forward_t(&v2, true).unwrap().detach();
    let want = regression_loss(&p1, &t2).unwrap();
    let want_grads = want.backward().unwrap();
    let (got, got_grads) = msf.loss_and_grads(&v1, &v2).unwrap();
    let (g, w) = (
        got.to_scalar::<f32>().unwrap(),
        want.to_scalar::<f32>().unwrap(),
    );
    assert!((g - w).abs() <= 1e-6 * w.abs(), "loss {g} vs {w}");
    let online = msf.trainable_named();
    assert_eq!(
        online.len(),
        byol.trainable_named().len(),
        "the same online variables"
    );
    for ((name, a), (_, b)) in online.iter().zip(byol.trainable_named()) {
        let ga = got_grads
            .get(a)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let gb = want_grads.get(&b).unwrap();
        let r = relative(ga, gb);
        assert!(r <= 1e-6, "{name}: gradient differs by {r:e} (relative L2)");
    }
}

#[test]
fn simsiam_is_byol_rescaled_when_the_target_is_the_online_network() {
    // BYOL's target is a copy of the online network before the first step (τ plays no
    // part yet); the same predictor (SimSiam's bottleneck 16 / 4 = BYOL's hidden 4) and
    // no output BatchNorm make the projections the same.
    let mut byol_cfg = tiny(Method::Byol);
    byol_cfg.model.predictor_hidden = 4;
    let mut simsiam_cfg = byol_cfg.clone();
    simsiam_cfg.train.method = Method::Simsiam;
    simsiam_cfg.simsiam.bottleneck = 4;
    simsiam_cfg.simsiam.output_bn = false;
    let byol = Trainer::new(byol_cfg, 4).unwrap();
    let simsiam = Trainer::new(simsiam_cfg, 4).unwrap();
    let (v1, v2) = views(4, 8, 12);
    let (b, b_grads) = byol.loss_and_grads(&v1, &v2).unwrap();
    let (s, s_grads) = simsiam.loss_and_grads(&v1, &v2).unwrap();
    let (b, s) = (b.to_scalar::<f32>().unwrap(), s.to_scalar::<f32>().unwrap());
    let want = (b - 4.0) / 4.0;
    assert!(
        (s - want).abs() <= 1e-6 * want.abs(),
        "SimSiam {s} vs (BYOL − 4)/4 = {want}"
    );
    for ((name, a), (_, c)) in simsiam.trainable_named().iter().zip(byol.trainable_named()) {
        let quarter = (b_grads.get(&c).unwrap() / 4.0).unwrap();
        let r = relative(s_grads.get(a).unwrap(), &quarter);
        assert!(
            r <= 1e-5,
            "{name}: gradient differs from BYOL's / 4 by {r:e}"
        );
    }
}

/// The key of a config error.
fn config_key(e: TrainError) -> &'static str {
    match e {
        TrainError::Config { key, .. } => key,
        other => panic!("not a config error: {other}"),
    }
}

#[test]
fn bad_objective_settings_name_their_key() {
    let refuse = |f: &dyn Fn(&mut TrainerConfig), batch: usize| {
        let mut cfg = tiny(Method::Byol);
        f(&mut cfg);
        config_key(Trainer::new(cfg, batch).err().expect("refused"))
    };
    assert_eq!(
        refuse(&|c| c.msf.k = 13, 4),
        "msf.k",
        "k larger than the bank"
    );
    assert_eq!(refuse(&|c| c.msf.k = 0, 4), "msf.k");
    assert_eq!(
        refuse(&|c| c.simclr.temperature = 0.0, 4),
        "simclr.temperature"
    );
    assert_eq!(
        refuse(&|c| c.mocov2.temperature = -0.1, 4),
        "mocov2.temperature"
    );
    assert_eq!(refuse(&|c| c.mocov2.tau = 1.5, 4), "mocov2.tau");
    assert_eq!(
        refuse(&|c| c.barlow_twins.lambda = f64::NAN, 4),
        "barlow_twins.lambda"
    );
    assert_eq!(
        refuse(&|c| c.simsiam.bottleneck = 0, 4),
        "simsiam.bottleneck"
    );
    let msf = |c: &mut TrainerConfig| c.train.method = Method::Msf;
    assert_eq!(
        refuse(&msf, 16),
        "msf.bank_size",
        "a bank smaller than a batch"
    );
    let moco = |c: &mut TrainerConfig| c.train.method = Method::Mocov2;
    assert_eq!(refuse(&moco, 16), "mocov2.queue_size");
    let e = "swav".parse::<Method>().unwrap_err();
    assert!(e.contains("swav") && e.contains("barlow_twins"), "{e}");
    let e = toml::from_str::<TrainerConfig>("[train]\nmethod = \"swav\"").unwrap_err();
    assert!(e.to_string().contains("swav"), "{e}");
}

#[test]
fn a_memory_must_fit_the_dataset() {
    let mut cfg = tiny(Method::Msf);
    cfg.msf.bank_size = 1000;
    cfg.msf.k = 5;
    assert_eq!(cfg.check_memory_fits(5000).unwrap(), None);
    let warning = cfg.check_memory_fits(1100).unwrap().expect("within 10%");
    assert!(warning.contains("msf.bank_size"), "{warning}");
    assert_eq!(
        config_key(cfg.check_memory_fits(999).unwrap_err()),
        "msf.bank_size"
    );
    cfg.train.method = Method::Simclr;
    assert_eq!(
        cfg.check_memory_fits(1).unwrap(),
        None,
        "SimCLR has no memory"
    );
}

#[test]
fn a_resume_with_another_memory_size_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = views(4, 8, 5);
    let mut t = Trainer::new(tiny(Method::Mocov2), 4).unwrap();
    t.step_tensors(&a, &b).unwrap();
    let path = checkpoint::save(dir.path(), &t.state().unwrap(), None, Default::default()).unwrap();
    let mut cfg = tiny(Method::Mocov2);
    cfg.mocov2.queue_size = 16;
    let mut other = Trainer::new(cfg, 4).unwrap();
    let before = bits(vars(other.online_named()));
    let e = other.load_checkpoint(&path).unwrap_err();
    assert!(e.to_string().contains("mocov2.queue_size"), "{e}");
    assert!(
        !matches!(&e, TrainError::Checkpoint { problem, .. } if problem.is_damage()),
        "not damage: {e}"
    );
    assert!(
        before == bits(vars(other.online_named())),
        "nothing changed"
    );
    assert_eq!(other.steps_done(), 0);
}
