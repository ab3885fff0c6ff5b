//! Convolution GFLOP/s per layer shape of ResNet-18 at 32 px (small-image stem):
//! our kernel against candle's, forward and backward (input and weight gradients),
//! the same work as `../shared/bench/peer_torch_byol_step.py conv` (padding k/2, no
//! bias, loss = sum of the output).
//!
//! ```text
//! cargo bench -p byol-trainer --bench kernels                      # width 32, batch 256
//! cargo bench -p byol-trainer --bench kernels -- --width 64 --batch 64 --reps 3
//! cargo bench -p byol-trainer --bench kernels -- --batch-norm        # BatchNorm + ReLU per stage
//! python3 ../shared/bench/peer_torch_byol_step.py conv --batch 256 --res 32 --cin 32 --cout 32 --k 3 --stride 1
//! ```

use std::time::Instant;

use byol_trainer::kernels;
use candle_core::{Device, Tensor, Var};

/// `(cin, cout, k, stride, input resolution)` of every distinct convolution.
fn resnet18_shapes(w: usize) -> Vec<(usize, usize, usize, usize, usize)> {
    vec![
        (3, w, 3, 1, 32),
        (w, w, 3, 1, 32),
        (w, 2 * w, 3, 2, 32),
        (2 * w, 2 * w, 3, 1, 16),
        (w, 2 * w, 1, 2, 32),
        (2 * w, 4 * w, 3, 2, 16),
        (4 * w, 4 * w, 3, 1, 8),
        (2 * w, 4 * w, 1, 2, 16),
        (4 * w, 8 * w, 3, 2, 8),
        (8 * w, 8 * w, 3, 1, 4),
        (4 * w, 8 * w, 1, 2, 8),
    ]
}

/// Median forward and backward seconds of `conv` over `reps` runs (after a warm-up).
fn time(reps: usize, x: &Var, conv: impl Fn(&Tensor) -> Tensor) -> (f64, f64) {
    let (mut fw, mut bw) = (Vec::new(), Vec::new());
    for r in 0..=reps {
        let t0 = Instant::now();
        let s = conv(x.as_tensor()).sum_all().unwrap();
        let t1 = Instant::now();
        let grads = s.backward().unwrap();
        let t2 = Instant::now();
        drop(grads);
        if r > 0 {
            fw.push((t1 - t0).as_secs_f64());
            bw.push((t2 - t1).as_secs_f64());
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    (median(fw), median(bw))
}

/// Milliseconds of BatchNorm + ReLU (training mode) forward and backward on the
/// feature maps of each stage, ours against candle's.
fn bench_batch_norm(width: usize, batch: usize, reps: usize) {
    use byol_trainer::config::ModelConfig;
    use byol_trainer::model::{Compute, Norm};
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};
    println!("BatchNorm + ReLU, training mode, ms (forward | backward)");
    println!(
        "{:>5} {:>4} | {:>8} {:>8} | {:>8} {:>8}",
        "c", "res", "ours fw", "ours bw", "cndl fw", "cndl bw"
    );
    for (c, res) in [(width, 32), (2 * width, 16), (4 * width, 8), (8 * width, 4)] {
        let x = Var::randn(0f32, 1.0, (batch, c, res, res), &Device::Cpu).unwrap();
        let mut row = Vec::new();
        for fused in [true, false] {
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
            let norm = Norm::new(
                c,
                &ModelConfig::default(),
                if fused {
                    Compute::Ours
                } else {
                    Compute::Candle
                },
                vb,
            )
            .unwrap();
            let (f, b) = time(reps, &x, |x| norm.forward_t(x, true, true).unwrap());
            row.extend([f * 1e3, b * 1e3]);
        }
        println!(
            "{c:>5} {res:>4} | {:>8.1} {:>8.1} | {:>8.1} {:>8.1}",
            row[0], row[1], row[2], row[3]
        );
    }
}

fn main() {
    byol_trainer::memory::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (width, batch, reps) = (opt("--width", 32), opt("--batch", 256), opt("--reps", 3));
    let skip_candle = args.iter().any(|a| a == "--ours-only");
    if args.iter().any(|a| a == "--batch-norm") {
        bench_batch_norm(width, batch, reps);
        return;
    }
    println!(
        "conv GFLOP/s, batch {batch}, {} threads (forward | backward: input + weight)",
        rayon::current_num_threads()
    );
    println!(
        "{:>5} {:>5} {:>2} {:>2} {:>4} | {:>8} {:>8} | {:>8} {:>8}",
        "cin", "cout", "k", "s", "res", "ours fw", "ours bw", "cndl fw", "cndl bw"
    );
    for (cin, cout, k, stride, res) in resnet18_shapes(width) {
        let pad = k / 2;
        let x = Var::randn(0f32, 1.0, (batch, cin, res, res), &Device::Cpu).unwrap();
        let wt = Var::randn(0f32, 0.1, (cout, cin, k, k), &Device::Cpu).unwrap();
        let out = (res + 2 * pad - k) / stride + 1;
        let flops = 2.0 * (batch * cout * out * out * cin * k * k) as f64;
        let gf = |s: f64, mult: f64| mult * flops / s / 1e9;
        let (of, ob) = time(reps, &x, |x| {
            kernels::conv2d(x, wt.as_tensor(), stride, pad).unwrap()
        });
        let (cf, cb) = if skip_candle {
            (f64::NAN, f64::NAN)
        } else {
            time(reps, &x, |x| {
                x.conv2d(wt.as_tensor(), pad, stride, 1, 1).unwrap()
            })
        };
        println!(
            "{cin:>5} {cout:>5} {k:>2} {stride:>2} {res:>4} | {:>8.1} {:>8.1} | {:>8.1} {:>8.1}",
            gf(of, 1.0),
            gf(ob, 2.0),
            gf(cf, 1.0),
            gf(cb, 2.0)
        );
    }
}
