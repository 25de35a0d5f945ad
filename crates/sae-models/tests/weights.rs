//! Seeded initialisation, safetensors round trips, and the errors for bad weight files.

use candle_core::{DType, Device, ModuleT, Tensor};
use sae_models::{config, Error, Model};
use std::collections::HashMap;

fn tmp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("sae-models-test-{name}-")).tempdir().unwrap()
}

fn images() -> Tensor {
    let v: Vec<f32> = (0..2 * 3 * 32 * 32).map(|i| ((i * 31 % 97) as f32 / 48.0) - 1.0).collect();
    Tensor::from_vec(v, (2, 3, 32, 32), &Device::Cpu).unwrap()
}

fn all_values(model: &Model) -> Vec<(String, Vec<f32>)> {
    model.named_vars().into_iter().map(|(n, v)| (n, v.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

#[test]
fn same_seed_gives_identical_weights_and_different_seeds_differ() {
    let a = all_values(&Model::from_name("senetv2_resnet14b", 10, 42, &Device::Cpu).unwrap());
    let b = all_values(&Model::from_name("senetv2_resnet14b", 10, 42, &Device::Cpu).unwrap());
    let c = all_values(&Model::from_name("senetv2_resnet14b", 10, 43, &Device::Cpu).unwrap());
    assert_eq!(a, b, "same seed must give bit-identical weights");
    let differing = a.iter().zip(&c).filter(|(x, y)| x.1 != y.1).count();
    // Every randomly initialised tensor differs; constants (BatchNorm, conv biases) do not.
    let random = a.iter().filter(|(n, _)| n.ends_with("weight") && !n.contains(".bn") && !n.starts_with("bn")).count();
    assert!(differing >= random && random > 0, "{differing} tensors differ, {random} are random");
}

#[test]
fn the_same_seed_gives_every_variant_the_same_backbone() {
    // Runs of ResNet, SE and SENetV2 with one seed start from the same backbone weights, so
    // comparisons between them are paired by seed.
    let models =
        ["resnet14b", "seresnet14b", "senetv2_resnet14b"].map(|m| Model::from_name(m, 10, 5, &Device::Cpu).unwrap());
    let plain = models[0].named_vars();
    for other in &models[1..] {
        let vars = other.named_vars();
        for (name, var) in &plain {
            let a = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = vars[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a, b, "{}: {name} differs from resnet14b's", other.config().name);
        }
        assert!(vars.len() > plain.len());
    }
}

#[test]
fn initialisation_has_the_documented_statistics() {
    let model = Model::from_name("resnet50", 10, 1, &Device::Cpu).unwrap();
    let vars = model.named_vars();
    // Kaiming normal, fan-out, ReLU gain: std = √(2 / (256·3·3)) for layer3's 3×3 convs.
    let w = vars["layer3.1.conv2.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mean = w.iter().sum::<f32>() / w.len() as f32;
    let std = (w.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / w.len() as f32).sqrt();
    let expected = (2.0f32 / (256.0 * 9.0)).sqrt();
    assert!(mean.abs() < expected * 0.02 && (std / expected - 1.0).abs() < 0.01, "mean {mean} std {std}");
    assert!(vars["bn1.weight"].to_vec1::<f32>().unwrap().iter().all(|&v| v == 1.0));
    assert!(vars["bn1.running_var"].to_vec1::<f32>().unwrap().iter().all(|&v| v == 1.0));
    // Dense layers: U(±1/√fan_in).
    let bound = 1.0 / 2048f32.sqrt();
    let fc = vars["fc.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(fc.iter().all(|v| v.abs() <= bound) && fc.iter().any(|v| v.abs() > bound * 0.99));
}

#[test]
fn save_then_load_gives_identical_logits() {
    let dir = tmp_dir("roundtrip");
    let dir = dir.path();
    let path = dir.join("w.safetensors");
    let cfg = config("senetv2_resnet14b", 10).unwrap();
    let trained = Model::new(cfg.clone(), 7, &Device::Cpu).unwrap();
    // One training-mode pass so the running statistics are not at their initial values.
    trained.forward_t(&images(), true).unwrap();
    trained.save(&path).unwrap();
    assert!(!dir.join("w.safetensors.tmp").exists(), "temporary file left behind");
    let loaded = Model::load(cfg, &path, &Device::Cpu).unwrap();
    let a = trained.forward_t(&images(), false).unwrap().to_vec2::<f32>().unwrap();
    let b = loaded.forward_t(&images(), false).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(a, b);
    // State-dict names follow PyTorch/timm.
    let names: Vec<String> = loaded.named_vars().into_keys().collect();
    for n in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.se.fc1.0.weight",
        "layer1.0.se.fc1.3.bias",
        "layer1.0.se.fc2.weight",
        "fc.bias",
    ] {
        assert!(names.iter().any(|x| x == n), "missing {n}");
    }
    let se = Model::from_name("seresnet14b", 10, 0, &Device::Cpu).unwrap();
    assert!(se.named_vars().contains_key("layer4.0.se.fc1.weight"));
}

/// Writes the model's tensors after `edit` has changed them.
fn write_edited(model: &Model, path: &std::path::Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors: HashMap<String, Tensor> =
        model.named_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn bad_weight_files_give_errors_naming_the_tensor() {
    let dir = tmp_dir("errors");
    let dir = dir.path();
    let model = Model::from_name("seresnet14b", 10, 0, &Device::Cpu).unwrap();
    let path = dir.join("bad.safetensors");

    write_edited(&model, &path, |t| {
        t.remove("layer2.0.bn1.running_var");
    });
    let err = model.load_weights(&path).unwrap_err();
    assert!(matches!(&err, Error::MissingTensor { name, .. } if name == "layer2.0.bn1.running_var"), "{err}");
    assert!(err.to_string().contains("bad.safetensors"), "{err}");

    write_edited(&model, &path, |t| {
        t.insert("fc.weight".into(), Tensor::zeros((20, 2048), DType::F32, &Device::Cpu).unwrap());
    });
    let err = model.load_weights(&path).unwrap_err().to_string();
    assert!(err.contains("\"fc.weight\" has shape [20, 2048], expected [10, 2048]"), "{err}");

    write_edited(&model, &path, |t| {
        let w = t["conv1.weight"].to_dtype(DType::F64).unwrap();
        t.insert("conv1.weight".into(), w);
    });
    let err = model.load_weights(&path).unwrap_err().to_string();
    assert!(err.contains("\"conv1.weight\" has dtype f64, expected f32"), "{err}");

    write_edited(&model, &path, |t| {
        t.insert("layer1.0.se.fc1.3.weight".into(), Tensor::zeros((8, 256), DType::F32, &Device::Cpu).unwrap());
    });
    let err = model.load_weights(&path).unwrap_err().to_string();
    assert!(err.contains("unexpected tensor \"layer1.0.se.fc1.3.weight\""), "{err}");

    model.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = model.load_weights(&path).unwrap_err();
    assert!(matches!(err, Error::Safetensors { .. }), "{err}");

    let err = model.load_weights(&dir.join("absent.safetensors")).unwrap_err().to_string();
    assert!(err.contains("absent.safetensors"), "{err}");

    // A failed load leaves the weights as they were.
    let before = all_values(&model);
    write_edited(&model, &path, |t| {
        t.insert("fc.bias".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    });
    assert!(model.load_weights(&path).is_err());
    assert_eq!(before, all_values(&model));
}

#[test]
fn unknown_names_and_bad_configs_are_errors() {
    let err = config("resnet51", 10).unwrap_err().to_string();
    assert!(err.contains("unknown model \"resnet51\"") && err.contains("senetv2_resnet50"), "{err}");
    assert!(config("seresnext50_32x4d", 10).is_ok());
    let err = sae_models::create("senet154", 10, 0, &Device::Cpu).err().expect("unknown name").to_string();
    assert!(err.contains("known models: mobilenet_v1, resnet101"), "{err}");
    assert_eq!(sae_models::create("resnet18", 4, 0, &Device::Cpu).unwrap().config().num_classes, 4);
    let err = config("resnet50", 0).unwrap_err().to_string();
    assert!(err.contains("num_classes"), "{err}");
    let mut cfg = config("senetv2_resnet50", 10).unwrap();
    cfg.reduction = 512;
    assert!(cfg.validate().unwrap_err().to_string().contains("reduction 512"));
    let json = config("senetv2_resnet50", 10).unwrap().to_json();
    assert_eq!(sae_models::ModelConfig::from_json(&json).unwrap(), config("senetv2_resnet50", 10).unwrap());
    assert!(json.contains("\"gate\": \"one_plus_s\""), "{json}");
    assert!(sae_models::ModelConfig::from_json("{\"name\": 3}").is_err());
}
