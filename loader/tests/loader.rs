//! Loader behaviour on generated datasets: order, exact resume, corruption, growth, drop.

mod common;

use std::time::{Duration, Instant};

use byol_loader::{Loader, LoaderConfig, LoaderError, LoaderState, Order, Part};
use common::*;

#[test]
fn every_record_appears_once_per_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 48);
    for order in [Order::Global, Order::ShardWindows] {
        let cfg = LoaderConfig {
            order,
            shard_window: 2,
            ..config(8, 2)
        };
        let mut loader = Loader::new(open(&ds), augmenter(), cfg, None).unwrap();
        assert_eq!(loader.batches_per_epoch(), 6);
        let seen = take(&mut loader, 12);
        for epoch in 0..2 {
            let mut recs: Vec<u64> = seen
                .iter()
                .filter(|s| s.epoch == epoch)
                .flat_map(|s| s.records.clone())
                .collect();
            recs.sort();
            assert_eq!(
                recs,
                (0..48).collect::<Vec<u64>>(),
                "{order:?} epoch {epoch}"
            );
        }
        let e0: Vec<u64> = seen[..6].iter().flat_map(|s| s.records.clone()).collect();
        let e1: Vec<u64> = seen[6..].iter().flat_map(|s| s.records.clone()).collect();
        assert_ne!(e0, e1, "each epoch has its own order");
        assert_ne!(e0, (0..48).collect::<Vec<u64>>(), "shuffled");
        // Labels come from the folder names: a = 0, b = 1, alternating by file number.
        assert!(seen.iter().all(|s| s.labels.iter().all(|&l| l <= 1)));
    }
}

#[test]
fn drop_last_false_gives_a_short_last_batch() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 21);
    let cfg = LoaderConfig {
        drop_last: false,
        ..config(8, 2)
    };
    let mut loader = Loader::new(open(&ds), augmenter(), cfg, None).unwrap();
    let lens: Vec<usize> = take(&mut loader, 4)
        .iter()
        .map(|s| s.records.len())
        .collect();
    assert_eq!(lens, vec![8, 8, 5, 8]);
}

#[test]
fn same_batches_whatever_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 40);
    let one = take(
        &mut Loader::new(open(&ds), augmenter(), config(8, 1), None).unwrap(),
        7,
    );
    let four = take(
        &mut Loader::new(open(&ds), augmenter(), config(8, 4), None).unwrap(),
        7,
    );
    assert!(one == four);
}

#[test]
fn resume_is_exact_at_every_stop_point() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 40); // 5 batches of 8 per epoch
    let straight = take(
        &mut Loader::new(open(&ds), augmenter(), config(8, 2), None).unwrap(),
        12,
    );
    for threads in [1, 4] {
        for stop in [1, 3, 4, 5, 6, 11] {
            let mut first = Loader::new(open(&ds), augmenter(), config(8, threads), None).unwrap();
            let mut got = take(&mut first, stop);
            let state = first.state();
            drop(first);
            // The state survives serialisation (it goes into checkpoints).
            let state: LoaderState =
                serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
            let mut resumed =
                Loader::new(open(&ds), augmenter(), config(8, threads), Some(state)).unwrap();
            got.extend(take(&mut resumed, 12 - stop));
            assert!(
                got == straight,
                "{threads} threads, stopped after {stop} batches"
            );
        }
    }
}

#[test]
fn batches_held_across_the_next_ones_change_nothing_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 40); // 5 batches of 8 per epoch
    let straight = take(
        &mut Loader::new(open(&ds), augmenter(), config(8, 2), None).unwrap(),
        12,
    );
    // A consumer that reads each batch only after taking the next 3 (batches_ahead + 1,
    // the most the pool allows), as a trainer copying the next batch during the
    // current step does with one.
    const LAG: usize = 3;
    let mut loader = Loader::new(open(&ds), augmenter(), config(8, 2), None).unwrap();
    let mut held: std::collections::VecDeque<byol_loader::Batch> = Default::default();
    let (mut got, mut states) = (Vec::new(), Vec::new());
    let mut read = |b: byol_loader::Batch| {
        states.push(b.state_after());
        got.push(seen(&b));
    };
    for _ in 0..12 {
        held.push_back(loader.next_batch());
        if held.len() > LAG {
            read(held.pop_front().unwrap());
        }
    }
    held.into_iter().for_each(&mut read);
    assert!(got == straight, "the same batches");
    // Each held batch knows where a resume continues after it, whatever the loader
    // produced since: resuming from batch 6's state gives batches 7.. exactly.
    let mut resumed = Loader::new(open(&ds), augmenter(), config(8, 2), Some(states[6])).unwrap();
    assert!(take(&mut resumed, 5) == straight[7..12]);
}

