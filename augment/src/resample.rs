//! Pillow's antialiased two-pass resampling of RGB8 images, with reusable buffers.
//!
//! A line-by-line port of the algorithm of Pillow's `Resample.c` (`precompute_coeffs`,
//! `normalize_coeffs_8bpc`, `ImagingResampleHorizontal_8bpc`, `ImagingResampleVertical_8bpc`):
//! f64 filter weights normalised per output pixel, converted to 22-bit fixed point, the
//! horizontal pass first (only over the rows the vertical pass reads), u8 rounding and
//! clamping after each pass. Unlike a general-purpose resizer it keeps its coefficient
//! and intermediate buffers between calls, so steady state allocates nothing.

use crate::layout::unit_from_u8;
use crate::transpose::transpose_u8;

/// Fixed-point precision of the 8-bit coefficients (Pillow's `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// A resampling filter: its kernel and support (half-width at scale 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Triangle, support 1 (Pillow `BILINEAR`).
    Bilinear,
    /// Keys cubic, a = -0.5, support 2 (Pillow `BICUBIC`).
    Bicubic,
    /// Lanczos, 3 lobes, support 3 (Pillow `LANCZOS`).
    Lanczos3,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos3 => 3.0,
        }
    }

    #[inline(always)]
    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos3 => {
                if -3.0 < x && x < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let px = x * std::f64::consts::PI;
        px.sin() / px
    }
}

/// Fixed-point weights of one axis: for output pixel `i`, `len[i]` taps from input
/// `start[i]` with weights `k[i * ksize ..]`.
#[derive(Debug, Default, Clone)]
struct Axis {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    k: Vec<i32>,
    scratch: Vec<f64>,
}

impl Axis {
    /// Pillow's `precompute_coeffs` over `[0, in_size)` to `out_size`, then
    /// `normalize_coeffs_8bpc`.
    fn compute(&mut self, in_size: usize, out_size: usize, filter: Filter, in_max: usize) {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        self.ksize = ksize;
        self.start.clear();
        self.len.clear();
        // Capacity for the widest kernel any window of the image can need, so buffers
        // reach their final size on the first image of a given size.
        let ksize_max =
            (filter.support() * (in_max as f64 / out_size as f64).max(1.0)).ceil() as usize * 2 + 1;
        sized(
            &mut self.k,
            out_size * ksize,
            out_size * ksize_max.max(ksize),
        );
        sized(&mut self.scratch, ksize, ksize_max.max(ksize));
        let ss = 1.0 / filterscale;
        // One loop per filter, so the weight function is inlined without a match per tap.
        match filter {
            Filter::Bilinear => self.fill(in_size, out_size, scale, support, ss, |x| {
                Filter::Bilinear.weight(x)
            }),
            Filter::Bicubic => self.fill(in_size, out_size, scale, support, ss, |x| {
                Filter::Bicubic.weight(x)
            }),
            Filter::Lanczos3 => self.fill(in_size, out_size, scale, support, ss, |x| {
                Filter::Lanczos3.weight(x)
            }),
        }
    }

    /// The loop of [`Axis::compute`] with the filter's weight function `weight`, in
    /// Pillow's order of f64 operations (so the fixed-point weights are Pillow's).
    #[inline(always)]
    fn fill(
        &mut self,
        in_size: usize,
        out_size: usize,
        scale: f64,
        support: f64,
        ss: f64,
        weight: impl Fn(f64) -> f64,
    ) {
        let ksize = self.ksize;
        for (xx, k) in self.k.chunks_exact_mut(ksize).take(out_size).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as isize).max(0) as usize;
            let xmax = ((center + support + 0.5) as isize).min(in_size as isize) as usize;
            let n = xmax.saturating_sub(xmin);
            let ws = &mut self.scratch[..n];
            let mut ww = 0.0;
            for (x, w) in ws.iter_mut().enumerate() {
                *w = weight((x as f64 + xmin as f64 - center + 0.5) * ss);
                ww += *w;
            }
            for (dst, &w) in k[..n].iter_mut().zip(ws.iter()) {
                let w = if ww != 0.0 { w / ww } else { w };
                let fixed = w * f64::from(1u32 << PRECISION_BITS);
                *dst = if w < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            self.start.push(xmin);
            self.len.push(n);
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        (
            self.start[i],
            &self.k[i * self.ksize..i * self.ksize + self.len[i]],
        )
    }
}

