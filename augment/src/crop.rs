//! Random resized crop: the official BYOL box sampling and a fused crop + resize.
//!
//! Box sampling follows `dataset._decode_and_random_crop` of the official code: one draw of
//! the area fraction in `scale`, one of the log aspect ratio in `ln(ratio)`, sides rounded
//! half-to-even and clamped to the image (no rejection loop, no centre-crop fallback: an
//! over-large side is clamped, which changes the aspect ratio), then uniform integer offsets.
//!
//! The resize is Pillow's antialiased bicubic (Keys cubic, a = -0.5, kernel widened by the
//! scale factor when shrinking), computed by our port of Pillow's resampler
//! ([`crate::resample`]) on the u8 crop, exactly as Pillow does it (fixed point, u8 between and after the two passes). See the crate
//! README for why we follow Pillow rather than TensorFlow's non-antialiased bicubic.

use serde::{Deserialize, Serialize};

use crate::error::AugmentError;
use crate::layout::interleave_u8;
pub use crate::resample::PlanesOut;
use crate::resample::{Filter, Resampler};

/// A crop rectangle in pixels of the source image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CropBox {
    /// First row.
    pub offset_h: u32,
    /// First column.
    pub offset_w: u32,
    /// Number of rows.
    pub h: u32,
    /// Number of columns.
    pub w: u32,
}

/// The four uniform [0,1) draws behind one random crop box, in the order they are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CropDraws {
    /// Area fraction draw.
    pub u_area: f32,
    /// Log aspect ratio draw.
    pub u_log_ratio: f32,
    /// Column offset draw.
    pub u_offset_w: f32,
    /// Row offset draw.
    pub u_offset_h: f32,
}

/// The official random crop box of an `height` x `width` image (f32 arithmetic as in TF).
///
/// `scale` = (min, max) area fraction, `ratio` = (min, max) width/height ratio, sampled
/// log-uniformly. `offset = floor(u * (side - crop + 1))`, a uniform integer in
/// `[0, side - crop]`.
pub fn random_crop_box(
    height: u32,
    width: u32,
    scale: [f32; 2],
    ratio: [f32; 2],
    d: CropDraws,
) -> CropBox {
    let area = (height as f32) * (width as f32);
    let target_area = (d.u_area * (scale[1] - scale[0]) + scale[0]) * area;
    let (lo, hi) = (ratio[0].ln(), ratio[1].ln());
    let aspect = (d.u_log_ratio * (hi - lo) + lo).exp();
    let sw = (target_area * aspect).sqrt();
    let sh = (target_area / aspect).sqrt();
    // tf.round is half-to-even; at least one pixel so tiny images never give an empty box.
    let w = (sw.round_ties_even() as u32).clamp(1, width);
    let h = (sh.round_ties_even() as u32).clamp(1, height);
    let offset_w = ((d.u_offset_w as f64 * (width - w + 1) as f64).floor() as u32).min(width - w);
    let offset_h = ((d.u_offset_h as f64 * (height - h + 1) as f64).floor() as u32).min(height - h);
    CropBox {
        offset_h,
        offset_w,
        h,
        w,
    }
}

/// The official evaluation centre crop: side `trunc(f32(size/(size+padding)) * min(H,W))`.
pub fn center_crop_box(height: u32, width: u32, image_size: u32, crop_padding: u32) -> CropBox {
    let frac = (image_size as f64 / (image_size + crop_padding) as f64) as f32;
    let s = ((frac * height.min(width) as f32) as u32).max(1);
    CropBox {
        offset_h: (height - s).div_ceil(2),
        offset_w: (width - s).div_ceil(2),
        h: s,
        w: s,
    }
}

/// Resampling filter of the crop resize. All are antialiased convolutions (Pillow's
/// definition): the kernel widens with the scale factor when shrinking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// Keys cubic with a = -0.5 (Catmull-Rom), Pillow's `BICUBIC`. The default.
    #[default]
    Bicubic,
    /// Triangle filter, Pillow's `BILINEAR`.
    Bilinear,
    /// Lanczos with 3 lobes, Pillow's `LANCZOS`.
    Lanczos3,
}

