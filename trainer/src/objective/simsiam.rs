//! SimSiam (Chen & He 2021): no target network; each view's prediction regresses to the
//! other view's projection under a stop-gradient,
//!
//! `L = −½·(cos(p1, sg z2) + cos(p2, sg z1))` (in [−1, 1]; the paper's convention, so
//! equal to (BYOL's loss − 4) / 4 on the same network),
//!
//! with a bottleneck predictor (`projection_dim → projection_dim / bottleneck →
//! projection_dim`) and projections ending in a BatchNorm without affine parameters
//! (`[simsiam] output_bn`). The shared projector has two layers, the paper's CIFAR
//! setting (its ImageNet projector has three).

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::TrainerConfig;
use crate::dist::{gather_rows, own_rows};
use crate::loss::{batch_standardize, l2_normalize};
use crate::model::{Compute, Mlp, Network};
use crate::objective::{Outcome, predictor};

/// BatchNorm's ε of the output BatchNorm (PyTorch's default).
const OUTPUT_BN_EPS: f64 = 1e-5;

/// SimSiam's head: the bottleneck predictor (`predictor.*`).
pub struct SimSiam {
    predictor: Mlp,
    output_bn: bool,
    /// The output BatchNorm takes the whole data-parallel batch's statistics.
    synced: bool,
}

impl SimSiam {
    /// Builds the predictor under `online.pp("predictor")`.
    pub fn new(cfg: &TrainerConfig, compute: Compute, online: VarBuilder) -> Result<Self> {
        let hidden = cfg.model.projection_dim / cfg.simsiam.bottleneck;
        Ok(SimSiam {
            predictor: predictor(cfg, hidden, compute, &online)?,
            output_bn: cfg.simsiam.output_bn,
            synced: cfg.model.synced_bn,
        })
    }

    /// The predictor.
    pub fn predictor(&self) -> &Mlp {
        &self.predictor
    }

    /// A view's projection `z` (through the output BatchNorm when set).
    fn project(&self, network: &Network, v: &Tensor) -> Result<Tensor> {
        let z = network.forward_t(v, true)?;
        match (self.output_bn, self.synced) {
            // Over the whole data-parallel batch: the gathered rows standardised, this
            // rank's kept (the gather carries their gradients back).
            (true, true) => own_rows(
                &batch_standardize(&gather_rows(&z)?, OUTPUT_BN_EPS)?,
                z.dim(0)?,
            ),
            (true, false) => batch_standardize(&z, OUTPUT_BN_EPS),
            (false, _) => Ok(z),
        }
    }

    /// Both views through the network and the predictor; the symmetric negative cosine.
    pub fn loss(&self, network: &Network, v1: &Tensor, v2: &Tensor) -> Result<Outcome> {
        let z1 = self.project(network, v1)?;
        let p1 = self.predictor.forward_t(&z1, true)?;
        let z2 = self.project(network, v2)?;
        let p2 = self.predictor.forward_t(&z2, true)?;
        Ok(Outcome {
            loss: simsiam_loss(&p1, &p2, &z1, &z2)?,
            embeddings: z1.detach(),
            keys: None,
        })
    }
}

/// `−½·(cos(p1, sg z2) + cos(p2, sg z1))`, each cosine averaged over the batch; rows
/// `(n, d)`.
pub fn simsiam_loss(p1: &Tensor, p2: &Tensor, z1: &Tensor, z2: &Tensor) -> Result<Tensor> {
    let cos = |p: &Tensor, z: &Tensor| -> Result<Tensor> {
        (l2_normalize(p)? * l2_normalize(&z.detach())?)?
            .sum(D::Minus1)?
            .mean_all()
    };
    (cos(p1, z2)? + cos(p2, z1)?)? * -0.5
}
