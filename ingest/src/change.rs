//! What happened to sources the dataset already held: retired, relabelled, removed;
//! and the changes report (`changes.jsonl`).

use std::io::{self, BufRead};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// File name of the changes report inside a dataset folder (JSON Lines, appended).
pub const CHANGES_FILE: &str = "changes.jsonl";

/// A change to a source the dataset held before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "kebab-case")]
pub enum SourceChange {
    /// The source vanished, or its content was replaced, and no other source holds its
    /// old content: those records are retired (readers skip them).
    Retired {
        /// The source file.
        path: String,
        /// Records retired.
        records: u64,
        /// True when the file is still there with new content (ingested anew).
        replaced: bool,
    },
    /// The source's content now counts under another label: it moved to another class
    /// folder (`now` is its new path, found in the same run), or its label changed in
    /// place (a new layout for its root).
    Relabelled {
        /// The source file as it was.
        path: String,
        /// Where its content is now (the same path when only the label changed).
        now: String,
        /// Class name before (`None`: unlabelled).
        from: Option<String>,
        /// Class name after.
        to: Option<String>,
    },
    /// The source vanished but another source holds its content (a copy was deleted, or
    /// the file was renamed within its class): no record is retired. Its own sample is
    /// gone: if the copy that stays is in another class, the content now counts there
    /// only.
    Removed {
        /// The source file.
        path: String,
        /// A source that still holds the content.
        kept_by: String,
    },
}

impl SourceChange {
    /// The kebab-case kind: `retired`, `relabelled` or `removed`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceChange::Retired { .. } => "retired",
            SourceChange::Relabelled { .. } => "relabelled",
            SourceChange::Removed { .. } => "removed",
        }
    }
}

/// One line of the changes report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeLine {
    /// When the run that made the change ended (seconds since the Unix epoch).
    pub run_unix: u64,
    /// The dataset generation that holds the change.
    pub generation: u64,
    /// The change.
    #[serde(flatten)]
    pub change: SourceChange,
}

/// Appends `changes` to the report in `dataset_dir`, one JSON object per line.
pub fn append_report(
    dataset_dir: &Path,
    run_unix: u64,
    generation: u64,
    changes: &[SourceChange],
) -> io::Result<()> {
    crate::fsutil::append_json_lines(
        &dataset_dir.join(CHANGES_FILE),
        changes.iter().map(|change| ChangeLine {
            run_unix,
            generation,
            change: change.clone(),
        }),
    )
}

/// Reads the changes report of `dataset_dir` (empty when there is none). A torn last
/// line (a run killed mid-append) is skipped.
pub fn read_report(dataset_dir: &Path) -> io::Result<Vec<ChangeLine>> {
    let f = match std::fs::File::open(dataset_dir.join(CHANGES_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in io::BufReader::new(f).lines() {
        if let Ok(l) = serde_json::from_str(&line?) {
            out.push(l);
        }
    }
    Ok(out)
}
