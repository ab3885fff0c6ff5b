//! BYOL step throughput on random inputs, with a per-phase profile; the same work as
//! `../shared/bench/peer_torch_byol_step.py byol --opt adamw` (ResNet-18, small-image
//! stem, projector and predictor 4096 → 256).
//!
//! ```text
//! cargo bench -p byol-trainer --bench step                          # widths 16, 32 at batch 256; 64 at batch 64
//! cargo bench -p byol-trainer --bench step -- --width 32 --batch 256 --steps 3
//! cargo bench -p byol-trainer --bench step -- --width 32 --batch 128 --kernels candle
//! python3 ../shared/bench/peer_torch_byol_step.py byol --opt adamw --width 32 --res 32 --batch 256 --steps 3
//! ```

use std::time::Instant;

use byol_trainer::config::{Kernels, ModelConfig, OptimizerKind, Schedule};
use byol_trainer::loss::byol_loss;
use byol_trainer::{Objective, OptimConfig, TrainConfig, Trainer, TrainerConfig};
use candle_core::{Device, Tensor};

fn config(width: usize, kernels: Kernels) -> TrainerConfig {
    TrainerConfig {
        model: ModelConfig {
            width,
            projector_hidden: 4096,
            projection_dim: 256,
            predictor_hidden: 4096,
            ..ModelConfig::small(width)
        },
        optim: OptimConfig {
            optimizer: OptimizerKind::Adamw,
            base_lr: 1e-3,
            schedule: Schedule::Constant,
            ..OptimConfig::default()
        },
        train: TrainConfig {
            device: "cpu".into(),
            kernels,
            ..TrainConfig::default()
        },
        ..TrainerConfig::default()
    }
}

/// Seconds of each phase of one step, measured with the step's own calls.
fn profile(trainer: &Trainer, v1: &Tensor, v2: &Tensor) -> [f64; 4] {
    let network = trainer.network();
    let Objective::Byol(byol) = trainer.objective() else {
        unreachable!("the bench profiles BYOL")
    };
    let t = Instant::now();
    let p1 = byol
        .predictor()
        .forward_t(&network.forward_t(v1, true).unwrap(), true);
    let p2 = byol
        .predictor()
        .forward_t(&network.forward_t(v2, true).unwrap(), true);
    let online = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let z1 = byol.target().forward_t(v1, true).unwrap().detach();
    let z2 = byol.target().forward_t(v2, true).unwrap().detach();
    let target = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let loss = byol_loss(&p1.unwrap(), &p2.unwrap(), &z1, &z2).unwrap();
    let _grads = loss.backward().unwrap();
    let backward = t.elapsed().as_secs_f64();
    let t = Instant::now();
    byol.update_target(trainer.online_vars(), 0.99).unwrap();
    let ema = t.elapsed().as_secs_f64();
    [online, target, backward, ema]
}

/// Peak resident memory of this process so far (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn bench(width: usize, batch: usize, res: usize, steps: usize, kernels: Kernels) {
    let cfg = config(width, kernels);
    let mut trainer = Trainer::new(cfg, batch).unwrap();
    let v1 = Tensor::randn(0f32, 1.0, (batch, 3, res, res), &Device::Cpu).unwrap();
    let v2 = Tensor::randn(0f32, 1.0, (batch, 3, res, res), &Device::Cpu).unwrap();
    trainer.step_tensors(&v1, &v2).unwrap(); // warm-up
    let mut times = Vec::new();
    for _ in 0..steps {
        let t = Instant::now();
        trainer.step_tensors(&v1, &v2).unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let step = times[times.len() / 2];
    let [online, target, backward, ema] = profile(&trainer, &v1, &v2);
    let optimizer = (step - online - target - backward - ema).max(0.0);
    println!(
        "kernels {kernels:?} width {width:>3} batch {batch:>3} res {res}: {:.2} img/s (step {step:.2} s; online fwd {online:.2} s, target fwd {target:.2} s, backward {backward:.2} s, optimizer ~{optimizer:.2} s, EMA {ema:.3} s); peak RSS {:.0} MiB",
        batch as f64 / step,
        peak_rss_mib().unwrap_or(f64::NAN)
    );
}

fn main() {
    byol_trainer::memory::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let steps = opt("--steps").unwrap_or(2);
    let res = opt("--res").unwrap_or(32);
    let kernels = match args
        .iter()
        .position(|a| a == "--kernels")
        .map(|i| args[i + 1].as_str())
    {
        None | Some("auto") => Kernels::Auto,
        Some("candle") => Kernels::Candle,
        Some(other) => panic!("--kernels {other}: expected auto or candle"),
    };
    match (opt("--width"), opt("--batch")) {
        (Some(w), b) => bench(w, b.unwrap_or(256), res, steps, kernels),
        (None, _) => {
            for (w, b) in [(16, 256), (32, 256), (64, 64)] {
                bench(w, b, res, steps, kernels);
            }
        }
    }
}
