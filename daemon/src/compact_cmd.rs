//! `byol compact`: merge small shards, reclaim retired records' bytes, and show the
//! dataset before and after.

use std::process::ExitCode;

use anyhow::Context;
use byol_ingest::{CompactPolicy, Ingester, IngesterOptions, Manifest};

use crate::cli::CompactArgs;

/// Runs `byol compact`.
pub fn run(args: CompactArgs) -> anyhow::Result<ExitCode> {
    let mut opts = IngesterOptions::default();
    if let Some(mib) = args.shard_size_mib {
        opts.shard_bytes = mib.saturating_mul(1 << 20);
    }
    let policy = CompactPolicy::for_shard_bytes(opts.shard_bytes, args.min_run);
    let mut ing = Ingester::open_quiet(&args.dataset, opts)
        .with_context(|| format!("cannot open {}", args.dataset.display()))?;
    let before = summary(ing.manifest());
    let report = ing.compact(&policy)?;
    let after = summary(ing.manifest());
    drop(ing);
    if args.json {
        let json = serde_json::json!({
            "before": before,
            "after": after,
            "report": report,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(ExitCode::SUCCESS);
    }
    let row = |name: &str, s: &Summary| {
        println!(
            "{name:<8} {:>7} shards {:>10.2} MiB {:>9} records {:>9} live {:>9} retired",
            s.shards,
            s.bytes as f64 / (1 << 20) as f64,
            s.records,
            s.live,
            s.records - s.live,
        );
    };
    row("before", &before);
    row("after", &after);
    if report.is_none() {
        println!(
            "nothing to compact (no run of {} small shards, no shard a quarter retired)",
            args.min_run.max(2)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Shard count, bytes and records of a manifest.
#[derive(Debug, serde::Serialize)]
struct Summary {
    shards: usize,
    bytes: u64,
    records: u64,
    live: u64,
}

fn summary(m: &Manifest) -> Summary {
    Summary {
        shards: m.shards.len(),
        bytes: m.shards.iter().map(|s| s.bytes).sum(),
        records: m.total_records(),
        live: m.live_records(),
    }
}
