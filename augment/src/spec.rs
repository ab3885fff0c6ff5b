//! The view specs (T for view 1, T' for view 2) and the whole augmentation config, with
//! the official BYOL values as defaults and a small-image preset.
//!
//! In a config file (TOML shown; any serde format works) every key is optional and unknown
//! keys are rejected. A view table only overrides the keys it names; the rest come from
//! the preset's spec for *that* view (so `[augment.view2] solarize_p = 0.3` keeps T''s
//! blur_p = 0.1):
//!
//! ```toml
//! [augment]
//! preset = "byol"      # or "small": no blur in either view (CIFAR-style 32 px recipes),
//!                      # or "msf": view 1 strong, view 2 weak (MSF's asymmetric pair)
//! size = 224           # output side in pixels (default 224 for byol, 32 for small)
//! [augment.view1]
//! blur_p = 1.0
//! [augment.view2]
//! solarize_p = 0.2
//! ```

use serde::{Deserialize, Serialize};

use crate::crop::Interpolation;
use crate::error::{AugmentError, invalid};
use crate::normalize::{IMAGENET_MEAN, IMAGENET_STD};

macro_rules! view_spec {
    ($( $(#[doc = $doc:expr])* $field:ident : $ty:ty ),* $(,)?) => {
        /// Parameters of one view's random transform (T or T'). Every probability and
        /// range of BYOL's augmentation is here; defaults are the official T (view 1).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct ViewSpec {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        /// A view table as written in a config: only the keys present override the base.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ViewSpecPatch {
            $( #[serde(default)] $field: Option<$ty>, )*
        }

        impl ViewSpecPatch {
            fn apply(self, mut base: ViewSpec) -> ViewSpec {
                $( if let Some(v) = self.$field { base.$field = v; } )*
                base
            }
        }
    };
}

view_spec! {
    /// Crop area as a fraction of the image area, `[min, max]` (official `[0.08, 1.0]`).
    scale: [f32; 2],
    /// Crop aspect ratio w/h, `[min, max]`, sampled log-uniformly (official `[3/4, 4/3]`).
    ratio: [f32; 2],
    /// Resize filter of the crop (`"bicubic"`, `"bilinear"`, `"lanczos3"`).
    interpolation: Interpolation,
    /// Probability of a horizontal flip (0.5).
    flip_p: f32,
    /// Probability that the colour jitter runs (0.8).
    jitter_p: f32,
    /// Brightness strength: delta ~ U[-b, b] (0.4). 0 disables the op.
    brightness: f32,
    /// Contrast strength: factor ~ U[1-c, 1+c] (0.4), in [0, 1]. 0 disables the op.
    contrast: f32,
    /// Saturation strength: factor ~ U[1-s, 1+s] (0.2), in [0, 1]. 0 disables the op.
    saturation: f32,
    /// Hue strength: delta ~ U[-h, h] turns (0.1), in [0, 0.5]. 0 disables the op.
    hue: f32,
    /// Probability of grayscale, drawn independently of the jitter (0.2).
    grayscale_p: f32,
    /// Probability of the gaussian blur (1.0 for T, 0.1 for T').
    blur_p: f32,
    /// Blur sigma range in pixels, `[min, max]` (`[0.1, 2.0]`).
    blur_sigma: [f32; 2],
    /// Blur kernel size = output height / blur_divider; radius = int(size / 2) (10).
    blur_divider: f32,
    /// Probability of solarize (0.0 for T, 0.2 for T').
    solarize_p: f32,
    /// Solarize threshold: `x < t ? x : 1 - x` (0.5).
    solarize_threshold: f32,
    /// Per-channel mean subtracted by the f32 output (ImageNet).
    mean: [f32; 3],
    /// Per-channel std dividing the f32 output (ImageNet).
    std: [f32; 3],
}

impl Default for ViewSpec {
    fn default() -> Self {
        Self::byol_view1()
    }
}

impl ViewSpec {
    /// The official T (view 1): blur always, never solarize.
    pub fn byol_view1() -> Self {
        Self {
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            interpolation: Interpolation::Bicubic,
            flip_p: 0.5,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_p: 1.0,
            blur_sigma: [0.1, 2.0],
            blur_divider: 10.0,
            solarize_p: 0.0,
            solarize_threshold: 0.5,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// The official T' (view 2): blur with p = 0.1, solarize with p = 0.2.
    pub fn byol_view2() -> Self {
        Self {
            blur_p: 0.1,
            solarize_p: 0.2,
            ..Self::byol_view1()
        }
    }

    /// Checks every value; errors name the key as `{prefix}.{key}`.
    pub fn validate(&self, prefix: &str) -> Result<(), AugmentError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let prob = |k: &str, p: f32| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(invalid(
                    key(k),
                    format!("probability {p} is outside [0, 1]"),
                ))
            }
        };
        prob("flip_p", self.flip_p)?;
        prob("jitter_p", self.jitter_p)?;
        prob("grayscale_p", self.grayscale_p)?;
        prob("blur_p", self.blur_p)?;
        prob("solarize_p", self.solarize_p)?;
        let [lo, hi] = self.scale;
        if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
            return Err(invalid(
                key("scale"),
                format!("need 0 < min <= max <= 1, got [{lo}, {hi}]"),
            ));
        }
        let [lo, hi] = self.ratio;
        if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
            return Err(invalid(
                key("ratio"),
                format!("need 0 < min <= max (finite), got [{lo}, {hi}]"),
            ));
        }
        let strength = |k: &str, v: f32, max: f32| {
            if (0.0..=max).contains(&v) {
                Ok(())
            } else {
                Err(invalid(
                    key(k),
                    format!("strength {v} is outside [0, {max}]"),
                ))
            }
        };
        strength("brightness", self.brightness, 1.0)?;
        strength("contrast", self.contrast, 1.0)?;
        strength("saturation", self.saturation, 1.0)?;
        strength("hue", self.hue, 0.5)?;
        let [lo, hi] = self.blur_sigma;
        if !(lo > 0.0 && lo <= hi && hi.is_finite()) {
            return Err(invalid(
                key("blur_sigma"),
                format!("need 0 < min <= max (finite), got [{lo}, {hi}]"),
            ));
        }
        if !(self.blur_divider > 0.0 && self.blur_divider.is_finite()) {
            return Err(invalid(
                key("blur_divider"),
                format!("must be a positive number, got {}", self.blur_divider),
            ));
        }
        if !self.solarize_threshold.is_finite() {
            return Err(invalid(key("solarize_threshold"), "must be finite"));
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            return Err(invalid(
                key("mean"),
                format!("must be finite, got {:?}", self.mean),
            ));
        }
        if self.std.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
            return Err(invalid(
                key("std"),
                format!("must be positive, got {:?}", self.std),
            ));
        }
        Ok(())
    }
}

