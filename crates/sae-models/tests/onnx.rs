//! The ONNX export runs in onnxruntime and gives our logits. Needs `SAE_TORCH_PYTHON` (a Python
//! with onnxruntime, the venv of `bench/pytorch/`); skipped with a message otherwise.

use candle_core::{Device, ModuleT, Tensor};
use sae_models::{config, export_onnx_with_metadata, Model, ModelConfig, Stem};
use std::path::Path;
use std::process::Command;

fn images(n: usize, size: usize) -> Tensor {
    let v: Vec<f32> = (0..n * 3 * size * size).map(|i| ((i * 31 % 97) as f32 / 48.0) - 1.0).collect();
    Tensor::from_vec(v, (n, 3, size, size), &Device::Cpu).unwrap()
}

#[test]
fn exported_graphs_give_our_logits_in_onnxruntime() {
    let Some(python) = std::env::var_os("SAE_TORCH_PYTHON") else {
        eprintln!("skipped: set SAE_TORCH_PYTHON to a Python with onnxruntime");
        return;
    };
    let dir = tempfile::Builder::new().prefix("sae-onnx-").tempdir().unwrap();
    let dir = dir.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/pytorch/run_onnx.py");
    let cifar = |name: &str| ModelConfig { stem: Stem::Cifar, ..config(name, 10).unwrap() };
    let cases = [
        ("resnet18", config("resnet18", 10).unwrap()),
        ("seresnet50 (timm SE, u·s)", config("seresnet50", 10).unwrap().with_timm_se()),
        (
            "senetv2_resnet14b (SaE, u + u·s, Keras conventions)",
            config("senetv2_resnet14b", 10).unwrap().with_paper_preset(sae_models::PaperPreset::Cifar10),
        ),
        ("senetv2_resnext50_32x4d", config("senetv2_resnext50_32x4d", 10).unwrap()),
        ("seresnet18, CIFAR stem", cifar("seresnet18")),
        ("mobilenet_v1", config("mobilenet_v1", 10).unwrap()),
    ];
    for (i, (what, cfg)) in cases.into_iter().enumerate() {
        let model = Model::new(cfg, 3, &Device::Cpu).unwrap();
        // Training-mode passes give the running statistics realistic values.
        for _ in 0..3 {
            model.forward_t(&images(4, 48), true).unwrap();
        }
        let x = images(2, 48);
        let ours = model.forward_t(&x, false).unwrap();
        let onnx = dir.join(format!("{i}.onnx"));
        // The first graph also carries metadata (non-ASCII and empty values included).
        let metadata: Vec<(String, String)> = if i == 0 {
            [("class_names", r#"["chat", "Hund", "ε"]"#), ("preprocessing", "{}"), ("empty", "")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .to_vec()
        } else {
            Vec::new()
        };
        export_onnx_with_metadata(&model, &onnx, &metadata).unwrap();
        let (input, output) = (dir.join(format!("{i}.in.f32")), dir.join(format!("{i}.out.f32")));
        let metadata_out = dir.join(format!("{i}.metadata.json"));
        let raw: Vec<u8> =
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&input, raw).unwrap();
        let status = Command::new(&python)
            .arg(&script)
            .arg(&onnx)
            .arg(&input)
            .args(["2", "3", "48", "48"])
            .arg(&output)
            .arg(&metadata_out)
            .status()
            .expect("running onnxruntime");
        assert!(status.success(), "{what}: onnxruntime failed on {}", onnx.display());
        let read: std::collections::HashMap<String, String> =
            serde_json::from_str(&std::fs::read_to_string(&metadata_out).unwrap()).unwrap();
        assert_eq!(read, metadata.into_iter().collect(), "{what}: metadata as onnxruntime reads it");
        let theirs: Vec<f32> =
            std::fs::read(&output).unwrap().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(theirs.len(), ours.len(), "{what}");
        let scale = ours.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = ours.iter().zip(&theirs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5 * scale, "{what}: onnxruntime's logits differ by {diff} (scale {scale})");
    }
}
