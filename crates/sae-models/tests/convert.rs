//! Third-party checkpoints: PyTorch's bookkeeping is accepted on load, timm's SE loads into our
//! SE-ResNet, and `convert_checkpoint` infers the matching config and refuses what does not map.
//!
//! State dicts here are written as torchvision and timm write them (names, `num_batches_tracked`
//! as a 0-d int64, SE weights as 1×1 convolutions) from a model of ours with random weights and
//! random BatchNorm statistics; the converted model must compute the same logits. Real `.pth`
//! files of torchvision and timm are compared with PyTorch's own logits in `torch_interop.rs`.

use candle_core::{DType, Device, ModuleT, Tensor};
use sae_models::{config, convert_checkpoint, Error, Gate, Model, ModelConfig};
use std::collections::HashMap;
use std::path::Path;

fn tmp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("sae-convert-{name}-")).tempdir().unwrap()
}

fn images() -> Tensor {
    let v: Vec<f32> = (0..2 * 3 * 48 * 48).map(|i| ((i * 31 % 97) as f32 / 48.0) - 1.0).collect();
    Tensor::from_vec(v, (2, 3, 48, 48), &Device::Cpu).unwrap()
}

/// A model with random weights and BatchNorm statistics (a few training-mode passes).
fn trained(cfg: ModelConfig) -> Model {
    let model = Model::new(cfg, 5, &Device::Cpu).unwrap();
    for _ in 0..3 {
        model.forward_t(&images(), true).unwrap();
    }
    model
}

/// The model's tensors as a PyTorch library saves them: `num_batches_tracked` beside every
/// BatchNorm and, with `se_as_conv`, the SE layers' weights as (O, I, 1, 1).
fn pytorch_state_dict(model: &Model, se_as_conv: bool) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, var) in model.named_vars() {
        let mut t = var.as_tensor().clone();
        if se_as_conv && name.contains(".se.") && name.ends_with("weight") {
            let (o, i) = t.dims2().unwrap();
            t = t.reshape((o, i, 1, 1)).unwrap();
        }
        if let Some(bn) = name.strip_suffix("running_mean") {
            out.insert(format!("{bn}num_batches_tracked"), Tensor::new(300i64, &Device::Cpu).unwrap());
        }
        out.insert(name, t);
    }
    out
}

fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[test]
fn torchvision_state_dicts_convert_to_the_same_network() {
    let dir = tmp_dir("torchvision");
    let dir = dir.path();
    for (name, classes) in [("resnet18", 10), ("resnext50_32x4d", 7)] {
        let original = trained(config(name, classes).unwrap());
        let src = dir.join(format!("{name}.safetensors"));
        save(&pytorch_state_dict(&original, false), &src);
        // Loading directly accepts the bookkeeping...
        let direct = Model::new(config(name, classes).unwrap(), 0, &Device::Cpu).unwrap();
        direct.load_weights(&src).unwrap();
        // ...and conversion finds the config and writes weights + config.json.
        let dst = dir.join(format!("{name}-ours.safetensors"));
        let cfg = convert_checkpoint(&src, &dst).unwrap();
        assert_eq!(cfg, config(name, classes).unwrap(), "{name}: inferred config");
        let json = std::fs::read_to_string(dst.with_extension("json")).unwrap();
        let converted = Model::new(ModelConfig::from_json(&json).unwrap(), 1, &Device::Cpu).unwrap();
        converted.load_weights(&dst).unwrap();
        let expected = original.forward_t(&images(), false).unwrap();
        for model in [&direct, &converted] {
            assert_eq!(max_diff(&model.forward_t(&images(), false).unwrap(), &expected), 0.0, "{name}");
        }
    }
}

#[test]
fn timm_se_resnets_convert_with_rounded_widths_and_the_plain_gate() {
    let dir = tmp_dir("timm");
    let dir = dir.path();
    // timm's SE on 64 channels: 64 / 16 = 4, rounded up to 8; on 512: 32.
    let timm = config("seresnet18", 10).unwrap().with_timm_se();
    assert_eq!((timm.reduced_channels(64), timm.reduced_channels(512)), (8, 32));
    assert_eq!((timm.reduced_channels(256), timm.reduced_channels(2048)), (16, 128));
    let original = trained(timm.clone());
    let src = dir.join("seresnet18.safetensors");
    save(&pytorch_state_dict(&original, true), &src);
    let dst = dir.join("ours.safetensors");
    let cfg = convert_checkpoint(&src, &dst).unwrap();
    assert_eq!((cfg.reduction, cfg.reduction_divisor, cfg.gate), (16, Some(8), Gate::S));
    assert_eq!(cfg, timm);
    let converted = Model::new(cfg, 1, &Device::Cpu).unwrap();
    converted.load_weights(&dst).unwrap();
    let expected = original.forward_t(&images(), false).unwrap();
    assert_eq!(max_diff(&converted.forward_t(&images(), false).unwrap(), &expected), 0.0);
    // Our default SE (r = 32, no rounding) refuses the timm checkpoint, naming the tensor.
    let ours = Model::new(config("seresnet18", 10).unwrap(), 0, &Device::Cpu).unwrap();
    let err = ours.load_weights(&src).unwrap_err().to_string();
    assert!(err.contains("layer1.0.se.fc1") && err.contains("expected [2"), "{err}");
}

#[test]
fn what_does_not_map_is_refused_by_name() {
    let dir = tmp_dir("refused");
    let dir = dir.path();
    let original = Model::new(config("resnet18", 10).unwrap(), 0, &Device::Cpu).unwrap();
    let good = pytorch_state_dict(&original, false);
    let convert = |tensors: &HashMap<String, Tensor>, file: &str| {
        let src = dir.join(file);
        save(tensors, &src);
        convert_checkpoint(&src, &dir.join("out.safetensors")).unwrap_err().to_string()
    };
    let mut extra = good.clone();
    extra.insert("layer1.0.attn.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    assert!(convert(&extra, "extra.safetensors").contains("unexpected tensor \"layer1.0.attn.weight\""));
    // `num_batches_tracked` is accepted only beside a BatchNorm of the model.
    let mut stray = good.clone();
    stray.insert("fc.num_batches_tracked".into(), Tensor::new(1i64, &Device::Cpu).unwrap());
    assert!(convert(&stray, "stray.safetensors").contains("\"fc.num_batches_tracked\""));
    let mut missing = good.clone();
    missing.remove("layer2.0.bn1.running_var");
    assert!(convert(&missing, "missing.safetensors").contains("\"layer2.0.bn1.running_var\" is missing"));
    let mut no_head = good.clone();
    no_head.remove("fc.weight");
    assert!(convert(&no_head, "no-head.safetensors").contains("no tensor \"fc.weight\""));
    let mut odd = good;
    odd.insert("layer4.2.conv1.weight".into(), Tensor::zeros((512, 512, 3, 3), DType::F32, &Device::Cpu).unwrap());
    let err = convert(&odd, "odd.safetensors");
    assert!(err.contains("[2, 2, 2, 3]"), "{err}");
    std::fs::write(dir.join("junk.pth"), b"not a zip").unwrap();
    let err = convert_checkpoint(&dir.join("junk.pth"), &dir.join("out.safetensors")).unwrap_err();
    assert!(matches!(err, Error::StateDict { .. }) && err.to_string().contains("junk.pth"), "{err}");
    assert!(!dir.join("out.safetensors").exists(), "nothing is written on failure");
}
