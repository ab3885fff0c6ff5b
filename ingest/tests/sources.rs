//! The dataset follows its sources: moved files are relabelled, vanished ones retired,
//! one content under two labels counts under both, layouts are chosen and kept,
//! lossless sources stay lossless, and unsupported formats say so.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use byol_ingest::inspect;
use byol_ingest::{
    Codec, Dataset, IngestOptions, IngestReport, Layout, Manifest, NoProgress, RejectReason,
    SourceChange, ingest,
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

/// Live samples per class name (`""` for unlabelled), as `byol inspect` counts them.
fn per_class(out: &Path) -> BTreeMap<String, u64> {
    let s = inspect::stats(&Dataset::open(out).unwrap());
    let mut m: BTreeMap<String, u64> = s.per_class.into_iter().filter(|(_, n)| *n > 0).collect();
    if s.unlabelled > 0 {
        m.insert(String::new(), s.unlabelled);
    }
    m
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|&(k, v)| (k.to_owned(), v)).collect()
}

fn canonical(p: &Path) -> String {
    p.canonicalize().unwrap().to_string_lossy().into_owned()
}

#[test]
fn a_moved_file_is_relabelled_and_a_deleted_one_retired() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for i in 0..3 {
        write(&src.join(format!("cat/cat{i}.png")), &png(12, 10, i));
        write(&src.join(format!("dog/dog{i}.png")), &png(12, 10, 10 + i));
    }
    let out = dir.path().join("ds");
    run(&opts(&src, &out));
    assert_eq!(per_class(&out), counts(&[("cat", 3), ("dog", 3)]));
    let old_path = canonical(&src.join("cat/cat0.png"));
    let dog2 = canonical(&src.join("dog/dog2.png"));

    fs::rename(src.join("cat/cat0.png"), src.join("dog/cat0.png")).unwrap();
    fs::remove_file(src.join("dog/dog2.png")).unwrap();
    let rep = run(&opts(&src, &out));
    let s = &rep.summary;
    assert_eq!(
        (s.ingested, s.relabelled, s.sources_retired, s.retired),
        (0, 1, 1, 1),
        "{s:?}"
    );
    assert_eq!(per_class(&out), counts(&[("cat", 2), ("dog", 3)]));
    let new_path = canonical(&src.join("dog/cat0.png"));
    assert!(rep.changes.contains(&SourceChange::Relabelled {
        path: old_path,
        now: new_path,
        from: Some("cat".into()),
        to: Some("dog".into()),
    }));
    assert!(rep.changes.contains(&SourceChange::Retired {
        path: dog2,
        records: 1,
        replaced: false
    }));
    // Content stored once: no record was written for the move.
    let ds = Dataset::open(&out).unwrap();
    assert_eq!((ds.len(), ds.live_records().count()), (6, 5));
    // `byol inspect` says what changed.
    let stats = inspect::stats(&ds);
    assert_eq!((stats.changes.relabelled, stats.changes.retired), (1, 1));
    assert_eq!(stats.recent_changes.len(), 2);
    // Nothing left to do on a third run.
    let s = run(&opts(&src, &out)).summary;
    assert_eq!((s.ingested, s.relabelled, s.sources_retired), (0, 0, 0));
    assert!(inspect::verify(&ds, &|_| {}).is_empty());
}

#[test]
fn only_the_given_roots_are_reconciled() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for i in 0..2 {
        write(&a.join(format!("a{i}.png")), &png(8, 8, i));
        write(&b.join(format!("b{i}.png")), &png(8, 8, 20 + i));
    }
    let out = dir.path().join("ds");
    run(&opts(&a, &out));
    run(&opts(&b, &out));
    fs::remove_file(a.join("a0.png")).unwrap();
    // A run over b/ knows nothing of a/: nothing of a/ is retired.
    let s = run(&opts(&b, &out)).summary;
    assert_eq!(s.sources_retired, 0);
    assert_eq!(Dataset::open(&out).unwrap().live_records().count(), 4);
    // A run over a/ retires what vanished there.
    let s = run(&opts(&a, &out)).summary;
    assert_eq!((s.sources_retired, s.retired), (1, 1));
    assert_eq!(Dataset::open(&out).unwrap().live_records().count(), 3);
}

