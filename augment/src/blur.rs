//! Gaussian blur with the official semantics: separable and depthwise, a horizontal pass
//! (along W) then a vertical pass (along H), **zero** padding (`'SAME'`), kernel radius
//! `int(H / divider / 2)` from the image **height** (23 taps at 224 px, 9 at 96, 3 at 32,
//! 1 tap = identity under 20 px with divider 10), weights `exp(-i^2 / (2 sigma^2))`
//! normalised to sum 1 in f32.
//!
//! Speed: the 1-D kernel is computed once per view; each pass keeps 32 outputs in
//! registers while it walks the taps. Taps whose combined weight (both tails) is below
//! 2^-23 (one f32 ulp at 1.0) are skipped: for sigma < ~1.7 that removes most of the 23
//! taps at 224 px while changing no output by more than 1.2e-7 (the fixtures allow 2e-3).

/// Combined weight of the tails that may be dropped: 2^-23.
pub const TAIL_EPS: f32 = 1.0 / (1u32 << 23) as f32;

/// Kernel radius of the official blur: `int((height / divider) / 2)`.
pub fn blur_radius(height: usize, divider: f32) -> usize {
    ((height as f64 / divider as f64) / 2.0) as usize
}

/// The full normalised 1-D kernel (`2 * radius + 1` taps) into `out`, computed in f32.
pub fn gaussian_kernel_into(sigma: f32, radius: usize, out: &mut Vec<f32>) {
    out.clear();
    let r = radius as i64;
    let two_s2 = 2.0 * sigma * sigma;
    for i in -r..=r {
        let x = i as f32;
        out.push((-(x * x) / two_s2).exp());
    }
    let sum: f32 = out.iter().sum();
    for w in out.iter_mut() {
        *w /= sum;
    }
}

/// The full normalised 1-D kernel (allocates; for tests and tools).
pub fn gaussian_kernel(sigma: f32, radius: usize) -> Vec<f32> {
    let mut k = Vec::with_capacity(2 * radius + 1);
    gaussian_kernel_into(sigma, radius, &mut k);
    k
}

/// The smallest radius whose dropped tails weigh at most [`TAIL_EPS`] in total.
pub fn trimmed_radius(kernel: &[f32]) -> usize {
    let r = kernel.len() / 2;
    let mut tail = 0f32;
    let mut keep = r;
    while keep > 0 {
        let t = tail + kernel[r - keep] + kernel[r + keep];
        if t > TAIL_EPS {
            break;
        }
        tail = t;
        keep -= 1;
    }
    keep
}

/// Reusable buffers of the blur (one plane and one padded row).
#[derive(Debug, Default, Clone)]
pub struct BlurScratch {
    tmp: Vec<f32>,
    pad: Vec<f32>,
}

impl BlurScratch {
    /// Grows both buffers for any blur of a `width` x `height` plane, so blurring such
    /// planes allocates nothing.
    pub fn reserve(&mut self, width: usize, height: usize) {
        let grow = |v: &mut Vec<f32>, n: usize| v.reserve(n.saturating_sub(v.len()));
        grow(&mut self.tmp, width * height);
        grow(&mut self.pad, width + 2 * height + CHUNK);
    }
}

/// Blurs `planes` planes of `width` x `height` in place with the odd-length `kernel`
/// (zero padding). `kernel` is used as given (trim it first with [`trimmed_radius`]).
pub fn gaussian_blur(
    img: &mut [f32],
    width: usize,
    height: usize,
    planes: usize,
    kernel: &[f32],
    scratch: &mut BlurScratch,
) {
    let n = width * height;
    if kernel.len() <= 1 || n == 0 {
        // One tap: the normalised kernel is [1.0], the identity.
        return;
    }
    let r = kernel.len() / 2;
    scratch.tmp.resize(n, 0.0);
    scratch.pad.clear();
    // Room for the widest kernel a plane of this size can get (radius up to the plane's
    // height), so the buffer stops growing after the first image.
    let widest = width + 2 * r.max(height) + CHUNK;
    if scratch.pad.capacity() < widest {
        scratch.pad.reserve_exact(widest);
    }
    scratch.pad.resize(width + 2 * r + CHUNK, 0.0);
    for plane in img.chunks_exact_mut(n).take(planes) {
        blur_plane(
            plane,
            width,
            height,
            kernel,
            &mut scratch.tmp,
            &mut scratch.pad,
        );
    }
}

