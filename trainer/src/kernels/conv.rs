//! 2-D convolution without bias, NCHW. On CPU (f32): im2col + GEMM forward; the
//! backward gives the weight gradient (`G · colᵀ`) and the input gradient (`Wᵀ · G`,
//! then col2im). Work is split into one contiguous range of images per thread; small
//! feature maps are grouped so that every GEMM has a few hundred columns. On CUDA (f32
//! or bf16): cuDNN's forward, backward-data and backward-filter (`super::cuda::conv`).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{MatRef, contiguous_f32, cpu_f32, matmul, split_lens, split_ranges};

/// GEMMs get at least this many columns (output positions), grouping images when a
/// feature map is smaller.
const MIN_COLUMNS: usize = 256;

/// `conv2d(x, w)` with square stride and zero padding: `x (n, c, h, w)`,
/// `w (co, c, kh, kw)` → `(n, co, ho, wo)`. Differentiable in both arguments.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    Geometry::new(x.dims(), weight.dims(), stride, padding)?;
    x.apply_op2_arc(
        &weight,
        std::sync::Arc::new(Box::new(Conv2dOp { stride, padding })),
    )
}

/// The custom op: its parameters; shapes come from the tensors.
struct Conv2dOp {
    stride: usize,
    padding: usize,
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    co: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[n, c, h, wd], &[co, ci, kh, kw]) = (x, w) else {
            bail!("conv2d: expected 4-D input and weight, got {x:?} and {w:?}")
        };
        if ci != c {
            bail!("conv2d: input has {c} channels, the weight expects {ci}")
        }
        if stride == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
            bail!("conv2d: kernel {kh}x{kw} (stride {stride}, padding {pad}) does not fit {h}x{wd}")
        }
        Ok(Geometry {
            n,
            c,
            h,
            w: wd,
            co,
            kh,
            kw,
            stride,
            pad,
            ho: (h + 2 * pad - kh) / stride + 1,
            wo: (wd + 2 * pad - kw) / stride + 1,
        })
    }

    /// The same sizes for the cuDNN convolutions.
    #[cfg(feature = "cuda")]
    fn cuda_shape(&self) -> super::cuda::conv::ConvShape {
        super::cuda::conv::ConvShape {
            n: self.n,
            c: self.c,
            h: self.h,
            w: self.w,
            co: self.co,
            kh: self.kh,
            kw: self.kw,
            stride: self.stride,
            pad: self.pad,
        }
    }

    /// Rows of the im2col matrix (= GEMM depth).
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output positions per image.
    fn p(&self) -> usize {
        self.ho * self.wo
    }

    fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }

    fn out_len(&self) -> usize {
        self.co * self.p()
    }

    /// A 1×1 stride-1 unpadded convolution: the image itself is the im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// For a stride-1 convolution the input gradient is itself a convolution: of the
    /// output gradient, with the kernel flipped and transposed and padding
    /// `k − 1 − pad`. Its geometry when that holds; computed that way it needs no
    /// col2im scatter and its GEMM is as deep as the forward's. Pointwise convolutions
    /// need no im2col to begin with.
    fn input_grad_as_conv(&self) -> Option<Geometry> {
        let square = self.kh == self.kw;
        if self.stride != 1 || self.pointwise() || !square || self.pad >= self.kh {
            return None;
        }
        Some(Geometry {
            c: self.co,
            h: self.ho,
            w: self.wo,
            co: self.c,
            pad: self.kh - 1 - self.pad,
            ho: self.h,
            wo: self.w,
            ..*self
        })
    }

    /// The kernel for [`Geometry::input_grad_as_conv`]: `w'[c][o][i][j] =
    /// w[o][c][kh−1−i][kw−1−j]`.
    fn flipped_kernel(&self, w: &[f32]) -> Vec<f32> {
        let (kh, kw) = (self.kh, self.kw);
        let mut out = vec![0f32; w.len()];
        for o in 0..self.co {
            for c in 0..self.c {
                for i in 0..kh {
                    for j in 0..kw {
                        out[((c * self.co + o) * kh + i) * kw + j] =
                            w[((o * self.c + c) * kh + (kh - 1 - i)) * kw + (kw - 1 - j)];
                    }
                }
            }
        }
        out
    }

    /// Images per GEMM.
    fn group(&self) -> usize {
        MIN_COLUMNS.div_ceil(self.p()).clamp(1, self.n.max(1))
    }

    /// The output columns `lo..hi` whose input column `ow * stride + kj - pad` lies
    /// inside the image.
    fn valid_columns(&self, kj: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kj).div_ceil(self.stride);
        let hi = if self.w + self.pad > kj {
            ((self.w + self.pad - kj - 1) / self.stride + 1).min(self.wo)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    /// The input row of output row `oh` for kernel row `ki`, if inside the image.
    fn input_row(&self, oh: usize, ki: usize) -> Option<usize> {
        (oh * self.stride + ki)
            .checked_sub(self.pad)
            .filter(|&ih| ih < self.h)
    }

    /// Writes the im2col matrix of one image: row `(c, ki, kj)` holds, for every
    /// output position, the input value under that kernel tap (0 in the padding).
    /// Rows start `ld` apart in `col`.
    fn im2col(&self, img: &[f32], col: &mut [f32], ld: usize) {
        if self.stride == 1 && self.ho == self.h && self.wo == self.w {
            return self.im2col_same(img, col, ld);
        }
        let (p, wo, s) = (self.p(), self.wo, self.stride);
        let mut r = 0;
        for plane in img.chunks_exact(self.h * self.w) {
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let row = &mut col[r * ld..r * ld + p];
                    let (lo, hi) = self.valid_columns(kj);
                    for (oh, dst) in row.chunks_exact_mut(wo).enumerate() {
                        let Some(ih) = self.input_row(oh, ki) else {
                            dst.fill(0.0);
                            continue;
                        };
                        let src = &plane[ih * self.w..(ih + 1) * self.w];
                        dst[..lo].fill(0.0);
                        dst[hi..].fill(0.0);
                        let first = lo * s + kj - self.pad;
                        if s == 1 {
                            dst[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                        } else {
                            for (d, v) in dst[lo..hi].iter_mut().zip(src[first..].iter().step_by(s))
                            {
                                *d = *v;
                            }
                        }
                    }
                    r += 1;
                }
            }
        }
    }

    /// [`Geometry::im2col`] for stride-1 "same" convolutions: each row is the whole
    /// plane shifted by the tap's offset, so it is one long copy, then zeros for the
    /// rows and columns that fell outside (a few short fills instead of a copy per
    /// output row).
    fn im2col_same(&self, img: &[f32], col: &mut [f32], ld: usize) {
        let (h, w) = (self.h as isize, self.w as isize);
        let hw = self.h * self.w;
        let mut r = 0;
        for plane in img.chunks_exact(hw) {
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let row = &mut col[r * ld..r * ld + hw];
                    r += 1;
                    let (dy, dx) = (
                        ki as isize - self.pad as isize,
                        kj as isize - self.pad as isize,
                    );
                    // Output rows whose input row `oh + dy` is inside the plane.
                    let (oh_lo, oh_hi) = ((-dy).max(0), (h - dy).min(h));
                    if oh_lo >= oh_hi || dx.abs() >= w {
                        row.fill(0.0);
                        continue;
                    }
                    let (oh_lo, oh_hi, wu) = (oh_lo as usize, oh_hi as usize, self.w);
                    row[..oh_lo * wu].fill(0.0);
                    row[oh_hi * wu..].fill(0.0);
                    let t_lo = oh_lo * wu + (-dx).max(0) as usize;
                    let t_hi = oh_hi * wu - dx.max(0) as usize;
                    let s_lo = (t_lo as isize + dy * w + dx) as usize;
                    row[t_lo..t_hi].copy_from_slice(&plane[s_lo..s_lo + (t_hi - t_lo)]);
                    // Columns whose input column `ow + dx` is outside (the flat copy
                    // wrapped them in from the neighbouring row).
                    let edge = dx.unsigned_abs();
                    for line in row[oh_lo * wu..oh_hi * wu].chunks_exact_mut(wu) {
                        if dx > 0 {
                            line[wu - edge..].fill(0.0);
                        } else {
                            line[..edge].fill(0.0);
                        }
                    }
                }
            }
        }
    }

    /// Adds an im2col-shaped gradient back onto the image it came from.
    fn col2im(&self, col: &[f32], ld: usize, img: &mut [f32]) {
        let (p, wo, s) = (self.p(), self.wo, self.stride);
        let mut r = 0;
        for plane in img.chunks_exact_mut(self.h * self.w) {
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let row = &col[r * ld..r * ld + p];
                    let (lo, hi) = self.valid_columns(kj);
                    for (oh, src) in row.chunks_exact(wo).enumerate() {
                        let Some(ih) = self.input_row(oh, ki) else {
                            continue;
                        };
                        let dst = &mut plane[ih * self.w..(ih + 1) * self.w];
                        let first = lo * s + kj - self.pad;
                        if s == 1 {
                            for (d, v) in dst[first..first + hi - lo].iter_mut().zip(&src[lo..hi]) {
                                *d += *v;
                            }
                        } else {
                            for (d, v) in dst[first..].iter_mut().step_by(s).zip(&src[lo..hi]) {
                                *d += *v;
                            }
                        }
                    }
                    r += 1;
                }
            }
        }
    }

    /// Fills `col` (`k × group·p`) with the im2col matrices of `images` side by side.
    fn im2col_group(&self, x: &[f32], images: std::ops::Range<usize>, col: &mut [f32]) {
        let ld = images.len() * self.p();
        for (j, i) in images.enumerate() {
            let img = &x[i * self.image_len()..(i + 1) * self.image_len()];
            self.im2col(img, &mut col[j * self.p()..], ld);
        }
    }

    /// Forward for the images of `range`, written to `out` (their outputs only).
    fn forward_range(&self, x: &[f32], w: &[f32], range: std::ops::Range<usize>, out: &mut [f32]) {
        let (k, p, co) = (self.k(), self.p(), self.co);
        let group = self.group();
        let weight = MatRef::rows(w, co, k, k);
        let mut col = vec![
            0f32;
            if self.pointwise() && group == 1 {
                0
            } else {
                k * group * p
            }
        ];
        let mut tmp = vec![0f32; if group > 1 { co * group * p } else { 0 }];
        let mut start = range.start;
        while start < range.end {
            let images = start..(start + group).min(range.end);
            let ld = images.len() * p;
            let local = (images.start - range.start) * self.out_len();
            let rhs = if self.pointwise() && images.len() == 1 {
                MatRef::rows(&x[start * self.image_len()..][..k * p], k, p, p)
            } else {
                self.im2col_group(x, images.clone(), &mut col);
                MatRef::rows(&col, k, ld, ld)
            };
            if images.len() == 1 {
                matmul(&mut out[local..local + co * p], p, false, weight, rhs);
            } else {
                matmul(&mut tmp, ld, false, weight, rhs);
                for j in 0..images.len() {
                    let dst = &mut out[local + j * co * p..][..co * p];
                    for (c, row) in dst.chunks_exact_mut(p).enumerate() {
                        row.copy_from_slice(&tmp[c * ld + j * p..][..p]);
                    }
                }
            }
            start = images.end;
        }
    }

    /// Backward for the images of `range`: adds their weight gradient to `gw` and
    /// writes their input gradient to `gx` (when asked for).
    fn backward_range(
        &self,
        x: &[f32],
        w: &[f32],
        g: &[f32],
        range: std::ops::Range<usize>,
        gw: &mut [f32],
        mut gx: Option<&mut [f32]>,
    ) {
        let (k, p, co) = (self.k(), self.p(), self.co);
        let group = self.group();
        let weight_t = MatRef::rows(w, co, k, k).t();
        let mut col = vec![0f32; k * group * p];
        let mut tmp = vec![0f32; if group > 1 { co * group * p } else { 0 }];
        let mut start = range.start;
        while start < range.end {
            let images = start..(start + group).min(range.end);
            let ld = images.len() * p;
            let grads = if images.len() == 1 {
                MatRef::rows(&g[start * self.out_len()..][..co * p], co, p, p)
            } else {
                for (j, i) in images.clone().enumerate() {
                    let src = &g[i * self.out_len()..][..co * p];
                    for (c, row) in src.chunks_exact(p).enumerate() {
                        tmp[c * ld + j * p..][..p].copy_from_slice(row);
                    }
                }
                MatRef::rows(&tmp, co, ld, ld)
            };
            // Weight gradient: G · colᵀ.
            if self.pointwise() && images.len() == 1 {
                let img = MatRef::rows(&x[start * self.image_len()..][..k * p], k, p, p);
                matmul(gw, k, true, grads, img.t());
            } else {
                self.im2col_group(x, images.clone(), &mut col);
                matmul(gw, k, true, grads, MatRef::rows(&col, k, ld, ld).t());
            }
            // Input gradient: Wᵀ · G, folded back onto the images.
            if let Some(gx) = gx.as_deref_mut() {
                let local = (images.start - range.start) * self.image_len();
                if self.pointwise() && images.len() == 1 {
                    matmul(&mut gx[local..local + k * p], p, false, weight_t, grads);
                } else {
                    matmul(&mut col, ld, false, weight_t, grads);
                    for j in 0..images.len() {
                        let img = &mut gx[local + j * self.image_len()..][..self.image_len()];
                        self.col2im(&col[j * p..], ld, img);
                    }
                }
            }
            start = images.end;
        }
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "byol-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::profile::timed("conv2d forward", &candle_core::Device::Cpu, || {
            let geo = Geometry::new(l1.dims(), l2.dims(), self.stride, self.padding)?;
            let x = contiguous_f32(s1, l1, self.name())?;
            let w = contiguous_f32(s2, l2, self.name())?;
            let mut out = vec![0f32; geo.n * geo.out_len()];
            let ranges = split_ranges(geo.n, rayon::current_num_threads());
            let pieces = split_lens(&mut out, ranges.iter().map(|r| r.len() * geo.out_len()));
            ranges
                .into_par_iter()
                .zip(pieces)
                .for_each(|(range, piece)| geo.forward_range(x, w, range, piece));
            Ok((CpuStorage::F32(out), (geo.n, geo.co, geo.ho, geo.wo).into()))
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
        super::profile::timed("conv2d forward", &super::cuda::device(s1), || {
            let geo = Geometry::new(l1.dims(), l2.dims(), self.stride, self.padding)?;
            let y = super::cuda::conv::forward(&geo.cuda_shape(), (s1, l1), (s2, l2))?;
            Ok((y, (geo.n, geo.co, geo.ho, geo.wo).into()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        super::profile::timed("conv2d backward", &x.device().clone(), || {
            let geo = Geometry::new(x.dims(), weight.dims(), self.stride, self.padding)?;
            let want_gx = x.track_op();
            #[cfg(feature = "cuda")]
            if x.device().is_cuda() {
                let (x, weight, grad) = (x.contiguous()?, weight.contiguous()?, grad.contiguous()?);
                let (gx, gw) =
                    super::cuda::conv2d_grads(&geo.cuda_shape(), &x, &weight, &grad, want_gx)?;
                return Ok((gx, Some(gw)));
            }
            let ranges = split_ranges(geo.n, rayon::current_num_threads());
            let mut gx = vec![0f32; if want_gx { geo.n * geo.image_len() } else { 0 }];
            let gw_len = geo.co * geo.k();
            let (x, weight, grad) = (x.contiguous()?, weight.contiguous()?, grad.contiguous()?);
            let (xg, xl) = x.storage_and_layout();
            let (wg, wl) = weight.storage_and_layout();
            let (gg, gl) = grad.storage_and_layout();
            let xs = cpu_f32(&xg, xl, self.name())?;
            let ws = cpu_f32(&wg, wl, self.name())?;
            let gs = cpu_f32(&gg, gl, self.name())?;
            let as_conv = geo.input_grad_as_conv();
            let mut pieces: Vec<Option<&mut [f32]>> = if want_gx {
                split_lens(&mut gx, ranges.iter().map(|r| r.len() * geo.image_len()))
                    .into_iter()
                    .map(Some)
                    .collect()
            } else {
                ranges.iter().map(|_| None).collect()
            };
            // The weight gradient, with the input gradient by col2im where it is not a
            // convolution of its own.
            let partial: Vec<Vec<f32>> = ranges
                .par_iter()
                .zip(pieces.par_iter_mut())
                .map(|(range, piece)| {
                    let mut gw = vec![0f32; gw_len];
                    let gx = if as_conv.is_some() {
                        None
                    } else {
                        piece.as_deref_mut()
                    };
                    geo.backward_range(xs, ws, gs, range.clone(), &mut gw, gx);
                    gw
                })
                .collect();
            // Summed in range order: deterministic for a given thread count.
            let mut gw = vec![0f32; gw_len];
            for part in partial {
                gw.iter_mut().zip(part).for_each(|(t, v)| *t += v);
            }
            if let (Some(flip), true) = (as_conv, want_gx) {
                let kernel = geo.flipped_kernel(ws);
                ranges
                    .into_par_iter()
                    .zip(pieces)
                    .for_each(|(range, piece)| {
                        let piece =
                            piece.expect("a piece per range when the input wants a gradient");
                        flip.forward_range(gs, &kernel, range, piece);
                    });
            }
            let gw = Tensor::from_vec(gw, weight.shape(), weight.device())?;
            let gx = if want_gx {
                Some(Tensor::from_vec(gx, x.shape(), x.device())?)
            } else {
                None
            };
            Ok((gx, Some(gw)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct definition of the convolution, for checking im2col + GEMM.
    fn naive(geo: &Geometry, x: &[f32], w: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; geo.n * geo.out_len()];
        for n in 0..geo.n {
            for o in 0..geo.co {
                for oh in 0..geo.ho {
                    for ow in 0..geo.wo {
                        let mut acc = 0f32;
                        for c in 0..geo.c {
                            for ki in 0..geo.kh {
                                for kj in 0..geo.kw {
                                    let ih = (oh * geo.stride + ki) as isize - geo.pad as isize;
                                    let iw = (ow * geo.stride + kj) as isize - geo.pad as isize;
                                    if ih < 0
                                        || iw < 0
                                        || ih >= geo.h as isize
                                        || iw >= geo.w as isize
                                    {
                                        continue;
                                    }
                                    acc += x[((n * geo.c + c) * geo.h + ih as usize) * geo.w
                                        + iw as usize]
                                        * w[((o * geo.c + c) * geo.kh + ki) * geo.kw + kj];
                                }
                            }
                        }
                        out[((n * geo.co + o) * geo.ho + oh) * geo.wo + ow] = acc;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_the_definition() {
        // (n, c, h, w, co, k, stride, pad): odd sizes, strides, pointwise, grouped maps.
        let cases = [
            (1, 1, 5, 5, 1, 3, 1, 1),
            (3, 2, 7, 5, 4, 3, 2, 1),
            (2, 3, 9, 9, 2, 7, 2, 3),
            (5, 4, 3, 3, 3, 1, 1, 0),
            (4, 4, 5, 5, 3, 1, 2, 0),
            (40, 3, 4, 4, 5, 3, 1, 1),
            (2, 3, 6, 5, 4, 5, 1, 2),
            (1, 2, 3, 3, 2, 7, 1, 3),
            (2, 2, 6, 6, 2, 3, 3, 0),
        ];
        for (n, c, h, wd, co, k, stride, pad) in cases {
            let geo = Geometry::new(&[n, c, h, wd], &[co, c, k, k], stride, pad).unwrap();
            let x: Vec<f32> = (0..n * c * h * wd)
                .map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0)
                .collect();
            let w: Vec<f32> = (0..co * c * k * k)
                .map(|i| ((i * 104729) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let mut out = vec![0f32; n * geo.out_len()];
            geo.forward_range(&x, &w, 0..n, &mut out);
            let want = naive(&geo, &x, &w);
            for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-3, "{geo:?}: element {i}: {a} vs {b}");
            }
        }
    }
}
