//! BatchNorm over the channel axis of f32 `(n, c, ...)` tensors — 2-D feature maps and
//! 1-D features alike — with batch statistics (training) or given ones (eval), and an
//! optional fused ReLU. Forward: one pass for the statistics, one to normalise.
//! Backward: one pass for the two per-channel sums, one for the input gradient.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{contiguous_f32, cpu_f32};

/// What a training-mode BatchNorm produced.
pub struct BatchNormOutput {
    /// The normalised (and rectified, if asked) output.
    pub y: Tensor,
    /// Per-channel batch mean.
    pub mean: Vec<f32>,
    /// Per-channel biased batch variance (what the output was normalised with).
    pub var: Vec<f32>,
    /// Values per channel the statistics were taken over (`n · h · w`).
    pub count: usize,
}

/// BatchNorm with the batch's statistics: `y = (x − mean) / √(var + eps) · weight + bias`,
/// then `max(y, 0)` when `relu`. Differentiable in `x`, `weight` and `bias`, the
/// statistics included (as PyTorch's training mode).
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<BatchNormOutput> {
    let x = x.contiguous()?;
    let (n, c, s) = split_dims(x.dims())?;
    let (mean, var) = {
        let (guard, layout) = x.storage_and_layout();
        channel_stats(cpu_f32(&guard, layout, "batch_norm")?, n, c, s)
    };
    let invstd = var.iter().map(|v| inv_std(*v, eps)).collect();
    let op = BatchNormOp {
        mean: mean.clone(),
        invstd,
        batch_stats: true,
        relu,
    };
    let y = apply(&x, weight, bias, op)?;
    Ok(BatchNormOutput {
        y,
        mean,
        var,
        count: n * s,
    })
}

/// BatchNorm with given (running) statistics, as in eval mode; then ReLU when `relu`.
pub fn batch_norm_eval(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let mean: Vec<f32> = mean.to_vec1()?;
    let invstd = var
        .to_vec1::<f32>()?
        .iter()
        .map(|v| inv_std(*v, eps))
        .collect();
    let op = BatchNormOp {
        mean,
        invstd,
        batch_stats: false,
        relu,
    };
    apply(&x.contiguous()?, weight, bias, op)
}

fn inv_std(var: f32, eps: f64) -> f32 {
    (1.0 / (var as f64 + eps).sqrt()) as f32
}

fn apply(x: &Tensor, weight: &Tensor, bias: &Tensor, op: BatchNormOp) -> Result<Tensor> {
    let (_, c, _) = split_dims(x.dims())?;
    if weight.dims() != [c] || bias.dims() != [c] || op.mean.len() != c {
        bail!(
            "batch_norm: {c} channels, but weight {:?}, bias {:?}, {} statistics",
            weight.dims(),
            bias.dims(),
            op.mean.len()
        )
    }
    x.apply_op3_arc(
        &weight.contiguous()?,
        &bias.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )
}

/// `(n, c, rest…)` → `(n, c, product of rest)`.
fn split_dims(dims: &[usize]) -> Result<(usize, usize, usize)> {
    match dims {
        [n, c, rest @ ..] => Ok((*n, *c, rest.iter().product())),
        _ => bail!("batch_norm: expected at least 2 dimensions, got {dims:?}"),
    }
}

/// Per-channel accumulations over the batch: `f(channel, offset, acc)` handles the
/// `s` values of one channel of one image starting at `offset`. Parallel over blocks of
/// channels; each channel sums its images in order, so results do not depend on the
/// thread count.
fn reduce_channels<const K: usize>(
    n: usize,
    c: usize,
    s: usize,
    f: impl Fn(usize, usize, &mut [f64; K]) + Sync,
) -> Vec<[f64; K]> {
    let block = c.div_ceil(4 * rayon::current_num_threads()).max(1);
    let starts: Vec<usize> = (0..c).step_by(block).collect();
    let blocks: Vec<Vec<[f64; K]>> = starts
        .into_par_iter()
        .map(|c0| {
            let c1 = (c0 + block).min(c);
            let mut acc = vec![[0f64; K]; c1 - c0];
            for i in 0..n {
                for ch in c0..c1 {
                    f(ch, (i * c + ch) * s, &mut acc[ch - c0]);
                }
            }
            acc
        })
        .collect();
    blocks.concat()
}

