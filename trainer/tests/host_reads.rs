//! Every device-to-host read in `byol-trainer` and `byol-run` goes through
//! `byol_trainer::host` (counted): no `to_scalar`, `to_vec1/2/3` or copy to the CPU
//! anywhere else in their sources (tests aside). And the step itself reads nothing: its
//! loss and non-finite flag stay on the device until `Trainer::read_health`.

mod common;

use common::tiny_model;

use std::path::Path;

use byol_trainer::host::reads_on_this_thread;
use byol_trainer::{TrainConfig, Trainer, TrainerConfig};
use candle_core::Tensor;

/// `(file, line number, line)` of every device read outside `host.rs` in `dir`'s
/// sources, up to each file's `#[cfg(test)]`.
fn reads_outside_host(dir: &Path, found: &mut Vec<(String, usize, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            reads_outside_host(&path, found);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") || path.ends_with("host.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("#[cfg(test)]") {
                break;
            }
            let code = line.split("//").next().unwrap_or("");
            let reads = code.contains(".to_scalar")
                || ["to_vec1", "to_vec2", "to_vec3"]
                    .iter()
                    .any(|f| code.contains(f))
                || (code.contains("to_device") && code.contains("Cpu"));
            if reads {
                found.push((path.display().to_string(), i + 1, line.trim().to_owned()));
            }
        }
    }
}

#[test]
fn every_device_read_goes_through_the_counting_function() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut found = Vec::new();
    for dir in ["trainer/src", "run/src"] {
        reads_outside_host(&root.join(dir), &mut found);
    }
    assert!(
        found.is_empty(),
        "device reads outside byol_trainer::host:\n{}",
        found
            .iter()
            .map(|(f, n, l)| format!("{f}:{n}: {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn tiny() -> TrainerConfig {
    TrainerConfig {
        model: tiny_model(),
        train: TrainConfig {
            device: "cpu".into(),
            ..TrainConfig::default()
        },
        ..TrainerConfig::default()
    }
}

#[test]
fn the_step_reads_nothing_and_the_health_read_finds_a_non_finite_loss() {
    let mut t = Trainer::new(tiny(), 4).unwrap();
    let (a, b) = common::views(4, 8, 1);
    let before = reads_on_this_thread();
    for _ in 0..3 {
        t.step_tensors(&a, &b).unwrap();
    }
    assert_eq!(reads_on_this_thread(), before, "three steps, no read");
    let h = t.read_health().unwrap();
    assert!(h.loss.is_finite() && h.non_finite_at.is_none(), "{h:?}");
    // A NaN weight after the last ReLU (which would swallow a NaN input) makes the loss
    // of step 4 NaN.
    let (_, w) = t
        .online_named()
        .into_iter()
        .find(|(n, _)| n == "predictor.3.weight")
        .unwrap();
    w.set(&Tensor::full(f32::NAN, w.shape(), w.device()).unwrap())
        .unwrap();
    t.step_tensors(&a, &b).unwrap();
    t.step_tensors(&a, &b).unwrap();
    let h = t.read_health().unwrap();
    assert_eq!(h.non_finite_at, Some(4), "the first bad step, {h:?}");
    assert!(h.loss.is_nan(), "the weights carry it on: {h:?}");
    // The flag is cleared by the read; the weights stay NaN.
    t.step_tensors(&a, &b).unwrap();
    assert_eq!(t.read_health().unwrap().non_finite_at, Some(6));
}
