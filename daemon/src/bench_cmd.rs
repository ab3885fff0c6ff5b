//! `byol bench step`, `byol bench check` and `byol bench ops`: the step on synthetic
//! input, measured or checked, and each op checked (logic in `byol_trainer::bench`);
//! `byol bench textures` writes the demo's labelled set.

use std::process::ExitCode;

use byol_trainer::bench::{grad_check, op_check, step_throughput};
use byol_trainer::{
    Arch, Kernels, ModelConfig, OptimConfig, OptimizerKind, Precision, Schedule, TrainConfig,
    TrainerConfig,
};

use anyhow::Context;

use crate::cli::{
    ArchArg, BenchCheckArgs, BenchCommand, BenchNet, BenchOpsArgs, BenchStepArgs, KernelsArg,
    OptimizerArg, PrecisionArg,
};

/// Runs `byol bench ...`.
pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Step(args) => step(args),
        BenchCommand::Check(args) => check(args),
        BenchCommand::Ops(args) => ops(args),
        BenchCommand::Textures(args) => {
            crate::textures::write_image_folder(&args.out, args.per_class, args.seed)
                .with_context(|| format!("cannot write textures to {}", args.out.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn model(net: &BenchNet) -> ModelConfig {
    ModelConfig {
        arch: match net.arch {
            ArchArg::Resnet18 => Arch::Resnet18,
            ArchArg::Resnet50 => Arch::Resnet50,
        },
        width: net.width,
        small_stem: net.small_stem,
        ..ModelConfig::default()
    }
}

fn precision(p: PrecisionArg) -> Precision {
    match p {
        PrecisionArg::Fp32 => Precision::Fp32,
        PrecisionArg::Bf16 => Precision::Bf16,
    }
}

fn kernels(k: KernelsArg) -> Kernels {
    match k {
        KernelsArg::Auto => Kernels::Auto,
        KernelsArg::Candle => Kernels::Candle,
    }
}

/// The smallest view the network takes: its stem and stages halve the map 3 times
/// (small stem) or 5 times (ImageNet stem).
fn check_size(net: &BenchNet) -> anyhow::Result<()> {
    let min = if net.small_stem { 8 } else { 32 };
    if net.size < min {
        anyhow::bail!(
            "--size {}: the {} stem needs views of at least {min} px",
            net.size,
            if net.small_stem { "small" } else { "ImageNet" }
        );
    }
    Ok(())
}

fn step(args: BenchStepArgs) -> anyhow::Result<ExitCode> {
    let net = &args.net;
    check_size(net)?;
    if args.steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    let cfg = TrainerConfig {
        model: model(net),
        optim: OptimConfig {
            optimizer: match args.optimizer {
                OptimizerArg::Lars => OptimizerKind::Lars,
                OptimizerArg::Adamw => OptimizerKind::Adamw,
                OptimizerArg::Sgd => OptimizerKind::Sgd,
            },
            schedule: Schedule::Constant,
            ..OptimConfig::default()
        },
        train: TrainConfig {
            device: net.on.device.clone(),
            kernels: kernels(net.on.kernels),
            precision: precision(net.on.precision),
            tf32: args.tf32,
            ..TrainConfig::default()
        },
        ..TrainerConfig::default()
    };
    let arch = format!("{:?}", cfg.model.arch).to_lowercase();
    let r = step_throughput(
        cfg,
        net.batch,
        net.size,
        args.warmup,
        args.steps,
        args.profile,
    )?;
    if net.on.json {
        let mut v = serde_json::to_value(&r)?;
        v["peer"] = "byol".into();
        v["arch"] = arch.into();
        v["width"] = net.width.into();
        v["small_stem"] = net.small_stem.into();
        v["optimizer"] = format!("{:?}", args.optimizer).to_lowercase().into();
        v["tf32"] = args.tf32.into();
        println!("{v}");
    } else {
        println!(
            "{arch}{} width {} {} px, batch {}, {} on {}: {:.1} img/s ({:.1} ms/step, median of {}); loss {:.4} -> {:.4}",
            if net.small_stem { " (small stem)" } else { "" },
            net.width,
            net.size,
            net.batch,
            format!("{:?}", r.precision).to_lowercase(),
            r.device,
            r.images_per_sec,
            r.step_seconds_median * 1e3,
            r.steps,
            r.loss_first,
            r.loss_last
        );
        if let Some(p) = &r.profile {
            println!(
                "profiled step (every op synchronised): {:.1} ms",
                p.step_seconds_median * 1e3
            );
            for o in &p.ops {
                println!(
                    "  {:<24} {:>9.2} ms/step {:>6.1}%  {:>5.0} calls/step",
                    o.op,
                    o.ms_per_step,
                    100.0 * o.share,
                    o.calls_per_step
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check(args: BenchCheckArgs) -> anyhow::Result<ExitCode> {
    let net = &args.net;
    check_size(net)?;
    if net.on.device == "cpu" && net.on.kernels == KernelsArg::Auto {
        eprintln!(
            "note: on the CPU the checked side runs our kernels too; --kernels candle checks \
             candle's against ours"
        );
    }
    let tolerance = args.tolerance.unwrap_or(match net.on.precision {
        PrecisionArg::Fp32 => 1e-3,
        PrecisionArg::Bf16 => 1e-2,
    });
    let r = grad_check(
        &model(net),
        &net.on.device,
        kernels(net.on.kernels),
        precision(net.on.precision),
        net.batch,
        net.size,
        tolerance,
    )?;
    if net.on.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} ({}) vs {}: loss {:.6} vs {:.6}; {} gradients, relative L2 error median {:.2e}, largest {:.2e} ({}); tolerance {:.0e} on the loss{}: {}",
            r.device,
            r.checked,
            r.reference,
            r.loss_checked,
            r.loss_reference,
            r.parameters,
            r.median_rel_l2,
            r.max_rel_l2,
            r.worst.first().map_or("-", |d| d.name.as_str()),
            r.tolerance,
            if net.on.precision == PrecisionArg::Fp32 {
                " and every gradient"
            } else {
                " (bf16: gradients reported, not judged)"
            },
            if r.pass { "PASS" } else { "FAIL" }
        );
    }
    Ok(if r.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn ops(args: BenchOpsArgs) -> anyhow::Result<ExitCode> {
    let tolerance = args.tolerance.unwrap_or(match args.on.precision {
        PrecisionArg::Fp32 => 1e-4,
        PrecisionArg::Bf16 => 1e-2,
    });
    let r = op_check(
        &args.on.device,
        kernels(args.on.kernels),
        precision(args.on.precision),
        tolerance,
    )?;
    let failed: Vec<_> = r.diffs.iter().filter(|d| !d.pass).collect();
    if args.on.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        for d in &r.diffs {
            println!(
                "{:<5} {:<55} {:<14} relative L2 {:.2e}",
                if d.pass { "ok" } else { "FAIL" },
                d.case,
                d.tensor,
                d.rel_l2
            );
        }
        println!(
            "{} ({}) vs {}: {} tensors, {} over the tolerance {:.0e}: {}",
            r.device,
            r.checked,
            r.reference,
            r.diffs.len(),
            failed.len(),
            r.tolerance,
            if r.pass { "PASS" } else { "FAIL" }
        );
    }
    for d in &failed {
        eprintln!("FAIL {}: {} relative L2 {:.2e}", d.case, d.tensor, d.rel_l2);
    }
    Ok(if r.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