#[test]
fn a_missing_or_emptied_root_retires_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("mnt/photos");
    for i in 0..3 {
        write(&src.join(format!("p{i}.png")), &png(8, 8, i));
    }
    let out = dir.path().join("ds");
    run(&opts(&src, &out));
    let before = fs::read(Manifest::path_in(&out)).unwrap();
    // Unmounted: the folder is gone. The run fails and the dataset is untouched.
    fs::rename(&src, dir.path().join("elsewhere")).unwrap();
    let err = ingest(&opts(&src, &out), &NoProgress).unwrap_err();
    assert!(err.to_string().contains("photos"), "{err}");
    assert_eq!(fs::read(Manifest::path_in(&out)).unwrap(), before);
    // Unmounted, with the mount point left behind empty: a warning, nothing retired.
    fs::create_dir_all(&src).unwrap();
    let s = run(&opts(&src, &out)).summary;
    assert_eq!(s.sources_retired, 0);
    assert!(
        s.warnings.iter().any(|w| w.contains("nothing retired")),
        "{s:?}"
    );
    assert_eq!(Dataset::open(&out).unwrap().live_records().count(), 3);
    // Or holding only a stub file: the same.
    fs::write(src.join("NOT_MOUNTED"), "the photo disk is not mounted\n").unwrap();
    let s = run(&opts(&src, &out)).summary;
    assert_eq!(s.sources_retired, 0, "{s:?}");
    assert_eq!(Dataset::open(&out).unwrap().live_records().count(), 3);
}

#[test]
fn one_content_under_two_labels_counts_under_both() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let c: Vec<Vec<u8>> = (0..3).map(|i| png(10, 10, i)).collect();
    write(&src.join("cat/c0.png"), &c[0]);
    write(&src.join("cat/c1.png"), &c[1]);
    write(&src.join("cat/c2.png"), &c[2]);
    write(&src.join("cat/c2_copy.png"), &c[2]);
    write(&src.join("dog/d0.png"), &png(10, 10, 9));
    write(&src.join("kitten/k0.png"), &c[0]);
    write(&src.join("kitten/k1.png"), &c[1]);
    let out = dir.path().join("ds");
    run(&opts(&src, &out));
    // Stored once each; a copy inside one class counts once (cat 3), a copy under
    // another label counts there too (kitten 2).
    assert_eq!(
        per_class(&out),
        counts(&[("cat", 3), ("dog", 1), ("kitten", 2)])
    );
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.live_records().count(), 4);
    assert_eq!(ds.samples().count(), 6);
    // Deleting the cat copies leaves the kitten samples, now the records' only label.
    fs::remove_file(src.join("cat/c0.png")).unwrap();
    fs::remove_file(src.join("cat/c1.png")).unwrap();
    let rep = run(&opts(&src, &out));
    // The kitten copies were there before: the cat samples are gone, nothing moved.
    let s = &rep.summary;
    assert_eq!(
        (s.sources_removed, s.relabelled),
        (2, 0),
        "{:?}",
        rep.changes
    );
    assert_eq!(
        per_class(&out),
        counts(&[("cat", 1), ("dog", 1), ("kitten", 2)])
    );
}

#[test]
fn a_lossless_source_that_must_be_rewritten_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(
        &src.join("mirrored.webp"),
        &lossless_webp_with_orientation(40, 24, 3, 2),
    );
    let path = src.join("mirrored.webp").canonicalize().unwrap();
    // 256: kept as is (readers apply the orientation); 16: resized and re-encoded.
    for max_side in [256, 16] {
        let out = dir.path().join(format!("ds{max_side}"));
        let mut o = opts(&src, &out);
        o.settings.codec = Some(Codec::Encoded);
        o.settings.max_side = Some(max_side);
        let rep = run(&o);
        assert_eq!(rep.rejects, vec![]);
        let ds = Dataset::open(&out).unwrap();
        let r = ds.live_records().next().unwrap();
        let mut buf = Vec::new();
        let m = ds
            .read_rgb(r, &mut byol_ingest::RecordScratch::default(), &mut buf)
            .unwrap();
        let want = reference(&path, Some(max_side));
        assert_eq!((m.width, m.height), want.dimensions());
        let max_diff = buf
            .iter()
            .zip(want.as_raw())
            .map(|(&a, &b)| a.abs_diff(b))
            .max()
            .unwrap();
        assert_eq!(max_diff, 0, "max side {max_side}: pixels changed");
    }
}

