//! The ingest run: sources in, new shards and an updated manifest out.
//!
//! Crash safety: records go into a shard under a temp name; a finished shard is
//! renamed, and the manifest that lists it (with the sources whose records it holds)
//! is saved atomically afterwards. The manifest is never saved while a source is only
//! partly written, so a killed run leaves the dataset as of its last manifest, and the
//! next run removes the leftovers and redoes the rest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::ImageFormat;
use serde::Serialize;

use crate::decode::{self, DecodeError, DecodeLimits};
use crate::fsutil::TMP_SUFFIX;
use crate::idx;
use crate::manifest::{
    FileStamp, IngestSettings, LabelsFile, Manifest, ManifestError, SHARDS_DIR, ShardEntry,
    SourceEntry, Span,
};
use crate::pipeline::ordered_map;
use crate::reject::{self, Reject, RejectReason};
use crate::shard::{Codec, Compression, ShardError, ShardWriter, StoredRecord};
use crate::source::{self, Candidate, CandidateKind, Layout};

/// Name of the lock file that keeps two ingest runs off one dataset.
pub const LOCK_FILE: &str = ".lock";

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
    /// Folders, image files or IDX image files.
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
    #[error("{path}: cannot read source: {source}")]
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
    /// An option is out of range.
    #[error("invalid option {key}: {reason}")]
    InvalidOption {
        /// The option.
        key: &'static str,
        /// Why.
        reason: String,
    },
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
    /// Records retired because their source changed.
    pub retired: u64,
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

/// The outcome of one run: the summary and every reject with its path and reason.
#[derive(Debug, Clone)]
pub struct IngestReport {
    /// Counts.
    pub summary: IngestSummary,
    /// Rejected inputs (also appended to the dataset's rejects report).
    pub rejects: Vec<Reject>,
}

/// Ingests `opts.sources` into the dataset at `opts.out`.
pub fn ingest(opts: &IngestOptions, progress: &dyn Progress) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    validate_options(opts)?;
    let out = &opts.out;
    let output_err = |path: &Path| {
        let path = path.to_owned();
        move |source| IngestError::Output { path, source }
    };
    fs::create_dir_all(out.join(SHARDS_DIR)).map_err(output_err(out))?;
    let _lock = lock(out)?;

    let manifest = match Manifest::load(out)? {
        Some(m) => merge_settings(out, m, &opts.settings)?,
        None => Manifest::new(resolve_settings(&opts.settings)),
    };
    let leftovers = remove_leftovers(out, &manifest).map_err(output_err(out))?;

    let mut rejects = Vec::new();
    let mut candidates = Vec::new();
    let mut seen = HashSet::new();
    for src in &opts.sources {
        let scan =
            source::scan(src, opts.layout, Some(out)).map_err(|source| IngestError::Source {
                path: src.clone(),
                source,
            })?;
        rejects.extend(scan.rejects);
        candidates.extend(
            scan.candidates
                .into_iter()
                .filter(|c| seen.insert(c.path.clone())),
        );
    }

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .thread_name(|i| format!("byol-ingest-{i}"))
        .build()
        .map_err(|e| IngestError::InvalidOption {
            key: "threads",
            reason: e.to_string(),
        })?;

    let mut run = Run::new(opts, manifest, &pool, progress);
    run.summary.files_seen = candidates.len() as u64;
    run.summary.leftovers_removed = leftovers;
    run.rejects = rejects;

    let (images, idxs): (Vec<_>, Vec<_>) = candidates
        .into_iter()
        .partition(|c| c.kind == CandidateKind::Image);
    run.ingest_images(images)?;
    for c in idxs {
        run.ingest_idx(c)?;
    }
    run.finish_shard()?;
    run.commit(true)?;

    let mut summary = run.summary;
    for r in &run.rejects {
        *summary.rejected.entry(r.reason).or_default() += 1;
    }
    let run_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    reject::append_report(out, run_unix, &run.rejects).map_err(output_err(out))?;
    summary.generation = run.work.generation;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(IngestReport {
        summary,
        rejects: run.rejects,
    })
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

fn resolve_settings(o: &SettingsOverride) -> IngestSettings {
    let d = IngestSettings::default();
    IngestSettings {
        codec: o.codec.unwrap_or(d.codec),
        max_side: o.max_side.map_or(d.max_side, |s| (s > 0).then_some(s)),
        compression: o.compression.unwrap_or(d.compression),
        zstd_level: o.zstd_level.unwrap_or(d.zstd_level),
        jpeg_quality: o.jpeg_quality.unwrap_or(d.jpeg_quality),
    }
}