#[test]
fn resume_with_another_seed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 16);
    let state = Loader::new(open(&ds), augmenter(), config(8, 1), None)
        .unwrap()
        .state();
    let cfg = LoaderConfig {
        seed: 9,
        ..config(8, 1)
    };
    assert!(matches!(
        Loader::new(open(&ds), augmenter(), cfg, Some(state)),
        Err(LoaderError::State(_))
    ));
}

#[test]
fn corrupt_record_is_skipped_counted_and_the_batch_still_full() {
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), 24);
    let victim = {
        let ds = open(&path);
        let shard = &ds.shards()[0];
        let m = shard.meta(shard.len() / 2);
        (
            shard.path().to_owned(),
            m.offset as usize + 2,
            ds.shards()[0].len() as u64 / 2,
        )
    };
    let mut bytes = std::fs::read(&victim.0).unwrap();
    bytes[victim.1] ^= 0xFF;
    std::fs::write(&victim.0, &bytes).unwrap();
    let mut loader = Loader::new(open(&path), augmenter(), config(8, 2), None).unwrap();
    let seen = take(&mut loader, 3);
    assert!(seen.iter().all(|s| s.records.len() == 8));
    let recs: Vec<u64> = seen.iter().flat_map(|s| s.records.clone()).collect();
    assert!(
        !recs.contains(&victim.2),
        "the corrupt record is never served"
    );
    assert_eq!(loader.stats().skipped, 1);
}

#[test]
fn refresh_sees_a_new_shard_at_the_next_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), 16);
    let mut loader = Loader::new(open(&path), augmenter(), config(8, 1), None).unwrap();
    take(&mut loader, 1);
    let src = write_images(dir.path(), 16, 16);
    ingest_into(&src, dir.path());
    assert_eq!(
        loader.refresh().unwrap(),
        32,
        "the next boundaries plan all 32"
    );
    // Finish what was already planned, then a later epoch covers all 32 records.
    let seen = take(&mut loader, 14);
    // The last complete epoch (one more started after it) spans all 32 records.
    let epoch = seen.last().unwrap().epoch - 1;
    let mut recs: Vec<u64> = seen
        .iter()
        .filter(|s| s.epoch == epoch)
        .flat_map(|s| s.records.clone())
        .collect();
    recs.sort();
    assert_eq!(recs, (0..32).collect::<Vec<u64>>(), "epoch {epoch}");
}

#[test]
fn newest_share_draws_from_the_newest_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), 40);
    let cfg = LoaderConfig {
        newest_share: 0.25,
        newest_records: 5,
        ..config(8, 2)
    };
    let mut loader = Loader::new(open(&path), augmenter(), cfg, None).unwrap();
    assert_eq!(loader.batches_per_epoch(), 40 / 6);
    for s in take(&mut loader, 6) {
        let newest = &s.records[6..];
        assert!(
            newest
                .iter()
                .all(|&r| (35..40).contains(&(r & 0xFFFF_FFFF))),
            "{newest:?}"
        );
    }
    let bad = LoaderConfig {
        newest_share: 1.0,
        ..config(8, 1)
    };
    assert!(matches!(
        Loader::new(open(&path), augmenter(), bad, None),
        Err(LoaderError::Config {
            key: "newest_share",
            ..
        })
    ));
}

#[test]
fn dropping_mid_epoch_with_a_full_queue_returns_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), 64);
    let mut loader = Loader::new(open(&path), augmenter(), config(8, 4), None).unwrap();
    take(&mut loader, 1);
    std::thread::sleep(Duration::from_millis(200)); // workers fill every buffer and wait
    assert!(loader.stats().queue_depth >= 2);
    let start = Instant::now();
    drop(loader);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn too_small_a_dataset_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), 5);
    match Loader::new(open(&path), augmenter(), config(8, 1), None) {
        Err(e @ LoaderError::TooFewRecords { .. }) => assert!(e.to_string().contains("5 records")),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("expected an error"),
    }
}

