//! The plan of one epoch: which record fills which slot of which batch.
//!
//! Everything here is a pure function of (seed, epoch, the first `records` records of the
//! dataset and which of them are live, the config), which is what makes a resumed run
//! yield the same batches.
//!
//! An epoch runs over the records live when it is planned: retired records take no
//! slot, whatever share of the dataset they are (a folder emptied but for a few files
//! still fills every batch). Only when the live records do not fill one batch does the
//! epoch run over all of them, substituting as it goes.

use std::sync::Arc;

use byol_augment::rng::mix64;
use byol_ingest::{Dataset, RecordRef};
use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::config::{LoaderConfig, Order};

/// Records are addressed by a global index: shard after shard, in manifest order.
pub(crate) type Global = u32;

/// Step used to look for a substitute when a record cannot be used (a prime, so that
/// probing visits many distinct positions).
const PROBE_STEP: u64 = 7_919;

/// One epoch's order over the first `records` records of the dataset (global index:
/// shard after shard in manifest order). A compaction merges shards but keeps every
/// record's global index, so a domain named by its record count survives it.
pub(crate) struct EpochPlan {
    pub epoch: u64,
    pub dataset: Arc<Dataset>,
    /// Records in this epoch's domain.
    pub records: u64,
    /// Shards the domain touches (the last one possibly in part).
    pub shards: usize,
    /// Global index of each touched shard's first record; one more entry holds the total.
    starts: Vec<u64>,
    /// The epoch order (a permutation of the live records among `0..records`, or of all
    /// of them when the live ones do not fill a batch), shared by the epoch's segments.
    order: Arc<Vec<Global>>,
    /// Batches in this epoch.
    pub batches: u64,
    /// One past the last batch of this plan: the epoch's end, or the next refresh
    /// boundary (a multiple of `refresh_every_batches`) where a grown dataset starts
    /// the next epoch.
    pub end_batch: u64,
    refresh_every: u64,
    /// Batch of this epoch that global batch `first_global` is (non-zero when resuming).
    pub first_batch: u64,
    /// Global (loader-lifetime) number of batch `first_batch`.
    pub first_global: u64,
    seq_per_batch: usize,
    newest_per_batch: usize,
    /// How many of the last records form the newest pool.
    newest_pool: u64,
    batch_size: usize,
    seed: u64,
    /// Largest width, height and payload among the domain's records (buffer sizes).
    pub max_record: (u32, u32, usize),
}

impl EpochPlan {
    /// Plans `epoch` over the first `records` records of `dataset`.
    pub fn new(
        cfg: &LoaderConfig,
        dataset: Arc<Dataset>,
        records: u64,
        epoch: u64,
        first_batch: u64,
        first_global: u64,
    ) -> Self {
        let (starts, max_record) = domain(&dataset, records);
        let shards = starts.len() - 1;
        let total = records;
        let seq = cfg.sequential_per_batch() as u64;
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(mix64(
            mix64(cfg.seed ^ 0x243F_6A88_85A3_08D3) ^ epoch,
        ));
        let order = match cfg.order {
            Order::Global => {
                let mut order: Vec<Global> = (0..total as Global).collect();
                shuffle(&mut order, &mut rng);
                order
            }
            Order::ShardWindows => {
                let mut shard_order: Vec<usize> = (0..shards).collect();
                shuffle(&mut shard_order, &mut rng);
                let mut order = Vec::with_capacity(total as usize);
                for window in shard_order.chunks(cfg.shard_window) {
                    let from = order.len();
                    for &s in window {
                        order.extend(starts[s] as Global..starts[s + 1] as Global);
                    }
                    shuffle(&mut order[from..], &mut rng);
                }
                order
            }
        };
        // Retired records take no slot (the filter keeps the shuffled order).
        let live: Vec<Global> = order
            .iter()
            .copied()
            .filter(|&g| dataset.is_live(locate_in(&starts, g)))
            .collect();
        let order = if live.len() as u64 >= seq.max(1) && live.len() < order.len() {
            live
        } else {
            order
        };
        let total = order.len() as u64;
        let batches = if cfg.drop_last {
            total / seq
        } else {
            total.div_ceil(seq)
        };
        let refresh_every = cfg.refresh_every_batches;
        EpochPlan {
            epoch,
            dataset,
            records,
            shards,
            starts,
            order: Arc::new(order),
            batches,
            end_batch: segment_end(first_batch, batches, refresh_every),
            refresh_every,
            first_batch,
            first_global,
            seq_per_batch: cfg.sequential_per_batch(),
            newest_per_batch: cfg.newest_per_batch(),
            newest_pool: cfg.newest_records as u64,
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            max_record,
        }
    }

    /// Records in this epoch's domain.
    pub fn total(&self) -> u64 {
        self.order.len() as u64
    }

    /// One past the last global batch number of this plan.
    pub fn end_global(&self) -> u64 {
        self.first_global + self.end_batch.saturating_sub(self.first_batch)
    }

    /// True when this plan stops at a refresh boundary before its epoch's end.
    pub fn ends_early(&self) -> bool {
        self.end_batch < self.batches
    }

    /// True when a loader resumed at `batch` stands on a refresh boundary (where a run
    /// that did not stop looked for new shards).
    pub fn at_refresh_boundary(&self, batch: u64) -> bool {
        self.refresh_every > 0
            && batch > 0
            && batch < self.batches
            && batch.is_multiple_of(self.refresh_every)
    }

