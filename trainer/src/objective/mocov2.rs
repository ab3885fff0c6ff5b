//! MoCo v2 (Chen, Fan, Girshick & He 2020; He et al. 2020): a momentum key encoder (an
//! EMA copy of the network, m `[mocov2] tau`) and a FIFO queue of past keys as
//! negatives. The query `q = ẑ(v1)` of the online network is matched to its key
//! `k = ẑ_key(v2)` against the queue's K keys by InfoNCE at temperature T:
//!
//! `L = mean_i −log( exp(q_i·k_i/T) / (exp(q_i·k_i/T) + Σ_j exp(q_i·n_j/T)) )`
//!
//! (the paper's convention: one direction, query view 1, key view 2; after the step the
//! batch's keys are enqueued and the oldest dequeued). Until the queue has filled once,
//! only its filled entries are negatives. Single-process, so no shuffled BatchNorm.

use candle_core::{D, DType, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::config::TrainerConfig;
use crate::dist::gather_rows;
use crate::loss::l2_normalize;
use crate::model::{Compute, Network};
use crate::objective::ema::EmaWithMemory;
use crate::objective::memory::Memory;
use crate::objective::simclr::log_sum_exp;
use crate::objective::{ObjectiveStats, Outcome};
use crate::state::{StateDict, StateError};

/// Prefix of the key encoder's tensors in the checkpoint's objective state.
pub const KEY_PREFIX: &str = "key.";
/// Prefix of the queue's tensors in the checkpoint's objective state.
pub const QUEUE_PREFIX: &str = "queue.";

/// MoCo v2's state: the key encoder and its queue.
pub struct MocoV2 {
    temperature: f64,
    key: EmaWithMemory,
}

impl MocoV2 {
    /// The key encoder (weights set by [`MocoV2::start`]) and an empty queue of
    /// `[mocov2] queue_size` keys on `online`'s device.
    pub fn new(cfg: &TrainerConfig, compute: Compute, online: VarBuilder) -> Result<Self> {
        Ok(MocoV2 {
            temperature: cfg.mocov2.temperature,
            key: EmaWithMemory::new(cfg, compute, online.device(), KEY_PREFIX, QUEUE_PREFIX)?,
        })
    }

    /// The key encoder starts as a copy of the online network.
    pub fn start(&mut self, online: &VarMap) -> Result<()> {
        self.key.network.start(online)
    }

    /// The key encoder.
    pub fn key_encoder(&self) -> &Network {
        self.key.network.network()
    }

    /// The queue.
    pub fn queue(&self) -> &Memory {
        &self.key.memory
    }

    /// Queries from view 1, keys from view 2; InfoNCE against the queue as it is.
    pub fn loss(&self, network: &Network, v1: &Tensor, v2: &Tensor) -> Result<Outcome> {
        let z1 = network.forward_t(v1, true)?;
        let q = l2_normalize(&z1.to_dtype(DType::F32)?)?;
        let k = self.key_encoder().forward_t(v2, true)?.detach();
        let k = l2_normalize(&k.to_dtype(DType::F32)?)?;
        Ok(Outcome {
            loss: info_nce(&q, &k, &self.queue().entries()?, self.temperature)?,
            embeddings: z1.detach(),
            // Data-parallel: the queue takes the whole batch's keys, in batch order.
            keys: Some(gather_rows(&k)?),
        })
    }

    /// The key encoder's EMA update (constant m), then the batch's keys into the queue.
    pub fn after_step(
        &mut self,
        online: &VarMap,
        cfg: &TrainerConfig,
        step: u64,
        keys: Option<&Tensor>,
    ) -> Result<ObjectiveStats> {
        self.key.after_step(online, cfg, step, keys)
    }

    /// The key encoder as `key.<name>` and the queue as `queue.{entries,pointer,filled}`.
    pub fn state(&self) -> Result<StateDict> {
        self.key.state()
    }

    /// Restores [`MocoV2::state`].
    pub fn load_state(&mut self, state: &StateDict) -> std::result::Result<(), StateError> {
        self.key.load_state(state)
    }

    /// Checks [`MocoV2::state`]'s tensors without changing anything.
    pub fn check_state(&self, state: &StateDict) -> std::result::Result<(), StateError> {
        self.key.check_state(state)
    }
}

/// InfoNCE of unit queries `q` `(n, d)` against their unit keys `k` `(n, d)` (detached)
/// and the negatives `queue` `(m, d)` (m may be 0) at temperature `t`: the cross-entropy
/// of logits `[q·k, q·queueᵀ] / t` with the positive at index 0, averaged over the batch.
pub fn info_nce(q: &Tensor, k: &Tensor, queue: &Tensor, t: f64) -> Result<Tensor> {
    let positive = ((q * k.detach())?.sum_keepdim(D::Minus1)? / t)?;
    let logits = if queue.dim(0)? == 0 {
        positive.clone()
    } else {
        let negative = (q.matmul(&queue.detach().t()?)? / t)?;
        Tensor::cat(&[&positive, &negative], 1)?
    };
    (log_sum_exp(&logits)? - positive.squeeze(D::Minus1)?)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn info_nce_matches_its_formula_on_a_hand_computed_batch() {
        let dev = Device::Cpu;
        let (c, s) = (0.6f32, 0.8f32);
        let q = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let k = Tensor::new(&[[c, s], [0.0, 1.0]], &dev).unwrap();
        let queue = Tensor::new(&[[-1f32, 0.0], [s, c], [0.0, -1.0]], &dev).unwrap();
        let t = 0.2;
        let got = info_nce(&q, &k, &queue, t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let (c, s) = (c as f64, s as f64);
        // Row 0: positive c, negatives −1, s, 0. Row 1: positive 1, negatives 0, c, −1.
        let row = |pos: f64, neg: [f64; 3]| {
            let all: f64 = (pos / t).exp() + neg.iter().map(|n| (n / t).exp()).sum::<f64>();
            -((pos / t).exp() / all).ln()
        };
        let want = (row(c, [-1.0, s, 0.0]) + row(1.0, [0.0, c, -1.0])) / 2.0;
        assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
        // An empty queue leaves only the positive: the loss is 0.
        let empty = Tensor::zeros((0, 2), DType::F32, &dev).unwrap();
        let l = info_nce(&q, &k, &empty, t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(l.abs() < 1e-6, "{l}");
    }
}
