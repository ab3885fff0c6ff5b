//! Statistics and verification of a packed dataset (`byol inspect`).

use rayon::prelude::*;
use serde::Serialize;

use crate::change::{self, ChangeLine};
use crate::dataset::{Dataset, RecordRef, RecordScratch};
use crate::manifest::IngestSettings;

/// Upper bounds (exclusive) of the short-side histogram buckets; the last is open.
pub const SHORT_SIDE_BUCKETS: [u32; 6] = [32, 64, 128, 256, 512, 1024];

/// Everything `byol inspect` reports about a dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetStats {
    /// Dataset generation.
    pub generation: u64,
    /// Fixed ingest settings.
    pub settings: IngestSettings,
    /// Number of shards.
    pub shards: usize,
    /// Number of source files listed.
    pub sources: usize,
    /// Records, retired ones included.
    pub records: u64,
    /// Records readers skip because their source changed.
    pub retired: u64,
    /// Live samples: one per distinct (record, label) pair.
    pub samples: u64,
    /// Live samples per class name, in class order.
    pub per_class: Vec<(String, u64)>,
    /// Live samples without a label.
    pub unlabelled: u64,
    /// Changes to sources over the dataset's life (from `changes.jsonl`), by kind.
    pub changes: ChangeCounts,
    /// The changes of the most recent generation that made any (at most 20).
    pub recent_changes: Vec<ChangeLine>,
    /// Bytes of the shard files.
    pub bytes_stored: u64,
    /// Uncompressed payload bytes.
    pub bytes_raw: u64,
    /// Smallest, median and largest width of live records.
    pub width: [u32; 3],
    /// Smallest, median and largest height of live records.
    pub height: [u32; 3],
    /// Live records by short side: `< 32, < 64, ... , < 1024, >= 1024`.
    pub short_side_histogram: Vec<(String, u64)>,
}

/// Source changes by kind (see [`crate::SourceChange`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ChangeCounts {
    /// Sources whose records were retired.
    pub retired: u64,
    /// Sources whose content moved to another label.
    pub relabelled: u64,
    /// Vanished sources whose content another source keeps under the same label.
    pub removed: u64,
}

fn min_median_max(mut v: Vec<u32>) -> [u32; 3] {
    if v.is_empty() {
        return [0; 3];
    }
    v.sort_unstable();
    [v[0], v[v.len() / 2], v[v.len() - 1]]
}

/// Computes [`DatasetStats`] from the manifest and the shard indexes (no record is read).
pub fn stats(ds: &Dataset) -> DatasetStats {
    let m = ds.manifest();
    let mut per_class = vec![0u64; m.classes.len()];
    let mut unlabelled = 0;
    let mut widths = Vec::new();
    let mut heights = Vec::new();
    let mut hist = [0u64; SHORT_SIDE_BUCKETS.len() + 1];
    let mut samples = 0;
    for s in ds.samples() {
        samples += 1;
        match s.label {
            Some(l) if (l as usize) < per_class.len() => per_class[l as usize] += 1,
            _ => unlabelled += 1,
        }
    }
    for r in ds.live_records() {
        let meta = ds.meta(r);
        widths.push(meta.width);
        heights.push(meta.height);
        let short = meta.width.min(meta.height);
        hist[SHORT_SIDE_BUCKETS
            .iter()
            .position(|&b| short < b)
            .unwrap_or(SHORT_SIDE_BUCKETS.len())] += 1;
    }
    let mut labels: Vec<String> = SHORT_SIDE_BUCKETS
        .iter()
        .map(|b| format!("< {b}"))
        .collect();
    labels.push(format!(
        ">= {}",
        SHORT_SIDE_BUCKETS[SHORT_SIDE_BUCKETS.len() - 1]
    ));
    // The report is informational: an unreadable one counts as empty.
    let log = change::read_report(ds.dir()).unwrap_or_default();
    let mut changes = ChangeCounts::default();
    for l in &log {
        *match l.change {
            crate::SourceChange::Retired { .. } => &mut changes.retired,
            crate::SourceChange::Relabelled { .. } => &mut changes.relabelled,
            crate::SourceChange::Removed { .. } => &mut changes.removed,
        } += 1;
    }
    let last = log.last().map(|l| l.generation);
    let mut recent_changes: Vec<ChangeLine> = log
        .into_iter()
        .rev()
        .take_while(|l| Some(l.generation) == last)
        .take(20)
        .collect();
    recent_changes.reverse();
    DatasetStats {
        generation: m.generation,
        settings: m.settings,
        shards: m.shards.len(),
        sources: m.sources.len(),
        records: m.total_records(),
        retired: m.total_records() - m.live_records(),
        samples,
        per_class: m.classes.iter().cloned().zip(per_class).collect(),
        unlabelled,
        changes,
        recent_changes,
        bytes_stored: m.shards.iter().map(|s| s.bytes).sum(),
        bytes_raw: m.shards.iter().map(|s| s.raw_bytes).sum(),
        width: min_median_max(widths),
        height: min_median_max(heights),
        short_side_histogram: labels.into_iter().zip(hist).collect(),
    }
}

/// A record that failed verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CorruptRecord {
    /// Shard file name.
    pub shard: String,
    /// Record index in the shard.
    pub index: u32,
    /// What failed.
    pub reason: String,
}

/// Reads every live record, checks its checksum, decompresses and, for the `encoded`
/// codec, decodes it (retired records are not data: after a compaction they are
/// tombstones without bytes). Returns the corrupt records in shard order.
/// `progress` is called with the number of records checked, from worker threads.
pub fn verify(ds: &Dataset, progress: &(dyn Fn(u64) + Sync)) -> Vec<CorruptRecord> {
    let refs: Vec<RecordRef> = ds
        .shards()
        .iter()
        .enumerate()
        .flat_map(|(shard, s)| (0..s.len() as u32).map(move |index| RecordRef { shard, index }))
        // Retired records are not data (after a compaction, tombstones without bytes).
        .filter(|&r| ds.is_live(r))
        .collect();
    let mut bad: Vec<CorruptRecord> = refs
        .par_chunks(256)
        .map_init(
            || (RecordScratch::default(), Vec::new()),
            |(scratch, buf), chunk| {
                let bad: Vec<CorruptRecord> = chunk
                    .iter()
                    .filter_map(|&r| {
                        ds.read_rgb(r, scratch, buf).err().map(|e| CorruptRecord {
                            shard: ds.manifest().shards[r.shard].file.clone(),
                            index: r.index,
                            reason: e.to_string(),
                        })
                    })
                    .collect();
                progress(chunk.len() as u64);
                bad
            },
        )
        .flatten()
        .collect();
    bad.sort_by(|a, b| (&a.shard, a.index).cmp(&(&b.shard, b.index)));
    bad
}
