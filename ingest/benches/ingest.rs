//! Ingest throughput beside decode-only throughput and, when `BYOL_PEER_PYTHON` names a
//! Python with Pillow, beside the Pillow peer (`../shared/bench/peer_ingest.py`, with
//! and without `draft`), interleaved in the same run; the pixel difference of the
//! scaled-IDCT path against the full decode; and the wallpaper folders as installed
//! (with their duplicates).
//!
//! ```text
//! cargo bench -p byol-ingest --bench ingest              # Debian wallpapers + Fashion-MNIST
//! cargo bench -p byol-ingest --bench ingest -- DIR...    # your own folders
//! cargo bench -p byol-ingest --bench ingest -- --jpeg-only   # the wallpapers' JPEGs only
//! BYOL_PEER_PYTHON=/opt/torch-venv/bin/python cargo bench -p byol-ingest --bench ingest
//! scripts/make_wds_fmnist.py /tmp/wds && \
//!   cargo bench -p byol-ingest --bench ingest -- --wds /tmp/wds   # WebDataset vs IDX
//! ```
//! Wallpapers: `apt-get install -y mate-backgrounds plasma-workspace-wallpapers`;
//! Fashion-MNIST: `apt-get install -y dataset-fashion-mnist`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use byol_ingest::decode::{DecodeLimits, decode_for_ingest, decode_rgb8, resize_to, target_size};
use byol_ingest::{IngestOptions, NoProgress, ingest};
use rayon::prelude::*;

const WALLPAPERS: [&str; 2] = ["/usr/share/backgrounds", "/usr/share/wallpapers"];
const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

fn image_files(dirs: &[PathBuf], jpeg_only: bool) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| {
            walkdir::WalkDir::new(d)
                .follow_links(true)
                .sort_by_file_name()
        })
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        // Absolute paths: the staging folder links to them.
        .filter_map(|e| std::fs::canonicalize(e.path()).ok())
        .collect();
    files.sort();
    // Distinct content only (wallpaper packages link one picture under several names),
    // and only what decodes, so both sides do the same work per file.
    let mut seen = std::collections::HashSet::new();
    files.retain(|p| {
        std::fs::read(p).is_ok_and(|b| {
            (!jpeg_only || b.starts_with(&[0xFF, 0xD8, 0xFF]))
                && seen.insert(blake3::hash(&b))
                && decode_rgb8(&b, &DecodeLimits::default()).is_ok()
        })
    });
    files
}

/// Reads and decodes every file with `threads` threads; returns images/s.
fn decode_only(files: &[PathBuf], threads: usize) -> f64 {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let start = Instant::now();
    let pixels: u64 = pool.install(|| {
        files
            .par_iter()
            .map(|p| {
                let bytes = std::fs::read(p).unwrap();
                let img = decode_rgb8(&bytes, &DecodeLimits::default()).unwrap().image;
                u64::from(img.width()) * u64::from(img.height())
            })
            .sum()
    });
    assert!(pixels > 0);
    files.len() as f64 / start.elapsed().as_secs_f64()
}

/// Ingests `sources` into a fresh dataset with `threads` threads; returns (images/s, summary).
fn ingest_once(
    sources: &[PathBuf],
    threads: usize,
    max_side: Option<u32>,
) -> (f64, byol_ingest::IngestSummary) {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = IngestOptions::new(sources.to_vec(), dir.path().join("ds"));
    opts.threads = threads;
    opts.settings.max_side = max_side;
    let start = Instant::now();
    let report = ingest(&opts, &NoProgress).unwrap();
    let secs = start.elapsed().as_secs_f64();
    (report.summary.ingested as f64 / secs, report.summary)
}

/// Milliseconds per image of each ingest stage, one thread.
fn stages(files: &[PathBuf]) {
    let (mut read, mut hash, mut decode, mut resize, mut compress) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    for f in files {
        let t = Instant::now();
        let bytes = std::fs::read(f).unwrap();
        read += ms(t);
        let t = Instant::now();
        std::hint::black_box(blake3::hash(&bytes));
        hash += ms(t);
        let t = Instant::now();
        let d = decode_for_ingest(&bytes, &DecodeLimits::default(), Some(256)).unwrap();
        decode += ms(t);
        let t = Instant::now();
        let (w, h) = d.full_size;
        let img = resize_to(d.image, target_size(w, h, Some(256)));
        resize += ms(t);
        let t = Instant::now();
        std::hint::black_box(zstd::bulk::compress(img.as_raw(), 3).unwrap());
        compress += ms(t);
    }
    let n = files.len() as f64;
    println!(
        "ms per image, 1 thread: read {:.1}, hash {:.1}, decode (scaled where it can) {:.1}, resize {:.1}, compress {:.1}",
        read / n,
        hash / n,
        decode / n,
        resize / n,
        compress / n
    );
}

