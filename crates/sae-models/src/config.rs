//! Model configuration: one serialisable struct covers every registered model, so a run's
//! `config.json` fully describes the network it trained.

use crate::{Error, Result};
use sae_kernels::{Gate, Implementation};
use serde::{Deserialize, Serialize};

/// Residual block type of a ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// Two 3×3 convolutions (ResNet-18/34); the module sits on `planes` channels.
    Basic,
    /// 1×1 → 3×3 → 1×1 with expansion 4 (ResNet-50 and deeper); the module sits on `4·planes`.
    Bottleneck,
}

/// The network family and its depth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum Arch {
    /// ResNet / ResNeXt with an optional SE or SaE module in every block.
    Resnet {
        /// Block type.
        block: BlockKind,
        /// Blocks per stage (four stages of 64, 128, 256, 512 planes).
        layers: [usize; 4],
        /// Groups of the 3×3 convolution (32 for ResNeXt-50 32×4d, else 1).
        groups: usize,
        /// Channels per group at the first stage (4 for ResNeXt-50 32×4d, else 64).
        width_per_group: usize,
    },
    /// MobileNet v1: a 3×3 stem and 13 depthwise-separable blocks.
    MobilenetV1 {
        /// Width multiplier α (1.0 in the paper).
        width_multiplier: f64,
    },
}

/// The first layers of the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// ResNet: 7×7/2 conv + BN + ReLU + 3×3/2 max-pool. MobileNet: 3×3/2 conv + BN + ReLU6.
    Imagenet,
    /// ResNet: 3×3/1 conv + BN + ReLU, no pool. MobileNet: 3×3/1 conv + BN + ReLU6.
    Cifar,
}

/// The channel-attention module in each residual block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attention {
    /// Plain ResNet.
    None,
    /// Squeeze-and-Excitation (one reduction layer).
    Se,
    /// Squeeze Aggregated Excitation, SENetV2 (`cardinality` parallel reduction layers).
    Sae,
}

/// Everything that defines a model. Build one with [`crate::registry::config`] and adjust
/// fields, or load it from a run's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Registry name, e.g. `senetv2_resnet50`.
    pub name: String,
    /// Backbone.
    pub arch: Arch,
    /// Outputs of the classifier head.
    pub num_classes: usize,
    /// Channels of the input image.
    pub in_channels: usize,
    /// Stem type.
    pub stem: Stem,
    /// Module in each residual block (ignored by MobileNet).
    pub attention: Attention,
    /// Reduction `r`: each reduction layer maps C → C / r (integer division), rounded as
    /// `reduction_divisor` says.
    pub reduction: usize,
    /// timm's rounding of the reduced width: `Some(d)` rounds C / r to the nearest multiple of
    /// `d`, at least `d` (timm's `make_divisible`, as its SE-ResNets use with d = 8); `None`
    /// keeps C / r.
    #[serde(default)]
    pub reduction_divisor: Option<usize>,
    /// Cardinality `K`: number of parallel reduction layers of SaE (SE uses 1).
    pub cardinality: usize,
    /// How the gates scale the features.
    pub gate: Gate,
    /// Whether convolutions carry a bias (Keras style, the authors' code) or not (PyTorch style).
    pub conv_bias: bool,
    /// BatchNorm epsilon.
    pub bn_eps: f64,
    /// The run's one kernel switch: which implementation runs every op of `sae-kernels` that
    /// the model (and, in `sae-train`, the Adam optimiser) uses. The list of ops is in the
    /// `sae_kernels` crate documentation.
    #[serde(default)]
    pub kernels: Implementation,
}

/// The paper's training settings (SPEC §3) as model presets. They use the authors' Keras
/// conventions: convolution biases, BatchNorm ε = 1.001e-5, and the `u + u ⊙ s` gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaperPreset {
    /// Table 2: CIFAR-10, 10 classes, 70×70 input.
    Cifar10,
    /// Table 3: CIFAR-100 with the 20 coarse labels the paper's head sizes imply, 140×140.
    Cifar100Coarse,
    /// Table 3 with the 100 fine labels.
    Cifar100Fine,
    /// Table 4: an ImageNet-style folder with `num_classes` classes, 224×224.
    Imagenet {
        /// Number of classes in the folder.
        num_classes: usize,
    },
}

impl PaperPreset {
    /// Classifier outputs of the preset.
    pub fn num_classes(self) -> usize {
        match self {
            PaperPreset::Cifar10 => 10,
            PaperPreset::Cifar100Coarse => 20,
            PaperPreset::Cifar100Fine => 100,
            PaperPreset::Imagenet { num_classes } => num_classes,
        }
    }

