//! Mean shift (MSF; Koohpayegani, Tejankar & Pirsiavash 2021): BYOL's predictor and EMA
//! target, and a memory bank of l2-normalised target embeddings. The online prediction
//! `q` of the strong view (view 1) regresses to the mean of the k bank entries nearest
//! to the target embedding `t` of the weak view (view 2), `t` itself inserted into the
//! bank before the search, so its nearest neighbour is itself and k = 1 is BYOL's
//! one-direction loss:
//!
//! `L = mean over the batch of 2 − 2·q̂·m̄`, `m̄ = (1/k)·Σ_{j ∈ kNN(t̂)} b_j`
//!
//! (the paper's loss, the mean over the k neighbours of `‖q̂ − b_j‖²`; one direction, so
//! in [0, 4], half the scale of BYOL's symmetric loss). The views are asymmetric: the
//! `msf` augment preset makes view 1 strong and view 2 weak.

use candle_core::{D, DType, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::config::TrainerConfig;
use crate::dist::gather_rows;
use crate::loss::l2_normalize;
use crate::model::{Compute, Mlp, Network};
use crate::objective::ema::EmaWithMemory;
use crate::objective::memory::Memory;
use crate::objective::{ObjectiveStats, Outcome, predictor};
use crate::state::{StateDict, StateError};

/// Prefix of the target's tensors in the checkpoint's objective state.
pub const TARGET_PREFIX: &str = "target.";
/// Prefix of the memory bank's tensors in the checkpoint's objective state.
pub const BANK_PREFIX: &str = "bank.";

/// MSF's heads: the predictor (`predictor.*`), the EMA target and its memory bank.
pub struct Msf {
    k: usize,
    predictor: Mlp,
    target: EmaWithMemory,
}

impl Msf {
    /// Builds the predictor under `online.pp("predictor")`, the target and an empty bank
    /// of `[msf] bank_size` entries on the same device.
    pub fn new(cfg: &TrainerConfig, compute: Compute, online: VarBuilder) -> Result<Self> {
        Ok(Msf {
            k: cfg.msf.k,
            predictor: predictor(cfg, cfg.model.predictor_hidden, compute, &online)?,
            target: EmaWithMemory::new(cfg, compute, online.device(), TARGET_PREFIX, BANK_PREFIX)?,
        })
    }

    /// The target starts as a copy of the online network.
    pub fn start(&mut self, online: &VarMap) -> Result<()> {
        self.target.network.start(online)
    }

    /// The predictor.
    pub fn predictor(&self) -> &Mlp {
        &self.predictor
    }

    /// The target network.
    pub fn target(&self) -> &Network {
        self.target.network.network()
    }

    /// The memory bank.
    pub fn bank(&self) -> &Memory {
        &self.target.memory
    }

    /// View 1 through the online network and predictor, view 2 through the target; the
    /// mean-shift loss against the bank as it will be once this batch's targets are in.
    pub fn loss(&self, network: &Network, v1: &Tensor, v2: &Tensor) -> Result<Outcome> {
        let z1 = network.forward_t(v1, true)?;
        let q = self.predictor.forward_t(&z1, true)?;
        let t = self.target().forward_t(v2, true)?.detach();
        let t = l2_normalize(&t.to_dtype(DType::F32)?)?;
        // Data-parallel: the bank takes the whole batch's targets, in batch order.
        let all = gather_rows(&t)?;
        let bank = self.bank().after_push(&all)?;
        Ok(Outcome {
            loss: mean_shift_loss(&q, &t, &bank, self.k)?,
            embeddings: z1.detach(),
            keys: Some(all),
        })
    }

    /// The EMA update of the target (τ from `[msf]`), then the batch's target embeddings
    /// `keys` into the bank.
    pub fn after_step(
        &mut self,
        online: &VarMap,
        cfg: &TrainerConfig,
        step: u64,
        keys: Option<&Tensor>,
    ) -> Result<ObjectiveStats> {
        self.target.after_step(online, cfg, step, keys)
    }

    /// The target as `target.<name>` and the bank as `bank.{entries,pointer,filled}`.
    pub fn state(&self) -> Result<StateDict> {
        self.target.state()
    }

    /// Restores [`Msf::state`].
    pub fn load_state(&mut self, state: &StateDict) -> std::result::Result<(), StateError> {
        self.target.load_state(state)
    }

    /// Checks [`Msf::state`]'s tensors without changing anything.
    pub fn check_state(&self, state: &StateDict) -> std::result::Result<(), StateError> {
        self.target.check_state(state)
    }
}

/// The mean-shift loss: `mean_i (2 − 2·q̂_i·m̄_i)`, `m̄_i` the mean of the `k` rows of
/// `bank` `(m, d)` (unit rows) with the largest dot product with the unit target `t_i`;
/// `q` `(n, d)` (any norm), `t` `(n, d)` unit. Gradients flow to `q` only.
///
/// The k nearest are found by k rounds of arg-max (device-agnostic; k is small).
pub fn mean_shift_loss(q: &Tensor, t: &Tensor, bank: &Tensor, k: usize) -> Result<Tensor> {
    let (n, d) = q.dims2()?;
    let m = bank.dim(0)?;
    let k = k.min(m);
    let bank = bank.detach();
    let mut sim = t.detach().matmul(&bank.t()?)?;
    let columns = Tensor::arange(0u32, m as u32, sim.device())?.unsqueeze(0)?;
    // A broadcast scalar: no (n, m) tensor of its own.
    let floor = Tensor::new(f32::NEG_INFINITY, sim.device())?
        .to_dtype(sim.dtype())?
        .broadcast_as((n, m))?;
    let mut picked = Vec::with_capacity(k);
    for round in 0..k {
        let best = sim.argmax_keepdim(D::Minus1)?;
        picked.push(best.clone());
        if round + 1 < k {
            let hit = columns.broadcast_eq(&best)?;
            sim = hit.where_cond(&floor, &sim)?;
        }
    }
    let index = Tensor::cat(&picked, 1)?.flatten_all()?;
    let neighbours = bank.index_select(&index, 0)?.reshape((n, k, d))?;
    let mean = neighbours.mean(1)?.to_dtype(q.dtype())?;
    let cos = (l2_normalize(q)? * mean)?.sum(D::Minus1)?;
    cos.affine(-2.0, 2.0)?.mean_all()?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::regression_loss;
    use candle_core::{Device, Var};

    #[test]
    fn k_one_is_byols_one_direction_loss_and_gradient() {
        let dev = Device::Cpu;
        // Seeded values (candle's CPU generator cannot be seeded): a sine of the index.
        let values = |rows: usize, phase: f32| {
            let v: Vec<f32> = (0..rows * 8)
                .map(|i| (i as f32 * 0.7 + phase).sin())
                .collect();
            Tensor::from_vec(v, (rows, 8), &dev).unwrap()
        };
        let q = Var::from_tensor(&values(6, 0.0)).unwrap();
        let t = l2_normalize(&values(6, 1.0)).unwrap();
        let older = l2_normalize(&values(10, 2.0)).unwrap();
        let bank = Tensor::cat(&[&t, &older], 0).unwrap();
        let msf = mean_shift_loss(q.as_tensor(), &t, &bank, 1).unwrap();
        let byol = regression_loss(q.as_tensor(), &t).unwrap();
        let (a, b) = (
            msf.to_scalar::<f32>().unwrap(),
            byol.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
        let grad = |loss: &Tensor| -> Vec<f32> {
            let grads = loss.backward().unwrap();
            grads
                .get(&q)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (ga, gb) = (grad(&msf), grad(&byol));
        // Relative L2 over the gradient (one element near 0 cannot fail it on rounding).
        let diff: f32 = ga.iter().zip(&gb).map(|(x, y)| (x - y) * (x - y)).sum();
        let norm: f32 = gb.iter().map(|y| y * y).sum();
        assert!(diff.sqrt() <= 1e-6 * norm.sqrt(), "{ga:?} vs {gb:?}");
    }

    #[test]
    fn the_target_regresses_to_the_mean_of_its_k_nearest() {
        let dev = Device::Cpu;
        // Target e0; bank: e0 (itself), then e1 nearer than e2, and -e0 (farthest).
        let s = std::f32::consts::FRAC_1_SQRT_2;
        let t = Tensor::new(&[[1f32, 0.0, 0.0]], &dev).unwrap();
        let bank = Tensor::new(
            &[
                [1f32, 0.0, 0.0],
                [-1.0, 0.0, 0.0],
                [0.0, 0.0, 1.0],
                [s, s, 0.0],
            ],
            &dev,
        )
        .unwrap();
        let q = Tensor::new(&[[0f32, 2.0, 0.0]], &dev).unwrap();
        // k = 2: e0 and (s, s, 0); mean (0.5 + s/2, s/2, 0); q̂ = e1: 2 − 2·s/2.
        let l = mean_shift_loss(&q, &t, &bank, 2)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - (2.0 - s)).abs() < 1e-6, "{l}");
        // k = 3 adds e2 (cos 0 beats -e0's -1): mean's y is s/3.
        let l = mean_shift_loss(&q, &t, &bank, 3)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - (2.0 - 2.0 * s / 3.0)).abs() < 1e-6, "{l}");
    }
}
