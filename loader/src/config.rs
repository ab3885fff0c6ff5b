//! Loader settings (the `[loader]` table of the config file).

use serde::{Deserialize, Serialize};

use crate::LoaderError;

/// How records are ordered within an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// One seeded permutation of all records.
    #[default]
    Global,
    /// Shards in a seeded order, records shuffled within windows of `shard_window`
    /// consecutive shards: reads stay local (for slow disks), order stays random.
    ShardWindows,
}

/// Which batch buffers are produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Output {
    /// Normalised f32, NCHW.
    #[default]
    F32,
    /// Un-normalised u8, NHWC (normalise on the GPU).
    U8,
    /// Both.
    Both,
}

/// Everything the loader needs to know besides the dataset and the augmentations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Run seed: epoch order and every augmentation draw derive from it.
    pub seed: u64,
    /// Worker threads decoding and augmenting (0: one per core).
    pub threads: usize,
    /// Finished batches that may wait for the consumer; the buffer pool holds two more.
    pub batches_ahead: usize,
    /// Drop the last incomplete batch of an epoch (otherwise it is shorter).
    pub drop_last: bool,
    /// Record order within an epoch.
    pub order: Order,
    /// Shards per window for [`Order::ShardWindows`].
    pub shard_window: usize,
    /// Share of each batch drawn from the newest records (0: plain epochs over all data).
    pub newest_share: f32,
    /// How many of the most recently ingested records count as newest.
    pub newest_records: usize,
    /// Look for new shards every this many batches within an epoch (0: only at epoch
    /// boundaries). When the dataset grew, the epoch ends there and the next one samples
    /// every shard: new records are drawn within this many batches (plus `batches_ahead`)
    /// of being committed, not hours later at the end of a long epoch.
    pub refresh_every_batches: u64,
    /// Which buffers to fill.
    pub output: Output,
    /// This process's share of every batch in data-parallel training (not a file
    /// setting: the launcher's rank and world size). `batch_size` stays the global batch.
    #[serde(skip)]
    pub part: Part,
}

/// One process's contiguous share of every global batch: images
/// `[len · rank / world, len · (rank + 1) / world)` of a batch of `len`. The epoch plan is
/// a pure function of the seed, the epoch and the records, so the ranks' shares are
/// disjoint and together make the batch one process would load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// Number of processes sharing each batch.
    pub world: usize,
}

impl Default for Part {
    fn default() -> Self {
        Part { rank: 0, world: 1 }
    }
}

impl Part {
    /// The slots `[start, end)` of a batch of `len` images this part loads.
    pub fn range(&self, len: usize) -> std::ops::Range<usize> {
        len * self.rank / self.world..len * (self.rank + 1) / self.world
    }
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 256,
            seed: 0,
            threads: 0,
            batches_ahead: 2,
            drop_last: true,
            order: Order::Global,
            shard_window: 4,
            newest_share: 0.0,
            newest_records: 10_000,
            refresh_every_batches: 0,
            output: Output::F32,
            part: Part::default(),
        }
    }
}

impl LoaderConfig {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), LoaderError> {
        let bad = |key: &'static str, reason: String| Err(LoaderError::Config { key, reason });
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if self.batches_ahead == 0 {
            return bad("batches_ahead", "must be at least 1".into());
        }
        if self.shard_window == 0 {
            return bad("shard_window", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.newest_share) {
            return bad(
                "newest_share",
                format!("{} is outside [0, 1)", self.newest_share),
            );
        }
        if self.newest_share > 0.0 && self.newest_records == 0 {
            return bad(
                "newest_records",
                "must be at least 1 when newest_share > 0".into(),
            );
        }
        let Part { rank, world } = self.part;
        if world == 0 || rank >= world {
            return bad("part", format!("rank {rank} of a world of {world}"));
        }
        if world > 1 && !self.batch_size.is_multiple_of(world) {
            return bad(
                "batch_size",
                format!(
                    "the global batch of {} does not split evenly over {world} processes",
                    self.batch_size
                ),
            );
        }
        if world > 1 && !self.drop_last {
            return bad(
                "drop_last",
                format!(
                    "must be true with {world} processes: an epoch's short last batch cannot be split evenly"
                ),
            );
        }
        if self.sequential_per_batch() == 0 {
            return bad(
                "newest_share",
                format!(
                    "{} leaves no room for the epoch order in a batch of {}",
                    self.newest_share, self.batch_size
                ),
            );
        }
        Ok(())
    }

    /// Slots per batch drawn from the newest records.
    pub fn newest_per_batch(&self) -> usize {
        (self.newest_share * self.batch_size as f32).round() as usize
    }

    /// Slots per batch taken from the epoch order.
    pub fn sequential_per_batch(&self) -> usize {
        self.batch_size.saturating_sub(self.newest_per_batch())
    }
}
