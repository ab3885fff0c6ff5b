//! Rejected inputs: why a file was not ingested, and the rejects report.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the rejects report inside a dataset folder (JSON Lines, appended).
pub const REJECTS_FILE: &str = "rejects.jsonl";

/// Why an input was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejectReason {
    /// A zero-byte file.
    Empty,
    /// The file could not be read (permissions, IO error).
    Unreadable,
    /// A fifo, socket or device.
    NotRegularFile,
    /// A symlink whose target does not exist.
    BrokenSymlink,
    /// A symlink that leads back to itself or an ancestor folder.
    SymlinkLoop,
    /// Content of no image format we decode.
    NotAnImage,
    /// Truncated or corrupt image data.
    Corrupt,
    /// A valid file of a format (or a variant of one) we do not decode: HEIC, AVIF,
    /// JPEG XL, float or signed-integer TIFF... Convert it (to PNG, say) to ingest it.
    Unsupported,
    /// Dimensions, pixels, memory or file size over the limits.
    TooLarge,
    /// The decoder panicked on this input (caught; the run went on).
    DecoderPanic,
    /// An IDX file (or its labels) that is malformed or inconsistent.
    InvalidIdx,
    /// A WebDataset shard that is not a tar, or is damaged (truncated, a bad header
    /// checksum, a broken gzip stream): the samples after the damage are not read.
    DamagedTar,
    /// A WebDataset sample that cannot be used: no image member, a label that is not an
    /// integer or string, a key or member met twice.
    InvalidSample,
}

impl RejectReason {
    /// The kebab-case name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Empty => "empty",
            RejectReason::Unreadable => "unreadable",
            RejectReason::NotRegularFile => "not-regular-file",
            RejectReason::BrokenSymlink => "broken-symlink",
            RejectReason::SymlinkLoop => "symlink-loop",
            RejectReason::NotAnImage => "not-an-image",
            RejectReason::Corrupt => "corrupt",
            RejectReason::Unsupported => "unsupported",
            RejectReason::TooLarge => "too-large",
            RejectReason::DecoderPanic => "decoder-panic",
            RejectReason::InvalidIdx => "invalid-idx",
            RejectReason::DamagedTar => "damaged-tar",
            RejectReason::InvalidSample => "invalid-sample",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rejected input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// The file (stored as the manifest stores paths: names that are not UTF-8 kept).
    #[serde(with = "crate::manifest::path_serde")]
    pub path: PathBuf,
    /// The sample inside the file, for a WebDataset shard: its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// The category.
    pub reason: RejectReason,
    /// The specific message (decoder error, limits, ...).
    pub detail: String,
}

impl Reject {
    /// A reject of `path` for `reason`.
    pub fn new(path: &Path, reason: RejectReason, detail: impl Into<String>) -> Self {
        Reject {
            path: path.to_owned(),
            member: None,
            reason,
            detail: detail.into(),
        }
    }

    /// A reject of the sample `key` of the shard at `path`.
    pub fn sample(
        path: &Path,
        key: impl Into<String>,
        reason: RejectReason,
        detail: impl Into<String>,
    ) -> Self {
        Reject {
            member: Some(key.into()),
            ..Reject::new(path, reason, detail)
        }
    }
}

#[derive(Serialize)]
struct ReportLine<'a> {
    run_unix: u64,
    #[serde(flatten)]
    reject: &'a Reject,
}

/// Appends `rejects` to the report in `dataset_dir`, one JSON object per line.
pub fn append_report(dataset_dir: &Path, run_unix: u64, rejects: &[Reject]) -> io::Result<()> {
    crate::fsutil::append_json_lines(
        &dataset_dir.join(REJECTS_FILE),
        rejects.iter().map(|reject| ReportLine { run_unix, reject }),
    )
}
