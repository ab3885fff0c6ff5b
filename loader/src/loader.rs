//! The loader: persistent workers fill a ring of batch buffers; the consumer takes
//! finished batches in order and hands each buffer back when done with it.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use byol_augment::{Augmenter, SampleKey, Scratch, ViewOut};
use byol_ingest::Manifest;
use byol_ingest::{Dataset, RecordScratch};
use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::LoaderError;
use crate::config::{LoaderConfig, Output};
use crate::plan::{EpochPlan, Global};
use crate::slots::{RawBuf, Slot};

/// Scattered substitutes tried for an unusable record before the epoch order is walked
/// from the slot's position.
const MAX_PROBES: u64 = 64;
/// How long a waiting worker sleeps before re-checking for shutdown.
const WAIT_TICK: Duration = Duration::from_millis(5);

/// Where a run stands: enough to resume with bit-identical batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderState {
    /// The run seed (a resume with another seed is refused).
    pub seed: u64,
    /// Epoch of the next batch.
    pub epoch: u64,
    /// Batch number within that epoch of the next batch.
    pub batch: u64,
    /// Shards in that epoch's domain when it was planned (informational; the domain is
    /// `records`).
    pub shards: u64,
    /// Records in that epoch's domain: the first `records` records (global index,
    /// shard after shard), which a compaction keeps. `None` in states written before
    /// it was recorded: the records of the first `shards` shards then.
    #[serde(default)]
    pub records: Option<u64>,
    /// `batch` is a refresh boundary where the run already looked for new shards and
    /// went on with the epoch: a resume must not look again (the dataset may have grown
    /// since, and the run that did not stop carries on with this epoch).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub went_on: bool,
}

/// Throughput and health counters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LoaderStats {
    /// Batches handed to the consumer.
    pub batches: u64,
    /// Images (samples) handed to the consumer.
    pub images: u64,
    /// Batches per second since the loader started.
    pub batches_per_sec: f64,
    /// Images per second since the loader started.
    pub images_per_sec: f64,
    /// Finished batches waiting for the consumer right now.
    pub queue_depth: usize,
    /// Total seconds the consumer waited in [`Loader::next_batch`].
    pub wait_secs: f64,
    /// Records skipped because they are corrupt or undecodable (each counted once).
    pub skipped: u64,
}

struct Plans {
    /// Plans still in use, oldest first.
    queue: VecDeque<Arc<EpochPlan>>,
    /// The epoch domains the consumer decided ([`Loader::refresh`]), oldest first: a
    /// boundary at global batch `b` is planned with the newest one whose `from` ≤ `b`.
    decisions: VecDeque<Decision>,
}

/// One decision of the epoch domain, taken at a step boundary.
#[derive(Clone)]
struct Decision {
    /// The first global batch it may apply to: past every batch the workers could have
    /// planned when it was taken (the buffer pool's reach).
    from: u64,
    /// The dataset view it plans over, and how many of its records (the first ones).
    dataset: Arc<Dataset>,
    records: u64,
}

impl Plans {
    /// The decision that applies to a boundary at global batch `b`.
    fn decision_for(&self, b: u64) -> &Decision {
        self.decisions
            .iter()
            .rev()
            .find(|d| d.from <= b)
            .unwrap_or(&self.decisions[0])
    }

    /// The newest decision.
    fn latest(&self) -> &Decision {
        self.decisions
            .back()
            .expect("the loader's start is a decision")
    }
}

struct Shared {
    cfg: LoaderConfig,
    aug: Augmenter,
    f32_len: usize,
    u8_len: usize,
    stop: AtomicBool,
    next_sample: AtomicU64,
    slots: Vec<Slot>,
    plans: Mutex<Plans>,
    wake: (Mutex<()>, Condvar),
    ready: Sender<usize>,
    bad: Mutex<HashSet<(usize, u32)>>,
    skipped: AtomicU64,
}

