//! Byte-matrix transpose, the step that lets the resampler run both of its passes as
//! contiguous, vectorised sums over lines.
//!
//! On x86-64 the matrix goes through SSE2 in 16 x 16 blocks (SSE2 is part of the x86-64
//! baseline, so there is no run-time check): 16 loads, 64 unpacks and 16 stores per 256
//! bytes, against a load and a store per byte for the plain loop, which handles matrices
//! under 16 in either direction and other targets.

/// Writes the transpose of `lines` lines of `n` bytes (line `l` starts at
/// `src[l * src_stride]`) into `n` lines of `lines` bytes (line `p` starts at
/// `dst[p * dst_stride]`): `dst[p * dst_stride + l] = src[l * src_stride + p]`.
pub fn transpose_u8(
    src: &[u8],
    src_stride: usize,
    lines: usize,
    n: usize,
    dst: &mut [u8],
    dst_stride: usize,
) {
    if lines == 0 || n == 0 {
        return;
    }
    assert!(
        src.len() >= (lines - 1) * src_stride + n && dst.len() >= (n - 1) * dst_stride + lines,
        "transpose buffers too small"
    );
    #[cfg(target_arch = "x86_64")]
    if lines >= 16 && n >= 16 {
        // Blocks of 16 x 16, the last one in each direction moved back to end at the edge
        // (overlapping its neighbour, which only writes the same bytes twice).
        for l0 in block_starts(lines) {
            for p0 in block_starts(n) {
                // SAFETY: SSE2 is part of the x86-64 baseline, so every x86-64 CPU has it,
                // and the block lies inside the extents asserted above.
                unsafe { sse2::block16(src, src_stride, l0, p0, dst, dst_stride) };
            }
        }
        return;
    }
    scalar(src, src_stride, lines, n, dst, dst_stride);
}

/// 0, 16, 32, ... and finally `len - 16`, for `len >= 16`.
#[cfg(target_arch = "x86_64")]
fn block_starts(len: usize) -> impl Iterator<Item = usize> {
    (0..len / 16)
        .map(|i| i * 16)
        .chain((!len.is_multiple_of(16)).then_some(len - 16))
}

/// The plain loop, in 32 x 32 blocks.
fn scalar(
    src: &[u8],
    src_stride: usize,
    lines: usize,
    n: usize,
    dst: &mut [u8],
    dst_stride: usize,
) {
    const BLOCK: usize = 32;
    for l0 in (0..lines).step_by(BLOCK) {
        let l1 = (l0 + BLOCK).min(lines);
        for p0 in (0..n).step_by(BLOCK) {
            let p1 = (p0 + BLOCK).min(n);
            for l in l0..l1 {
                let line = &src[l * src_stride..];
                for p in p0..p1 {
                    dst[p * dst_stride + l] = line[p];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::{
        __m128i, _mm_loadu_si128, _mm_storeu_si128, _mm_unpackhi_epi8, _mm_unpackhi_epi16,
        _mm_unpackhi_epi32, _mm_unpackhi_epi64, _mm_unpacklo_epi8, _mm_unpacklo_epi16,
        _mm_unpacklo_epi32, _mm_unpacklo_epi64,
    };

    /// Interleaves the pairs `(v[i], v[i + half])` at one width: `lo` / `hi` results go to
    /// slots 2i / 2i+1 (within each group of `2 * half` registers).
    macro_rules! round {
        ($v:expr, $half:expr, $lo:ident, $hi:ident) => {{
            let v = $v;
            let mut out = v;
            let mut g = 0;
            while g < 16 {
                let mut i = 0;
                while i < $half {
                    out[g + 2 * i] = $lo(v[g + i], v[g + i + $half]);
                    out[g + 2 * i + 1] = $hi(v[g + i], v[g + i + $half]);
                    i += 1;
                }
                g += 2 * $half;
            }
            out
        }};
    }

    /// Transposes the 16 x 16 block at line `l0`, position `p0` with four rounds of
    /// interleaves (bytes, then 16-, 32- and 64-bit groups), after which register `k`
    /// holds position `p0 + k` of the 16 lines.
    ///
    /// # Safety
    /// Lines `l0..l0 + 16` of `src` must hold positions `p0..p0 + 16`, and lines
    /// `p0..p0 + 16` of `dst` positions `l0..l0 + 16` (the caller checks the extents).
    #[target_feature(enable = "sse2")]
    pub(super) unsafe fn block16(
        src: &[u8],
        src_stride: usize,
        l0: usize,
        p0: usize,
        dst: &mut [u8],
        dst_stride: usize,
    ) {
        let from = src.as_ptr().wrapping_add(l0 * src_stride + p0);
        let to = dst.as_mut_ptr().wrapping_add(p0 * dst_stride + l0);
        // SAFETY: in bounds by the contract; unaligned loads.
        let a: [__m128i; 16] =
            std::array::from_fn(|i| unsafe { _mm_loadu_si128(from.add(i * src_stride).cast()) });
        // Byte pairs of lines (0, 1), (2, 3), ...: the lines are v[i] and v[i + 1] in
        // groups of 2, then 16-bit pairs across groups of 4, 32-bit across 8, 64-bit
        // across 16; the slot order after each round makes the next one regular.
        let b = round!(a, 1, _mm_unpacklo_epi8, _mm_unpackhi_epi8);
        let c = round!(b, 2, _mm_unpacklo_epi16, _mm_unpackhi_epi16);
        let d = round!(c, 4, _mm_unpacklo_epi32, _mm_unpackhi_epi32);
        let e = round!(d, 8, _mm_unpacklo_epi64, _mm_unpackhi_epi64);
        for (k, e) in e.iter().enumerate() {
            // SAFETY: in bounds by the contract; unaligned stores.
            unsafe { _mm_storeu_si128(to.add(k * dst_stride).cast(), *e) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition_at_every_edge_size() {
        for (lines, n) in [(1, 1), (16, 16), (17, 33), (40, 16), (16, 45), (53, 71)] {
            let (ss, ds) = (n + 3, lines + 5);
            let src: Vec<u8> = (0..lines * ss).map(|i| (i * 31 % 251) as u8).collect();
            let mut dst = vec![0u8; n * ds];
            transpose_u8(&src, ss, lines, n, &mut dst, ds);
            for l in 0..lines {
                for p in 0..n {
                    assert_eq!(dst[p * ds + l], src[l * ss + p], "{lines}x{n} at {l},{p}");
                }
            }
        }
    }
}
