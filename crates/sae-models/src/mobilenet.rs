//! MobileNet v1 (Howard et al. 2017), as Keras builds it: a 3×3 stem, 13 depthwise-separable
//! blocks (depthwise 3×3 + BN + ReLU6, pointwise 1×1 + BN + ReLU6), global average pooling and
//! a dense head.
//!
//! Tensor names: `conv_stem`, `bn1`, `blocks.{i}.conv_dw`, `blocks.{i}.bn1`,
//! `blocks.{i}.conv_pw`, `blocks.{i}.bn2` for i = 0..12, and `classifier`.

use crate::config::{Arch, ModelConfig, Stem};
use crate::layers::{ConvBn, ConvSpec, Linear};
use candle_core::{DType, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use sae_kernels::Implementation;

/// (output channels at α = 1, stride) of the 13 depthwise-separable blocks.
pub(crate) const BLOCKS: [(usize, usize); 13] = [
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
];

/// MobileNet v1.
#[derive(Debug, Clone)]
pub struct MobileNetV1 {
    stem: ConvBn,
    blocks: Vec<(ConvBn, ConvBn)>,
    classifier: Linear,
    kernels: Implementation,
}

impl MobileNetV1 {
    /// Builds the network described by `cfg` (whose `arch` must be `MobilenetV1`) under `vb`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let Arch::MobilenetV1 { width_multiplier } = cfg.arch else {
            candle_core::bail!("{} is not a MobileNet v1 config", cfg.name)
        };
        let width = |c: usize| ((c as f64 * width_multiplier) as usize).max(1);
        let stem_stride = if cfg.stem == Stem::Imagenet { 2 } else { 1 };
        let stem =
            ConvBn::new(ConvSpec::new(cfg.in_channels, width(32), 3, stem_stride), cfg, &vb, "conv_stem", "bn1")?;
        let mut in_ch = width(32);
        let mut blocks = Vec::new();
        for (i, &(out, stride)) in BLOCKS.iter().enumerate() {
            let vb_block = vb.pp("blocks").pp(i);
            let out = width(out);
            let dw =
                ConvBn::new(ConvSpec::new(in_ch, in_ch, 3, stride).grouped(in_ch), cfg, &vb_block, "conv_dw", "bn1")?;
            let pw = ConvBn::new(ConvSpec::new(in_ch, out, 1, 1), cfg, &vb_block, "conv_pw", "bn2")?;
            blocks.push((dw, pw));
            in_ch = out;
        }
        let classifier = Linear::new(in_ch, cfg.num_classes, vb.pp("classifier"))?;
        Ok(Self { stem, blocks, classifier, kernels: cfg.kernels })
    }

    /// Multiply-accumulates of the convolutions and dense layers for one `h` × `w` image.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let mut total = 0;
        let (mut h, mut w) = (h, w);
        let convs = std::iter::once(&self.stem).chain(self.blocks.iter().flat_map(|(dw, pw)| [dw, pw]));
        for c in convs {
            total += c.conv.spec().macs(h, w);
            (h, w) = c.conv.spec().output_size(h, w);
        }
        total + self.classifier.weight().elem_count() as u64
    }
}

impl MobileNetV1 {
    /// The forward pass; with `graph` false every layer's output is detached, so its
    /// activations are freed once the next layer has its output.
    pub(crate) fn forward_graph(&self, x: &Tensor, train: bool, graph: bool) -> Result<Tensor> {
        let cut = |y: Tensor| if graph { y } else { y.detach() };
        let relu6 = |y: &Tensor| sae_kernels::relu6(y, self.kernels);
        let mut y = cut(relu6(&self.stem.forward_t(x, train)?)?);
        for (dw, pw) in &self.blocks {
            y = cut(relu6(&dw.forward_t(&y, train)?)?);
            y = cut(relu6(&pw.forward_t(&y, train)?)?);
        }
        // The head in f32 whatever the precision: pooling sums many values, and it is cheap.
        sae_kernels::cast(&y, DType::F32)?.mean((2, 3))?.apply(&self.classifier)
    }
}

impl ModuleT for MobileNetV1 {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_graph(x, train, true)
    }
}
