//! Grayscale with the official weights (0.2989, 0.5870, 0.1140), copied to 3 channels.
//! The weights sum to 0.9999, not 1 (white becomes 0.9999); there is no clip in the op.

/// The official luma weights.
pub const GRAY_WEIGHTS: [f32; 3] = [0.2989, 0.5870, 0.1140];

/// `g = 0.2989 r + 0.5870 g + 0.1140 b` written to all three planes (`n` values each).
pub fn grayscale(img: &mut [f32], n: usize) {
    grayscale_first_plane(img, n);
    spread_first_plane(img, n);
}

/// Copies the first plane (`n` values) over the other two: a gray image held as one plane
/// back to three.
pub fn spread_first_plane(img: &mut [f32], n: usize) {
    let (first, rest) = img.split_at_mut(n);
    rest[..n].copy_from_slice(first);
    rest[n..2 * n].copy_from_slice(first);
}

multiversion! {
    /// The luma of [`grayscale`] written to the first plane only; planes 1 and 2 keep
    /// their old values. For pipelines that carry a gray image as one plane.
    pub fn grayscale_first_plane(img: &mut [f32], n: usize) {
        let (r, rest) = img.split_at_mut(n);
        let (g, b) = rest.split_at(n);
        let b = &b[..n];
        let [wr, wg, wb] = GRAY_WEIGHTS;
        for ((r, &g), &b) in r.iter_mut().zip(g).zip(b) {
            *r = *r * wr + g * wg + b * wb;
        }
    }
}
