//! Convolution and BatchNorm layers that run our kernels (CPU and CUDA) or candle's ops,
//! with the same parameters (and names) either way.

use candle_core::{DType, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, Linear, VarBuilder};

use crate::config::{Kernels, ModelConfig, Precision};
use crate::kernels;

/// How the layers compute: whose kernels, and in which precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compute {
    /// candle's own ops in f32: the reference.
    Candle,
    /// candle's own ops, with convolutions and matrix products on bf16-cast inputs
    /// (outputs, BatchNorm and everything else in f32).
    CandleBf16,
    /// Our kernels (convolution, BatchNorm + ReLU, residual add + ReLU) in f32.
    #[default]
    Ours,
    /// Our kernels with convolutions and matrix products in bf16. On CUDA the encoder's
    /// activations are bf16 from the first convolution to the pooled features (cuDNN on
    /// tensor cores; BatchNorm statistics, parameters and gradients in f32). On CPU each
    /// convolution runs our f32 kernel on bf16-rounded inputs and rounds its output (the
    /// same arithmetic, see `in_bf16`), activations staying f32.
    OursBf16,
}

impl Compute {
    /// The compute for `kernels` and `precision`.
    pub fn new(kernels: Kernels, precision: Precision) -> Self {
        match (kernels, precision) {
            (Kernels::Candle, Precision::Fp32) => Compute::Candle,
            (Kernels::Candle, Precision::Bf16) => Compute::CandleBf16,
            (Kernels::Auto, Precision::Fp32) => Compute::Ours,
            (Kernels::Auto, Precision::Bf16) => Compute::OursBf16,
        }
    }

    /// Our kernels rather than candle's.
    pub fn ours(self) -> bool {
        matches!(self, Compute::Ours | Compute::OursBf16)
    }

    /// Convolutions and matrix products in bf16.
    pub fn bf16(self) -> bool {
        matches!(self, Compute::CandleBf16 | Compute::OursBf16)
    }

    /// In words, for reports: e.g. "our kernels, bf16".
    pub fn describe(self) -> String {
        format!(
            "{} kernels, {}",
            if self.ours() { "our" } else { "candle's" },
            if self.bf16() { "bf16" } else { "f32" }
        )
    }
}

/// `f(x, w)` on bfloat16 inputs with f32 accumulation and a bfloat16 result, returned
/// as f32 (what a GPU's bf16 matrix units compute, and PyTorch's bf16 autocast).
///
/// On CUDA the operation runs in bf16. On CPU, where candle has no bf16 matrix product,
/// `x` and `w` are rounded to bf16 and `f` runs in f32 on the rounded values: products of
/// bf16 numbers are exact in f32, so this is the same arithmetic, and `f` may be one of
/// our f32 kernels. Gradients flow through the casts (rounded to bf16 on the way back).
fn in_bf16(
    x: &Tensor,
    w: &Tensor,
    f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let bf16 = |t: &Tensor| t.to_dtype(DType::BF16);
    if x.device().is_cpu() {
        let round = |t: &Tensor| bf16(t)?.to_dtype(DType::F32);
        round(&f(&round(x)?, &round(w)?)?)
    } else {
        f(&bf16(x)?, &bf16(w)?)?.to_dtype(DType::F32)
    }
}

/// A bias-free 2-D convolution (`weight`).
pub struct Conv {
    inner: Conv2d,
    stride: usize,
    padding: usize,
    compute: Compute,
}

impl Conv {
    /// A `k × k` convolution from `cin` to `cout` channels.
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        compute: Compute,
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
            compute,
        })
    }

    /// Applies the convolution to `(n, cin, h, w)`. The output is f32, except with
    /// [`Compute::OursBf16`] on CUDA, where it is bf16 (the input is cast to bf16 if it
    /// is not already).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (s, p, w) = (self.stride, self.padding, self.inner.weight());
        match self.compute {
            Compute::Candle => self.inner.forward(x),
            Compute::CandleBf16 => in_bf16(x, w, |x, w| x.conv2d(w, p, s, 1, 1)),
            Compute::Ours => kernels::conv2d(x, w, s, p),
            Compute::OursBf16 if x.device().is_cuda() => {
                kernels::conv2d(&x.to_dtype(DType::BF16)?, &w.to_dtype(DType::BF16)?, s, p)
            }
            Compute::OursBf16 => in_bf16(x, w, |x, w| kernels::conv2d(x, w, s, p)),
        }
    }
}

