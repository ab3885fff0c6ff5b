//! The daemon's ingest loop as a library state machine, on real files, with the clock
//! passed in: settled paths are ingested, a failed commit closes the dataset with its
//! last commit intact, and after the retry interval the dataset is reopened and every
//! folder rescanned, so files that arrived while it was closed are not missed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use byol_ingest::{Dataset, Follower, IngestEvent, IngestLoop, IngesterOptions, Layout, Reopen};

fn live(data: &Path) -> usize {
    Dataset::open(data).unwrap().live_records().count()
}

#[test]
fn settled_paths_are_ingested_and_an_error_closes_reopens_and_rescans() {
    let dir = tempfile::tempdir().unwrap();
    let (watch, data) = (dir.path().join("in"), dir.path().join("data"));
    std::fs::create_dir_all(watch.join("a")).unwrap();
    for i in 0..2 {
        std::fs::write(watch.join(format!("a/{i}.png")), common::png(16, 16, i)).unwrap();
    }
    let roots = vec![(watch.clone(), Layout::ImageFolder)];
    let options = IngesterOptions::default();
    let mut follower = Follower::open(&data, &roots, options.clone()).unwrap();
    follower.scan_all().unwrap();
    let (settle, retry) = (Duration::from_secs(1), Duration::from_secs(10));
    let reopen = Reopen {
        data: data.clone(),
        roots,
        options,
    };
    let mut ingest = IngestLoop::new(follower, reopen, settle, retry, None);
    let t0 = Instant::now();

    // A new file waits for its settle time, then is ingested.
    let new = watch.join("a/2.png");
    std::fs::write(&new, common::png(16, 16, 2)).unwrap();
    ingest.note(new, false, t0);
    assert!(ingest.tick(t0).is_empty());
    let events = ingest.tick(t0 + 2 * settle);
    match events.as_slice() {
        [
            IngestEvent::Batch {
                live_records: 3,
                changed: true,
                report,
            },
        ] => assert_eq!(report.summary.ingested, 1),
        other => panic!("{other:?}"),
    }

    // The shards folder becomes a file: the commit fails, the dataset keeps its last
    // commit and is closed until the retry.
    let shards = data.join("shards");
    std::fs::rename(&shards, data.join("shards.away")).unwrap();
    std::fs::write(&shards, b"in the way").unwrap();
    let failing = watch.join("a/3.png");
    std::fs::write(&failing, common::png(16, 16, 3)).unwrap();
    let t1 = t0 + 3 * settle;
    ingest.note(failing, true, t1);
    match ingest.tick(t1).as_slice() {
        [IngestEvent::Failed { retry_in, .. }] => assert_eq!(*retry_in, retry),
        other => panic!("{other:?}"),
    }
    assert!(ingest.is_closed());
    assert!(
        ingest.tick(t1 + retry / 2).is_empty(),
        "nothing before the retry"
    );

    // Room again; a file arrives while closed, its event lost. The reopen rescans.
    std::fs::remove_file(&shards).unwrap();
    std::fs::rename(data.join("shards.away"), &shards).unwrap();
    std::fs::write(watch.join("a/4.png"), common::png(16, 16, 4)).unwrap();
    let events = ingest.tick(t1 + retry);
    match events.as_slice() {
        [
            IngestEvent::Reopened,
            IngestEvent::Batch {
                live_records: 5,
                changed: true,
                report,
            },
        ] => assert_eq!(report.summary.ingested, 2),
        other => panic!("{other:?}"),
    }
    assert!(!ingest.is_closed());
    drop(ingest);
    assert_eq!(live(&data), 5);
}