/// Makes `v` at least `len` long (reserving at least `capacity` when it must grow); it
/// never shrinks, so steady state writes no fill. Users slice what they need.
fn sized<T: Clone + Default>(v: &mut Vec<T>, len: usize, capacity: usize) {
    if v.len() < len {
        if v.capacity() < len {
            v.reserve_exact(len.max(capacity) - v.len());
        }
        v.resize(len, T::default());
    }
}

#[inline(always)]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Where a pass writes one output line of u8 values.
trait LineOut {
    /// Stores `v` as outputs `at..at + N` of the line.
    fn put<const N: usize>(&mut self, at: usize, v: &[u8; N]);
}

/// The bytes as they are.
struct Bytes<'a>(&'a mut [u8]);

impl LineOut for Bytes<'_> {
    #[inline(always)]
    fn put<const N: usize>(&mut self, at: usize, v: &[u8; N]) {
        self.0[at..at + N].copy_from_slice(v);
    }
}

/// Each byte `x` as the f32 `x / 255` (`FMA`: see [`crate::simd`]).
struct Unit<'a, const FMA: bool>(&'a mut [f32]);

impl<const FMA: bool> LineOut for Unit<'_, FMA> {
    #[inline(always)]
    fn put<const N: usize>(&mut self, at: usize, v: &[u8; N]) {
        let dst: &mut [f32; N] = (&mut self.0[at..at + N]).try_into().unwrap();
        for j in 0..N {
            dst[j] = crate::simd::unit_u8::<FMA>(v[j]);
        }
    }
}

/// As [`Unit`], the line mirrored left/right.
struct UnitMirrored<'a, const FMA: bool>(&'a mut [f32]);

impl<const FMA: bool> LineOut for UnitMirrored<'_, FMA> {
    #[inline(always)]
    fn put<const N: usize>(&mut self, at: usize, v: &[u8; N]) {
        let end = self.0.len() - at;
        let dst: &mut [f32; N] = (&mut self.0[end - N..end]).try_into().unwrap();
        for j in 0..N {
            dst[N - 1 - j] = crate::simd::unit_u8::<FMA>(v[j]);
        }
    }
}

/// `N` outputs at offset `at`: `clip8(HALF + sum_t k[t] * src[at + t * stride + j])`, with
/// the sums kept in registers across the taps (eight AVX2 accumulators at `N` = 64).
#[inline(always)]
fn lines_block<const N: usize>(
    src: &[u8],
    stride: usize,
    at: usize,
    k: &[i32],
    out: &mut impl LineOut,
) {
    let mut acc = [HALF; N];
    for (t, &w) in k.iter().enumerate() {
        let line: &[u8; N] = src[at + t * stride..][..N].try_into().unwrap();
        for j in 0..N {
            acc[j] += i32::from(line[j]) * w;
        }
    }
    let mut v = [0u8; N];
    for j in 0..N {
        v[j] = clip8(acc[j]);
    }
    out.put(at, &v);
}

/// One output line of a pass: `out[j] = clip8(HALF + sum_t k[t] * src[t * stride + j])`,
/// i.e. the weighted sum of `k.len()` input lines `stride` bytes apart, rounded to u8.
/// Vectorised across the line; no accumulator buffer.
#[inline(always)]
fn weighted_lines(src: &[u8], stride: usize, k: &[i32], len: usize, out: &mut impl LineOut) {
    let mut at = 0;
    while at + 32 <= len {
        lines_block::<32>(src, stride, at, k, out);
        at += 32;
    }
    while at + 16 <= len {
        lines_block::<16>(src, stride, at, k, out);
        at += 16;
    }
    if at < len && len >= 16 {
        // The tail as one more block ending at `len` (recomputes a few outputs).
        lines_block::<16>(src, stride, len - 16, k, out);
    } else {
        for j in at..len {
            lines_block::<1>(src, stride, j, k, out);
        }
    }
}

multiversion! {
    /// [`weighted_lines`] into bytes.
    fn weighted_lines_u8(src: &[u8], stride: usize, k: &[i32], out: &mut [u8]) {
        weighted_lines(src, stride, k, out.len(), &mut Bytes(out));
    }
}