fn merge_settings(
    out: &Path,
    mut m: Manifest,
    o: &SettingsOverride,
) -> Result<Manifest, IngestError> {
    let conflict = |key, existing: String, requested: String| IngestError::SettingsConflict {
        path: out.to_owned(),
        key,
        existing,
        requested,
    };
    if let Some(c) = o.codec
        && c != m.settings.codec
    {
        return Err(conflict(
            "codec",
            m.settings.codec.to_string(),
            c.to_string(),
        ));
    }
    if let Some(s) = o.max_side {
        let requested = (s > 0).then_some(s);
        if requested != m.settings.max_side {
            let show = |v: Option<u32>| v.map_or("none".into(), |v| v.to_string());
            return Err(conflict(
                "max-side",
                show(m.settings.max_side),
                show(requested),
            ));
        }
    }
    // Compression, level and quality only affect how new records are written (each
    // shard records its compression): they may change from run to run.
    if let Some(c) = o.compression {
        m.settings.compression = c;
    }
    if let Some(l) = o.zstd_level {
        m.settings.zstd_level = l;
    }
    if let Some(q) = o.jpeg_quality {
        m.settings.jpeg_quality = q;
    }
    Ok(m)
}

/// Holds the dataset lock for as long as it lives.
struct DatasetLock(#[allow(dead_code)] File);

fn lock(out: &Path) -> Result<DatasetLock, IngestError> {
    let path = out.join(LOCK_FILE);
    let f = File::create(&path).map_err(|source| IngestError::Output {
        path: path.clone(),
        source,
    })?;
    match f.try_lock() {
        Ok(()) => Ok(DatasetLock(f)),
        Err(fs::TryLockError::WouldBlock) => Err(IngestError::Locked {
            path: out.to_owned(),
        }),
        Err(fs::TryLockError::Error(source)) => Err(IngestError::Output { path, source }),
    }
}

/// Removes shard files the manifest does not list and temp files of killed runs.
fn remove_leftovers(out: &Path, m: &Manifest) -> io::Result<u64> {
    let listed: HashSet<&str> = m.shards.iter().map(|s| s.file.as_str()).collect();
    let mut removed = 0;
    for e in fs::read_dir(out.join(SHARDS_DIR))? {
        let e = e?;
        let name = e.file_name();
        if !listed.contains(name.to_string_lossy().as_ref()) {
            tracing::info!(file = %e.path().display(), "removing leftover of an interrupted run");
            fs::remove_file(e.path())?;
            removed += 1;
        }
    }
    for e in fs::read_dir(out)? {
        let e = e?;
        if e.file_name().to_string_lossy().ends_with(TMP_SUFFIX) {
            fs::remove_file(e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// What a worker made of one image file.
enum Outcome {
    Stored { hash: String, record: StoredRecord },
    Unchanged { hash: String },
    Duplicate { hash: String },
    Rejected(Reject),
}

/// Mutable state of one run; only the consumer thread touches it.
struct Run<'a> {
    out: PathBuf,
    shard_bytes: u64,
    limits: DecodeLimits,
    commit_interval: Duration,
    pool: &'a rayon::ThreadPool,
    progress: &'a dyn Progress,
    /// The manifest with every finished change applied; saved by `commit`.
    work: Manifest,
    writer: Option<(u32, ShardWriter)>,
    /// Source entries whose records are in the open shard (applied when it finishes).
    pending: Vec<SourceEntry>,
    /// Entries replaced since the last commit; their records are retired if unreferenced.
    replaced: Vec<SourceEntry>,
    /// Content hash → (source id, spans), including records not yet committed.
    by_hash: HashMap<String, (u64, Vec<Span>)>,
    /// Number of applied sources per content hash.
    hash_refs: HashMap<String, usize>,
    /// Path → index in `work.sources`.
    by_path: HashMap<String, usize>,
    next_source_id: u64,
    /// A source is partly written: the manifest must not be saved.
    in_source: bool,
    dirty: bool,
    last_commit: Instant,
    summary: IngestSummary,
    rejects: Vec<Reject>,
}

impl<'a> Run<'a> {
    fn new(
        opts: &IngestOptions,
        work: Manifest,
        pool: &'a rayon::ThreadPool,
        progress: &'a dyn Progress,
    ) -> Self {
        let mut by_hash = HashMap::new();
        let mut hash_refs = HashMap::new();
        let mut by_path = HashMap::new();
        for (i, s) in work.sources.iter().enumerate() {
            if s.duplicate_of.is_none() {
                by_hash.insert(s.hash.clone(), (s.id, s.records.clone()));
            }
            *hash_refs.entry(s.hash.clone()).or_default() += 1;
            by_path.insert(s.path.clone(), i);
        }
        Run {
            out: opts.out.clone(),
            shard_bytes: opts.shard_bytes,
            limits: opts.limits,
            commit_interval: opts.commit_interval,
            pool,
            progress,
            next_source_id: work.next_source_id(),
            work,
            writer: None,
            pending: Vec::new(),
            replaced: Vec::new(),
            by_hash,
            hash_refs,
            by_path,
            in_source: false,
            dirty: false,
            last_commit: Instant::now(),
            summary: IngestSummary::default(),
            rejects: Vec::new(),
        }
    }

    fn existing(&self, path: &str) -> Option<&SourceEntry> {
        self.by_path.get(path).map(|&i| &self.work.sources[i])
    }

    fn ingest_images(&mut self, mut images: Vec<Candidate>) -> Result<(), IngestError> {
        images.retain(|c| {
            let present = self
                .existing(&c.path.to_string_lossy())
                .is_some_and(|e| e.stamp == c.stamp);
            self.summary.already_present += u64::from(present);
            !present
        });
        // New classes in sorted order, as torchvision's ImageFolder numbers them.
        let new_classes: std::collections::BTreeSet<&str> =
            images.iter().filter_map(|c| c.label.as_deref()).collect();
        for name in new_classes {
            self.work.class_index(name);
        }
        let labels: Vec<Option<u32>> = images
            .iter()
            .map(|c| c.label.as_deref().map(|l| self.work.class_index(l)))
            .collect();
        let previous: Vec<Option<String>> = images
            .iter()
            .map(|c| {
                self.existing(&c.path.to_string_lossy())
                    .map(|e| e.hash.clone())
            })
            .collect();
        let known: HashSet<String> = self.by_hash.keys().cloned().collect();
        self.progress.add_total(images.len() as u64);
        let settings = self.work.settings;
        let limits = self.limits;
        let pool = self.pool;
        let progress = self.progress;
        ordered_map(
            pool,
            images.len(),
            |i| {
                let c = &images[i];
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    process_image(
                        c,
                        labels[i],
                        previous[i].as_deref(),
                        &known,
                        &settings,
                        &limits,
                    )
                }))
                .unwrap_or_else(|_| {
                    Outcome::Rejected(Reject::new(
                        &c.path,
                        RejectReason::DecoderPanic,
                        "the decoder panicked",
                    ))
                });
                progress.advance(1);
                outcome
            },
            |i, outcome| self.consume_image(&images[i], outcome),
        )
    }

    fn consume_image(&mut self, c: &Candidate, outcome: Outcome) -> Result<(), IngestError> {
        let (hash, record) = match outcome {
            Outcome::Rejected(r) => {
                self.rejects.push(r);
                return Ok(());
            }
            Outcome::Stored { hash, record } => (hash, Some(record)),
            Outcome::Unchanged { hash } | Outcome::Duplicate { hash } => (hash, None),
        };
        let path = c.path.to_string_lossy().into_owned();
        let same = self.existing(&path).filter(|e| e.hash == hash).cloned();
        let (id, duplicate_of, records) = match (same, self.by_hash.get(&hash).cloned(), record) {
            // Same content as before at this path: only the stamp changes.
            (Some(e), _, _) => {
                self.summary.already_present += 1;
                (e.id, e.duplicate_of, e.records)
            }
            (None, Some((orig, spans)), _) => {
                self.summary.duplicates += 1;
                (self.new_source_id(), Some(orig), spans)
            }
            (None, None, Some(mut record)) => {
                let id = self.new_source_id();
                record.meta.source_id = id;
                let span = self.append(&record)?;
                self.summary.ingested += 1;
                self.summary.sources_added += 1;
                self.by_hash.insert(hash.clone(), (id, vec![span]));
                (id, None, vec![span])
            }
            (None, None, None) => {
                unreachable!("a worker reports a duplicate only for a known hash")
            }
        };
        self.pending.push(SourceEntry {
            id,
            path,
            stamp: c.stamp,
            hash,
            label: c.label.clone(),
            labels_file: None,
            duplicate_of,
            records,
        });
        self.maybe_commit()
    }

    fn ingest_idx(&mut self, c: Candidate) -> Result<(), IngestError> {
        let CandidateKind::Idx { labels } = &c.kind else {
            unreachable!("called for IDX candidates only")
        };
        let labels_stamp = match labels.as_deref().map(fs::metadata).transpose() {
            Ok(m) => m.map(|m| FileStamp::of(&m)),
            Err(e) => {
                self.rejects.push(Reject::new(
                    labels.as_deref().unwrap(),
                    RejectReason::Unreadable,
                    e.to_string(),
                ));
                return Ok(());
            }
        };
        let path = c.path.to_string_lossy().into_owned();
        let labels_file = labels
            .as_ref()
            .zip(labels_stamp)
            .map(|(p, stamp)| LabelsFile {
                path: p.to_string_lossy().into_owned(),
                stamp,
            });
        if let Some(e) = self.existing(&path)
            && e.stamp == c.stamp
            && e.labels_file == labels_file
        {
            self.summary.already_present += 1;
            return Ok(());
        }
        let reject = |reason, detail: String| Reject::new(&c.path, reason, detail);
        let hash = match hash_files(&c.path, labels.as_deref()) {
            Ok(h) => h,
            Err(e) => {
                self.rejects
                    .push(reject(RejectReason::Unreadable, e.to_string()));
                return Ok(());
            }
        };
        let entry = |id, duplicate_of, records| SourceEntry {
            id,
            path: path.clone(),
            stamp: c.stamp,
            hash: hash.clone(),
            label: None,
            labels_file: labels_file.clone(),
            duplicate_of,
            records,
        };
        // Same content as before at this path: only the stamps change.
        if let Some(e) = self.existing(&path).filter(|e| e.hash == hash).cloned() {
            self.summary.already_present += 1;
            self.pending.push(entry(e.id, e.duplicate_of, e.records));
            return self.maybe_commit();
        }
        if let Some((orig, spans)) = self.by_hash.get(&hash).cloned() {
            self.summary.duplicates += 1;
            let id = self.new_source_id();
            self.pending.push(entry(id, Some(orig), spans));
            return self.maybe_commit();
        }
        let images = match idx::read_images(&c.path) {
            Ok(i) => i,
            Err(e) => {
                self.rejects
                    .push(reject(RejectReason::InvalidIdx, e.to_string()));
                return Ok(());
            }
        };
        let label_values = match labels.as_deref().map(idx::read_labels).transpose() {
            Ok(l) => l,
            Err(e) => {
                self.rejects
                    .push(reject(RejectReason::InvalidIdx, e.to_string()));
                return Ok(());
            }
        };
        if let Some(l) = &label_values
            && l.len() != images.count
        {
            self.rejects.push(reject(
                RejectReason::InvalidIdx,
                format!("{} images but {} labels", images.count, l.len()),
            ));
            return Ok(());
        }
        let mut class_of = [u32::MAX; 256];
        if let Some(l) = &label_values {
            let distinct: std::collections::BTreeSet<u8> = l.iter().copied().collect();
            for v in distinct {
                class_of[v as usize] = self.work.class_index(&v.to_string());
            }
        }
        let id = self.new_source_id();
        let settings = self.work.settings;
        let progress = self.progress;
        progress.add_total(images.count as u64);
        let mut spans: Vec<Span> = Vec::new();
        self.in_source = true;
        ordered_map(
            self.pool,
            images.count,
            |i| {
                let gray = images.image(i);
                let rgb: Vec<u8> = gray.iter().flat_map(|&v| [v, v, v]).collect();
                let img =
                    image::RgbImage::from_raw(images.cols, images.rows, rgb).expect("sizes match");
                let label = label_values.as_ref().map(|l| class_of[l[i] as usize]);
                let r = encode_record(img, Original::default(), &settings, label, i as u32);
                progress.advance(1);
                r
            },
            |i, r| {
                let mut record = r.map_err(|e| IngestError::Output {
                    path: c.path.clone(),
                    source: io::Error::other(format!("image {i}: {e}")),
                })?;
                record.meta.source_id = id;
                let span = self.append(&record)?;
                push_span(&mut spans, span);
                self.summary.ingested += 1;
                Ok::<(), IngestError>(())
            },
        )?;
        self.in_source = false;
        self.summary.sources_added += 1;
        self.by_hash.insert(hash.clone(), (id, spans.clone()));
        self.pending.push(entry(id, None, spans));
        self.maybe_commit()
    }

    fn new_source_id(&mut self) -> u64 {
        self.next_source_id += 1;
        self.next_source_id - 1
    }

    /// Appends a record to the open shard (opening one if needed) and returns where it went.
    fn append(&mut self, record: &StoredRecord) -> Result<Span, IngestError> {
        if self.writer.is_none() {
            let id = self.work.next_shard_id();
            let path = self
                .out
                .join(SHARDS_DIR)
                .join(Manifest::shard_file_name(id));
            let settings = &self.work.settings;
            let writer = ShardWriter::create(&path, settings.codec, settings.compression)?;
            self.writer = Some((id, writer));
        }
        let (id, writer) = self.writer.as_mut().unwrap();
        let index = writer.append(record)?;
        let span = Span {
            shard: *id,
            first: index,
            count: 1,
        };
        if writer.data_bytes() >= self.shard_bytes {
            self.finish_shard()?;
        }
        Ok(span)
    }

    /// Finishes the open shard (if any), lists it and applies the pending sources.
    fn finish_shard(&mut self) -> Result<(), IngestError> {
        if let Some((id, writer)) = self.writer.take() {
            let records = writer.len() as u64;
            let raw_bytes = writer.raw_bytes();
            let bytes = writer.finish()?;
            self.summary.shards_written += 1;
            self.summary.bytes_stored += bytes;
            self.summary.bytes_raw += raw_bytes;
            self.work.shards.push(ShardEntry {
                id,
                file: Manifest::shard_file_name(id),
                records,
                bytes,
                raw_bytes,
                retired: Vec::new(),
            });
            self.dirty = true;
        }
        for entry in std::mem::take(&mut self.pending) {
            self.apply(entry);
        }
        Ok(())
    }

    /// Puts `entry` into the working manifest, replacing the entry of the same path.
    fn apply(&mut self, entry: SourceEntry) {
        *self.hash_refs.entry(entry.hash.clone()).or_default() += 1;
        match self.by_path.get(&entry.path) {
            Some(&i) => {
                let old = std::mem::replace(&mut self.work.sources[i], entry);
                *self.hash_refs.get_mut(&old.hash).unwrap() -= 1;
                self.replaced.push(old);
            }
            None => {
                self.by_path
                    .insert(entry.path.clone(), self.work.sources.len());
                self.work.sources.push(entry);
            }
        }
        self.dirty = true;
    }

    fn maybe_commit(&mut self) -> Result<(), IngestError> {
        if self.last_commit.elapsed() >= self.commit_interval && self.writer.is_none() {
            self.commit(false)?;
        }
        Ok(())
    }

    /// Saves the working manifest (only when no source is partly written).
    fn commit(&mut self, last: bool) -> Result<(), IngestError> {
        if self.in_source || (!self.dirty && !last) {
            return Ok(());
        }
        if self.writer.is_none() {
            for entry in std::mem::take(&mut self.pending) {
                self.apply(entry);
            }
        }
        self.retire_replaced();
        if self.dirty {
            self.work.generation += 1;
            self.work.save(&self.out)?;
            self.dirty = false;
        }
        self.last_commit = Instant::now();
        Ok(())
    }

    /// Retires the records of replaced entries that no source refers to any more.
    fn retire_replaced(&mut self) {
        for old in std::mem::take(&mut self.replaced) {
            if self.hash_refs.get(&old.hash).copied().unwrap_or(0) > 0 {
                continue;
            }
            self.by_hash.remove(&old.hash);
            for span in &old.records {
                if let Some(shard) = self.work.shards.iter_mut().find(|s| s.id == span.shard) {
                    shard.retired.extend(span.first..span.first + span.count);
                    shard.retired.sort_unstable();
                    shard.retired.dedup();
                    self.summary.retired += u64::from(span.count);
                }
            }
            self.dirty = true;
        }
    }
}

fn push_span(spans: &mut Vec<Span>, s: Span) {
    match spans.last_mut() {
        Some(last) if last.shard == s.shard && last.first + last.count == s.first => {
            last.count += 1
        }
        _ => spans.push(s),
    }
}

fn hash_files(images: &Path, labels: Option<&Path>) -> io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(File::open(images)?)?;
    if let Some(l) = labels {
        h.update(b"\0labels\0");
        h.update_reader(File::open(l)?)?;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Reads, hashes, decodes and encodes one image file (runs on a worker thread).
fn process_image(
    c: &Candidate,
    label: Option<u32>,
    previous_hash: Option<&str>,
    known: &HashSet<String>,
    settings: &IngestSettings,
    limits: &DecodeLimits,
) -> Outcome {
    let reject = |reason, detail: String| Outcome::Rejected(Reject::new(&c.path, reason, detail));
    if c.stamp.size == 0 {
        return reject(RejectReason::Empty, "zero-byte file".into());
    }
    if c.stamp.size > limits.max_file_bytes {
        return reject(
            RejectReason::TooLarge,
            format!(
                "{} bytes exceeds the file size limit of {}",
                c.stamp.size, limits.max_file_bytes
            ),
        );
    }
    let bytes = match fs::read(&c.path) {
        Ok(b) if b.is_empty() => return reject(RejectReason::Empty, "zero-byte file".into()),
        Ok(b) => b,
        Err(e) => return reject(RejectReason::Unreadable, e.to_string()),
    };
    let hash = blake3::hash(&bytes).to_hex().to_string();
    if previous_hash == Some(hash.as_str()) {
        return Outcome::Unchanged { hash };
    }
    if known.contains(&hash) {
        return Outcome::Duplicate { hash };
    }
    let decoded = match decode::decode_rgb8(&bytes, limits) {
        Ok(d) => d,
        Err(DecodeError::NotAnImage) => {
            return reject(RejectReason::NotAnImage, "unrecognised content".into());
        }
        Err(DecodeError::TooLarge(m)) => return reject(RejectReason::TooLarge, m),
        Err(DecodeError::Corrupt(m)) => return reject(RejectReason::Corrupt, m),
    };
    let keep_original = !decoded.reoriented
        && matches!(
            decoded.format,
            ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP
        );
    let original = Original {
        bytes: keep_original.then_some(bytes.as_slice()),
        lossy: matches!(decoded.format, ImageFormat::Jpeg | ImageFormat::WebP),
    };
    match encode_record(decoded.image, original, settings, label, 0) {
        Ok(record) => Outcome::Stored { hash, record },
        Err(e) => reject(RejectReason::Corrupt, e.to_string()),
    }
}

/// What the `encoded` codec may keep of the source file.
#[derive(Clone, Copy, Default)]
struct Original<'a> {
    /// The file's bytes, when a reader can decode them to the same pixels.
    bytes: Option<&'a [u8]>,
    /// The source format is lossy (JPEG, WebP): a re-encode may be lossy too.
    lossy: bool,
}

/// Resizes `img` per the settings and turns it into a compressed record payload.
///
/// With the `encoded` codec, the source file's bytes are stored as they are when no
/// resize is needed; otherwise the image is re-encoded: as JPEG at the configured
/// quality when the source was lossy, as PNG (lossless) when it was not.
fn encode_record(
    img: image::RgbImage,
    original: Original<'_>,
    settings: &IngestSettings,
    label: Option<u32>,
    item: u32,
) -> Result<StoredRecord, DecodeError> {
    let (w, h) = img.dimensions();
    let resize_needed = decode::target_size(w, h, settings.max_side) != (w, h);
    let img = decode::resize_short_side(img, settings.max_side);
    let (w, h) = img.dimensions();
    let compress = |payload: &[u8]| {
        let (c, level) = (settings.compression, settings.zstd_level);
        StoredRecord::compress(payload, c, level, w, h, label, item)
            .map_err(|e| DecodeError::Corrupt(format!("zstd: {e}")))
    };
    match (settings.codec, original.bytes) {
        (Codec::RawRgb8, _) => compress(img.as_raw()),
        (Codec::Encoded, Some(bytes)) if !resize_needed => compress(bytes),
        (Codec::Encoded, _) if original.lossy => {
            compress(&decode::encode_jpeg(&img, settings.jpeg_quality)?)
        }
        (Codec::Encoded, _) => compress(&decode::encode_png(&img)?),
    }
}
