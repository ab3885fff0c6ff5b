//! BatchNorm over the channel axis of `(n, c, ...)` tensors — 2-D feature maps and
//! 1-D features alike — with batch statistics (training) or given ones (eval), and an
//! optional fused ReLU. Split in ops that each run on CPU (f32) and CUDA (f32 or bf16):
//! the per-channel statistics ([`batch_norm_stats`]), then the normalisation; backward,
//! the two per-channel sums, then the input gradient. The statistics are a `(2, c)` f32
//! tensor on the activations' device (means, then biased variances): nothing is read
//! back to the host.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{contiguous_f32, cpu_f32};

/// What a training-mode BatchNorm produced.
pub struct BatchNormOutput {
    /// The normalised (and rectified, if asked) output, in the input's dtype.
    pub y: Tensor,
    /// `(2, c)` f32: per-channel batch mean (row 0) and biased batch variance (row 1),
    /// what the output was normalised with.
    pub stats: Tensor,
    /// Values per channel the statistics were taken over (`n · h · w`).
    pub count: usize,
}

/// Per-channel mean and biased variance of `x (n, c, …)` (f32 on CPU; f32 or bf16 on
/// CUDA) as a `(2, c)` f32 tensor on `x`'s device: row 0 the means, row 1 the variances
/// (`Σ (x − mean)² / (n · h · w)`). Not differentiable: [`batch_norm_train`] carries the
/// statistics' gradient itself.
pub fn batch_norm_stats(x: &Tensor) -> Result<Tensor> {
    split_dims(x.dims())?;
    x.detach().contiguous()?.apply_op1_no_bwd(&BatchNormStats)
}

/// The reductions synced BatchNorm needs across the processes of data-parallel training
/// (PyTorch's `SyncBatchNorm`): implemented by the process group
/// ([`crate::dist::ProcessGroup`]).
pub trait CrossReplica: Send + Sync + std::fmt::Debug {
    /// Rank 0's `values`, on every process.
    fn broadcast(&self, values: &mut [f32]);
    /// Element-wise sum over the processes, in place.
    fn sum(&self, values: &mut [f64]);
    /// Number of processes.
    fn world(&self) -> usize;
}

/// BatchNorm with the batch's statistics: `y = (x − mean) / √(var + eps) · weight + bias`,
/// then `max(y, 0)` when `relu`. Differentiable in `x`, `weight` and `bias`, the
/// statistics included (as PyTorch's training mode). `x` is f32 (or bf16 on CUDA);
/// `weight` and `bias` are f32 `(c)`; `y` has `x`'s dtype.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<BatchNormOutput> {
    train(x, weight, bias, eps, relu, None)
}

/// [`batch_norm_train`] with the statistics of the whole data-parallel batch (Ioffe &
/// Szegedy's BatchNorm over the global batch; BYOL's cross-replica BatchNorm): forward,
/// the processes' statistics are combined; backward, the two per-channel sums of the
/// input gradient are summed over the processes, while the weight and bias gradients
/// stay local (the step averages them with every other gradient). `count` in the output
/// is the whole batch's. On CUDA the per-channel vectors (2·c values per pass) go
/// through the host to be reduced.
pub fn batch_norm_train_synced(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
    group: &'static dyn CrossReplica,
) -> Result<BatchNormOutput> {
    train(x, weight, bias, eps, relu, Some(group))
}

fn train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
    sync: Option<&'static dyn CrossReplica>,
) -> Result<BatchNormOutput> {
    let x = x.contiguous()?;
    let (n, _, s) = split_dims(x.dims())?;
    let (stats, count) = match sync {
        Some(g) if x.device().is_cuda() => combined_stats(&x, g)?,
        Some(g) => synced_stats(&x, g)?,
        None => (batch_norm_stats(&x)?, n * s),
    };
    let op = BatchNormOp {
        stats: stats.clone(),
        eps,
        batch_stats: true,
        relu,
        sync,
        count,
    };
    let y = apply(&x, weight, bias, op)?;
    Ok(BatchNormOutput { y, stats, count })
}

