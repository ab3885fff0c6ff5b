//! Change handling of the follower (the daemon's ingester) for files with one name
//! (nlink = 1), the common case: `Follower::apply` on files whose stamp changed but
//! whose content did not (re-read, re-hashed, stamp updated), per file. What re-checking
//! a changed file's other names (same device and inode) must not make slower.
//!
//! ```text
//! cargo bench -p byol-ingest --bench follow              # 2000 files, 15 rounds
//! BYOL_BENCH_FILES=5000 BYOL_BENCH_ROUNDS=30 cargo bench -p byol-ingest --bench follow
//! ```

use std::path::PathBuf;
use std::time::Instant;

use byol_ingest::{Follower, IngesterOptions, Layout};

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small PNG, distinct for each `n`.
fn png(n: u32) -> Vec<u8> {
    let mut img = image::RgbImage::new(16, 16);
    for (i, p) in img.pixels_mut().enumerate() {
        let v = (n as usize * 7919 + i * 31) as u32;
        *p = image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8]);
    }
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn main() {
    let files = env_or("BYOL_BENCH_FILES", 2000);
    let rounds = env_or("BYOL_BENCH_ROUNDS", 15);
    let dir = tempfile::tempdir().unwrap();
    let watch = dir.path().join("in");
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut bytes = Vec::new();
    for i in 0..files {
        let class = watch.join(format!("c{}", i % 10));
        std::fs::create_dir_all(&class).unwrap();
        let p = class.join(format!("{i}.png"));
        let b = png(i as u32);
        std::fs::write(&p, &b).unwrap();
        paths.push(std::fs::canonicalize(&p).unwrap());
        bytes.push(b);
    }
    let data = dir.path().join("data");
    let roots = vec![(watch.clone(), Layout::ImageFolder)];
    let opts = IngesterOptions {
        threads: 1,
        ..IngesterOptions::default()
    };
    let mut f = Follower::open(&data, &roots, opts).unwrap();
    f.scan_all().unwrap();
    let mut per_file = Vec::new();
    for _ in 0..rounds {
        // The same bytes written again: a new mtime and ctime, the same content.
        std::thread::sleep(std::time::Duration::from_millis(5));
        for (p, b) in paths.iter().zip(&bytes) {
            std::fs::write(p, b).unwrap();
        }
        let t = Instant::now();
        let report = f.apply(&paths).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(report.summary.ingested, 0);
        per_file.push(secs / files as f64 * 1e6);
    }
    per_file.sort_by(f64::total_cmp);
    let median = per_file[per_file.len() / 2];
    let (lo, hi) = (per_file[0], per_file[per_file.len() - 1]);
    println!(
        "follow apply, {files} changed files with one name each, {rounds} rounds: \
         median {median:.2} us/file (min {lo:.2}, max {hi:.2})"
    );
}
