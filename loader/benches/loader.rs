//! Loader throughput: shards → ready two-view batches, beside augment-only throughput
//! on already-decoded images, 1 and 2 threads, in one run; and resident memory over
//! 10 epochs.
//!
//! ```text
//! cargo bench -p byol-loader --bench loader                 # photos256 at 224 (raw zstd, raw uncompressed, JPEG shards), Fashion-MNIST at 32
//! BYOL_BENCH_BATCHES=40 cargo bench -p byol-loader --bench loader
//! ```
//! The peers (PyTorch DataLoader, 2 workers, batch 64, same images), in the same session:
//! `python3 ../shared/bench/peer_torchvision_aug.py --images ../shared/data/photos256 \
//!  --mode loader --workers 2 --size 224 --api albu` (and `--api classic`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use byol_augment::{AugmentConfig, Augmenter, SampleKey, Scratch, ViewOut};
use byol_ingest::{Codec, Compression, Dataset, IngestOptions, NoProgress, RecordScratch, ingest};
use byol_loader::{Loader, LoaderConfig};
use rayon::prelude::*;

const BATCH: usize = 64;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pack(src: &Path, dir: &Path, codec: Codec, compression: Compression) -> PathBuf {
    let out = dir.join(format!("ds-{codec}-{compression}"));
    let mut o = IngestOptions::new(vec![src.to_owned()], out.clone());
    o.settings.max_side = Some(0);
    o.settings.codec = Some(codec);
    o.settings.compression = Some(compression);
    let rep = ingest(&o, &NoProgress).unwrap();
    assert!(
        rep.summary.ingested > 0,
        "nothing ingested from {}",
        src.display()
    );
    out
}

/// Two views per image from RGB already in memory; images/s.
fn augment_only(
    images: &[(Vec<u8>, u32, u32)],
    aug: &Augmenter,
    threads: usize,
    rounds: usize,
) -> f64 {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let n = images.len() * rounds;
    let start = Instant::now();
    pool.install(|| {
        (0..n).into_par_iter().for_each_init(
            || {
                (
                    Scratch::new(),
                    vec![0f32; aug.view_len()],
                    vec![0f32; aug.view_len()],
                )
            },
            |(s, a, b), i| {
                let (rgb, w, h) = &images[i % images.len()];
                aug.two_views(
                    rgb,
                    *w,
                    *h,
                    SampleKey::new(1, 0, i as u64),
                    s,
                    [ViewOut::f32(a), ViewOut::f32(b)],
                )
                .unwrap();
            },
        )
    });
    n as f64 / start.elapsed().as_secs_f64()
}

/// Batches through the loader after a warm-up; images/s and the consumer's wait share.
fn through_loader(ds: &Path, aug: &Augmenter, threads: usize, batches: usize) -> (f64, f64) {
    let cfg = LoaderConfig {
        batch_size: BATCH,
        threads,
        seed: 1,
        ..LoaderConfig::default()
    };
    let mut loader = Loader::new(Dataset::open(ds).unwrap(), aug.clone(), cfg, None).unwrap();
    for _ in 0..3 {
        drop(loader.next_batch());
    }
    let wait0 = loader.stats().wait_secs;
    let start = Instant::now();
    let mut sum = 0f32;
    for _ in 0..batches {
        let b = loader.next_batch();
        sum += b.view1()[0] + b.view2()[b.view2().len() - 1];
    }
    std::hint::black_box(sum);
    let secs = start.elapsed().as_secs_f64();
    (
        (batches * BATCH) as f64 / secs,
        (loader.stats().wait_secs - wait0) / secs,
    )
}

fn decoded(ds: &Path) -> Vec<(Vec<u8>, u32, u32)> {
    let ds = Dataset::open(ds).unwrap();
    let mut scratch = RecordScratch::default();
    ds.live_records()
        .take(512)
        .map(|r| {
            let mut buf = Vec::new();
            let m = ds.read_rgb(r, &mut scratch, &mut buf).unwrap();
            (buf, m.width, m.height)
        })
        .collect()
}

fn report(name: &str, ds: &Path, aug: &Augmenter) {
    let batches = env_usize("BYOL_BENCH_BATCHES", 20);
    let images = decoded(ds);
    let rounds = (batches * BATCH).div_ceil(images.len()).max(1);
    println!("{name}: batch {BATCH}, {batches} timed batches");
    println!(
        "| threads | augment-only img/s | loader img/s | loader / augment-only | consumer waiting |"
    );
    println!("|---|---|---|---|---|");
    let mut loader_rates = Vec::new();
    for threads in [1, 2] {
        let a = augment_only(&images, aug, threads, rounds);
        let (l, wait) = through_loader(ds, aug, threads, batches);
        println!(
            "| {threads} | {a:.0} | {l:.0} | {:.2} | {:.0}% |",
            l / a,
            wait * 100.0
        );
        loader_rates.push(l);
    }
    println!(
        "loader 2 threads / 1 thread: {:.2}x",
        loader_rates[1] / loader_rates[0]
    );
}

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1 << 20) as f64
}

fn memory_over_epochs(ds: &Path, aug: &Augmenter) {
    let cfg = LoaderConfig {
        batch_size: BATCH,
        threads: 2,
        ..LoaderConfig::default()
    };
    let mut loader = Loader::new(Dataset::open(ds).unwrap(), aug.clone(), cfg, None).unwrap();
    let per_epoch = loader.batches_per_epoch();
    let mut rss = Vec::new();
    for _ in 0..10 {
        for _ in 0..per_epoch {
            drop(loader.next_batch());
        }
        rss.push(rss_mib());
    }
    let shown: Vec<String> = rss.iter().map(|r| format!("{r:.0}")).collect();
    println!(
        "resident MiB after each of 10 epochs ({per_epoch} batches each): {}",
        shown.join(", ")
    );
}

fn main() {
    let photos = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/photos256");
    if photos.exists() {
        let dir = tempfile::tempdir().unwrap();
        let aug = Augmenter::new(AugmentConfig::byol(224)).unwrap();
        for (codec, compression) in [
            (Codec::RawRgb8, Compression::Zstd),
            (Codec::RawRgb8, Compression::None),
            (Codec::Encoded, Compression::None),
        ] {
            let ds = pack(&photos, dir.path(), codec, compression);
            let name =
                format!("photos256 (256 px, codec {codec}, compression {compression}) -> 224");
            report(&name, &ds, &aug);
        }
    } else {
        println!("{} missing; skipped", photos.display());
    }
    let fmnist = Path::new("/usr/share/datasets/fashion-mnist");
    if fmnist.exists() {
        let dir = tempfile::tempdir().unwrap();
        let aug = Augmenter::new(AugmentConfig::byol(32)).unwrap();
        for compression in [Compression::Zstd, Compression::None] {
            let train = pack(
                &fmnist.join("train-images-idx3-ubyte.gz"),
                dir.path(),
                Codec::RawRgb8,
                compression,
            );
            let name =
                format!("Fashion-MNIST train (28 px, compression {compression}) -> 32, blur on");
            report(&name, &train, &aug);
        }
        let dir = tempfile::tempdir().unwrap();
        let test = pack(
            &fmnist.join("t10k-images-idx3-ubyte.gz"),
            dir.path(),
            Codec::RawRgb8,
            Compression::Zstd,
        );
        memory_over_epochs(&test, &aug);
    } else {
        println!("Fashion-MNIST not installed; skipped");
    }
}
