//! `byol eval`: the frozen online encoder of a checkpoint under the linear probe and
//! kNN, beside an untrained encoder and raw pixels when asked.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use byol_ingest::Dataset;
use byol_trainer::checkpoint;
use byol_trainer::device::{open_device, parse_device};
use byol_trainer::eval::{
    Encoder, Features, KnnConfig, Preprocess, ProbeConfig, extract, knn_accuracy, linear_probe,
    pixel_features, resolve_checkpoint,
};
use byol_trainer::input::InputSpec;
use serde::Serialize;

use crate::cli::{EvalArgs, ProtocolArg};
use crate::progress::Bar;

/// The JSON written by `--json`.
#[derive(Debug, Serialize)]
struct Report {
    checkpoint: String,
    step: u64,
    train: String,
    test: String,
    train_images: usize,
    test_images: usize,
    classes: usize,
    image_size: u32,
    /// The preprocessing the encoders were fed (size, normalisation, filter).
    input: InputSpec,
    /// `checkpoint` (its record, then the flags) or `imagenet-assumed` (no record).
    input_source: &'static str,
    results: Vec<Row>,
}

/// One encoder under one protocol.
#[derive(Debug, Serialize)]
struct Row {
    /// `trained`, `random-init` or `raw-pixels`.
    encoder: &'static str,
    /// `linear` or `knn`.
    protocol: &'static str,
    /// Top-1 on the test split.
    accuracy: f64,
    feature_dim: usize,
    /// Seconds of the classifier (fit and predict).
    seconds: f64,
    /// Seconds of the feature extraction of both splits (shared by its protocols).
    features_seconds: f64,
    /// Linear probe: the chosen L2 strength.
    #[serde(skip_serializing_if = "Option::is_none")]
    l2: Option<f64>,
    /// Linear probe: top-1 on the training split.
    #[serde(skip_serializing_if = "Option::is_none")]
    train_accuracy: Option<f64>,
    /// kNN: neighbours used.
    #[serde(skip_serializing_if = "Option::is_none")]
    k: Option<usize>,
}

fn open(path: &Path) -> anyhow::Result<Dataset> {
    Dataset::open(path).with_context(|| format!("cannot open dataset {}", path.display()))
}

