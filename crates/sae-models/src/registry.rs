//! The model registry, by name, in timm's spelling: `resnet50`, `seresnet50`,
//! `senetv2_resnet50`, `resnext50_32x4d`, `mobilenet_v1`, …
//!
//! Every registered name maps to a [`ModelConfig`] with PyTorch conventions (no convolution
//! bias, BatchNorm ε = 1e-5), the ImageNet stem, r = 32, K = 4 and the official
//! `one_plus_s` gate; [`ModelConfig::with_paper_preset`] switches to the paper's settings.

use crate::config::{Arch, Attention, BlockKind, ModelConfig, Stem};
use crate::{Error, Result};
use sae_kernels::{Gate, Implementation};

/// A backbone before the attention prefix.
struct Backbone {
    name: &'static str,
    arch: fn() -> Arch,
}

const fn resnet(block: BlockKind, layers: [usize; 4]) -> Arch {
    Arch::Resnet { block, layers, groups: 1, width_per_group: 64 }
}

const BACKBONES: &[Backbone] = &[
    Backbone { name: "resnet14b", arch: || resnet(BlockKind::Bottleneck, [1, 1, 1, 1]) },
    Backbone { name: "resnet18", arch: || resnet(BlockKind::Basic, [2, 2, 2, 2]) },
    Backbone { name: "resnet34", arch: || resnet(BlockKind::Basic, [3, 4, 6, 3]) },
    Backbone { name: "resnet50", arch: || resnet(BlockKind::Bottleneck, [3, 4, 6, 3]) },
    Backbone { name: "resnet101", arch: || resnet(BlockKind::Bottleneck, [3, 4, 23, 3]) },
    Backbone { name: "resnet152", arch: || resnet(BlockKind::Bottleneck, [3, 8, 36, 3]) },
    Backbone {
        name: "resnext50_32x4d",
        arch: || Arch::Resnet { block: BlockKind::Bottleneck, layers: [3, 4, 6, 3], groups: 32, width_per_group: 4 },
    },
];

/// Registry-name prefix of each attention option.
const PREFIXES: [(Attention, &str); 3] = [(Attention::None, ""), (Attention::Se, "se"), (Attention::Sae, "senetv2_")];

/// Every registered model name, sorted.
pub fn list() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = NAMES.to_vec();
    names.sort_unstable();
    names
}

/// All names: each backbone with each prefix, and MobileNet v1.
const NAMES: &[&str] = &[
    "resnet14b",
    "seresnet14b",
    "senetv2_resnet14b",
    "resnet18",
    "seresnet18",
    "senetv2_resnet18",
    "resnet34",
    "seresnet34",
    "senetv2_resnet34",
    "resnet50",
    "seresnet50",
    "senetv2_resnet50",
    "resnet101",
    "seresnet101",
    "senetv2_resnet101",
    "resnet152",
    "seresnet152",
    "senetv2_resnet152",
    "resnext50_32x4d",
    "seresnext50_32x4d",
    "senetv2_resnext50_32x4d",
    "mobilenet_v1",
];

/// The config of a registered model with `num_classes` outputs.
pub fn config(name: &str, num_classes: usize) -> Result<ModelConfig> {
    let unknown = || Error::UnknownModel { name: name.to_string(), known: list() };
    let (attention, arch) = if name == "mobilenet_v1" {
        (Attention::None, Arch::MobilenetV1 { width_multiplier: 1.0 })
    } else {
        // Longest prefix first: "senetv2_" and "se" both start with "se".
        let (attention, rest) = PREFIXES
            .iter()
            .rev()
            .find_map(|(att, prefix)| name.strip_prefix(prefix).map(|rest| (*att, rest)))
            .ok_or_else(unknown)?;
        let backbone = BACKBONES.iter().find(|b| b.name == rest).ok_or_else(unknown)?;
        (attention, (backbone.arch)())
    };
    if !NAMES.contains(&name) {
        return Err(unknown());
    }
    let cfg = ModelConfig {
        name: name.to_string(),
        arch,
        num_classes,
        in_channels: 3,
        stem: Stem::Imagenet,
        attention,
        reduction: 32,
        reduction_divisor: None,
        cardinality: if attention == Attention::Sae { 4 } else { 1 },
        gate: Gate::OnePlusS,
        conv_bias: false,
        bn_eps: 1e-5,
        kernels: Implementation::Fused,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Builds the registered model `name` with `num_classes` outputs, weights drawn from `seed`
/// (timm's `create_model`).
pub fn create(name: &str, num_classes: usize, seed: u64, device: &candle_core::Device) -> Result<crate::Model> {
    crate::Model::new(config(name, num_classes)?, seed, device)
}
