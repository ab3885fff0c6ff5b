//! Ingest runs on generated folders: round trip, incremental runs, bad inputs, crashes.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use byol_ingest::manifest::SHARDS_DIR;
use byol_ingest::{
    Codec, Compression, Dataset, IngestError, IngestOptions, IngestReport, Manifest, NoProgress,
    RecordScratch, RejectReason, SettingsOverride, ingest,
};
use common::*;

fn opts(src: &Path, out: &Path) -> IngestOptions {
    let mut o = IngestOptions::new(vec![src.to_owned()], out.to_owned());
    o.threads = 2;
    o
}

fn run(o: &IngestOptions) -> IngestReport {
    ingest(o, &NoProgress).expect("ingest run")
}

/// Every live record with its source path and decoded pixels.
fn records_by_path(ds: &Dataset) -> BTreeMap<String, Vec<(image::RgbImage, Option<u32>)>> {
    let id_to_path: BTreeMap<u64, String> = ds
        .manifest()
        .sources
        .iter()
        .map(|s| (s.id, s.path.clone()))
        .collect();
    let mut scratch = RecordScratch::default();
    let mut buf = Vec::new();
    let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for r in ds.live_records() {
        let m = ds.read_rgb(r, &mut scratch, &mut buf).unwrap();
        let img = image::RgbImage::from_raw(m.width, m.height, buf.clone()).unwrap();
        out.entry(id_to_path[&m.source_id].clone())
            .or_default()
            .push((img, m.label()));
    }
    out
}

#[test]
fn round_trip_matches_reference_decode_for_every_kind() {
    for codec in [Codec::RawRgb8, Codec::Encoded] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for (name, bytes) in every_kind(1) {
            write(&src.join("alpha").join(&name), &bytes);
        }
        for (name, bytes) in every_kind(2) {
            write(&src.join("beta").join(&name), &bytes);
        }
        let out = dir.path().join("ds");
        let mut o = opts(&src, &out);
        o.settings = SettingsOverride {
            codec: Some(codec),
            max_side: Some(64),
            ..Default::default()
        };
        let rep = run(&o);
        assert_eq!(rep.rejects, vec![], "{codec}");
        // every_kind(1) and every_kind(2) share the palette PNG: stored once.
        assert_eq!(rep.summary.ingested, 27, "{codec}");
        assert_eq!(rep.summary.duplicates, 1, "{codec}");
        let ds = Dataset::open(&out).unwrap();
        assert_eq!(ds.manifest().classes, vec!["alpha", "beta"]);
        let by_path = records_by_path(&ds);
        assert_eq!(by_path.len(), 27);
        for (path, recs) in &by_path {
            assert_eq!(recs.len(), 1, "{path}");
            let (img, label) = &recs[0];
            let reference = reference(Path::new(path), Some(64));
            if path.contains("big_") {
                // A JPEG twice the target size is decoded at half size in the IDCT, then
                // resized; with the encoded codec it is also re-encoded as JPEG (quality
                // 95): close to the full decode, not exact. The pattern's per-pixel noise
                // is the worst case for the two antialiasing paths (photos differ far
                // less: see the ingest benchmark).
                assert_eq!(img.dimensions(), reference.dimensions());
                let diff: f64 = img
                    .as_raw()
                    .iter()
                    .zip(reference.as_raw())
                    .map(|(&a, &b)| (a as f64 - b as f64).abs())
                    .sum::<f64>()
                    / img.as_raw().len() as f64;
                assert!(diff < 6.0, "{path}: mean abs diff {diff}");
            } else {
                assert!(
                    img == &reference,
                    "{codec}: {path} differs from the reference decode"
                );
            }
            let class = if path.contains("/alpha/") { 0 } else { 1 };
            assert_eq!(*label, Some(class), "{path}");
        }
        let big = by_path.keys().find(|p| p.contains("big_1")).unwrap();
        assert_eq!(
            by_path[big][0].0.dimensions(),
            (96, 64),
            "short side limited to 64"
        );
    }
}

