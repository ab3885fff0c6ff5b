//! Reading a packed dataset: its manifest and its memory-mapped shards.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::decode::{self, DecodeLimits};
use crate::manifest::{Manifest, ManifestError, SHARDS_DIR};
use crate::shard::{Codec, ReadScratch, RecordMeta, ShardError, ShardReader};

/// Errors opening or reading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The folder has no manifest.
    #[error("{path}: not a byol dataset (no manifest.json)")]
    NotADataset {
        /// The folder.
        path: PathBuf,
    },
    /// The manifest is unreadable or invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A shard is unreadable, invalid or corrupt.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// A shard disagrees with the manifest.
    #[error("{path}: {reason}")]
    Mismatch {
        /// The shard file.
        path: PathBuf,
        /// What disagrees.
        reason: String,
    },
}

/// Address of one record: shard position in the manifest and record index in the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordRef {
    /// Position of the shard in [`Manifest::shards`].
    pub shard: usize,
    /// Record index inside the shard.
    pub index: u32,
}

/// A dataset opened for reading. Shards are mapped, not read; shard mappings are shared
/// (`Arc`) between a dataset and the ones [`Dataset::refreshed`] makes from it.
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Arc<ShardReader>>,
}

impl Dataset {
    /// Opens the dataset in `dir`: loads the manifest and maps every shard it lists.
    pub fn open(dir: &Path) -> Result<Self, DatasetError> {
        let manifest = Manifest::load(dir)?.ok_or_else(|| DatasetError::NotADataset {
            path: dir.to_owned(),
        })?;
        let mut ds = Dataset {
            dir: dir.to_owned(),
            manifest: Manifest::new(manifest.settings),
            shards: Vec::new(),
        };
        ds.refresh_with(manifest)?;
        Ok(ds)
    }

    /// A new view of the dataset as of its current manifest, sharing the mappings of the
    /// shards both know; `None` when the manifest has not changed.
    pub fn refreshed(&self) -> Result<Option<Dataset>, DatasetError> {
        let manifest = self.load_manifest()?;
        if manifest == self.manifest {
            return Ok(None);
        }
        let mut next = Dataset {
            dir: self.dir.clone(),
            manifest: self.manifest.clone(),
            shards: self.shards.clone(),
        };
        next.refresh_with(manifest)?;
        Ok(Some(next))
    }

    fn load_manifest(&self) -> Result<Manifest, DatasetError> {
        Manifest::load(&self.dir)?.ok_or_else(|| DatasetError::NotADataset {
            path: self.dir.clone(),
        })
    }

    fn refresh_with(&mut self, manifest: Manifest) -> Result<(), DatasetError> {
        // Shards are immutable and only ever appended: keep the mappings we have when
        // the manifest still starts with the same shards.
        let keep = self.shards.len() <= manifest.shards.len()
            && self
                .manifest
                .shards
                .iter()
                .zip(&manifest.shards)
                .all(|(a, b)| a.file == b.file);
        let before = if keep { self.shards.len() } else { 0 };
        let mut opened = Vec::with_capacity(manifest.shards.len() - before);
        for entry in &manifest.shards[before..] {
            let path = self.dir.join(SHARDS_DIR).join(&entry.file);
            let reader = ShardReader::open(&path)?;
            if reader.len() as u64 != entry.records {
                return Err(DatasetError::Mismatch {
                    path,
                    reason: format!(
                        "{} records in the file, {} in the manifest",
                        reader.len(),
                        entry.records
                    ),
                });
            }
            if reader.codec() != manifest.settings.codec {
                return Err(DatasetError::Mismatch {
                    path,
                    reason: format!(
                        "codec {} but the dataset uses {}",
                        reader.codec(),
                        manifest.settings.codec
                    ),
                });
            }
            opened.push(Arc::new(reader));
        }
        self.shards.truncate(before);
        self.shards.extend(opened);
        self.manifest = manifest;
        Ok(())
    }

    /// The dataset folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest as of opening (or the last refresh).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The mapped shards, in manifest order.
    pub fn shards(&self) -> &[Arc<ShardReader>] {
        &self.shards
    }

    /// Total number of records, retired ones included.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// True for a dataset without records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live (not retired) record, in shard order.
    pub fn live_records(&self) -> impl Iterator<Item = RecordRef> + '_ {
        self.manifest
            .shards
            .iter()
            .enumerate()
            .flat_map(|(shard, entry)| {
                let count = self.shards[shard].len() as u32;
                (0..count)
                    .filter(move |i| entry.retired.binary_search(i).is_err())
                    .map(move |index| RecordRef { shard, index })
            })
    }

    /// Index metadata of a record.
    pub fn meta(&self, r: RecordRef) -> RecordMeta {
        self.shards[r.shard].meta(r.index as usize)
    }

    /// Decodes a record to RGB8 pixels in `out` (`width * height * 3` bytes).
    ///
    /// `scratch` holds reusable buffers; in steady state nothing is allocated for the
    /// `raw-rgb8` codec, nor for colour JPEGs of the `encoded` codec.
    pub fn read_rgb(
        &self,
        r: RecordRef,
        scratch: &mut RecordScratch,
        out: &mut Vec<u8>,
    ) -> Result<RecordMeta, DatasetError> {
        let shard = &self.shards[r.shard];
        match shard.codec() {
            Codec::RawRgb8 => Ok(shard.read_into(r.index as usize, &mut scratch.zstd, out)?),
            Codec::Encoded => {
                let meta =
                    shard.read_into(r.index as usize, &mut scratch.zstd, &mut scratch.encoded)?;
                let corrupt = |reason: String| ShardError::CorruptRecord {
                    path: shard.path().to_owned(),
                    index: r.index as usize,
                    reason,
                };
                let (w, h) =
                    decode::decode_rgb8_into(&scratch.encoded, &DecodeLimits::default(), out)
                        .map_err(|e| corrupt(e.to_string()))?;
                if (w, h) != (meta.width, meta.height) {
                    return Err(corrupt(format!(
                        "decodes to {w}x{h}, index says {}x{}",
                        meta.width, meta.height
                    ))
                    .into());
                }
                Ok(meta)
            }
        }
    }
}

/// Reusable per-thread buffers for [`Dataset::read_rgb`].
#[derive(Default)]
pub struct RecordScratch {
    zstd: ReadScratch,
    encoded: Vec<u8>,
}
