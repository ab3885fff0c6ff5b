//! Colour jitter with the official (TensorFlow / BYOL JAX) semantics, on planar RGB f32.
//!
//! - brightness: `x + delta` (one delta for all channels);
//! - contrast: `(x - m_c) * factor + m_c`, `m_c` the spatial mean of channel c of this image
//!   at this point of the chain (not torchvision's grayscale mean);
//! - saturation: in HSV, `s * factor` clipped to [0,1];
//! - hue: in HSV, `(h + delta) mod 1`.
//!
//! Each op is followed by a clip to [0,1]. The ops run in a random order; an op whose
//! strength is 0 in the config is skipped. A saturation and a hue that follow each other
//! share one HSV round trip (exactly the same function in real arithmetic: they touch
//! different HSV components and the intermediate clip and RGB->HSV->RGB are identities).

use crate::simd::{clip01, floor_f32, fma, max_f32, min_f32, wrap_unit};

/// The random parameters of one colour transform. `None` = op disabled in the config.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ColorParams {
    /// Order of the four jitter ops: 0 brightness, 1 contrast, 2 saturation, 3 hue.
    pub order: [u8; 4],
    /// Brightness delta.
    pub brightness_delta: Option<f32>,
    /// Contrast factor.
    pub contrast_factor: Option<f32>,
    /// Saturation factor.
    pub saturation_factor: Option<f32>,
    /// Hue delta (fraction of a turn).
    pub hue_delta: Option<f32>,
    /// Whether the jitter runs (p = 0.8 in BYOL).
    pub apply_jitter: bool,
    /// Whether grayscale runs after it (p = 0.2), independently of the jitter.
    pub apply_grayscale: bool,
}

multiversion! {
    /// `x = clip(x + delta, 0, 1)` on every value.
    pub fn brightness(img: &mut [f32], delta: f32) {
        for x in img.iter_mut() {
            *x = clip01(*x + delta);
        }
    }
}

multiversion! {
    /// Sum of a slice, accumulated in 16 f32 lanes per block of 4096, blocks summed in f64.
    pub fn plane_sum(xs: &[f32]) -> f64 {
        let mut total = 0f64;
        for block in xs.chunks(4096) {
            let mut acc = [0f32; 16];
            let mut it = block.chunks_exact(16);
            for c in &mut it {
                for j in 0..16 {
                    acc[j] += c[j];
                }
            }
            let mut s: f32 = it.remainder().iter().sum();
            for a in acc {
                s += a;
            }
            total += s as f64;
        }
        total
    }
}

multiversion! {
    fn contrast_plane(plane: &mut [f32], factor: f32, mean: f32) {
        for x in plane.iter_mut() {
            *x = clip01(factor * (*x - mean) + mean);
        }
    }
}

/// Per-channel spatial means of a planar image with planes of `n` values.
pub fn channel_means(img: &[f32], n: usize) -> [f32; 3] {
    let mut m = [0f32; 3];
    for (c, plane) in img.chunks_exact(n).take(3).enumerate() {
        m[c] = (plane_sum(plane) / n as f64) as f32;
    }
    m
}

/// `x = clip((x - m_c) * factor + m_c, 0, 1)`, `m_c` = spatial mean of channel c.
pub fn contrast(img: &mut [f32], n: usize, factor: f32) {
    let means = channel_means(img, n);
    for (plane, m) in img.chunks_exact_mut(n).zip(means) {
        contrast_plane(plane, factor, m);
    }
}

const TWO_SIXTHS: f32 = (2.0f64 / 6.0) as f32;
const FOUR_SIXTHS: f32 = (4.0f64 / 6.0) as f32;

/// RGB -> HSV of the official code (TF `adjust_saturation_op.cc`): red wins ties, then green.
#[inline(always)]
pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let v = r.max(g).max(b);
    let range = v - r.min(g).min(b);
    let s = if v > 0.0 { range / v } else { 0.0 };
    let norm = if range != 0.0 {
        1.0 / (6.0 * range)
    } else {
        1e9
    };
    let hr = norm * (g - b);
    let hg = norm * (b - r) + TWO_SIXTHS;
    let hb = norm * (r - g) + FOUR_SIXTHS;
    let h = if r == v {
        hr
    } else if g == v {
        hg
    } else {
        hb
    };
    let h = if range > 0.0 { h } else { 0.0 };
    let h = if h < 0.0 { h + 1.0 } else { h };
    (h, s, v)
}

