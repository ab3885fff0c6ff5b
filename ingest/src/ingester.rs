//! The ingest engine: a dataset opened for writing, fed file by file.
//!
//! [`Ingester`] holds the dataset lock and the working manifest; it adds files (new
//! content is decoded, resized and appended to shards in parallel; known content costs
//! a read and a hash), retires sources that vanished, relabels sources, and commits. The
//! one-shot `byol ingest` run ([`crate::ingest()`]) and a long-lived watcher both drive it.
//!
//! Crash safety: records go into a shard under a temp name; a finished shard is
//! renamed, and the manifest that lists it (with the sources whose records it holds)
//! is saved atomically afterwards. The manifest is never saved while a source is only
//! partly written, so a killed run leaves the dataset as of its last manifest, and the
//! next run removes the leftovers and redoes the rest.
//!
//! One job per file: `images.rs` (image files), `idx_files.rs` (IDX files),
//! `tar_files.rs` (WebDataset shards),
//! `vanished.rs` (sources gone or replaced, at commit), `settings.rs` (the dataset's
//! fixed settings), `scheduling.rs` (ingest threads beside training), `compact.rs`
//! (merging small shards); the lock is `fsutil::try_lock_exclusive`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::change::{self, SourceChange};
use crate::decode::DecodeLimits;
use crate::encode::{self, Original, Outcome};
use crate::fsutil::TMP_SUFFIX;
use crate::ingest::{
    IngestError, IngestReport, IngestSummary, NoProgress, Progress, SettingsOverride,
};
use crate::manifest::{
    FileStamp, IngestSettings, LabelsFile, Manifest, SHARDS_DIR, ShardEntry, SourceEntry, Span,
    path_key, stored_path,
};
use crate::pipeline::ordered_map;
use crate::reject::{self, Reject, RejectReason};
use crate::shard::{ShardWriter, StoredRecord};
use crate::source::{Candidate, CandidateKind, Layout};

mod compact;
mod idx_files;
mod images;
mod scheduling;
mod settings;
mod tar_files;
mod vanished;

pub use compact::{CompactPolicy, CompactReport};
pub use scheduling::lower_thread_priority;
use settings::{merge_settings, resolve_settings};

/// Shards finished by this process (what the `BYOL_TEST_ABORT_IN_SHARD` fault point counts).
static SHARDS_FINISHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Name of the lock file that keeps two writers off one dataset.
pub const LOCK_FILE: &str = ".lock";

/// How an [`Ingester`] works (everything but the sources).
#[derive(Debug, Clone)]
pub struct IngesterOptions {
    /// Settings for a new dataset, or checks against an existing one.
    pub settings: SettingsOverride,
    /// Target size of one shard in bytes.
    pub shard_bytes: u64,
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Decoder limits.
    pub limits: DecodeLimits,
    /// Shortest time between two manifest saves while adding (the last save is always made).
    pub commit_interval: Duration,
    /// Run the worker threads in the idle scheduling class ([`lower_thread_priority`]):
    /// a long-lived ingester beside training takes only the cycles training leaves.
    pub background: bool,
    /// Share of the time each worker may spend working, in (0, 1]: after each file it
    /// rests in proportion (1: no rest). Beside training, what an idle-class ingester
    /// still costs it is cache and memory bandwidth; resting trades ingest speed for it.
    pub duty: f64,
    /// The field of a WebDataset sample's `json` read as its label
    /// ([`crate::webdataset::DEFAULT_JSON_LABEL`] by default).
    pub json_label: String,
}

impl Default for IngesterOptions {
    fn default() -> Self {
        IngesterOptions {
            settings: SettingsOverride::default(),
            shard_bytes: 256 << 20,
            threads: 0,
            limits: DecodeLimits::default(),
            commit_interval: Duration::from_secs(10),
            background: false,
            duty: 1.0,
            json_label: crate::webdataset::DEFAULT_JSON_LABEL.to_owned(),
        }
    }
}

