//! The projector and predictor: Linear → BatchNorm → ReLU → Linear.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, Linear, VarBuilder};

use super::batch_norm;
use crate::config::ModelConfig;

/// A two-layer MLP with BatchNorm in between (BYOL's projector and predictor).
pub struct Mlp {
    fc1: Linear,
    bn: BatchNorm,
    fc2: Linear,
}

impl Mlp {
    /// `input → hidden → output`; parameters `0.*` (linear), `1.*` (BatchNorm), `3.*` (linear),
    /// as in a PyTorch `nn.Sequential(Linear, BatchNorm1d, ReLU, Linear)`.
    pub fn new(
        input: usize,
        hidden: usize,
        output: usize,
        cfg: &ModelConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Mlp {
            fc1: candle_nn::linear(input, hidden, vb.pp("0"))?,
            bn: batch_norm(hidden, cfg, vb.pp("1"))?,
            fc2: candle_nn::linear(hidden, output, vb.pp("3"))?,
        })
    }

    /// Forward pass; BatchNorm uses batch statistics when `train`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn.forward_t(&self.fc1.forward(x)?, train)?.relu()?;
        self.fc2.forward(&h)
    }
}