#[test]
fn uncompressed_and_compressed_shards_mix_and_read_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for (name, bytes) in every_kind(1) {
        write(&src.join("alpha").join(&name), &bytes);
    }
    // Reference: everything compressed, in one run.
    let reference_out = dir.path().join("reference");
    run(&opts(&src, &reference_out));
    let reference = records_by_path(&Dataset::open(&reference_out).unwrap());
    // First run stored as is, second (new files) compressed again.
    let out = dir.path().join("ds");
    let mut o = opts(&src, &out);
    o.settings.compression = Some(Compression::None);
    run(&o);
    for (name, bytes) in every_kind(2) {
        write(&src.join("beta").join(&name), &bytes);
    }
    o.settings.compression = Some(Compression::Zstd);
    run(&o);
    let ds = Dataset::open(&out).unwrap();
    let kinds: Vec<Compression> = ds.shards().iter().map(|s| s.compression()).collect();
    assert!(
        kinds.contains(&Compression::None) && kinds.contains(&Compression::Zstd),
        "{kinds:?}"
    );
    assert_eq!(ds.manifest().settings.compression, Compression::Zstd);
    let raw_first = &ds.shards()[0];
    let m = raw_first.meta(0);
    assert_eq!(
        m.stored_len, m.raw_len,
        "the first run stored records as is"
    );
    let got = records_by_path(&ds);
    for (path, recs) in &reference {
        assert_eq!(&got[path], recs, "{path}");
    }
    assert!(
        got.len() > reference.len(),
        "the second run added the beta images"
    );
}

#[test]
fn exif_orientation_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src.join("rot.jpg"), &jpeg_with_orientation(40, 20, 3, 6));
    write(&src.join("plain.jpg"), &jpeg(40, 20, 3));
    let out = dir.path().join("ds");
    run(&opts(&src, &out));
    let ds = Dataset::open(&out).unwrap();
    let recs = records_by_path(&ds);
    let rot = &recs.iter().find(|(p, _)| p.ends_with("rot.jpg")).unwrap().1[0].0;
    let plain = &recs
        .iter()
        .find(|(p, _)| p.ends_with("plain.jpg"))
        .unwrap()
        .1[0]
        .0;
    assert_eq!(
        rot.dimensions(),
        (20, 40),
        "orientation 6 turns the image upright"
    );
    assert!(*rot == image::imageops::rotate90(plain));
}

#[test]
fn incremental_run_adds_only_new_files_as_new_shards() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for i in 0..10 {
        write(&src.join(format!("a{i:02}.png")), &png(20, 16, i));
    }
    let out = dir.path().join("ds");
    let first = run(&opts(&src, &out)).summary;
    assert_eq!((first.ingested, first.shards_written), (10, 1));
    let shard0 = out.join(SHARDS_DIR).join(Manifest::shard_file_name(0));
    let before = (
        fs::read(&shard0).unwrap(),
        fs::metadata(&shard0).unwrap().modified().unwrap(),
    );

    let again = run(&opts(&src, &out)).summary;
    assert_eq!(
        (again.ingested, again.already_present, again.shards_written),
        (0, 10, 0)
    );
    let generation = Manifest::load(&out).unwrap().unwrap().generation;
    assert_eq!(
        again.generation, generation,
        "nothing new, no new generation"
    );

    for i in 10..13 {
        write(&src.join(format!("b{i:02}.png")), &png(20, 16, i));
    }
    let grown = run(&opts(&src, &out)).summary;
    assert_eq!(
        (grown.ingested, grown.already_present, grown.shards_written),
        (3, 10, 1)
    );
    assert_eq!(grown.generation, generation + 1);
    let after = (
        fs::read(&shard0).unwrap(),
        fs::metadata(&shard0).unwrap().modified().unwrap(),
    );
    assert!(before == after, "an existing shard is never rewritten");
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.len(), 13);
    assert_eq!(ds.shards().len(), 2);
    assert_eq!(ds.manifest().sources.len(), 13);
}

