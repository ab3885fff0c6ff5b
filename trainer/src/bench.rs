//! The BYOL step measured on synthetic input: its throughput on a device (`byol bench
//! step`), and a check of a device's loss and gradients against our CPU kernels (`byol
//! bench check`). Inputs are seeded standard-normal views, so both sides of a
//! comparison (and the PyTorch peer, `scripts/peer_torch_byol_step.py`) do the same work.

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::TrainError;
use crate::config::{Kernels, ModelConfig, Precision, TrainerConfig};
use crate::device::{open_device, parse_device};
use crate::model::{Compute, seeded_normal};
use crate::trainer::Trainer;

/// Two seeded views `(batch, 3, size, size)` on `device`.
pub fn random_views(
    batch: usize,
    size: usize,
    seed: u64,
    device: &Device,
) -> Result<(Tensor, Tensor), TrainError> {
    let n = batch * 3 * size * size;
    let shape = (batch, 3, size, size);
    let v1 = Tensor::from_vec(seeded_normal(n, seed), shape, device)?;
    let v2 = Tensor::from_vec(
        seeded_normal(n, seed ^ 0x9E37_79B9_7F4A_7C15),
        shape,
        device,
    )?;
    Ok((v1, v2))
}

/// What one throughput measurement found.
#[derive(Debug, Clone, Serialize)]
pub struct StepBench {
    /// Device name as configured (`cpu`, `cuda:0`).
    pub device: String,
    /// `fp32` or `bf16`.
    pub precision: Precision,
    /// Images per batch (each with two views).
    pub batch: usize,
    /// View side in pixels.
    pub size: usize,
    /// Timed steps (after the warm-up ones).
    pub steps: usize,
    /// Median seconds of one timed step (the device synchronised after each).
    pub step_seconds_median: f64,
    /// `batch / step_seconds_median`: images (two views each) per second.
    pub images_per_sec: f64,
    /// Loss of the first and of the last step.
    pub loss_first: f32,
    /// Loss of the last step.
    pub loss_last: f32,
    /// With profiling: each op kind's time per step, measured over `steps` further
    /// steps with the device synchronised around every op (see `kernels::profile`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<StepProfile>,
}

/// Where a step's time goes, per op kind (a profiled step: every op synchronised).
#[derive(Debug, Clone, Serialize)]
pub struct StepProfile {
    /// Median seconds of one profiled step (above the plain one: synchronising
    /// serialises it).
    pub step_seconds_median: f64,
    /// Milliseconds per step and calls per step of each op kind of ours, and of each
    /// phase of the step outside our ops (`forward and loss`: the heads, the loss and
    /// casts; `backward`: candle's backward of those and the gradient accumulation;
    /// `optimizer`; `after-step (EMA, memory)`), largest first; the last entry,
    /// `other`, is the rest of the step.
    pub ops: Vec<ProfiledOp>,
}

/// One op kind's share of a profiled step.
#[derive(Debug, Clone, Serialize)]
pub struct ProfiledOp {
    /// The op kind.
    pub op: String,
    /// Milliseconds per step.
    pub ms_per_step: f64,
    /// Calls per step.
    pub calls_per_step: f64,
    /// Share of the profiled step.
    pub share: f64,
}

