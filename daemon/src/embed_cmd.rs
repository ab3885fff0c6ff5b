//! `byol embed`: the frozen online encoder's features of every image of a dataset, in the
//! evaluation preprocessing with the normalisation the checkpoint records.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use byol_ingest::Dataset;
use byol_trainer::checkpoint;
use byol_trainer::device::{open_device, parse_device};
use byol_trainer::eval::{Encoder, Preprocess, embed, resolve_checkpoint};

use crate::cli::EmbedArgs;
use crate::progress::Bar;

/// Runs `byol embed`.
pub fn run(args: EmbedArgs) -> anyhow::Result<ExitCode> {
    // The format first: a wrong extension fails before anything is computed.
    byol_trainer::eval::EmbedFormat::for_path(&args.out)?;
    let ck = resolve_checkpoint(&args.checkpoint)?;
    let meta = checkpoint::read_meta(&ck)?;
    let device_name = args.device.as_deref().unwrap_or(&meta.config.train.device);
    let device = open_device(parse_device(device_name)?)?;
    let dataset = Dataset::open(&args.data)
        .with_context(|| format!("cannot open dataset {}", args.data.display()))?;
    let resolved = args.input.resolve(&meta);
    let pre = Preprocess::for_input(&resolved.input);
    let (encoder, _) = Encoder::from_checkpoint(&ck, meta.config.train.kernels, &device)?;
    let started = Instant::now();
    let bar = Bar::new(0, "embed");
    let report = embed(&encoder, &dataset, &pre, args.batch_size, &args.out, &bar)
        .with_context(|| format!("embedding {}", args.data.display()))?;
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    if report.skipped > 0 {
        eprintln!(
            "warning: {}: {} corrupt record(s) skipped (run byol inspect --verify)",
            args.data.display(),
            report.skipped
        );
    }
    let files: Vec<String> = report
        .files
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    println!(
        "embedded {} images ({} values each) with {} (step {}) in {secs:.1} s ({:.0} images/s); input: {}; wrote {}",
        report.rows,
        report.dim,
        ck.display(),
        meta.step,
        report.rows as f64 / secs.max(1e-9),
        resolved.input.describe(),
        files.join(" and ")
    );
    Ok(ExitCode::SUCCESS)
}