/// Extra zeros at the end of the padded row (keeps slicing simple).
const CHUNK: usize = 64;

/// `N` outputs of `sum_k w[k] * src[k + j]`, accumulated in registers. `N` = 64 gives eight
/// independent AVX2 accumulators, enough to hide the add latency.
#[inline(always)]
fn h_block<const N: usize>(src: &[f32], w: &[f32], out: &mut [f32]) {
    let mut acc = [0f32; N];
    for (k, &wk) in w.iter().enumerate() {
        let s: &[f32; N] = src[k..k + N].try_into().unwrap();
        for j in 0..N {
            acc[j] += wk * s[j];
        }
    }
    out[..N].copy_from_slice(&acc);
}

/// `out[x] = sum_k w[k] * src[x + k]` for x in 0..out.len(). `src` must hold
/// `out.len() + w.len() - 1` values.
#[inline(always)]
fn correlate_row(src: &[f32], w: &[f32], out: &mut [f32]) {
    let len = out.len();
    let mut x0 = 0;
    while x0 + 64 <= len {
        h_block::<64>(&src[x0..], w, &mut out[x0..]);
        x0 += 64;
    }
    while x0 + 16 <= len {
        h_block::<16>(&src[x0..], w, &mut out[x0..]);
        x0 += 16;
    }
    for x in x0..len {
        let mut acc = 0f32;
        for (k, &wk) in w.iter().enumerate() {
            acc += wk * src[x + k];
        }
        out[x] = acc;
    }
}

/// `N` outputs at column `x0` of `sum_{k in ks} w[k] * tmp[row0 + k][x0 + j]`.
#[inline(always)]
fn v_block<const N: usize>(
    tmp: &[f32],
    width: usize,
    x0: usize,
    row0: usize,
    w: &[f32],
    out: &mut [f32],
) {
    let mut acc = [0f32; N];
    for (k, &wk) in w.iter().enumerate() {
        let at = (row0 + k) * width + x0;
        let s: &[f32; N] = tmp[at..at + N].try_into().unwrap();
        for j in 0..N {
            acc[j] += wk * s[j];
        }
    }
    out[..N].copy_from_slice(&acc);
}

multiversion! {
    fn blur_plane(plane: &mut [f32], width: usize, height: usize, kernel: &[f32], tmp: &mut [f32], pad: &mut [f32]) {
        let r = kernel.len() / 2;
        // Horizontal: each row is copied between zero margins, then correlated.
        for (row, out) in plane.chunks_exact(width).zip(tmp.chunks_exact_mut(width)) {
            pad[r..r + width].copy_from_slice(row);
            correlate_row(pad, kernel, out);
        }
        // Vertical: output row y sums the rows y-r..=y+r that exist (zero padding), i.e.
        // kernel taps k_lo..=k_hi over rows starting at y + k_lo - r.
        for y in 0..height {
            let k_lo = r.saturating_sub(y);
            let k_hi = (height - 1 + r - y).min(2 * r);
            let w = &kernel[k_lo..=k_hi];
            let row0 = y + k_lo - r;
            let out = &mut plane[y * width..(y + 1) * width];
            let mut x0 = 0;
            while x0 + 64 <= width {
                v_block::<64>(tmp, width, x0, row0, w, &mut out[x0..]);
                x0 += 64;
            }
            while x0 + 16 <= width {
                v_block::<16>(tmp, width, x0, row0, w, &mut out[x0..]);
                x0 += 16;
            }
            for (x, o) in out.iter_mut().enumerate().skip(x0) {
                let mut acc = 0f32;
                for (k, &wk) in w.iter().enumerate() {
                    acc += wk * tmp[(row0 + k) * width + x];
                }
                *o = acc;
            }
        }
    }
}
