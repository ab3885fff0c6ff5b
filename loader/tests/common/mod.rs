//! A small generated dataset for loader tests.
#![allow(dead_code, missing_docs)]

use std::path::{Path, PathBuf};

use byol_augment::{AugmentConfig, Augmenter};
use byol_ingest::{Dataset, IngestOptions, NoProgress, ingest};
use byol_loader::{LoaderConfig, Output};

/// Writes `n` distinct PNGs (sizes vary) under `dir/src/{a,b}/` starting at `first`.
pub fn write_images(dir: &Path, first: u32, n: u32) -> PathBuf {
    let src = dir.join("src");
    for i in first..first + n {
        let class = if i % 2 == 0 { "a" } else { "b" };
        let (w, h) = (20 + i % 7, 16 + i % 5);
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 9 + i) as u8,
                (y * 13 + i * 3) as u8,
                (i * 31 % 251) as u8 ^ (x + y) as u8,
            ])
        });
        std::fs::create_dir_all(src.join(class)).unwrap();
        img.save(src.join(class).join(format!("{i:05}.png")))
            .unwrap();
    }
    src
}

/// Ingests `src` into `dir/ds` with small shards (several per dataset).
pub fn ingest_into(src: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("ds");
    let mut o = IngestOptions::new(vec![src.to_owned()], out.clone());
    o.shard_bytes = 8 << 10;
    o.threads = 1;
    o.settings.max_side = Some(0);
    ingest(&o, &NoProgress).unwrap();
    out
}

pub fn dataset(dir: &Path, n: u32) -> PathBuf {
    let src = write_images(dir, 0, n);
    ingest_into(&src, dir)
}

pub fn augmenter() -> Augmenter {
    Augmenter::new(AugmentConfig::small(16)).unwrap()
}

pub fn config(batch: usize, threads: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size: batch,
        seed: 1234,
        threads,
        batches_ahead: 2,
        output: Output::Both,
        ..LoaderConfig::default()
    }
}

pub fn open(path: &Path) -> Dataset {
    Dataset::open(path).unwrap()
}

/// Everything observable about a batch, for exact comparisons.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub epoch: u64,
    pub index: u64,
    pub records: Vec<u64>,
    pub labels: Vec<u32>,
    pub view1: Vec<u32>,
    pub view2: Vec<u32>,
    pub view1_u8: Vec<u8>,
}

/// `n` batches taken as a training loop takes them: dataset growth applied at each
/// step boundary ([`byol_loader::Loader::refresh`]), then the next batch.
pub fn take(loader: &mut byol_loader::Loader, n: usize) -> Vec<Seen> {
    (0..n)
        .map(|_| {
            loader.refresh().expect("the manifest reads");
            seen(&loader.next_batch())
        })
        .collect()
}

/// What a batch holds.
pub fn seen(b: &byol_loader::Batch) -> Seen {
    Seen {
        epoch: b.epoch,
        index: b.index_in_epoch,
        records: b.records().to_vec(),
        labels: b.labels().to_vec(),
        view1: b.view1().iter().map(|x| x.to_bits()).collect(),
        view2: b.view2().iter().map(|x| x.to_bits()).collect(),
        view1_u8: b.view1_u8().to_vec(),
    }
}