/// Runs `warmup + steps` full training steps (forward both views through both networks,
/// backward, optimizer, EMA) of `cfg` on seeded views and times the last `steps`; with
/// `profile`, `steps` more with every op of ours timed by kind ([`StepProfile`]).
///
/// Errors: an invalid config, an unavailable device, or a failing step.
pub fn step_throughput(
    cfg: TrainerConfig,
    batch: usize,
    size: usize,
    warmup: usize,
    steps: usize,
    profile: bool,
) -> Result<StepBench, TrainError> {
    let device_name = cfg.train.device.clone();
    let precision = cfg.train.precision;
    let mut trainer = Trainer::new(cfg, batch)?;
    let (v1, v2) = random_views(batch, size, 7, trainer.device())?;
    let mut times = Vec::with_capacity(steps);
    let mut loss_first = f32::NAN;
    for i in 0..warmup + steps.max(1) {
        trainer.device().synchronize()?;
        let t = Instant::now();
        trainer.step_tensors(&v1, &v2)?;
        trainer.device().synchronize()?;
        if i == 0 {
            loss_first = trainer.read_health()?.loss;
        }
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let loss_last = trainer.read_health()?.loss;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let profile = if profile {
        Some(profile_steps(&mut trainer, &v1, &v2, steps.max(1))?)
    } else {
        None
    };
    Ok(StepBench {
        device: device_name,
        precision,
        batch,
        size,
        steps: times.len(),
        step_seconds_median: median,
        images_per_sec: batch as f64 / median,
        loss_first,
        loss_last,
        profile,
    })
}

/// `steps` steps with our ops timed by kind (see [`StepProfile`]).
fn profile_steps(
    trainer: &mut Trainer,
    v1: &Tensor,
    v2: &Tensor,
    steps: usize,
) -> Result<StepProfile, TrainError> {
    use crate::kernels::profile;
    profile::take();
    profile::take_phases();
    profile::set_enabled(true);
    let mut times = Vec::with_capacity(steps);
    let run = (|| -> Result<(), TrainError> {
        for _ in 0..steps {
            trainer.device().synchronize()?;
            let t = Instant::now();
            trainer.step_tensors(v1, v2)?;
            trainer.device().synchronize()?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(())
    })();
    profile::set_enabled(false);
    run?;
    let total: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    let per = |v: f64| v / steps as f64;
    let mut ops: Vec<ProfiledOp> = profile::take()
        .into_iter()
        .map(|t| ProfiledOp {
            op: t.op,
            ms_per_step: per(t.seconds) * 1e3,
            calls_per_step: per(t.calls as f64),
            share: t.seconds / total,
        })
        .collect();
    // The rest of each phase, outside our ops: candle's ops (the heads, the loss,
    // casts, gradient accumulation), the optimizer, the EMA.
    for p in profile::take_phases() {
        let outside = (p.seconds - p.in_ops_seconds).max(0.0);
        ops.push(ProfiledOp {
            op: format!("{} (outside our ops)", p.phase),
            ms_per_step: per(outside) * 1e3,
            calls_per_step: 1.0,
            share: outside / total,
        });
    }
    ops.sort_by(|a, b| b.ms_per_step.total_cmp(&a.ms_per_step));
    let named: f64 = ops.iter().map(|o| o.ms_per_step).sum();
    ops.push(ProfiledOp {
        op: "other".into(),
        ms_per_step: (per(total) * 1e3 - named).max(0.0),
        calls_per_step: 0.0,
        share: (1.0 - named / (per(total) * 1e3)).max(0.0),
    });
    Ok(StepProfile {
        step_seconds_median: times[times.len() / 2],
        ops,
    })
}

/// One parameter's gradient on the checked device against the reference.
#[derive(Debug, Clone, Serialize)]
pub struct GradDiff {
    /// Parameter name (torchvision-style).
    pub name: String,
    /// `‖g − g_ref‖₂ / (‖g_ref‖₂ + 10⁻³ · rms)`, where `rms` is the root mean square of
    /// all parameters' reference gradient norms: a relative error that stays meaningful
    /// for gradients that vanish by construction (a bias right before a BatchNorm).
    pub rel_l2: f64,
    /// Largest absolute element difference.
    pub max_abs: f64,
}

/// The outcome of [`grad_check`].
#[derive(Debug, Clone, Serialize)]
pub struct GradCheck {
    /// The checked device.
    pub device: String,
    /// The checked kernels and precision, in words.
    pub checked: String,
    /// The reference: our CPU kernels in the same precision.
    pub reference: String,
    /// Loss on the reference and on the checked side.
    pub loss_reference: f64,
    /// Loss on the checked side.
    pub loss_checked: f64,
    /// Parameters compared (every trainable one).
    pub parameters: usize,
    /// The largest `rel_l2` over all parameters.
    pub max_rel_l2: f64,
    /// The median `rel_l2` over all parameters.
    pub median_rel_l2: f64,
    /// The five parameters with the largest `rel_l2`.
    pub worst: Vec<GradDiff>,
    /// The tolerance on the loss's relative difference and, in f32, on the largest
    /// gradient error. In bf16 only the loss is held to it: rounding flips make the
    /// gradients of an untrained BYOL network differ by 20-50% between any two
    /// summation orders (ours against candle's kernels on one CPU; PyTorch's bf16
    /// against its f32 differs by 50-60%), so they are reported, not judged.
    pub tolerance: f64,
    /// Loss and gradients within the tolerance.
    pub pass: bool,
}

/// Each trainable parameter's name and gradient (flattened, on the CPU).
type NamedGrads = Vec<(String, Vec<f32>)>;

/// Loss and every trainable parameter's gradient of one forward/backward (no optimizer
/// step) of `trainer` on `(v1, v2)`.
fn loss_and_grads(
    trainer: &Trainer,
    v1: &Tensor,
    v2: &Tensor,
) -> Result<(f64, NamedGrads), TrainError> {
    let (loss, grads) = trainer.loss_and_grads(v1, v2)?;
    let mut out = Vec::new();
    for (name, var) in trainer.trainable_named() {
        let g = match grads.get(var.as_tensor()) {
            Some(g) => crate::host::vec1::<f32>(&g.flatten_all()?)?,
            None => vec![0.0; var.elem_count()],
        };
        out.push((name, g));
    }
    Ok((f64::from(crate::host::scalar::<f32>(&loss)?), out))
}

/// Compares one forward/backward of the same model (same seed, same batch) on `device`
/// with `kernels` and `precision`, against our CPU kernels in the same precision (bf16
/// on CPU rounds inputs, weights and outputs of each product to bf16, see
/// `model::layers`): the loss and every gradient. `tolerance` bounds each gradient's
/// relative L2 error and the loss's relative difference.
///
/// In bf16 only the loss is judged (see [`GradCheck::tolerance`]).
///
/// Errors: an unavailable device or a failing forward/backward.
pub fn grad_check(
    model_cfg: &ModelConfig,
    device: &str,
    kernels: Kernels,
    precision: Precision,
    batch: usize,
    size: usize,
    tolerance: f64,
) -> Result<GradCheck, TrainError> {
    let cpu = Device::Cpu;
    let checked_device = open_device(parse_device(device)?)?;
    let reference_compute = Compute::new(Kernels::Auto, precision);
    let compute = Compute::new(kernels, precision);
    let trainer_on = |device: &str, kernels: Kernels| {
        let mut cfg = TrainerConfig {
            model: model_cfg.clone(),
            ..TrainerConfig::default()
        };
        cfg.train.device = device.to_owned();
        cfg.train.kernels = kernels;
        cfg.train.precision = precision;
        cfg.train.seed = 11;
        Trainer::new(cfg, batch.max(2))
    };
    let reference = trainer_on("cpu", Kernels::Auto)?;
    let checked = trainer_on(device, kernels)?;
    let (r1, r2) = random_views(batch, size, 5, &cpu)?;
    let (c1, c2) = random_views(batch, size, 5, &checked_device)?;
    let (loss_ref, grads_ref) = loss_and_grads(&reference, &r1, &r2)?;
    let (loss_chk, grads_chk) = loss_and_grads(&checked, &c1, &c2)?;
    let norms: Vec<f64> = grads_ref
        .iter()
        .map(|(_, g)| g.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt())
        .collect();
    let rms = (norms.iter().map(|n| n * n).sum::<f64>() / norms.len().max(1) as f64).sqrt();
    let mut diffs: Vec<GradDiff> = grads_ref
        .iter()
        .zip(&grads_chk)
        .zip(&norms)
        .map(|(((name, a), (_, b)), norm_ref)| {
            let (mut num, mut max_abs) = (0f64, 0f64);
            for (&x, &y) in a.iter().zip(b) {
                let d = f64::from(y) - f64::from(x);
                num += d * d;
                max_abs = max_abs.max(d.abs());
            }
            GradDiff {
                name: name.clone(),
                rel_l2: num.sqrt() / (norm_ref + 1e-3 * rms),
                max_abs,
            }
        })
        .collect();
    diffs.sort_by(|a, b| b.rel_l2.total_cmp(&a.rel_l2));
    let max_rel_l2 = diffs.first().map_or(0.0, |d| d.rel_l2);
    let median_rel_l2 = diffs.get(diffs.len() / 2).map_or(0.0, |d| d.rel_l2);
    let grad_error = if compute.bf16() { 0.0 } else { max_rel_l2 };
    let loss_rel = (loss_chk - loss_ref).abs() / loss_ref.abs().max(1e-12);
    Ok(GradCheck {
        device: device.to_owned(),
        checked: compute.describe(),
        reference: reference_compute.describe(),
        loss_reference: loss_ref,
        loss_checked: loss_chk,
        parameters: diffs.len(),
        max_rel_l2,
        median_rel_l2,
        worst: diffs.into_iter().take(5).collect(),
        tolerance,
        pass: grad_error <= tolerance && loss_rel <= tolerance,
    })
}

/// One op's shape in [`op_check`]: which op and its sizes.
#[derive(Debug, Clone, Copy)]
pub enum OpShape {
    /// `conv2d`: input `(n, c, h, w)`, `co` outputs, `k × k` kernel, stride, padding.
    Conv {
        /// Input `(n, c, h, w)`.
        x: [usize; 4],
        /// Output channels.
        co: usize,
        /// Kernel side.
        k: usize,
        /// Stride.
        stride: usize,
        /// Zero padding.
        pad: usize,
    },
    /// BatchNorm with batch statistics (and its running-statistics input unused), on
    /// `(n, c, …)`; ReLU after it when `relu`.
    BatchNormTrain {
        /// Input dimensions.
        x: &'static [usize],
        /// ReLU fused in.
        relu: bool,
    },
    /// BatchNorm with given statistics (eval mode), then ReLU.
    BatchNormEval {
        /// Input dimensions.
        x: &'static [usize],
    },
    /// `relu(a + b)`.
    AddRelu {
        /// Dimensions of both inputs.
        x: &'static [usize],
    },
    /// The ImageNet stem's max-pool (3×3, stride 2, padding 1) of `(n, c, h, w)`.
    MaxPool {
        /// Input `(n, c, h, w)`.
        x: [usize; 4],
    },
}

impl std::fmt::Display for OpShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpShape::Conv {
                x,
                co,
                k,
                stride,
                pad,
            } => write!(
                f,
                "conv2d x{x:?} -> {co}, {k}x{k} stride {stride} pad {pad}"
            ),
            OpShape::BatchNormTrain { x, relu } => {
                write!(
                    f,
                    "batch_norm_train{} x{x:?}",
                    if *relu { "+relu" } else { "" }
                )
            }
            OpShape::BatchNormEval { x } => write!(f, "batch_norm_eval+relu x{x:?}"),
            OpShape::AddRelu { x } => write!(f, "add_relu x{x:?}"),
            OpShape::MaxPool { x } => write!(f, "max_pool 3x3 stride 2 pad 1 x{x:?}"),
        }
    }
}

