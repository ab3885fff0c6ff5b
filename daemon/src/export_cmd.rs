//! `byol export`: a checkpoint's online encoder as a torchvision ResNet state_dict.

use std::process::ExitCode;

use anyhow::Context;
use byol_trainer::checkpoint;
use byol_trainer::device::{DeviceSpec, open_device};
use byol_trainer::eval::{
    Encoder, InputOverrides, checkpoint_input, export_encoder, resolve_checkpoint,
};

use crate::cli::ExportArgs;

/// Runs `byol export`.
pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let ck = resolve_checkpoint(&args.checkpoint)?;
    let meta = checkpoint::read_meta(&ck)?;
    // Weights only: the CPU is enough whatever device the run trained on.
    let cpu = open_device(DeviceSpec::Cpu)?;
    let (encoder, _) = Encoder::from_checkpoint(&ck, meta.config.train.kernels, &cpu)?;
    let resolved = checkpoint_input(&meta, &InputOverrides::default());
    let recorded = resolved.recorded.then_some(&resolved.input);
    let count = export_encoder(&encoder, recorded, &args.out)
        .with_context(|| format!("cannot export to {}", args.out.display()))?;
    let m = &meta.config.model;
    println!(
        "wrote {count} tensors of the online encoder ({:?}, width {}, {} stem, step {}) to {}",
        m.arch,
        m.width,
        if m.small_stem { "small" } else { "ImageNet" },
        meta.step,
        args.out.display()
    );
    println!(
        "PyTorch: model.load_state_dict(safetensors.torch.load_file(path), strict=False) \
         misses only fc.*{}",
        if m.small_stem {
            " (after conv1 = Conv2d(3, W, 3, 1, 1, bias=False); maxpool = Identity())"
        } else {
            ""
        }
    );
    let i = &resolved.input;
    println!(
        "inputs: RGB scaled to [0, 1], then Normalize(mean={:?}, std={:?}), {} px ({:?} resize){}",
        i.mean,
        i.std,
        i.size,
        i.interpolation,
        if resolved.recorded {
            ""
        } else {
            " (assumed: the checkpoint records no normalisation)"
        }
    );
    Ok(ExitCode::SUCCESS)
}