/// A dataset opened for writing (see the module docs).
pub struct Ingester<'p> {
    out: PathBuf,
    _lock: DatasetLock,
    opts: IngesterOptions,
    pool: std::sync::Arc<rayon::ThreadPool>,
    progress: &'p dyn Progress,
    /// The manifest with every finished change applied; saved by `commit`.
    work: Manifest,
    writer: Option<(u32, ShardWriter)>,
    /// Source entries whose records are in the open shard (applied when it finishes).
    pending: Vec<SourceEntry>,
    /// Entries whose content was replaced since the last commit; their records are
    /// retired at the commit if no source refers to them any more.
    replaced: Vec<SourceEntry>,
    /// Entries whose file vanished since the last commit (still in `work.sources`,
    /// at these positions, until the commit removes them).
    removed: Vec<usize>,
    /// Content hash → its records, including records not yet committed.
    by_hash: HashMap<String, Vec<Span>>,
    /// Number of applied sources per content hash.
    hash_refs: HashMap<String, usize>,
    /// Path → index in `work.sources` (vanished entries are not in it).
    by_path: HashMap<String, usize>,
    /// File identity (device, inode) → indices in `work.sources` recorded with it (may
    /// hold stale indices: [`Ingester::stale_names`] checks each).
    by_identity: HashMap<(u64, u64), Vec<usize>>,
    next_source_id: u64,
    /// Sources with an id from this one on were added by this ingester.
    first_new_id: u64,
    /// A source is partly written: the manifest must not be saved.
    in_source: bool,
    dirty: bool,
    last_commit: Instant,
    started: Instant,
    summary: IngestSummary,
    rejects: Vec<Reject>,
    changes: Vec<SourceChange>,
}

