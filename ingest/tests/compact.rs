//! Compaction: small shards merged, retired records' bytes reclaimed, and every
//! record's global index, pixels, liveness and samples unchanged.

mod common;

use std::path::Path;

use byol_ingest::{
    CompactPolicy, Dataset, IngestOptions, Ingester, IngesterOptions, NoProgress, RecordRef,
    RecordScratch, ingest,
};
use common::*;

/// Ingests `dir/src` into `dir/ds` with tiny shards: every run leaves small shards.
fn run(dir: &Path) {
    let mut o = IngestOptions::new(vec![dir.join("src")], dir.join("ds"));
    o.shard_bytes = 4 << 10;
    o.threads = 1;
    o.settings.max_side = Some(0);
    ingest(&o, &NoProgress).unwrap();
}

/// Per global index: live, and the pixels when live.
fn contents(ds: &Dataset) -> Vec<(bool, Option<Vec<u8>>)> {
    let mut scratch = RecordScratch::default();
    let mut out = Vec::new();
    for (shard, s) in ds.shards().iter().enumerate() {
        for index in 0..s.len() as u32 {
            let r = RecordRef { shard, index };
            let live = ds.is_live(r);
            let pixels = live.then(|| {
                let mut buf = Vec::new();
                ds.read_rgb(r, &mut scratch, &mut buf).unwrap();
                buf
            });
            out.push((live, pixels));
        }
    }
    out
}

fn samples(ds: &Dataset) -> Vec<(u64, Option<String>)> {
    let mut global = Vec::new();
    let mut start = 0u64;
    for s in ds.shards() {
        global.push(start);
        start += s.len() as u64;
    }
    let mut v: Vec<(u64, Option<String>)> = ds
        .samples()
        .map(|s| {
            (
                global[s.record.shard] + u64::from(s.record.index),
                s.label.map(|l| ds.manifest().classes[l as usize].clone()),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn compaction_keeps_every_record_index_and_reclaims_retired_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    // Four waves of 6 images in two classes, one ingest run each.
    for wave in 0..4u32 {
        for i in 0..6u32 {
            let class = if i % 2 == 0 { "cat" } else { "dog" };
            write(
                &src.join(class).join(format!("w{wave}-{i}.png")),
                &png(40, 30, wave * 10 + i),
            );
        }
        run(dir.path());
    }
    // Some go away: their records are retired, their bytes still in the shards.
    for name in [
        "cat/w0-0.png",
        "dog/w1-1.png",
        "cat/w1-2.png",
        "dog/w3-5.png",
    ] {
        std::fs::remove_file(src.join(name)).unwrap();
    }
    run(dir.path());
    let ds_path = dir.path().join("ds");
    let before = Dataset::open(&ds_path).unwrap();
    let (shards_before, bytes_before) = (
        before.manifest().shards.len(),
        before
            .manifest()
            .shards
            .iter()
            .map(|s| s.bytes)
            .sum::<u64>(),
    );
    assert!(shards_before >= 4, "{shards_before} shards");
    let (contents_before, samples_before) = (contents(&before), samples(&before));

    let mut ing = Ingester::open_quiet(&ds_path, IngesterOptions::default()).unwrap();
    let report = ing
        .compact(&CompactPolicy::for_shard_bytes(1 << 20, 2))
        .unwrap()
        .expect("small shards to merge");
    drop(ing);
    assert_eq!(report.shards_before, shards_before);
    assert!(report.shards_after < shards_before, "{report:?}");
    assert_eq!(report.reclaimed_records, 4);
    assert!(report.bytes_after < bytes_before, "{report:?}");

    // The old view still reads (its files are unlinked, its mappings live).
    assert_eq!(contents(&before), contents_before);
    let after = Dataset::open(&ds_path).unwrap();
    assert_eq!(after.manifest().shards.len(), report.shards_after);
    assert_eq!(
        contents(&after),
        contents_before,
        "same pixels at every index"
    );
    assert_eq!(samples(&after), samples_before, "same samples and labels");
    assert!(byol_ingest::inspect::verify(&after, &|_| {}).is_empty());
    // Nothing but the listed shards is left in the folder.
    let files = std::fs::read_dir(ds_path.join("shards")).unwrap().count();
    assert_eq!(files, report.shards_after);
    // The dataset goes on: a new file after a compaction, a deletion of a merged one.
    write(&src.join("cat/new.png"), &png(40, 30, 99));
    std::fs::remove_file(src.join("dog/w2-1.png")).unwrap();
    run(dir.path());
    let again = Dataset::open(&ds_path).unwrap();
    assert_eq!(again.manifest().live_records(), 24 - 4 - 1 + 1);
    assert!(byol_ingest::inspect::verify(&again, &|_| {}).is_empty());
    // Nothing qualifies right after a compaction with a high bar.
    let mut ing = Ingester::open_quiet(&ds_path, IngesterOptions::default()).unwrap();
    assert!(
        ing.compact(&CompactPolicy::for_shard_bytes(1 << 20, 50))
            .unwrap()
            .is_none()
    );
}