/// The shapes [`op_check`] covers: the convolutions of both networks (1×1, 3×3 and 7×7;
/// strides 1 and 2; odd sizes; batch 1 and 2), BatchNorm over maps and features (with
/// and without ReLU, training and eval), the residual add, and the stem's max-pool (odd
/// and even sides, a map smaller than a window).
pub fn op_shapes() -> Vec<OpShape> {
    let conv = |x: [usize; 4], co, k, stride, pad| OpShape::Conv {
        x,
        co,
        k,
        stride,
        pad,
    };
    vec![
        conv([2, 3, 32, 32], 16, 3, 1, 1),  // small stem
        conv([2, 3, 65, 63], 8, 7, 2, 3),   // ImageNet stem, odd sizes
        conv([2, 16, 16, 16], 16, 3, 1, 1), // basic block
        conv([2, 16, 17, 17], 32, 3, 2, 1), // first block of a stage
        conv([2, 32, 8, 8], 64, 1, 1, 0),   // bottleneck 1x1
        conv([2, 16, 15, 15], 32, 1, 2, 0), // downsample
        conv([1, 8, 7, 7], 8, 3, 1, 1),     // batch 1
        conv([2, 128, 4, 4], 128, 3, 1, 1), // deep stage
        conv([1, 64, 9, 9], 32, 1, 1, 0),   // batch 1, 1x1
        OpShape::BatchNormTrain {
            x: &[2, 16, 16, 16],
            relu: true,
        },
        OpShape::BatchNormTrain {
            x: &[2, 16, 15, 15],
            relu: false,
        },
        OpShape::BatchNormTrain {
            x: &[1, 8, 7, 7],
            relu: true,
        },
        OpShape::BatchNormTrain {
            x: &[8, 64],
            relu: true,
        },
        OpShape::BatchNormEval { x: &[2, 16, 5, 5] },
        OpShape::AddRelu { x: &[2, 16, 9, 9] },
        OpShape::MaxPool { x: [2, 8, 13, 11] },
        OpShape::MaxPool { x: [1, 4, 16, 16] },
        OpShape::MaxPool { x: [2, 3, 1, 2] },
    ]
}

