//! The two-view pipeline: one decoded RGB8 image in, two augmented views out, written
//! straight into caller-provided slots.
//!
//! Per view, in the official order: random resized crop (fused crop + resize, u8) -> `/ 255` to f32 and
//! horizontal flip (both fused into the resize's last pass) -> colour jitter in random order (each op
//! clipped) -> grayscale -> gaussian blur -> solarize -> clip -> normalise (fused into the
//! write of the outputs). All random draws come from the view's own stream
//! ([`SampleKey::view_rng`]), always the same 17 draws in the same order, whatever the
//! config enables:
//!
//! `u_area, u_log_ratio, u_offset_w, u_offset_h, flip, jitter, grayscale, perm x3,
//!  brightness, contrast, saturation, hue, blur, sigma, solarize`.

use crate::blur::{BlurScratch, blur_radius, gaussian_blur, gaussian_kernel_into, trimmed_radius};
use crate::color_jitter::{ColorParams, color_transform, color_transform_gray_as_one_plane};
use crate::crop::{CropBox, CropDraws, CropResizer, PlanesOut, random_crop_box};
use crate::error::AugmentError;
use crate::flip::hflip;
use crate::normalize::{clip, finish};
use crate::rng::{SampleKey, ViewRng};
use crate::solarize::solarize;
use crate::spec::{AugmentConfig, ViewSpec};

/// Every random choice of one view, drawn from its stream (or set by hand).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ViewParams {
    /// The crop box in the source image.
    pub crop: CropBox,
    /// Horizontal flip.
    pub flip: bool,
    /// Colour jitter and grayscale.
    pub color: ColorParams,
    /// Blur sigma, `None` = no blur.
    pub blur_sigma: Option<f32>,
    /// Solarize on/off.
    pub solarize: bool,
}

impl ViewParams {
    /// Draws a view's parameters for a `src_width` x `src_height` image (17 draws).
    pub fn draw(spec: &ViewSpec, src_width: u32, src_height: u32, rng: &mut ViewRng) -> Self {
        let draws = CropDraws {
            u_area: rng.uniform(),
            u_log_ratio: rng.uniform(),
            u_offset_w: rng.uniform(),
            u_offset_h: rng.uniform(),
        };
        let crop = random_crop_box(src_height, src_width, spec.scale, spec.ratio, draws);
        let flip = rng.bernoulli(spec.flip_p);
        let apply_jitter = rng.bernoulli(spec.jitter_p);
        let apply_grayscale = rng.bernoulli(spec.grayscale_p);
        // Uniform permutation of the four jitter ops (Fisher-Yates, 3 draws).
        let mut order = [0u8, 1, 2, 3];
        for i in (1..4).rev() {
            let j = ((rng.uniform() * (i + 1) as f32) as usize).min(i);
            order.swap(i, j);
        }
        let sym = |rng: &mut ViewRng, s: f32| rng.range(-s, s);
        let brightness = sym(rng, spec.brightness);
        let contrast = 1.0 + sym(rng, spec.contrast);
        let saturation = 1.0 + sym(rng, spec.saturation);
        let hue = sym(rng, spec.hue);
        let on = |s: f32, v: f32| (s > 0.0).then_some(v);
        let color = ColorParams {
            order,
            brightness_delta: on(spec.brightness, brightness),
            contrast_factor: on(spec.contrast, contrast),
            saturation_factor: on(spec.saturation, saturation),
            hue_delta: on(spec.hue, hue),
            apply_jitter,
            apply_grayscale,
        };
        let blur = rng.bernoulli(spec.blur_p);
        let sigma = rng.range(spec.blur_sigma[0], spec.blur_sigma[1]);
        let solarize = rng.bernoulli(spec.solarize_p);
        Self {
            crop,
            flip,
            color,
            blur_sigma: blur.then_some(sigma),
            solarize,
        }
    }
}

/// Where one view goes. At least one slot should be given (a view with none is skipped).
#[derive(Debug, Default)]
pub struct ViewOut<'a> {
    /// Normalised f32, CHW, `3 * size * size` values.
    pub chw: Option<&'a mut [f32]>,
    /// Un-normalised `round(255 x)`, u8 HWC, `size * size * 3` bytes.
    pub hwc: Option<&'a mut [u8]>,
    /// Write `chw` with non-temporal stores, past the cache: for slots of a large batch
    /// that is not read before it is handed over (the loader's; 1-11% faster there).
    /// Leave it off for a small buffer that is read again soon (2% slower there).
    pub streaming: bool,
}