/// Shuffled, resumable two-view batches from a dataset.
///
/// Batches come in order from [`Loader::next_batch`]; epochs follow one another without end
/// (stop when you have had enough). Dropping the loader stops and joins its workers.
pub struct Loader {
    shared: Arc<Shared>,
    ready: Receiver<usize>,
    workers: Option<JoinHandle<()>>,
    /// Global number of the next batch to hand out.
    next_global: u64,
    /// Slots finished out of order, waiting for their turn.
    early: Vec<bool>,
    state: LoaderState,
    started: Instant,
    images: u64,
    wait: Duration,
    /// The manifest file's stamp at the last look: a step
    /// boundary re-reads the manifest only when they changed.
    manifest_stamp: Option<ManifestStamp>,
}

impl Loader {
    /// Starts workers over `dataset`, from `state` (a resume) or from epoch 0.
    pub fn new(
        dataset: Dataset,
        aug: Augmenter,
        cfg: LoaderConfig,
        state: Option<LoaderState>,
    ) -> Result<Self, LoaderError> {
        cfg.validate()?;
        let dataset = Arc::new(dataset);
        let total = dataset.manifest().total_records();
        let state = state.unwrap_or(LoaderState {
            seed: cfg.seed,
            epoch: 0,
            batch: 0,
            shards: dataset.shards().len() as u64,
            records: Some(total),
            went_on: false,
        });
        if state.seed != cfg.seed {
            return Err(LoaderError::State(format!(
                "the state is for seed {}, the config says {}",
                state.seed, cfg.seed
            )));
        }
        let records = match state.records {
            Some(r) => r,
            None if state.shards as usize <= dataset.shards().len() => dataset.shards()
                [..state.shards as usize]
                .iter()
                .map(|s| s.len() as u64)
                .sum(),
            None => total + 1, // refused below
        };
        if records > total {
            return Err(LoaderError::State(format!(
                "the state covers {} records ({} shards) but {} has {total}",
                records,
                state.shards,
                dataset.dir().display(),
            )));
        }
        let mut first = EpochPlan::new(&cfg, dataset.clone(), records, state.epoch, state.batch, 0);
        // Resumed on a refresh boundary: a run that did not stop looked for new shards
        // there, and started the next epoch if the dataset had grown.
        if !state.went_on && first.at_refresh_boundary(state.batch) && total > records {
            first = EpochPlan::new(&cfg, dataset.clone(), total, state.epoch + 1, 0, 0);
        }
        if first.total() > u64::from(Global::MAX) {
            return Err(LoaderError::State(format!(
                "{} records is more than the loader addresses",
                first.total()
            )));
        }
        if first.batches == 0 {
            return Err(LoaderError::TooFewRecords {
                records: first.total(),
                batch_size: cfg.batch_size,
            });
        }
        if state.batch > first.batches {
            return Err(LoaderError::State(format!(
                "batch {} of epoch {} is past its end ({} batches)",
                state.batch, state.epoch, first.batches
            )));
        }
        let first = Arc::new(first);
        let (f32_len, u8_len) = match cfg.output {
            Output::F32 => (aug.view_len(), 0),
            Output::U8 => (0, aug.view_len()),
            Output::Both => (aug.view_len(), aug.view_len()),
        };
        let pool = cfg.batches_ahead + 2;
        let share = cfg.part.range(cfg.batch_size).len();
        let slots = (0..pool as u64)
            .map(|b| Slot::new(b, share, f32_len, u8_len))
            .collect();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(pool);
        let threads = cfg.threads;
        let shared = Arc::new(Shared {
            cfg,
            aug,
            f32_len,
            u8_len,
            stop: AtomicBool::new(false),
            next_sample: AtomicU64::new(0),
            slots,
            plans: Mutex::new(Plans {
                queue: VecDeque::from([first.clone()]),
                // Until the step loop applies growth, boundaries keep the domain the
                // run started (or resumed) in.
                decisions: VecDeque::from([Decision {
                    from: 0,
                    records: first.records,
                    dataset,
                }]),
            }),
            wake: (Mutex::new(()), Condvar::new()),
            ready: ready_tx,
            bad: Mutex::new(HashSet::new()),
            skipped: AtomicU64::new(0),
        });
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("byol-loader-{i}"))
            .build()
            .map_err(|e| LoaderError::Config {
                key: "threads",
                reason: e.to_string(),
            })?;
        let worker_shared = shared.clone();
        // One party per pool thread (`broadcast` runs the loop on each) and one for us.
        let started = Arc::new(Barrier::new(pool.current_num_threads() + 1));
        let worker_started = started.clone();
        // Every pool thread runs one long-lived worker loop: no per-batch task spawning.
        let workers = std::thread::Builder::new()
            .name("byol-loader".into())
            .spawn(move || {
                pool.broadcast(|_| worker_loop(&worker_shared, &worker_started));
            })
            .map_err(LoaderError::Spawn)?;
        // Every worker has sized its buffers: from here on nothing is allocated per batch.
        started.wait();
        Ok(Loader {
            early: vec![false; shared.slots.len()],
            shared,
            ready: ready_rx,
            workers: Some(workers),
            next_global: 0,
            state,
            started: Instant::now(),
            images: 0,
            wait: Duration::ZERO,
            manifest_stamp: None,
        })
    }

    /// The next batch (blocks until it is ready). The batch is owned: its buffer returns
    /// to the pool when it is dropped, so it may be held while the next ones are taken
    /// (a trainer overlapping the next batch's copy with the current step). At most
    /// `batches_ahead + 1` batches may be held when this is called: the next one needs
    /// the buffer of the batch that many before it.
    pub fn next_batch(&mut self) -> Batch {
        let n = self.shared.slots.len();
        let slot = (self.next_global % n as u64) as usize;
        let start = Instant::now();
        while !self.early[slot] {
            let done = self
                .ready
                .recv()
                .expect("workers live as long as the loader");
            self.early[done] = true;
        }
        self.wait += start.elapsed();
        self.early[slot] = false;
        let s = &self.shared.slots[slot];
        let (epoch, index) = (
            s.epoch.load(Ordering::Acquire),
            s.index_in_epoch.load(Ordering::Acquire),
        );
        let len = s.len.load(Ordering::Acquire);
        let records = s.domain_records.load(Ordering::Acquire);
        self.next_global += 1;
        self.images += len as u64;
        self.state = self.state_after(epoch, index, records);
        Batch {
            shared: self.shared.clone(),
            slot,
            epoch,
            index_in_epoch: index,
            len,
            state_after: self.state,
        }
    }

    /// State after batch `index` of `epoch`: where a resume would continue.
    fn state_after(&self, epoch: u64, index: u64, records: u64) -> LoaderState {
        let mut plans = self.shared.plans.lock().unwrap();
        // Plans the consumer has moved past are no longer needed.
        while plans.queue.len() > 1 && plans.queue[0].end_global() < self.next_global {
            plans.queue.pop_front();
        }
        let at = plans
            .queue
            .iter()
            .position(|p| p.epoch == epoch && p.first_batch <= index && index < p.end_batch)
            .expect("plan of a live batch");
        let plan = &plans.queue[at];
        let here = LoaderState {
            seed: self.shared.cfg.seed,
            epoch,
            batch: index + 1,
            shards: plan.shards as u64,
            records: Some(records),
            went_on: false,
        };
        if index + 1 < plan.end_batch {
            here
        } else if let Some(next) = plans.queue.get(at + 1) {
            // Already planned: a continued segment, or the next epoch.
            LoaderState {
                seed: self.shared.cfg.seed,
                epoch: next.epoch,
                batch: next.first_batch,
                shards: next.shards as u64,
                records: Some(next.records),
                went_on: next.epoch == epoch,
            }
        } else if plan.ends_early() {
            // A refresh boundary not planned yet: a resume decides there, as this run will.
            here
        } else {
            // The next epoch's domain is the decision that applies at its first batch;
            // a resume re-plans it over the shards present then.
            let d = plans.decision_for(plan.end_global());
            let latest = (d.dataset.shards().len(), d.records);
            let (next_shards, next_records) = plans
                .queue
                .iter()
                .find(|p| p.epoch == epoch + 1)
                .map_or(latest, |p| (p.shards, p.records));
            LoaderState {
                seed: self.shared.cfg.seed,
                epoch: epoch + 1,
                batch: 0,
                shards: next_shards as u64,
                records: Some(next_records),
                went_on: false,
            }
        }
    }

    /// Where the run stands after the last batch handed out.
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Batches in the current epoch.
    pub fn batches_per_epoch(&self) -> u64 {
        let plans = self.shared.plans.lock().unwrap();
        plans
            .queue
            .iter()
            .find(|p| p.epoch == self.state.epoch)
            .map_or(plans.queue[0].batches, |p| p.batches)
    }

    /// Applies dataset growth at a step boundary: re-reads the manifest (only when its
    /// file changed since the last look) and decides the epoch domain of every epoch or
    /// refresh boundary past the batches the workers may already have planned (the
    /// buffer pool's reach, `batches_ahead + 2` batches). The workers never look at the
    /// manifest themselves, so where new records join depends on the steps at which
    /// this is called, not on when a commit landed. Returns the records the next
    /// boundaries plan with.
    ///
    /// Errors: the manifest cannot be read ([`LoaderError::Dataset`]); the decision in
    /// force stays.
    pub fn refresh(&mut self) -> Result<u64, LoaderError> {
        self.refresh_shared()?;
        Ok(self.shared.plans.lock().unwrap().latest().records)
    }

    /// [`Loader::refresh`], returning the new view of the dataset when one was decided
    /// (rank 0 sends its manifest to the other ranks of a data-parallel job, which apply
    /// it with [`Loader::apply_manifest`]); `None` when nothing changed.
    ///
    /// Errors: as [`Loader::refresh`].
    pub fn refresh_shared(&mut self) -> Result<Option<Arc<Dataset>>, LoaderError> {
        let stamp = manifest_stamp(&self.latest_dataset());
        if stamp.is_some() && stamp == self.manifest_stamp {
            return Ok(None);
        }
        let (current, decided) = {
            let plans = self.shared.plans.lock().unwrap();
            (plans.latest().dataset.clone(), plans.latest().records)
        };
        let dataset = current.refreshed()?.map_or(current.clone(), Arc::new);
        let records = dataset.manifest().total_records();
        self.manifest_stamp = stamp;
        if records == decided && Arc::ptr_eq(&dataset, &current) {
            return Ok(None);
        }
        self.decide(dataset.clone(), records);
        Ok(Some(dataset))
    }

    /// Decides, as [`Loader::refresh`] does, with the dataset as of `manifest` (rank 0's
    /// reading of it, in data-parallel training): every rank then plans the same epochs
    /// from the same records, retirements and shards. A shard it lists that cannot be
    /// opened yet (shared storage lagging behind rank 0) is tried again for up to
    /// `patience`.
    ///
    /// Errors: the manifest is invalid, or a shard it lists still cannot be opened after
    /// `patience` ([`LoaderError::Dataset`]).
    pub fn apply_manifest(
        &mut self,
        manifest: Manifest,
        patience: Duration,
    ) -> Result<(), LoaderError> {
        let deadline = Instant::now() + patience;
        let current = self.latest_dataset();
        let dataset = loop {
            match current.with_manifest(manifest.clone()) {
                Ok(view) => break view.map_or(current.clone(), Arc::new),
                Err(e) if Instant::now() >= deadline => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let records = dataset.manifest().total_records();
        self.decide(dataset, records);
        Ok(())
    }

    /// The dataset view of the newest decision.
    fn latest_dataset(&self) -> Arc<Dataset> {
        self.shared.plans.lock().unwrap().latest().dataset.clone()
    }

    /// Records a decision for the boundaries no worker can have planned yet.
    fn decide(&mut self, dataset: Arc<Dataset>, records: u64) {
        let from = self.next_global + self.shared.slots.len() as u64;
        let mut plans = self.shared.plans.lock().unwrap();
        // Decisions no boundary still to be planned can use are dropped.
        let planned_to = plans.queue.back().map_or(0, |p| p.end_global());
        while plans.decisions.len() > 1 && plans.decisions[1].from <= planned_to {
            plans.decisions.pop_front();
        }
        if plans.latest().from == from {
            plans.decisions.pop_back();
        }
        plans.decisions.push_back(Decision {
            from,
            dataset,
            records,
        });
    }

    /// Throughput and health counters.
    pub fn stats(&self) -> LoaderStats {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        LoaderStats {
            batches: self.next_global,
            images: self.images,
            batches_per_sec: self.next_global as f64 / secs,
            images_per_sec: self.images as f64 / secs,
            queue_depth: self.ready.len() + self.early.iter().filter(|&&e| e).count(),
            wait_secs: self.wait.as_secs_f64(),
            skipped: self.shared.skipped.load(Ordering::Relaxed),
        }
    }
}

impl Shared {
    /// Hands a consumed slot back to the workers.
    fn recycle(&self, slot: usize) {
        let s = &self.slots[slot];
        s.filled.store(0, Ordering::Relaxed);
        let pool = self.slots.len() as u64;
        s.batch.fetch_add(pool, Ordering::Release);
        self.wake.1.notify_all();
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.1.notify_all();
        if let Some(w) = self.workers.take() {
            let _ = w.join();
        }
    }
}

/// A finished batch: two views per image, labels and record ids. Owned (it keeps the
/// loader's buffers alive); dropping it returns its buffer to the pool.
pub struct Batch {
    shared: Arc<Shared>,
    slot: usize,
    /// Epoch of this batch.
    pub epoch: u64,
    /// Batch number within the epoch.
    pub index_in_epoch: u64,
    len: usize,
    state_after: LoaderState,
}

impl Batch {
    fn slot(&self) -> &Slot {
        &self.shared.slots[self.slot]
    }

    /// Where a resume continues once this batch has been trained on: the loader's
    /// [`Loader::state`] right after it was taken (a consumer holding batches ahead
    /// records this one's, not the loader's, in its checkpoint).
    pub fn state_after(&self) -> LoaderState {
        self.state_after
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty batch (never produced).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Side of the square views.
    pub fn image_size(&self) -> u32 {
        self.shared.aug.size()
    }

    /// The first `per_sample * len` elements of one of the slot's buffers.
    fn published<'b, T: Copy + Default>(
        &'b self,
        buf: &'b RawBuf<T>,
        per_sample: usize,
    ) -> &'b [T] {
        // SAFETY: the slot is published and not yet recycled (module invariant of `slots`):
        // no worker writes to it while this batch lives.
        unsafe { buf.slice(self.len * per_sample) }
    }

    /// View 1 (T), normalised f32 NCHW: `len * 3 * size * size` values (empty without f32 output).
    pub fn view1(&self) -> &[f32] {
        self.published(&self.slot().view1, self.shared.f32_len)
    }

    /// View 2 (T'), normalised f32 NCHW.
    pub fn view2(&self) -> &[f32] {
        self.published(&self.slot().view2, self.shared.f32_len)
    }

    /// View 1 as u8 NHWC, un-normalised (empty without u8 output).
    pub fn view1_u8(&self) -> &[u8] {
        self.published(&self.slot().view1_u8, self.shared.u8_len)
    }

    /// View 2 as u8 NHWC, un-normalised.
    pub fn view2_u8(&self) -> &[u8] {
        self.published(&self.slot().view2_u8, self.shared.u8_len)
    }

    /// Class index per image ([`byol_ingest::shard::NO_LABEL`] when unlabelled).
    pub fn labels(&self) -> &[u32] {
        self.published(&self.slot().labels, 1)
    }

    /// Augmentation index per image: the record's global index (newest-pool draws
    /// carry their batch position in the upper 32 bits).
    pub fn records(&self) -> &[u64] {
        self.published(&self.slot().records, 1)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.shared.recycle(self.slot);
    }
}

