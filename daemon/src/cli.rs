//! Command-line arguments.

use std::path::PathBuf;

use byol_ingest::{Codec, Compression, Layout};
use byol_trainer::eval::ProbeConfig;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Self-supervised image pretraining with BYOL.
///
/// Without a subcommand, runs the built-in demo (a few minutes on CPU): the daemon
/// pretrains on generated textures arriving in waves in ./byol-demo/incoming, is
/// stopped with SIGTERM, and its encoder is scored with kNN beside a random one.
#[derive(Debug, Parser)]
#[command(name = "byol", version, about, long_about)]
pub struct Cli {
    /// More log output (-v: info, -vv: debug). BYOL_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log lines on stderr as text or JSON (one object per line) [env: BYOL_LOG_FORMAT;
    /// default: text].
    #[arg(long, global = true)]
    pub log_format: Option<LogFormat>,
    /// What to do (default: the demo).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for journald, Loki, ...).
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pack image folders, image files or IDX files into a dataset (incremental).
    Ingest(IngestArgs),
    /// Report what a dataset holds; --verify checks every record.
    Inspect(InspectArgs),
    /// Merge small shards and reclaim retired records' bytes (record indices kept).
    Compact(CompactArgs),
    /// Draw a PNG grid of images and their two augmented views.
    Preview(PreviewArgs),
    /// Pretrain an encoder with BYOL on a dataset.
    Train(TrainArgs),
    /// Keep pretraining while images arrive in watched folders (the service).
    Daemon(DaemonArgs),
    /// Check a config file: every table parsed, every value in range.
    Validate(ValidateArgs),
    /// Evaluate a checkpoint's frozen encoder: linear probe and kNN on labelled data.
    Eval(EvalArgs),
    /// Write a checkpoint's online encoder as a torchvision ResNet state_dict.
    Export(ExportArgs),
    /// Write the encoder's features of every image of a dataset (.npy + .jsonl, or .csv).
    Embed(EmbedArgs),
    /// Draw a run's training curves (loss, collapse, kNN accuracy) as a PNG.
    Plot(PlotArgs),
    /// Measure the BYOL step on synthetic input (throughput, or a check against the CPU).
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// `byol bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Images/s of full training steps on seeded random views.
    Step(BenchStepArgs),
    /// Loss and every gradient on a device against our CPU kernels (same precision).
    Check(BenchCheckArgs),
    /// Each op (convolution, BatchNorm, residual add), forward and backward, over the
    /// shapes of both networks, on a device against our CPU kernels (same precision).
    Ops(BenchOpsArgs),
    /// Writes the demo's labelled texture set (4 classes) as an ImageFolder, for the
    /// objectives benchmark (`scripts/bench_objectives.sh`).
    Textures(BenchTexturesArgs),
}