/// One tensor's comparison in [`op_check`].
#[derive(Debug, Clone, Serialize)]
pub struct OpDiff {
    /// The op and its shape, in words.
    pub case: String,
    /// `y` (the output), `stats`, or `grad <input>`.
    pub tensor: String,
    /// `‖a − b‖₂ / ‖b‖₂` (b the reference; 0 when both are 0).
    pub rel_l2: f64,
    /// Within the tolerance.
    pub pass: bool,
}

/// The outcome of [`op_check`].
#[derive(Debug, Clone, Serialize)]
pub struct OpCheck {
    /// The checked device.
    pub device: String,
    /// The checked kernels and precision, in words.
    pub checked: String,
    /// The reference: our CPU kernels, same precision.
    pub reference: String,
    /// Bound on every tensor's relative L2 error.
    pub tolerance: f64,
    /// Every compared tensor.
    pub diffs: Vec<OpDiff>,
    /// Every tensor within the tolerance.
    pub pass: bool,
}

/// The op of `shape` on `inputs`, computed by `compute`'s kernels; its output and the
/// tensors compared besides it (BatchNorm's statistics). In bf16 the inputs are cast
/// to bf16 on CUDA, or rounded to it on CPU (`in_bf16`'s arithmetic), and the output
/// back to f32.
fn run_op(
    shape: &OpShape,
    compute: Compute,
    inputs: &[Tensor],
) -> Result<(Tensor, Vec<(String, Tensor)>), TrainError> {
    use candle_core::DType;
    let dev = inputs[0].device().clone();
    let bf16 = compute.bf16();
    let cast = |t: &Tensor| -> candle_core::Result<Tensor> {
        match (bf16, dev.is_cuda()) {
            (false, _) => Ok(t.clone()),
            (true, true) => t.to_dtype(DType::BF16),
            (true, false) => t.to_dtype(DType::BF16)?.to_dtype(DType::F32),
        }
    };
    let back = |t: Tensor| -> candle_core::Result<Tensor> {
        if bf16 {
            t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
        } else {
            Ok(t)
        }
    };
    let ours = compute.ours();
    let eps = 1e-5;
    let mut extra = Vec::new();
    let y = match *shape {
        OpShape::Conv { stride, pad, .. } => {
            let (x, w) = (cast(&inputs[0])?, cast(&inputs[1])?);
            if ours {
                crate::kernels::conv2d(&x, &w, stride, pad)?
            } else {
                x.conv2d(&w, pad, stride, 1, 1)?
            }
        }
        OpShape::BatchNormTrain { relu, .. } => {
            let x = cast(&inputs[0])?;
            let (w, b) = (&inputs[1], &inputs[2]);
            if ours {
                let out = crate::kernels::batch_norm_train(&x, w, b, eps, relu)?;
                extra.push(("stats".to_owned(), out.stats));
                out.y
            } else {
                let x = x.to_dtype(DType::F32)?;
                let axes: Vec<usize> = (0..x.rank()).filter(|&a| a != 1).collect();
                let mut mean = x.clone();
                for &a in axes.iter().rev() {
                    mean = mean.mean_keepdim(a)?;
                }
                let centred = x.broadcast_sub(&mean)?;
                let mut var = centred.sqr()?;
                for &a in axes.iter().rev() {
                    var = var.mean_keepdim(a)?;
                }
                let bshape: Vec<usize> = (0..x.rank())
                    .map(|a| if a == 1 { x.dim(1).unwrap_or(1) } else { 1 })
                    .collect();
                let y = centred
                    .broadcast_div(&(var.clone() + eps)?.sqrt()?)?
                    .broadcast_mul(&w.reshape(bshape.clone())?)?
                    .broadcast_add(&b.reshape(bshape)?)?;
                let stats = Tensor::stack(&[mean.flatten_all()?, var.flatten_all()?], 0)?;
                extra.push(("stats".to_owned(), stats));
                if relu { y.relu()? } else { y }
            }
        }
        OpShape::BatchNormEval { .. } => {
            let x = cast(&inputs[0])?;
            let (w, b, m, v) = (&inputs[1], &inputs[2], &inputs[3], &inputs[4]);
            if ours {
                crate::kernels::batch_norm_eval(&x, w, b, m, v, eps, true)?
            } else {
                let x = x.to_dtype(DType::F32)?;
                let s = |t: &Tensor| t.reshape((1, t.dim(0)?, 1, 1));
                x.broadcast_sub(&s(m)?)?
                    .broadcast_div(&(s(v)? + eps)?.sqrt()?)?
                    .broadcast_mul(&s(w)?)?
                    .broadcast_add(&s(b)?)?
                    .relu()?
            }
        }
        OpShape::AddRelu { .. } => {
            let (a, b) = (cast(&inputs[0])?, cast(&inputs[1])?);
            if ours {
                crate::kernels::add_relu(&a, &b)?
            } else {
                (a + b)?.relu()?
            }
        }
        OpShape::MaxPool { .. } => {
            let x = cast(&inputs[0])?;
            if ours {
                crate::kernels::max_pool_3x3_s2(&x)?
            } else {
                crate::model::max_pool_3x3_s2_p1(&x)?
            }
        }
    };
    Ok((back(y.to_dtype(DType::F32)?)?, extra))
}