/// Runs `byol eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let ck = resolve_checkpoint(&args.checkpoint)?;
    let meta = checkpoint::read_meta(&ck)?;
    let device_name = args.device.as_deref().unwrap_or(&meta.config.train.device);
    let device = open_device(parse_device(device_name)?)?;
    let kernels = meta.config.train.kernels;
    let train_ds = open(&args.train)?;
    let test_ds = open(&args.test)?;
    // The preprocessing the encoder was trained with (the checkpoint's record), then
    // the flags.
    let resolved = args.input.resolve(&meta);
    let size = resolved.input.size;
    let pre = Preprocess::for_input(&resolved.input);
    let probe = ProbeConfig {
        seed: args.seed,
        max_iters: args.probe_iters,
        ..ProbeConfig::default()
    };
    let knn = KnnConfig {
        k: args.k,
        ..KnnConfig::default()
    };
    let (linear, run_knn) = match args.protocol {
        ProtocolArg::Linear => (true, false),
        ProtocolArg::Knn => (false, true),
        ProtocolArg::Both => (true, true),
    };

    let mut encoders = vec![(
        "trained",
        Encoder::from_checkpoint(&ck, kernels, &device)?.0,
    )];
    if args.random_init {
        let random = Encoder::random(&meta.config.model, meta.config.train.seed, kernels, &device)?;
        encoders.push(("random-init", random));
    }
    let mut rows = Vec::new();
    let mut sizes = (0, 0, 0);
    for (name, encoder) in &encoders {
        let started = Instant::now();
        let features = |ds: &Dataset, split: &str| -> anyhow::Result<Features> {
            let bar = Bar::new(0, &format!("{name} {split}"));
            let f = extract(encoder, ds, &pre, args.batch_size, &bar)
                .with_context(|| format!("features of {}", ds.dir().display()))?;
            bar.finish();
            Ok(f)
        };
        let train = features(&train_ds, "train")?;
        let mut test = features(&test_ds, "test")?;
        if rows.is_empty() {
            for f in [&train, &test].into_iter().filter(|f| f.skipped > 0) {
                eprintln!(
                    "warning: {}: {} corrupt record(s) skipped (run byol inspect --verify)",
                    f.source.display(),
                    f.skipped
                );
            }
        }
        test.align_to(&train.classes)?;
        sizes = (train.len(), test.len(), train.classes.len());
        let secs = started.elapsed().as_secs_f64();
        classify(
            name, &train, &test, linear, run_knn, &probe, knn, secs, &mut rows,
        )?;
    }
    if args.pixels {
        let started = Instant::now();
        let bar = Bar::new(0, "pixels");
        let train = pixel_features(&train_ds, &pre, &bar)?;
        let mut test = pixel_features(&test_ds, &pre, &bar)?;
        bar.finish();
        test.align_to(&train.classes)?;
        let secs = started.elapsed().as_secs_f64();
        classify(
            "raw-pixels",
            &train,
            &test,
            true,
            false,
            &probe,
            knn,
            secs,
            &mut rows,
        )?;
    }

    let report = Report {
        checkpoint: ck.display().to_string(),
        step: meta.step,
        train: args.train.display().to_string(),
        test: args.test.display().to_string(),
        train_images: sizes.0,
        test_images: sizes.1,
        classes: sizes.2,
        image_size: size,
        input: resolved.input.clone(),
        input_source: if resolved.recorded {
            "checkpoint"
        } else {
            "imagenet-assumed"
        },
        results: rows,
    };
    print_table(&report);
    if let Some(path) = &args.json {
        let mut json = serde_json::to_vec_pretty(&report)?;
        json.push(b'\n');
        byol_ingest::fsutil::write_atomic(path, &json)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn classify(
    encoder: &'static str,
    train: &Features,
    test: &Features,
    linear: bool,
    knn: bool,
    probe: &ProbeConfig,
    knn_cfg: KnnConfig,
    features_seconds: f64,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let row = |protocol, accuracy, seconds| Row {
        encoder,
        protocol,
        accuracy,
        feature_dim: train.dim,
        seconds,
        features_seconds,
        l2: None,
        train_accuracy: None,
        k: None,
    };
    if linear {
        let started = Instant::now();
        let r = linear_probe(train, test, probe).context("linear probe")?;
        rows.push(Row {
            l2: Some(r.l2),
            train_accuracy: Some(r.train_accuracy),
            ..row("linear", r.accuracy, started.elapsed().as_secs_f64())
        });
    }
    if knn {
        let started = Instant::now();
        let acc = knn_accuracy(train, test, knn_cfg).context("kNN")?;
        rows.push(Row {
            k: Some(knn_cfg.k.min(train.len())),
            ..row("knn", acc, started.elapsed().as_secs_f64())
        });
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "checkpoint {} (step {}); {} train / {} test images, {} classes",
        r.checkpoint, r.step, r.train_images, r.test_images, r.classes
    );
    println!("input: {} ({})", r.input.describe(), r.input_source);
    println!(
        "{:<12} {:<8} {:>8} {:>8} {:>10}  detail",
        "encoder", "protocol", "top-1", "dim", "seconds"
    );
    for row in &r.results {
        let detail = match (row.l2, row.k) {
            (Some(l2), _) => format!(
                "l2 {l2:.0e}, train top-1 {:.2}%",
                100.0 * row.train_accuracy.unwrap_or(0.0)
            ),
            (_, Some(k)) => format!("k {k}, T 0.1"),
            _ => String::new(),
        };
        println!(
            "{:<12} {:<8} {:>7.2}% {:>8} {:>10.1}  {detail}",
            row.encoder,
            row.protocol,
            100.0 * row.accuracy,
            row.feature_dim,
            row.seconds + row.features_seconds
        );
    }
}
