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
use crate::loss::byol_loss;
use crate::model::{ByolModel, Compute, seeded_normal};
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
}

/// Runs `warmup + steps` full training steps (forward both views through both networks,
/// backward, optimizer, EMA) of `cfg` on seeded views and times the last `steps`.
///
/// Errors: an invalid config, an unavailable device, or a failing step.
pub fn step_throughput(
    cfg: TrainerConfig,
    batch: usize,
    size: usize,
    warmup: usize,
    steps: usize,
) -> Result<StepBench, TrainError> {
    let device_name = cfg.train.device.clone();
    let precision = cfg.train.precision;
    let mut trainer = Trainer::new(cfg, batch)?;
    let (v1, v2) = random_views(batch, size, 7, trainer.device())?;
    let mut times = Vec::with_capacity(steps);
    let (mut loss_first, mut loss_last) = (f32::NAN, f32::NAN);
    for i in 0..warmup + steps.max(1) {
        trainer.device().synchronize()?;
        let t = Instant::now();
        let stats = trainer.step_tensors(&v1, &v2)?;
        trainer.device().synchronize()?;
        if i == 0 {
            loss_first = stats.loss;
        }
        loss_last = stats.loss;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
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

/// Loss and every trainable parameter's gradient of one BYOL forward/backward (no
/// optimizer step) of `model` on `(v1, v2)`.
fn loss_and_grads(
    model: &ByolModel,
    v1: &Tensor,
    v2: &Tensor,
) -> Result<(f64, NamedGrads), TrainError> {
    let (_, p1) = model.online.forward_t(v1, true)?;
    let (_, p2) = model.online.forward_t(v2, true)?;
    let t1 = model.target.forward_t(v1, true)?.0.detach();
    let t2 = model.target.forward_t(v2, true)?.0.detach();
    let (p1, p2) = (
        p1.expect("online has a predictor"),
        p2.expect("online has a predictor"),
    );
    let loss = byol_loss(&p1, &p2, &t1, &t2)?;
    let grads = loss.backward()?;
    let mut out = Vec::new();
    for (name, var) in model.trainable() {
        let g = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?,
            None => vec![0.0; var.elem_count()],
        };
        out.push((name, g));
    }
    Ok((f64::from(loss.to_scalar::<f32>()?), out))
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
    let reference_compute = Compute::new(Kernels::Auto, precision, &cpu);
    let reference = ByolModel::with_compute(model_cfg, reference_compute, 11, &cpu)?;
    let compute = Compute::new(kernels, precision, &checked_device);
    let checked = ByolModel::with_compute(model_cfg, compute, 11, &checked_device)?;
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
    let grad_error = if compute.bf16 { 0.0 } else { max_rel_l2 };
    let loss_rel = (loss_chk - loss_ref).abs() / loss_ref.abs().max(1e-12);
    let describe = |c: Compute| {
        format!(
            "{} kernels, {}",
            if c.ours { "our CPU" } else { "candle's" },
            if c.bf16 { "bf16" } else { "f32" }
        )
    };
    Ok(GradCheck {
        device: device.to_owned(),
        checked: describe(compute),
        reference: describe(reference_compute),
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
