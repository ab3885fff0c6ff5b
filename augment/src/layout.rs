//! Layout conversions between interleaved HWC and planar CHW.

multiversion! {
    /// Rows of `width` u8 values -> f32 `x / 255`, each row mirrored left/right when
    /// `flip`; as many rows as `dst` holds.
    pub fn unit_from_u8(src: &[u8], width: usize, flip: bool, dst: &mut [f32]) {
        for (s, d) in src.chunks_exact(width).zip(dst.chunks_exact_mut(width)) {
            if flip {
                for (d, &s) in d.iter_mut().zip(s.iter().rev()) {
                    *d = crate::simd::unit_u8::<FMA>(s);
                }
            } else {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d = crate::simd::unit_u8::<FMA>(s);
                }
            }
        }
    }
}

/// 3 planes of `n` bytes into `n` interleaved RGB pixels in `dst`.
pub fn interleave_u8(planes: &[u8], n: usize, dst: &mut [u8]) {
    let (r, g, b) = (&planes[..n], &planes[n..2 * n], &planes[2 * n..3 * n]);
    for (i, px) in dst.chunks_exact_mut(3).take(n).enumerate() {
        px.copy_from_slice(&[r[i], g[i], b[i]]);
    }
}

/// Interleaved f32 HWC (3 channels) -> planar CHW.
pub fn hwc_to_chw(src: &[f32], n: usize, dst: &mut [f32]) {
    for (i, px) in src.chunks_exact(3).take(n).enumerate() {
        for c in 0..3 {
            dst[c * n + i] = px[c];
        }
    }
}

/// Planar CHW (3 planes of `n`) -> interleaved f32 HWC.
pub fn chw_to_hwc(src: &[f32], n: usize, dst: &mut [f32]) {
    for (i, px) in dst.chunks_exact_mut(3).take(n).enumerate() {
        for c in 0..3 {
            px[c] = src[c * n + i];
        }
    }
}