/// With `refresh_every_batches`, records committed mid-epoch are drawn within that many
/// batches (plus the ones already queued), and a loader resumed from any state the run
/// recorded once it had seen the grown dataset yields the same batches as the run that
/// did not stop. (Before that, where the run cut its epoch depended on when the commit
/// landed, which no resume can replay.)
#[test]
fn new_shards_join_at_the_next_refresh_boundary_and_resume_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), 160); // 20 batches of 8 per epoch
    let cfg = || LoaderConfig {
        refresh_every_batches: 3,
        batches_ahead: 1,
        ..config(8, 2)
    };
    let mut loader = Loader::new(open(&path), augmenter(), cfg(), None).unwrap();
    let mut seen = Vec::new();
    let mut states = Vec::new();
    for _ in 0..4 {
        seen.extend(take(&mut loader, 1));
        states.push(loader.state());
    }
    let src = write_images(dir.path(), 160, 24);
    ingest_into(&src, dir.path());
    // Committed after batch 4: in the epoch that starts at a refresh boundary soon after.
    for _ in 0..10 {
        seen.extend(take(&mut loader, 1));
        states.push(loader.state());
    }
    let first_new = seen
        .iter()
        .position(|s| s.records.iter().any(|&r| (160..184).contains(&r)))
        .expect("new records are drawn");
    assert!(
        first_new < 4 + 3 + 3,
        "first new record in batch {first_new} (refresh every 3, 3 queued)"
    );
    assert_eq!(
        seen[first_new].index, 0,
        "a new epoch starts at the boundary"
    );
    assert!(seen[first_new].epoch == 1 && seen[first_new - 1].epoch == 0);
    assert!(
        seen[first_new - 1].index < 19,
        "the first epoch was cut short"
    );
    // Exact resume from every state since, on the grown dataset.
    for (i, state) in states
        .iter()
        .enumerate()
        .take(states.len() - 1)
        .skip(first_new - 1)
    {
        let mut resumed = Loader::new(open(&path), augmenter(), cfg(), Some(*state)).unwrap();
        let got = take(&mut resumed, seen.len() - i - 1);
        assert!(got == seen[i + 1..], "resumed after batch {}", i + 1);
    }
}

/// A compaction (shards merged, retired records made tombstones) keeps every record's
/// global index: a loader resumed on the compacted dataset, and one that kept running
/// across the compaction, yield the batches of a run that never saw it.
#[test]
fn a_compaction_changes_no_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), 96); // 12 batches of 8 per epoch, several shards
    // Retire a few records: their files go, a new ingest run reconciles.
    for i in [3u32, 10, 41] {
        let class = if i % 2 == 0 { "a" } else { "b" };
        std::fs::remove_file(dir.path().join(format!("src/{class}/{i:05}.png"))).unwrap();
    }
    ingest_into(&dir.path().join("src"), dir.path());
    let cfg = || LoaderConfig {
        refresh_every_batches: 3,
        batches_ahead: 1,
        ..config(8, 2)
    };
    let straight = take(
        &mut Loader::new(open(&path), augmenter(), cfg(), None).unwrap(),
        30,
    );
    let mut running = Loader::new(open(&path), augmenter(), cfg(), None).unwrap();
    let mut got = take(&mut running, 4);
    let state = running.state();
    let shards_before = open(&path).shards().len();
    let mut ing =
        byol_ingest::Ingester::open_quiet(&path, byol_ingest::IngesterOptions::default()).unwrap();
    let report = ing
        .compact(&byol_ingest::CompactPolicy::for_shard_bytes(1 << 20, 2))
        .unwrap()
        .expect("small shards to merge");
    drop(ing);
    assert!(report.shards_after < shards_before && report.reclaimed_records == 3);
    got.extend(take(&mut running, 26));
    assert!(got == straight, "a loader running across the compaction");
    let mut resumed = Loader::new(open(&path), augmenter(), cfg(), Some(state)).unwrap();
    assert!(
        take(&mut resumed, 26) == straight[4..],
        "a loader resumed on the compacted dataset"
    );
    assert_eq!(running.stats().skipped, 0, "no tombstone is ever read");
}