#[test]
fn auto_layout_ignores_a_readme_and_a_dataset_keeps_its_layout() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src.join("cat/a.png"), &png(8, 8, 1));
    write(&src.join("dog/b.png"), &png(8, 8, 2));
    fs::write(src.join("README.md"), "# pets\n").unwrap();
    let out = dir.path().join("ds");
    let rep = run(&opts(&src, &out));
    let root = &rep.summary.roots[0];
    assert_eq!(root.layout, Layout::ImageFolder);
    assert!(
        root.reason.starts_with("auto: 2 class folder(s)"),
        "{root:?}"
    );
    assert_eq!(per_class(&out), counts(&[("cat", 1), ("dog", 1)]));

    // A flat dataset stays flat when a subfolder appears later.
    let flat = dir.path().join("flat");
    write(&flat.join("x.png"), &png(8, 8, 3));
    write(&flat.join("y.png.bak"), &jpeg(8, 8, 4)); // a backup: skipped by name
    let out2 = dir.path().join("ds2");
    let s = run(&opts(&flat, &out2)).summary;
    assert_eq!(
        (s.roots[0].layout, s.ignored, s.ingested),
        (Layout::Flat, 1, 1)
    );
    write(&flat.join("trip/z.png"), &png(8, 8, 5));
    let s = run(&opts(&flat, &out2)).summary;
    assert_eq!(s.roots[0].layout, Layout::Flat);
    assert_eq!(s.roots[0].reason, "as recorded for this folder");
    assert_eq!(per_class(&out2), counts(&[("", 2)]));
    // Asking for another layout relabels what is there.
    let mut o = opts(&flat, &out2);
    o.layout = Layout::ImageFolder;
    let s = run(&o).summary;
    assert_eq!(s.relabelled, 1);
    assert_eq!(per_class(&out2), counts(&[("", 1), ("trip", 1)]));
}

#[test]
fn float_and_signed_tiffs_are_unsupported_not_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src.join("f32.tif"), &gray_tiff(4, 3, 32, 3));
    write(&src.join("i16.tif"), &gray_tiff(4, 3, 16, 2));
    write(&src.join("ok.tif"), &gray_tiff(4, 3, 8, 1));
    let rep = run(&opts(&src, &dir.path().join("ds")));
    let reasons = reasons_by_name(&rep.rejects);
    assert_eq!(rep.summary.ingested, 1, "{:?}", rep.rejects);
    assert_eq!(
        reasons["f32.tif"],
        RejectReason::Unsupported,
        "{:?}",
        rep.rejects
    );
    assert_eq!(
        reasons["i16.tif"],
        RejectReason::Unsupported,
        "{:?}",
        rep.rejects
    );
}

#[test]
fn heic_is_unsupported_not_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let mut heic = vec![0, 0, 0, 24];
    heic.extend_from_slice(b"ftypheic\0\0\0\0mif1heic");
    heic.extend_from_slice(&[0; 64]);
    write(&src.join("IMG_0001.HEIC"), &heic);
    let rep = run(&opts(&src, &dir.path().join("ds")));
    assert_eq!(rep.rejects.len(), 1);
    assert_eq!(rep.rejects[0].reason, RejectReason::Unsupported);
    assert!(rep.rejects[0].detail.contains("HEIF"), "{:?}", rep.rejects);
}

#[test]
fn a_version_1_dataset_is_read_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src.join("cat/a.png"), &png(8, 8, 1));
    write(&src.join("cat/b.png"), &png(8, 8, 2));
    let out = dir.path().join("ds");
    run(&opts(&src, &out));
    // Rewrite the manifest as version 1 wrote it: no roots.
    let mut m = Manifest::load(&out).unwrap().unwrap();
    m.version = 1;
    m.roots.clear();
    let mut bytes = serde_json::to_vec_pretty(&m).unwrap();
    bytes.push(b'\n');
    fs::write(Manifest::path_in(&out), bytes).unwrap();
    assert_eq!(per_class(&out), counts(&[("cat", 2)]));
    // The layout is inferred from the labelled sources, so nothing is relabelled.
    write(&src.join("c.png"), &png(8, 8, 3));
    let s = run(&opts(&src, &out)).summary;
    assert_eq!((s.relabelled, s.ingested), (0, 1));
    let m = Manifest::load(&out).unwrap().unwrap();
    assert_eq!(m.version, byol_ingest::manifest::MANIFEST_VERSION);
    assert_eq!(m.roots[0].layout, Layout::ImageFolder);
}

