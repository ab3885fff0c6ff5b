//! Layout conversions between interleaved HWC and planar CHW.

multiversion! {
    /// RGB8 HWC -> planar f32 `x / 255`, optionally mirrored left/right (the flip fused into
    /// the load). `dst` holds 3 planes of `width * height`.
    pub fn load_rgb8(src: &[u8], width: usize, height: usize, flip: bool, dst: &mut [f32]) {
        let n = width * height;
        let (r, rest) = dst.split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        for y in 0..height {
            let row = &src[y * width * 3..(y + 1) * width * 3];
            let (ro, go, bo) = (
                &mut r[y * width..(y + 1) * width],
                &mut g[y * width..(y + 1) * width],
                &mut b[y * width..(y + 1) * width],
            );
            if flip {
                for (x, px) in row.chunks_exact(3).rev().enumerate() {
                    ro[x] = px[0] as f32 / 255.0;
                    go[x] = px[1] as f32 / 255.0;
                    bo[x] = px[2] as f32 / 255.0;
                }
            } else {
                for (x, px) in row.chunks_exact(3).enumerate() {
                    ro[x] = px[0] as f32 / 255.0;
                    go[x] = px[1] as f32 / 255.0;
                    bo[x] = px[2] as f32 / 255.0;
                }
            }
        }
    }
}

multiversion! {
    /// Planar u8 (3 planes of `width * height`) -> planar f32 `x / 255`, optionally
    /// mirrored left/right (the flip fused into the load).
    pub fn load_planes_u8(src: &[u8], width: usize, height: usize, flip: bool, dst: &mut [f32]) {
        let n = width * height;
        for (s, d) in src[..3 * n].chunks_exact(width).zip(dst[..3 * n].chunks_exact_mut(width)) {
            if flip {
                for (d, &s) in d.iter_mut().zip(s.iter().rev()) {
                    *d = f32::from(s) / 255.0;
                }
            } else {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d = f32::from(s) / 255.0;
                }
            }
        }
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
