//! What an encoder expects of its input: the side its views had, how they were
//! normalised and resized. A run records it in every checkpoint ([`InputSpec`] in
//! `CheckpointMeta::input`), so that evaluation, the run's monitor and exports feed the
//! encoder what it was trained on instead of assuming ImageNet's statistics.

use byol_augment::normalize::{IMAGENET_MEAN, IMAGENET_STD};
use byol_augment::{AugmentConfig, Interpolation};
use serde::{Deserialize, Serialize};

/// The preprocessing an encoder was trained with, as torchvision's transforms state it:
/// `Normalize(mean, std)` of RGB values scaled to [0, 1], after a resize to `size` px
/// with `interpolation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Side in pixels of the square views the encoder was trained on.
    pub size: u32,
    /// Per-channel mean (R, G, B) subtracted from the [0, 1] values.
    pub mean: [f32; 3],
    /// Per-channel standard deviation (R, G, B) the centred values are divided by.
    pub std: [f32; 3],
    /// The resize filter of the views (Pillow's definitions).
    pub interpolation: Interpolation,
}

impl InputSpec {
    /// ImageNet's statistics (torchvision's `Normalize` of its pretrained models) at
    /// `size` px with bicubic resizing: what a checkpoint without a record gets.
    pub fn imagenet(size: u32) -> Self {
        InputSpec {
            size,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            interpolation: Interpolation::Bicubic,
        }
    }

    /// The preprocessing of a run's views: their size, and view 1's normalisation and
    /// filter (view 1 is the online network's input in every objective that
    /// distinguishes the two; the presets give both views the same values).
    pub fn of_views(aug: &AugmentConfig) -> Self {
        InputSpec {
            size: aug.size,
            mean: aug.view1.mean,
            std: aug.view1.std,
            interpolation: aug.view1.interpolation,
        }
    }

    /// One line for people: `28 px, bicubic, mean (0.286, 0.286, 0.286), std (…)`.
    pub fn describe(&self) -> String {
        let triple = |v: [f32; 3]| format!("({}, {}, {})", v[0], v[1], v[2]);
        format!(
            "{} px, {}, mean {}, std {}",
            self.size,
            serde_json::to_value(self.interpolation)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            triple(self.mean),
            triple(self.std)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_views_normalisation_is_taken_from_view_one() {
        let mut aug = AugmentConfig::small(28);
        aug.view1.mean = [0.286; 3];
        aug.view1.std = [0.353; 3];
        aug.view1.interpolation = Interpolation::Bilinear;
        let spec = InputSpec::of_views(&aug);
        assert_eq!(spec.size, 28);
        assert_eq!(spec.mean, [0.286; 3]);
        assert_eq!(spec.std, [0.353; 3]);
        assert_eq!(spec.interpolation, Interpolation::Bilinear);
        assert_eq!(
            spec.describe(),
            "28 px, bilinear, mean (0.286, 0.286, 0.286), std (0.353, 0.353, 0.353)"
        );
        let back: InputSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        assert_eq!(InputSpec::imagenet(224).mean, IMAGENET_MEAN);
    }
}