/// Lanes of the vectorised sums below.
const LANES: usize = 8;

/// `(Σ (x − k), Σ (x − k)²)` over a row, in independent lanes so that it vectorises.
#[inline(always)]
fn shifted_sums(row: &[f32], k: f32) -> (f32, f32) {
    let (mut s1, mut s2) = ([0f32; LANES], [0f32; LANES]);
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] - k;
            s1[l] += d;
            s2[l] += d * d;
        }
    }
    let (mut t1, mut t2) = (s1.iter().sum::<f32>(), s2.iter().sum::<f32>());
    for v in tail {
        t1 += v - k;
        t2 += (v - k) * (v - k);
    }
    (t1, t2)
}

/// The gradient that reaches the affine output: ReLU passes it where `y > 0`.
#[inline(always)]
fn through_relu(g: f32, y: f32, relu: bool) -> f32 {
    if relu && y <= 0.0 { 0.0 } else { g }
}

/// `(Σ g', Σ g'·(x − m))` over a row, `g'` the gradient through the ReLU.
#[inline(always)]
fn grad_sums(x: &[f32], y: &[f32], g: &[f32], m: f32, relu: bool) -> (f32, f32) {
    let (mut s1, mut s2) = ([0f32; LANES], [0f32; LANES]);
    let rows = x
        .chunks_exact(LANES)
        .zip(y.chunks_exact(LANES))
        .zip(g.chunks_exact(LANES));
    for ((xc, yc), gc) in rows {
        for l in 0..LANES {
            let gl = through_relu(gc[l], yc[l], relu);
            s1[l] += gl;
            s2[l] += gl * (xc[l] - m);
        }
    }
    let (mut t1, mut t2) = (s1.iter().sum::<f32>(), s2.iter().sum::<f32>());
    let full = x.len() / LANES * LANES;
    for i in full..x.len() {
        let gl = through_relu(g[i], y[i], relu);
        t1 += gl;
        t2 += gl * (x[i] - m);
    }
    (t1, t2)
}

/// Per-channel mean and biased variance, summed around each channel's first value so
/// that a large mean does not cancel the variance away.
fn channel_stats(x: &[f32], n: usize, c: usize, s: usize) -> (Vec<f32>, Vec<f32>) {
    let sums = reduce_channels::<2>(n, c, s, |ch, off, acc| {
        let (d, d2) = shifted_sums(&x[off..off + s], x[ch * s]);
        acc[0] += d as f64;
        acc[1] += d2 as f64;
    });
    let count = (n * s) as f64;
    sums.iter()
        .enumerate()
        .map(|(ch, [d, d2])| {
            let dm = d / count;
            let var = (d2 / count - dm * dm).max(0.0);
            ((x[ch * s] as f64 + dm) as f32, var as f32)
        })
        .unzip()
}