#[test]
fn changed_file_replaces_its_record_and_retires_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src.join("x.png"), &png(20, 16, 1));
    write(&src.join("y.png"), &png(20, 16, 2));
    let out = dir.path().join("ds");
    run(&opts(&src, &out));
    write(&src.join("x.png"), &png(24, 12, 9));
    let s = run(&opts(&src, &out)).summary;
    assert_eq!((s.ingested, s.already_present, s.retired), (1, 1, 1));
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.live_records().count(), 2);
    let recs = records_by_path(&ds);
    let x = &recs.iter().find(|(p, _)| p.ends_with("x.png")).unwrap().1;
    assert_eq!(x.len(), 1);
    assert_eq!(x[0].0.dimensions(), (24, 12));

    // Touching a file without changing its content stores nothing.
    let f = fs::File::options()
        .write(true)
        .open(src.join("y.png"))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(f);
    let s = run(&opts(&src, &out)).summary;
    assert_eq!((s.ingested, s.already_present, s.retired), (0, 2, 0));
}

#[test]
fn duplicate_content_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let bytes = png(20, 16, 5);
    write(&src.join("one.png"), &bytes);
    write(&src.join("two.png"), &bytes);
    write(&src.join("three.png"), &png(20, 16, 6));
    let out = dir.path().join("ds");
    let s = run(&opts(&src, &out)).summary;
    assert_eq!((s.ingested, s.duplicates), (2, 1));
    // A later copy of known content is a duplicate too.
    write(&src.join("four.png"), &bytes);
    let s = run(&opts(&src, &out)).summary;
    assert_eq!((s.ingested, s.duplicates, s.already_present), (0, 1, 3));
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.manifest().sources.len(), 4);
}

#[test]
fn bad_inputs_are_rejected_with_path_and_reason_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src.join("good1.jpg"), &jpeg(30, 20, 1));
    write(&src.join("good2.png"), &png(30, 20, 2));
    write(&src.join("empty.jpg"), b"");
    let full = jpeg(64, 64, 3);
    write(&src.join("truncated.jpg"), &full[..full.len() / 3]);
    let mut corrupt = png(32, 32, 4);
    let n = corrupt.len();
    corrupt[n / 2..n - 20].fill(0x55);
    write(&src.join("corrupt.png"), &corrupt);
    write(&src.join("notes.txt"), b"this is not an image\n");
    write(&src.join("bomb.png"), &png_claiming(100_000, 100_000));
    write(&src.join("bomb.jpg"), &jpeg_claiming(60_000, 60_000));
    std::os::unix::fs::symlink(src.join("nowhere.jpg"), src.join("broken.jpg")).unwrap();
    std::os::unix::fs::symlink(&src, src.join("loop")).unwrap();
    let fifo = src.join("pipe.jpg");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );

    let out = dir.path().join("ds");
    let rep = run(&opts(&src, &out));
    assert_eq!(rep.summary.ingested, 2);
    let got = reasons_by_name(&rep.rejects);
    let expected: BTreeMap<String, RejectReason> = [
        ("empty.jpg", RejectReason::Empty),
        ("truncated.jpg", RejectReason::Corrupt),
        ("corrupt.png", RejectReason::Corrupt),
        ("notes.txt", RejectReason::NotAnImage),
        ("bomb.png", RejectReason::TooLarge),
        ("bomb.jpg", RejectReason::TooLarge),
        ("broken.jpg", RejectReason::BrokenSymlink),
        ("loop", RejectReason::SymlinkLoop),
        ("pipe.jpg", RejectReason::NotRegularFile),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(got, expected);
    assert_eq!(rep.summary.rejected_total(), 9);
    // The rejects report names every file.
    let report = fs::read_to_string(out.join(byol_ingest::reject::REJECTS_FILE)).unwrap();
    assert_eq!(report.lines().count(), 9);
    for name in expected.keys() {
        assert!(
            report.contains(name.as_str()),
            "{name} missing from the report"
        );
    }
    assert!(Dataset::open(&out).is_ok());
}

