//! Shared by the trainer's integration tests (each uses some of it).
#![allow(dead_code)]

use std::path::Path;

use byol_trainer::config::{Arch, ModelConfig};

/// One of torchvision's ResNet parameter lists (`../shared/fixtures/torchvision`) and the
/// model config whose encoder should have exactly those parameters.
pub struct TorchvisionList {
    /// The list's file name.
    pub file: &'static str,
    /// A config of the same architecture and stem (width 64, tiny heads).
    pub model: ModelConfig,
    /// `(name, shape)` of every parameter but `fc.*`; scalars have an empty shape.
    pub params: Vec<(String, Vec<usize>)>,
}

/// Every list; `None` (after a note) when the fixtures are missing, which fails instead
/// under `BYOL_REQUIRE_REAL_DATA=1`.
pub fn torchvision_lists() -> Option<Vec<TorchvisionList>> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/torchvision");
    let mut lists = Vec::new();
    for (file, arch, small_stem) in [
        ("resnet18.tsv", Arch::Resnet18, false),
        ("resnet18_cifar_stem.tsv", Arch::Resnet18, true),
        ("resnet50.tsv", Arch::Resnet50, false),
    ] {
        let Ok(tsv) = std::fs::read_to_string(fixtures.join(file)) else {
            assert!(
                std::env::var("BYOL_REQUIRE_REAL_DATA").as_deref() != Ok("1"),
                "{file} missing"
            );
            eprintln!("skipped: {file} not found");
            return None;
        };
        let params = tsv
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                let (name, shape) = (f.next()?, f.next()?);
                (!name.starts_with("fc.")).then(|| {
                    let dims = shape.split(',').filter(|d| !d.is_empty());
                    (name.to_string(), dims.map(|d| d.parse().unwrap()).collect())
                })
            })
            .collect();
        let model = ModelConfig {
            arch,
            width: 64,
            small_stem,
            projector_hidden: 8,
            projection_dim: 8,
            predictor_hidden: 8,
            ..ModelConfig::default()
        };
        lists.push(TorchvisionList {
            file,
            model,
            params,
        });
    }
    Some(lists)
}

/// Two seeded batches of pseudo-images `(n, 3, s, s)`, uniform in [-1, 1] (the views the
/// trainer tests step on; the seam fixtures were made with them).
pub fn views(n: usize, s: usize, seed: u64) -> (candle_core::Tensor, candle_core::Tensor) {
    use rand_core::{RngCore, SeedableRng};
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut fill = || -> Vec<f32> {
        (0..n * 3 * s * s)
            .map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0)
            .collect()
    };
    let device = candle_core::Device::Cpu;
    let a = candle_core::Tensor::from_vec(fill(), (n, 3, s, s), &device).unwrap();
    let b = candle_core::Tensor::from_vec(fill(), (n, 3, s, s), &device).unwrap();
    (a, b)
}

/// One step on `(a, b)`, and its loss read from the device.
pub fn step_loss(
    t: &mut byol_trainer::Trainer,
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> f32 {
    t.step_tensors(a, b).unwrap();
    t.read_health().unwrap().loss
}

/// A width-4 ResNet-18 with the small stem and heads of 32 → 16: the tests' tiny network.
pub fn tiny_model() -> byol_trainer::config::ModelConfig {
    byol_trainer::config::ModelConfig {
        width: 4,
        projector_hidden: 32,
        projection_dim: 16,
        predictor_hidden: 32,
        ..byol_trainer::config::ModelConfig::small(4)
    }
}