/// The output slots of one view: the non-empty ones, the f32 one written past the cache
/// (a batch is not read before it is handed over).
fn view_out<'a>(chw: &'a mut [f32], hwc: &'a mut [u8]) -> ViewOut<'a> {
    ViewOut {
        chw: (!chw.is_empty()).then_some(chw),
        hwc: (!hwc.is_empty()).then_some(hwc),
        streaming: true,
    }
}

/// Buffers one worker reuses for every sample.
struct WorkerScratch {
    record: RecordScratch,
    rgb: Vec<u8>,
    aug: Scratch,
}

impl WorkerScratch {
    /// Grows every buffer for records up to `(width, height, raw bytes)`.
    fn reserve(&mut self, shared: &Shared, (w, h, raw): (u32, u32, usize)) {
        self.aug.reserve_for(&shared.aug, w, h);
        self.rgb.reserve(raw.saturating_sub(self.rgb.len()));
    }
}

/// One worker: sizes its buffers for the first epoch's largest record, reports ready on
/// `started` (so the loader's steady state begins when [`Loader::new`] returns), then
/// fills samples until the loader stops.
fn worker_loop(shared: &Shared, started: &Barrier) {
    let mut scratch = WorkerScratch {
        record: RecordScratch::default(),
        rgb: Vec::new(),
        aug: Scratch::new(),
    };
    let first = shared.plans.lock().unwrap().queue.front().cloned();
    let mut reserved = (0, 0, 0);
    if let Some(plan) = &first {
        scratch.reserve(shared, plan.max_record);
        reserved = plan.max_record;
    }
    started.wait();
    let batch_size = shared.cfg.batch_size as u64;
    let pool = shared.slots.len() as u64;
    let mut cached: Option<Arc<EpochPlan>> = None;
    while !shared.stop.load(Ordering::Acquire) {
        let g = shared.next_sample.fetch_add(1, Ordering::Relaxed);
        let (global_batch, slot_in_batch) = (g / batch_size, (g % batch_size) as usize);
        // The slot first: a boundary is planned only once its batch's buffer is free,
        // so within the pool's reach of the consumer (see `Loader::refresh`).
        let slot = &shared.slots[(global_batch % pool) as usize];
        if !wait_for_slot(shared, slot, global_batch) {
            return;
        }
        // The plan of the previous sample usually still applies: no lock then.
        let plan = match cached.take() {
            Some(p) if p.first_global <= global_batch && global_batch < p.end_global() => p,
            _ => match plan_for(shared, global_batch) {
                Some(p) => p,
                None => return,
            },
        };
        cached = Some(plan.clone());
        if plan.max_record != reserved {
            // Size every buffer for the largest record once, not image by image.
            scratch.reserve(shared, plan.max_record);
            reserved = plan.max_record;
        }
        let batch = plan.first_batch + (global_batch - plan.first_global);
        // This process's share of the batch (all of it outside data-parallel training).
        let share = shared.cfg.part.range(plan.batch_len(batch));
        if !share.contains(&slot_in_batch) {
            continue; // another rank's, or past the short last batch of an epoch
        }
        let (at, len) = (slot_in_batch - share.start, share.len());
        fill_sample(
            shared,
            &plan,
            batch,
            (slot_in_batch, at),
            slot,
            &mut scratch,
        );
        if at == 0 {
            slot.epoch.store(plan.epoch, Ordering::Relaxed);
            slot.index_in_epoch.store(batch, Ordering::Relaxed);
            slot.domain_records.store(plan.records, Ordering::Relaxed);
            slot.len.store(len, Ordering::Relaxed);
        }
        if slot.filled.fetch_add(1, Ordering::AcqRel) + 1 == len {
            // Capacity equals the pool size, so this never blocks.
            let _ = shared.ready.send((global_batch % pool) as usize);
        }
    }
}