#[test]
fn leftovers_of_a_killed_run_are_ignored_then_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for i in 0..4 {
        write(&src.join(format!("a{i}.png")), &png(20, 16, i));
    }
    let out = dir.path().join("ds");
    run(&opts(&src, &out));
    let shards = out.join(SHARDS_DIR);
    // What a kill leaves behind: a temp shard, a renamed shard the manifest never
    // listed (half-written garbage), and a temp manifest.
    fs::write(shards.join("000001.shard.tmp"), b"BYOLSHRD partial").unwrap();
    fs::write(shards.join("000001.shard"), vec![7u8; 1000]).unwrap();
    fs::write(out.join("manifest.json.tmp"), b"{ half").unwrap();
    let ds = Dataset::open(&out).expect("the dataset reads as of its last manifest");
    assert_eq!(ds.len(), 4);
    drop(ds);
    for i in 4..6 {
        write(&src.join(format!("b{i}.png")), &png(20, 16, i));
    }
    let s = run(&opts(&src, &out)).summary;
    assert_eq!((s.leftovers_removed, s.ingested), (3, 2));
    assert!(!shards.join("000001.shard.tmp").exists());
    assert!(!out.join("manifest.json.tmp").exists());
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.len(), 6);
    assert!(byol_ingest::inspect::verify(&ds, &|_| {}).is_empty());
}

#[test]
fn small_shard_size_splits_into_many_shards() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for i in 0..30 {
        write(&src.join(format!("a{i:02}.png")), &png(40, 40, i));
    }
    let out = dir.path().join("ds");
    let mut o = opts(&src, &out);
    o.shard_bytes = 8 << 10;
    let s = run(&o).summary;
    assert_eq!(s.ingested, 30);
    let ds = Dataset::open(&out).unwrap();
    assert!(ds.shards().len() >= 3, "{} shards", ds.shards().len());
    assert_eq!(ds.len(), 30);
    // Order is deterministic: records follow sorted paths across shards.
    let names: Vec<String> = ds
        .live_records()
        .map(|r| {
            let id = ds.meta(r).source_id;
            ds.manifest()
                .sources
                .iter()
                .find(|s| s.id == id)
                .unwrap()
                .path
                .clone()
        })
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
}

#[test]
fn idx_files_give_known_pixels_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 4) as u8).collect();
    let labels = [3u8, 0, 3, 9, 1];
    let images_path = dir.path().join("toy-images-idx3-ubyte.gz");
    write(&images_path, &idx(&[5, 4, 3], &pixels, true));
    write(
        &dir.path().join("toy-labels-idx1-ubyte.gz"),
        &idx(&[5], &labels, true),
    );
    let out = dir.path().join("ds");
    let s = run(&opts(&images_path, &out)).summary;
    assert_eq!(s.ingested, 5);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.manifest().classes, vec!["0", "1", "3", "9"]);
    let mut scratch = RecordScratch::default();
    let mut buf = Vec::new();
    for (i, r) in ds.live_records().enumerate() {
        let m = ds.read_rgb(r, &mut scratch, &mut buf).unwrap();
        assert_eq!((m.width, m.height, m.item), (3, 4, i as u32));
        let gray = &pixels[i * 12..(i + 1) * 12];
        let expected: Vec<u8> = gray.iter().flat_map(|&v| [v, v, v]).collect();
        assert_eq!(buf, expected);
        let class = &ds.manifest().classes[m.label().unwrap() as usize];
        assert_eq!(class, &labels[i].to_string());
    }
    assert_eq!(
        ds.manifest().sources[0]
            .labels_file
            .as_ref()
            .map(|l| l.path.ends_with("toy-labels-idx1-ubyte.gz")),
        Some(true)
    );
    let again = run(&opts(&images_path, &out)).summary;
    assert_eq!((again.ingested, again.already_present), (0, 1));

    // Labels that do not match the images are a reject, not a crash.
    let bad = dir.path().join("bad-images-idx3-ubyte");
    write(&bad, &idx(&[5, 4, 3], &pixels, false));
    write(
        &dir.path().join("bad-labels-idx1-ubyte"),
        &idx(&[4], &labels[..4], false),
    );
    let rep = run(&opts(&bad, &out));
    assert_eq!(rep.rejects.len(), 1);
    assert_eq!(rep.rejects[0].reason, RejectReason::InvalidIdx);
    assert!(rep.rejects[0].detail.contains("5 images but 4 labels"));
}