/// The seeded inputs of `shape` (on the CPU): activations standard normal (BatchNorm's
/// shifted to a mean of 3, to test the statistics' stability), weights scaled by
/// `1/√fan_in`, BatchNorm's scale around 1 and variances positive.
fn op_inputs(shape: &OpShape, seed: u64) -> Result<Vec<(String, Tensor)>, TrainError> {
    let cpu = Device::Cpu;
    let normal =
        |dims: &[usize], seed: u64, scale: f64, shift: f64| -> Result<Tensor, TrainError> {
            let n: usize = dims.iter().product();
            Ok(((Tensor::from_vec(seeded_normal(n, seed), dims, &cpu)? * scale)? + shift)?)
        };
    Ok(match *shape {
        OpShape::Conv { x, co, k, .. } => {
            let fan_in = (x[1] * k * k) as f64;
            vec![
                ("x".into(), normal(&x, seed, 1.0, 0.0)?),
                (
                    "weight".into(),
                    normal(&[co, x[1], k, k], seed + 1, fan_in.sqrt().recip(), 0.0)?,
                ),
            ]
        }
        OpShape::BatchNormTrain { x, .. } | OpShape::BatchNormEval { x } => {
            let c = x[1];
            let mut v = vec![
                ("x".into(), normal(x, seed, 2.0, 3.0)?),
                ("weight".into(), normal(&[c], seed + 1, 0.2, 1.0)?),
                ("bias".into(), normal(&[c], seed + 2, 0.2, 0.0)?),
            ];
            if matches!(shape, OpShape::BatchNormEval { .. }) {
                v.push(("running_mean".into(), normal(&[c], seed + 3, 0.5, 3.0)?));
                v.push((
                    "running_var".into(),
                    normal(&[c], seed + 4, 0.5, 4.0)?.abs()?,
                ));
            }
            v
        }
        // Multiples of 1/16 and odd multiples of 1/32 (exact in bf16): `a + b` is never
        // 0, where ReLU conventions differ (candle passes the gradient at 0, PyTorch and
        // ours do not).
        OpShape::AddRelu { x } => vec![
            ("a".into(), ((normal(x, seed, 16.0, 0.0)?.round()? / 16.0)?)),
            (
                "b".into(),
                ((normal(x, seed + 1, 16.0, 0.0)?.round()? + 0.5)? / 16.0)?,
            ),
        ],
        // Positive and distinct within every window (so no tie decides where a gradient
        // goes, and zero padding never wins), exact in bf16: the value at (y, x) is
        // 1 + a seeded permutation, per plane, of the 16 codes of (y mod 4, x mod 4),
        // over 4.
        OpShape::MaxPool { x } => {
            let [n, c, h, w] = x;
            let mut values = Vec::with_capacity(n * c * h * w);
            for plane in 0..n * c {
                let keys = seeded_normal(16, seed + plane as u64);
                let mut codes: Vec<usize> = (0..16).collect();
                codes.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
                for iy in 0..h {
                    for ix in 0..w {
                        values.push((1 + codes[(iy % 4) * 4 + ix % 4]) as f32 / 4.0);
                    }
                }
            }
            vec![("x".into(), Tensor::from_vec(values, &x[..], &cpu)?)]
        }
    })
}

