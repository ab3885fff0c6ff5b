//! The projector and predictor: Linear → BatchNorm → ReLU → Linear.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{Compute, Dense, Norm};
use crate::config::ModelConfig;

/// A two-layer MLP with BatchNorm in between (BYOL's projector and predictor).
pub struct Mlp {
    fc1: Dense,
    bn: Norm,
    fc2: Dense,
}

impl Mlp {
    /// `input → hidden → output`; parameters `0.*` (linear), `1.*` (BatchNorm), `3.*` (linear),
    /// as in a PyTorch `nn.Sequential(Linear, BatchNorm1d, ReLU, Linear)`.
    pub fn new(
        input: usize,
        hidden: usize,
        output: usize,
        cfg: &ModelConfig,
        compute: Compute,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Mlp {
            fc1: Dense::new(input, hidden, compute, vb.pp("0"))?,
            bn: Norm::new(hidden, cfg, compute, vb.pp("1"))?,
            fc2: Dense::new(hidden, output, compute, vb.pp("3"))?,
        })
    }

    /// Forward pass; BatchNorm uses batch statistics when `train`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn.forward_t(&self.fc1.forward(x)?, train, true)?;
        self.fc2.forward(&h)
    }
}