#[test]
fn conflicting_settings_are_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src.join("a.png"), &png(20, 16, 1));
    let out = dir.path().join("ds");
    run(&opts(&src, &out));
    let before = fs::read(Manifest::path_in(&out)).unwrap();
    write(&src.join("b.png"), &png(20, 16, 2));
    let mut o = opts(&src, &out);
    o.settings.max_side = Some(128);
    match ingest(&o, &NoProgress) {
        Err(IngestError::SettingsConflict {
            key: "max-side", ..
        }) => {}
        other => panic!("expected a settings conflict, got {other:?}"),
    }
    o.settings = SettingsOverride {
        codec: Some(Codec::Encoded),
        ..Default::default()
    };
    assert!(matches!(
        ingest(&o, &NoProgress),
        Err(IngestError::SettingsConflict { key: "codec", .. })
    ));
    assert_eq!(fs::read(Manifest::path_in(&out)).unwrap(), before);
}

#[test]
fn second_concurrent_run_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    fs::create_dir_all(&out).unwrap();
    let holder = fs::File::create(out.join(byol_ingest::LOCK_FILE)).unwrap();
    holder.lock().unwrap();
    let src = dir.path().join("src");
    write(&src.join("a.png"), &png(8, 8, 1));
    assert!(matches!(
        ingest(&opts(&src, &out), &NoProgress),
        Err(IngestError::Locked { .. })
    ));
}

#[test]
fn missing_source_and_unwritable_output_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let missing = opts(&dir.path().join("nope"), &out);
    assert!(matches!(
        ingest(&missing, &NoProgress),
        Err(IngestError::Source { .. })
    ));
    let file = dir.path().join("file");
    fs::write(&file, b"x").unwrap();
    let src = dir.path().join("src");
    write(&src.join("a.png"), &png(8, 8, 1));
    let o = opts(&src, &file.join("ds"));
    assert!(matches!(
        ingest(&o, &NoProgress),
        Err(IngestError::Output { .. })
    ));
}

#[test]
fn the_same_source_given_twice_is_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src.join("a.png"), &png(8, 8, 1));
    let out = dir.path().join("ds");
    let mut o = opts(&src, &out);
    o.sources.push(src.join("a.png"));
    o.sources
        .push(PathBuf::from(format!("{}/.", src.display())));
    let s = run(&o).summary;
    assert_eq!((s.files_seen, s.ingested, s.duplicates), (1, 1, 0));
}

#[test]
fn encoded_codec_keeps_original_bytes_when_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let small = jpeg(40, 30, 1);
    let rotated = jpeg_with_orientation(40, 30, 2, 6);
    write(&src.join("small.jpg"), &small);
    write(&src.join("rotated.jpg"), &rotated);
    let out = dir.path().join("ds");
    let mut o = opts(&src, &out);
    o.settings.codec = Some(Codec::Encoded);
    run(&o);
    let ds = Dataset::open(&out).unwrap();
    let shard = &ds.shards()[0];
    let mut scratch = byol_ingest::shard::ReadScratch::new();
    let mut payload = Vec::new();
    let by_name = |name: &str| {
        ds.manifest()
            .sources
            .iter()
            .find(|s| s.path.ends_with(name))
            .unwrap()
            .id
    };
    for i in 0..shard.len() {
        let m = shard.read_into(i, &mut scratch, &mut payload).unwrap();
        if m.source_id == by_name("small.jpg") {
            assert_eq!(payload, small, "stored verbatim");
        } else {
            // Readers apply the EXIF orientation as ingest does: the file's own bytes
            // are kept (no second JPEG generation), the index has the rotated size.
            assert_eq!(m.source_id, by_name("rotated.jpg"));
            assert_eq!(payload, rotated, "stored verbatim");
            assert_eq!((m.width, m.height), (30, 40));
        }
    }
    let by_path = records_by_path(&ds);
    let path = src.join("rotated.jpg").canonicalize().unwrap();
    let reference = reference(&path, Some(256));
    assert!(by_path[path.to_str().unwrap()][0].0 == reference);
}