/// The output, the extra tensors and the gradient of `Σ y · r` (r seeded) with respect to
/// every differentiable input, as host vectors.
fn op_results(
    shape: &OpShape,
    compute: Compute,
    device: &Device,
    seed: u64,
) -> Result<Vec<(String, Vec<f32>)>, TrainError> {
    use candle_core::Var;
    let inputs = op_inputs(shape, seed)?;
    let differentiable = |name: &str| !name.starts_with("running_");
    let vars: Vec<Var> = inputs
        .iter()
        .map(|(_, t)| Var::from_tensor(&t.to_device(device)?))
        .collect::<candle_core::Result<_>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (y, extra) = run_op(shape, compute, &tensors)?;
    let r = Tensor::from_vec(seeded_normal(y.elem_count(), seed + 99), y.shape(), device)?;
    let grads = (&y * &r)?.sum_all()?.backward()?;
    let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
        crate::host::vec1(&t.to_dtype(candle_core::DType::F32)?.flatten_all()?)
    };
    let mut out = vec![("y".to_owned(), host(&y)?)];
    for (name, t) in extra {
        out.push((name, host(&t)?));
    }
    for ((name, _), var) in inputs.iter().zip(&vars) {
        if !differentiable(name) {
            continue;
        }
        let g = match grads.get(var.as_tensor()) {
            Some(g) => host(g)?,
            None => vec![0.0; var.elem_count()],
        };
        out.push((format!("grad {name}"), g));
    }
    Ok(out)
}

