//! ResNet-18/50 in torchvision's layout and parameter names, BatchNorm in training mode.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{Compute, Conv, Norm, max_pool_3x3_s2_p1};
use crate::config::{Arch, ModelConfig};
use crate::kernels;

/// Conv → BatchNorm (→ ReLU), the unit every block is made of.
struct ConvBn {
    conv: Conv,
    bn: Norm,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        cfg: &ModelConfig,
        compute: Compute,
        vb_conv: VarBuilder,
        vb_bn: VarBuilder,
    ) -> Result<Self> {
        Ok(ConvBn {
            conv: Conv::new(cin, cout, k, stride, padding, compute, vb_conv)?,
            bn: Norm::new(cout, cfg, compute, vb_bn)?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        self.bn.forward_t(&self.conv.forward(x)?, train, relu)
    }
}

/// A residual block (basic or bottleneck) with its optional downsample.
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
    /// Our kernel for the final add + ReLU.
    compute: Compute,
}

impl Block {
    fn new(
        cin: usize,
        planes: usize,
        stride: usize,
        bottleneck: bool,
        cfg: &ModelConfig,
        compute: Compute,
        vb: VarBuilder,
    ) -> Result<Self> {
        let unit = |i: usize, cin: usize, cout: usize, k: usize, stride: usize| {
            let (conv, bn) = (format!("conv{i}"), format!("bn{i}"));
            ConvBn::new(
                cin,
                cout,
                k,
                stride,
                k / 2,
                cfg,
                compute,
                vb.pp(conv),
                vb.pp(bn),
            )
        };
        let (convs, cout) = if bottleneck {
            let out = planes * 4;
            // torchvision (v1.5) puts the stride on the 3x3 conv.
            (
                vec![
                    unit(1, cin, planes, 1, 1)?,
                    unit(2, planes, planes, 3, stride)?,
                    unit(3, planes, out, 1, 1)?,
                ],
                out,
            )
        } else {
            (
                vec![
                    unit(1, cin, planes, 3, stride)?,
                    unit(2, planes, planes, 3, 1)?,
                ],
                planes,
            )
        };
        let downsample = if stride != 1 || cin != cout {
            let (conv, bn) = (vb.pp("downsample.0"), vb.pp("downsample.1"));
            Some(ConvBn::new(
                cin, cout, 1, stride, 0, cfg, compute, conv, bn,
            )?)
        } else {
            None
        };
        Ok(Block {
            convs,
            downsample,
            compute,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        let last = self.convs.len() - 1;
        for (i, unit) in self.convs.iter().enumerate() {
            y = unit.forward_t(&y, train, i < last)?;
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward_t(x, train, false)?,
            None => x.clone(),
        };
        if self.compute.ours() {
            kernels::add_relu(&y, &shortcut)
        } else {
            (y + shortcut)?.relu()
        }
    }
}

/// The encoder: stem, four stages, global average pool. Output `(batch, feature_dim)`.
pub struct ResNet {
    stem: ConvBn,
    /// The ImageNet stem's max-pool (none with the small stem): our op (`true`) or the
    /// composite of candle's ops.
    max_pool: Option<bool>,
    stages: Vec<Vec<Block>>,
}

impl ResNet {
    /// Builds the encoder; parameter names follow torchvision (`conv1.weight`,
    /// `layer1.0.bn1.running_mean`, `layer2.0.downsample.0.weight`, ...).
    /// `compute` selects our CPU kernels and the precision of the convolutions.
    pub fn new(cfg: &ModelConfig, compute: Compute, vb: VarBuilder) -> Result<Self> {
        let w = cfg.width;
        let (depths, bottleneck): ([usize; 4], bool) = match cfg.arch {
            Arch::Resnet18 => ([2, 2, 2, 2], false),
            Arch::Resnet50 => ([3, 4, 6, 3], true),
        };
        let (k, stride, padding) = if cfg.small_stem { (3, 1, 1) } else { (7, 2, 3) };
        let (conv1, bn1) = (vb.pp("conv1"), vb.pp("bn1"));
        let stem = ConvBn::new(3, w, k, stride, padding, cfg, compute, conv1, bn1)?;
        let expansion = if bottleneck { 4 } else { 1 };
        let mut cin = w;
        let mut stages = Vec::new();
        for (i, &depth) in depths.iter().enumerate() {
            let planes = w << i;
            let vb_stage = vb.pp(format!("layer{}", i + 1));
            let mut blocks = Vec::new();
            for b in 0..depth {
                let stride = if b == 0 && i > 0 { 2 } else { 1 };
                blocks.push(Block::new(
                    cin,
                    planes,
                    stride,
                    bottleneck,
                    cfg,
                    compute,
                    vb_stage.pp(b.to_string()),
                )?);
                cin = planes * expansion;
            }
            stages.push(blocks);
        }
        Ok(ResNet {
            stem,
            max_pool: (!cfg.small_stem).then_some(compute.ours()),
            stages,
        })
    }

    /// Pooled features of a batch of images `(batch, 3, h, w)`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.stem.forward_t(x, train, true)?;
        match self.max_pool {
            Some(true) => y = crate::kernels::max_pool_3x3_s2(&y)?,
            Some(false) => y = max_pool_3x3_s2_p1(&y)?,
            None => {}
        }
        for stage in &self.stages {
            for block in stage {
                y = block.forward_t(&y, train)?;
            }
        }
        // Pooled in f32 (the activations may be bf16).
        y.to_dtype(candle_core::DType::F32)?.mean((2, 3))
    }
}