impl<'a> ViewOut<'a> {
    /// Only the normalised f32 CHW output.
    pub fn f32(chw: &'a mut [f32]) -> Self {
        Self {
            chw: Some(chw),
            hwc: None,
            streaming: false,
        }
    }

    /// Only the u8 HWC output.
    pub fn u8(hwc: &'a mut [u8]) -> Self {
        Self {
            chw: None,
            hwc: Some(hwc),
            streaming: false,
        }
    }

    /// Both outputs.
    pub fn both(chw: &'a mut [f32], hwc: &'a mut [u8]) -> Self {
        Self {
            chw: Some(chw),
            hwc: Some(hwc),
            streaming: false,
        }
    }

    /// The same slots, the f32 one written with non-temporal stores (see `streaming`).
    pub fn streaming(self) -> Self {
        Self {
            streaming: true,
            ..self
        }
    }
}

/// Per-worker buffers, reused from image to image (no allocation once they have grown).
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    resizer: CropResizer,
    img: Vec<f32>,
    kernel: Vec<f32>,
    blur: BlurScratch,
}

impl Scratch {
    /// Empty buffers; they grow on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grows every buffer for images up to `max_width` x `max_height` with `aug`'s
    /// settings, so later calls on such images allocate nothing.
    pub fn reserve_for(&mut self, aug: &Augmenter, max_width: u32, max_height: u32) {
        let size = aug.size() as usize;
        self.img
            .reserve((3 * size * size).saturating_sub(self.img.len()));
        self.resizer.reserve(max_width, max_height, aug.size());
        self.blur.reserve(size, size);
        let taps = (0..2)
            .map(|v| 2 * blur_radius(size, aug.spec(v).blur_divider) + 1)
            .max()
            .unwrap_or(1);
        self.kernel.reserve(taps.saturating_sub(self.kernel.len()));
    }
}

/// A validated augmentation config, ready to turn images into view pairs. Cheap to share
/// between threads (`&Augmenter` is `Sync`); each thread keeps its own [`Scratch`].
#[derive(Debug, Clone)]
pub struct Augmenter {
    cfg: AugmentConfig,
}

impl Augmenter {
    /// Validates `cfg` (the error names the offending key).
    pub fn new(cfg: AugmentConfig) -> Result<Self, AugmentError> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    /// The config.
    pub fn config(&self) -> &AugmentConfig {
        &self.cfg
    }

    /// Output side in pixels.
    pub fn size(&self) -> u32 {
        self.cfg.size
    }

    /// Length of one view's output slot: `3 * size * size` (f32 CHW and u8 HWC alike).
    pub fn view_len(&self) -> usize {
        3 * self.cfg.size as usize * self.cfg.size as usize
    }

    /// The spec of view 0 (T) or 1 (T').
    pub fn spec(&self, view: usize) -> &ViewSpec {
        if view == 0 {
            &self.cfg.view1
        } else {
            &self.cfg.view2
        }
    }

    /// Draws both views' parameters for sample `key` of a `width` x `height` image.
    pub fn draw(&self, key: SampleKey, width: u32, height: u32) -> [ViewParams; 2] {
        [0, 1].map(|v| ViewParams::draw(self.spec(v), width, height, &mut key.view_rng(v as u64)))
    }

