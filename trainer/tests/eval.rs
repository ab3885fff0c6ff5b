//! Evaluation: the linear probe and kNN on generated data with known answers, the
//! frozen encoder of a checkpoint, and the torchvision export.

mod common;

use byol_trainer::config::{Kernels, ModelConfig, OptimizerKind, Schedule};
use byol_trainer::eval::{
    Encoder, Features, KnnConfig, LogisticRegression, ProbeConfig, export_encoder, knn_accuracy,
    knn_predict, linear_probe, resolve_checkpoint,
};
use byol_trainer::{Objective, OptimConfig, TrainConfig, Trainer, TrainerConfig, checkpoint};
use candle_core::{Device, Tensor};
use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

fn normal(rng: &mut Xoshiro256PlusPlus) -> f32 {
    let u1 = 1.0 - (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// `n` points per centre, Gaussian noise of `sigma`, labelled by `label(centre)`.
fn blobs(
    centres: &[Vec<f32>],
    label: impl Fn(usize) -> u32,
    classes: usize,
    n: usize,
    sigma: f32,
    seed: u64,
) -> Features {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let dim = centres[0].len();
    let (mut values, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        for (c, centre) in centres.iter().enumerate() {
            let _ = i;
            values.extend(centre.iter().map(|m| m + sigma * normal(&mut rng)));
            labels.push(label(c));
        }
    }
    Features {
        source: "generated".into(),
        dim,
        values,
        labels,
        classes: (0..classes).map(|c| c.to_string()).collect(),
        unlabelled: 0,
        skipped: 0,
    }
}

fn one_hot_centres(classes: usize, dim: usize, scale: f32) -> Vec<Vec<f32>> {
    (0..classes)
        .map(|c| (0..dim).map(|d| if d == c { scale } else { 0.0 }).collect())
        .collect()
}

#[test]
fn linear_probe_separates_separable_blobs() {
    let centres = one_hot_centres(3, 8, 4.0);
    let train = blobs(&centres, |c| c as u32, 3, 60, 0.5, 1);
    let test = blobs(&centres, |c| c as u32, 3, 40, 0.5, 2);
    let r = linear_probe(&train, &test, &ProbeConfig::default()).unwrap();
    assert_eq!(r.accuracy, 1.0, "{r:?}");
    assert_eq!(r.train_accuracy, 1.0, "{r:?}");
    assert_eq!(r.search.len(), 5);
}

#[test]
fn linear_probe_is_at_chance_when_labels_ignore_the_features() {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
    let mut random = |n: usize| {
        let mut f = blobs(&[vec![0.0; 10]], |_| 0, 4, n, 1.0, rng.next_u64());
        f.labels = (0..n).map(|_| (rng.next_u64() % 4) as u32).collect();
        f
    };
    let (train, test) = (random(400), random(1000));
    let r = linear_probe(&train, &test, &ProbeConfig::default()).unwrap();
    // Chance is 0.25; 1000 test images put 3 standard deviations at ±0.041.
    assert!((0.2..0.3).contains(&r.accuracy), "{r:?}");
}

#[test]
fn xor_defeats_the_linear_probe_but_not_knn() {
    // Four clusters on the diagonals, opposite ones share a class: no line separates
    // the classes (the best line gets 3 of 4 clusters), cosine kNN gets all.
    let centres = vec![
        vec![1.0, 1.0],
        vec![-1.0, -1.0],
        vec![1.0, -1.0],
        vec![-1.0, 1.0],
    ];
    let label = |c: usize| (c / 2) as u32;
    let train = blobs(&centres, label, 2, 100, 0.15, 3);
    let test = blobs(&centres, label, 2, 50, 0.15, 4);
    let linear = linear_probe(&train, &test, &ProbeConfig::default()).unwrap();
    assert!(linear.accuracy <= 0.76, "{linear:?}");
    let knn = knn_accuracy(&train, &test, KnnConfig::default()).unwrap();
    assert!(knn > 0.98, "kNN {knn}");
}

#[test]
fn logistic_regression_reaches_the_known_optimum() {
    // x = +1 (class 1) and x = -1 (class 0): by symmetry the bias is 0 and the weights
    // are (-a, a) with 1 / (1 + e^(2a)) = l2 * a, the zero of the gradient.
    let l2 = 0.1;
    let x = [1.0f32, -1.0, 1.0, -1.0];
    let labels = [1u32, 0, 1, 0];
    let model = LogisticRegression::fit(&x, &labels, 1, 2, l2, 2000).unwrap();
    // Bisection for a.
    let (mut lo, mut hi) = (0.0f64, 10.0f64);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if 1.0 / (1.0 + (2.0 * mid).exp()) > l2 * mid {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let w = model.weights().unwrap();
    assert!((f64::from(w[1]) - lo).abs() < 1e-3, "{w:?} vs a = {lo}");
    assert!((f64::from(w[0]) + lo).abs() < 1e-3, "{w:?}");
    assert!(w[2].abs() < 1e-4 && w[3].abs() < 1e-4, "bias {w:?}");
    assert_eq!(model.predict(&[0.5, -2.0]).unwrap(), [1, 0]);
}

#[test]
fn knn_votes_are_weighted_by_exp_similarity_over_temperature() {
    // Query (1, 0): similarities 1 (class 0), 0.8 and 0.8 (class 1), -1 (class 0).
    // Training vectors need not be unit length: similarity is cosine.
    let train = [5.0f32, 0.0, 0.8, 0.6, 1.6, -1.2, -1.0, 0.0];
    let labels = [0u32, 1, 1, 0];
    let q = [1.0f32, 0.0];
    let predict = |k: usize, temperature: f32| {
        knn_predict(&train, &labels, &q, 2, 2, KnnConfig { k, temperature }).unwrap()[0]
    };
    // k = 3, T = 0.1: e^10 = 22026 against 2 e^8 = 5962.
    assert_eq!(predict(3, 0.1), 0);
    // T = 1: e = 2.72 against 2 e^0.8 = 4.45: the two neighbours outvote the closest.
    assert_eq!(predict(3, 1.0), 1);
    assert_eq!(predict(1, 1.0), 0);
    // k above the training size means all: e + e^-1 = 3.09 against 4.45.
    assert_eq!(predict(200, 1.0), 1);
    assert!(
        knn_predict(
            &train,
            &labels,
            &q,
            2,
            2,
            KnnConfig {
                k: 0,
                temperature: 0.1
            }
        )
        .is_err()
    );
    assert!(knn_predict(&train, &[0, 5, 1, 0], &q, 2, 2, KnnConfig::default()).is_err());
}

#[test]
fn probes_reject_mismatched_features() {
    let centres = one_hot_centres(2, 4, 1.0);
    let train = blobs(&centres, |c| c as u32, 2, 5, 0.1, 1);
    let mut test = blobs(&one_hot_centres(2, 3, 1.0), |c| c as u32, 2, 5, 0.1, 2);
    assert!(linear_probe(&train, &test, &ProbeConfig::default()).is_err());
    assert!(knn_accuracy(&train, &test, KnnConfig::default()).is_err());
    test = blobs(&centres, |c| c as u32, 2, 5, 0.1, 2);
    let bad = ProbeConfig {
        holdout: 1.0,
        ..ProbeConfig::default()
    };
    assert!(linear_probe(&train, &test, &bad).is_err());
}

fn tiny() -> TrainerConfig {
    TrainerConfig {
        model: ModelConfig {
            projector_hidden: 16,
            projection_dim: 8,
            predictor_hidden: 16,
            ..ModelConfig::small(4)
        },
        optim: OptimConfig {
            optimizer: OptimizerKind::Adamw,
            base_lr: 1e-2,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            ..OptimConfig::default()
        },
        train: TrainConfig {
            total_steps: 10,
            device: "cpu".into(),
            seed: 3,
            ..TrainConfig::default()
        },
        ..TrainerConfig::default()
    }
}

fn images(n: usize, s: usize, seed: u64) -> Tensor {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * 3 * s * s).map(|_| normal(&mut rng)).collect();
    Tensor::from_vec(v, (n, 3, s, s), &Device::Cpu).unwrap()
}

#[test]
fn the_encoder_of_a_checkpoint_is_the_trained_online_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(tiny(), 4).unwrap();
    let (a, b) = (images(4, 8, 1), images(4, 8, 2));
    t.step_tensors(&a, &b).unwrap();
    let run = dir.path().join("run");
    let ck = checkpoint::save(
        &run.join("checkpoints"),
        &t.state().unwrap(),
        None,
        Default::default(),
    )
    .unwrap();
    // A checkpoint folder, a run folder and a checkpoints folder all name it.
    assert_eq!(resolve_checkpoint(&ck).unwrap(), ck);
    assert_eq!(resolve_checkpoint(&run).unwrap(), ck);
    assert_eq!(resolve_checkpoint(&run.join("checkpoints")).unwrap(), ck);
    let err = resolve_checkpoint(dir.path()).unwrap_err().to_string();
    assert!(err.contains("neither a checkpoint"), "{err}");
    assert!(resolve_checkpoint(&dir.path().join("missing")).is_err());

    let (enc, meta) = Encoder::from_checkpoint(&ck, Kernels::Auto, &Device::Cpu).unwrap();
    assert_eq!(meta.step, 1);
    // Each BatchNorm counted its own training-mode forwards: one per view.
    let counts: Vec<(String, Tensor)> = enc
        .named_tensors()
        .into_iter()
        .filter(|(n, _)| n.ends_with("num_batches_tracked"))
        .collect();
    assert!(!counts.is_empty());
    for (name, c) in counts {
        assert_eq!(c.to_scalar::<i64>().unwrap(), 2, "{name}");
    }
    let x = images(3, 8, 9);
    let expected = t.network().encoder.forward_t(&x, false).unwrap();
    let got = enc.forward(&x).unwrap();
    assert_eq!(got.dims(), [3, 32]);
    let diff = (got - expected).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    // Never the target: after a step with τ < 1 the target differs.
    let Objective::Byol(byol) = t.objective() else {
        unreachable!("a BYOL trainer")
    };
    let target = byol.target().encoder.forward_t(&x, false).unwrap();
    let far = (enc.forward(&x).unwrap() - target).unwrap().abs().unwrap();
    assert!(far.max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    // A random encoder of the same config and seed is the run's starting point.
    let random = Encoder::random(&meta.config.model, 3, Kernels::Auto, &Device::Cpu).unwrap();
    let fresh = Trainer::new(tiny(), 4).unwrap();
    let start = fresh.network().encoder.forward_t(&x, false).unwrap();
    let same = (random.forward(&x).unwrap() - start)
        .unwrap()
        .abs()
        .unwrap();
    assert_eq!(same.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn export_has_torchvision_names_and_shapes() {
    let Some(lists) = common::torchvision_lists() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for list in lists {
        let file = list.file;
        // name, shape, dtype; torchvision's fc is not part of an encoder export.
        let mut expected: Vec<(String, Vec<usize>, safetensors::Dtype)> = list
            .params
            .into_iter()
            .map(|(name, shape)| {
                let dtype = if name.ends_with("num_batches_tracked") {
                    safetensors::Dtype::I64
                } else {
                    safetensors::Dtype::F32
                };
                (name, shape, dtype)
            })
            .collect();
        let enc = Encoder::random(&list.model, 0, Kernels::Auto, &Device::Cpu).unwrap();
        let out = dir.path().join(format!("{file}.safetensors"));
        let count = export_encoder(&enc, None, &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut got: Vec<(String, Vec<usize>, safetensors::Dtype)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec(), v.dtype()))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(count, expected.len(), "{file}");
        assert_eq!(got, expected, "{file}");
    }
}