/// The stamp of `dataset`'s manifest file (`None`: unreadable).
fn manifest_stamp(dataset: &Dataset) -> Option<ManifestStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dataset.dir().join(byol_ingest::manifest::MANIFEST_FILE)).ok()?;
    Some((meta.len(), meta.ino(), meta.modified().ok()?))
}

/// A manifest file's size, inode and modification time (it is replaced by a rename).
type ManifestStamp = (u64, u64, std::time::SystemTime);

/// The plan that holds `global_batch`, planning the next epoch when needed.
fn plan_for(shared: &Shared, global_batch: u64) -> Option<Arc<EpochPlan>> {
    let mut plans = shared.plans.lock().unwrap();
    loop {
        if let Some(p) = plans
            .queue
            .iter()
            .find(|p| p.first_global <= global_batch && global_batch < p.end_global())
        {
            return Some(p.clone());
        }
        let last = plans.queue.back()?.clone();
        // Epoch or refresh boundary: the consumer's decision for it (`Loader::refresh`);
        // the epoch goes on when the domain kept its records, the next one starts over
        // all of them otherwise.
        let decision = plans.decision_for(last.end_global()).clone();
        let (dataset, records) = (decision.dataset, decision.records);
        if last.ends_early() && records == last.records {
            plans.queue.push_back(Arc::new(last.continued(dataset)));
            continue;
        }
        let next = EpochPlan::new(
            &shared.cfg,
            dataset,
            records,
            last.epoch + 1,
            0,
            last.end_global(),
        );
        if next.batches == 0 {
            return None; // impossible: datasets only grow
        }
        plans.queue.push_back(Arc::new(next));
    }
}