/// HSV -> RGB of the official code (sector `k = floor(6 * (h mod 1))`; k = 6 gives gray).
#[inline(always)]
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let c = s * v;
    let m = v - c;
    let dh = (h - floor_f32(h)) * 6.0;
    let k = floor_f32(dh);
    let fmodu = dh - 2.0 * floor_f32(dh * 0.5);
    let x = c * (1.0 - (fmodu - 1.0).abs());
    let r = if k == 0.0 || k == 5.0 {
        c
    } else if k == 1.0 || k == 4.0 {
        x
    } else {
        0.0
    };
    let g = if k == 1.0 || k == 2.0 {
        c
    } else if k == 0.0 || k == 3.0 {
        x
    } else {
        0.0
    };
    let b = if k == 3.0 || k == 4.0 {
        c
    } else if k == 2.0 || k == 5.0 {
        x
    } else {
        0.0
    };
    (r + m, g + m, b + m)
}

/// HSV -> RGB without sector selects: `m + c * p_n(6h)` with chroma `c = s * v`,
/// `m = v - c`, and the pure-hue ramps `p_r = clip(|6h - 3| - 1)`, `p_g = clip(2 - |6h - 2|)`,
/// `p_b = clip(2 - |6h - 4|)`, for `h` in [0, 1). In real arithmetic it equals
/// [`hsv_to_rgb`]; it vectorises to a fraction of the instructions. Differences are f32
/// rounding (below 1e-6; the fixtures allow 2e-3 and name "another HSV formula" as the
/// reason).
#[inline(always)]
pub fn hsv_to_rgb_fast(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    hcv_to_rgb::<true>(h, s * v, v)
}

/// [`hsv_to_rgb_fast`] from hue, chroma and value. With `0 <= c <= v <= 1` every channel
/// is in [0, 1] after rounding: `m >= 0`, and `m + c` is `v` plus the rounding error of
/// `m`, which rounds to `v` or (for `v < 1` only) the float after it, at most 1.
#[inline(always)]
fn hcv_to_rgb<const FMA: bool>(h: f32, c: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    let m = v - c;
    let pr = clip01((h6 - 3.0).abs() - 1.0);
    let pg = clip01(2.0 - (h6 - 2.0).abs());
    let pb = clip01(2.0 - (h6 - 4.0).abs());
    (
        fma::<FMA>(c, pr, m),
        fma::<FMA>(c, pg, m),
        fma::<FMA>(c, pb, m),
    )
}

multiversion! {
    /// Saturation factor and hue delta in one HSV round trip (the result is already in
    /// [0, 1], so the clip after the op is implicit). The saturation is
    /// applied to the chroma: `c' = clip(s * sat, 0, 1) * v = clip(range * sat, 0, v)`
    /// (the same in real arithmetic, one division fewer).
    pub fn saturation_hue(img: &mut [f32], n: usize, sat: f32, hue: f32) {
        let (r, rest) = img.split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        let b = &mut b[..n];
        for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
            let (rv, gv, bv) = (*r, *g, *b);
            let v = max_f32(max_f32(rv, gv), bv);
            let range = v - min_f32(min_f32(rv, gv), bv);
            // A gray pixel (range 0) has r == v and g - b == 0, so h = 0 with a finite norm.
            // The sector's difference and offset are selected first, then one product and
            // one sum, as the official code computes each sector (the red sector adds 0).
            let norm = 1.0 / (6.0 * max_f32(range, f32::MIN_POSITIVE));
            let (d, off) = if rv == v {
                (gv - bv, 0.0)
            } else if gv == v {
                (bv - rv, TWO_SIXTHS)
            } else {
                (rv - gv, FOUR_SIXTHS)
            };
            let h = norm * d + off;
            // sat >= 0, so the chroma needs no lower clip.
            let c = min_f32(range * sat, v);
            // `(h + delta) mod 1`, and `h mod 1` again before the sector lookup, as the
            // official code does. The official code first maps a negative h (red sector)
            // to h + 1; adding delta first and wrapping once is the same up to one
            // rounding (h in [-1/6, 1), |delta| <= 0.5 validated, so the sum is in
            // [-1, 2), where `wrap_unit` is exact).
            let h = wrap_unit(h + hue);
            // No clip needed: 0 <= c <= v <= 1 (see `hcv_to_rgb`).
            let (nr, ng, nb) = hcv_to_rgb::<FMA>(h, c, v);
            *r = nr;
            *g = ng;
            *b = nb;
        }
    }
}

