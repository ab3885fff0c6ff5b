//! Our kernels for the layers that dominate a ResNet step — convolution, BatchNorm
//! (with the ReLU that follows it fused in), the residual add + ReLU and the ImageNet
//! stem's max-pool — as candle
//! custom ops with their own backward passes, on CPU and (with the `cuda` feature) on
//! CUDA.
//!
//! candle composes BatchNorm from about ten tensor ops, each keeping a full-size
//! activation alive for the backward pass; its CPU convolution reaches a fraction of a
//! GEMM's speed, and its CUDA convolution backward is a naive kernel. Here:
//! - **CPU** (f32 NCHW): the convolution is im2col + `gemm` (the GEMM crate candle itself
//!   uses), parallel over the batch; BatchNorm is one pass for its statistics and one to
//!   normalise, forward and backward.
//! - **CUDA** (f32 or bf16 NCHW; [`cuda`]): convolutions forward, backward-data and
//!   backward-filter through cuDNN; BatchNorm and the residual add as our own kernels.
//!
//! BatchNorm is split the same way on both: [`batch_norm_stats`] (the per-channel
//! statistics, one op), then the normalisation + ReLU with those statistics, and in the
//! backward pass the two per-channel reductions, then the input gradient. The statistics
//! stay on the device. The networks pick these kernels unless `train.kernels = "candle"`.

pub mod algo_choice;
mod batch_norm;
mod conv;
#[cfg(feature = "cuda")]
mod cuda;
mod max_pool;
pub mod profile;
mod residual;

pub use batch_norm::{
    BatchNormOutput, CrossReplica, batch_norm_eval, batch_norm_stats, batch_norm_train,
    batch_norm_train_synced,
};
pub use conv::conv2d;
#[cfg(feature = "cuda")]
pub use cuda::{CUDA_EVENT_TRACKING_ENV, CUDA_FUNC_CACHE_ENV, CUDA_POOL_RELEASE_ENV, tune_device};
pub use max_pool::max_pool_3x3_s2;
pub use residual::add_relu;

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether fp32 convolutions and matrix products on CUDA may use TF32 tensor cores.
static TF32: AtomicBool = AtomicBool::new(false);

/// Allows (or forbids, the default) TF32 for fp32 convolutions (cuDNN's tensor-op math)
/// and matrix products (cuBLAS) on CUDA, process-wide. Off, fp32 is true fp32
/// (`CUDNN_FMA_MATH`). No effect on CPU or on bf16.
pub fn set_tf32(allow: bool) {
    TF32.store(allow, Ordering::Relaxed);
    #[cfg(feature = "cuda")]
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(allow);
}

/// Whether TF32 is allowed (see [`set_tf32`]).
pub fn tf32() -> bool {
    TF32.load(Ordering::Relaxed)
}

use candle_core::{CpuStorage, Layout, Result, Storage, bail};

/// The f32 values of a CPU storage under a contiguous layout.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: expected f32 data")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: expected a contiguous tensor"),
    }
}

/// The f32 values of a contiguous CPU tensor's storage (from `storage_and_layout`).
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => contiguous_f32(cpu, layout, op),
        _ => bail!("{op}: expected a CPU tensor"),
    }
}

/// A matrix inside a slice: `rows × cols`, element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix.
    fn rows(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = a · b` (or `dst += a · b` when `accumulate`), `dst` row-major with row
/// stride `dst_rs`; one thread (callers parallelise over images).
fn matmul(dst: &mut [f32], dst_rs: usize, accumulate: bool, a: MatRef, b: MatRef) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner dimensions differ");
    assert!(a.fits() && b.fits(), "matmul: operand out of bounds");
    assert!(
        m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len(),
        "matmul: destination out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above keep every element `gemm` reads or writes inside the
    // three slices; `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Splits `0..n` into at most `parts` contiguous ranges of near-equal length.
fn split_ranges(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    (0..parts)
        .map(|i| (i * n / parts)..((i + 1) * n / parts))
        .filter(|r| !r.is_empty())
        .collect()
}

/// Cuts `data` into consecutive mutable pieces of `lens` elements each.
fn split_lens(mut data: &mut [f32], lens: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    let mut out = Vec::new();
    for len in lens {
        let (head, tail) = std::mem::take(&mut data).split_at_mut(len);
        out.push(head);
        data = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_naive_for_strided_operands() {
        let a: Vec<f32> = (0..12).map(|v| v as f32 * 0.5 - 2.0).collect(); // 3x4
        let b: Vec<f32> = (0..20).map(|v| (v % 7) as f32 - 3.0).collect(); // 4x5
        let mut dst = vec![1.0f32; 3 * 6];
        matmul(
            &mut dst,
            6,
            true,
            MatRef::rows(&a, 3, 4, 4),
            MatRef::rows(&b, 4, 5, 5),
        );
        for i in 0..3 {
            for j in 0..5 {
                let want: f32 = 1.0 + (0..4).map(|k| a[i * 4 + k] * b[k * 5 + j]).sum::<f32>();
                assert!((dst[i * 6 + j] - want).abs() < 1e-4, "({i},{j})");
            }
            assert_eq!(dst[i * 6 + 5], 1.0, "padding column untouched");
        }
        // aᵀ (4x3) · a (3x4)
        let mut gram = vec![0.0f32; 16];
        let at = MatRef::rows(&a, 3, 4, 4).t();
        matmul(&mut gram, 4, false, at, MatRef::rows(&a, 3, 4, 4));
        for i in 0..4 {
            for j in 0..4 {
                let want: f32 = (0..3).map(|k| a[k * 4 + i] * a[k * 4 + j]).sum();
                assert!((gram[i * 4 + j] - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn ranges_cover_everything_once() {
        for n in [0, 1, 2, 7, 256] {
            for parts in [1, 2, 3, 16] {
                let r = split_ranges(n, parts);
                assert_eq!(r.iter().map(|r| r.len()).sum::<usize>(), n);
                assert!(r.windows(2).all(|w| w[0].end == w[1].start));
            }
        }
    }
}