/// Repeats per measurement (BYOL_BENCH_REPEATS, default 3); the median is reported.
fn repeats() -> usize {
    std::env::var("BYOL_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Mean and max absolute difference, over every JPEG that takes the scaled path, of the
/// stored image (short side 256) from the scaled IDCT and from the full decode.
fn scaled_vs_full(files: &[PathBuf]) {
    let limits = DecodeLimits::default();
    let (mut sum, mut count, mut max, mut images) = (0f64, 0u64, 0u8, 0);
    for f in files {
        let bytes = std::fs::read(f).unwrap();
        let scaled = decode_for_ingest(&bytes, &limits, Some(256)).unwrap();
        if !scaled.scaled {
            continue;
        }
        let (w, h) = scaled.full_size;
        let target = target_size(w, h, Some(256));
        let a = resize_to(scaled.image, target);
        let b = resize_to(decode_rgb8(&bytes, &limits).unwrap().image, target);
        for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
            let d = x.abs_diff(*y);
            sum += f64::from(d);
            max = max.max(d);
        }
        count += a.as_raw().len() as u64;
        images += 1;
    }
    if images > 0 {
        println!(
            "scaled IDCT vs full decode, stored at 256 px, {images} JPEGs: mean |diff| {:.2} levels, max {max}",
            sum / count as f64
        );
    }
}

/// Runs the Pillow peer on `dir` with `procs` processes; (no-draft, draft) images/s.
fn peer(dir: &Path, procs: usize) -> Option<(f64, f64)> {
    let python = std::env::var("BYOL_PEER_PYTHON").ok()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/peer_ingest.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(dir)
        .args(["--procs", &procs.to_string(), "--max-side", "256"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |draft: bool| {
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["draft"] == draft)
    };
    let (plain, draft) = (line(false)?, line(true)?);
    let files = std::fs::read_dir(dir).ok()?.count() as u64;
    assert_eq!(
        draft["images"].as_u64(),
        Some(files),
        "the peer saw other files"
    );
    Some((plain["img_per_s"].as_f64()?, draft["img_per_s"].as_f64()?))
}

/// The folders as installed (duplicates included), ingested at one thread.
fn as_installed(dirs: &[PathBuf]) {
    let dirs: Vec<PathBuf> = dirs.iter().filter(|d| d.exists()).cloned().collect();
    if dirs.is_empty() {
        return;
    }
    let (_, s) = ingest_once(&dirs, 1, Some(256));
    println!(
        "as installed, 1 thread: {} files ({} duplicates, {} rejected) in {:.2} s",
        s.files_seen,
        s.duplicates,
        s.rejected_total(),
        s.seconds
    );
}

fn photos(dirs: &[PathBuf], jpeg_only: bool) {
    // Only the decodable images, linked into one folder, so both sides see the same files.
    let files = image_files(dirs, jpeg_only);
    if files.is_empty() {
        println!("no images under {dirs:?}; skipped");
        return;
    }
    let staging = tempfile::tempdir().unwrap();
    for (i, f) in files.iter().enumerate() {
        // The extension is kept: the peer picks files by it.
        let ext = f
            .extension()
            .map_or(String::new(), |e| format!(".{}", e.to_string_lossy()));
        std::os::unix::fs::symlink(f, staging.path().join(format!("{i:05}{ext}"))).unwrap();
    }
    let src_bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    println!(
        "photos{}: {} files, {:.1} MiB encoded",
        if jpeg_only { " (JPEGs only)" } else { "" },
        files.len(),
        src_bytes as f64 / (1 << 20) as f64
    );
    stages(&files);
    scaled_vs_full(&files);
    println!(
        "| threads | full decode img/s | ingest img/s (max side 256) | ingest / decode | Pillow img/s | Pillow draft img/s | ingest / Pillow draft |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut rates = Vec::new();
    let mut last = None;
    for threads in [1, 2] {
        let mut dec = Vec::new();
        let mut ing = Vec::new();
        let (mut pil, mut draft) = (Vec::new(), Vec::new());
        // Interleaved repeats: every side sees the same machine noise.
        for _ in 0..repeats() {
            dec.push(decode_only(&files, threads));
            let (rate, summary) = ingest_once(&[staging.path().to_owned()], threads, Some(256));
            ing.push(rate);
            last = Some(summary);
            if let Some((p, d)) = peer(staging.path(), threads) {
                pil.push(p);
                draft.push(d);
            }
        }
        let s = last.as_ref().unwrap();
        assert_eq!(
            s.ingested,
            files.len() as u64,
            "every file is ingested once: {s:?}"
        );
        let (d, i) = (median(dec), median(ing));
        let (p, dr) = if pil.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            (median(pil), median(draft))
        };
        println!(
            "| {threads} | {d:.2} | {i:.2} | {:.2} | {p:.2} | {dr:.2} | {:.2} |",
            i / d,
            i / dr
        );
        rates.push((d, i));
    }
    println!(
        "2 threads / 1 thread: decode {:.2}x, ingest {:.2}x",
        rates[1].0 / rates[0].0,
        rates[1].1 / rates[0].1
    );
    let s = last.unwrap();
    println!(
        "stored {:.2} MiB vs raw RGB after resize {:.2} MiB ({:.2}x) vs encoded sources {:.1} MiB",
        s.bytes_stored as f64 / (1 << 20) as f64,
        s.bytes_raw as f64 / (1 << 20) as f64,
        s.bytes_raw as f64 / s.bytes_stored as f64,
        src_bytes as f64 / (1 << 20) as f64
    );
}

fn fashion_mnist() {
    let dir = Path::new(FASHION_MNIST);
    let splits = [
        dir.join("train-images-idx3-ubyte.gz"),
        dir.join("t10k-images-idx3-ubyte.gz"),
    ];
    if !splits.iter().all(|p| p.exists()) {
        println!("Fashion-MNIST not installed; skipped");
        return;
    }
    println!("Fashion-MNIST, train and test split, 70,000 images:");
    println!("| threads | seconds | img/s | stored MiB | raw MiB | ratio |");
    println!("|---|---|---|---|---|---|");
    for threads in [1, 2] {
        let mut secs = Vec::new();
        let mut stored = (0, 0);
        for _ in 0..repeats() {
            let start = Instant::now();
            let mut s = (0, 0);
            for split in &splits {
                let (_, summary) = ingest_once(std::slice::from_ref(split), threads, None);
                s.0 += summary.bytes_stored;
                s.1 += summary.bytes_raw;
            }
            secs.push(start.elapsed().as_secs_f64());
            stored = s;
        }
        let t = median(secs);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "| {threads} | {t:.2} | {:.0} | {:.1} | {:.1} | {:.2}x |",
            70_000.0 / t,
            mib(stored.0),
            mib(stored.1),
            stored.1 as f64 / stored.0 as f64
        );
    }
}

/// Fashion-MNIST's training set from IDX against its WebDataset copy in `wds` (six
/// shards `fmnist-{000000..000005}.tar` of PNG + cls, `scripts/make_wds_fmnist.py`).
fn webdataset_vs_idx(wds: &Path) {
    let idx = Path::new(FASHION_MNIST).join("train-images-idx3-ubyte.gz");
    let shards = wds.join("fmnist-{000000..000005}.tar");
    let source_mib = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .sum::<u64>() as f64
            / (1 << 20) as f64
    };
    let wds_files = byol_ingest::webdataset::expand_source(&shards).expect("the six shards");
    println!("Fashion-MNIST train (60,000 images): IDX against WebDataset shards");
    println!("| source | source MiB | threads | seconds | img/s | stored MiB | records |");
    println!("|---|---|---|---|---|---|---|");
    for threads in [1, 2] {
        for (name, src, mib) in [
            ("IDX", idx.clone(), source_mib(std::slice::from_ref(&idx))),
            ("WebDataset", shards.clone(), source_mib(&wds_files)),
        ] {
            let mut secs = Vec::new();
            let mut last = None;
            for _ in 0..repeats() {
                let (rate, summary) = ingest_once(std::slice::from_ref(&src), threads, Some(256));
                secs.push(summary.ingested as f64 / rate);
                last = Some(summary);
            }
            let s = last.unwrap();
            let t = median(secs);
            println!(
                "| {name} | {mib:.1} | {threads} | {t:.2} | {:.0} | {:.2} | {} |",
                s.ingested as f64 / t,
                s.bytes_stored as f64 / (1 << 20) as f64,
                s.ingested
            );
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = argv.iter().position(|a| a == "--wds") {
        let dir = argv.get(i + 1).expect("--wds DIR");
        webdataset_vs_idx(Path::new(dir));
        return;
    }
    let args: Vec<PathBuf> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .collect();
    let jpeg_only = std::env::args().any(|a| a == "--jpeg-only");
    if args.is_empty() {
        photos(&WALLPAPERS.map(PathBuf::from), true);
        if !jpeg_only {
            photos(&WALLPAPERS.map(PathBuf::from), false);
            as_installed(&WALLPAPERS.map(PathBuf::from));
            fashion_mnist();
        }
    } else {
        photos(&args, jpeg_only);
    }
}
