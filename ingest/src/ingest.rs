//! One `byol ingest` run: scan the given sources, add what is new, and reconcile the
//! dataset with them (vanished files retired, moved files relabelled), through an
//! [`Ingester`].

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::change::SourceChange;
use crate::decode::DecodeLimits;
use crate::gone;
use crate::ingester::{Ingester, IngesterOptions};
use crate::manifest::ManifestError;
use crate::reject::{Reject, RejectReason};
use crate::shard::{Codec, Compression, ShardError};
use crate::source::{self, Layout};

/// Settings asked for on the command line; `None` keeps the dataset's (or the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SettingsOverride {
    /// Payload codec.
    pub codec: Option<Codec>,
    /// Short-side limit; `Some(0)` means keep images at their decoded size.
    pub max_side: Option<u32>,
    /// Compression of new shards.
    pub compression: Option<Compression>,
    /// zstd level for new shards.
    pub zstd_level: Option<i32>,
    /// JPEG quality for re-encoded images (`encoded` codec).
    pub jpeg_quality: Option<u8>,
}

/// Everything an ingest run needs.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Folders, image files, IDX image files, WebDataset shards, or brace patterns of
    /// them (`data-{000000..000099}.tar`).
    pub sources: Vec<PathBuf>,
    /// Dataset folder (created if missing).
    pub out: PathBuf,
    /// Layout of source folders.
    pub layout: Layout,
    /// Settings for a new dataset, or checks against an existing one.
    pub settings: SettingsOverride,
    /// Target size of one shard in bytes.
    pub shard_bytes: u64,
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Decoder limits.
    pub limits: DecodeLimits,
    /// Shortest time between two manifest saves during a run (the last save is always made).
    pub commit_interval: Duration,
    /// The field of a WebDataset sample's `json` read as its label.
    pub json_label: String,
}

impl IngestOptions {
    /// Options with defaults for `sources` into `out`.
    pub fn new(sources: Vec<PathBuf>, out: PathBuf) -> Self {
        IngestOptions {
            sources,
            out,
            layout: Layout::Auto,
            settings: SettingsOverride::default(),
            shard_bytes: 256 << 20,
            threads: 0,
            limits: DecodeLimits::default(),
            commit_interval: Duration::from_secs(10),
            json_label: crate::webdataset::DEFAULT_JSON_LABEL.to_owned(),
        }
    }
}