/// BatchNorm with given (running) statistics `mean (c)` and `var (c)`, as in eval mode;
/// then ReLU when `relu`.
pub fn batch_norm_eval(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let stats = Tensor::stack(&[mean.to_dtype(DType::F32)?, var.to_dtype(DType::F32)?], 0)?;
    let (n, _, s) = split_dims(x.dims())?;
    let op = BatchNormOp {
        stats,
        eps,
        batch_stats: false,
        relu,
        sync: None,
        count: n * s,
    };
    apply(&x.contiguous()?, weight, bias, op)
}

fn inv_std(var: f32, eps: f64) -> f32 {
    (1.0 / (var as f64 + eps).sqrt()) as f32
}

fn apply(x: &Tensor, weight: &Tensor, bias: &Tensor, op: BatchNormOp) -> Result<Tensor> {
    let (_, c, _) = split_dims(x.dims())?;
    if weight.dims() != [c] || bias.dims() != [c] || op.stats.dims() != [2, c] {
        bail!(
            "batch_norm: {c} channels, but weight {:?}, bias {:?}, statistics {:?}",
            weight.dims(),
            bias.dims(),
            op.stats.dims()
        )
    }
    x.apply_op3_arc(
        &weight.contiguous()?,
        &bias.contiguous()?,
        std::sync::Arc::new(Box::new(op)),
    )
}

/// The whole data-parallel batch's `(2, c)` statistics and count, computed as one process
/// computes them from the same values: per image and channel, the shifted sums
/// `Σ (x − k)`, `Σ (x − k)²` with rank 0's shift `k` (the first image's first value, what
/// one process with the whole batch shifts by), summed in f64 over images and then over
/// the processes. So N processes normalise with the statistics one process would, to
/// f64 rounding (Welford/Chan's shifted-data formula; see `channel_stats`). CPU only.
fn synced_stats(x: &Tensor, group: &'static dyn CrossReplica) -> Result<(Tensor, usize)> {
    let (n, c, s) = split_dims(x.dims())?;
    let (guard, layout) = x.storage_and_layout();
    let xs = cpu_f32(&guard, layout, "batch_norm synced statistics")?;
    let mut shift: Vec<f32> = (0..c)
        .map(|ch| xs.get(ch * s).copied().unwrap_or(0.0))
        .collect();
    group.broadcast(&mut shift);
    let sums = reduce_channels::<2>(n, c, s, |ch, off, acc| {
        let (d, d2) = shifted_sums(&xs[off..off + s], shift[ch]);
        acc[0] += d as f64;
        acc[1] += d2 as f64;
    });
    let mut all: Vec<f64> = sums.iter().flat_map(|a| [a[0], a[1]]).collect();
    all.push((n * s) as f64);
    group.sum(&mut all);
    let count = all[2 * c];
    let mut stats = vec![0f32; 2 * c];
    for ch in 0..c {
        let dm = all[2 * ch] / count;
        stats[ch] = (shift[ch] as f64 + dm) as f32;
        stats[c + ch] = (all[2 * ch + 1] / count - dm * dm).max(0.0) as f32;
    }
    Ok((Tensor::from_vec(stats, (2, c), x.device())?, count as usize))
}

/// The whole data-parallel batch's `(2, c)` statistics and count from each process's
/// own (the CUDA path, where the activations stay on the device): with `k` rank 0's
/// means, each process adds `n_r·(m_r − k)` and `n_r·(v_r + (m_r − k)²)` in f64, so
/// `mean = k + S1/N`, `var = S2/N − (S1/N)²` (Chan et al.'s pairwise combination,
/// shifted). 2·c + 1 values per layer go through the host.
fn combined_stats(x: &Tensor, group: &'static dyn CrossReplica) -> Result<(Tensor, usize)> {
    let (n, c, s) = split_dims(x.dims())?;
    let local = crate::host::vec2::<f32>(&batch_norm_stats(x)?)?;
    let mut shift = local[0].clone();
    group.broadcast(&mut shift);
    let count = (n * s) as f64;
    let mut all = vec![0f64; 2 * c + 1];
    for ch in 0..c {
        let dm = f64::from(local[0][ch]) - f64::from(shift[ch]);
        all[ch] = count * dm;
        all[c + ch] = count * (f64::from(local[1][ch]) + dm * dm);
    }
    all[2 * c] = count;
    group.sum(&mut all);
    let total = all[2 * c];
    let mut stats = vec![0f32; 2 * c];
    for ch in 0..c {
        let dm = all[ch] / total;
        stats[ch] = (f64::from(shift[ch]) + dm) as f32;
        stats[c + ch] = (all[c + ch] / total - dm * dm).max(0.0) as f32;
    }
    Ok((Tensor::from_vec(stats, (2, c), x.device())?, total as usize))
}