multiversion! {
    /// Saturation alone, without HSV: with h and v fixed, every channel is
    /// `v - c * f(h)`, so scaling s by `factor` (clipped to 1) moves each channel to
    /// `v - (v - x) * min(factor, v / range)`. Equal to the HSV round trip in real
    /// arithmetic (f32 differences below 1e-6), at a fraction of the cost.
    fn saturation_only(img: &mut [f32], n: usize, factor: f32) {
        let (r, rest) = img.split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        let b = &mut b[..n];
        for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
            let v = max_f32(max_f32(*r, *g), *b);
            let range = v - min_f32(min_f32(*r, *g), *b);
            // s' / s = min(factor, 1 / s) = min(factor, v / range); gray pixels stay.
            let ratio = if range > 0.0 { min_f32(factor, v / range) } else { 0.0 };
            // `v + (x - v) * ratio` is at most v (x <= v), so only the lower clip can act.
            *r = max_f32(fma::<FMA>(*r - v, ratio, v), 0.0);
            *g = max_f32(fma::<FMA>(*g - v, ratio, v), 0.0);
            *b = max_f32(fma::<FMA>(*b - v, ratio, v), 0.0);
        }
    }
}

/// `s = clip(s * factor, 0, 1)` in HSV, back to RGB, clip.
pub fn saturation(img: &mut [f32], n: usize, factor: f32) {
    saturation_only(img, n, factor);
}

/// `h = (h + delta) mod 1` in HSV, back to RGB, clip.
pub fn hue(img: &mut [f32], n: usize, delta: f32) {
    saturation_hue(img, n, 1.0, delta);
}

/// The official colour transform on a planar image (`n` values per plane): the jitter ops
/// in `p.order` (each clipped), then grayscale, then a final clip.
pub fn color_transform(img: &mut [f32], n: usize, p: &ColorParams) {
    if color_transform_gray_as_one_plane(img, n, p) {
        crate::grayscale::spread_first_plane(img, n);
    }
}

/// [`color_transform`], except that a view turned gray is left as one plane: returns
/// `true` when it did, and then only plane 0 holds the result (the three channels of a
/// gray image are equal, so later per-plane work can run once).
pub fn color_transform_gray_as_one_plane(img: &mut [f32], n: usize, p: &ColorParams) -> bool {
    if p.apply_jitter {
        let mut k = 0;
        while k < 4 {
            match p.order[k] {
                0 => {
                    if let Some(d) = p.brightness_delta {
                        brightness(img, d);
                    }
                }
                1 => {
                    if let Some(f) = p.contrast_factor {
                        contrast(img, n, f);
                    }
                }
                op => {
                    // saturation (2) or hue (3); fuse with the next op if it is the other one.
                    let next = if k + 1 < 4 { p.order[k + 1] } else { u8::MAX };
                    let fused = next == 5 - op;
                    if fused {
                        k += 1;
                    }
                    let sat = if op == 2 || fused {
                        p.saturation_factor
                    } else {
                        None
                    };
                    let hue = if op == 3 || fused { p.hue_delta } else { None };
                    match (sat, hue) {
                        (Some(f), None) => saturation_only(img, n, f),
                        (sat, Some(d)) => saturation_hue(img, n, sat.unwrap_or(1.0), d),
                        (None, None) => {}
                    }
                }
            }
            k += 1;
        }
    }
    let planes = if p.apply_grayscale {
        crate::grayscale::grayscale_first_plane(img, n);
        1
    } else {
        3
    };
    // The final clip. After the jitter it is a no-op (every jitter op clips, and grayscale
    // of [0,1] values stays in [0, 0.9999]), so it only runs when the jitter did not.
    if !p.apply_jitter {
        crate::normalize::clip(&mut img[..planes * n]);
    }
    p.apply_grayscale
}
