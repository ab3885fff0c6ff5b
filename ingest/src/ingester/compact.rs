//! Compaction: runs of small (or mostly retired) shards rewritten as one shard, the
//! bytes of retired records reclaimed, every record's global index kept.
//!
//! A retired record stays in the merged shard as a tombstone (its index entry, with an
//! empty payload, still retired), so record `k` of the run is record `k` of the merged
//! shard: the loader's epoch order (a permutation of global indices), the augmentation
//! draws keyed by them and a resume state naming a domain by its record count are all
//! unchanged. Crash-safe as any ingest: the merged shard is written under a temp name,
//! the manifest that lists it replaces the old one atomically, and only then are the
//! old shard files deleted (readers that mapped them keep their mappings; a crash in
//! between leaves unlisted files, removed at the next open).

use std::collections::HashMap;

use serde::Serialize;

use super::Ingester;
use crate::ingest::IngestError;
use crate::manifest::{Manifest, SHARDS_DIR, ShardEntry};
use crate::shard::{Compression, ShardReader, ShardWriter, StoredRecord};

/// When shards are merged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompactPolicy {
    /// A shard under this many bytes is small.
    pub small_bytes: u64,
    /// A merged shard grows to at most this many bytes.
    pub target_bytes: u64,
    /// Merge a run only when it has at least this many shards.
    pub min_run: usize,
    /// A shard with at least this share of its records retired is rewritten even alone.
    pub retired_share: f64,
}

impl CompactPolicy {
    /// Merges runs of at least `min_run` shards under a quarter of `shard_bytes` into
    /// shards of up to `shard_bytes`, and rewrites shards at least a quarter retired.
    pub fn for_shard_bytes(shard_bytes: u64, min_run: usize) -> Self {
        CompactPolicy {
            small_bytes: shard_bytes / 4,
            target_bytes: shard_bytes,
            min_run: min_run.max(2),
            retired_share: 0.25,
        }
    }
}

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CompactReport {
    /// Shards before and after.
    pub shards_before: usize,
    /// Shards after.
    pub shards_after: usize,
    /// Bytes of all shard files before.
    pub bytes_before: u64,
    /// Bytes of all shard files after.
    pub bytes_after: u64,
    /// Retired records whose bytes were reclaimed (now tombstones).
    pub reclaimed_records: u64,
}