/// `byol bench textures`.
#[derive(Debug, Args)]
pub struct BenchTexturesArgs {
    /// Folder to write (`OUT/<class>/NNN.png`).
    #[arg(long)]
    pub out: PathBuf,
    /// Images per class.
    #[arg(long, default_value_t = 128)]
    pub per_class: u32,
    /// Seed of the draws (the learning test's training set is 1, its test set 2).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `byol bench ops`.
#[derive(Debug, Args)]
pub struct BenchOpsArgs {
    /// The device, precision and checked kernels (ours, or candle's: on CPU that checks
    /// the check itself).
    #[command(flatten)]
    pub on: BenchOn,
    /// Largest accepted relative L2 error of any tensor [default: 1e-4 in fp32, 1e-2 in
    /// bf16].
    #[arg(long)]
    pub tolerance: Option<f64>,
}

/// The network and batch a bench runs.
#[derive(Debug, Args)]
pub struct BenchNet {
    /// Network.
    #[arg(long, value_enum, default_value = "resnet18")]
    pub arch: ArchArg,
    /// Channels of the first stage.
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// 3x3 stride-1 first convolution without max-pool (small images).
    #[arg(long)]
    pub small_stem: bool,
    /// View side in pixels.
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    /// Images per batch (two views each).
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// The device, precision and kernels.
    #[command(flatten)]
    pub on: BenchOn,
}

/// Where and how a bench computes, and how it reports.
#[derive(Debug, Args)]
pub struct BenchOn {
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Numeric precision.
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: PrecisionArg,
    /// Convolution/BatchNorm kernels: ours (auto) or candle's.
    #[arg(long, value_enum, default_value = "auto")]
    pub kernels: KernelsArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `byol bench step`.
#[derive(Debug, Args)]
pub struct BenchStepArgs {
    /// The network, batch and device.
    #[command(flatten)]
    pub net: BenchNet,
    /// Optimizer (LARS with the official ImageNet settings, or AdamW).
    #[arg(long, value_enum, default_value = "lars")]
    pub optimizer: OptimizerArg,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// fp32 on CUDA: allow TF32 tensor cores (convolutions and matrix products).
    #[arg(long)]
    pub tf32: bool,
    /// Then as many steps again with our ops timed by kind (the device synchronised
    /// around each): where the step's time goes.
    #[arg(long)]
    pub profile: bool,
}

/// `byol bench check`.
#[derive(Debug, Args)]
pub struct BenchCheckArgs {
    /// The network, batch and device.
    #[command(flatten)]
    pub net: BenchNet,
    /// Largest accepted relative loss difference and, in fp32, relative L2 error of any
    /// gradient [default: 1e-3 in fp32, 1e-2 in bf16].
    #[arg(long)]
    pub tolerance: Option<f64>,
}

/// Network choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArchArg {
    /// ResNet-18 (basic blocks).
    Resnet18,
    /// ResNet-50 (bottlenecks).
    Resnet50,
}

/// Precision choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    /// f32 everywhere.
    Fp32,
    /// bfloat16 convolutions and matrix products, f32 elsewhere.
    Bf16,
}

/// Kernel choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernelsArg {
    /// Ours on every device (CPU kernels; cuDNN and our CUDA kernels).
    Auto,
    /// candle's everywhere.
    Candle,
}

/// Optimizer choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    /// LARS (BYOL's).
    Lars,
    /// AdamW.
    Adamw,
    /// SGD with momentum.
    Sgd,
}

/// Evaluation protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    /// Logistic regression on standardised features.
    Linear,
    /// Weighted kNN on cosine similarity.
    Knn,
    /// Both.
    Both,
}

/// `R,G,B` (or one value for all three channels) as three finite numbers.
pub fn parse_channels(text: &str) -> Result<[f32; 3], String> {
    let values = text
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<f32>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("{v:?} is not a finite number"))
        })
        .collect::<Result<Vec<f32>, String>>()?;
    match values[..] {
        [v] => Ok([v; 3]),
        [r, g, b] => Ok([r, g, b]),
        _ => Err(format!(
            "expected R,G,B or one value, got {} values",
            values.len()
        )),
    }
}

/// Overrides of the preprocessing a checkpoint records (`byol eval`, `byol embed`).
#[derive(Debug, Args)]
pub struct InputArgs {
    /// Input side in pixels [default: the side of the views the checkpoint was trained on;
    /// for checkpoints that do not record it, 32 with the small-image stem, else 224].
    #[arg(long)]
    pub size: Option<u32>,
    /// Per-channel mean of the [0, 1] values, `R,G,B` or one value for all three
    /// [default: the normalisation the checkpoint records; ImageNet's when it records none].
    #[arg(long, value_parser = parse_channels)]
    pub mean: Option<[f32; 3]>,
    /// Per-channel standard deviation, `R,G,B` or one value for all three [default: the
    /// checkpoint's record; ImageNet's when it records none].
    #[arg(long, value_parser = parse_channels)]
    pub std: Option<[f32; 3]>,
}

impl InputArgs {
    /// The preprocessing for the encoder of a checkpoint with `meta`: its record, then
    /// these flags; a warning on stderr when ImageNet's statistics are assumed.
    pub fn resolve(
        &self,
        meta: &byol_trainer::CheckpointMeta,
    ) -> byol_trainer::eval::ResolvedInput {
        let overrides = byol_trainer::eval::InputOverrides {
            size: self.size,
            mean: self.mean,
            std: self.std,
        };
        let resolved = byol_trainer::eval::checkpoint_input(meta, &overrides);
        if let Some(warning) = resolved.warning(&overrides) {
            eprintln!("warning: {warning}");
        }
        resolved
    }
}