/// The statistics op (see [`batch_norm_stats`]).
struct BatchNormStats;

impl CustomOp1 for BatchNormStats {
    fn name(&self) -> &'static str {
        "byol-batch-norm-stats"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        super::profile::timed("batch_norm statistics", &candle_core::Device::Cpu, || {
            let (n, c, s) = split_dims(layout.dims())?;
            let x = contiguous_f32(storage, layout, self.name())?;
            let (mut mean, var) = channel_stats(x, n, c, s);
            mean.extend(var);
            Ok((CpuStorage::F32(mean), (2, c).into()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::profile::timed(
            "batch_norm statistics",
            &super::cuda::device(storage),
            || {
                let (_, c, _) = split_dims(layout.dims())?;
                let stats = super::cuda::batch_norm_stats(storage, layout)?;
                Ok((stats, (2, c).into()))
            },
        )
    }
}

/// Host copies of a `(2, c)` CPU statistics tensor: the means and `1 / √(var + eps)`.
fn host_stats(stats: &Tensor, eps: f64) -> Result<(Vec<f32>, Vec<f32>)> {
    let (guard, layout) = stats.storage_and_layout();
    let v = cpu_f32(&guard, layout, "batch_norm")?;
    let c = v.len() / 2;
    let invstd = v[c..].iter().map(|var| inv_std(*var, eps)).collect();
    Ok((v[..c].to_vec(), invstd))
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
    /// `(2, c)` f32 on the input's device: means and biased variances.
    stats: Tensor,
    eps: f64,
    /// The statistics came from this batch (their gradient flows back into `x`).
    batch_stats: bool,
    relu: bool,
    /// Synced across processes: backward sums the input gradient's per-channel sums
    /// over them.
    sync: Option<&'static dyn CrossReplica>,
    /// Values per channel the statistics were taken over (all processes' when synced).
    count: usize,
}

impl BatchNormOp {
    /// The CUDA backward: the two per-channel sums, then the input gradient, on the
    /// device.
    #[cfg(feature = "cuda")]
    fn cuda_bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use super::cuda;
        let sums = cuda::batch_norm_grad_sums(x, y, grad, &self.stats, self.relu)?;
        let invstd = (self.stats.get(1)? + self.eps)?.sqrt()?.recip()?;
        let gb = sums.get(0)?;
        let gw = (sums.get(1)? * invstd)?;
        // Synced: the input gradient needs every process's sums; the kernel divides by
        // this process's count, so they are scaled by local / global count first.
        let sums_for_input = match self.sync {
            Some(group) => {
                let (n, c, s) = split_dims(x.dims())?;
                let rows = crate::host::vec2::<f32>(&sums)?;
                let mut all: Vec<f64> = rows.iter().flatten().map(|&v| f64::from(v)).collect();
                group.sum(&mut all);
                let scale = (n * s) as f64 / self.count as f64;
                let scaled: Vec<f32> = all.iter().map(|v| (v * scale) as f32).collect();
                Tensor::from_vec(scaled, (2, c), x.device())?
            }
            None => sums.clone(),
        };
        let gx = cuda::batch_norm_grad_input(
            x,
            y,
            grad,
            weight,
            &self.stats,
            &sums_for_input,
            self.eps,
            self.relu,
            self.batch_stats,
        )?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
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
        super::profile::timed("batch_norm normalise", &candle_core::Device::Cpu, || {
            let (_, c, s) = split_dims(l1.dims())?;
            let x = contiguous_f32(s1, l1, self.name())?;
            let w = contiguous_f32(s2, l2, self.name())?;
            let b = contiguous_f32(s3, l3, self.name())?;
            let (mean, invstd) = host_stats(&self.stats, self.eps)?;
            // y = x · scale + shift per channel.
            let scale: Vec<f32> = (0..c).map(|ch| w[ch] * invstd[ch]).collect();
            let shift: Vec<f32> = (0..c).map(|ch| b[ch] - mean[ch] * scale[ch]).collect();
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
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::profile::timed("batch_norm normalise", &super::cuda::device(s1), || {
            let (guard, ls) = self.stats.storage_and_layout();
            let candle_core::Storage::Cuda(stats) = &*guard else {
                bail!("batch_norm: the statistics are not on the CUDA device")
            };
            let y = super::cuda::batch_norm_apply(
                (s1, l1),
                (s2, l2),
                (s3, l3),
                (stats, ls),
                self.eps,
                self.relu,
            )?;
            Ok((y, l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        super::profile::timed("batch_norm backward", &x.device().clone(), || {
            let (n, c, s) = split_dims(x.dims())?;
            let (x, weight, res, grad) = (
                x.contiguous()?,
                weight.contiguous()?,
                res.contiguous()?,
                grad.contiguous()?,
            );
            #[cfg(feature = "cuda")]
            if x.device().is_cuda() {
                return self.cuda_bwd(&x, &weight, &res, &grad);
            }
            let (mean, invstd) = host_stats(&self.stats, self.eps)?;
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
                let (sg, sgx) = grad_sums(&xs[r.clone()], &ys[r.clone()], &gs[r], mean[ch], relu);
                acc[0] += sg as f64;
                acc[1] += sgx as f64;
            });
            let gb: Vec<f32> = sums.iter().map(|a| a[0] as f32).collect();
            let gw: Vec<f32> = (0..c).map(|ch| sums[ch][1] as f32 * invstd[ch]).collect();
            // The input gradient needs the sums over the whole batch: every process's.
            let (gb_all, gw_all) = match self.sync {
                Some(group) => {
                    let mut all: Vec<f64> = sums.iter().flat_map(|a| [a[0], a[1]]).collect();
                    group.sum(&mut all);
                    let gb: Vec<f32> = all.iter().step_by(2).map(|&v| v as f32).collect();
                    let gw = (0..c)
                        .map(|ch| all[2 * ch + 1] as f32 * invstd[ch])
                        .collect();
                    (gb, gw)
                }
                None => (gb.clone(), gw.clone()),
            };
            debug_assert!(self.sync.is_some() || self.count == n * s);
            let count = self.count as f32;
            // dx = k1 · g + k2 · x + k3 per channel.
            let mut k = vec![[0f32; 3]; c];
            for (ch, kc) in k.iter_mut().enumerate() {
                let k1 = ws[ch] * invstd[ch];
                if self.batch_stats {
                    let k2 = -k1 * invstd[ch] * gw_all[ch] / count;
                    *kc = [k1, k2, -k1 * gb_all[ch] / count - k2 * mean[ch]];
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two ways of combining statistics over processes (exact shifted sums on CPU,
    /// shifted per-process moments on CUDA) agree with one process's statistics, here in
    /// a world of one, on values with a large mean.
    #[test]
    fn synced_statistics_equal_one_process_statistics() {
        let (n, c, s) = (6, 3, 10);
        let x: Vec<f32> = (0..n * c * s)
            .map(|i| 500.0 + ((i * 37 % 101) as f32) * 0.25 - (i / (c * s)) as f32)
            .collect();
        let x = Tensor::from_vec(x, (n, c, s), &candle_core::Device::Cpu).unwrap();
        let group = crate::dist::group() as &'static dyn CrossReplica;
        let one = batch_norm_stats(&x).unwrap().to_vec2::<f32>().unwrap();
        for (what, (stats, count)) in [
            ("shifted sums", synced_stats(&x, group).unwrap()),
            ("combined moments", combined_stats(&x, group).unwrap()),
        ] {
            assert_eq!(count, n * s, "{what}");
            let got = stats.to_vec2::<f32>().unwrap();
            for (row, want) in got.iter().zip(&one) {
                for (a, b) in row.iter().zip(want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "{what}: {a} vs {b}"
                    );
                }
            }
        }
    }

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
