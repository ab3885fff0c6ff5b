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
use crate::idx;
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

pub use compact::{CompactPolicy, CompactReport};

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
        }
    }
}

/// Moves the calling thread to the idle scheduling class (Linux `SCHED_IDLE`; nice 19
/// where that is refused): it runs on a core only when nothing else wants that core.
/// Beside training this is what ingest needs: training's fork-join kernels wait for
/// their slowest thread, and a background thread that shares a core for a time slice
/// (even at nice 19) stalls every parallel op behind it; an idle-class thread is
/// preempted at once. Ingest then uses the gaps training leaves (data waits, the
/// serial parts of a step), which is also where its latency comes from.
pub fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls on the calling thread's own id; `param` outlives the call.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::pid_t;
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) != 0
            && libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) != 0
        {
            tracing::debug!("could not lower an ingest thread's priority");
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
            .map(|s| stored_path(&s.path))
            .chain(
                self.pending
                    .iter()
                    .map(|s| stored_path(&s.path))
                    .filter(|p| p.starts_with(root)),
            )
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
            self.add_idx(c)?;
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

    fn add_images(&mut self, mut images: Vec<Candidate>) -> Result<(), IngestError> {
        // New classes in sorted order, as torchvision's ImageFolder numbers them.
        let new_classes: BTreeSet<&str> =
            images.iter().filter_map(|c| c.label.as_deref()).collect();
        for name in new_classes {
            self.work.class_index(name);
        }
        // Unchanged files: nothing to read; a new label is a manifest change only.
        let mut unchanged = Vec::new();
        images.retain(|c| {
            let present = self
                .existing(&path_key(&c.path))
                .is_some_and(|e| e.stamp.unchanged(&c.stamp));
            if present {
                unchanged.push((c.path.clone(), c.label.clone()));
            }
            !present
        });
        for (path, label) in unchanged {
            self.summary.already_present += 1;
            self.relabel(&path, label.as_deref())?;
        }
        let labels: Vec<Option<u32>> = images
            .iter()
            .map(|c| c.label.as_deref().map(|l| self.work.class_index(l)))
            .collect();
        let previous: Vec<Option<String>> = images
            .iter()
            .map(|c| self.existing(&path_key(&c.path)).map(|e| e.hash.clone()))
            .collect();
        let known: HashSet<String> = self.by_hash.keys().cloned().collect();
        // Content hash → the first file of this batch seen with it: later copies are
        // duplicates before they are decoded.
        let first_of: std::sync::Mutex<HashMap<String, usize>> = Default::default();
        self.progress.add_total(images.len() as u64);
        let settings = self.work.settings;
        let limits = self.opts.limits;
        let duty = self.opts.duty.clamp(0.01, 1.0);
        let progress = self.progress;
        // A second handle on the pool keeps its borrow apart from `consume`'s `self`.
        let pool = self.pool.clone();
        ordered_map(
            &pool,
            images.len(),
            |i| {
                let c = &images[i];
                let queued = |hash: &str| {
                    let mut first = first_of.lock().expect("never poisoned: no panics inside");
                    let j = first.entry(hash.to_owned()).or_insert(i);
                    *j = (*j).min(i);
                    *j < i
                };
                let started = Instant::now();
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    encode::process_image(
                        c,
                        labels[i],
                        previous[i].as_deref(),
                        &known,
                        &queued,
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
                if duty < 1.0 {
                    // Work at most `duty` of the time: rest in proportion to the work.
                    std::thread::sleep(started.elapsed().mul_f64(1.0 / duty - 1.0));
                }
                progress.advance(1);
                outcome
            },
            |i, outcome| self.consume_image(&images[i], labels[i], outcome),
        )
    }

    fn consume_image(
        &mut self,
        c: &Candidate,
        label: Option<u32>,
        outcome: Outcome,
    ) -> Result<(), IngestError> {
        let (hash, record) = match outcome {
            Outcome::Rejected(r) => {
                self.rejects.push(r);
                return Ok(());
            }
            Outcome::Stored { hash, record } => (hash, Some(record)),
            Outcome::Unchanged { hash } | Outcome::Duplicate { hash } => (hash, None),
        };
        let path = path_key(&c.path);
        let same = self.existing(&path).filter(|e| e.hash == hash).cloned();
        let (id, duplicate_of, records) = match (same, self.by_hash.get(&hash).cloned(), record) {
            // Same content as before at this path: only the stamp (and the label) change.
            (Some(e), _, _) => {
                self.summary.already_present += 1;
                if e.label != c.label {
                    self.note_relabelled_in_place(path.clone(), e.label.clone(), c.label.clone());
                }
                (e.id, e.duplicate_of, e.records)
            }
            (None, Some(spans), _) => {
                self.summary.duplicates += 1;
                let orig = self.source_id_of(&hash);
                (self.new_source_id(), orig, spans)
            }
            (None, None, Some(mut record)) => {
                let id = self.new_source_id();
                record.meta.source_id = id;
                let span = self.append(&record)?;
                self.summary.ingested += 1;
                self.summary.sources_added += 1;
                self.by_hash.insert(hash.clone(), vec![span]);
                (id, None, vec![span])
            }
            (None, None, None) => {
                // A copy of a file earlier in this run that was rejected: the same bytes,
                // so the same verdict; decode it here to report it.
                let outcome = encode::process_image(
                    c,
                    label,
                    None,
                    &HashSet::new(),
                    &|_| false,
                    &self.work.settings,
                    &self.opts.limits,
                );
                return self.consume_image(c, label, outcome);
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

    /// Id of a source (applied or pending) holding `hash`.
    fn source_id_of(&self, hash: &str) -> Option<u64> {
        self.pending
            .iter()
            .chain(self.by_path.values().map(|&i| &self.work.sources[i]))
            .find(|s| s.hash == hash)
            .map(|s| s.id)
    }

    fn add_idx(&mut self, c: Candidate) -> Result<(), IngestError> {
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
        let path = path_key(&c.path);
        let labels_file = labels
            .as_ref()
            .zip(labels_stamp)
            .map(|(p, stamp)| LabelsFile {
                path: path_key(p),
                stamp,
            });
        let labels_unchanged = |recorded: &Option<LabelsFile>| match (recorded, &labels_file) {
            (Some(a), Some(b)) => a.path == b.path && a.stamp.unchanged(&b.stamp),
            (a, b) => a.is_none() && b.is_none(),
        };
        if let Some(e) = self.existing(&path)
            && e.stamp.unchanged(&c.stamp)
            && labels_unchanged(&e.labels_file)
        {
            self.summary.already_present += 1;
            return Ok(());
        }
        let reject = |reason, detail: String| Reject::new(&c.path, reason, detail);
        let hash = match encode::hash_files(&c.path, labels.as_deref()) {
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
        if let Some(spans) = self.by_hash.get(&hash).cloned() {
            self.summary.duplicates += 1;
            let id = self.new_source_id();
            let orig = self.source_id_of(&hash);
            self.pending.push(entry(id, orig, spans));
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
            let distinct: BTreeSet<u8> = l.iter().copied().collect();
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
        let pool = self.pool.clone();
        ordered_map(
            &pool,
            images.count,
            |i| {
                let gray = images.image(i);
                let rgb: Vec<u8> = gray.iter().flat_map(|&v| [v, v, v]).collect();
                let img =
                    image::RgbImage::from_raw(images.cols, images.rows, rgb).expect("sizes match");
                let label = label_values.as_ref().map(|l| class_of[l[i] as usize]);
                let size = img.dimensions();
                let r = encode::encode_record(
                    img,
                    size,
                    Original::default(),
                    &settings,
                    label,
                    i as u32,
                );
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
        self.by_hash.insert(hash.clone(), spans.clone());
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

    /// Takes vanished sources out of the manifest, saying for each what became of its
    /// content: held by a source added since this ingester opened, under another label
    /// (relabelled: the file moved to another class); held by another source (removed:
    /// a copy or a rename, or a copy in another class that was there before); or held
    /// by no source (retired).
    fn drop_removed(&mut self) {
        if self.removed.is_empty() {
            return;
        }
        let mut removed = std::mem::take(&mut self.removed);
        removed.sort_unstable();
        let hashes: HashSet<&str> = removed
            .iter()
            .map(|&i| self.work.sources[i].hash.as_str())
            .collect();
        // Live holders of each affected content: (path, label, added by this ingester).
        let mut holders: HashMap<&str, Vec<Holder>> = HashMap::new();
        for s in self.by_path.values().map(|&i| &self.work.sources[i]) {
            if hashes.contains(s.hash.as_str()) {
                holders.entry(s.hash.as_str()).or_default().push((
                    s.path.as_str(),
                    s.label.as_deref(),
                    s.id >= self.first_new_id,
                ));
            }
        }
        let mut gone = Vec::new();
        let mut changes = Vec::new();
        for &i in &removed {
            let old = &self.work.sources[i];
            let mut held = holders.get(old.hash.as_str()).cloned().unwrap_or_default();
            held.sort_unstable();
            let same_name =
                |p: &str| stored_path(p).file_name() == stored_path(&old.path).file_name();
            let same_label = held.iter().find(|(_, l, _)| *l == old.label.as_deref());
            let moved_to = held
                .iter()
                .filter(|(_, _, new)| *new)
                .min_by_key(|(p, _, _)| !same_name(p));
            match (same_label, moved_to, held.first()) {
                (None, Some(&(now, to, _)), _) => changes.push(SourceChange::Relabelled {
                    path: old.path.clone(),
                    now: now.to_owned(),
                    from: old.label.clone(),
                    to: to.map(str::to_owned),
                }),
                (Some(&(kept_by, _, _)), _, _) | (None, None, Some(&(kept_by, _, _))) => changes
                    .push(SourceChange::Removed {
                        path: old.path.clone(),
                        kept_by: kept_by.to_owned(),
                    }),
                (None, None, None) => gone.push(old.clone()),
            }
        }
        for c in &changes {
            match c {
                SourceChange::Relabelled { .. } => self.summary.relabelled += 1,
                SourceChange::Removed { .. } => self.summary.sources_removed += 1,
                SourceChange::Retired { .. } => {}
            }
        }
        self.changes.extend(changes);
        // Compact the source list and re-index the paths.
        let mut k = 0;
        self.work.sources.retain(|_| {
            k += 1;
            removed.binary_search(&(k - 1)).is_err()
        });
        self.by_path = self
            .work
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.path.clone(), i))
            .collect();
        for old in gone {
            self.retire_records(&old, false);
        }
        self.dirty = true;
    }

    /// Retires the records of replaced entries that no source refers to any more.
    fn retire_replaced(&mut self) {
        for old in std::mem::take(&mut self.replaced) {
            if self.hash_refs.get(&old.hash).copied().unwrap_or(0) == 0 {
                self.retire_records(&old, true);
            }
        }
    }

    fn retire_records(&mut self, old: &SourceEntry, replaced: bool) {
        self.by_hash.remove(&old.hash);
        self.hash_refs.remove(&old.hash);
        let mut records = 0;
        for span in &old.records {
            if let Some(shard) = self.work.shards.iter_mut().find(|s| s.id == span.shard) {
                shard.retired.extend(span.first..span.first + span.count);
                shard.retired.sort_unstable();
                shard.retired.dedup();
                records += u64::from(span.count);
            }
        }
        self.summary.retired += records;
        self.summary.sources_retired += 1;
        self.changes.push(SourceChange::Retired {
            path: old.path.clone(),
            records,
            replaced,
        });
        self.dirty = true;
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

/// A live source holding some content: its path, its label, and whether it was added
/// by this ingester.
type Holder<'a> = (&'a str, Option<&'a str>, bool);

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

impl Ingester<'static> {
    /// [`Ingester::open`] without progress reports.
    pub fn open_quiet(out: &Path, opts: IngesterOptions) -> Result<Self, IngestError> {
        Ingester::open(out, opts, &NoProgress)
    }
}