    /// The main entry point: augments `src` (RGB8 HWC, `width` x `height`) into two views
    /// for sample `key`, writing `out[0]` (T) and `out[1]` (T'). Returns the parameters
    /// that were drawn.
    pub fn two_views(
        &self,
        src: &[u8],
        width: u32,
        height: u32,
        key: SampleKey,
        scratch: &mut Scratch,
        out: [ViewOut<'_>; 2],
    ) -> Result<[ViewParams; 2], AugmentError> {
        check_input(src, width, height)?;
        let params = self.draw(key, width, height);
        for (v, o) in out.into_iter().enumerate() {
            self.render(v, &params[v], src, width, height, scratch, o)?;
        }
        Ok(params)
    }

    /// Renders view `view` (0 = T, 1 = T') with given parameters (e.g. from [`Self::draw`]).
    #[allow(clippy::too_many_arguments)]
    pub fn render(
        &self,
        view: usize,
        params: &ViewParams,
        src: &[u8],
        width: u32,
        height: u32,
        scratch: &mut Scratch,
        out: ViewOut<'_>,
    ) -> Result<(), AugmentError> {
        check_input(src, width, height)?;
        let len = self.view_len();
        let names = [["view1.chw", "view1.hwc"], ["view2.chw", "view2.hwc"]][view.min(1)];
        if let Some(chw) = &out.chw
            && chw.len() != len
        {
            return Err(AugmentError::BadOutput {
                slot: names[0],
                got: chw.len(),
                expected: len,
            });
        }
        if let Some(hwc) = &out.hwc
            && hwc.len() != len
        {
            return Err(AugmentError::BadOutput {
                slot: names[1],
                got: hwc.len(),
                expected: len,
            });
        }
        if out.chw.is_none() && out.hwc.is_none() {
            return Ok(());
        }
        let c = params.crop;
        if c.w == 0 || c.h == 0 || c.offset_w + c.w > width || c.offset_h + c.h > height {
            return Err(AugmentError::BadInput(format!(
                "crop box {c:?} is outside the {width}x{height} image"
            )));
        }
        let spec = self.spec(view);
        let size = self.cfg.size as usize;
        let n = size * size;
        scratch.img.resize(3 * n, 0.0);
        let Scratch {
            resizer,
            img,
            kernel,
            blur,
        } = scratch;
        resizer.crop_resize_planar(
            src,
            width,
            height,
            params.crop,
            spec.interpolation,
            PlanesOut::Unit {
                dst: img,
                flip: params.flip,
            },
            size as u32,
            size as u32,
        )?;
        // A view turned gray stays one plane from here on: the blur and the last pass act
        // on every channel alike, so it is blurred once and read for all three.
        let gray = color_transform_gray_as_one_plane(img, n, &params.color);
        let planes = if gray { 1 } else { 3 };
        if let Some(sigma) = params.blur_sigma {
            blur_planes(img, size, size, planes, sigma, spec, kernel, blur);
        }
        let sol = params.solarize.then_some(spec.solarize_threshold);
        let (mean, std) = (spec.mean, spec.std);
        finish(
            img,
            n,
            planes,
            sol,
            mean,
            std,
            out.chw,
            out.hwc,
            out.streaming,
        );
        Ok(())
    }
}

fn check_input(src: &[u8], width: u32, height: u32) -> Result<(), AugmentError> {
    if width == 0 || height == 0 {
        return Err(AugmentError::BadInput(format!("image is {width}x{height}")));
    }
    let want = width as usize * height as usize * 3;
    if src.len() != want {
        return Err(AugmentError::BadInput(format!(
            "{width}x{height} RGB8 needs {want} bytes, got {}",
            src.len()
        )));
    }
    Ok(())
}

/// The official blur with `sigma` on the first `planes` planes of `img` (kernel size from
/// the height, tails below one f32 ulp trimmed).
#[allow(clippy::too_many_arguments)]
fn blur_planes(
    img: &mut [f32],
    width: usize,
    height: usize,
    planes: usize,
    sigma: f32,
    spec: &ViewSpec,
    kernel: &mut Vec<f32>,
    blur: &mut BlurScratch,
) {
    let radius = blur_radius(height, spec.blur_divider);
    gaussian_kernel_into(sigma, radius, kernel);
    let keep = trimmed_radius(kernel);
    let taps = &kernel[radius - keep..=radius + keep];
    gaussian_blur(img, width, height, planes, taps, blur);
}

/// The official `_postprocess_image` on a planar f32 image already cropped and resized:
/// flip -> colour transform -> blur -> solarize -> clip (no normalisation). `img` holds 3
/// planes of `width * height`. Op by op, for tests and tools; the pipeline fuses these
/// steps and keeps gray views as one plane.
pub fn postprocess(
    img: &mut [f32],
    width: usize,
    height: usize,
    params: &ViewParams,
    spec: &ViewSpec,
    scratch: &mut Scratch,
) {
    if params.flip {
        hflip(img, width, height, 3);
    }
    color_transform(img, width * height, &params.color);
    if let Some(sigma) = params.blur_sigma {
        let (kernel, blur) = (&mut scratch.kernel, &mut scratch.blur);
        blur_planes(img, width, height, 3, sigma, spec, kernel, blur);
    }
    if params.solarize {
        solarize(img, spec.solarize_threshold);
    }
    clip(img);
}