#[test]
fn mutated_images_never_stop_a_run() {
    // Seeded byte flips, truncations and splices of valid files: every one ends up
    // ingested or rejected, and the run completes.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let seeds: Vec<Vec<u8>> = every_kind(7).into_iter().map(|(_, b)| b).collect();
    let mut state = 0x2545_f491_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let n = 120;
    for i in 0..n {
        let mut b = seeds[i % seeds.len()].clone();
        match next() % 3 {
            0 => {
                for _ in 0..1 + next() % 8 {
                    let at = (next() as usize) % b.len();
                    b[at] = next() as u8;
                }
            }
            1 => b.truncate(1 + (next() as usize) % b.len()),
            _ => {
                let at = (next() as usize) % b.len();
                let other = &seeds[(next() as usize) % seeds.len()];
                b.splice(at.., other[..other.len() / 2].iter().copied());
            }
        }
        write(&src.join(format!("m{i:03}")), &b);
    }
    let rep = run(&opts(&src, &out_dir(&dir)));
    let s = &rep.summary;
    assert_eq!(
        s.ingested + s.duplicates + s.rejected_total(),
        n as u64,
        "{s:?}"
    );
    assert!(s.rejected_total() > 0 && s.ingested > 0, "{s:?}");
    let ds = Dataset::open(&out_dir(&dir)).unwrap();
    assert!(byol_ingest::inspect::verify(&ds, &|_| {}).is_empty());
}

fn out_dir(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("ds")
}

#[test]
fn large_jpegs_of_every_kind_ingest_at_their_oriented_size() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    // Rotated 90 degrees (orientation 6), CMYK (the full-decode fallback), plain.
    write(
        &src.join("rotated.jpg"),
        &jpeg_with_orientation(640, 480, 3, 6),
    );
    write(&src.join("cmyk.jpg"), &cmyk_jpeg(640, 480, 4));
    write(&src.join("plain.jpg"), &jpeg(640, 480, 5));
    let out = dir.path().join("ds");
    let mut o = opts(&src, &out);
    o.settings.max_side = Some(100);
    let rep = run(&o);
    assert_eq!(rep.rejects, vec![]);
    let by_path = records_by_path(&Dataset::open(&out).unwrap());
    for (name, size) in [
        ("rotated.jpg", (100, 133)),
        ("cmyk.jpg", (133, 100)),
        ("plain.jpg", (133, 100)),
    ] {
        let path = src.join(name).canonicalize().unwrap();
        let got = &by_path[path.to_str().unwrap()][0].0;
        assert_eq!(got.dimensions(), size, "{name}");
        let want = reference(&path, Some(100));
        let mean = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(&a, &b)| f64::from(a.abs_diff(b)))
            .sum::<f64>()
            / want.as_raw().len() as f64;
        assert!(mean < 6.0, "{name}: mean abs diff {mean}");
    }
}

#[test]
fn copies_in_one_run_are_decoded_once_and_share_a_rejected_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let good = jpeg(64, 48, 1);
    let mut bad = jpeg(64, 48, 2);
    bad.truncate(bad.len() / 2);
    for i in 0..5 {
        write(&src.join(format!("good{i}.jpg")), &good);
        write(&src.join(format!("bad{i}.jpg")), &bad);
    }
    let rep = run(&opts(&src, &out_dir(&dir)));
    let s = &rep.summary;
    assert_eq!((s.ingested, s.duplicates), (1, 4), "{s:?}");
    // Every copy of the truncated file is rejected for what it is.
    assert_eq!(rep.rejects.len(), 5, "{:?}", rep.rejects);
    assert!(
        rep.rejects
            .iter()
            .all(|r| r.reason == RejectReason::Corrupt)
    );
}
