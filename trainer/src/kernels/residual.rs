//! The end of a residual block, `max(a + b, 0)`, as one op: one pass forward, and one
//! masked copy of the gradient (shared by both inputs) backward. CPU (f32) and CUDA
//! (f32 or bf16).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{contiguous_f32, cpu_f32};

/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

/// `relu(a + b)` for two tensors of the same shape; differentiable in both.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        bail!("add_relu: shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    a.contiguous()?
        .apply_op2_arc(&b.contiguous()?, std::sync::Arc::new(Box::new(AddRelu)))
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "byol-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::profile::timed("add_relu forward", &candle_core::Device::Cpu, || {
            let a = contiguous_f32(s1, l1, self.name())?;
            let b = contiguous_f32(s2, l2, self.name())?;
            let mut y = vec![0f32; a.len()];
            y.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|(y, (a, b))| {
                    for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
                        *y = (a + b).max(0.0);
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
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::profile::timed("add_relu forward", &super::cuda::device(s1), || {
            Ok((
                super::cuda::add_relu((s1, l1), (s2, l2))?,
                l1.shape().clone(),
            ))
        })
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        super::profile::timed("add_relu backward", &res.device().clone(), || {
            let (res, grad) = (res.contiguous()?, grad.contiguous()?);
            #[cfg(feature = "cuda")]
            if res.device().is_cuda() {
                let out = super::cuda::relu_grad(&res, &grad)?;
                return Ok((Some(out.clone()), Some(out)));
            }
            let (yg, yl) = res.storage_and_layout();
            let (gg, gl) = grad.storage_and_layout();
            let y = cpu_f32(&yg, yl, self.name())?;
            let g = cpu_f32(&gg, gl, self.name())?;
            let mut out = vec![0f32; y.len()];
            out.par_chunks_mut(CHUNK)
                .zip(y.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                .for_each(|(o, (y, g))| {
                    for ((o, y), g) in o.iter_mut().zip(y).zip(g) {
                        *o = if *y > 0.0 { *g } else { 0.0 };
                    }
                });
            let out = Tensor::from_vec(out, res.shape(), res.device())?;
            Ok((Some(out.clone()), Some(out)))
        })
    }
}