/// `byol eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A checkpoint folder (step-N), or a run folder (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Labelled dataset the classifiers learn from (from `byol ingest`).
    #[arg(long)]
    pub train: PathBuf,
    /// Labelled dataset the accuracy is measured on.
    #[arg(long)]
    pub test: PathBuf,
    /// Which classifiers to run on the features.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Both)]
    pub protocol: ProtocolArg,
    /// Also evaluate the encoder at random init (the run's config and seed): where a run
    /// started, unless it started from `[train] init` weights (their start is scored by
    /// a step-0 checkpoint: `byol train --init PATH --steps 0`).
    #[arg(long)]
    pub random_init: bool,
    /// Also fit the linear probe on the raw pixels (the preprocessed images).
    #[arg(long)]
    pub pixels: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The input's size and normalisation [default: the checkpoint's record].
    #[command(flatten)]
    pub input: InputArgs,
    /// Images per encoder forward.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// kNN neighbours (at most the training size).
    #[arg(long, default_value_t = 200)]
    pub k: usize,
    /// Seed of the linear probe's held-out split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Gradient steps per linear-probe fit (each L2 tried, then the refit).
    #[arg(long, default_value_t = ProbeConfig::default().max_iters)]
    pub probe_iters: usize,
    /// `cpu`, `cuda:N` or `auto` [default: the checkpoint's train.device].
    #[arg(long)]
    pub device: Option<String>,
}

/// `byol export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A checkpoint folder (step-N), or a run folder (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The safetensors file to write.
    #[arg(long, short)]
    pub out: PathBuf,
}

/// `byol embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// A checkpoint folder (step-N), or a run folder (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The dataset whose live images are embedded (from `byol ingest`).
    #[arg(long)]
    pub data: PathBuf,
    /// The file to write: `.npy` (float32 N x D, with a `.jsonl` of record, source and
    /// label beside it) or `.csv` (lightly's `filenames,embedding_0,...,labels`).
    #[arg(long, short)]
    pub out: PathBuf,
    /// The input's size and normalisation [default: the checkpoint's record].
    #[command(flatten)]
    pub input: InputArgs,
    /// Images per encoder forward.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// `cpu`, `cuda:N` or `auto` [default: the checkpoint's train.device].
    #[arg(long)]
    pub device: Option<String>,
}

/// `byol plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run folder (holds metrics.jsonl).
    pub run: PathBuf,
    /// The PNG to write.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1000)]
    pub width: u32,
}

/// `byol train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// TOML config ([model], [optim], [train], [byol], [augment], [loader]); defaults
    /// otherwise.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Dataset folder (from `byol ingest`).
    #[arg(long)]
    pub data: PathBuf,
    /// Run folder: metrics.jsonl and checkpoints/.
    #[arg(long, default_value = "byol-run")]
    pub run: PathBuf,
    /// Train until this many steps are done [default: train.total_steps]; 0 on a new
    /// run folder writes the encoder it starts from (random or `--init`) as checkpoint 0.
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Train for this many epochs of the dataset.
    #[arg(long, conflicts_with = "minutes")]
    pub epochs: Option<u64>,
    /// Train for this many minutes of wall-clock time: after a 10-step calibration the
    /// cosine schedules are fitted to the steps that fit, and the run stops there (or
    /// at the deadline, whichever comes first) with a checkpoint.
    #[arg(long, conflicts_with = "steps", allow_negative_numbers = true)]
    pub minutes: Option<f64>,
    /// Continue from the newest checkpoint of the run folder.
    #[arg(long)]
    pub resume: bool,
    /// The objective: `byol`, `msf`, `simsiam`, `simclr`, `barlow_twins` or `mocov2`
    /// (overrides `[train] method`; a resume refuses a checkpoint of another method).
    #[arg(long)]
    pub method: Option<byol_trainer::Method>,
    /// Start the encoder from pretrained weights: a PyTorch checkpoint (.pth/.pt, zip
    /// format) or a safetensors file with torchvision's ResNet names (overrides
    /// `[train] init`; a resume ignores it).
    #[arg(long)]
    pub init: Option<PathBuf>,
}