/// Waits until `slot` may hold `global_batch`; false when the loader stops.
fn wait_for_slot(shared: &Shared, slot: &Slot, global_batch: u64) -> bool {
    while slot.batch.load(Ordering::Acquire) != global_batch {
        if shared.stop.load(Ordering::Acquire) {
            return false;
        }
        let guard = shared.wake.0.lock().unwrap();
        let _ = shared.wake.1.wait_timeout(guard, WAIT_TICK).unwrap();
    }
    true
}

/// Decodes and augments one sample into its place in `slot`, substituting a usable
/// record (deterministically) when the planned one is retired or corrupt.
fn fill_sample(
    shared: &Shared,
    plan: &EpochPlan,
    batch: u64,
    (slot_in_batch, at): (usize, usize),
    slot: &Slot,
    sc: &mut WorkerScratch,
) {
    let ds = &plan.dataset;
    let f32_len = shared.f32_len;
    let u8_len = shared.u8_len;
    // SAFETY: this worker alone claimed sample `slot_in_batch` of this batch (module
    // invariant of `slots`), stored at `at` of this process's share, so these ranges are
    // written by no one else.
    let (v1, v2, u1, u2, label, record) = unsafe {
        (
            slot.view1.slice_mut(at * f32_len, f32_len),
            slot.view2.slice_mut(at * f32_len, f32_len),
            slot.view1_u8.slice_mut(at * u8_len, u8_len),
            slot.view2_u8.slice_mut(at * u8_len, u8_len),
            &mut slot.labels.slice_mut(at, 1)[0],
            &mut slot.records.slice_mut(at, 1)[0],
        )
    };
    // The planned record, then deterministic substitutes: probes, and at last the
    // whole epoch order (a slot stays blank only when no record is usable).
    let probes = (0..MAX_PROBES).map(|p| plan.sample(batch, slot_in_batch, p));
    let rest = (0..plan.total()).map(|k| plan.fallback(batch, slot_in_batch, k));
    for (k, (g, aug_index)) in probes.chain(rest).enumerate() {
        let r = plan.locate(g);
        // Known-corrupt records are passed over without a decode; the planned record
        // (the hot path) takes no lock.
        let known_bad = || shared.bad.lock().unwrap().contains(&(r.shard, r.index));
        if !ds.is_live(r) || (k > 0 && known_bad()) {
            continue;
        }
        let result = ds
            .read_rgb(r, &mut sc.record, &mut sc.rgb)
            .map_err(|e| e.to_string())
            .and_then(|meta| {
                let key = SampleKey::new(shared.cfg.seed, plan.epoch, aug_index);
                shared
                    .aug
                    .two_views(
                        &sc.rgb,
                        meta.width,
                        meta.height,
                        key,
                        &mut sc.aug,
                        [view_out(&mut *v1, &mut *u1), view_out(&mut *v2, &mut *u2)],
                    )
                    .map_err(|e| e.to_string())
            });
        match result {
            Ok(_) => {
                *label = ds.label(r).unwrap_or(byol_ingest::shard::NO_LABEL);
                *record = aug_index;
                return;
            }
            Err(reason) => {
                if shared.bad.lock().unwrap().insert((r.shard, r.index)) {
                    shared.skipped.fetch_add(1, Ordering::Relaxed);
                    let shard = &ds.manifest().shards[r.shard].file;
                    tracing::warn!(shard = %shard, index = r.index, %reason, "skipping corrupt record");
                }
            }
        }
    }
    tracing::error!(
        epoch = plan.epoch,
        batch,
        slot = slot_in_batch,
        "no usable record found; slot left blank"
    );
    v1.fill(0.0);
    v2.fill(0.0);
    u1.fill(0);
    u2.fill(0);
    *label = byol_ingest::shard::NO_LABEL;
    *record = u64::MAX;
}
