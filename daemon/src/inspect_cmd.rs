//! `byol inspect`: what a dataset holds, and `--verify` of every record.

use std::process::ExitCode;

use anyhow::Context;
use byol_ingest::Dataset;
use byol_ingest::inspect::{self, CorruptRecord, DatasetStats};
use serde::Serialize;

use crate::cli::InspectArgs;
use crate::progress::{Bar, stored_vs_raw};

#[derive(Serialize)]
struct Report {
    stats: DatasetStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrupt: Option<Vec<CorruptRecord>>,
}

/// Runs `byol inspect`.
pub fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let ds = Dataset::open(&args.dataset)
        .with_context(|| format!("cannot open dataset {}", args.dataset.display()))?;
    let stats = inspect::stats(&ds);
    let corrupt = args.verify.then(|| {
        let bar = Bar::new(ds.len() as u64, "verify");
        let bad = inspect::verify(&ds, &|n| bar.inc(n));
        bar.finish();
        bad
    });
    let failed = corrupt.as_ref().is_some_and(|c| !c.is_empty());
    let report = Report { stats, corrupt };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_stats(&args.dataset.display().to_string(), &report.stats);
        if let Some(bad) = &report.corrupt {
            print_verify(ds.len(), bad);
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints dataset statistics as a table.
pub fn print_stats(name: &str, s: &DatasetStats) {
    let max_side = s
        .settings
        .max_side
        .map_or("none".to_string(), |m| m.to_string());
    println!("dataset          {name} (generation {})", s.generation);
    println!(
        "settings         codec {}, max side {max_side}, compression {} (zstd level {})",
        s.settings.codec, s.settings.compression, s.settings.zstd_level
    );
    println!("shards           {}", s.shards);
    println!("sources          {}", s.sources);
    println!("records          {} ({} retired)", s.records, s.retired);
    println!(
        "samples          {} (one per stored image and label)",
        s.samples
    );
    println!(
        "bytes            {}",
        stored_vs_raw(s.bytes_stored, s.bytes_raw)
    );
    println!(
        "width            min {} / median {} / max {}",
        s.width[0], s.width[1], s.width[2]
    );
    println!(
        "height           min {} / median {} / max {}",
        s.height[0], s.height[1], s.height[2]
    );
    println!("short side");
    for (bucket, n) in s.short_side_histogram.iter().filter(|(_, n)| *n > 0) {
        println!("  {bucket:<10}     {n}");
    }
    if !s.per_class.is_empty() {
        println!("classes          {}", s.per_class.len());
        for (name, n) in &s.per_class {
            println!("  {name:<20} {n}");
        }
    }
    if s.unlabelled > 0 {
        println!("unlabelled       {}", s.unlabelled);
    }
    let c = &s.changes;
    if c.retired + c.relabelled + c.removed > 0 {
        println!(
            "source changes   {} retired, {} relabelled, {} removed (kept by a copy)",
            c.retired, c.relabelled, c.removed
        );
        if let Some(first) = s.recent_changes.first() {
            println!("  in generation {}:", first.generation);
        }
        for l in &s.recent_changes {
            println!("  {}", crate::ingest_cmd::describe_change(&l.change));
        }
    }
}

fn print_verify(total: usize, bad: &[CorruptRecord]) {
    if bad.is_empty() {
        println!("verify           all {total} records OK");
        return;
    }
    println!("verify           {} of {total} records CORRUPT", bad.len());
    for b in bad {
        println!(
            "corrupt: shard {} record {}: {}",
            b.shard, b.index, b.reason
        );
    }
}
