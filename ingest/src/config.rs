//! The `[ingest]` table of a config file, owned here as `[loader]` is by the loader.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::decode::DecodeLimits;
use crate::ingest::{IngestError, IngestOptions, SettingsOverride};
use crate::ingester::IngesterOptions;
use crate::shard::{Codec, Compression};
use crate::source::Layout;

/// The `[ingest]` table; every key is optional (`configs/default.toml` documents the
/// defaults), and the command line's flags override it ([`IngestConfig::or`]).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// `auto`, `imagefolder` or `flat`.
    pub layout: Option<Layout>,
    /// `raw` or `encoded` (fixed when a dataset is created).
    pub codec: Option<Codec>,
    /// Short-side limit in pixels, 0 to keep the decoded size.
    pub max_side: Option<u32>,
    /// `zstd` or `none`.
    pub compression: Option<Compression>,
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
    /// Shortest time between two manifest saves during a run, in seconds.
    pub commit_interval_secs: Option<f64>,
    /// The field of a WebDataset sample's `json` read as its label (when it has no
    /// `cls`); `"label"` when unset.
    pub json_label: Option<String>,
}

impl IngestConfig {
    /// Each key of `over` where it is set, else this one's.
    pub fn or(&self, over: &IngestConfig) -> IngestConfig {
        IngestConfig {
            layout: over.layout.or(self.layout),
            codec: over.codec.or(self.codec),
            max_side: over.max_side.or(self.max_side),
            compression: over.compression.or(self.compression),
            zstd_level: over.zstd_level.or(self.zstd_level),
            jpeg_quality: over.jpeg_quality.or(self.jpeg_quality),
            shard_size_mib: over.shard_size_mib.or(self.shard_size_mib),
            threads: over.threads.or(self.threads),
            max_megapixels: over.max_megapixels.or(self.max_megapixels),
            commit_interval_secs: over.commit_interval_secs.or(self.commit_interval_secs),
            json_label: over.json_label.clone().or_else(|| self.json_label.clone()),
        }
    }

    /// The layout asked for (`auto` when unset).
    pub fn layout(&self) -> Layout {
        self.layout.unwrap_or_default()
    }

    /// How an [`crate::Ingester`] works with these settings.
    ///
    /// Errors: a negative or non-finite commit interval ([`IngestError::InvalidOption`]).
    pub fn ingester_options(&self) -> Result<IngesterOptions, IngestError> {
        let mut o = IngesterOptions {
            settings: SettingsOverride {
                codec: self.codec,
                max_side: self.max_side,
                compression: self.compression,
                zstd_level: self.zstd_level,
                jpeg_quality: self.jpeg_quality,
            },
            threads: self.threads.unwrap_or(0),
            ..IngesterOptions::default()
        };
        if let Some(field) = &self.json_label {
            if field.is_empty() {
                return Err(IngestError::InvalidOption {
                    key: "json_label",
                    reason: "must name a field".into(),
                });
            }
            o.json_label = field.clone();
        }
        if let Some(mib) = self.shard_size_mib {
            o.shard_bytes = mib.saturating_mul(1 << 20);
        }
        if let Some(mp) = self.max_megapixels {
            o.limits = DecodeLimits {
                max_pixels: mp.saturating_mul(1_000_000),
                ..DecodeLimits::default()
            };
        }
        if let Some(secs) = self.commit_interval_secs {
            if !(secs.is_finite() && secs >= 0.0) {
                return Err(IngestError::InvalidOption {
                    key: "commit_interval_secs",
                    reason: format!("must be a non-negative number of seconds, not {secs}"),
                });
            }
            o.commit_interval = Duration::from_secs_f64(secs);
        }
        Ok(o)
    }

    /// The options of a one-shot [`crate::ingest()`] run of `sources` into `out`.
    pub fn ingest_options(
        &self,
        sources: Vec<PathBuf>,
        out: PathBuf,
    ) -> Result<IngestOptions, IngestError> {
        let o = self.ingester_options()?;
        let mut opts = IngestOptions::new(sources, out);
        opts.layout = self.layout();
        opts.settings = o.settings;
        opts.shard_bytes = o.shard_bytes;
        opts.threads = o.threads;
        opts.limits = o.limits;
        opts.commit_interval = o.commit_interval;
        opts.json_label = o.json_label;
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_the_command_line_and_of_the_format_both_parse() {
        let c: IngestConfig =
            toml_like(r#"{"layout":"imagefolder","codec":"raw","compression":"none"}"#);
        assert_eq!(c.layout, Some(Layout::ImageFolder));
        assert_eq!(c.codec, Some(Codec::RawRgb8));
        assert_eq!(c.compression, Some(Compression::None));
        let c: IngestConfig = toml_like(r#"{"layout":"image-folder","codec":"raw-rgb8"}"#);
        assert_eq!(c.layout, Some(Layout::ImageFolder));
        assert_eq!("imagefolder".parse::<Layout>(), Ok(Layout::ImageFolder));
        assert!("folders".parse::<Layout>().is_err());
        let over = IngestConfig {
            max_side: Some(64),
            ..IngestConfig::default()
        };
        let merged = c.or(&over);
        assert_eq!(
            (merged.max_side, merged.layout),
            (Some(64), Some(Layout::ImageFolder))
        );
    }

    fn toml_like(json: &str) -> IngestConfig {
        serde_json::from_str(json).unwrap()
    }
}
