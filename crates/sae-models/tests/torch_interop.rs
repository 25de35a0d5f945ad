//! Real PyTorch files. A committed `torch.save` golden (`tests/data/state_dict.pth`, written by
//! `bench/pytorch/export_checkpoints.py golden`) is read with known values. When
//! `SAE_TORCH_PYTHON` names a Python with torch, torchvision and timm, that script writes
//! torchvision `resnet18`, `resnet50`, `resnext50_32x4d` and timm `resnet50` and `seresnet50`
//! with random weights and BatchNorm statistics, as `.pth` and `.safetensors`, with PyTorch's
//! logits for a fixed input; each is converted, loaded, and must give PyTorch's logits, and
//! exported back (`export_pytorch_state_dict`) it must load strictly into the PyTorch model and
//! give those logits there.

use candle_core::{DType, Device, ModuleT, Tensor};
use sae_models::{convert_checkpoint, export_pytorch_state_dict, read_state_dict, Model, ModelConfig};
use std::path::Path;
use std::process::Command;

#[test]
fn a_real_torch_save_file_reads_with_known_values() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/state_dict.pth");
    // Nested under "state_dict", saved from a DataParallel model ("module." prefixes).
    let tensors = read_state_dict(&path).unwrap();
    let mut names: Vec<&str> = tensors.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["bn1.num_batches_tracked", "bn1.running_var", "conv1.weight", "fc.weight"]);
    let conv = &tensors["conv1.weight"];
    assert_eq!((conv.dims(), conv.dtype()), (&[4, 3, 3, 3][..], DType::F32));
    let expected: Vec<f32> = (0..108).map(|i| i as f32 / 8.0).collect();
    assert_eq!(conv.flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected);
    assert_eq!(tensors["bn1.num_batches_tracked"].to_scalar::<i64>().unwrap(), 7);
    let var = tensors["bn1.running_var"].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!((tensors["bn1.running_var"].dtype(), var), (DType::F16, vec![0.5, 1.5, 2.5, 3.5]));
    // `arange(6).reshape(2, 3).t()`: stored transposed, read back in logical order.
    let fc = tensors["fc.weight"].to_vec2::<f32>().unwrap();
    assert_eq!(fc, [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]);
}