/// Checks each op of [`op_shapes`], forward and backward, computed with `kernels` and
/// `precision` on `device`, against our CPU kernels in the same precision on the same
/// seeded inputs: every output, BatchNorm's statistics and every input gradient, by
/// relative L2 error against `tolerance` (e.g. 1e-4 in fp32, 1e-2 in bf16). With
/// `device = cpu` and `kernels = candle` this checks candle's CPU ops against ours
/// (the check's own test, without a GPU).
///
/// Errors: an unavailable device, or an op that fails to run (its error names the op
/// and shape).
pub fn op_check(
    device: &str,
    kernels: Kernels,
    precision: Precision,
    tolerance: f64,
) -> Result<OpCheck, TrainError> {
    let checked_device = open_device(parse_device(device)?)?;
    let reference = Compute::new(Kernels::Auto, precision);
    let checked = Compute::new(kernels, precision);
    let mut diffs = Vec::new();
    for (i, shape) in op_shapes().iter().enumerate() {
        let seed = 1000 + i as u64 * 10;
        let failed = |e: TrainError| TrainError::OpCheck {
            case: shape.to_string(),
            reason: e.to_string(),
        };
        let want = op_results(shape, reference, &Device::Cpu, seed).map_err(failed)?;
        let got = op_results(shape, checked, &checked_device, seed).map_err(failed)?;
        for ((name, b), (_, a)) in want.iter().zip(&got) {
            let (mut num, mut den) = (0f64, 0f64);
            for (&x, &y) in a.iter().zip(b) {
                num += (f64::from(x) - f64::from(y)).powi(2);
                den += f64::from(y).powi(2);
            }
            let rel_l2 = if den == 0.0 {
                num.sqrt()
            } else {
                (num / den).sqrt()
            };
            let pass = a.len() == b.len() && rel_l2 <= tolerance;
            diffs.push(OpDiff {
                case: shape.to_string(),
                tensor: name.clone(),
                rel_l2,
                pass,
            });
        }
    }
    Ok(OpCheck {
        device: device.to_owned(),
        checked: checked.describe(),
        reference: reference.describe(),
        tolerance,
        pass: diffs.iter().all(|d| d.pass),
        diffs,
    })
}