#[test]
fn an_ingester_adds_retires_and_relabels_single_files() {
    use byol_ingest::source::Candidate;
    use byol_ingest::{Ingester, IngesterOptions};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src.join("a.png"), &png(8, 8, 1));
    write(&src.join("b.png"), &png(8, 8, 2));
    let (a, b) = (canonical(&src.join("a.png")), canonical(&src.join("b.png")));
    let out = dir.path().join("ds");
    let mut ing = Ingester::open_quiet(&out, IngesterOptions::default()).unwrap();
    let file =
        |p: &str, label: &str| Candidate::for_file(Path::new(p), Some(label.into())).unwrap();
    ing.add(vec![file(&a, "cat")]).unwrap();
    ing.commit().unwrap();
    assert_eq!(per_class(&out), counts(&[("cat", 1)]));
    // A second writer is kept off while this one is open.
    let err = ingest(&opts(&src, &out), &NoProgress).err().unwrap();
    assert!(err.to_string().contains("another ingest run"), "{err}");
    ing.add(vec![file(&b, "cat")]).unwrap();
    assert!(ing.relabel(Path::new(&a), Some("dog")).unwrap());
    ing.commit().unwrap();
    assert_eq!(per_class(&out), counts(&[("cat", 1), ("dog", 1)]));
    assert!(ing.retire(Path::new(&b)).unwrap());
    assert!(!ing.retire(Path::new("/nowhere.png")).unwrap());
    let rep = ing.finish().unwrap();
    assert_eq!(per_class(&out), counts(&[("dog", 1)]));
    assert_eq!(
        (
            rep.summary.ingested,
            rep.summary.relabelled,
            rep.summary.sources_retired
        ),
        (2, 1, 1)
    );
}

#[test]
fn a_class_folder_ingested_on_its_own_keeps_its_class() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src.join("cat/a.png"), &png(8, 8, 1));
    write(&src.join("dog/b.png"), &png(8, 8, 2));
    let out = dir.path().join("ds");
    run(&opts(&src, &out));
    // New photos of cats, added by ingesting the cat folder alone.
    write(&src.join("cat/c.png"), &png(8, 8, 3));
    let rep = run(&opts(&src.join("cat"), &out));
    assert_eq!(
        (rep.summary.ingested, rep.summary.relabelled),
        (1, 0),
        "{:?}",
        rep.changes
    );
    assert!(
        rep.summary.roots[0]
            .reason
            .contains("as the folder it is in"),
        "{:?}",
        rep.summary.roots
    );
    assert_eq!(per_class(&out), counts(&[("cat", 2), ("dog", 1)]));
    // And again, and the whole tree: nothing flips.
    assert_eq!(run(&opts(&src.join("cat"), &out)).summary.relabelled, 0);
    assert_eq!(run(&opts(&src, &out)).summary.relabelled, 0);
    assert_eq!(per_class(&out), counts(&[("cat", 2), ("dog", 1)]));
}

#[test]
fn an_empty_folder_does_not_fix_a_layout_and_a_root_readme_is_not_data() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let out = dir.path().join("ds");
    run(&opts(&src, &out));
    write(&src.join("cat/a.png"), &png(8, 8, 1));
    fs::write(src.join("README"), "pets\n").unwrap();
    write(&src.join("stray.png"), &png(8, 8, 2));
    let rep = run(&opts(&src, &out));
    assert_eq!(rep.summary.roots[0].layout, Layout::ImageFolder);
    // The README is skipped, not rejected run after run; the stray image is reported.
    assert_eq!(
        (rep.rejects.len(), rep.summary.ignored),
        (0, 1),
        "{:?}",
        rep.rejects
    );
    assert!(
        rep.summary
            .warnings
            .iter()
            .any(|w| w.contains("1 image(s) at the root"))
    );
    assert_eq!(per_class(&out), counts(&[("cat", 1), ("", 1)]));
}

