//! The TOML config file (`configs/default.toml` documents every key).

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use crate::cli::{CodecArg, CompressionArg, LayoutArg};

/// The whole config file. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Settings of `byol ingest`.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// BYOL's two views (`preset`, `size`, `view1`, `view2`); see `configs/default.toml`.
    #[serde(default)]
    pub augment: Option<byol_augment::AugmentConfig>,
    /// Batches: size, seed, threads, order, sampling policy.
    #[serde(default)]
    pub loader: byol_loader::LoaderConfig,
    /// Encoder, projector and predictor.
    #[serde(default)]
    pub model: byol_trainer::ModelConfig,
    /// Optimizer and schedules.
    #[serde(default)]
    pub optim: byol_trainer::OptimConfig,
    /// Device, seed, length, logging and checkpoints.
    #[serde(default)]
    pub train: byol_trainer::TrainConfig,
    /// Optional kNN accuracy on small labelled datasets while training.
    #[serde(default)]
    pub monitor: Option<byol_run::MonitorConfig>,
}

/// The `[ingest]` table; every key is optional and a command-line flag overrides it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// `auto`, `imagefolder` or `flat`.
    pub layout: Option<LayoutArg>,
    /// `raw` or `encoded`.
    pub codec: Option<CodecArg>,
    /// Short-side limit in pixels, 0 to keep the decoded size.
    pub max_side: Option<u32>,
    /// `zstd` or `none`.
    pub compression: Option<CompressionArg>,
    /// zstd level of each record.
    pub zstd_level: Option<i32>,
    /// JPEG quality when the encoded codec must re-encode.
    pub jpeg_quality: Option<u8>,
    /// Target shard size in MiB.
    pub shard_size_mib: Option<u64>,
    /// Worker threads, 0 for one per core.
    pub threads: Option<usize>,
    /// Largest accepted image in megapixels.
    pub max_megapixels: Option<u64>,
    /// Shortest time between two manifest saves during a run.
    pub commit_interval_secs: Option<f64>,
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap();
            }
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<Config>("[ingest]\nmax_sid = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_sid"), "{err}");
        assert!(toml::from_str::<Config>("[ingset]\n").is_err());
    }
}