impl<'p> Ingester<'p> {
    /// Opens (or creates) the dataset in `out` for writing: takes its lock, checks the
    /// settings, and removes what interrupted runs left behind.
    ///
    /// Errors: the folder cannot be written, another writer holds the lock, the
    /// manifest is invalid, or the settings conflict with the dataset's.
    pub fn open(
        out: &Path,
        opts: IngesterOptions,
        progress: &'p dyn Progress,
    ) -> Result<Self, IngestError> {
        let started = Instant::now();
        let output_err = |source| IngestError::Output {
            path: out.to_owned(),
            source,
        };
        fs::create_dir_all(out.join(SHARDS_DIR)).map_err(output_err)?;
        let lock = lock(out)?;
        let work = match Manifest::load(out)? {
            Some(m) => merge_settings(out, m, &opts.settings)?,
            None => Manifest::new(resolve_settings(&opts.settings)),
        };
        let leftovers = remove_leftovers(out, &work).map_err(output_err)?;
        let background = opts.background;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.threads)
            .thread_name(|i| format!("byol-ingest-{i}"))
            .start_handler(move |_| {
                if background {
                    lower_thread_priority();
                }
            })
            .build()
            .map_err(|e| IngestError::InvalidOption {
                key: "threads",
                reason: e.to_string(),
            })?;
        let mut by_hash = HashMap::new();
        let mut hash_refs = HashMap::new();
        let mut by_path = HashMap::new();
        for (i, s) in work.sources.iter().enumerate() {
            by_hash
                .entry(s.hash.clone())
                .or_insert_with(|| s.records.clone());
            *hash_refs.entry(s.hash.clone()).or_default() += 1;
            by_path.insert(s.path.clone(), i);
        }
        let by_identity = identities(&work.sources);
        Ok(Ingester {
            out: out.to_owned(),
            _lock: lock,
            opts,
            pool: std::sync::Arc::new(pool),
            progress,
            next_source_id: work.next_source_id(),
            first_new_id: work.next_source_id(),
            work,
            writer: None,
            pending: Vec::new(),
            replaced: Vec::new(),
            removed: Vec::new(),
            by_hash,
            hash_refs,
            by_path,
            by_identity,
            in_source: false,
            dirty: false,
            last_commit: Instant::now(),
            started,
            summary: IngestSummary {
                leftovers_removed: leftovers,
                ..IngestSummary::default()
            },
            rejects: Vec::new(),
            changes: Vec::new(),
        })
    }

    /// The working manifest (every applied change, committed or not).
    pub fn manifest(&self) -> &Manifest {
        &self.work
    }

    /// The dataset folder.
    pub fn dir(&self) -> &Path {
        &self.out
    }

    /// Target size of one shard in bytes.
    pub fn shard_bytes(&self) -> u64 {
        self.opts.shard_bytes
    }

    /// Records the layout of folder `root` for later runs.
    pub fn set_root_layout(&mut self, root: &Path, layout: Layout) {
        self.dirty |= self.work.set_root_layout(root, layout);
    }

    /// Paths of the sources at or under `root` (canonical).
    pub fn sources_under(&self, root: &Path) -> Vec<PathBuf> {
        self.work
            .sources_under(root)
            .filter(|s| self.by_path.contains_key(&s.path))
            .map(|s| stored_path(&s.path).into_owned())
            .chain(
                self.pending
                    .iter()
                    .map(|s| stored_path(&s.path))
                    .filter(|p| p.starts_with(root))
                    .map(|p| p.into_owned()),
            )
            .collect()
    }

    /// The paths of the sources recorded as file `identity` (device, inode;
    /// [`FileStamp::identity`]) with a stamp other than `now`, applied or pending: the
    /// names of one file the dataset holds that are out of date. One hash lookup.
    pub fn stale_names(&self, identity: (u64, u64), now: &FileStamp) -> Vec<PathBuf> {
        let applied = self
            .by_identity
            .get(&identity)
            .into_iter()
            .flatten()
            .filter_map(|&i| self.work.sources.get(i).map(|s| (i, s)))
            .filter(|(i, s)| {
                s.stamp.identity() == Some(identity) && self.by_path.get(&s.path) == Some(i)
            })
            .map(|(_, s)| s);
        let pending = self
            .pending
            .iter()
            .filter(|s| s.stamp.identity() == Some(identity));
        applied
            .chain(pending)
            .filter(|s| s.stamp != *now)
            .map(|s| stored_path(&s.path).into_owned())
            .collect()
    }

    /// Counts rejects found before reading (by a folder scan) in this run's report.
    pub fn note_rejects(&mut self, rejects: impl IntoIterator<Item = Reject>) {
        self.rejects.extend(rejects);
    }

    /// Adds files found by [`crate::source::scan`] (or built for single files): new or
    /// changed content is stored, unchanged files cost a stat, known content a read and
    /// a hash; a file whose label changed is relabelled. Bad files become rejects.
    ///
    /// Errors only when the dataset cannot be written.
    pub fn add(&mut self, candidates: Vec<Candidate>) -> Result<(), IngestError> {
        self.summary.files_seen += candidates.len() as u64;
        let (images, idxs): (Vec<_>, Vec<_>) = candidates
            .into_iter()
            .partition(|c| c.kind == CandidateKind::Image);
        self.add_images(images)?;
        for c in idxs {
            if c.kind == CandidateKind::Tar {
                self.add_tar(c)?;
            } else {
                self.add_idx(c)?;
            }
        }
        Ok(())
    }

    /// The file at `path` is gone: its source entry is removed at the next commit, and
    /// its records are retired unless another source holds the same content (a move
    /// between class folders becomes a relabel). Returns false when no source has
    /// this path.
    pub fn retire(&mut self, path: &Path) -> Result<bool, IngestError> {
        let key = path_key(path);
        if self.pending.iter().any(|e| e.path == key) {
            self.finish_shard()?;
        }
        let Some(i) = self.by_path.remove(&key) else {
            return Ok(false);
        };
        let hash = &self.work.sources[i].hash;
        *self
            .hash_refs
            .get_mut(hash)
            .expect("applied sources are counted") -= 1;
        self.removed.push(i);
        self.dirty = true;
        Ok(true)
    }

    /// Gives the source at `path` the label `label` (`None`: unlabelled); no record is
    /// rewritten (labels live in the manifest). Returns false when no source has this
    /// path, or it is an IDX file (labelled by its labels file).
    pub fn relabel(&mut self, path: &Path, label: Option<&str>) -> Result<bool, IngestError> {
        let key = path_key(path);
        if self.pending.iter().any(|e| e.path == key) {
            self.finish_shard()?;
        }
        let Some(&i) = self.by_path.get(&key) else {
            return Ok(false);
        };
        if self.work.sources[i].labels_file.is_some() {
            return Ok(false);
        }
        if self.work.sources[i].label.as_deref() == label {
            return Ok(true);
        }
        if let Some(l) = label {
            self.work.class_index(l);
        }
        let entry = &mut self.work.sources[i];
        let from = std::mem::replace(&mut entry.label, label.map(str::to_owned));
        let path = entry.path.clone();
        self.note_relabelled_in_place(path, from, label.map(str::to_owned));
        self.dirty = true;
        Ok(true)
    }

    /// Reports that the source at `path` now has label `to` (was `from`).
    fn note_relabelled_in_place(&mut self, path: String, from: Option<String>, to: Option<String>) {
        self.summary.relabelled += 1;
        self.changes.push(SourceChange::Relabelled {
            now: path.clone(),
            path,
            from,
            to,
        });
    }

    /// Saves the working manifest now (finishing the open shard first).
    pub fn commit(&mut self) -> Result<(), IngestError> {
        self.finish_shard()?;
        self.save(true)
    }

    /// Commits, appends the rejects and changes reports, and returns what was done.
    pub fn finish(mut self) -> Result<IngestReport, IngestError> {
        self.flush()
    }

    /// Commits, appends the rejects and changes reports, and returns what was done
    /// since the last flush (or the open); the ingester stays open. What a long-lived
    /// ingester calls after each batch of files.
    pub fn flush(&mut self) -> Result<IngestReport, IngestError> {
        self.commit()?;
        let mut summary = std::mem::take(&mut self.summary);
        for r in &self.rejects {
            *summary.rejected.entry(r.reason).or_default() += 1;
        }
        let run_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let output_err = |source| IngestError::Output {
            path: self.out.clone(),
            source,
        };
        reject::append_report(&self.out, run_unix, &self.rejects).map_err(output_err)?;
        change::append_report(&self.out, run_unix, self.work.generation, &self.changes)
            .map_err(output_err)?;
        summary.generation = self.work.generation;
        summary.seconds = self.started.elapsed().as_secs_f64();
        self.started = Instant::now();
        Ok(IngestReport {
            summary,
            rejects: std::mem::take(&mut self.rejects),
            changes: std::mem::take(&mut self.changes),
        })
    }

    fn existing(&self, path: &str) -> Option<&SourceEntry> {
        self.by_path.get(path).map(|&i| &self.work.sources[i])
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
        if writer.data_bytes() >= self.opts.shard_bytes {
            self.finish_shard()?;
        }
        Ok(span)
    }

    /// Finishes the open shard (if any), lists it and applies the pending sources.
    fn finish_shard(&mut self) -> Result<(), IngestError> {
        if let Some((id, writer)) = self.writer.take() {
            let records = writer.len() as u64;
            let raw_bytes = writer.raw_bytes();
            self.summary.shards_written += 1;
            let nth = SHARDS_FINISHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            crate::fault::abort_if("BYOL_TEST_ABORT_IN_SHARD", nth);
            let bytes = writer.finish()?;
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
        let at = self
            .by_path
            .get(&entry.path)
            .copied()
            .unwrap_or(self.work.sources.len());
        if let Some(id) = entry.stamp.identity() {
            let at_id = self.by_identity.entry(id).or_default();
            if !at_id.contains(&at) {
                at_id.push(at);
            }
        }
        match self.by_path.get(&entry.path) {
            Some(&i) => {
                let old = std::mem::replace(&mut self.work.sources[i], entry);
                *self.hash_refs.get_mut(&old.hash).unwrap() -= 1;
                if old.hash != self.work.sources[i].hash {
                    self.replaced.push(old);
                }
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
        if self.last_commit.elapsed() >= self.opts.commit_interval && self.writer.is_none() {
            self.save(false)?;
        }
        Ok(())
    }

    /// Saves the working manifest (only when no source is partly written).
    fn save(&mut self, last: bool) -> Result<(), IngestError> {
        if self.in_source || (!self.dirty && !last) {
            return Ok(());
        }
        if self.writer.is_none() {
            for entry in std::mem::take(&mut self.pending) {
                self.apply(entry);
            }
        }
        self.drop_removed();
        self.retire_replaced();
        if self.dirty {
            self.work.generation += 1;
            self.work.save(&self.out)?;
            self.dirty = false;
        }
        self.last_commit = Instant::now();
        Ok(())
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

/// Holds the dataset lock for as long as it lives.
struct DatasetLock(#[allow(dead_code)] File);

fn lock(out: &Path) -> Result<DatasetLock, IngestError> {
    let path = out.join(LOCK_FILE);
    match crate::fsutil::try_lock_exclusive(&path) {
        Ok(Some(f)) => Ok(DatasetLock(f)),
        Ok(None) => Err(IngestError::Locked {
            path: out.to_owned(),
        }),
        Err(source) => Err(IngestError::Output { path, source }),
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

impl Ingester<'static> {
    /// [`Ingester::open`] without progress reports.
    pub fn open_quiet(out: &Path, opts: IngesterOptions) -> Result<Self, IngestError> {
        Ingester::open(out, opts, &NoProgress)
    }
}

/// File identity → the indices of `sources` recorded with it.
fn identities(sources: &[SourceEntry]) -> HashMap<(u64, u64), Vec<usize>> {
    let mut by_identity: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
    for (i, s) in sources.iter().enumerate() {
        if let Some(id) = s.stamp.identity() {
            by_identity.entry(id).or_default().push(i);
        }
    }
    by_identity
}