/// Named starting points for [`AugmentConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The official BYOL T / T' (ImageNet, 224 px).
    #[default]
    Byol,
    /// Small images (CIFAR-style, 32 px): as `byol` but no blur in either view.
    Small,
    /// MSF's asymmetric pair (Koohpayegani et al. 2021, 224 px): view 1 strong (MoCo
    /// v2's augmentation: crop scale [0.2, 1], colour jitter 0.4/0.4/0.4/0.1 with
    /// p = 0.8, grayscale 0.2, blur 0.5, flip), view 2 weak (crop scale [0.2, 1] and
    /// flip only). MSF feeds view 1 to the online network and view 2 to the target.
    Msf,
}

/// The whole augmentation config: output size and the two view specs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawAugmentConfig")]
pub struct AugmentConfig {
    /// The preset the views started from (informational once built).
    pub preset: Preset,
    /// Output side in pixels (views are `size` x `size`).
    pub size: u32,
    /// T: the spec of view 1.
    pub view1: ViewSpec,
    /// T': the spec of view 2.
    pub view2: ViewSpec,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self::byol(224)
    }
}

impl AugmentConfig {
    /// The official BYOL views at `size` px.
    pub fn byol(size: u32) -> Self {
        Self {
            preset: Preset::Byol,
            size,
            view1: ViewSpec::byol_view1(),
            view2: ViewSpec::byol_view2(),
        }
    }

    /// The small-image preset at `size` px: BYOL's views without blur (both views).
    pub fn small(size: u32) -> Self {
        let mut c = Self::byol(size);
        c.preset = Preset::Small;
        c.view1.blur_p = 0.0;
        c.view2.blur_p = 0.0;
        c
    }

    /// MSF's strong (view 1) and weak (view 2) views at `size` px ([`Preset::Msf`]).
    pub fn msf(size: u32) -> Self {
        let strong = ViewSpec {
            scale: [0.2, 1.0],
            saturation: 0.4,
            blur_p: 0.5,
            solarize_p: 0.0,
            ..ViewSpec::byol_view1()
        };
        let weak = ViewSpec {
            jitter_p: 0.0,
            grayscale_p: 0.0,
            blur_p: 0.0,
            ..strong.clone()
        };
        Self {
            preset: Preset::Msf,
            size,
            view1: strong,
            view2: weak,
        }
    }

    /// The preset's config at its default size (224 for byol and msf, 32 for small).
    pub fn from_preset(preset: Preset) -> Self {
        match preset {
            Preset::Byol => Self::byol(224),
            Preset::Small => Self::small(32),
            Preset::Msf => Self::msf(224),
        }
    }

    /// Checks every value; the error names the offending key.
    pub fn validate(&self) -> Result<(), AugmentError> {
        if self.size == 0 {
            return Err(invalid("size", "output size must be at least 1 pixel"));
        }
        if self.size > 8192 {
            return Err(invalid(
                "size",
                format!("{} px is over the 8192 px limit", self.size),
            ));
        }
        self.view1.validate("view1")?;
        self.view2.validate("view2")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAugmentConfig {
    #[serde(default)]
    preset: Preset,
    #[serde(default)]
    size: Option<u32>,
    #[serde(default)]
    view1: ViewSpecPatch,
    #[serde(default)]
    view2: ViewSpecPatch,
}

impl From<RawAugmentConfig> for AugmentConfig {
    fn from(raw: RawAugmentConfig) -> Self {
        let mut c = Self::from_preset(raw.preset);
        if let Some(size) = raw.size {
            c.size = size;
        }
        c.view1 = raw.view1.apply(c.view1);
        c.view2 = raw.view2.apply(c.view2);
        c
    }
}
