//! Two-view throughput, decode included (as in ../shared/bench/peer_torchvision_aug.py),
//! with the loader's decoder (`byol_ingest::decode::decode_rgb8_into`).
//!
//! `cargo bench -p byol-augment --bench two_views [-- --reps 3 --only 224]`
//!
//! Workloads (the peer's `--mode single` sets): the first 200 photos256 JPEGs at 224, the
//! first 400 at 96, the first 1000 Fashion-MNIST images (28x28 gray -> RGB) at 32. Both
//! views per image, official BYOL specs (T blurs with p = 1, T' with p = 0.1, at every
//! size, like the peer), f32 CHW normalised output. Threads: 1 and 2 (rayon); img/s per
//! core = img/s / threads. Median of `--reps` timed passes after one warm-up pass.

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use byol_augment::{AugmentConfig, Augmenter, SampleKey, Scratch, ViewOut};
use byol_ingest::decode::{DecodeLimits, decode_rgb8_into};
use rayon::prelude::*;

const PHOTOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/photos256");
const FMNIST: &str = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz";

enum Source {
    Jpeg(Vec<Vec<u8>>),
    Gray28(Vec<Vec<u8>>),
}

impl Source {
    fn len(&self) -> usize {
        match self {
            Source::Jpeg(v) | Source::Gray28(v) => v.len(),
        }
    }
}

/// Per-thread state: decoded pixels, outputs and the augment scratch, all reused.
struct Worker {
    rgb: Vec<u8>,
    v1: Vec<f32>,
    v2: Vec<f32>,
    scratch: Scratch,
}

impl Worker {
    fn new(aug: &Augmenter) -> Self {
        Self {
            rgb: Vec::new(),
            v1: vec![0.0; aug.view_len()],
            v2: vec![0.0; aug.view_len()],
            scratch: Scratch::new(),
        }
    }

    /// Decodes item `i` into `self.rgb`; returns (width, height).
    fn decode(&mut self, src: &Source, i: usize) -> (u32, u32) {
        match src {
            Source::Jpeg(files) => {
                decode_rgb8_into(&files[i], &DecodeLimits::default(), &mut self.rgb)
                    .expect("jpeg decode")
            }
            Source::Gray28(imgs) => {
                self.rgb.clear();
                self.rgb.extend(imgs[i].iter().flat_map(|&g| [g, g, g]));
                (28, 28)
            }
        }
    }

    fn one(&mut self, aug: &Augmenter, src: &Source, i: usize) {
        let (w, h) = self.decode(src, i);
        let key = SampleKey::new(0, 0, i as u64);
        aug.two_views(
            &self.rgb,
            w,
            h,
            key,
            &mut self.scratch,
            [ViewOut::f32(&mut self.v1), ViewOut::f32(&mut self.v2)],
        )
        .expect("augment");
    }
}

fn load_photos(n: usize) -> Vec<Vec<u8>> {
    let mut names: Vec<_> = std::fs::read_dir(PHOTOS)
        .unwrap_or_else(|e| panic!("{PHOTOS}: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("jpg")))
        .collect();
    names.sort();
    names.truncate(n);
    names.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// IDX3 (gzip): magic 0x00000803, count, rows, cols (big-endian u32), then the pixels.
fn load_fmnist(n: usize) -> Vec<Vec<u8>> {
    let gz = std::fs::read(Path::new(FMNIST)).unwrap_or_else(|e| panic!("{FMNIST}: {e}"));
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .unwrap();
    let be = |o: usize| u32::from_be_bytes(raw[o..o + 4].try_into().unwrap()) as usize;
    assert_eq!(be(0), 0x0803, "not an IDX3 file");
    let (count, rows, cols) = (be(4), be(8), be(12));
    assert_eq!((rows, cols), (28, 28));
    raw[16..]
        .chunks_exact(rows * cols)
        .take(n.min(count))
        .map(|c| c.to_vec())
        .collect()
}

fn rate(aug: &Augmenter, src: &Source, threads: usize, reps: usize) -> f64 {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let n = src.len();
    let pass = || {
        pool.install(|| {
            (0..n)
                .into_par_iter()
                .with_min_len(8)
                .for_each_init(|| Worker::new(aug), |w, i| w.one(aug, src, i))
        })
    };
    pass();
    let mut rates: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            pass();
            n as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rates[rates.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let reps: usize = opt("--reps").map_or(3, |s| s.parse().unwrap());
    let only = opt("--only");
    let threads: Vec<usize> = opt("--threads").map_or(vec![1, 2], |s| {
        s.split(',').map(|t| t.parse().unwrap()).collect()
    });
    let workloads: [(&str, u32, usize); 3] = [
        ("photos", 224, 200),
        ("photos", 96, 400),
        ("fmnist", 32, 1000),
    ];
    println!("two views per image, decode included, blur on (T p=1, T' p=0.1), median of {reps}");
    println!(
        "{:<8} {:>5} {:>8} {:>10} {:>14}",
        "data", "size", "threads", "img/s", "img/s per core"
    );
    for (data, size, n) in workloads {
        if only
            .as_deref()
            .is_some_and(|o| o != size.to_string() && o != data)
        {
            continue;
        }
        let src = if data == "photos" {
            Source::Jpeg(load_photos(n))
        } else {
            Source::Gray28(load_fmnist(n))
        };
        let aug = Augmenter::new(AugmentConfig::byol(size)).unwrap();
        for &t in &threads {
            let r = rate(&aug, &src, t, reps);
            println!(
                "{data:<8} {size:>5} {t:>8} {r:>10.0} {:>14.0}",
                r / t as f64
            );
        }
    }
}