/// Errors that stop an ingest run (bad inputs never do: they become [`Reject`]s).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The dataset folder cannot be created or written.
    #[error("cannot write to the dataset folder {path}: {source}")]
    Output {
        /// The folder or file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A source path given by the user cannot be read at all.
    #[error("{path}: cannot read source")]
    Source {
        /// The source path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The existing manifest cannot be read or the new one written.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Writing a shard failed.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// The dataset exists with different fixed settings.
    #[error(
        "{path}: the dataset was created with {key} = {existing}; this run asks for {requested}"
    )]
    SettingsConflict {
        /// The dataset folder.
        path: PathBuf,
        /// The setting.
        key: &'static str,
        /// Value in the manifest.
        existing: String,
        /// Value asked for.
        requested: String,
    },
    /// Another run holds the dataset lock.
    #[error("{path}: another ingest run is writing to this dataset")]
    Locked {
        /// The dataset folder.
        path: PathBuf,
    },
    /// A brace pattern given as a source is malformed or names files that do not exist.
    #[error("{pattern}: {reason}")]
    Pattern {
        /// The pattern as given.
        pattern: PathBuf,
        /// What is wrong (the missing files, listed).
        reason: String,
    },
    /// An option is out of range.
    #[error("invalid option {key}: {reason}")]
    InvalidOption {
        /// The option.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

impl IngestError {
    /// What kind of failure this is (a full disk is retried, damage is reported).
    pub fn kind(&self) -> crate::fsutil::FailureKind {
        use crate::fsutil::FailureKind;
        match self {
            IngestError::Output { source, .. } | IngestError::Source { source, .. } => {
                FailureKind::of_io(source)
            }
            IngestError::Manifest(e) => e.kind(),
            IngestError::Shard(e) => e.kind(),
            IngestError::SettingsConflict { .. }
            | IngestError::Pattern { .. }
            | IngestError::Locked { .. }
            | IngestError::InvalidOption { .. } => FailureKind::Other,
        }
    }
}

/// Receives progress from a run (the binary draws a progress bar from it).
pub trait Progress: Sync {
    /// `n` more work units (image files or IDX images) are known.
    fn add_total(&self, _n: u64) {}
    /// `n` work units are done.
    fn advance(&self, _n: u64) {}
}

/// A [`Progress`] that ignores everything.
pub struct NoProgress;
impl Progress for NoProgress {}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IngestSummary {
    /// Source files found (image files and IDX files).
    pub files_seen: u64,
    /// Records added (one per image; an IDX file adds many).
    pub ingested: u64,
    /// Source files added or updated.
    pub sources_added: u64,
    /// Files skipped because the manifest already has them unchanged.
    pub already_present: u64,
    /// Files skipped because their content is already stored.
    pub duplicates: u64,
    /// Rejected inputs by reason.
    pub rejected: BTreeMap<RejectReason, u64>,
    /// New shards.
    pub shards_written: u64,
    /// Bytes of the new shards.
    pub bytes_stored: u64,
    /// Uncompressed payload bytes of the new records.
    pub bytes_raw: u64,
    /// Records retired because their source changed or vanished.
    pub retired: u64,
    /// Sources whose records were retired (vanished, or replaced by new content).
    pub sources_retired: u64,
    /// Sources whose file vanished while another source keeps their content (a deleted
    /// copy, a rename).
    pub sources_removed: u64,
    /// Sources whose content now counts under another label.
    pub relabelled: u64,
    /// Files skipped for their names (hidden, backups, temporary, partial downloads).
    pub ignored: u64,
    /// Each folder given, with the layout used and why.
    pub roots: Vec<RootReport>,
    /// Things the user should know (e.g. a root left alone because it was empty).
    pub warnings: Vec<String>,
    /// Leftover files of earlier, interrupted runs that were removed.
    pub leftovers_removed: u64,
    /// Dataset generation after the run.
    pub generation: u64,
    /// Wall time of the run in seconds.
    pub seconds: f64,
}

impl IngestSummary {
    /// Total number of rejects.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// A folder given to a run: the layout its labels were read with, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RootReport {
    /// The folder (canonical).
    pub path: PathBuf,
    /// The layout used.
    pub layout: Layout,
    /// Why: asked for, kept from the first run, or what `auto` found.
    pub reason: String,
}

/// The outcome of one run: the summary, every reject with its path and reason, and
/// every change to sources the dataset held.
#[derive(Debug, Clone)]
pub struct IngestReport {
    /// Counts.
    pub summary: IngestSummary,
    /// Rejected inputs (also appended to the dataset's rejects report).
    pub rejects: Vec<Reject>,
    /// Sources retired, relabelled or removed (also appended to `changes.jsonl`).
    pub changes: Vec<SourceChange>,
}

/// Ingests `opts.sources` into the dataset at `opts.out`, then reconciles the dataset
/// with those sources.
///
/// Reconciling: a source recorded under one of the given folders whose file is gone is
/// retired (its records too, unless another source holds the same content: a file moved
/// to another class folder is relabelled, its content stored once). Sources under
/// folders not given to this run are left alone, and so is everything under a folder
/// that is missing or unreadable (an error: nothing changes), under an entry the scan
/// could not read (a reject), or under a folder where no file is an image while the dataset holds
/// sources there (a warning: an unmounted disk must not empty a dataset).
pub fn ingest(opts: &IngestOptions, progress: &dyn Progress) -> Result<IngestReport, IngestError> {
    validate_options(opts)?;
    // Every source must exist before the dataset is touched; a brace pattern
    // (`data-{000000..000099}.tar`) names every file it expands to.
    let mut given = Vec::with_capacity(opts.sources.len());
    for src in &opts.sources {
        given.extend(crate::webdataset::expand_source(src).map_err(|reason| {
            IngestError::Pattern {
                pattern: src.clone(),
                reason,
            }
        })?);
    }
    let mut sources = Vec::with_capacity(given.len());
    for src in &given {
        let root = std::fs::canonicalize(src).map_err(|source| IngestError::Source {
            path: src.clone(),
            source,
        })?;
        sources.push((src, root));
    }
    let mut ing = Ingester::open(
        &opts.out,
        IngesterOptions {
            settings: opts.settings,
            shard_bytes: opts.shard_bytes,
            threads: opts.threads,
            limits: opts.limits,
            commit_interval: opts.commit_interval,
            background: false,
            duty: 1.0,
            json_label: opts.json_label.clone(),
        },
        progress,
    )?;
    let roots: Vec<(PathBuf, Layout)> = sources
        .into_iter()
        .map(|(_, root)| (root, opts.layout))
        .collect();
    let scanned = scan_roots(&mut ing, &roots, std::slice::from_ref(&opts.out))?;
    let mut report = ing.finish()?;
    report.summary.ignored = scanned.ignored;
    report.summary.roots = scanned.roots;
    report.summary.warnings.extend(scanned.warnings);
    Ok(report)
}

/// What [`scan_roots`] found beside the ingester's own report.
#[derive(Debug, Default)]
pub(crate) struct Scanned {
    /// Each root's layout and why.
    pub roots: Vec<RootReport>,
    /// Files skipped by name.
    pub ignored: u64,
    /// Warnings (root images stored unlabelled, roots left alone).
    pub warnings: Vec<String>,
}

/// Scans each canonical `root` (with the layout asked for it), adds what is new or
/// changed, and reconciles the dataset with what each scan found: the body of
/// [`ingest()`], and of a long-lived follower's start-up scan.
pub(crate) fn scan_roots(
    ing: &mut Ingester<'_>,
    roots: &[(PathBuf, Layout)],
    exclude: &[PathBuf],
) -> Result<Scanned, IngestError> {
    // Each folder scanned, and whether any of its files is an image.
    let mut reconciled: Vec<PathBuf> = Vec::new();
    let mut unreadable = Vec::new();
    let mut candidates = Vec::new();
    let mut seen = HashSet::new();
    let mut out = Scanned::default();
    for (root, asked) in roots {
        let (root, asked) = (root.clone(), *asked);
        let source_err = |source| IngestError::Source {
            path: root.clone(),
            source,
        };
        // A folder inside a folder ingested before (a class folder given on its own)
        // keeps the labels that folder gives it.
        let enclosing = (asked == Layout::Auto && root.is_dir())
            .then(|| ing.manifest().enclosing_root(&root))
            .flatten();
        let kept = ing.manifest().root_layout(&root);
        let layout = match (asked, kept, &enclosing) {
            (Layout::Auto, _, Some(_)) => Layout::Flat,
            (Layout::Auto, Some(kept), None) => kept,
            (asked, _, _) => asked,
        };
        let mut scan = source::scan(&root, layout, exclude).map_err(source_err)?;
        if let Some((outer, outer_layout)) = &enclosing {
            if *outer_layout == Layout::ImageFolder {
                source::label_from(outer, &mut scan.candidates);
            }
            scan.layout = *outer_layout;
            out.roots.push(RootReport {
                path: root.clone(),
                layout: *outer_layout,
                reason: format!("as the folder it is in, {}", outer.display()),
            });
        } else if root.is_dir() {
            let reason = match (&scan.layout_reason, asked, kept) {
                (Some(r), _, _) => format!("auto: {r}"),
                (None, Layout::Auto, _) => "as recorded for this folder".into(),
                (None, _, Some(k)) if k != scan.layout => {
                    format!("as asked; was {k}, its sources are relabelled")
                }
                (None, _, _) => "as asked".into(),
            };
            // A layout chosen from nothing (an empty folder) is not kept.
            if !scan.candidates.is_empty() || asked != Layout::Auto {
                ing.set_root_layout(&root, scan.layout);
            }
            out.roots.push(RootReport {
                path: root.clone(),
                layout: scan.layout,
                reason,
            });
        }
        if scan.root_images > 0 {
            out.warnings.push(format!(
                "{} image(s) at the root of {} (a tree of class folders) are stored unlabelled",
                scan.root_images,
                root.display()
            ));
        }
        out.ignored += scan.ignored;
        // Whatever a scan could not read (a file, or a whole subfolder) is not gone.
        unreadable.extend(scan.rejects.iter().map(|r| r.path.clone()));
        ing.note_rejects(scan.rejects);
        reconciled.push(scan.root);
        candidates.extend(
            scan.candidates
                .into_iter()
                .filter(|c| seen.insert(c.path.clone())),
        );
    }
    ing.add(candidates)?;

    // Reconcile each folder with what its scan found (the rules of `gone`).
    for root in &reconciled {
        let recorded = ing.sources_under(root);
        if !recorded.is_empty() && !gone::holds_images(root) {
            out.warnings.push(format!(
                "{} holds no image file but the dataset has {} source(s) there: nothing \
                 retired (an unmounted disk?)",
                root.display(),
                recorded.len()
            ));
            continue;
        }
        for path in gone::gone(recorded, |p| seen.contains(p), &unreadable) {
            ing.retire(&path)?;
        }
    }
    Ok(out)
}

fn validate_options(opts: &IngestOptions) -> Result<(), IngestError> {
    let bad = |key, reason: String| Err(IngestError::InvalidOption { key, reason });
    if opts.sources.is_empty() {
        return bad("sources", "at least one source is needed".into());
    }
    if opts.shard_bytes == 0 {
        return bad("shard-size", "must be positive".into());
    }
    if let Some(l) = opts.settings.zstd_level
        && !zstd::compression_level_range().contains(&l)
    {
        return bad(
            "zstd-level",
            format!("{l} is outside {:?}", zstd::compression_level_range()),
        );
    }
    if let Some(q) = opts.settings.jpeg_quality
        && !(1..=100).contains(&q)
    {
        return bad("jpeg-quality", format!("{q} is outside 1..=100"));
    }
    Ok(())
}
