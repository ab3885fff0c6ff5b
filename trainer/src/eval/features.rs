//! Frozen features of a labelled dataset: the evaluation preprocessing (centre crop,
//! resize, the augment crate's normalisation) and batched encoder forwards.

use std::path::PathBuf;

use byol_augment::crop::{CropResizer, PlanesOut, center_crop_box};
use byol_augment::normalize::{IMAGENET_MEAN, IMAGENET_STD};
use byol_augment::{AugmentError, Interpolation};
use byol_ingest::{Dataset, Progress, RecordRef, RecordScratch};
use candle_core::Tensor;

use super::{Encoder, EvalError};
use crate::input::InputSpec;

/// How an image becomes a network input at evaluation time.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Output side in pixels (the model's training input size).
    pub size: u32,
    /// The centre crop keeps `size / (size + crop_padding)` of the short side.
    pub crop_padding: u32,
    /// Resize filter (the views' default, Pillow's bicubic).
    pub interpolation: Interpolation,
    /// Per-channel mean subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    pub std: [f32; 3],
}

impl Preprocess {
    /// The evaluation preprocessing at `size` px: BYOL's centre crop (224 of 256, i.e.
    /// 87.5% of the short side) from 96 px up; the whole centre square for small
    /// images; ImageNet normalisation as in `byol_augment::normalize`.
    pub fn new(size: u32) -> Self {
        Preprocess {
            size,
            crop_padding: if size >= 96 {
                (size * 32).div_ceil(224)
            } else {
                0
            },
            interpolation: Interpolation::Bicubic,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// The evaluation preprocessing of an encoder trained on `input`: its size,
    /// normalisation and resize filter, after [`Preprocess::new`]'s centre crop.
    pub fn for_input(input: &InputSpec) -> Self {
        Preprocess {
            interpolation: input.interpolation,
            mean: input.mean,
            std: input.std,
            ..Preprocess::new(input.size)
        }
    }

    /// Values of one preprocessed image (`3 * size * size`).
    pub fn len(&self) -> usize {
        3 * self.size as usize * self.size as usize
    }

    /// True when the output size is zero.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Centre-crops and resizes `rgb` (RGB8 HWC, `width` x `height`) into `out`
    /// (normalised f32 CHW, [`Preprocess::len`] values); `resizer` is reused.
    pub fn apply(
        &self,
        rgb: &[u8],
        width: u32,
        height: u32,
        resizer: &mut CropResizer,
        out: &mut [f32],
    ) -> Result<(), AugmentError> {
        if width == 0 || height == 0 {
            return Err(AugmentError::BadInput(format!("image is {width}x{height}")));
        }
        let n = self.size as usize * self.size as usize;
        let crop = center_crop_box(height, width, self.size, self.crop_padding);
        let dst = PlanesOut::Unit {
            dst: &mut out[..3 * n],
            flip: false,
        };
        resizer.crop_resize_planar(
            rgb,
            width,
            height,
            crop,
            self.interpolation,
            dst,
            self.size,
            self.size,
        )?;
        for c in 0..3 {
            // As the views' last pass: (x - mean) * (1 / std) on the [0, 1] values.
            let (m, s) = (self.mean[c], 1.0 / self.std[c]);
            for o in &mut out[c * n..(c + 1) * n] {
                *o = (*o - m) * s;
            }
        }
        Ok(())
    }
}

/// One feature vector per labelled image, with its label.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    /// The dataset the features come from.
    pub source: PathBuf,
    /// Values per image.
    pub dim: usize,
    /// Row-major `(len, dim)`.
    pub values: Vec<f32>,
    /// Label of each row, an index into `classes`.
    pub labels: Vec<u32>,
    /// Class names (the dataset's class list).
    pub classes: Vec<String>,
    /// Live records without a label, left out.
    pub unlabelled: usize,
    /// Records left out because they could not be read or decoded (each is logged).
    pub skipped: usize,
}

impl Features {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True without rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }

    /// Renumbers the labels into `classes` (another dataset's class list, matched by
    /// name), so both sets of features share label indices. A class `classes` lacks is
    /// an error naming it.
    pub fn align_to(&mut self, classes: &[String]) -> Result<(), EvalError> {
        let mut map = Vec::with_capacity(self.classes.len());
        for name in &self.classes {
            map.push(classes.iter().position(|c| c == name).map(|i| i as u32));
        }
        for l in &mut self.labels {
            *l = map[*l as usize].ok_or_else(|| EvalError::Data {
                path: self.source.clone(),
                reason: format!(
                    "class {:?} does not occur in the training split",
                    self.classes[*l as usize]
                ),
            })?;
        }
        self.classes = classes.to_vec();
        Ok(())
    }
}

/// Labelled samples of `dataset` (a record under two labels is two samples), in shard
/// order; the count of unlabelled ones. Errors when there is no labelled sample.
/// Logs that record `r` of `dataset` is skipped as corrupt (features and embeddings
/// leave it out and count it).
pub(crate) fn warn_corrupt(dataset: &Dataset, r: &RecordRef, reason: &str) {
    tracing::warn!(
        dataset = %dataset.dir().display(),
        shard = r.shard,
        index = r.index,
        %reason,
        "skipping corrupt record"
    );
}

