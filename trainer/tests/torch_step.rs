//! Our BYOL step against PyTorch's, from the same weights on the same views: the
//! fixtures `tests/fixtures/torch-step/CASE.safetensors` were written by
//! `scripts/peer_byol_step_fixtures.py` (a tiny ResNet-18 with the small stem, fp32, three
//! steps; SGD with and without weight decay on biases and BatchNorm, AdamW, and BYOL's
//! LARS). For each step: the loss, every gradient (from PyTorch's state before the step,
//! so an error shows where it starts), and after our own three steps every weight and
//! running statistic of the online network and the target, and the optimizer's state.
//!
//! Tolerances (relative L2 per tensor, `‖ours − torch‖ / ‖torch‖`): `LOSS_TOL` for the
//! loss, `GRAD_TOL` for gradients, `STEP_TOL` for weights, running statistics and the
//! optimizer's state after one step of ours from PyTorch's state, `CHAIN_TOL` after our
//! own three chained steps. Both sides compute in fp32 with other
//! summation orders (our im2col + GEMM convolution and BatchNorm reductions against
//! PyTorch's oneDNN kernels): one op differs by about 1e-7 relative, a whole backward by
//! about 1e-6, and three steps of an optimizer that divides by a norm (LARS's trust
//! ratio) bring the weights to about 1e-4. A real difference in the arithmetic (a weight
//! decay more or less, another BatchNorm convention, an EMA of the running statistics)
//! is orders of magnitude above these.
//!
//! Some gradients are zero by construction: a bias right before a BatchNorm
//! (`projector.0.bias`, `predictor.0.bias`), and the projector's last bias (its output
//! reaches the online loss only through the predictor's BatchNorm). Both sides compute
//! them as rounding noise, so gradients and optimizer state are compared with a floor:
//! `‖ours − torch‖ / (‖torch‖ + 10⁻³ · rms)`, `rms` the root mean square of the
//! reference tensors' norms (the measure of `byol bench check`). AdamW divides each
//! gradient element by its own magnitude, which turns that noise into steps of ±lr on
//! either side: those parameters (and the running means of the BatchNorms right after
//! them) are left out of AdamW's weight comparison, and every optimizer's state of them
//! (the noise itself, momentum-averaged) out of the state comparison; our gradients of
//! them must be zero up to rounding as PyTorch's are.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use byol_trainer::config::{
    ByolConfig, ModelConfig, OptimConfig, OptimizerKind, Schedule, TrainConfig, TrainerConfig,
};
use byol_trainer::{Trainer, checkpoint};
use candle_core::{DType, Device, Tensor};

/// Relative L2 tolerance of the loss (see the module's note).
const LOSS_TOL: f64 = 1e-5;
/// Of each gradient (with the floor of the module's note).
const GRAD_TOL: f64 = 1e-4;
/// Of each weight, running statistic and optimizer state after one step of ours from
/// PyTorch's state before it.
const STEP_TOL: f64 = 1e-4;
/// The same after our own chained steps from PyTorch's initial state (each step's
/// gradients computed from weights the previous steps' rounding already moved: a small
/// gradient's relative error grows fastest).
const CHAIN_TOL: f64 = 1e-2;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch-step")
        .join(format!("{case}.safetensors"))
}

/// The fixture's tensors and its settings.
fn load(case: &str) -> (HashMap<String, Tensor>, serde_json::Value) {
    let path = fixture(case);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let settings = serde_json::from_str(&meta.metadata().as_ref().unwrap()["settings"]).unwrap();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    (tensors, settings)
}

/// The trainer config the fixture's settings describe.
fn config(s: &serde_json::Value) -> TrainerConfig {
    let f = |k: &str| s[k].as_f64().unwrap();
    let u = |k: &str| s[k].as_u64().unwrap() as usize;
    let optimizer = match s["optimizer"].as_str().unwrap() {
        "sgd" => OptimizerKind::Sgd,
        "adamw" => OptimizerKind::Adamw,
        "lars" => OptimizerKind::Lars,
        other => panic!("optimizer {other}"),
    };
    TrainerConfig {
        model: ModelConfig {
            width: u("width"),
            projector_hidden: u("hidden"),
            projection_dim: u("projection"),
            predictor_hidden: u("hidden"),
            bn_momentum: f("bn_momentum"),
            bn_eps: f("bn_eps"),
            ..ModelConfig::small(u("width"))
        },
        optim: OptimConfig {
            optimizer,
            base_lr: f("base_lr"),
            weight_decay: f("weight_decay"),
            decay_norm_and_bias: s["decay_all"].as_bool().unwrap(),
            momentum: 0.9,
            nesterov: false,
            trust_coefficient: 1e-3,
            adam_betas: [0.9, 0.999],
            adam_eps: 1e-8,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            tau_base: None,
        },
        train: TrainConfig {
            device: "cpu".into(),
            total_steps: s["total_steps"].as_u64().unwrap(),
            ..TrainConfig::default()
        },
        byol: ByolConfig {
            tau_base: f("tau_base"),
        },
        ..TrainerConfig::default()
    }
}

