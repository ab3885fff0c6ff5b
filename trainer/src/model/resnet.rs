//! ResNet-18/50 in torchvision's layout and parameter names, BatchNorm in training mode.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, VarBuilder};

use crate::config::{Arch, ModelConfig};

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    candle_nn::conv2d_no_bias(cin, cout, k, cfg, vb)
}

fn bn(c: usize, cfg: &ModelConfig, vb: VarBuilder) -> Result<BatchNorm> {
    super::batch_norm(c, cfg, vb)
}

/// Conv → BatchNorm, the unit every block is made of.
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBn {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.forward_t(&self.conv.forward(x)?, train)
    }
}

/// A residual block (basic or bottleneck) with its optional downsample.
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn new(
        cin: usize,
        planes: usize,
        stride: usize,
        bottleneck: bool,
        cfg: &ModelConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let unit = |i: usize, cin: usize, cout: usize, k: usize, stride: usize| -> Result<ConvBn> {
            Ok(ConvBn {
                conv: conv(cin, cout, k, stride, k / 2, vb.pp(format!("conv{i}")))?,
                bn: bn(cout, cfg, vb.pp(format!("bn{i}")))?,
            })
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
            Some(ConvBn {
                conv: conv(cin, cout, 1, stride, 0, vb.pp("downsample.0"))?,
                bn: bn(cout, cfg, vb.pp("downsample.1"))?,
            })
        } else {
            None
        };
        Ok(Block { convs, downsample })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        let last = self.convs.len() - 1;
        for (i, unit) in self.convs.iter().enumerate() {
            y = unit.forward_t(&y, train)?;
            if i < last {
                y = y.relu()?;
            }
        }
        let shortcut = match &self.downsample {
            Some(d) => d.forward_t(x, train)?,
            None => x.clone(),
        };
        (y + shortcut)?.relu()
    }
}

/// The encoder: stem, four stages, global average pool. Output `(batch, feature_dim)`.
pub struct ResNet {
    stem: ConvBn,
    max_pool: bool,
    stages: Vec<Vec<Block>>,
}

impl ResNet {
    /// Builds the encoder; parameter names follow torchvision (`conv1.weight`,
    /// `layer1.0.bn1.running_mean`, `layer2.0.downsample.0.weight`, ...).
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let w = cfg.width;
        let (depths, bottleneck): ([usize; 4], bool) = match cfg.arch {
            Arch::Resnet18 => ([2, 2, 2, 2], false),
            Arch::Resnet50 => ([3, 4, 6, 3], true),
        };
        let stem = if cfg.small_stem {
            ConvBn {
                conv: conv(3, w, 3, 1, 1, vb.pp("conv1"))?,
                bn: bn(w, cfg, vb.pp("bn1"))?,
            }
        } else {
            ConvBn {
                conv: conv(3, w, 7, 2, 3, vb.pp("conv1"))?,
                bn: bn(w, cfg, vb.pp("bn1"))?,
            }
        };
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
                    vb_stage.pp(b.to_string()),
                )?);
                cin = planes * expansion;
            }
            stages.push(blocks);
        }
        Ok(ResNet {
            stem,
            max_pool: !cfg.small_stem,
            stages,
        })
    }

    /// Pooled features of a batch of images `(batch, 3, h, w)`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.stem.forward_t(x, train)?.relu()?;
        if self.max_pool {
            y = y
                .pad_with_same(2, 1, 1)?
                .pad_with_same(3, 1, 1)?
                .max_pool2d_with_stride(3, 2)?;
        }
        for stage in &self.stages {
            for block in stage {
                y = block.forward_t(&y, train)?;
            }
        }
        y.mean((2, 3))
    }
}
