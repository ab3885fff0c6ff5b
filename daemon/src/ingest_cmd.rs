//! `byol ingest`: pack sources into a dataset and print the summary.

use std::process::ExitCode;

use anyhow::Context;
use byol_ingest::{IngestConfig, IngestOptions, IngestReport, SourceChange};

use crate::cli::IngestArgs;
use crate::config::Config;
use crate::progress::{Bar, stored_vs_raw};

/// Exit status when `--fail-if-empty` is given and nothing was added.
pub const EXIT_NOTHING_INGESTED: u8 = 3;
/// How many rejects are listed on the terminal (all are in rejects.jsonl).
const REJECTS_SHOWN: usize = 10;

/// Runs `byol ingest`.
pub fn run(args: IngestArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.config {
        Some(path) => Config::load(path)?.ingest,
        None => IngestConfig::default(),
    };
    let flags = IngestConfig {
        layout: args.layout,
        codec: args.codec,
        max_side: args.max_side,
        compression: args.compression,
        zstd_level: args.zstd_level,
        jpeg_quality: args.jpeg_quality,
        shard_size_mib: args.shard_size_mib,
        threads: args.threads,
        max_megapixels: args.max_megapixels,
        commit_interval_secs: args.commit_interval_secs,
        json_label: args.json_label,
    };
    let opts = file.or(&flags).ingest_options(args.sources, args.out)?;
    let report = ingest_with_bar(&opts)?;
    if args.json {
        // The summary's counts, with every change and reject listed.
        let mut json = serde_json::to_value(&report.summary)?;
        json["changes"] = serde_json::to_value(&report.changes)?;
        json["rejects"] = serde_json::to_value(&report.rejects)?;
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_report(&report, &opts);
    }
    if args.fail_if_empty && report.summary.ingested == 0 {
        return Ok(ExitCode::from(EXIT_NOTHING_INGESTED));
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs an ingest with a progress bar on stderr.
pub fn ingest_with_bar(opts: &IngestOptions) -> anyhow::Result<IngestReport> {
    let bar = Bar::new(0, "ingest");
    let report = byol_ingest::ingest(opts, &bar);
    bar.finish();
    report.with_context(|| format!("ingest into {} failed", opts.out.display()))
}

/// Prints the human-readable summary of a run.
pub fn print_report(report: &IngestReport, opts: &IngestOptions) {
    let s = &report.summary;
    println!("dataset          {}", opts.out.display());
    for r in &s.roots {
        println!(
            "layout           {} for {} ({})",
            r.layout,
            r.path.display(),
            r.reason
        );
    }
    println!("files seen       {}", s.files_seen);
    if s.ignored > 0 {
        println!(
            "ignored          {} (backup, temporary or partial-download names)",
            s.ignored
        );
    }
    println!(
        "ingested         {} images from {} sources",
        s.ingested, s.sources_added
    );
    println!("already present  {}", s.already_present);
    println!("duplicates       {}", s.duplicates);
    println!("rejected         {}", s.rejected_total());
    for (reason, n) in &s.rejected {
        println!("  {reason:<15} {n}");
    }
    if s.shards_written > 0 {
        println!(
            "new shards       {} ({})",
            s.shards_written,
            stored_vs_raw(s.bytes_stored, s.bytes_raw)
        );
    }
    if s.retired > 0 || s.sources_retired > 0 {
        println!(
            "retired          {} records of {} vanished or replaced files",
            s.retired, s.sources_retired
        );
    }
    if s.relabelled > 0 {
        println!("relabelled       {}", s.relabelled);
    }
    if s.sources_removed > 0 {
        println!(
            "removed          {} vanished files whose content another file keeps",
            s.sources_removed
        );
    }
    for c in report.changes.iter().take(REJECTS_SHOWN) {
        println!("{}", describe_change(c));
    }
    if report.changes.len() > REJECTS_SHOWN {
        println!(
            "... and {} more changes, see {}",
            report.changes.len() - REJECTS_SHOWN,
            opts.out.join(byol_ingest::change::CHANGES_FILE).display()
        );
    }
    for w in &s.warnings {
        println!("warning: {w}");
    }
    if s.leftovers_removed > 0 {
        println!(
            "cleaned up       {} leftovers of an interrupted run",
            s.leftovers_removed
        );
    }
    let rate = match s.ingested {
        0 => String::new(),
        n => format!(" ({:.0} images/s)", n as f64 / s.seconds.max(1e-9)),
    };
    println!(
        "time             {:.1} s{rate}, generation {}",
        s.seconds, s.generation
    );
    for r in report.rejects.iter().take(REJECTS_SHOWN) {
        let member = r
            .member
            .as_ref()
            .map_or(String::new(), |k| format!(" [{k}]"));
        println!(
            "rejected: {}{member}: {}: {}",
            r.path.display(),
            r.reason,
            r.detail
        );
    }
    if report.rejects.len() > REJECTS_SHOWN {
        println!(
            "... and {} more, see {}",
            report.rejects.len() - REJECTS_SHOWN,
            opts.out.join(byol_ingest::reject::REJECTS_FILE).display()
        );
    }
}

/// One line for a change to a source the dataset held.
pub fn describe_change(c: &SourceChange) -> String {
    let class = |l: &Option<String>| l.as_deref().unwrap_or("(unlabelled)").to_owned();
    match c {
        SourceChange::Retired {
            path,
            records,
            replaced,
        } => format!(
            "{}: {path}: {records} record(s) retired",
            if *replaced { "replaced" } else { "retired" }
        ),
        SourceChange::Relabelled {
            path,
            now,
            from,
            to,
        } if path == now => format!("relabelled: {path}: {} -> {}", class(from), class(to)),
        SourceChange::Relabelled {
            path,
            now,
            from,
            to,
        } => format!(
            "relabelled: {path} -> {now}: {} -> {}",
            class(from),
            class(to)
        ),
        SourceChange::Removed { path, kept_by } => {
            format!("removed: {path} (content kept by {kept_by})")
        }
    }
}
