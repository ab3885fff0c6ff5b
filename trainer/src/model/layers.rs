//! Convolution and BatchNorm layers that run our fused CPU kernels or candle's ops,
//! with the same parameters (and names) either way.

use candle_core::{Module, ModuleT, Result, Tensor, Var};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, VarBuilder};

use crate::config::ModelConfig;
use crate::kernels;

/// A bias-free 2-D convolution (`weight`).
pub struct Conv {
    inner: Conv2d,
    stride: usize,
    padding: usize,
    fused: bool,
}

impl Conv {
    /// A `k × k` convolution from `cin` to `cout` channels.
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        fused: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        Ok(Conv {
            inner: candle_nn::conv2d_no_bias(cin, cout, k, cfg, vb)?,
            stride,
            padding,
            fused,
        })
    }

    /// Applies the convolution to `(n, cin, h, w)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.fused {
            kernels::conv2d(x, self.inner.weight(), self.stride, self.padding)
        } else {
            self.inner.forward(x)
        }
    }
}

/// An affine BatchNorm in PyTorch's layout (`weight`, `bias`, `running_mean`,
/// `running_var`) and conventions (momentum, unbiased running variance), with an
/// optional ReLU after it.
pub struct Norm {
    inner: BatchNorm,
    running_mean: Var,
    running_var: Var,
    momentum: f64,
    eps: f64,
    fused: bool,
}

impl Norm {
    /// A BatchNorm over `channels` with the config's momentum and epsilon.
    pub fn new(channels: usize, cfg: &ModelConfig, fused: bool, vb: VarBuilder) -> Result<Self> {
        let bn_cfg = candle_nn::BatchNormConfig {
            eps: cfg.bn_eps,
            remove_mean: true,
            affine: true,
            momentum: cfg.bn_momentum,
        };
        let inner = candle_nn::batch_norm(channels, bn_cfg, vb)?;
        Ok(Norm {
            running_mean: Var::from_tensor(inner.running_mean())?,
            running_var: Var::from_tensor(inner.running_var())?,
            inner,
            momentum: cfg.bn_momentum,
            eps: cfg.bn_eps,
            fused,
        })
    }

    /// Normalises with batch statistics (updating the running ones) when `train`, with
    /// the running statistics otherwise; then ReLU when `relu`.
    pub fn forward_t(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if !self.fused {
            let y = self.inner.forward_t(x, train)?;
            return if relu { y.relu() } else { Ok(y) };
        }
        let (weight, bias) = self
            .inner
            .weight_and_bias()
            .expect("the BatchNorm is affine");
        if !train {
            return kernels::batch_norm_eval(
                x,
                weight,
                bias,
                self.running_mean.as_tensor(),
                self.running_var.as_tensor(),
                self.eps,
                relu,
            );
        }
        let out = kernels::batch_norm_train(x, weight, bias, self.eps, relu)?;
        let m = self.momentum as f32;
        let unbias = if out.count > 1 {
            out.count as f32 / (out.count - 1) as f32
        } else {
            1.0
        };
        let blend = |running: &Var, batch: &[f32], factor: f32| -> Result<()> {
            let old: Vec<f32> = running.as_tensor().to_vec1()?;
            let new: Vec<f32> = old
                .iter()
                .zip(batch)
                .map(|(r, b)| (1.0 - m) * r + m * b * factor)
                .collect();
            running.set(&Tensor::from_vec(new, old.len(), x.device())?)
        };
        blend(&self.running_mean, &out.mean, 1.0)?;
        blend(&self.running_var, &out.var, unbias)?;
        Ok(out.y)
    }
}
