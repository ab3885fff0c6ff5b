//! Horizontal flip: reverses the W axis (`jnp.fliplr` on HWC). p = 0.5 in BYOL.
//!
//! The pipeline does not call this: it fuses the flip into the u8 -> f32 load of the
//! resized crop (reading each row backwards), which costs nothing.

/// Flips a planar image (`planes` planes of `height` rows of `width` values) in place.
pub fn hflip(img: &mut [f32], width: usize, height: usize, planes: usize) {
    for row in img.chunks_exact_mut(width).take(height * planes) {
        row.reverse();
    }
}

/// Flips an interleaved RGB8 HWC image in place.
pub fn hflip_rgb8(img: &mut [u8], width: usize, height: usize) {
    for row in img.chunks_exact_mut(width * 3).take(height) {
        let (mut i, mut j) = (0, width.saturating_sub(1));
        while i < j {
            for c in 0..3 {
                row.swap(i * 3 + c, j * 3 + c);
            }
            i += 1;
            j -= 1;
        }
    }
}
