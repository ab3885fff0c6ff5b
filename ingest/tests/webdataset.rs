//! WebDataset shards as sources: brace patterns and folders of `.tar` (and `.tar.gz`)
//! files, labels from `cls` or `json`, re-ingest adding only new or changed shards and
//! retiring vanished ones, damaged shards keeping the samples before the damage, and the
//! daemon's follower settling shards that arrive in a watched folder.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use byol_ingest::{
    Dataset, Follower, IngestEvent, IngestLoop, IngestOptions, IngesterOptions, Layout, NoProgress,
    RejectReason, Reopen, ingest,
};

/// A tar of `members` (name, bytes), as the `tar` crate writes it (GNU headers).
fn tar_of(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

/// `n` samples `{prefix}{i:04}` with a PNG and a `cls` of `i % classes`.
fn shard(prefix: &str, n: u32, classes: u32, seed: u32) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .flat_map(|i| {
            let key = format!("{prefix}{i:04}");
            [
                (format!("{key}.png"), common::png(12, 10, seed * 100 + i)),
                (format!("{key}.cls"), (i % classes).to_string().into_bytes()),
            ]
        })
        .collect()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn opts(sources: Vec<PathBuf>, out: &Path) -> IngestOptions {
    let mut o = IngestOptions::new(sources, out.to_owned());
    o.threads = 2;
    o.commit_interval = Duration::ZERO;
    o
}

/// Live samples per class name (`None`: unlabelled).
fn per_class(data: &Path) -> BTreeMap<Option<String>, usize> {
    let ds = Dataset::open(data).unwrap();
    let mut out = BTreeMap::new();
    for s in ds.samples() {
        let name = s.label.map(|l| ds.manifest().classes[l as usize].clone());
        *out.entry(name).or_default() += 1;
    }
    out
}

fn live(data: &Path) -> usize {
    Dataset::open(data).unwrap().live_records().count()
}

#[test]
fn a_brace_pattern_of_shards_ingests_every_sample_with_its_cls() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("wds");
    std::fs::create_dir_all(&src).unwrap();
    for s in 0..3 {
        let t = tar_of(&shard(&format!("s{s}-"), 5, 3, s));
        std::fs::write(src.join(format!("data-{s:06}.tar")), t).unwrap();
    }
    let out = dir.path().join("ds");
    let pattern = src.join("data-{000000..000002}.tar");
    let rep = ingest(&opts(vec![pattern.clone()], &out), &NoProgress).unwrap();
    assert_eq!(rep.summary.ingested, 15);
    assert_eq!(rep.summary.sources_added, 3);
    assert!(rep.rejects.is_empty(), "{:?}", rep.rejects);
    let ds = Dataset::open(&out).unwrap();
    // cls values become class names "0", "1", "2", in numeric order, as IDX labels do.
    assert_eq!(ds.manifest().classes, ["0", "1", "2"]);
    let counts = per_class(&out);
    assert_eq!(counts[&Some("0".to_owned())], 6);
    assert_eq!(counts[&Some("2".to_owned())], 3);
    // Records keep tar order; `item` is the sample's position in its shard.
    let items: Vec<u32> = ds.live_records().map(|r| ds.meta(r).item).collect();
    assert_eq!(items, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
    // The pixels are the PNG's.
    let mut px = Vec::new();
    let r = ds.live_records().nth(6).unwrap();
    ds.read_rgb(r, &mut Default::default(), &mut px).unwrap();
    assert_eq!(px, common::pattern(12, 10, 101).into_raw());

    // Again: nothing new. A pattern naming a missing shard is an error naming it, and
    // changes nothing.
    let again = ingest(&opts(vec![pattern], &out), &NoProgress).unwrap();
    assert_eq!(
        (again.summary.ingested, again.summary.already_present),
        (0, 3)
    );
    let gen_before = Dataset::open(&out).unwrap().manifest().generation;
    let err = ingest(
        &opts(vec![src.join("data-{000000..000004}.tar")], &out),
        &NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("2 of the 5")
            && err.contains("data-000003.tar")
            && err.contains("data-000004.tar"),
        "{err}"
    );
    assert_eq!(
        Dataset::open(&out).unwrap().manifest().generation,
        gen_before
    );
}

#[test]
fn a_folder_of_plain_and_gzipped_shards_and_json_labels() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("wds");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.tar"), tar_of(&shard("a", 4, 2, 1))).unwrap();
    std::fs::write(src.join("b.tar.gz"), gzip(&tar_of(&shard("b", 3, 2, 2)))).unwrap();
    // json labels (a string, an integer, missing) and a jpeg preferred over a png.
    let json = tar_of(&[
        ("c0.jpg".into(), common::jpeg(16, 16, 5)),
        ("c0.png".into(), common::png(8, 8, 6)),
        ("c0.json".into(), br#"{"label":"cat","y":4}"#.to_vec()),
        ("c1.webp".into(), {
            let img = image::DynamicImage::ImageRgb8(common::pattern(9, 9, 7));
            common::encode(&img, image::ImageFormat::WebP)
        }),
        ("c1.json".into(), br#"{"y":4}"#.to_vec()),
        ("c2.ppm".into(), {
            let mut p = b"P6\n3 2\n255\n".to_vec();
            p.extend((0..18).map(|i| i as u8 * 10));
            p
        }),
    ]);
    std::fs::write(src.join("c.tgz"), gzip(&json)).unwrap();
    std::fs::write(src.join("README.txt"), b"shards of a dataset").unwrap();
    let out = dir.path().join("ds");
    let rep = ingest(&opts(vec![src.clone()], &out), &NoProgress).unwrap();
    assert_eq!(rep.summary.ingested, 10, "{:?}", rep.rejects);
    assert_eq!(rep.summary.roots[0].layout, Layout::Flat);
    let counts = per_class(&out);
    assert_eq!(counts[&Some("cat".to_owned())], 1);
    assert_eq!(counts[&None], 2, "{counts:?}");
    let ds = Dataset::open(&out).unwrap();
    let sizes: Vec<(u32, u32)> = ds
        .live_records()
        .skip(7)
        .take(3)
        .map(|r| (ds.meta(r).width, ds.meta(r).height))
        .collect();
    assert_eq!(
        sizes,
        [(16, 16), (9, 9), (3, 2)],
        "jpg before png; webp; ppm"
    );

    // Another json field is another content: every shard is read again, the labels
    // are the field's.
    let mut o = opts(vec![src], &out);
    o.json_label = "y".into();
    let rep = ingest(&o, &NoProgress).unwrap();
    assert_eq!(rep.summary.sources_added, 3);
    let counts = per_class(&out);
    assert_eq!(counts[&Some("4".to_owned())], 2, "{counts:?}");
    assert!(!counts.contains_key(&Some("cat".to_owned())));
    assert_eq!(live(&out), 10);
}

#[test]
fn reingest_adds_new_and_changed_shards_and_retires_vanished_ones() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("wds");
    std::fs::create_dir_all(&src).unwrap();
    for s in 0..3 {
        std::fs::write(
            src.join(format!("{s}.tar")),
            tar_of(&shard(&format!("k{s}-"), 4, 4, s)),
        )
        .unwrap();
    }
    let out = dir.path().join("ds");
    ingest(&opts(vec![src.clone()], &out), &NoProgress).unwrap();
    assert_eq!(live(&out), 12);

    // One shard gone, one rewritten with 6 samples, one new, one untouched.
    std::fs::remove_file(src.join("0.tar")).unwrap();
    std::fs::write(src.join("1.tar"), tar_of(&shard("k1-", 6, 4, 9))).unwrap();
    std::fs::write(src.join("3.tar"), tar_of(&shard("k3-", 2, 4, 3))).unwrap();
    let rep = ingest(&opts(vec![src.clone()], &out), &NoProgress).unwrap();
    let s = &rep.summary;
    assert_eq!((s.ingested, s.already_present, s.sources_added), (8, 1, 2));
    assert_eq!((s.retired, s.sources_retired), (8, 2), "{:?}", rep.changes);
    assert_eq!(live(&out), 4 + 6 + 2);

    // A copy of a shard under another name is stored once; removing the original then
    // retires nothing.
    std::fs::copy(src.join("3.tar"), src.join("copy.tar")).unwrap();
    let rep = ingest(&opts(vec![src.clone()], &out), &NoProgress).unwrap();
    assert_eq!((rep.summary.duplicates, rep.summary.ingested), (1, 0));
    std::fs::remove_file(src.join("3.tar")).unwrap();
    let rep = ingest(&opts(vec![src.clone()], &out), &NoProgress).unwrap();
    assert_eq!((rep.summary.retired, rep.summary.sources_removed), (0, 1));
    assert_eq!(live(&out), 12);
}

#[test]
fn damaged_shards_keep_the_samples_before_the_damage() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("wds");
    std::fs::create_dir_all(&src).unwrap();
    let good = tar_of(&shard("g", 6, 2, 1));
    // Cut in the middle of sample 3's png: samples 0..3 kept.
    let members = shard("t", 6, 2, 2);
    let whole = tar_of(&members);
    let before: usize = members[..6]
        .iter()
        .map(|(_, d)| 512 + d.len().div_ceil(512) * 512)
        .sum();
    std::fs::write(src.join("truncated.tar"), &whole[..before + 512 + 40]).unwrap();
    // A corrupt header checksum at sample 4's png: samples 0..3 kept (sample 3 was
    // being read when the damage was met: its members may go on past it).
    let mut bad = tar_of(&shard("h", 6, 2, 3));
    let at: usize = shard("h", 6, 2, 3)[..8]
        .iter()
        .map(|(_, d)| 512 + d.len().div_ceil(512) * 512)
        .sum();
    bad[at + 10] ^= 0xff;
    std::fs::write(src.join("checksum.tar"), &bad).unwrap();
    // Garbage in one image, a sample with no image, a cls that is no number.
    let mut mixed = shard("m", 4, 2, 4);
    mixed[2].1 = b"\x89PNG\r\n\x1a\n this is not a png".to_vec();
    mixed.push(("m9.cls".into(), b"1".to_vec()));
    mixed.push(("m9.txt".into(), b"caption".to_vec()));
    mixed.push(("m10.png".into(), common::png(8, 8, 1)));
    mixed.push(("m10.cls".into(), b"one".to_vec()));
    std::fs::write(src.join("mixed.tar"), tar_of(&mixed)).unwrap();
    // Truncated gzip.
    let gz = gzip(&tar_of(&shard("z", 6, 2, 5)));
    std::fs::write(src.join("cut.tar.gz"), &gz[..gz.len() * 2 / 3]).unwrap();
    // Not a tar at all.
    std::fs::write(src.join("junk.tar"), vec![7u8; 3000]).unwrap();
    std::fs::write(src.join("good.tar"), &good).unwrap();
    // An empty archive: two zero blocks.
    std::fs::write(src.join("empty.tar"), vec![0u8; 1024]).unwrap();

    let out = dir.path().join("ds");
    let rep = ingest(&opts(vec![src.clone()], &out), &NoProgress).unwrap();
    let by_file = |name: &str| {
        rep.rejects
            .iter()
            .filter(|r| r.path.file_name().unwrap() == name)
            .map(|r| (r.reason, r.member.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        by_file("truncated.tar"),
        [(RejectReason::DamagedTar, Some("t0003".into()))]
    );
    assert_eq!(
        by_file("checksum.tar"),
        [(RejectReason::DamagedTar, Some("h0003".into()))]
    );
    assert_eq!(
        by_file("mixed.tar"),
        [
            (RejectReason::Corrupt, Some("m0001".into())),
            (RejectReason::InvalidSample, Some("m9".into())),
            (RejectReason::InvalidSample, Some("m10".into())),
        ]
    );
    let cut = by_file("cut.tar.gz");
    assert_eq!(cut.len(), 1);
    assert_eq!(cut[0].0, RejectReason::DamagedTar);
    assert_eq!(
        by_file("junk.tar"),
        [(RejectReason::DamagedTar, None)],
        "{:?}",
        rep.rejects
    );
    assert_eq!(by_file("empty.tar"), [(RejectReason::DamagedTar, None)]);
    // The sample-less one names its members; the damage says what was kept.
    let detail = |name: &str| {
        rep.rejects
            .iter()
            .find(|r| r.path.file_name().unwrap() == name)
            .unwrap()
            .detail
            .clone()
    };
    assert!(detail("truncated.tar").contains("3 sample(s) before kept"));
    assert!(detail("checksum.tar").contains("checksum"));
    let kept_gz = rep.summary.ingested - (3 + 3 + 3 + 6);
    assert!(kept_gz < 6, "{kept_gz}");
    assert_eq!(live(&out) as u64, rep.summary.ingested);
    // The damaged shards are sources with what they kept; the junk is not.
    let ds = Dataset::open(&out).unwrap();
    let names: Vec<String> = ds
        .manifest()
        .sources
        .iter()
        .map(|s| {
            Path::new(&s.path)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert!(names.contains(&"truncated.tar".to_owned()) && !names.contains(&"junk.tar".to_owned()));

    // The copy completed: the shard is read again, all 6 samples, the 3 old retired.
    std::fs::write(src.join("truncated.tar"), &whole).unwrap();
    let rep = ingest(&opts(vec![src], &out), &NoProgress).unwrap();
    assert_eq!(rep.summary.ingested, 6);
    assert_eq!(rep.summary.retired, 3);
}

#[test]
fn a_shard_in_a_class_folder_labels_the_samples_that_carry_none() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("classes");
    std::fs::create_dir_all(src.join("cat")).unwrap();
    std::fs::create_dir_all(src.join("dog")).unwrap();
    std::fs::write(src.join("dog/d.png"), common::png(8, 8, 1)).unwrap();
    let t = tar_of(&[
        ("a.png".into(), common::png(8, 8, 2)),
        ("b.png".into(), common::png(8, 8, 3)),
        ("b.cls".into(), b"7".to_vec()),
    ]);
    std::fs::write(src.join("cat/shard.tar"), &t).unwrap();
    let out = dir.path().join("ds");
    let rep = ingest(&opts(vec![src.clone()], &out), &NoProgress).unwrap();
    assert_eq!(rep.summary.roots[0].layout, Layout::ImageFolder);
    let counts = per_class(&out);
    assert_eq!(
        counts,
        BTreeMap::from([
            (Some("cat".to_owned()), 1),
            (Some("dog".to_owned()), 1),
            (Some("7".to_owned()), 1)
        ])
    );
    // Moved to the dog folder: relabelled, nothing rewritten.
    std::fs::rename(src.join("cat/shard.tar"), src.join("dog/shard.tar")).unwrap();
    let rep = ingest(&opts(vec![src], &out), &NoProgress).unwrap();
    assert_eq!((rep.summary.ingested, rep.summary.relabelled), (0, 1));
    let counts = per_class(&out);
    assert_eq!(counts[&Some("dog".to_owned())], 2);
    assert_eq!(counts[&Some("7".to_owned())], 1);
}

#[test]
fn the_follower_settles_a_shard_being_copied_and_retires_a_removed_one() {
    let dir = tempfile::tempdir().unwrap();
    let (watch, data) = (dir.path().join("in"), dir.path().join("data"));
    std::fs::create_dir_all(&watch).unwrap();
    std::fs::write(watch.join("000.tar"), tar_of(&shard("a", 4, 2, 1))).unwrap();
    let roots = vec![(watch.clone(), Layout::Auto)];
    let options = IngesterOptions::default();
    let mut follower = Follower::open(&data, &roots, options.clone()).unwrap();
    follower.scan_all().unwrap();
    assert_eq!(live(&data), 4);
    let settle = Duration::from_secs(1);
    let reopen = Reopen {
        data: data.clone(),
        roots,
        options,
    };
    let mut ingest = IngestLoop::new(follower, reopen, settle, Duration::from_secs(10), None);
    let t0 = Instant::now();

    // A shard arrives in two writes; it is taken only once it stops changing.
    let next = tar_of(&shard("b", 5, 2, 2));
    let path = watch.join("001.tar");
    std::fs::write(&path, &next[..next.len() / 2]).unwrap();
    ingest.note(path.clone(), false, t0);
    assert!(ingest.tick(t0).is_empty());
    assert!(ingest.tick(t0 + settle / 2).is_empty());
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&next[next.len() / 2..])
        .unwrap();
    assert!(
        ingest.tick(t0 + settle + settle / 4).is_empty(),
        "it changed"
    );
    match ingest.tick(t0 + 3 * settle).as_slice() {
        [
            IngestEvent::Batch {
                report,
                live_records: 9,
                ..
            },
        ] => {
            assert_eq!(report.summary.ingested, 5);
            assert!(report.rejects.is_empty(), "{:?}", report.rejects);
        }
        other => panic!("{other:?}"),
    }

    // A shard removed: its records retired.
    std::fs::remove_file(watch.join("000.tar")).unwrap();
    let t1 = t0 + 5 * settle;
    ingest.note(watch.join("000.tar"), false, t1);
    match ingest.tick(t1).as_slice() {
        [
            IngestEvent::Batch {
                report,
                live_records: 5,
                ..
            },
        ] => {
            assert_eq!(report.summary.retired, 4)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_long_shard_is_read_in_batches_and_a_late_cut_keeps_the_batches_before() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("wds");
    std::fs::create_dir_all(&src).unwrap();
    let members: Vec<(String, Vec<u8>)> = (0..700u32)
        .flat_map(|i| {
            [
                (format!("{i:05}.png"), common::png(4, 4, i)),
                (
                    format!("{i:05}.cls"),
                    ((i * 7) % 12).to_string().into_bytes(),
                ),
            ]
        })
        .collect();
    let whole = tar_of(&members);
    // Cut inside sample 600's png (its header is whole).
    let at: usize = members[..1200]
        .iter()
        .map(|(_, d)| 512 + d.len().div_ceil(512) * 512)
        .sum();
    std::fs::write(src.join("long.tar"), &whole[..at + 512 + 10]).unwrap();
    let out = dir.path().join("ds");
    let rep = ingest(&opts(vec![src], &out), &NoProgress).unwrap();
    assert_eq!(rep.summary.ingested, 600);
    assert_eq!(rep.rejects.len(), 1);
    assert_eq!(rep.rejects[0].member.as_deref(), Some("00600"));
    let ds = Dataset::open(&out).unwrap();
    // Numeric class names in numeric order, whatever order the samples came in.
    let want: Vec<String> = (0..12).map(|v| v.to_string()).collect();
    assert_eq!(ds.manifest().classes, want);
    let labels: Vec<Option<u32>> = ds.samples().map(|s| s.label).collect();
    let expected: Vec<Option<u32>> = (0..600u32).map(|i| Some((i * 7) % 12)).collect();
    assert_eq!(labels, expected);
}