/// The op: statistics and mode are fixed when it is built, so the backward pass
/// normalises exactly as the forward did.
struct BatchNormOp {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    /// The statistics came from this batch (their gradient flows back into `x`).
    batch_stats: bool,
    relu: bool,
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "byol-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, s) = split_dims(l1.dims())?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let b = contiguous_f32(s3, l3, self.name())?;
        // y = x · scale + shift per channel.
        let scale: Vec<f32> = (0..c).map(|ch| w[ch] * self.invstd[ch]).collect();
        let shift: Vec<f32> = (0..c).map(|ch| b[ch] - self.mean[ch] * scale[ch]).collect();
        let mut y = vec![0f32; x.len()];
        let image = (c * s).max(1);
        y.par_chunks_mut(image)
            .zip(x.par_chunks(image))
            .for_each(|(yi, xi)| {
                for ch in 0..c {
                    let (a, t) = (scale[ch], shift[ch]);
                    let dst = &mut yi[ch * s..(ch + 1) * s];
                    let src = &xi[ch * s..(ch + 1) * s];
                    if self.relu {
                        dst.iter_mut()
                            .zip(src)
                            .for_each(|(d, v)| *d = (v * a + t).max(0.0));
                    } else {
                        dst.iter_mut().zip(src).for_each(|(d, v)| *d = v * a + t);
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, s) = split_dims(x.dims())?;
        let (x, weight, res, grad) = (
            x.contiguous()?,
            weight.contiguous()?,
            res.contiguous()?,
            grad.contiguous()?,
        );
        let (xg, xl) = x.storage_and_layout();
        let (wg, wl) = weight.storage_and_layout();
        let (yg, yl) = res.storage_and_layout();
        let (gg, gl) = grad.storage_and_layout();
        let xs = cpu_f32(&xg, xl, self.name())?;
        let ws = cpu_f32(&wg, wl, self.name())?;
        let ys = cpu_f32(&yg, yl, self.name())?;
        let gs = cpu_f32(&gg, gl, self.name())?;
        let relu = self.relu;
        let sums = reduce_channels::<2>(n, c, s, |ch, off, acc| {
            let r = off..off + s;
            let (sg, sgx) = grad_sums(&xs[r.clone()], &ys[r.clone()], &gs[r], self.mean[ch], relu);
            acc[0] += sg as f64;
            acc[1] += sgx as f64;
        });
        let count = (n * s) as f32;
        let gb: Vec<f32> = sums.iter().map(|a| a[0] as f32).collect();
        let gw: Vec<f32> = (0..c)
            .map(|ch| sums[ch][1] as f32 * self.invstd[ch])
            .collect();
        // dx = k1 · g + k2 · x + k3 per channel.
        let mut k = vec![[0f32; 3]; c];
        for (ch, kc) in k.iter_mut().enumerate() {
            let k1 = ws[ch] * self.invstd[ch];
            if self.batch_stats {
                let k2 = -k1 * self.invstd[ch] * gw[ch] / count;
                *kc = [k1, k2, -k1 * gb[ch] / count - k2 * self.mean[ch]];
            } else {
                *kc = [k1, 0.0, 0.0];
            }
        }
        let mut gx = vec![0f32; xs.len()];
        let image = (c * s).max(1);
        gx.par_chunks_mut(image).enumerate().for_each(|(i, gxi)| {
            for (ch, &[k1, k2, k3]) in k.iter().enumerate() {
                let r = (i * c + ch) * s..(i * c + ch + 1) * s;
                let rows = xs[r.clone()].iter().zip(&ys[r.clone()]).zip(&gs[r]);
                for (d, ((x, y), g)) in gxi[ch * s..(ch + 1) * s].iter_mut().zip(rows) {
                    *d = k1 * through_relu(*g, *y, relu) + k2 * x + k3;
                }
            }
        });
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(gx, x.shape(), device)?),
            Some(Tensor::from_vec(gw, c, device)?),
            Some(Tensor::from_vec(gb, bias.shape(), device)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_survive_a_large_mean() {
        let (n, c, s) = (4, 2, 5);
        let x: Vec<f32> = (0..n * c * s)
            .map(|i| 1.0e4 + (i % 3) as f32 * 0.5 + (i / (c * s)) as f32 * 0.25)
            .collect();
        let (mean, var) = channel_stats(&x, n, c, s);
        for ch in 0..c {
            let vals: Vec<f64> = (0..n)
                .flat_map(|i| {
                    x[(i * c + ch) * s..(i * c + ch + 1) * s]
                        .iter()
                        .map(|v| *v as f64)
                })
                .collect();
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let v = vals.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / vals.len() as f64;
            assert!((mean[ch] as f64 - m).abs() < 1e-3);
            assert!((var[ch] as f64 - v).abs() < 1e-4, "{} vs {v}", var[ch]);
        }
    }
}