/// True when global record `g` (shard after shard) is live in the dataset at `path`.
fn is_live(path: &std::path::Path, g: u64) -> bool {
    let ds = open(path);
    let mut first = 0u64;
    for (shard, s) in ds.shards().iter().enumerate() {
        let len = s.len() as u64;
        if g < first + len {
            let index = (g - first) as u32;
            return ds.is_live(byol_ingest::RecordRef { shard, index });
        }
        first += len;
    }
    false
}

/// Deletes all but `keep` of the `n` source images under `dir/src` and reconciles the
/// dataset (their records are retired).
fn retire_all_but(dir: &std::path::Path, n: u32, keep: u32) {
    for i in keep..n {
        let class = if i % 2 == 0 { "a" } else { "b" };
        std::fs::remove_file(dir.join(format!("src/{class}/{i:05}.png"))).unwrap();
    }
    ingest_into(&dir.join("src"), dir);
}

/// Every slot of every batch holds a live record with real pixels, however much of the
/// dataset is retired: before the loader starts (the epoch runs over the live records)
/// and while it runs (substitutes are found through the whole epoch order).
#[test]
fn batches_hold_only_live_records_whatever_share_is_retired() {
    let check = |path: &std::path::Path, batches: &[Seen], what: &str| {
        for b in batches {
            for (slot, r) in b.records.iter().enumerate() {
                assert!(
                    *r != u64::MAX && is_live(path, r & 0xFFFF_FFFF),
                    "{what}: slot {slot} of batch {} holds record {r}",
                    b.index
                );
            }
            let per_image = b.view1_u8.len() / b.records.len();
            for (slot, img) in b.view1_u8.chunks(per_image).enumerate() {
                assert!(img.iter().any(|&p| p != 0), "{what}: slot {slot} is blank");
            }
        }
    };
    // Retired before the start: 4 of 120 records live, a batch of 4.
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), 120);
    retire_all_but(dir.path(), 120, 4);
    let mut loader = Loader::new(open(&path), augmenter(), config(4, 2), None).unwrap();
    assert_eq!(
        loader.batches_per_epoch(),
        1,
        "the epoch runs over the live records"
    );
    check(&path, &take(&mut loader, 6), "retired before");

    // Retired while the loader runs (seen at its next refresh boundary).
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), 120);
    let cfg = LoaderConfig {
        refresh_every_batches: 1,
        batches_ahead: 1,
        ..config(4, 2)
    };
    let mut loader = Loader::new(open(&path), augmenter(), cfg, None).unwrap();
    take(&mut loader, 2);
    retire_all_but(dir.path(), 120, 4);
    // Batches planned before the retirement may still hold the records it retired.
    take(&mut loader, 4);
    check(&path, &take(&mut loader, 20), "retired while running");
}

/// Data-parallel shares: each rank's batches are its contiguous share of the batches one
/// process loads (records, labels and pixels), and a resume of a share stays exact.
#[test]
fn the_parts_of_a_batch_are_the_batch_one_process_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), 48); // 6 batches of 8 per epoch
    let part = |rank, world| LoaderConfig {
        part: Part { rank, world },
        ..config(8, 2)
    };
    let whole = take(
        &mut Loader::new(open(&path), augmenter(), config(8, 2), None).unwrap(),
        9,
    );
    for world in [2, 4] {
        let shares: Vec<Vec<Seen>> = (0..world)
            .map(|rank| {
                let cfg = part(rank, world);
                take(
                    &mut Loader::new(open(&path), augmenter(), cfg, None).unwrap(),
                    9,
                )
            })
            .collect();
        for (b, expected) in whole.iter().enumerate() {
            let join = |f: &dyn Fn(&Seen) -> Vec<u64>| -> Vec<u64> {
                shares.iter().flat_map(|s| f(&s[b])).collect()
            };
            assert_eq!(
                join(&|s| s.records.clone()),
                expected.records,
                "world {world} batch {b}"
            );
            let labels = |s: &Seen| s.labels.iter().map(|&l| u64::from(l)).collect();
            let view1 = |s: &Seen| s.view1.iter().map(|&l| u64::from(l)).collect();
            assert_eq!(join(&labels), labels(expected));
            assert_eq!(
                join(&view1),
                view1(expected),
                "world {world} batch {b}: pixels"
            );
            assert!(shares.iter().all(|s| s[b].epoch == expected.epoch));
        }
    }
    // A share resumed from its own state goes on exactly.
    let mut loader = Loader::new(open(&path), augmenter(), part(1, 2), None).unwrap();
    let straight = take(&mut loader, 4);
    let state = straight_state(&path, part(1, 2), 2);
    let mut resumed = Loader::new(open(&path), augmenter(), part(1, 2), Some(state)).unwrap();
    assert!(take(&mut resumed, 2) == straight[2..]);
    // A share that cannot be even, or a short last batch, is refused by name.
    for (cfg, key) in [
        (
            LoaderConfig {
                batch_size: 6,
                ..part(0, 4)
            },
            "batch_size",
        ),
        (
            LoaderConfig {
                drop_last: false,
                ..part(0, 2)
            },
            "drop_last",
        ),
        (part(2, 2), "part"),
    ] {
        match Loader::new(open(&path), augmenter(), cfg, None) {
            Err(LoaderError::Config { key: k, .. }) => assert_eq!(k, key),
            Err(e) => panic!("{key}: {e}"),
            Ok(_) => panic!("{key}: accepted"),
        }
    }
}

