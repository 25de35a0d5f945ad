//! One ResNet definition with an attention option: plain, SE, or SaE (SENetV2), with basic or
//! bottleneck blocks and optional grouped 3×3 convolutions (ResNeXt).
//!
//! The module sits on the residual branch after its last BatchNorm, before the shortcut
//! addition and the block's final ReLU: `y = ReLU(shortcut(x) + M(BN(conv(…))))`.
//! Tensor names follow torchvision/timm: `conv1`, `bn1`, `layer{1..4}.{i}.{conv1,bn1,…}`,
//! `layer{s}.0.downsample.{0,1}`, `layer{s}.{i}.se.…`, `fc`.

use crate::config::{Arch, Attention, BlockKind, ModelConfig, Stem};
use crate::layers::{ConvBn, ConvSpec, Excitation, Linear};
use candle_core::{DType, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use sae_kernels::{Implementation, MaxPoolConfig};

const STEM_POOL: MaxPoolConfig = MaxPoolConfig { kernel: 3, stride: 2, padding: 1 };

/// A residual block (basic or bottleneck) with its optional attention module.
#[derive(Debug, Clone)]
pub struct Block {
    convs: Vec<ConvBn>,
    attention: Option<Excitation>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn new(
        cfg: &ModelConfig,
        kind: BlockKind,
        in_ch: usize,
        planes: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (groups, width_per_group) = match cfg.arch {
            Arch::Resnet { groups, width_per_group, .. } => (groups, width_per_group),
            Arch::MobilenetV1 { .. } => candle_core::bail!("a ResNet block needs a ResNet architecture"),
        };
        let (specs, out_ch) = match kind {
            BlockKind::Basic => {
                (vec![ConvSpec::new(in_ch, planes, 3, stride), ConvSpec::new(planes, planes, 3, 1)], planes)
            }
            BlockKind::Bottleneck => {
                let width = planes * width_per_group / 64 * groups;
                let out = planes * 4;
                let specs = vec![
                    ConvSpec::new(in_ch, width, 1, 1),
                    ConvSpec::new(width, width, 3, stride).grouped(groups),
                    ConvSpec::new(width, out, 1, 1),
                ];
                (specs, out)
            }
        };
        let convs = specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| ConvBn::new(s, cfg, &vb, &format!("conv{}", i + 1), &format!("bn{}", i + 1)))
            .collect::<Result<Vec<_>>>()?;
        let attention = match cfg.attention {
            Attention::None => None,
            Attention::Se => Some(Excitation::new(out_ch, None, cfg, vb.pp("se"))?),
            Attention::Sae => Some(Excitation::new(out_ch, Some(cfg.cardinality), cfg, vb.pp("se"))?),
        };
        let downsample = if stride != 1 || in_ch != out_ch {
            let ds = vb.pp("downsample");
            Some(ConvBn::new(ConvSpec::new(in_ch, out_ch, 1, stride), cfg, &ds, "0", "1")?)
        } else {
            None
        };
        Ok(Self { convs, attention, downsample })
    }

    /// Multiply-accumulates and output size for an input of `h` × `w`.
    fn macs(&self, h: usize, w: usize) -> (u64, usize, usize) {
        let (mut total, mut oh, mut ow) = (0, h, w);
        for c in &self.convs {
            total += c.conv.spec().macs(oh, ow);
            (oh, ow) = c.conv.spec().output_size(oh, ow);
        }
        if let Some(d) = &self.downsample {
            total += d.conv.spec().macs(h, w);
        }
        if let Some(a) = &self.attention {
            total += a.macs();
        }
        (total, oh, ow)
    }
}

impl ModuleT for Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_graph(x, train, true)
    }
}

impl Block {
    /// The forward pass; with `graph` false no gradient will reach the excitation's weights,
    /// which it then reads in place ([`Excitation::forward_add_relu`]).
    fn forward_graph(&self, x: &Tensor, train: bool, graph: bool) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some(d) => d.forward_t(x, train)?,
            None => x.clone(),
        };
        let Some((last, inner)) = self.convs.split_last() else {
            candle_core::bail!("a residual block without convolutions")
        };
        let mut y = x.clone();
        for c in inner {
            y = c.forward_relu_t(&y, train)?;
        }
        // The addition and its ReLU join the op before them: the excitation, or BatchNorm.
        match &self.attention {
            // In training, BatchNorm joins them too (its output is then never written).
            Some(a) if train => last.train_excitation_add_relu(&y, a, &shortcut, graph),
            Some(a) => a.forward_add_relu(&last.forward_t(&y, train)?, &shortcut, graph),
            None => last.forward_add_relu_t(&y, &shortcut, train),
        }
    }
}

/// ResNet / SE-ResNet / SENetV2 ResNet / ResNeXt.
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: ConvBn,
    pool: bool,
    kernels: Implementation,
    blocks: Vec<Block>,
    fc: Linear,
}

impl ResNet {
    /// Builds the network described by `cfg` (whose `arch` must be `Resnet`) under `vb`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let Arch::Resnet { block, layers, .. } = cfg.arch else {
            candle_core::bail!("{} is not a ResNet config", cfg.name)
        };
        let stem_spec = match cfg.stem {
            Stem::Imagenet => ConvSpec::new(cfg.in_channels, 64, 7, 2),
            Stem::Cifar => ConvSpec::new(cfg.in_channels, 64, 3, 1),
        };
        let stem = ConvBn::new(stem_spec, cfg, &vb, "conv1", "bn1")?;
        let expansion = if block == BlockKind::Bottleneck { 4 } else { 1 };
        let mut blocks = Vec::new();
        let mut in_ch = 64;
        for (stage, &count) in layers.iter().enumerate() {
            let planes = 64 << stage;
            let vb_stage = vb.pp(format!("layer{}", stage + 1));
            for i in 0..count {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(Block::new(cfg, block, in_ch, planes, stride, vb_stage.pp(i))?);
                in_ch = planes * expansion;
            }
        }
        let fc = Linear::new(in_ch, cfg.num_classes, vb.pp("fc"))?;
        Ok(Self { stem, pool: cfg.stem == Stem::Imagenet, kernels: cfg.kernels, blocks, fc })
    }

    /// Multiply-accumulates of the convolutions and dense layers for one `h` × `w` image.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let spec = self.stem.conv.spec();
        let mut total = spec.macs(h, w);
        let (mut h, mut w) = spec.output_size(h, w);
        if self.pool {
            (h, w) = STEM_POOL.output_size(h, w).unwrap_or((h, w));
        }
        for b in &self.blocks {
            let (m, oh, ow) = b.macs(h, w);
            total += m;
            (h, w) = (oh, ow);
        }
        total + self.fc.weight().elem_count() as u64
    }
}

impl ResNet {
    /// The forward pass; with `graph` false every block's output is detached, so the
    /// activations inside a block are freed once the next block has its output.
    pub(crate) fn forward_graph(&self, x: &Tensor, train: bool, graph: bool) -> Result<Tensor> {
        let cut = |y: Tensor| if graph { y } else { y.detach() };
        let mut y = cut(self.stem.forward_relu_t(x, train)?);
        if self.pool {
            y = cut(sae_kernels::max_pool2d(&y, STEM_POOL, self.kernels)?);
        }
        for b in &self.blocks {
            y = cut(b.forward_graph(&y, train, graph)?);
        }
        // The head in f32 whatever the precision: pooling sums many values, and it is cheap.
        sae_kernels::cast(&y, DType::F32)?.mean((2, 3))?.apply(&self.fc)
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_graph(x, train, true)
    }
}
