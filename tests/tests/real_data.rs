//! Real data end to end: Fashion-MNIST (Debian's dataset-fashion-mnist) and real photos.
//!
//! When the data is missing these tests say so and pass, unless BYOL_REQUIRE_REAL_DATA=1
//! (set by `scripts/test.sh`, which installs the data), where missing data is a failure.

use std::io::Read;
use std::path::{Path, PathBuf};

use byol_ingest::{
    Dataset, IngestOptions, NoProgress, RecordScratch, SettingsOverride, ingest, inspect,
};

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

fn require(path: &Path) -> bool {
    if path.exists() {
        return true;
    }
    assert!(
        std::env::var("BYOL_REQUIRE_REAL_DATA").as_deref() != Ok("1"),
        "{} is missing (apt-get install -y dataset-fashion-mnist; ../shared/data)",
        path.display()
    );
    eprintln!("skipped: {} is not installed", path.display());
    false
}

/// Independent IDX reader for the check (gzip, big-endian header).
fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn fashion_mnist_test_split_round_trips() {
    let images = PathBuf::from(FASHION_MNIST).join("t10k-images-idx3-ubyte.gz");
    if !require(&images) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fmnist-test");
    let rep = ingest(
        &IngestOptions::new(vec![images.clone()], out.clone()),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(rep.summary.ingested, 10_000);
    assert!(rep.rejects.is_empty());

    let ds = Dataset::open(&out).unwrap();
    let stats = inspect::stats(&ds);
    assert_eq!(stats.records, 10_000);
    let expected: Vec<(String, u64)> = (0..10).map(|c| (c.to_string(), 1000)).collect();
    assert_eq!(
        stats.per_class, expected,
        "Fashion-MNIST's test split has 1,000 per class"
    );
    assert_eq!((stats.width, stats.height), ([28; 3], [28; 3]));

    let raw = gunzip(&images);
    assert_eq!(&raw[..4], &[0, 0, 8, 3]);
    let labels = gunzip(&PathBuf::from(FASHION_MNIST).join("t10k-labels-idx1-ubyte.gz"));
    let mut scratch = RecordScratch::default();
    let mut buf = Vec::new();
    for (i, r) in ds.live_records().enumerate().step_by(997) {
        let m = ds.read_rgb(r, &mut scratch, &mut buf).unwrap();
        let gray = &raw[16 + i * 784..16 + (i + 1) * 784];
        assert!(
            buf.chunks(3).zip(gray).all(|(p, &g)| p == [g, g, g]),
            "image {i}"
        );
        let class = &ds.manifest().classes[m.label().unwrap() as usize];
        assert_eq!(class, &labels[8 + i].to_string(), "label of image {i}");
    }
    assert!(inspect::verify(&ds, &|_| {}).is_empty());
}

#[test]
fn real_photos_ingest_and_verify() {
    let photos = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/photos256");
    if !require(&photos) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("photos");
    let mut opts = IngestOptions::new(vec![photos.clone()], out.clone());
    opts.settings = SettingsOverride {
        max_side: Some(96),
        ..Default::default()
    };
    let rep = ingest(&opts, &NoProgress).unwrap();
    let jpegs = std::fs::read_dir(&photos)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "jpg")
        })
        .count() as u64;
    assert_eq!(rep.summary.ingested + rep.summary.duplicates, jpegs);
    // SOURCES.txt is text: the only reject.
    assert_eq!(rep.rejects.len(), 1, "{:?}", rep.rejects);
    assert!(rep.rejects[0].path.ends_with("SOURCES.txt"));
    let ds = Dataset::open(&out).unwrap();
    let stats = inspect::stats(&ds);
    assert_eq!(stats.width[0].min(stats.height[0]), 96);
    let mut scratch = RecordScratch::default();
    let mut buf = Vec::new();
    for r in ds.live_records().step_by(50) {
        let m = ds.read_rgb(r, &mut scratch, &mut buf).unwrap();
        let src = &ds
            .manifest()
            .sources
            .iter()
            .find(|s| s.id == m.source_id)
            .unwrap()
            .path;
        // The full decode, then the ingest resize. Ingest decodes these 256-px JPEGs at
        // half size in the IDCT first (short side 128 >= 96): close, not bit-exact.
        // Pillow's `draft` differs from its own full decode on the same photos too:
        // crop_106 1.05, crop_206 1.79 levels on average (ours: 1.62, 2.63).
        let reference =
            byol_ingest::decode::resize_short_side(image::open(src).unwrap().to_rgb8(), Some(96));
        assert_eq!((m.width, m.height), reference.dimensions(), "{src}");
        let mean = buf
            .iter()
            .zip(reference.as_raw())
            .map(|(&a, &b)| f64::from(a.abs_diff(b)))
            .sum::<f64>()
            / buf.len() as f64;
        assert!(mean < 3.0, "{src}: mean abs diff {mean}");
    }
}