    /// Input side length the paper used.
    pub fn input_size(self) -> usize {
        match self {
            PaperPreset::Cifar10 => 70,
            PaperPreset::Cifar100Coarse | PaperPreset::Cifar100Fine => 140,
            PaperPreset::Imagenet { .. } => 224,
        }
    }
}

impl ModelConfig {
    /// Applies a paper preset: its class count, the ImageNet stem the Keras models have, and
    /// the authors' conventions (conv bias for ResNets, Keras BatchNorm ε, official gate).
    pub fn with_paper_preset(mut self, preset: PaperPreset) -> Self {
        self.num_classes = preset.num_classes();
        self.stem = Stem::Imagenet;
        self.gate = Gate::OnePlusS;
        match self.arch {
            Arch::Resnet { .. } => {
                self.conv_bias = true;
                self.bn_eps = 1.001e-5;
            }
            // Keras MobileNet's convolutions have no bias; its BatchNorm ε is 1e-3.
            Arch::MobilenetV1 { .. } => {
                self.conv_bias = false;
                self.bn_eps = 1e-3;
            }
        }
        self
    }

    /// Channels of each reduction layer for a module on `channels` channels.
    pub fn reduced_channels(&self, channels: usize) -> usize {
        let reduced = channels / self.reduction;
        match self.reduction_divisor {
            // timm's `make_divisible(C / r, d, round_limit=0)`: max(d, int(C/r + d/2) // d * d).
            Some(d) if d > 0 => {
                let exact = channels as f64 / self.reduction as f64;
                d.max(((exact + d as f64 / 2.0) as usize) / d * d)
            }
            _ => reduced,
        }
    }

    /// timm's SE-ResNet conventions for the SE module: reduction 16 rounded to a multiple of 8,
    /// and the gate `u ⊙ s` (PyTorch conventions elsewhere: no conv bias, BatchNorm ε 1e-5).
    /// A timm `seresnet50` checkpoint loads into `config("seresnet50", 1000)?.with_timm_se()`.
    pub fn with_timm_se(mut self) -> Self {
        self.reduction = 16;
        self.reduction_divisor = Some(8);
        self.gate = Gate::S;
        self
    }

    /// Checks every value, naming the first one out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidConfig(format!("{}: {msg}", self.name)));
        if self.num_classes == 0 {
            return bad("num_classes must be at least 1".into());
        }
        if self.in_channels == 0 {
            return bad("in_channels must be at least 1".into());
        }
        if !(self.bn_eps > 0.0 && self.bn_eps.is_finite()) {
            return bad(format!("bn_eps must be positive, got {}", self.bn_eps));
        }
        match &self.arch {
            Arch::Resnet { layers, groups, width_per_group, block } => {
                if layers.contains(&0) {
                    return bad(format!("every stage needs at least one block, got {layers:?}"));
                }
                if *groups == 0 || *width_per_group == 0 {
                    return bad("groups and width_per_group must be positive".into());
                }
                if *block == BlockKind::Basic && (*groups != 1 || *width_per_group != 64) {
                    return bad("basic blocks support only groups = 1 and width_per_group = 64".into());
                }
                if self.attention != Attention::None {
                    if self.reduction == 0 {
                        return bad("reduction r must be at least 1".into());
                    }
                    // The smallest module sits on 64 channels (basic) or 256 (bottleneck).
                    let smallest = if *block == BlockKind::Basic { 64 } else { 256 };
                    if self.reduction_divisor == Some(0) {
                        return bad("reduction_divisor must be at least 1".into());
                    }
                    if self.reduced_channels(smallest) == 0 {
                        return bad(format!("reduction {} leaves no channels of {smallest}", self.reduction));
                    }
                }
                if self.attention == Attention::Sae && self.cardinality == 0 {
                    return bad("cardinality K must be at least 1".into());
                }
            }
            Arch::MobilenetV1 { width_multiplier } => {
                if !(*width_multiplier > 0.0 && width_multiplier.is_finite()) {
                    return bad(format!("width_multiplier must be positive, got {width_multiplier}"));
                }
            }
        }
        Ok(())
    }

    /// Serialises to pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("ModelConfig always serialises")
    }

    /// Parses JSON and validates it.
    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: ModelConfig = serde_json::from_str(json)?;
        cfg.validate()?;
        Ok(cfg)
    }
}
