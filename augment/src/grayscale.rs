//! Grayscale with the official weights (0.2989, 0.5870, 0.1140), copied to 3 channels.
//! The weights sum to 0.9999, not 1 (white becomes 0.9999); there is no clip in the op.

/// The official luma weights.
pub const GRAY_WEIGHTS: [f32; 3] = [0.2989, 0.5870, 0.1140];

multiversion! {
    /// `g = 0.2989 r + 0.5870 g + 0.1140 b` written to all three planes (`n` values each).
    pub fn grayscale(img: &mut [f32], n: usize) {
        let (r, rest) = img.split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        let b = &mut b[..n];
        let [wr, wg, wb] = GRAY_WEIGHTS;
        for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
            let y = *r * wr + *g * wg + *b * wb;
            *r = y;
            *g = y;
            *b = y;
        }
    }
}
