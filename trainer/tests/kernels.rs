//! Our fused CPU kernels against candle's reference ops: values, gradients (candle's
//! backward of its own ops) and BatchNorm running statistics, on random shapes; and the
//! per-op check (`bench::op_check`) that holds a GPU's ops to ours, run here on candle's
//! CPU ops.

mod common;

use common::tiny_model;

use byol_trainer::config::{Kernels, ModelConfig};
use byol_trainer::kernels;
use byol_trainer::model::{Compute, Norm};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand_core::{RngCore, SeedableRng};

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Largest |a − b| relative to the largest |b| (plus a small floor).
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
    let e = rel_err(ours, reference);
    assert!(e < tol, "{what}: relative error {e} (tolerance {tol})");
}

#[test]
fn convolution_matches_candle_values_and_gradients() {
    // (n, c, h, w, co, k, stride, padding): batch 1, odd sizes, stride 2 on odd
    // inputs, 7x7, 1x1 with and without stride, no padding, maps small enough to be
    // grouped into one GEMM.
    let cases = [
        (1, 3, 8, 8, 4, 3, 1, 1),
        (3, 5, 9, 7, 6, 3, 2, 1),
        (2, 3, 15, 15, 8, 7, 2, 3),
        (4, 6, 5, 5, 8, 1, 2, 0),
        (5, 8, 6, 6, 4, 1, 1, 0),
        (2, 4, 7, 7, 3, 3, 1, 0),
        (40, 4, 4, 4, 8, 3, 1, 1),
        (33, 8, 2, 2, 16, 3, 2, 1),
    ];
    for (i, &(n, c, h, w, co, k, stride, padding)) in cases.iter().enumerate() {
        let what = format!("case {i} {:?}", cases[i]);
        let x = Var::from_tensor(&random(&[n, c, h, w], 10 + i as u64)).unwrap();
        let wt = Var::from_tensor(&random(&[co, c, k, k], 20 + i as u64)).unwrap();
        let ours = kernels::conv2d(x.as_tensor(), wt.as_tensor(), stride, padding).unwrap();
        let reference = x
            .as_tensor()
            .conv2d(wt.as_tensor(), padding, stride, 1, 1)
            .unwrap();
        assert_close(&format!("{what} forward"), &ours, &reference, 1e-5);

        let r = random(reference.dims(), 30 + i as u64);
        let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (reference * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in [("grad input", &x), ("grad weight", &wt)] {
            assert_close(
                &format!("{what} {name}"),
                g_ours.get(var).unwrap(),
                g_ref.get(var).unwrap(),
                1e-5,
            );
        }
    }
}

#[test]
fn convolution_takes_non_contiguous_inputs_and_skips_untracked_gradients() {
    // A (n, h, c, w) buffer seen as (n, c, h, w) through a transpose.
    let raw = random(&[2, 6, 3, 5], 1);
    let x = raw.transpose(1, 2).unwrap();
    assert!(!x.is_contiguous());
    let w = Var::from_tensor(&random(&[4, 3, 3, 3], 2)).unwrap();
    let ours = kernels::conv2d(&x, w.as_tensor(), 1, 1).unwrap();
    let reference = x
        .contiguous()
        .unwrap()
        .conv2d(w.as_tensor(), 1, 1, 1, 1)
        .unwrap();
    assert_close("non-contiguous forward", &ours, &reference, 1e-5);
    let grads = ours.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none(), "a plain input gets no gradient");
    assert!(grads.get(w.as_tensor()).is_some());
}

