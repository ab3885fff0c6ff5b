//! Reading a packed dataset: its manifest and its memory-mapped shards.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::decode::{self, DecodeLimits};
use crate::manifest::{Manifest, ManifestError, SHARDS_DIR};
use crate::shard::{Codec, NO_LABEL, ReadScratch, RecordMeta, ShardError, ShardReader};

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

impl DatasetError {
    /// What kind of failure this is (see [`crate::fsutil::FailureKind`]).
    pub fn kind(&self) -> crate::fsutil::FailureKind {
        use crate::fsutil::FailureKind;
        match self {
            DatasetError::NotADataset { .. } => FailureKind::Other,
            DatasetError::Manifest(e) => e.kind(),
            DatasetError::Shard(e) => e.kind(),
            DatasetError::Mismatch { .. } => FailureKind::Damaged,
        }
    }
}

/// Address of one record: shard position in the manifest and record index in the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordRef {
    /// Position of the shard in [`Manifest::shards`].
    pub shard: usize,
    /// Record index inside the shard.
    pub index: u32,
}

/// One labelled view of a stored record: a record stored once but found under two
/// labels (the same bytes in two class folders) is two samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sample {
    /// The stored record.
    pub record: RecordRef,
    /// Class index into the manifest's class list; `None` for an unlabelled source.
    pub label: Option<u32>,
}

/// A dataset opened for reading. Shards are mapped, not read; shard mappings are shared
/// (`Arc`) between a dataset and the ones [`Dataset::refreshed`] makes from it.
///
/// Labels come from the manifest's sources, not from the shard index (manifest version
/// 2, `FORMAT.md`): a record's samples are the distinct labels of the sources that
/// refer to it.
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Arc<ShardReader>>,
    /// Per shard, per record: the record's first label ([`NO_LABEL`] for none); retired
    /// records hold [`RETIRED`].
    labels: Vec<Vec<u32>>,
    /// Samples beyond each record's first label, sorted (records shared by
    /// differently labelled sources; usually none).
    extra: Vec<Sample>,
}

/// Marks a retired record in [`Dataset::labels`].
const RETIRED: u32 = u32::MAX - 1;

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
            labels: Vec::new(),
            extra: Vec::new(),
        };
        ds.refresh_with(manifest)?;
        Ok(ds)
    }

    /// A new view of the dataset as of its current manifest, sharing the mappings of the
    /// shards both know; `None` when the manifest has not changed.
    pub fn refreshed(&self) -> Result<Option<Dataset>, DatasetError> {
        self.with_manifest(self.load_manifest()?)
    }

    /// A view of the dataset as of `manifest` (this dataset's manifest as another
    /// process read it: data-parallel ranks share rank 0's), sharing the mappings of the
    /// shards both know; `None` when it is this view's.
    ///
    /// Errors: `manifest` is invalid, or a shard it lists cannot be opened here.
    pub fn with_manifest(&self, manifest: Manifest) -> Result<Option<Dataset>, DatasetError> {
        if manifest == self.manifest {
            return Ok(None);
        }
        manifest.validate().map_err(|reason| {
            DatasetError::Manifest(crate::manifest::ManifestError::Invalid {
                path: crate::manifest::Manifest::path_in(&self.dir),
                reason,
            })
        })?;
        let mut next = Dataset {
            dir: self.dir.clone(),
            manifest: self.manifest.clone(),
            shards: self.shards.clone(),
            labels: Vec::new(),
            extra: Vec::new(),
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
        self.index_samples();
        Ok(())
    }

    /// Builds the label table and the sample list from the manifest's sources.
    fn index_samples(&mut self) {
        const UNSEEN: u32 = u32::MAX - 2;
        let m = &self.manifest;
        let class_of: std::collections::HashMap<&str, u32> = m
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i as u32))
            .collect();
        let shard_pos: std::collections::HashMap<u32, usize> = m
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id, i))
            .collect();
        let mut labels: Vec<Vec<u32>> = m
            .shards
            .iter()
            .map(|s| {
                let mut l = vec![UNSEEN; s.records as usize];
                for &r in &s.retired {
                    l[r as usize] = RETIRED;
                }
                l
            })
            .collect();
        // Labels beyond a record's first, for records shared by differently labelled sources.
        let mut more: Vec<Sample> = Vec::new();
        for src in &m.sources {
            // Folder sources carry their label; IDX sources label each record in its
            // index; a WebDataset shard's records carry theirs, or take its folder's.
            let folder = src.label.as_ref().map_or(NO_LABEL, |name| {
                class_of.get(name.as_str()).copied().unwrap_or(NO_LABEL)
            });
            let fixed = match (&src.webdataset, &src.label, &src.labels_file) {
                (Some(_), _, _) => None,
                (None, Some(_), _) => Some(folder),
                (None, None, Some(_)) => None,
                (None, None, None) => Some(NO_LABEL),
            };
            for span in &src.records {
                let Some(&shard) = shard_pos.get(&span.shard) else {
                    continue;
                };
                for index in span.first..span.first + span.count {
                    let label = fixed.unwrap_or_else(|| {
                        match self.shards[shard].meta(index as usize).label {
                            NO_LABEL => folder,
                            own => own,
                        }
                    });
                    let slot = &mut labels[shard][index as usize];
                    if *slot == UNSEEN {
                        *slot = label;
                    } else if *slot != label && *slot != RETIRED {
                        more.push(Sample {
                            record: RecordRef { shard, index },
                            label: (label != NO_LABEL).then_some(label),
                        });
                    }
                }
            }
        }
        for (shard, l) in labels.iter_mut().enumerate() {
            for (index, slot) in l.iter_mut().enumerate() {
                if *slot == UNSEEN {
                    // A record no source refers to: its index label (never written by
                    // this build, which retires such records).
                    *slot = self.shards[shard].meta(index).label;
                }
            }
        }
        more.sort_unstable();
        more.dedup();
        self.labels = labels;
        self.extra = more;
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
        self.labels.iter().enumerate().flat_map(|(shard, l)| {
            l.iter()
                .enumerate()
                .filter(|(_, label)| **label != RETIRED)
                .map(move |(index, _)| RecordRef {
                    shard,
                    index: index as u32,
                })
        })
    }

    /// True unless the record was retired (its sources changed or vanished).
    pub fn is_live(&self, r: RecordRef) -> bool {
        self.labels[r.shard][r.index as usize] != RETIRED
    }

    /// The label of a live record: of the first source that refers to it (a record can
    /// have more; see [`Dataset::samples`]). `None` for unlabelled or retired records.
    pub fn label(&self, r: RecordRef) -> Option<u32> {
        let l = self.labels[r.shard][r.index as usize];
        (l != NO_LABEL && l != RETIRED).then_some(l)
    }

    /// Every live sample: one per distinct (record, label) pair, in record order. This is
    /// what per-class counts and evaluation read; training samples records.
    pub fn samples(&self) -> impl Iterator<Item = Sample> + '_ {
        let mut extra = self.extra.iter().copied().peekable();
        self.live_records().flat_map(move |record| {
            let first = Sample {
                record,
                label: self.label(record),
            };
            let mut more = Vec::new();
            while let Some(e) = extra.next_if(|e| e.record == record) {
                more.push(e);
            }
            std::iter::once(first).chain(more)
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
