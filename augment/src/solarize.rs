//! Solarize: `x < threshold ? x : 1 - x` (threshold 0.5 in BYOL; p = 0 for T, 0.2 for T').

multiversion! {
    /// Solarizes every value in place.
    pub fn solarize(img: &mut [f32], threshold: f32) {
        for x in img.iter_mut() {
            *x = solarize_value(*x, threshold);
        }
    }
}

/// One value: `x < threshold ? x : 1 - x`.
#[inline(always)]
pub fn solarize_value(x: f32, threshold: f32) -> f32 {
    if x < threshold { x } else { 1.0 - x }
}