multiversion! {
    /// [`weighted_lines`] into f32 `x / 255`.
    fn weighted_lines_unit(src: &[u8], stride: usize, k: &[i32], out: &mut [f32]) {
        weighted_lines(src, stride, k, out.len(), &mut Unit::<FMA>(out));
    }
}

multiversion! {
    /// [`weighted_lines`] into f32 `x / 255`, mirrored.
    fn weighted_lines_unit_mirrored(src: &[u8], stride: usize, k: &[i32], out: &mut [f32]) {
        weighted_lines(src, stride, k, out.len(), &mut UnitMirrored::<FMA>(out));
    }
}

/// What [`Resampler::crop_resize`] writes: 3 planes of `out_w x out_h`.
#[derive(Debug)]
pub enum PlanesOut<'a> {
    /// The resized bytes.
    U8(&'a mut [u8]),
    /// The resized bytes `x` as f32 `x / 255`, each row mirrored when `flip` (the first
    /// steps of a view, fused into the resize's last pass).
    Unit {
        /// `3 * out_w * out_h` values.
        dst: &'a mut [f32],
        /// Mirror left/right.
        flip: bool,
    },
}

impl PlanesOut<'_> {
    /// Values the slot holds.
    pub(crate) fn len(&self) -> usize {
        match self {
            PlanesOut::U8(d) => d.len(),
            PlanesOut::Unit { dst, .. } => dst.len(),
        }
    }
}

/// Reusable state for [`Resampler::crop_resize`].
///
/// The work runs on the three colour planes separately: the window is split into planes,
/// each plane is transposed so that the horizontal pass is a weighted sum of whole
/// columns, transposed back, and the vertical pass sums whole rows. Both passes are then
/// contiguous multiply-adds the compiler vectorises, and the transposes are byte
/// transposes ([`transpose_u8`]). For [`PlanesOut::Unit`] the vertical pass writes the
/// f32 `x / 255` directly and the mirror costs nothing (the horizontal pass writes its
/// columns in reverse order), so a view's first three steps are one pass.
#[derive(Debug, Default, Clone)]
pub struct Resampler {
    x: Axis,
    y: Axis,
    /// The window's rows the vertical pass reads, as 3 planes of `rows x cw`.
    planes: Vec<u8>,
    /// Those planes transposed: 3 planes of `cw x rows` (column after column).
    cols: Vec<u8>,
    /// Horizontally resampled columns: 3 planes of `out_w x rows`.
    cols_out: Vec<u8>,
    /// The same transposed back to rows: 3 planes of `rows x out_w`.
    mid: Vec<u8>,
}

impl Resampler {
    /// A resampler with empty buffers; they grow once, then are reused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grows every buffer for any window of images up to `max_w` x `max_h` resized to
    /// `out_w` x `out_h` with any filter.
    pub fn reserve(&mut self, max_w: usize, max_h: usize, out_w: usize, out_h: usize) {
        let grow = |v: &mut Vec<u8>, n: usize| v.reserve(n.saturating_sub(v.len()));
        grow(&mut self.planes, max_w * max_h * 3);
        grow(&mut self.cols, max_w * max_h * 3);
        grow(&mut self.cols_out, out_w * max_h * 3);
        grow(&mut self.mid, max_h * out_w * 3);
        for (axis, in_max, out) in [(&mut self.x, max_w, out_w), (&mut self.y, max_h, out_h)] {
            let ksize = (Filter::Lanczos3.support() * (in_max as f64 / out as f64).max(1.0)).ceil()
                as usize
                * 2
                + 1;
            axis.k.reserve((out * ksize).saturating_sub(axis.k.len()));
            axis.scratch
                .reserve(ksize.saturating_sub(axis.scratch.len()));
            axis.start.reserve(out.saturating_sub(axis.start.len()));
            axis.len.reserve(out.saturating_sub(axis.len.len()));
        }
    }