/// The loader state after `n` batches of a fresh loader with `cfg`.
fn straight_state(path: &std::path::Path, cfg: LoaderConfig, n: usize) -> LoaderState {
    let mut loader = Loader::new(open(path), augmenter(), cfg, None).unwrap();
    take(&mut loader, n);
    loader.state()
}

/// Growth is an explicit change: where new records join depends only on the step at
/// which the step loop applied it, not on when the commit landed. Two loaders that see
/// the same commit at different moments (one before it started, one while its workers
/// were running ahead) but refresh at the same step yield identical batches; and a
/// loader given the manifest (`apply_manifest`, data-parallel ranks: rank 0's) matches
/// one that read it itself.
#[test]
fn growth_joins_at_the_step_that_applied_it_whenever_it_was_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dataset(dir.path(), 64); // 8 batches of 8 per epoch
    let cfg = || LoaderConfig {
        refresh_every_batches: 2,
        batches_ahead: 2,
        ..config(8, 2)
    };
    // Grown under a running loader, which does not refresh until step 3.
    let mut early = Loader::new(open(&path), augmenter(), cfg(), None).unwrap();
    let mut a: Vec<Seen> = (0..3).map(|_| seen(&early.next_batch())).collect();
    std::thread::sleep(Duration::from_millis(50)); // the workers are as far ahead as they go
    let src = write_images(dir.path(), 64, 16);
    ingest_into(&src, dir.path());
    std::thread::sleep(Duration::from_millis(50));
    a.extend((0..3).map(|_| seen(&early.next_batch())));
    assert!(
        a.iter().flat_map(|s| &s.records).all(|&r| r < 64),
        "not applied: no new record"
    );
    assert_eq!(early.refresh().unwrap(), 80);
    a.extend(take(&mut early, 12));
    // The same steps on a loader whose dataset was already grown, but which starts from
    // the 64-record state and is given the manifest at step 6, as data-parallel ranks
    // are given rank 0's.
    let state = LoaderState {
        records: Some(64),
        ..straight_state(&path, cfg(), 0)
    };
    let mut told = Loader::new(open(&path), augmenter(), cfg(), Some(state)).unwrap();
    let mut b: Vec<Seen> = (0..6).map(|_| seen(&told.next_batch())).collect();
    let manifest = byol_ingest::Manifest::load(&path).unwrap().unwrap();
    told.apply_manifest(manifest.clone(), Duration::from_secs(1))
        .unwrap();
    b.extend((0..12).map(|_| seen(&told.next_batch())));
    assert!(a == b, "the same batches");
    // Decided at step 6: past the pool's reach (batches_ahead + 2 = 4), i.e. at the first
    // refresh boundary from batch 10 on, where an epoch over all 80 records starts.
    assert!(a[..10].iter().flat_map(|s| &s.records).all(|&r| r < 64));
    assert_eq!((a[10].epoch, a[10].index), (a[9].epoch + 1, 0));
    assert!(a[10..].iter().flat_map(|s| &s.records).any(|&r| r >= 64));
    // Given a manifest whose shard this process cannot open: a clear error after the
    // patience.
    let mut bad = manifest;
    bad.shards[0].file = "missing.shard".into();
    let err = told
        .apply_manifest(bad, Duration::from_millis(100))
        .unwrap_err();
    assert!(err.to_string().contains("missing.shard"), "{err}");
}
