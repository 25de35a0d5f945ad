//! Preprocessing of real image files the test writes, top-k predictions, and the
//! `classify` example run end to end.

use candle_core::{Device, Tensor};
use image::{GrayImage, Luma, Rgb, RgbImage};
use sae_models::{read_labels, Error, Model, Preprocess, IMAGENET_MEAN, IMAGENET_STD};
use std::path::Path;
use std::process::Command;

fn dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("sae-inference-{name}-")).tempdir().unwrap()
}

#[test]
fn preprocessing_resizes_crops_and_normalises() {
    let d = dir("pre");
    let d = d.path();
    // 300×200 image: left half red, right half blue. After resizing the short side to 73 and
    // cropping the centre 64, the left columns are red and the right ones blue.
    let mut img = RgbImage::new(300, 200);
    for (x, _, p) in img.enumerate_pixels_mut() {
        *p = if x < 150 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) };
    }
    let path = d.join("halves.png");
    img.save(&path).unwrap();
    let pre = Preprocess::imagenet(64);
    assert_eq!(pre.resize, 73);
    let t = pre.load(&path).unwrap();
    assert_eq!(t.dims(), &[3, 64, 64]);
    let v: Vec<Vec<Vec<f32>>> = t.to_vec3().unwrap();
    let norm = |c: usize, value: f32| (value - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
    assert!((v[0][10][0] - norm(0, 1.0)).abs() < 1e-5 && (v[2][10][0] - norm(2, 0.0)).abs() < 1e-5);
    assert!((v[0][10][63] - norm(0, 0.0)).abs() < 1e-5 && (v[2][10][63] - norm(2, 1.0)).abs() < 1e-5);

    // Greyscale JPEG becomes three equal channels.
    let grey = GrayImage::from_pixel(40, 40, Luma([128]));
    let gpath = d.join("grey.jpg");
    grey.save(&gpath).unwrap();
    let g: Vec<Vec<Vec<f32>>> = Preprocess::imagenet(32).load(&gpath).unwrap().to_vec3().unwrap();
    for c in 0..3 {
        assert!((g[c][5][5] * IMAGENET_STD[c] + IMAGENET_MEAN[c] - 128.0 / 255.0).abs() < 0.01);
    }

    std::fs::write(d.join("broken.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let err = Preprocess::imagenet(32).load(&d.join("broken.jpg")).unwrap_err();
    assert!(matches!(err, Error::Image { .. }) && err.to_string().contains("broken.jpg"), "{err}");
}

#[test]
fn top_k_ranks_softmax_probabilities() {
    let model = Model::from_name("mobilenet_v1", 6, 0, &Device::Cpu).unwrap();
    let x = Tensor::ones((2, 3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let top = model.top_k(&x, 3).unwrap();
    assert_eq!(top.len(), 2);
    let all = model.top_k(&x, 6).unwrap();
    let total: f32 = all[0].iter().map(|p| p.probability).sum();
    assert!((total - 1.0).abs() < 1e-5);
    assert!(all[0].windows(2).all(|w| w[0].probability >= w[1].probability));
    assert_eq!(top[0], all[0][..3].to_vec());
}

/// The `classify` example as `cargo test` built it beside this test (target/<profile>/examples).
/// `cargo run -p sae-models` would resolve sae-models' features on its own and build Candle a
/// second time (gigabytes of disk in CI), so that is only the fallback for a lone `--test` run.
fn classify_example() -> Command {
    let test_exe = std::env::current_exe().unwrap();
    let built = test_exe
        .parent()
        .and_then(Path::parent)
        .map(|profile_dir| profile_dir.join("examples").join(format!("classify{}", std::env::consts::EXE_SUFFIX)));
    match built {
        Some(path) if path.is_file() => Command::new(path),
        _ => {
            let mut cargo = Command::new(env!("CARGO"));
            cargo.args(["run", "-q", "-p", "sae-models", "--example", "classify", "--"]);
            cargo
        }
    }
}

#[test]
fn classify_example_runs_end_to_end() {
    let d = dir("example");
    let d = d.path();
    let weights = d.join("m.safetensors");
    Model::from_name("seresnet18", 3, 1, &Device::Cpu).unwrap().save(&weights).unwrap();
    let labels = d.join("labels.txt");
    std::fs::write(&labels, "cat\ndog\n\nbird\n").unwrap();
    assert_eq!(read_labels(&labels).unwrap(), ["cat", "dog", "bird"]);
    let image = d.join("a.png");
    RgbImage::from_fn(50, 40, |x, y| Rgb([x as u8 * 5, y as u8 * 6, 100])).save(&image).unwrap();
    let out = classify_example()
        .args(["--model", "seresnet18", "--size", "32"])
        .arg("--weights")
        .arg(&weights)
        .arg("--labels")
        .arg(&labels)
        .arg("--top")
        .arg("2")
        .arg(&image)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("a.png"), "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.contains('%')).count(), 2, "{stdout}");
}
