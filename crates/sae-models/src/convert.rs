//! Third-party checkpoints → our weights and the config that matches them.
//!
//! torchvision and timm save ResNets and ResNeXts under the same state-dict names as ours
//! (`conv1`, `bn1`, `layer{s}.{i}.conv{k}`, `downsample.{0,1}`, `fc`, timm's `se.fc1`/`se.fc2`),
//! so converting is reading the file, working out which of our configs has exactly these
//! tensors, and loading them with the strict checks of [`Model::load_state_dict`]. The config
//! is inferred from the tensors' names and shapes: blocks per stage, basic or bottleneck
//! blocks, groups and group width (ResNeXt), classes, input channels, convolution biases, and
//! the SE module's reduced width (timm rounds it to a multiple of 8). A tensor the inferred
//! model does not have is refused by name. BatchNorm ε cannot be read off a state dict; both
//! libraries use PyTorch's 1e-5, which the config keeps.

use crate::{config, list, Arch, Attention, BlockKind, Error, Gate, Model, ModelConfig, Result, Stem};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Keys under which training scripts nest the state dict of a `.pth` checkpoint.
const NESTED_KEYS: [&str; 3] = ["state_dict", "model", "model_state_dict"];

/// Reads a PyTorch state dict: `.safetensors`, or a `torch.save` file (`.pth`, `.pt`, `.bin`,
/// the zip format of PyTorch ≥ 1.6) through Candle's pickle reader, also when it is nested
/// under `state_dict`, `model` or `model_state_dict`. A `module.` prefix (DataParallel) is
/// removed.
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bad = |reason: String| Error::StateDict { path: path.to_path_buf(), reason };
    if !path.is_file() {
        return Err(Error::Io { path: path.to_path_buf(), source: std::io::ErrorKind::NotFound.into() });
    }
    let tensors: Vec<(String, Tensor)> = if path.extension().is_some_and(|e| e == "safetensors") {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?
            .into_iter()
            .collect()
    } else {
        let read = |key| candle_core::pickle::read_all_with_key(path, key);
        let mut found = read(None).map_err(|e| bad(format!("not a PyTorch checkpoint (torch.save zip): {e}")))?;
        for key in NESTED_KEYS {
            if !found.is_empty() {
                break;
            }
            found = read(Some(key)).unwrap_or_default();
        }
        found
    };
    if tensors.is_empty() {
        return Err(bad("holds no tensors".into()));
    }
    Ok(tensors
        .into_iter()
        .map(|(name, t)| (name.strip_prefix("module.").map(str::to_string).unwrap_or(name), t))
        .collect())
}