impl Ingester<'_> {
    /// Compacts the dataset as `policy` says (see the module docs); `Ok(None)` when
    /// nothing qualifies. Commits first.
    ///
    /// Errors: a shard cannot be read or the merged one written (the dataset is left as
    /// it was; a full disk leaves only a temp file, removed at the next open).
    pub fn compact(
        &mut self,
        policy: &CompactPolicy,
    ) -> Result<Option<CompactReport>, IngestError> {
        self.commit()?;
        let groups = plan(&self.work.shards, policy);
        if groups.is_empty() {
            return Ok(None);
        }
        let mut report = CompactReport {
            shards_before: self.work.shards.len(),
            bytes_before: self.work.shards.iter().map(|s| s.bytes).sum(),
            ..CompactReport::default()
        };
        let dir = self.out.join(SHARDS_DIR);
        // Old shard id → (new shard id, offset of its first record there).
        let mut moved: HashMap<u32, (u32, u32)> = HashMap::new();
        let mut replaced: Vec<(std::ops::Range<usize>, ShardEntry)> = Vec::new();
        for (id, range) in (self.work.next_shard_id()..).zip(groups) {
            let run = &self.work.shards[range.clone()];
            let compression = reader(&dir, &run[0])?.compression();
            let file = Manifest::shard_file_name(id);
            let mut writer =
                ShardWriter::create(&dir.join(&file), self.work.settings.codec, compression)?;
            let mut retired = Vec::new();
            let mut offset = 0u32;
            for entry in run {
                let r = reader(&dir, entry)?;
                moved.insert(entry.id, (id, offset));
                let gone: std::collections::HashSet<u32> = entry.retired.iter().copied().collect();
                for i in 0..r.len() {
                    let meta = r.meta(i);
                    let rec = if gone.contains(&(i as u32)) {
                        report.reclaimed_records += u64::from(meta.raw_len > 0);
                        tombstone(compression, meta)?
                    } else {
                        StoredRecord {
                            bytes: r.stored(i).to_vec(),
                            meta,
                        }
                    };
                    let at = writer.append(&rec)?;
                    if gone.contains(&(i as u32)) {
                        retired.push(at);
                    }
                }
                offset += r.len() as u32;
            }
            let records = writer.len() as u64;
            let raw_bytes = writer.raw_bytes();
            let bytes = writer.finish()?;
            replaced.push((
                range,
                ShardEntry {
                    id,
                    file,
                    records,
                    bytes,
                    raw_bytes,
                    retired,
                },
            ));
        }
        // The new shard list: each run replaced by its merged shard, in place.
        let old: Vec<ShardEntry> = std::mem::take(&mut self.work.shards);
        let mut gone_files = Vec::new();
        let mut replaced = replaced.into_iter().peekable();
        let mut i = 0;
        while i < old.len() {
            match replaced.peek() {
                Some((range, _)) if range.start == i => {
                    let (range, entry) = replaced.next().expect("peeked");
                    gone_files.extend(old[range.clone()].iter().map(|s| s.file.clone()));
                    self.work.shards.push(entry);
                    i = range.end;
                }
                _ => {
                    self.work.shards.push(old[i].clone());
                    i += 1;
                }
            }
        }
        for source in &mut self.work.sources {
            for span in &mut source.records {
                if let Some(&(id, offset)) = moved.get(&span.shard) {
                    span.shard = id;
                    span.first += offset;
                }
            }
        }
        // The content index holds spans too.
        self.by_hash.clear();
        for s in &self.work.sources {
            self.by_hash
                .entry(s.hash.clone())
                .or_insert_with(|| s.records.clone());
        }
        self.work
            .validate()
            .map_err(|reason| IngestError::InvalidOption {
                key: "compaction",
                reason: format!("the compacted manifest is invalid: {reason}"),
            })?;
        self.dirty = true;
        crate::fault::abort_if("BYOL_TEST_ABORT_IN_COMPACTION", 1);
        self.save(true)?;
        for file in gone_files {
            let path = dir.join(&file);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove a compacted shard; the next open will");
            }
        }
        report.shards_after = self.work.shards.len();
        report.bytes_after = self.work.shards.iter().map(|s| s.bytes).sum();
        tracing::info!(?report, "compacted");
        Ok(Some(report))
    }
}

fn reader(dir: &std::path::Path, entry: &ShardEntry) -> Result<ShardReader, IngestError> {
    Ok(ShardReader::open(&dir.join(&entry.file))?)
}

/// The index entry of a retired record with an empty payload.
fn tombstone(
    compression: Compression,
    meta: crate::shard::RecordMeta,
) -> Result<StoredRecord, IngestError> {
    let mut rec = StoredRecord::compress(
        &[],
        compression,
        1,
        meta.width,
        meta.height,
        meta.label(),
        meta.item,
    )
    .map_err(|e| IngestError::InvalidOption {
        key: "compaction",
        reason: e.to_string(),
    })?;
    rec.meta.source_id = meta.source_id;
    Ok(rec)
}

/// The runs of shards to rewrite, as index ranges into `shards`, in order.
fn plan(shards: &[ShardEntry], p: &CompactPolicy) -> Vec<std::ops::Range<usize>> {
    let sparse = |s: &ShardEntry| {
        s.records > 0 && s.retired.len() as f64 >= p.retired_share * s.records as f64
    };
    let live_bytes = |s: &ShardEntry| {
        let live = s.records.saturating_sub(s.retired.len() as u64);
        s.bytes * live / s.records.max(1)
    };
    let mut groups = Vec::new();
    let mut i = 0;
    while i < shards.len() {
        if !(shards[i].bytes < p.small_bytes || sparse(&shards[i])) {
            i += 1;
            continue;
        }
        let start = i;
        let mut total = 0;
        while i < shards.len()
            && (shards[i].bytes < p.small_bytes || sparse(&shards[i]))
            && (i == start || total + live_bytes(&shards[i]) <= p.target_bytes)
        {
            total += live_bytes(&shards[i]);
            i += 1;
        }
        let run = start..i;
        if run.len() >= p.min_run || (run.len() == 1 && sparse(&shards[start])) {
            groups.push(run);
        }
    }
    groups
}