/// The fixture's tensors under `prefix`, with the prefix taken off and `rename` applied.
fn under(t: &HashMap<String, Tensor>, prefix: &str, rename: &str) -> HashMap<String, Tensor> {
    t.iter()
        .filter_map(|(k, v)| Some((format!("{rename}{}", k.strip_prefix(prefix)?), v.clone())))
        .collect()
}

/// A trainer holding PyTorch's state `state` (`init`, or `stepK` after step K), about to
/// run step `step`: written as a checkpoint of ours (online, target, optimizer state,
/// step) and loaded, as a resume would.
fn trainer_at(
    cfg: &TrainerConfig,
    batch: usize,
    t: &HashMap<String, Tensor>,
    state: &str,
    step: u64,
    dir: &Path,
) -> Trainer {
    let mut trainer = Trainer::new(cfg.clone(), batch).unwrap();
    let ck = checkpoint::save(dir, &trainer.state().unwrap(), None, Default::default()).unwrap();
    let save = |file: &str, tensors: HashMap<String, Tensor>| {
        candle_core::safetensors::save(&tensors, ck.join(file)).unwrap();
    };
    save(
        "online.safetensors",
        under(t, &format!("{state}.online."), ""),
    );
    save(
        "objective.safetensors",
        under(t, &format!("{state}.target."), "target."),
    );
    if step > 0 {
        let mut optim = under(t, &format!("{state}.optim."), "");
        if cfg.optim.optimizer == OptimizerKind::Adamw {
            optim.insert(
                "step".into(),
                Tensor::new(&[step as f64], &Device::Cpu).unwrap(),
            );
        }
        save("optimizer.safetensors", optim);
    }
    let meta_path = ck.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["step"] = step.into();
    meta.as_object_mut().unwrap().remove("checksums");
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    trainer.load_checkpoint(&ck).unwrap();
    trainer
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn norm(t: &Tensor) -> f64 {
    values(t).iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// `‖a − b‖ / (‖b‖ + floor)` (`‖a − b‖` when the denominator is 0), in f64.
fn rel_l2(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len());
    let num = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den = b.iter().map(|y| y * y).sum::<f64>().sqrt() + floor;
    if den == 0.0 { num } else { num / den }
}

/// Every tensor of `ours` against `torch` (the same names, both complete, but those
/// starting with a name in `skip`): the worst relative L2 error with its name, with `10⁻³ · rms` of the
/// reference norms as the floor when `floored`; panics on a missing tensor.
fn worst(
    what: &str,
    ours: &[(String, Tensor)],
    torch: &HashMap<String, Tensor>,
    floored: bool,
    skip: &[String],
) -> (f64, String) {
    assert_eq!(
        ours.len(),
        torch.len(),
        "{what}: {} tensors of ours, {} of PyTorch's",
        ours.len(),
        torch.len()
    );
    let floats = || torch.values().filter(|t| t.dtype() != DType::I64);
    let rms = (floats().map(|t| norm(t).powi(2)).sum::<f64>() / floats().count() as f64).sqrt();
    let floor = if floored { 1e-3 * rms } else { 0.0 };
    ours.iter()
        .filter(|(name, _)| !skip.iter().any(|s| name.starts_with(s.as_str())))
        .map(|(name, t)| {
            let want = torch
                .get(name)
                .unwrap_or_else(|| panic!("{what}: {name} is not in the fixture"));
            assert_eq!(t.dims(), want.dims(), "{what}: {name}");
            if t.dtype() == DType::I64 {
                let (a, b): (i64, i64) = (
                    t.reshape(()).unwrap().to_scalar().unwrap(),
                    want.reshape(()).unwrap().to_scalar().unwrap(),
                );
                assert_eq!(a, b, "{what}: {name}");
                return (0.0, name.clone());
            }
            (rel_l2(t, want, floor), name.clone())
        })
        .fold((0.0, String::new()), |w, x| if x.0 > w.0 { x } else { w })
}

/// The parameters whose gradient is zero by construction: in the fixture's first step,
/// below 10⁻⁶ of the largest gradient's norm.
fn null_gradients(t: &HashMap<String, Tensor>) -> Vec<String> {
    let grads = under(t, "step0.grad.", "");
    let largest = grads.values().map(norm).fold(0.0, f64::max);
    let mut null: Vec<String> = grads
        .iter()
        .filter(|(_, g)| norm(g) < 1e-6 * largest)
        .map(|(n, _)| n.clone())
        .collect();
    null.sort();
    null
}

/// Checks `case` step by step; returns the worst error of each kind (for the report).
fn check(case: &str) -> Vec<(String, f64, String)> {
    let (t, s) = load(case);
    let cfg = config(&s);
    let batch = s["batch"].as_u64().unwrap() as usize;
    let steps = s["steps"].as_u64().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let null = null_gradients(&t);
    assert_eq!(
        null,
        ["predictor.0.bias", "projector.0.bias", "projector.3.bias"],
        "the gradients that vanish by construction"
    );
    // AdamW: those parameters, and the running means of the BatchNorms right after them.
    let adamw_skip: Vec<String> = if cfg.optim.optimizer == OptimizerKind::Adamw {
        let mut skip = null.clone();
        skip.extend([
            "projector.1.running_mean".into(),
            "predictor.1.running_mean".into(),
        ]);
        skip
    } else {
        Vec::new()
    };
    // The optimizer's state of a parameter whose gradient is rounding noise is noise too.
    let state_skip: Vec<String> = null.iter().chain(&adamw_skip).cloned().collect();
    let mut report = Vec::new();
    let mut note = |what: String, tol: f64, (err, name): (f64, String)| {
        assert!(
            err <= tol,
            "{case}: {what}: {name} differs by {err:.2e} (tolerance {tol:.0e})"
        );
        report.push((what, err, name));
    };
    // Each step's loss and gradients, from PyTorch's state before it.
    for k in 0..steps {
        let before = if k == 0 {
            "init".to_owned()
        } else {
            format!("step{}", k - 1)
        };
        let trainer = trainer_at(
            &cfg,
            batch,
            &t,
            &before,
            k,
            &dir.path().join(format!("g{k}")),
        );
        let (v1, v2) = (&t[&format!("step{k}.v1")], &t[&format!("step{k}.v2")]);
        let (loss, grads) = trainer.loss_and_grads(v1, v2).unwrap();
        let torch_loss = &t[&format!("step{k}.loss")];
        note(
            format!("step {k} loss"),
            LOSS_TOL,
            (
                rel_l2(&loss.reshape(1).unwrap(), torch_loss, 0.0),
                "loss".into(),
            ),
        );
        let ours: Vec<(String, Tensor)> = trainer
            .trainable_named()
            .into_iter()
            .map(|(n, v)| (n, grads.get(v.as_tensor()).unwrap().clone()))
            .collect();
        let torch_grads = under(&t, &format!("step{k}.grad."), "");
        note(
            format!("step {k} gradients"),
            GRAD_TOL,
            worst("gradients", &ours, &torch_grads, true, &null),
        );
        // Ours are zero up to rounding where PyTorch's are.
        let largest = torch_grads.values().map(norm).fold(0.0, f64::max);
        for (name, g) in ours.iter().filter(|(n, _)| null.contains(n)) {
            assert!(
                norm(g) < 1e-5 * largest,
                "{case}: step {k}: {name}: {:.2e}",
                norm(g)
            );
        }
    }
    // One step of ours from PyTorch's state before it (so an error shows at the step it
    // starts), then three chained steps of ours from PyTorch's initial state: the
    // weights and running statistics of the online network and the target, and the
    // optimizer's state, after each.
    let mut chained = trainer_at(&cfg, batch, &t, "init", 0, &dir.path().join("run"));
    for k in 0..steps {
        let (v1, v2) = (&t[&format!("step{k}.v1")], &t[&format!("step{k}.v2")]);
        let before = if k == 0 {
            "init".to_owned()
        } else {
            format!("step{}", k - 1)
        };
        let mut single = trainer_at(
            &cfg,
            batch,
            &t,
            &before,
            k,
            &dir.path().join(format!("s{k}")),
        );
        single.step_tensors(v1, v2).unwrap();
        chained.step_tensors(v1, v2).unwrap();
        let torch_online = under(&t, &format!("step{k}.online."), "");
        let torch_target = under(&t, &format!("step{k}.target."), "");
        let torch_optim = under(&t, &format!("step{k}.optim."), "");
        for (run, trainer, tol) in [
            ("one step", &single, STEP_TOL),
            ("chained", &chained, CHAIN_TOL),
        ] {
            let online: Vec<(String, Tensor)> = trainer
                .online_named()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect();
            note(
                format!("step {k} online weights ({run})"),
                tol,
                worst("online", &online, &torch_online, false, &adamw_skip),
            );
            let target: Vec<(String, Tensor)> = trainer
                .objective()
                .state()
                .unwrap()
                .into_iter()
                .filter_map(|(n, v)| Some((n.strip_prefix("target.")?.to_owned(), v)))
                .collect();
            note(
                format!("step {k} target ({run})"),
                tol,
                worst("target", &target, &torch_target, false, &adamw_skip),
            );
            let ck = checkpoint::save(
                &dir.path().join(format!("states-{run}")),
                &trainer.state().unwrap(),
                None,
                Default::default(),
            )
            .unwrap();
            let optim: Vec<(String, Tensor)> =
                candle_core::safetensors::load(ck.join("optimizer.safetensors"), &Device::Cpu)
                    .unwrap()
                    .into_iter()
                    .filter(|(n, _)| n != "step")
                    .collect();
            note(
                format!("step {k} optimizer state ({run})"),
                tol,
                worst("optimizer", &optim, &torch_optim, true, &state_skip),
            );
        }
    }
    report
}

fn run_case(case: &str) {
    for (what, err, name) in check(case) {
        eprintln!("{case}: {what}: worst {err:.2e} ({name})");
    }
}

#[test]
fn sgd_matches_pytorch_step_for_step() {
    run_case("sgd");
}

#[test]
fn sgd_with_weight_decay_on_every_parameter_matches_pytorch() {
    run_case("sgd-decay-all");
}

#[test]
fn adamw_matches_pytorch_step_for_step() {
    run_case("adamw");
}

#[test]
fn lars_matches_byols_definition_step_for_step() {
    run_case("lars");
}

/// The online variable `name` of `trainer`.
fn online_var(trainer: &Trainer, name: &str) -> candle_core::Var {
    trainer
        .online_named()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no online variable {name}"))
        .1
}

/// The switch is what the two SGD fixtures differ by: decaying biases and BatchNorm's
/// parameters moves them, and ours without the switch does not match PyTorch's run with
/// decay on every parameter (so the fixture can tell the two apart).
#[test]
fn weight_decay_on_norm_and_bias_is_a_switch_the_fixture_tells_apart() {
    let (t, s) = load("sgd-decay-all");
    let mut cfg = config(&s);
    cfg.optim.decay_norm_and_bias = false;
    let dir = tempfile::tempdir().unwrap();
    let batch = s["batch"].as_u64().unwrap() as usize;
    let mut trainer = trainer_at(&cfg, batch, &t, "init", 0, dir.path());
    trainer
        .step_tensors(&t["step0.v1"], &t["step0.v2"])
        .unwrap();
    let bias = online_var(&trainer, "projector.0.bias");
    // Its gradient vanishes (a BatchNorm follows): only the decay moves it, by
    // lr · wd = 1.6e-4 of its value; both sides' rounding is far below that.
    let init = &t["init.online.projector.0.bias"];
    let moved = rel_l2(&t["step0.online.projector.0.bias"], init, 0.0);
    let err = rel_l2(bias.as_tensor(), &t["step0.online.projector.0.bias"], 0.0);
    assert!(moved > 1e-4, "the decay moved it by {moved:.2e}");
    assert!(
        err > 0.9 * moved,
        "without the switch: {err:.2e} of {moved:.2e}"
    );
    // With the switch, ours follows.
    cfg.optim.decay_norm_and_bias = true;
    let mut trainer = trainer_at(&cfg, batch, &t, "init", 0, &dir.path().join("on"));
    trainer
        .step_tensors(&t["step0.v1"], &t["step0.v2"])
        .unwrap();
    let bias = online_var(&trainer, "projector.0.bias");
    let err = rel_l2(bias.as_tensor(), &t["step0.online.projector.0.bias"], 0.0);
    assert!(
        err < 0.01 * moved,
        "with the switch: {err:.2e} of {moved:.2e}"
    );
}