    /// The same epoch's order from this plan's end to the next refresh boundary, over
    /// `dataset` (a newer view holding the same first records: appended to, or
    /// compacted, which keeps every record's index).
    pub fn continued(&self, dataset: Arc<Dataset>) -> Self {
        let first_batch = self.end_batch;
        // The same shard files (the usual case, appends only): nothing to recompute
        // (this runs under the plans lock, and `domain` reads every record's meta).
        let same_files = {
            let (old, new) = (&self.dataset.manifest().shards, &dataset.manifest().shards);
            new.len() >= self.shards
                && old[..self.shards]
                    .iter()
                    .zip(new)
                    .all(|(a, b)| a.file == b.file)
        };
        let (starts, max_record) = if same_files {
            (self.starts.clone(), self.max_record)
        } else {
            domain(&dataset, self.records)
        };
        EpochPlan {
            epoch: self.epoch,
            dataset,
            records: self.records,
            shards: starts.len() - 1,
            starts,
            order: self.order.clone(),
            batches: self.batches,
            end_batch: segment_end(first_batch, self.batches, self.refresh_every),
            refresh_every: self.refresh_every,
            first_batch,
            first_global: self.end_global(),
            seq_per_batch: self.seq_per_batch,
            newest_per_batch: self.newest_per_batch,
            newest_pool: self.newest_pool,
            batch_size: self.batch_size,
            seed: self.seed,
            max_record,
        }
    }

    /// Number of samples in batch `batch` of this epoch.
    pub fn batch_len(&self, batch: u64) -> usize {
        let seq_left = self.total() - batch * self.seq_per_batch as u64;
        seq_left.min(self.seq_per_batch as u64) as usize + self.newest_per_batch
    }

    /// The record planned for slot `slot` of batch `batch`, after `probe` substitutions,
    /// and the augmentation index that goes with it.
    pub fn sample(&self, batch: u64, slot: usize, probe: u64) -> (Global, u64) {
        let n = self.total();
        let position_in_epoch = batch * self.batch_size as u64 + slot as u64;
        if slot < self.seq_per_batch {
            let pos = batch * self.seq_per_batch as u64 + slot as u64;
            let g = self.order[((pos + probe * PROBE_STEP) % n) as usize];
            (g, u64::from(g))
        } else {
            // A draw from the newest records of the domain, keyed by its place in the
            // epoch.
            let n = self.records;
            let pool = self.newest_pool.min(n).max(1);
            let key = mix64(
                mix64(self.seed ^ 0x1319_8A2E_0370_7344) ^ mix64(self.epoch) ^ position_in_epoch,
            );
            let g = (n - pool + (key.wrapping_add(probe * PROBE_STEP)) % pool) as Global;
            (g, u64::from(g) | ((position_in_epoch + 1) << 32))
        }
    }

    /// The `k`-th record of the epoch order after slot `slot`'s own position (the
    /// last resort when the probes of [`EpochPlan::sample`] found nothing usable: `k`
    /// runs over the whole order), and its augmentation index.
    pub fn fallback(&self, batch: u64, slot: usize, k: u64) -> (Global, u64) {
        let pos = batch * self.seq_per_batch as u64 + slot as u64;
        let g = self.order[((pos + k) % self.total()) as usize];
        (g, u64::from(g))
    }

    /// Shard and index of a global record index.
    pub fn locate(&self, g: Global) -> RecordRef {
        locate_in(&self.starts, g)
    }
}

/// Shard and index of global record `g`, given each shard's first global index.
fn locate_in(starts: &[u64], g: Global) -> RecordRef {
    let g = u64::from(g);
    let shard = starts.partition_point(|&s| s <= g) - 1;
    RecordRef {
        shard,
        index: (g - starts[shard]) as u32,
    }
}

/// The first `records` records of `dataset`: each touched shard's first global index
/// (and the total after them), and the largest width, height and payload among them.
fn domain(dataset: &Dataset, records: u64) -> (Vec<u64>, (u32, u32, usize)) {
    let mut starts = Vec::new();
    let mut total = 0u64;
    let mut max_record = (0u32, 0u32, 0usize);
    for s in dataset.shards() {
        if total >= records {
            break;
        }
        starts.push(total);
        let take = (s.len() as u64).min(records - total);
        for i in 0..take as usize {
            let m = s.meta(i);
            max_record = (
                max_record.0.max(m.width),
                max_record.1.max(m.height),
                max_record.2.max(m.raw_len as usize),
            );
        }
        total += take;
    }
    starts.push(total);
    (starts, max_record)
}

/// End of the segment that starts at `first_batch`: the next multiple of `every` (the
/// same boundaries whatever batch a resumed loader starts from), or the epoch's end.
fn segment_end(first_batch: u64, batches: u64, every: u64) -> u64 {
    match first_batch.checked_div(every) {
        None => batches,
        Some(segment) => ((segment + 1) * every).min(batches),
    }
}

/// Fisher-Yates with the plan's generator (same sequence on every platform).
fn shuffle<T>(xs: &mut [T], rng: &mut Xoshiro256PlusPlus) {
    for i in (1..xs.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        xs.swap(i, j);
    }
}