fn labelled(dataset: &Dataset) -> Result<(Vec<(RecordRef, u32)>, usize), EvalError> {
    let mut out = Vec::new();
    let mut unlabelled = 0;
    for s in dataset.samples() {
        match s.label {
            Some(l) => out.push((s.record, l)),
            None => unlabelled += 1,
        }
    }
    if out.is_empty() {
        return Err(EvalError::Data {
            path: dataset.dir().to_owned(),
            reason: format!(
                "no labelled images ({unlabelled} unlabelled): evaluation needs class labels \
                 (ImageFolder layout or IDX with a labels file)"
            ),
        });
    }
    let classes = dataset.manifest().classes.len();
    if let Some((_, l)) = out.iter().find(|(_, l)| *l as usize >= classes) {
        return Err(EvalError::Data {
            path: dataset.dir().to_owned(),
            reason: format!("label {l} is outside the class list of {classes}"),
        });
    }
    Ok((out, unlabelled))
}

/// Preprocesses the labelled images of `dataset` in batches of at most `batch` and
/// hands each batch (normalised f32 NCHW, its image count) to `f`.
fn for_each_batch(
    dataset: &Dataset,
    pre: &Preprocess,
    batch: usize,
    progress: &dyn Progress,
    mut f: impl FnMut(&[f32], usize) -> Result<(), EvalError>,
) -> Result<Features, EvalError> {
    if pre.is_empty() || batch == 0 {
        return Err(EvalError::Input(
            "image size and batch size must be at least 1".into(),
        ));
    }
    let (records, unlabelled) = labelled(dataset)?;
    progress.add_total(records.len() as u64);
    let len = pre.len();
    let mut input = vec![0f32; batch * len];
    let (mut scratch, mut rgb) = (RecordScratch::default(), Vec::new());
    let mut resizer = CropResizer::new();
    let mut labels = Vec::with_capacity(records.len());
    let mut skipped = 0;
    for chunk in records.chunks(batch) {
        // A corrupt record is skipped (and logged), as the training loader does.
        let mut filled = 0;
        for &(r, label) in chunk {
            let slot = &mut input[filled * len..(filled + 1) * len];
            let result = dataset
                .read_rgb(r, &mut scratch, &mut rgb)
                .map_err(|e| e.to_string())
                .and_then(|meta| {
                    pre.apply(&rgb, meta.width, meta.height, &mut resizer, slot)
                        .map_err(|e| e.to_string())
                });
            match result {
                Ok(()) => {
                    labels.push(label);
                    filled += 1;
                }
                Err(reason) => {
                    skipped += 1;
                    warn_corrupt(dataset, &r, &reason);
                }
            }
        }
        if filled > 0 {
            f(&input[..filled * len], filled)?;
        }
        progress.advance(chunk.len() as u64);
    }
    Ok(Features {
        source: dataset.dir().to_owned(),
        dim: 0,
        values: Vec::new(),
        labels,
        classes: dataset.manifest().classes.clone(),
        unlabelled,
        skipped,
    })
}

/// Encoder features (`encoder.feature_dim()` per image) of every labelled image of
/// `dataset`, in batches of `batch`; `progress` counts images.
pub fn extract(
    encoder: &Encoder,
    dataset: &Dataset,
    pre: &Preprocess,
    batch: usize,
    progress: &dyn Progress,
) -> Result<Features, EvalError> {
    let size = pre.size as usize;
    let mut values = Vec::new();
    let mut feats = for_each_batch(dataset, pre, batch, progress, |input, n| {
        let x = Tensor::from_slice(input, (n, 3, size, size), encoder.device())?;
        let y = encoder.forward(&x)?;
        values.extend(crate::host::vec1::<f32>(&y.flatten_all()?)?);
        Ok(())
    })?;
    feats.dim = encoder.feature_dim();
    feats.values = values;
    Ok(feats)
}

/// The preprocessed pixels themselves as features (`3 * size * size` per image): the
/// raw-pixel baseline.
pub fn pixel_features(
    dataset: &Dataset,
    pre: &Preprocess,
    progress: &dyn Progress,
) -> Result<Features, EvalError> {
    let mut values = Vec::new();
    let mut feats = for_each_batch(dataset, pre, 256, progress, |input, _| {
        values.extend_from_slice(input);
        Ok(())
    })?;
    feats.dim = pre.len();
    feats.values = values;
    Ok(feats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessing_normalises_like_the_views() {
        let pre = Preprocess::new(4);
        assert_eq!(pre.crop_padding, 0);
        // A uniform 6x4 image: every output pixel is the normalised colour.
        let rgb: Vec<u8> = (0..24).flat_map(|_| [255u8, 0, 128]).collect();
        let mut out = vec![0f32; pre.len()];
        pre.apply(&rgb, 6, 4, &mut CropResizer::new(), &mut out)
            .unwrap();
        let expect = [
            (1.0 - IMAGENET_MEAN[0]) * (1.0 / IMAGENET_STD[0]),
            (0.0 - IMAGENET_MEAN[1]) * (1.0 / IMAGENET_STD[1]),
            (128.0 / 255.0 - IMAGENET_MEAN[2]) * (1.0 / IMAGENET_STD[2]),
        ];
        for c in 0..3 {
            for &v in &out[c * 16..(c + 1) * 16] {
                assert!((v - expect[c]).abs() < 1e-6, "{v} vs {}", expect[c]);
            }
        }
        assert_eq!(Preprocess::new(224).crop_padding, 32);
    }

    #[test]
    fn labels_are_renumbered_by_class_name() {
        let mut f = Features {
            source: "test".into(),
            dim: 1,
            values: vec![0.0; 3],
            labels: vec![0, 1, 0],
            classes: vec!["cat".into(), "dog".into()],
            unlabelled: 0,
            skipped: 0,
        };
        f.align_to(&["dog".into(), "cat".into(), "eel".into()])
            .unwrap();
        assert_eq!(f.labels, [1, 0, 1]);
        let err = f.align_to(&["dog".into()]).unwrap_err();
        assert!(err.to_string().contains("\"cat\""), "{err}");
    }
}