/// Augmentation preset choices.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PresetArg {
    /// The official BYOL views (blur in both).
    Byol,
    /// Small images: no blur.
    Small,
    /// MSF's pair: view 1 strong, view 2 weak.
    Msf,
}

/// `byol preview`.
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// A dataset folder, or a folder of image files.
    pub dataset: PathBuf,
    /// The PNG to write.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Number of images (rows).
    #[arg(long, default_value_t = 16)]
    pub n: usize,
    /// Seed choosing the images and their augmentations.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Read the [augment] table of this TOML file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Start from this preset instead of the config's.
    #[arg(long, value_enum)]
    pub preset: Option<PresetArg>,
    /// View size in pixels (overrides the config).
    #[arg(long)]
    pub size: Option<u32>,
}

/// `byol daemon`.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Config file with a [daemon] table (watch, data, run; see configs/daemon.toml).
    #[arg(long)]
    pub config: PathBuf,
}

/// `byol validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Config file to check ([daemon] checked too when present).
    #[arg(long)]
    pub config: PathBuf,
}

/// `byol ingest`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Folders, image files, IDX image files (e.g. train-images-idx3-ubyte.gz) or
    /// WebDataset shards (.tar, .tar.gz, .tgz), also as brace patterns
    /// ('data-{000000..000099}.tar').
    #[arg(required = true)]
    pub sources: Vec<PathBuf>,
    /// Dataset folder (created if missing; later runs add only new files).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Read settings from the [ingest] table of this TOML file; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Layout of source folders: auto (ImageFolder when a first-level subfolder holds
    /// files, flat otherwise; a folder keeps the layout of its first ingest),
    /// imagefolder (class = first-level subfolder) or flat [default: auto].
    #[arg(long)]
    pub layout: Option<Layout>,
    /// Payload codec of a new dataset: raw (RGB8 pixels, fastest to read) or encoded
    /// (the original JPEG/PNG/WebP bytes, smallest for large photos) [default: raw].
    #[arg(long)]
    pub codec: Option<Codec>,
    /// Resize so the short side is at most this many pixels; 0 keeps the decoded size
    /// [default for a new dataset: 256].
    #[arg(long)]
    pub max_side: Option<u32>,
    /// Compression of new shards: zstd (one frame per record) or none [default: zstd].
    #[arg(long)]
    pub compression: Option<Compression>,
    /// zstd level of each record [default: 3].
    #[arg(long)]
    pub zstd_level: Option<i32>,
    /// JPEG quality when the encoded codec must re-encode [default: 95].
    #[arg(long)]
    pub jpeg_quality: Option<u8>,
    /// Target shard size in MiB [default: 256].
    #[arg(long)]
    pub shard_size_mib: Option<u64>,
    /// Worker threads, 0 for one per core [default: 0].
    #[arg(long, short = 'j')]
    pub threads: Option<usize>,
    /// Largest accepted image in megapixels, a decompression-bomb guard [default: 128].
    #[arg(long)]
    pub max_megapixels: Option<u64>,
    /// Shortest time between two manifest saves while a run is going; work finished
    /// before a crash is kept up to the last save [default: 10].
    #[arg(long)]
    pub commit_interval_secs: Option<f64>,
    /// The field of a WebDataset sample's .json read as its label when it has no .cls
    /// [default: label].
    #[arg(long)]
    pub json_label: Option<String>,
    /// Exit with status 3 when the run added nothing.
    #[arg(long)]
    pub fail_if_empty: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `byol compact`.
#[derive(Debug, Args)]
pub struct CompactArgs {
    /// Dataset folder.
    pub dataset: PathBuf,
    /// Merge runs of at least this many small shards.
    #[arg(long, default_value_t = 4)]
    pub min_run: usize,
    /// Target shard size in MiB (a shard under a quarter of it is small) [default: the
    /// ingest default, 256].
    #[arg(long)]
    pub shard_size_mib: Option<u64>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `byol inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Dataset folder.
    pub dataset: PathBuf,
    /// Read every record and check its checksum; exit 1 if any is corrupt.
    #[arg(long)]
    pub verify: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}
