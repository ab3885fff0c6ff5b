//! The projector and predictor: Linear → normalisation → ReLU → Linear, the
//! normalisation chosen by `[model] head_norm`.

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{Compute, Dense, Norm};
use crate::config::{HEAD_GROUPS, HeadNorm, ModelConfig};

/// Weight standardisation's epsilon, added to the standard deviation (Qiao et al. 2019).
const WS_EPS: f64 = 1e-5;

/// The normalisation between the two linear layers.
enum Middle {
    /// BatchNorm (+ ReLU in the same kernel).
    Batch(Norm),
    /// GroupNorm over [`HEAD_GROUPS`] groups of features, affine; the first linear
    /// layer's weight is standardised.
    Group {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    },
    /// Nothing.
    None,
}

/// A two-layer MLP with a normalisation in between (BYOL's projector and predictor).
pub struct Mlp {
    fc1: Dense,
    middle: Middle,
    fc2: Dense,
}

impl Mlp {
    /// `input → hidden → output`; parameters `0.*` (linear), `1.*` (the normalisation's
    /// affine parameters and BatchNorm's running statistics; none for
    /// [`HeadNorm::None`]), `3.*` (linear), as in a PyTorch
    /// `nn.Sequential(Linear, BatchNorm1d, ReLU, Linear)`.
    pub fn new(
        input: usize,
        hidden: usize,
        output: usize,
        cfg: &ModelConfig,
        compute: Compute,
        vb: VarBuilder,
    ) -> Result<Self> {
        let middle = match cfg.head_norm {
            HeadNorm::Batch => Middle::Batch(Norm::new(hidden, cfg, compute, vb.pp("1"))?),
            HeadNorm::GroupWs => Middle::Group {
                weight: vb
                    .pp("1")
                    .get_with_hints(hidden, "weight", candle_nn::Init::Const(1.0))?,
                bias: vb
                    .pp("1")
                    .get_with_hints(hidden, "bias", candle_nn::Init::Const(0.0))?,
                eps: cfg.bn_eps,
            },
            HeadNorm::None => Middle::None,
        };
        Ok(Mlp {
            fc1: Dense::new(input, hidden, compute, vb.pp("0"))?,
            middle,
            fc2: Dense::new(hidden, output, compute, vb.pp("3"))?,
        })
    }

    /// Forward pass `(n, input)` → `(n, output)`; BatchNorm uses batch statistics when
    /// `train` (GroupNorm has none: the same either way).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = match &self.middle {
            Middle::Batch(bn) => bn.forward_t(&self.fc1.forward(x)?, train, true)?,
            Middle::Group { weight, bias, eps } => {
                let w = standardize(self.fc1.weight())?;
                group_norm(&self.fc1.forward_with(x, &w)?, weight, bias, *eps)?.relu()?
            }
            Middle::None => self.fc1.forward(x)?.relu()?,
        };
        self.fc2.forward(&h)
    }
}

/// Weight standardisation of a linear weight `(out, in)`: each row minus its mean,
/// divided by its (unbiased) standard deviation + 1e-5 (Qiao et al. 2019, their code).
pub fn standardize(w: &Tensor) -> Result<Tensor> {
    let fan_in = w.dim(1)?;
    let centred = w.broadcast_sub(&w.mean_keepdim(1)?)?;
    let var = (centred.sqr()?.sum_keepdim(1)? / (fan_in.max(2) - 1) as f64)?;
    centred.broadcast_div(&(var.sqrt()? + WS_EPS)?)
}

/// GroupNorm of `(n, c)` features over [`HEAD_GROUPS`] groups of `c / HEAD_GROUPS`
/// features each (biased variance, `eps` inside the root, as `nn.GroupNorm`), then the
/// per-feature affine `weight`, `bias` of shape `(c)`.
pub fn group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let (n, c) = x.dims2()?;
    let g = x.reshape((n, HEAD_GROUPS, c / HEAD_GROUPS))?;
    let centred = g.broadcast_sub(&g.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape((n, c))?;
    y.broadcast_mul(weight)?.broadcast_add(bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn weight_standardisation_matches_its_formula() {
        let w = Tensor::new(
            &[[1f32, 2.0, 3.0, 6.0], [-1.0, -1.0, 1.0, 1.0]],
            &Device::Cpu,
        )
        .unwrap();
        let got: Vec<Vec<f32>> = standardize(&w).unwrap().to_vec2().unwrap();
        // Row 0: mean 3, unbiased variance (4 + 1 + 0 + 9) / 3.
        let sd = (14f64 / 3.0).sqrt() + 1e-5;
        let want0: Vec<f32> = [-2.0, -1.0, 0.0, 3.0]
            .iter()
            .map(|x| (x / sd) as f32)
            .collect();
        // Row 1: mean 0, unbiased variance 4 / 3.
        let sd = (4f64 / 3.0).sqrt() + 1e-5;
        let want1: Vec<f32> = [-1.0, -1.0, 1.0, 1.0]
            .iter()
            .map(|x| (x / sd) as f32)
            .collect();
        for (g, w) in got.iter().flatten().zip(want0.iter().chain(&want1)) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn group_norm_normalises_each_group_of_each_sample() {
        let c = 2 * HEAD_GROUPS;
        // Sample 0: pairs (k, 3k) per group; sample 1: constant groups.
        let x: Vec<f32> = (0..HEAD_GROUPS)
            .flat_map(|k| [k as f32, 3.0 * k as f32])
            .chain(std::iter::repeat_n(5.0, c))
            .collect();
        let x = Tensor::from_vec(x, (2, c), &Device::Cpu).unwrap();
        let weight = Tensor::full(2f32, c, &Device::Cpu).unwrap();
        let bias = Tensor::full(0.5f32, c, &Device::Cpu).unwrap();
        let y: Vec<Vec<f32>> = group_norm(&x, &weight, &bias, 1e-5)
            .unwrap()
            .to_vec2()
            .unwrap();
        for k in 1..HEAD_GROUPS {
            // Two values a < b: normalised to ∓ (b − a)/2 / sqrt(((b − a)/2)² + ε).
            let half = k as f64;
            let z = half / (half * half + 1e-5).sqrt();
            let (lo, hi) = (y[0][2 * k], y[0][2 * k + 1]);
            assert!((f64::from(lo) - (0.5 - 2.0 * z)).abs() < 1e-5, "{lo}");
            assert!((f64::from(hi) - (0.5 + 2.0 * z)).abs() < 1e-5, "{hi}");
        }
        // A constant group normalises to 0, leaving the bias.
        assert!(y[1].iter().all(|v| (v - 0.5).abs() < 1e-6), "{:?}", y[1]);
    }
}