impl Interpolation {
    fn filter(self) -> Filter {
        match self {
            Interpolation::Bicubic => Filter::Bicubic,
            Interpolation::Bilinear => Filter::Bilinear,
            Interpolation::Lanczos3 => Filter::Lanczos3,
        }
    }
}

/// Fused crop + resize of an RGB8 HWC image into an RGB8 HWC buffer (reusable state).
#[derive(Debug, Default, Clone)]
pub struct CropResizer {
    resampler: Resampler,
    /// Planar result of [`CropResizer::crop_resize`], before interleaving.
    planes: Vec<u8>,
}

impl CropResizer {
    /// A resizer with empty internal buffers (they grow once, then are reused).
    pub fn new() -> Self {
        Self::default()
    }

    /// Grows the buffers for any crop of images up to `max_width` x `max_height` resized
    /// to `out` x `out`.
    pub fn reserve(&mut self, max_width: u32, max_height: u32, out: u32) {
        self.resampler.reserve(
            max_width as usize,
            max_height as usize,
            out as usize,
            out as usize,
        );
    }

    /// Resizes the `crop` of `src` (`width` x `height`, RGB8 HWC) to `out_w` x `out_h` into
    /// `dst`, 3 planes (R, G, B) of `out_w x out_h` (bytes, or f32 `x / 255` optionally
    /// mirrored). Pixels outside the box are not used: this equals Pillow's
    /// `img.crop(box).resize((out_w, out_h), filter)`.
    #[allow(clippy::too_many_arguments)]
    pub fn crop_resize_planar(
        &mut self,
        src: &[u8],
        width: u32,
        height: u32,
        crop: CropBox,
        interpolation: Interpolation,
        dst: PlanesOut<'_>,
        out_w: u32,
        out_h: u32,
    ) -> Result<(), AugmentError> {
        let window = check(src, width, height, crop, dst.len(), out_w, out_h)?;
        let (filter, w, h) = (interpolation.filter(), out_w as usize, out_h as usize);
        self.resampler
            .crop_resize(src, width as usize, window, filter, dst, w, h);
        Ok(())
    }

    /// As [`CropResizer::crop_resize_planar`], into RGB8 HWC (`out_h * out_w * 3` bytes).
    #[allow(clippy::too_many_arguments)]
    pub fn crop_resize(
        &mut self,
        src: &[u8],
        width: u32,
        height: u32,
        crop: CropBox,
        interpolation: Interpolation,
        dst: &mut [u8],
        out_w: u32,
        out_h: u32,
    ) -> Result<(), AugmentError> {
        let mut planes = std::mem::take(&mut self.planes);
        planes.resize(dst.len(), 0);
        let done = self.crop_resize_planar(
            src,
            width,
            height,
            crop,
            interpolation,
            PlanesOut::U8(&mut planes),
            out_w,
            out_h,
        );
        if done.is_ok() {
            interleave_u8(&planes, dst.len() / 3, dst);
        }
        self.planes = planes;
        done
    }
}

/// Checks a crop-and-resize request; returns the window as (x, y, w, h).
fn check(
    src: &[u8],
    width: u32,
    height: u32,
    crop: CropBox,
    dst_len: usize,
    out_w: u32,
    out_h: u32,
) -> Result<(usize, usize, usize, usize), AugmentError> {
    if src.len() != width as usize * height as usize * 3 {
        return Err(AugmentError::BadInput(format!(
            "{} bytes is not a {width}x{height} RGB8 image",
            src.len()
        )));
    }
    if crop.w == 0
        || crop.h == 0
        || crop.offset_w + crop.w > width
        || crop.offset_h + crop.h > height
    {
        return Err(AugmentError::BadInput(format!(
            "crop {crop:?} outside a {width}x{height} image"
        )));
    }
    if out_w == 0 || out_h == 0 || dst_len != out_w as usize * out_h as usize * 3 {
        return Err(AugmentError::Resize(format!(
            "output of {dst_len} values for {out_w}x{out_h} RGB"
        )));
    }
    Ok((
        crop.offset_w as usize,
        crop.offset_h as usize,
        crop.w as usize,
        crop.h as usize,
    ))
}