/// A fully connected layer (`weight`, `bias`), in PyTorch's layout.
pub struct Dense {
    inner: Linear,
    bf16: bool,
}

impl Dense {
    /// `input → output` features.
    pub fn new(input: usize, output: usize, compute: Compute, vb: VarBuilder) -> Result<Self> {
        Ok(Dense {
            inner: candle_nn::linear(input, output, vb)?,
            bf16: compute.bf16(),
        })
    }

    /// Applies the layer to `(n, input)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.bf16 {
            return self.inner.forward(x);
        }
        self.forward_with(x, self.inner.weight())
    }

    /// The weight `(output, input)`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// Applies the layer with `weight` in place of its own (e.g. its standardised form),
    /// in the layer's precision.
    pub fn forward_with(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let y = if self.bf16 {
            in_bf16(x, weight, |x, w| x.matmul(&w.t()?))?
        } else {
            x.matmul(&weight.t()?)?
        };
        match self.inner.bias() {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// An affine BatchNorm in PyTorch's layout (`weight`, `bias`, `running_mean`,
/// `running_var`, `num_batches_tracked`) and conventions (momentum, unbiased running
/// variance), with an optional ReLU after it.
pub struct Norm {
    inner: BatchNorm,
    running_mean: Var,
    running_var: Var,
    /// Training-mode forwards this layer has normalised (an int64 scalar, torchvision's
    /// `num_batches_tracked`): a running statistic, saved with the others.
    num_batches_tracked: Var,
    momentum: f64,
    eps: f64,
    /// Our kernels (statistics and parameters in f32 whatever the activations' dtype).
    ours: bool,
    /// Statistics over the whole data-parallel batch ([`ModelConfig::synced_bn`]).
    sync: Option<&'static dyn kernels::CrossReplica>,
}

impl Norm {
    /// A BatchNorm over `channels` with the config's momentum and epsilon.
    pub fn new(
        channels: usize,
        cfg: &ModelConfig,
        compute: Compute,
        vb: VarBuilder,
    ) -> Result<Self> {
        let bn_cfg = candle_nn::BatchNormConfig {
            eps: cfg.bn_eps,
            remove_mean: true,
            affine: true,
            momentum: cfg.bn_momentum,
        };
        let num_batches_tracked = vb.get_with_hints_dtype(
            (),
            "num_batches_tracked",
            candle_nn::Init::Const(0.0),
            DType::I64,
        )?;
        let inner = candle_nn::batch_norm(channels, bn_cfg, vb)?;
        Ok(Norm {
            num_batches_tracked: Var::from_tensor(&num_batches_tracked)?,
            running_mean: Var::from_tensor(inner.running_mean())?,
            running_var: Var::from_tensor(inner.running_var())?,
            inner,
            momentum: cfg.bn_momentum,
            eps: cfg.bn_eps,
            ours: compute.ours(),
            sync: cfg
                .synced_bn
                .then(|| crate::dist::group() as &dyn kernels::CrossReplica)
                .filter(|g| g.world() > 1),
        })
    }

    /// Normalises with batch statistics (updating the running ones) when `train`, with
    /// the running statistics otherwise; then ReLU when `relu`. The output has `x`'s
    /// dtype (bf16 on CUDA with [`Compute::OursBf16`]).
    pub fn forward_t(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if train {
            let count = self.num_batches_tracked.as_tensor();
            self.num_batches_tracked.set(&count.affine(1.0, 1.0)?)?;
        }
        if !self.ours {
            if train && self.sync.is_some() {
                candle_core::bail!(
                    "synced BatchNorm needs our kernels (train.kernels = \"auto\"), or train.sync_bn = false"
                )
            }
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
        let out = match self.sync {
            Some(group) => {
                kernels::batch_norm_train_synced(x, weight, bias, self.eps, relu, group)?
            }
            None => kernels::batch_norm_train(x, weight, bias, self.eps, relu)?,
        };
        // running ← (1 − momentum)·running + momentum·batch, the variance unbiased
        // (PyTorch's convention); on the device, nothing read back.
        let m = self.momentum;
        let unbias = if out.count > 1 {
            out.count as f64 / (out.count - 1) as f64
        } else {
            1.0
        };
        let blend = |running: &Var, batch: Tensor, factor: f64| -> Result<()> {
            running.set(&((running.as_tensor() * (1.0 - m))? + (batch * (m * factor))?)?)
        };
        blend(&self.running_mean, out.stats.get(0)?, 1.0)?;
        blend(&self.running_var, out.stats.get(1)?, unbias)?;
        Ok(out.y)
    }
}

/// The ImageNet stem's max-pool (3×3 window, stride 2, padding 1) of a non-negative map
/// `(n, c, h, w)` → `(n, c, ⌊(h − 1)/2⌋ + 1, ⌊(w − 1)/2⌋ + 1)`, built from ops candle can
/// differentiate (its own `max_pool2d` has no backward for overlapping windows).
///
/// The input is zero-padded (its values are ReLU outputs, so zeros never win a window
/// they would change) and, when needed, padded once more to an even size; then split
/// into 2×2 phases by a reshape, so that the three rows (and columns) of window `i` are
/// phase 0 of pair `i`, phase 1 of pair `i` and phase 0 of pair `i + 1`; the window max
/// is the element-wise maximum of those nine views. Equal maxima share the gradient.
pub fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    // Padded sizes: 1 before, and after enough for 2 * (ho + 1) rows / columns.
    let (hp, wp) = (2 * (ho + 1), 2 * (wo + 1));
    let x = x
        .pad_with_zeros(2, 1, hp - h - 1)?
        .pad_with_zeros(3, 1, wp - w - 1)?;
    let phased = x.reshape((n, c, ho + 1, 2, wo + 1, 2))?;
    let mut out: Option<Tensor> = None;
    for (pair_h, phase_h) in [(0, 0), (0, 1), (1, 0)] {
        let rows = phased.narrow(2, pair_h, ho)?.narrow(3, phase_h, 1)?;
        for (pair_w, phase_w) in [(0, 0), (0, 1), (1, 0)] {
            let view = rows.narrow(4, pair_w, wo)?.narrow(5, phase_w, 1)?;
            out = Some(match out {
                None => view,
                Some(m) => m.maximum(&view)?,
            });
        }
    }
    out.expect("nine views").reshape((n, c, ho, wo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn stem_max_pool_matches_candle_forward_and_has_a_gradient() {
        let dev = Device::Cpu;
        for (h, w) in [(8, 8), (7, 9), (1, 2), (112, 112)] {
            let v: Vec<f32> = (0..2 * 3 * h * w)
                .map(|i| ((i * 7919) % 101) as f32 / 10.0)
                .collect();
            let x = Var::from_vec(v, (2, 3, h, w), &dev).unwrap();
            let ours = max_pool_3x3_s2_p1(x.as_tensor()).unwrap();
            // candle's forward (no backward for these windows), on a -inf padding.
            let reference = x
                .as_tensor()
                .pad_with_same(2, 1, 1)
                .unwrap()
                .pad_with_same(3, 1, 1)
                .unwrap()
                .max_pool2d_with_stride(3, 2)
                .unwrap();
            assert_eq!(ours.dims(), reference.dims(), "{h}x{w}");
            let (a, b): (Vec<f32>, Vec<f32>) = (
                ours.flatten_all().unwrap().to_vec1().unwrap(),
                reference.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(a, b, "{h}x{w}");
            // Every output's gradient lands on the input (sums are kept).
            let grads = ours.sum_all().unwrap().backward().unwrap();
            let g = grads.get(x.as_tensor()).unwrap().sum_all().unwrap();
            let total = g.to_scalar::<f32>().unwrap();
            assert!(
                (total - ours.elem_count() as f32).abs() < 1e-3,
                "{h}x{w}: {total}"
            );
        }
    }
}
