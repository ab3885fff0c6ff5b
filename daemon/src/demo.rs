//! The no-argument demo: packs an embedded sample of photos, reports on it, and draws
//! BYOL's two views of a few of them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use byol_ingest::{Dataset, IngestOptions, inspect};

/// The embedded sample: 16 photos, 128 px (see assets/sample/SOURCES.txt).
const SAMPLE: [(&str, &[u8]); 16] = [
    (
        "photo_00.jpg",
        include_bytes!("../assets/sample/photo_00.jpg"),
    ),
    (
        "photo_01.jpg",
        include_bytes!("../assets/sample/photo_01.jpg"),
    ),
    (
        "photo_02.jpg",
        include_bytes!("../assets/sample/photo_02.jpg"),
    ),
    (
        "photo_03.jpg",
        include_bytes!("../assets/sample/photo_03.jpg"),
    ),
    (
        "photo_04.jpg",
        include_bytes!("../assets/sample/photo_04.jpg"),
    ),
    (
        "photo_05.jpg",
        include_bytes!("../assets/sample/photo_05.jpg"),
    ),
    (
        "photo_06.jpg",
        include_bytes!("../assets/sample/photo_06.jpg"),
    ),
    (
        "photo_07.jpg",
        include_bytes!("../assets/sample/photo_07.jpg"),
    ),
    (
        "photo_08.jpg",
        include_bytes!("../assets/sample/photo_08.jpg"),
    ),
    (
        "photo_09.jpg",
        include_bytes!("../assets/sample/photo_09.jpg"),
    ),
    (
        "photo_10.jpg",
        include_bytes!("../assets/sample/photo_10.jpg"),
    ),
    (
        "photo_11.jpg",
        include_bytes!("../assets/sample/photo_11.jpg"),
    ),
    (
        "photo_12.jpg",
        include_bytes!("../assets/sample/photo_12.jpg"),
    ),
    (
        "photo_13.jpg",
        include_bytes!("../assets/sample/photo_13.jpg"),
    ),
    (
        "photo_14.jpg",
        include_bytes!("../assets/sample/photo_14.jpg"),
    ),
    (
        "photo_15.jpg",
        include_bytes!("../assets/sample/photo_15.jpg"),
    ),
];

/// Folder the demo works in, relative to the current directory.
pub const DEMO_DIR: &str = "byol-demo";

/// Writes the sample to `dir` (unchanged files are left alone, so re-runs are incremental).
pub fn write_sample(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, bytes) in SAMPLE {
        let path = dir.join(name);
        if std::fs::read(&path).ok().as_deref() != Some(bytes) {
            std::fs::write(&path, bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(())
}

/// Runs the demo: sample → ingest → inspect with verification.
pub fn run() -> anyhow::Result<ExitCode> {
    let root = PathBuf::from(DEMO_DIR);
    let sample = root.join("sample");
    let dataset = root.join("dataset");
    println!(
        "byol demo: packing the embedded sample ({} photos) into {}",
        SAMPLE.len(),
        dataset.display()
    );
    write_sample(&sample)?;
    let opts = IngestOptions::new(vec![sample], dataset.clone());
    let report = crate::ingest_cmd::ingest_with_bar(&opts)?;
    crate::ingest_cmd::print_report(&report, &opts);
    println!();
    let ds = Dataset::open(&dataset)?;
    crate::inspect_cmd::print_stats(&dataset.display().to_string(), &inspect::stats(&ds));
    let bad = inspect::verify(&ds, &|_| {});
    anyhow::ensure!(
        bad.is_empty(),
        "{} corrupt records in the demo dataset",
        bad.len()
    );
    println!("verify           all {} records OK", ds.len());
    let grid = root.join("preview.png");
    let aug = byol_augment::Augmenter::new(byol_augment::AugmentConfig::byol(96))?;
    let rows = crate::preview_cmd::write_grid(&aug, &dataset, &grid, 6, 0)?;
    println!(
        "preview          {} ({rows} rows: stored, BYOL view 1, view 2)",
        grid.display()
    );
    println!(
        "\nNext: `byol ingest YOUR_FOLDER --out DATASET`, `byol inspect DATASET --verify`,\n\
         `byol preview DATASET --out grid.png`, `byol train --data DATASET --config configs/small.toml`."
    );
    Ok(ExitCode::SUCCESS)
}