/// The config of our model that has exactly the tensors of `tensors` (PyTorch names).
pub fn infer_config(tensors: &HashMap<String, Tensor>, source: &Path) -> Result<ModelConfig> {
    let bad = |reason: String| Error::StateDict { path: source.to_path_buf(), reason };
    let dims = |name: &str| -> Result<Vec<usize>> {
        tensors
            .get(name)
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| bad(format!("no tensor {name:?}: not a torchvision/timm ResNet or ResNeXt state dict")))
    };
    let stem = dims("conv1.weight")?;
    let fc = dims("fc.weight")?;
    let layers: [usize; 4] =
        [1, 2, 3, 4].map(|s| (0..).take_while(|i| tensors.contains_key(&format!("layer{s}.{i}.conv1.weight"))).count());
    let block = if tensors.contains_key("layer1.0.conv3.weight") { BlockKind::Bottleneck } else { BlockKind::Basic };
    let (groups, width_per_group) = match block {
        BlockKind::Basic => (1, 64),
        BlockKind::Bottleneck => {
            // conv2 of the first block is (width, width / groups, 3, 3), width = groups · group width.
            let conv2 = dims("layer1.0.conv2.weight")?;
            let groups = conv2[0] / conv2[1].max(1);
            (groups, conv2[0] / groups.max(1))
        }
    };
    let arch = Arch::Resnet { block, layers, groups, width_per_group };
    let attention = if tensors.contains_key("layer1.0.se.fc1.0.weight") {
        Attention::Sae
    } else if tensors.contains_key("layer1.0.se.fc1.weight") {
        Attention::Se
    } else {
        Attention::None
    };
    let name = list()
        .into_iter()
        .find(|name| {
            config(name, 1).is_ok_and(|c| c.arch == arch && c.attention == attention)
        })
        .ok_or_else(|| bad(format!("no registered model is a {attention:?} ResNet with {block:?} blocks {layers:?}, {groups} groups of width {width_per_group}")))?;
    let mut cfg = config(name, fc[0])?;
    cfg.in_channels = stem[1];
    cfg.stem = Stem::Imagenet;
    cfg.conv_bias = tensors.contains_key("conv1.bias");
    cfg.bn_eps = 1e-5;
    if attention == Attention::Se {
        // timm's rounding first, then a plain C / r; the gate is `u ⊙ s` in both libraries.
        let channels = dims("layer1.0.se.fc1.weight")?;
        let (reduced, channels) = (channels[0], channels[1]);
        let timm = cfg.clone().with_timm_se();
        cfg = if timm.reduced_channels(channels) == reduced {
            timm
        } else if reduced > 0 && channels % reduced == 0 {
            ModelConfig { reduction: channels / reduced, reduction_divisor: None, gate: Gate::S, ..cfg }
        } else {
            return Err(bad(format!("SE reduces {channels} channels to {reduced}, not C / r for an integer r")));
        };
    } else if attention == Attention::Sae {
        let branches = (0..).take_while(|k| tensors.contains_key(&format!("layer1.0.se.fc1.{k}.weight"))).count();
        let branch = dims("layer1.0.se.fc1.0.weight")?;
        cfg.cardinality = branches;
        cfg.reduction = branch[1] / branch[0].max(1);
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Converts the torchvision/timm checkpoint `src` into our weights at `dst` (safetensors, f32)
/// and the matching config beside it (`dst` with the extension `json`), both written
/// atomically. Returns the config. Every tensor must map: an extra, missing or mis-shaped one
/// is an error naming it.
pub fn convert_checkpoint(src: &Path, dst: &Path) -> Result<ModelConfig> {
    let tensors = read_state_dict(src)?;
    let cfg = infer_config(&tensors, src)?;
    let model = Model::new(cfg.clone(), 0, &Device::Cpu)?;
    let tensors = tensors
        .into_iter()
        .map(|(name, t)| {
            // Floating-point weights become f32 (PyTorch also saves f16/bf16); counters stay.
            let t = if t.dtype().is_float() && t.dtype() != DType::F32 { t.to_dtype(DType::F32)? } else { t };
            Ok((name, t))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    model.load_state_dict(tensors, src)?;
    model.save(dst)?;
    sae_fs::write_atomic(&dst.with_extension("json"), cfg.to_json().as_bytes())?;
    Ok(cfg)
}

/// Why no torchvision or timm model takes `cfg`'s weights as they are, or `None` when one does:
/// a ResNet or ResNeXt with the ImageNet stem, no convolution biases and PyTorch's BatchNorm ε,
/// plain (torchvision's and timm's) or with timm's SE module (reduction 16 rounded to a
/// multiple of 8, the `u ⊙ s` gate: [`ModelConfig::with_timm_se`]).
pub fn pytorch_incompatibility(cfg: &ModelConfig) -> Option<String> {
    let why = if !matches!(cfg.arch, Arch::Resnet { .. }) {
        "only ResNets and ResNeXts have a torchvision or timm counterpart".to_string()
    } else if cfg.stem != Stem::Imagenet {
        "torchvision's and timm's ResNets have the ImageNet stem, not the CIFAR one".to_string()
    } else if cfg.conv_bias {
        "its convolutions carry biases (the paper's Keras convention), which torchvision's and timm's do not"
            .to_string()
    } else if cfg.bn_eps != 1e-5 {
        format!("its BatchNorm ε is {}, where torchvision and timm use 1e-5", cfg.bn_eps)
    } else {
        match cfg.attention {
            Attention::None => return None,
            Attention::Se if cfg.gate == Gate::S && cfg.reduction == 16 && cfg.reduction_divisor == Some(8) => {
                return None
            }
            Attention::Se => {
                "its SE module is not timm's (timm: reduction 16 rounded to a multiple of 8, gate u·s)".to_string()
            }
            Attention::Sae => "SENetV2's SaE module has no torchvision or timm counterpart".to_string(),
        }
    };
    Some(format!("{}: {why}", cfg.name))
}

/// Writes `model`'s weights as a PyTorch state dict in safetensors, and its config beside it
/// (`path` with the extension `json`), both atomically. The state dict loads strictly
/// (`model.load_state_dict(safetensors.torch.load_file(path))`) into the network that
/// `bench/pytorch/senetv2.py` builds from that config, for every model of the registry
/// (SENetV2's and MobileNet's included), and into torchvision's or timm's model of the same
/// architecture where one exists ([`pytorch_incompatibility`] says why not): our names are
/// theirs, the excitation's dense layers are stored as timm's 1×1 convolutions, and every
/// BatchNorm gets the `num_batches_tracked` PyTorch keeps (0: ours does not count; PyTorch
/// reads it only without a momentum).
pub fn export_pytorch_state_dict(model: &Model, path: &Path) -> Result<()> {
    let cfg = model.config();
    if path.extension().is_some_and(|e| e == "json") {
        return Err(Error::InvalidConfig(format!(
            "{}: the state dict's path ends in .json, the name its config takes",
            path.display()
        )));
    }
    let mut tensors = HashMap::new();
    for (name, var) in model.named_vars() {
        let t = var.as_tensor().to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let t = if name.contains(".se.fc") && t.rank() == 2 { t.unsqueeze(2)?.unsqueeze(3)? } else { t };
        if let Some(bn) = name.strip_suffix("running_mean") {
            tensors.insert(format!("{bn}num_batches_tracked"), Tensor::new(0i64, &Device::Cpu)?);
        }
        tensors.insert(name, t);
    }
    sae_fs::write_atomic_with(path, |tmp| -> Result<()> { Ok(candle_core::safetensors::save(&tensors, tmp)?) })?;
    Ok(sae_fs::write_atomic(&path.with_extension("json"), cfg.to_json().as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which configs go back to torchvision or timm, and the reason named for the others.
    #[test]
    fn which_configs_torchvision_and_timm_take() {
        let cfg = |name: &str| config(name, 10).unwrap();
        for ok in [cfg("resnet50"), cfg("resnext50_32x4d"), cfg("seresnet50").with_timm_se()] {
            assert_eq!(pytorch_incompatibility(&ok), None, "{}", ok.name);
        }
        let keras = cfg("resnet50").with_paper_preset(crate::PaperPreset::Cifar10);
        let cifar = ModelConfig { stem: Stem::Cifar, ..cfg("resnet18") };
        for (bad, reason) in [
            (cfg("senetv2_resnet50"), "SaE module has no torchvision or timm counterpart"),
            (cfg("seresnet50"), "SE module is not timm's"),
            (keras, "carry biases"),
            (cifar, "CIFAR"),
            (cfg("mobilenet_v1"), "only ResNets"),
        ] {
            let why = pytorch_incompatibility(&bad).unwrap_or_default();
            assert!(why.contains(reason), "{}: {why}", bad.name);
        }
        let dir = tempfile::tempdir().unwrap();
        let model = Model::new(cfg("resnet18"), 0, &Device::Cpu).unwrap();
        let err = export_pytorch_state_dict(&model, &dir.path().join("x.json")).unwrap_err().to_string();
        assert!(err.contains("the name its config takes"), "{err}");
    }
}
