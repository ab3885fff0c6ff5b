//! The follower's rules on real files, without the daemon: a file changed through one
//! name is changed under every name the dataset records for it (hard links, a folder
//! seen through two watched folders; a version-3 manifest gains device numbers at the
//! start-up scan, so the rule holds after an upgrade), and the folders byol writes are
//! never ingested.

mod common;

use std::path::{Path, PathBuf};

use byol_ingest::{Dataset, Follower, IngesterOptions, Layout};

fn live(data: &Path) -> usize {
    Dataset::open(data).unwrap().live_records().count()
}

fn manifest(data: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(data.join("manifest.json")).unwrap()).unwrap()
}

/// Path → content hash of each source.
fn hashes(data: &Path) -> std::collections::BTreeMap<String, String> {
    manifest(data)["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["path"].as_str().unwrap().to_owned(),
                s["hash"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn rewrite_in_place(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}

fn canonical(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap().display().to_string()
}

/// Two class folders and a hard link between them.
fn linked_pair(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let watch = root.join("in");
    for c in ["a", "b"] {
        std::fs::create_dir_all(watch.join(c)).unwrap();
    }
    std::fs::write(watch.join("a/0.png"), common::png(16, 16, 0)).unwrap();
    let x = watch.join("a/x.png");
    std::fs::write(&x, common::png(16, 16, 1)).unwrap();
    let y = watch.join("b/y.png");
    std::fs::hard_link(&x, &y).unwrap();
    (watch, x, y)
}

#[test]
fn a_change_through_one_name_reaches_every_recorded_name() {
    let dir = tempfile::tempdir().unwrap();
    let (watch, x, y) = linked_pair(dir.path());
    let data = dir.path().join("data");
    let roots = vec![(watch.clone(), Layout::ImageFolder)];
    let mut f = Follower::open(&data, &roots, IngesterOptions::default()).unwrap();
    f.scan_all().unwrap();
    assert_eq!(live(&data), 2);
    let stamp = &manifest(&data)["sources"][1];
    assert!(stamp["dev"].is_u64() && stamp["inode"].is_u64(), "{stamp}");
    let new = common::png(16, 16, 2);
    rewrite_in_place(&x, &new);
    // Only the name the event mentioned.
    let report = f.apply(std::slice::from_ref(&x)).unwrap();
    let h = hashes(&data);
    let want = blake3::hash(&new).to_hex().to_string();
    assert_eq!(h[&canonical(&x)], want);
    assert_eq!(h[&canonical(&y)], want, "the other name re-checked");
    assert_eq!(live(&data), 2, "the old content retired: {report:?}");

    // The other name gone, then a change through the first: only it remains.
    std::fs::remove_file(&y).unwrap();
    rewrite_in_place(&x, &common::png(16, 16, 3));
    f.apply(std::slice::from_ref(&x)).unwrap();
    let h = hashes(&data);
    let y_key = format!("{}/y.png", canonical(&watch.join("b")));
    assert!(!h.contains_key(&y_key), "the gone name retired: {h:?}");
    assert_eq!(h.len(), 2, "{h:?}");
    assert_eq!(live(&data), 2);
}

#[test]
fn a_version_3_manifest_gains_device_numbers_and_the_rule_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (watch, x, y) = linked_pair(dir.path());
    let data = dir.path().join("data");
    let roots = vec![(watch.clone(), Layout::ImageFolder)];
    {
        let mut f = Follower::open(&data, &roots, IngesterOptions::default()).unwrap();
        f.scan_all().unwrap();
    }
    // As a version-3 build wrote it: no device numbers.
    let mut m = manifest(&data);
    m["version"] = 3.into();
    for s in m["sources"].as_array_mut().unwrap() {
        s.as_object_mut().unwrap().remove("dev");
    }
    std::fs::write(data.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    let mut f = Follower::open(&data, &roots, IngesterOptions::default()).unwrap();
    let report = f.scan_all().unwrap();
    assert_eq!(report.summary.ingested, 0, "nothing re-read");
    let m = manifest(&data);
    assert_eq!(m["version"], 4);
    assert!(
        m["sources"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["dev"].is_u64())
    );
    let new = common::png(16, 16, 4);
    rewrite_in_place(&y, &new);
    f.apply(std::slice::from_ref(&y)).unwrap();
    let want = blake3::hash(&new).to_hex().to_string();
    assert_eq!(hashes(&data)[&canonical(&x)], want);
}

#[test]
fn excluded_folders_are_never_ingested_by_scan_or_event() {
    let dir = tempfile::tempdir().unwrap();
    let watch = dir.path().join("in");
    let run = watch.join("run");
    std::fs::create_dir_all(watch.join("a")).unwrap();
    std::fs::create_dir_all(run.join("checkpoints/step-5.tmp")).unwrap();
    std::fs::write(watch.join("a/0.png"), common::png(16, 16, 0)).unwrap();
    // Images under the run folder (a preview, say): still the daemon's own.
    std::fs::write(run.join("preview.png"), common::png(16, 16, 1)).unwrap();
    std::fs::write(
        run.join("checkpoints/step-5.tmp/x.png"),
        common::png(16, 16, 2),
    )
    .unwrap();
    std::os::unix::fs::symlink(&run, watch.join("a/runlink")).unwrap();
    let data = dir.path().join("data");
    let roots = vec![(watch.clone(), Layout::ImageFolder)];
    let mut f = Follower::open(&data, &roots, IngesterOptions::default()).unwrap();
    f.exclude([run.clone()]);
    let report = f.scan_all().unwrap();
    assert!(report.rejects.is_empty(), "{:?}", report.rejects);
    assert_eq!(live(&data), 1);
    let events = [
        run.join("preview.png"),
        run.join("checkpoints/step-5.tmp/x.png"),
        watch.join("a/runlink"),
        watch.join("a/runlink/preview.png"),
        run.clone(),
    ];
    let report = f.apply(&events).unwrap();
    assert!(report.rejects.is_empty(), "{:?}", report.rejects);
    assert_eq!(live(&data), 1, "{:?}", hashes(&data));
}