#[test]
fn torchvision_and_timm_checkpoints_give_pytorchs_logits() {
    let Some(python) = std::env::var_os("SAE_TORCH_PYTHON") else {
        eprintln!("skipped: set SAE_TORCH_PYTHON to a Python with torch, torchvision and timm");
        return;
    };
    let dir = tempfile::Builder::new().prefix("sae-torch-interop-").tempdir().unwrap();
    let dir = dir.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/pytorch/export_checkpoints.py");
    let status = Command::new(&python).arg(&script).arg(dir).status().expect("running the export script");
    assert!(status.success(), "{} failed", script.display());
    let models = [
        ("tv_resnet18", "resnet18"),
        ("tv_resnet50", "resnet50"),
        ("tv_resnext50_32x4d", "resnext50_32x4d"),
        ("timm_resnet50", "resnet50"),
        ("timm_seresnet50", "seresnet50"),
    ];
    for (file, ours) in models {
        let io = candle_core::safetensors::load(dir.join(format!("{file}.io.safetensors")), &Device::Cpu).unwrap();
        let (input, expected) = (&io["input"], &io["logits"]);
        for format in ["pth", "safetensors"] {
            let dst = dir.join(format!("{file}-{format}-converted.safetensors"));
            let cfg = convert_checkpoint(&dir.join(format!("{file}.{format}")), &dst).unwrap();
            assert_eq!(cfg.name, ours, "{file}.{format}");
            let json = std::fs::read_to_string(dst.with_extension("json")).unwrap();
            let model = Model::new(ModelConfig::from_json(&json).unwrap(), 0, &Device::Cpu).unwrap();
            model.load_weights(&dst).unwrap();
            let logits = model.forward_t(input, false).unwrap();
            let diff = max_abs(&(&logits - expected).unwrap());
            let scale = max_abs(expected);
            assert!(diff <= 1e-5 * scale, "{file}.{format}: logits differ by {diff} (scale {scale})");
        }
        // And back: our weights as a state dict that the PyTorch model loads strictly and
        // that gives its logits again.
        let ours = dir.join(format!("{file}-pth-converted.safetensors"));
        let cfg = ModelConfig::from_json(&std::fs::read_to_string(ours.with_extension("json")).unwrap()).unwrap();
        let model = Model::load(cfg, &ours, &Device::Cpu).unwrap();
        let back = dir.join(format!("{file}-back.safetensors"));
        export_pytorch_state_dict(&model, &back).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/pytorch/load_state_dict.py");
        let out = Command::new(&python)
            .arg(&script)
            .arg(file)
            .arg(&back)
            .arg(dir.join(format!("{file}.io.safetensors")))
            .output()
            .expect("running the load script");
        assert!(
            out.status.success(),
            "{file}: PyTorch did not load our state dict: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let (diff, scale) = (v["max_diff"].as_f64().unwrap(), v["scale"].as_f64().unwrap());
        assert!(diff <= 1e-5 * scale, "{file}: PyTorch's logits from our state dict differ by {diff} (scale {scale})");
    }
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// Every model of the registry, SENetV2's and MobileNet's included, goes to PyTorch as a state dict that
/// `bench/pytorch/senetv2.py` loads strictly into the network it builds from the exported config,
/// and gives our logits there (an implementation written apart from ours: SaE's branches,
/// both gates, Keras biases and ε, the CIFAR stem, basic blocks, groups, MobileNet's ReLU6).
#[test]
fn our_models_load_into_the_pytorch_module_and_give_our_logits() {
    let Some(python) = std::env::var_os("SAE_TORCH_PYTHON") else {
        eprintln!("skipped: set SAE_TORCH_PYTHON to a Python with torch");
        return;
    };
    let dir = tempfile::Builder::new().prefix("sae-torch-module-").tempdir().unwrap();
    let dir = dir.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/pytorch/load_state_dict.py");
    let base = |name: &str| sae_models::config(name, 10).unwrap();
    let cases = [
        base("senetv2_resnet14b"),
        ModelConfig { gate: sae_models::Gate::S, ..base("senetv2_resnet14b") },
        base("senetv2_resnet50").with_paper_preset(sae_models::PaperPreset::Cifar10),
        ModelConfig { stem: sae_models::Stem::Cifar, ..base("seresnet18") },
        base("senetv2_resnext50_32x4d"),
        base("seresnet50").with_timm_se(),
        base("mobilenet_v1").with_paper_preset(sae_models::PaperPreset::Cifar10),
    ];
    for (i, cfg) in cases.into_iter().enumerate() {
        let what = format!("{} (gate {:?}, conv bias {}, stem {:?})", cfg.name, cfg.gate, cfg.conv_bias, cfg.stem);
        let model = Model::new(cfg, 3, &Device::Cpu).unwrap();
        let images = |n: usize, seed: usize| {
            let v: Vec<f32> = (0..n * 3 * 40 * 40).map(|j| (((j + seed) * 31 % 97) as f32 / 48.0) - 1.0).collect();
            Tensor::from_vec(v, (n, 3, 40, 40), &Device::Cpu).unwrap()
        };
        // Training-mode passes give the running statistics values of their own.
        for seed in 0..3 {
            model.forward_t(&images(4, seed), true).unwrap();
        }
        let x = images(2, 7);
        let logits = model.forward_t(&x, false).unwrap();
        let io = dir.join(format!("{i}.io.safetensors"));
        candle_core::safetensors::save(
            &[("input", x), ("logits", logits)].into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            &io,
        )
        .unwrap();
        let state = dir.join(format!("{i}.safetensors"));
        export_pytorch_state_dict(&model, &state).unwrap();
        let out = Command::new(&python)
            .arg(&script)
            .arg(state.with_extension("json"))
            .arg(&state)
            .arg(&io)
            .output()
            .expect("running the load script");
        assert!(out.status.success(), "{what}: PyTorch did not load it: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let (diff, scale) = (v["max_diff"].as_f64().unwrap(), v["scale"].as_f64().unwrap());
        assert!(diff <= 1e-5 * scale, "{what}: PyTorch's logits differ from ours by {diff} (scale {scale})");
    }
}
