//! The ImageNet stem's max-pool (3×3 window, stride 2, padding 1; torchvision's
//! `nn.MaxPool2d(3, 2, 1)`) as one op: one pass forward; backward, one pass that gives
//! each input the gradients of the outputs whose window maximum it is. Nothing is kept
//! between the two (the window maxima are found again from the input). CPU (f32) and
//! CUDA (f32 or bf16).
//!
//! Padding takes no part (PyTorch pads with −∞); a window's gradient goes to its first
//! maximum in row-major order, as PyTorch's kernels do. Each input gathers from the at
//! most 2 × 2 outputs whose windows hold it, so the backward needs no atomics and is
//! deterministic.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{contiguous_f32, cpu_f32};

/// `(n, c, h, w)` → `(n, c, ⌊(h − 1)/2⌋ + 1, ⌊(w − 1)/2⌋ + 1)`: the maximum of each 3×3
/// window at stride 2 with one pixel of padding; differentiable.
///
/// Errors: `x` is not 4-dimensional, or not f32 (CPU) / f32 or bf16 (CUDA).
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    if x.rank() != 4 {
        bail!("max_pool_3x3_s2: expected (n, c, h, w), got {:?}", x.dims())
    }
    x.contiguous()?
        .apply_op1_arc(std::sync::Arc::new(Box::new(MaxPool)))
}

/// Output side of the pool over `side` input pixels.
pub(crate) fn pooled(side: usize) -> usize {
    (side.max(1) - 1) / 2 + 1
}

/// Index (in the `h × w` plane) of the first maximum of output `(oy, ox)`'s window.
#[inline]
fn argmax(plane: &[f32], h: usize, w: usize, oy: usize, ox: usize) -> usize {
    let (y0, x0) = ((2 * oy).saturating_sub(1), (2 * ox).saturating_sub(1));
    let (y1, x1) = ((2 * oy + 2).min(h), (2 * ox + 2).min(w));
    let mut best = y0 * w + x0;
    let mut max = plane[best];
    for iy in y0..y1 {
        for ix in x0..x1 {
            let v = plane[iy * w + ix];
            // PyTorch's rule: the first maximum wins, and a NaN is taken.
            if v > max || v.is_nan() {
                max = v;
                best = iy * w + ix;
            }
        }
    }
    best
}

struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "byol-max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        super::profile::timed("max_pool forward", &candle_core::Device::Cpu, || {
            let x = contiguous_f32(s, l, self.name())?;
            let (n, c, h, w) = l.shape().dims4()?;
            let (ho, wo) = (pooled(h), pooled(w));
            let mut y = vec![0f32; n * c * ho * wo];
            if h * w > 0 {
                y.par_chunks_mut(ho * wo)
                    .zip(x.par_chunks(h * w))
                    .for_each(|(y, plane)| {
                        for oy in 0..ho {
                            for ox in 0..wo {
                                y[oy * wo + ox] = plane[argmax(plane, h, w, oy, ox)];
                            }
                        }
                    });
            }
            Ok((CpuStorage::F32(y), Shape::from((n, c, ho, wo))))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::profile::timed("max_pool forward", &super::cuda::device(s), || {
            let (n, c, h, w) = l.shape().dims4()?;
            Ok((
                super::cuda::max_pool_forward((s, l), (pooled(h), pooled(w)))?,
                Shape::from((n, c, pooled(h), pooled(w))),
            ))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        super::profile::timed("max_pool backward", &arg.device().clone(), || {
            let (x, grad) = (arg.contiguous()?, grad.contiguous()?);
            #[cfg(feature = "cuda")]
            if x.device().is_cuda() {
                return Ok(Some(super::cuda::max_pool_backward(&x, &grad)?));
            }
            let (n, c, h, w) = x.dims4()?;
            let (ho, wo) = (pooled(h), pooled(w));
            let (xs, xl) = x.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            let xv = cpu_f32(&xs, xl, self.name())?;
            let gv = cpu_f32(&gs, gl, self.name())?;
            let mut dx = vec![0f32; n * c * h * w];
            if h * w > 0 {
                dx.par_chunks_mut(h * w)
                    .zip(xv.par_chunks(h * w).zip(gv.par_chunks(ho * wo)))
                    .for_each(|(dx, (plane, g))| {
                        for oy in 0..ho {
                            for ox in 0..wo {
                                dx[argmax(plane, h, w, oy, ox)] += g[oy * wo + ox];
                            }
                        }
                    });
            }
            Ok(Some(Tensor::from_vec(dx, (n, c, h, w), x.device())?))
        })
    }
}