#[test]
fn residual_add_relu_matches_candle() {
    let a = Var::from_tensor(&random(&[3, 4, 5, 5], 1)).unwrap();
    let b = Var::from_tensor(&random(&[3, 4, 5, 5], 2)).unwrap();
    let ours = kernels::add_relu(a.as_tensor(), b.as_tensor()).unwrap();
    let reference = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
    assert_close("add_relu forward", &ours, &reference, 1e-6);
    let r = random(&[3, 4, 5, 5], 3);
    let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (reference * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in [&a, &b] {
        assert_close(
            "add_relu grad",
            g_ours.get(v).unwrap(),
            g_ref.get(v).unwrap(),
            1e-6,
        );
    }
    assert!(kernels::add_relu(a.as_tensor(), &random(&[3, 4, 5, 4], 4)).is_err());
}

#[test]
fn convolution_rejects_mismatched_shapes() {
    let x = random(&[1, 3, 4, 4], 1);
    let err = kernels::conv2d(&x, &random(&[2, 4, 3, 3], 2), 1, 1).unwrap_err();
    assert!(err.to_string().contains("channels"), "{err}");
    let err = kernels::conv2d(&x, &random(&[2, 3, 7, 7], 2), 1, 0).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
}

/// A BatchNorm layer with random affine parameters, ours (`fused`) or candle's.
fn norm(channels: usize, fused: bool) -> (Norm, VarMap) {
    let vars = VarMap::new();
    let cfg = ModelConfig::default();
    let layer = Norm::new(
        channels,
        &cfg,
        if fused {
            Compute::Ours
        } else {
            Compute::Candle
        },
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
    )
    .unwrap();
    for (name, var) in vars.data().lock().unwrap().iter() {
        let seed = name.len() as u64;
        let value = match name.as_str() {
            "weight" => (random(&[channels], seed) + 1.5).unwrap(),
            "bias" => random(&[channels], seed),
            "running_mean" => random(&[channels], seed),
            "running_var" => (random(&[channels], seed) + 2.0).unwrap(),
            "num_batches_tracked" => continue,
            other => panic!("unexpected BatchNorm variable {other}"),
        };
        var.set(&value).unwrap();
    }
    (layer, vars)
}

fn var(vars: &VarMap, name: &str) -> Var {
    vars.data().lock().unwrap()[name].clone()
}

#[test]
fn batch_norm_matches_candle_in_both_modes() {
    // 2-D maps (odd sizes, batch 2), 1-D features, non-zero means; ReLU fused or not.
    let shapes: [&[usize]; 4] = [&[2, 3, 5, 7], &[4, 6, 1, 1], &[8, 5], &[3, 4, 3, 3]];
    for (i, shape) in shapes.iter().enumerate() {
        for relu in [false, true] {
            for train in [true, false] {
                let what = format!("shape {shape:?} relu {relu} train {train}");
                let (ours, our_vars) = norm(shape[1], true);
                let (reference, ref_vars) = norm(shape[1], false);
                let x = Var::from_tensor(&random(shape, 40 + i as u64).affine(3.0, 0.7).unwrap())
                    .unwrap();
                let y_ours = ours.forward_t(x.as_tensor(), train, relu).unwrap();
                let y_ref = reference.forward_t(x.as_tensor(), train, relu).unwrap();
                assert_close(&format!("{what} forward"), &y_ours, &y_ref, 1e-5);
                for stat in ["running_mean", "running_var"] {
                    assert_close(
                        &format!("{what} {stat}"),
                        var(&our_vars, stat).as_tensor(),
                        var(&ref_vars, stat).as_tensor(),
                        1e-5,
                    );
                }
                let r = random(shape, 50 + i as u64);
                let g_ours = (y_ours * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g_ref = (y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
                assert_close(
                    &format!("{what} grad input"),
                    g_ours.get(&x).unwrap(),
                    g_ref.get(&x).unwrap(),
                    1e-4,
                );
                for p in ["weight", "bias"] {
                    assert_close(
                        &format!("{what} grad {p}"),
                        g_ours.get(&var(&our_vars, p)).unwrap(),
                        g_ref.get(&var(&ref_vars, p)).unwrap(),
                        1e-4,
                    );
                }
            }
        }
    }
}

#[test]
fn batch_norm_takes_non_contiguous_inputs() {
    let x = random(&[3, 5, 4, 6], 9).transpose(1, 2).unwrap(); // (3, 4, 5, 6) view
    assert!(!x.is_contiguous());
    let (ours, _) = norm(4, true);
    let (reference, _) = norm(4, false);
    let y_ours = ours.forward_t(&x, true, true).unwrap();
    let y_ref = reference.forward_t(&x, true, true).unwrap();
    assert_close("non-contiguous BatchNorm", &y_ours, &y_ref, 1e-5);
}

#[test]
fn batch_norm_gradient_matches_finite_differences() {
    let shape = [3, 2, 2, 3];
    let (layer, vars) = norm(2, true);
    let x = random(&shape, 7).to_dtype(DType::F64).unwrap();
    let r = random(&shape, 8);
    // The loss in f32 through our kernel; differences taken in f64 on the input.
    let loss = |x: &Tensor| -> f64 {
        let y = layer
            .forward_t(&x.to_dtype(DType::F32).unwrap(), true, true)
            .unwrap();
        (y * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let xv = Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
    let y = layer.forward_t(xv.as_tensor(), true, true).unwrap();
    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let analytic: Vec<f32> = grads
        .get(&xv)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-2;
    for (i, a) in analytic.iter().enumerate() {
        let mut plus = base.clone();
        plus[i] += h;
        let mut minus = base.clone();
        minus[i] -= h;
        let t = |v: Vec<f64>| Tensor::from_vec(v, &shape, &Device::Cpu).unwrap();
        let numeric = (loss(&t(plus)) - loss(&t(minus))) / (2.0 * h);
        assert!(
            (numeric - *a as f64).abs() < 2e-2 * (1.0 + numeric.abs()),
            "element {i}: numeric {numeric} vs analytic {a}"
        );
    }
    drop(vars);
}

#[test]
fn whole_networks_agree_between_kernel_sets() {
    let trainer = |kernels| {
        let cfg = byol_trainer::TrainerConfig {
            model: tiny_model(),
            train: byol_trainer::TrainConfig {
                device: "cpu".into(),
                kernels,
                seed: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        byol_trainer::Trainer::new(cfg, 6).unwrap()
    };
    let (ours, reference) = (trainer(Kernels::Auto), trainer(Kernels::Candle));
    let v1 = random(&[6, 3, 12, 12], 1);
    let v2 = random(&[6, 3, 12, 12], 2);
    let (l_ours, g_ours) = ours.loss_and_grads(&v1, &v2).unwrap();
    let (l_ref, g_ref) = reference.loss_and_grads(&v1, &v2).unwrap();
    assert_close("loss", &l_ours, &l_ref, 1e-5);
    let refs = reference.trainable_named();
    for ((name, a), (_, b)) in ours.trainable_named().iter().zip(&refs) {
        assert_close(
            &format!("gradient of {name}"),
            g_ours.get(a).unwrap(),
            g_ref.get(b).unwrap(),
            2e-3,
        );
    }
    // Eval mode (running statistics) agrees too.
    let e_ours = ours.network().encoder.forward_t(&v1, false).unwrap();
    let e_ref = reference.network().encoder.forward_t(&v1, false).unwrap();
    assert_close("eval features", &e_ours, &e_ref, 1e-4);
}

#[test]
fn the_per_op_check_passes_candles_ops_and_reports_every_tensor() {
    use byol_trainer::Precision;
    use byol_trainer::bench::{op_check, op_shapes};
    for (precision, tolerance) in [(Precision::Fp32, 1e-4), (Precision::Bf16, 1e-2)] {
        let r = op_check("cpu", Kernels::Candle, precision, tolerance).unwrap();
        let failed: Vec<_> = r.diffs.iter().filter(|d| !d.pass).collect();
        assert!(r.pass, "{precision:?}: {failed:?}");
        // Every op's output and every input's gradient was compared.
        assert!(r.diffs.len() >= 3 * op_shapes().len(), "{}", r.diffs.len());
        assert!(r.diffs.iter().any(|d| d.tensor == "stats"));
        // The stem's max-pool equals the composite of candle's ops (its inputs have no
        // ties): the output exactly, the gradient up to the order in which an input that
        // is the maximum of two windows sums their gradients.
        let pools: Vec<_> = r
            .diffs
            .iter()
            .filter(|d| d.case.starts_with("max_pool"))
            .collect();
        assert_eq!(pools.len(), 6, "{pools:?}");
        assert!(
            pools
                .iter()
                .all(|d| d.rel_l2 <= if d.tensor == "y" { 0.0 } else { 1e-7 }),
            "{pools:?}"
        );
    }
    // A tolerance no float arithmetic meets fails, naming the op and shape.
    let r = op_check("cpu", Kernels::Candle, Precision::Fp32, 0.0).unwrap();
    assert!(!r.pass);
    assert!(
        r.diffs
            .iter()
            .any(|d| !d.pass && d.case.starts_with("conv2d x["))
    );
}

#[test]
fn batch_norm_statistics_are_a_device_tensor_of_means_and_variances() {
    let x = random(&[3, 4, 5, 2], 77).affine(2.0, 5.0).unwrap();
    let stats = kernels::batch_norm_stats(&x).unwrap();
    assert_eq!(stats.dims(), &[2, 4]);
    // Means over every axis but the channels'.
    let per_channel = |t: &Tensor| -> Tensor {
        [3, 2, 0]
            .into_iter()
            .fold(t.clone(), |t, axis| t.mean_keepdim(axis).unwrap())
    };
    let mean = per_channel(&x);
    let var = per_channel(&x.broadcast_sub(&mean).unwrap().sqr().unwrap());
    assert_close(
        "mean",
        &stats.get(0).unwrap(),
        &mean.flatten_all().unwrap(),
        1e-6,
    );
    assert_close(
        "variance",
        &stats.get(1).unwrap(),
        &var.flatten_all().unwrap(),
        1e-5,
    );
}