/// A 16 x 16 BMP: always the same size in bytes, whatever the pixels.
fn bmp(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([(x * 13) as u8 ^ seed, (y * 7) as u8, seed.wrapping_mul(31)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Bmp).unwrap();
    out.into_inner()
}

/// An image edited in place with its size and mtime kept (`exiftool -P`, `touch -r`)
/// is seen by its ctime: the next run stores the new pixels and retires the old ones.
/// A file whose stamp did not move is not read again.
#[test]
fn an_edit_that_keeps_size_and_mtime_is_seen_by_its_ctime() {
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("src"), dir.path().join("out"));
    let file = src.join("cat/a.bmp");
    write(&file, &bmp(1));
    write(&src.join("cat/b.bmp"), &bmp(2));
    let first = run(&opts(&src, &out)).summary;
    assert_eq!(first.ingested, 2);
    let before = fs::metadata(&file).unwrap();
    // Same size, new pixels, the old mtime put back.
    let edited = bmp(3);
    assert_eq!(edited.len() as u64, before.len());
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(&file, &edited).unwrap();
    fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(before.modified().unwrap())
        .unwrap();
    let after = fs::metadata(&file).unwrap();
    assert_eq!(
        (after.len(), after.modified().unwrap()),
        (before.len(), before.modified().unwrap())
    );
    let second = run(&opts(&src, &out)).summary;
    assert_eq!((second.ingested, second.retired), (1, 1), "{second:?}");
    let m = Manifest::load(&out).unwrap().unwrap();
    let entry = m
        .sources
        .iter()
        .find(|s| s.path == canonical(&file))
        .unwrap();
    assert_eq!(entry.hash, blake3::hash(&edited).to_hex().to_string());
    // Nothing moved: nothing is read again.
    let third = run(&opts(&src, &out)).summary;
    assert_eq!((third.ingested, third.already_present), (0, 2), "{third:?}");
}

/// Names that are not UTF-8 (Latin-1 `grün.png`, `café.png`) are stored losslessly:
/// each is one source, kept by the next run, and two names that differ only in their
/// undecodable bytes are two sources.
#[test]
fn names_that_are_not_utf8_are_kept_one_source_each() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("src"), dir.path().join("out"));
    let names: [&[u8]; 4] = [b"gr\xfcn.png", b"caf\xe9.png", b"x\xff.png", b"x\xfe.png"];
    for (i, name) in names.iter().enumerate() {
        let path = src.join("cat").join(std::ffi::OsStr::from_bytes(name));
        write(&path, &png(8, 8, i as u32));
    }
    // A bad file with such a name is rejected (and reported) like any other.
    let bad = src
        .join("cat")
        .join(std::ffi::OsStr::from_bytes(b"bad\xe9.png"));
    write(&bad, b"not a png");
    let first = run(&opts(&src, &out)).summary;
    assert_eq!((first.ingested, first.retired), (4, 0), "{first:?}");
    assert_eq!(first.rejected_total(), 1, "{first:?}");
    let report = fs::read_to_string(out.join("rejects.jsonl")).unwrap();
    let line: byol_ingest::Reject = serde_json::from_str(report.lines().last().unwrap()).unwrap();
    assert_eq!(line.path, bad.canonicalize().unwrap());
    let m = Manifest::load(&out).unwrap().unwrap();
    assert_eq!(m.sources.len(), 4);
    for s in &m.sources {
        let path = byol_ingest::manifest::stored_path(&s.path);
        assert!(path.exists(), "{:?} names no file", s.path);
    }
    let second = run(&opts(&src, &out)).summary;
    assert_eq!(
        (second.ingested, second.retired, second.already_present),
        (0, 0, 4),
        "{second:?}"
    );
    // The escaping is only for bytes that are not UTF-8.
    let plain = std::path::Path::new("/a/grün.png");
    assert_eq!(byol_ingest::manifest::path_key(plain), "/a/grün.png");
    let latin1 = std::path::Path::new(std::ffi::OsStr::from_bytes(b"/a/gr\xfcn.png"));
    assert_eq!(byol_ingest::manifest::path_key(latin1), "/a/gr\0fcn.png");
    assert_eq!(byol_ingest::manifest::stored_path("/a/gr\0fcn.png"), latin1);
}