    /// Resamples the `cw` x `ch` window at (`cx`, `cy`) of `src` (RGB8 HWC, `width`
    /// columns) into `dst`, 3 planes (R, G, B) of `out_w x out_h`: Pillow's
    /// `img.crop(box).resize((out_w, out_h), filter)`, split into planes.
    #[allow(clippy::too_many_arguments)]
    pub fn crop_resize(
        &mut self,
        src: &[u8],
        width: usize,
        (cx, cy, cw, ch): (usize, usize, usize, usize),
        filter: Filter,
        mut dst: PlanesOut<'_>,
        out_w: usize,
        out_h: usize,
    ) {
        assert!(
            cx + cw <= width && (cy + ch) * width * 3 <= src.len(),
            "crop inside the image"
        );
        let n_out = out_w * out_h;
        assert_eq!(dst.len(), n_out * 3, "output buffer size");
        let height = src.len() / (width * 3);
        self.y.compute(ch, out_h, filter, height);
        let first = self.y.start[0];
        let last = self.y.start[out_h - 1] + self.y.len[out_h - 1];
        // Only the rows the vertical pass reads (all of them when the height is kept).
        let (first, rows) = if ch == out_h {
            (0, ch)
        } else {
            (first, last - first)
        };
        let window_len = rows * cw;
        sized(&mut self.planes, 3 * window_len, width * height * 3);
        deinterleave3(
            &src[((cy + first) * width + cx) * 3..],
            width * 3,
            rows,
            cw,
            &mut self.planes,
        );
        // Horizontal pass (Pillow skips it when the width does not change: the weights
        // would be exactly one anyway), on the transposed planes.
        let horizontal = cw != out_w;
        // A mirrored output is free in the horizontal pass: column `xx` is written as
        // column `out_w - 1 - xx` (the vertical pass acts on each column alike).
        let flip = matches!(dst, PlanesOut::Unit { flip: true, .. });
        if horizontal {
            self.x.compute(cw, out_w, filter, width);
            sized(&mut self.cols, 3 * window_len, width * height * 3);
            sized(&mut self.cols_out, 3 * out_w * rows, out_w * height * 3);
            sized(&mut self.mid, 3 * rows * out_w, height * out_w * 3);
            for c in 0..3 {
                let cols = &mut self.cols[c * window_len..][..window_len];
                transpose_u8(&self.planes[c * window_len..], cw, rows, cw, cols, rows);
                let cols_out = &mut self.cols_out[c * out_w * rows..][..out_w * rows];
                for (xx, line) in cols_out.chunks_exact_mut(rows).enumerate() {
                    let (start, k) = self.x.taps(if flip { out_w - 1 - xx } else { xx });
                    weighted_lines_u8(&cols[start * rows..], rows, k, line);
                }
                let mid = &mut self.mid[c * rows * out_w..][..rows * out_w];
                transpose_u8(cols_out, rows, out_w, rows, mid, out_w);
            }
        }
        let (rows_from, plane_len) = if horizontal {
            (&self.mid[..], rows * out_w)
        } else {
            (&self.planes[..], window_len)
        };
        // Pillow skips the vertical pass when the height does not change. A mirror is still
        // to do when there was no horizontal pass (rare: the crop is as wide as the output).
        let vertical = ch != out_h;
        let mirror_rows = flip && !horizontal;
        for c in 0..3 {
            let plane = &rows_from[c * plane_len..][..plane_len];
            // Output line `yy` of the vertical pass: its source lines and weights.
            let line = |yy: usize| {
                let (start, k) = self.y.taps(yy);
                (&plane[(start - first) * out_w..], k)
            };
            match &mut dst {
                PlanesOut::U8(dst) => {
                    let out = &mut dst[c * n_out..][..n_out];
                    if !vertical {
                        out.copy_from_slice(plane);
                        continue;
                    }
                    for (yy, o) in out.chunks_exact_mut(out_w).enumerate() {
                        let (src, k) = line(yy);
                        weighted_lines_u8(src, out_w, k, o);
                    }
                }
                PlanesOut::Unit { dst, .. } => {
                    let out = &mut dst[c * n_out..][..n_out];
                    if !vertical {
                        unit_from_u8(plane, out_w, mirror_rows, out);
                        continue;
                    }
                    for (yy, o) in out.chunks_exact_mut(out_w).enumerate() {
                        let (src, k) = line(yy);
                        if mirror_rows {
                            weighted_lines_unit_mirrored(src, out_w, k, o);
                        } else {
                            weighted_lines_unit(src, out_w, k, o);
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// `lines` lines of `n` RGB pixels (line `l` at `src[l * stride]`) into 3 planes of
    /// `lines x n` bytes in `dst`.
    fn deinterleave3(src: &[u8], stride: usize, lines: usize, n: usize, dst: &mut [u8]) {
        let len = lines * n;
        let (r, rest) = dst[..3 * len].split_at_mut(len);
        let (g, b) = rest.split_at_mut(len);
        for l in 0..lines {
            let line = &src[l * stride..][..n * 3];
            let (ro, go, bo) = (
                &mut r[l * n..][..n],
                &mut g[l * n..][..n],
                &mut b[l * n..][..n],
            );
            for (i, px) in line.chunks_exact(3).enumerate() {
                ro[i] = px[0];
                go[i] = px[1];
                bo[i] = px[2];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: usize, h: usize) -> Vec<u8> {
        (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect()
    }

    /// RGB8 HWC as 3 planes.
    fn planes(hwc: &[u8]) -> Vec<u8> {
        (0..3)
            .flat_map(|c| hwc.iter().skip(c).step_by(3).copied())
            .collect()
    }

    #[test]
    fn same_size_is_a_copy_and_constants_stay_constant() {
        let (w, h) = (13, 9);
        let src = image(w, h);
        let mut r = Resampler::new();
        for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos3] {
            let mut dst = vec![0; w * h * 3];
            r.crop_resize(&src, w, (0, 0, w, h), f, PlanesOut::U8(&mut dst), w, h);
            assert_eq!(dst, planes(&src), "{f:?}");
            let flat = vec![77u8; w * h * 3];
            for (ow, oh) in [(5, 4), (31, 17), (13, 3)] {
                let mut dst = vec![0; ow * oh * 3];
                r.crop_resize(&flat, w, (2, 1, 9, 7), f, PlanesOut::U8(&mut dst), ow, oh);
                assert!(dst.iter().all(|&v| v == 77), "{f:?} {ow}x{oh}");
            }
        }
    }

    #[test]
    fn a_window_equals_resizing_the_cropped_copy() {
        let (w, h) = (20, 16);
        let src = image(w, h);
        let (cx, cy, cw, ch) = (3, 5, 11, 9);
        let crop: Vec<u8> = (cy..cy + ch)
            .flat_map(|y| src[(y * w + cx) * 3..(y * w + cx + cw) * 3].to_vec())
            .collect();
        let mut r = Resampler::new();
        let (mut a, mut b) = (vec![0; 7 * 6 * 3], vec![0; 7 * 6 * 3]);
        r.crop_resize(
            &src,
            w,
            (cx, cy, cw, ch),
            Filter::Bicubic,
            PlanesOut::U8(&mut a),
            7,
            6,
        );
        r.crop_resize(
            &crop,
            cw,
            (0, 0, cw, ch),
            Filter::Bicubic,
            PlanesOut::U8(&mut b),
            7,
            6,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn the_unit_output_is_the_bytes_over_255_mirrored_on_request() {
        let (w, h) = (21, 17);
        let src = image(w, h);
        let mut r = Resampler::new();
        // Both passes, only the vertical one, only the horizontal one, neither.
        for (win, (ow, oh)) in [
            ((2, 3, 15, 11), (19, 23)),
            ((2, 3, 19, 11), (19, 7)),
            ((0, 1, 13, 16), (9, 16)),
            ((4, 0, 9, 12), (9, 12)),
        ] {
            let mut bytes = vec![0u8; 3 * ow * oh];
            r.crop_resize(
                &src,
                w,
                win,
                Filter::Bicubic,
                PlanesOut::U8(&mut bytes),
                ow,
                oh,
            );
            for flip in [false, true] {
                let mut unit = vec![0f32; 3 * ow * oh];
                let dst = PlanesOut::Unit {
                    dst: &mut unit,
                    flip,
                };
                r.crop_resize(&src, w, win, Filter::Bicubic, dst, ow, oh);
                for (i, &got) in unit.iter().enumerate() {
                    let (row, x) = (i / ow, i % ow);
                    let from = row * ow + if flip { ow - 1 - x } else { x };
                    let want = f32::from(bytes[from]) / 255.0;
                    assert_eq!(got, want, "{win:?} -> {ow}x{oh}, flip {flip}, value {i}");
                }
            }
        }
    }
}
