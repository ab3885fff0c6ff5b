//! The end of every view: final clip to [0,1], then per-channel normalisation
//! `(x - mean_c) / std_c` (ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)
//! by default; the fused last pass multiplies by `1 / std_c`) into f32 CHW, and/or
//! `round(255 x)` into u8 HWC for consumers that normalise on the GPU.

use crate::simd::clip01;
use crate::solarize::solarize_value;

/// ImageNet channel means (BYOL's normalisation).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

multiversion! {
    /// `x = clip(x, 0, 1)` on every value.
    pub fn clip(img: &mut [f32]) {
        for x in img.iter_mut() {
            *x = clip01(*x);
        }
    }
}

multiversion! {
    /// `x = (x - mean_c) / std_c` in place on a planar image with `n` values per plane.
    pub fn normalize(img: &mut [f32], n: usize, mean: [f32; 3], std: [f32; 3]) {
        for ((plane, m), s) in img.chunks_exact_mut(n).zip(mean).zip(std) {
            for x in plane.iter_mut() {
                *x = (*x - m) / s;
            }
        }
    }
}

/// `dst[i] = f(src[i])`. With `streaming`, on x86-64, through non-temporal stores: for a
/// slot of the caller's batch, not read again before the batch is handed over, so it
/// bypasses the cache (no read for ownership, and the working image stays cached). The
/// caller then issues the store fence.
#[inline(always)]
fn write(dst: &mut [f32], src: &[f32], streaming: bool, f: impl Fn(f32) -> f32) {
    let len = dst.len().min(src.len());
    // With streaming: elements up to the first 16-byte boundary, then blocks of 8 streamed,
    // then the rest. Without (or off x86-64): every element plainly.
    let (head, body_end) = if streaming && cfg!(target_arch = "x86_64") {
        let head = dst.as_ptr().align_offset(16).min(len);
        (head, head + (len - head) / 8 * 8)
    } else {
        (len, len)
    };
    for i in 0..head {
        dst[i] = f(src[i]);
    }
    #[cfg(target_arch = "x86_64")]
    for at in (head..body_end).step_by(8) {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
        let block: &[f32; 8] = src[at..at + 8].try_into().unwrap();
        let v = block.map(&f);
        // SAFETY: SSE is part of the x86-64 baseline; `dst[at..at + 8]` is in bounds and
        // `at` is 16-byte aligned (`head` reaches the boundary, blocks keep it).
        unsafe {
            let p = dst.as_mut_ptr().add(at);
            _mm_stream_ps(p, _mm_loadu_ps(v.as_ptr()));
            _mm_stream_ps(p.add(4), _mm_loadu_ps(v.as_ptr().add(4)));
        }
    }
    for i in body_end..len {
        dst[i] = f(src[i]);
    }
}

/// `round(255 * clip(x))` (half away from zero), as the u8 output stores it.
#[inline(always)]
pub fn to_u8(x: f32) -> u8 {
    (clip01(x) * 255.0 + 0.5) as u8
}

multiversion! {
    /// The fused last pass of a view: optional solarize (threshold), clip to [0,1], then
    /// write the normalised f32 CHW output and/or the u8 HWC output. `planes` is 3, or 1
    /// for a gray image held as one plane (read for every channel).
    pub(crate) fn finish(
        img: &[f32],
        n: usize,
        planes: usize,
        solarize: Option<f32>,
        mean: [f32; 3],
        std: [f32; 3],
        chw: Option<&mut [f32]>,
        hwc: Option<&mut [u8]>,
        streaming: bool,
    ) {
        let (sol, t) = match solarize {
            Some(t) => (true, t),
            None => (false, 0.0),
        };
        if let Some(chw) = chw {
            for c in 0..3 {
                // Multiplying by 1/std instead of dividing: within 1 ulp, 10x cheaper.
                let (m, s) = (mean[c], 1.0 / std[c]);
                let p = if planes == 1 { 0 } else { c };
                let src = &img[p * n..(p + 1) * n];
                let dst = &mut chw[c * n..(c + 1) * n];
                if sol {
                    write(dst, src, streaming, |x| (clip01(solarize_value(x, t)) - m) * s);
                } else {
                    write(dst, src, streaming, |x| (clip01(x) - m) * s);
                }
            }
            // Orders the streaming stores before whatever publishes the output to another
            // thread.
            #[cfg(target_arch = "x86_64")]
            if streaming {
                #[allow(unused_unsafe)] // safe to call in the AVX2 build, not in the baseline
                // SAFETY: SSE is part of the x86-64 baseline.
                unsafe {
                    std::arch::x86_64::_mm_sfence()
                };
            }
        }
        if let Some(hwc) = hwc {
            let plane = |c: usize| if planes == 1 { &img[..n] } else { &img[c * n..(c + 1) * n] };
            let (r, g, b) = (plane(0), plane(1), plane(2));
            for (i, px) in hwc.chunks_exact_mut(3).enumerate().take(n) {
                let (mut x0, mut x1, mut x2) = (r[i], g[i], b[i]);
                if sol {
                    x0 = solarize_value(x0, t);
                    x1 = solarize_value(x1, t);
                    x2 = solarize_value(x2, t);
                }
                px[0] = to_u8(x0);
                px[1] = to_u8(x1);
                px[2] = to_u8(x2);
            }
        }
    }
}
