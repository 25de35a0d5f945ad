//! The `sae` binary end to end on generated files: exit codes, outputs and error messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sae(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sae")).args(args).output().expect("running sae")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sae-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn models_lists_every_model_with_known_counts() {
    let out = sae(&["models", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), sae_models::list().len());
    let row = |name: &str| rows.iter().find(|r| r["model"] == name).unwrap().clone();
    // torchvision's published counts: resnet50 25,557,032 and resnet18 11,689,512 parameters;
    // resnet18's 1.82 G multiply-adds at 224² (1,814,073,344 by hand: convs + fc).
    assert_eq!(row("resnet50")["params"], 25_557_032);
    assert_eq!(row("resnet18")["params"], 11_689_512);
    assert_eq!(row("resnet18")["macs"], 1_814_073_344u64);
    let table = sae(&["models", "--classes", "10", "--size", "32"]);
    assert!(stdout(&table).lines().any(|l| l.starts_with("senetv2_resnet50")), "{}", stdout(&table));
}

#[test]
fn convert_export_and_predict_chain() {
    let dir = scratch("chain");
    // A torchvision-style checkpoint: our resnet18 tensors plus num_batches_tracked.
    let model = sae_models::Model::from_name("resnet18", 3, 1, &candle_core::Device::Cpu).unwrap();
    let mut tensors: std::collections::HashMap<String, candle_core::Tensor> =
        model.named_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    tensors
        .insert("bn1.num_batches_tracked".into(), candle_core::Tensor::new(5i64, &candle_core::Device::Cpu).unwrap());
    let src = dir.join("tv.safetensors");
    candle_core::safetensors::save(&tensors, &src).unwrap();
    let dst = dir.join("ours.safetensors");
    let out = sae(&["convert", s(&src), s(&dst)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resnet18, 3 classes"), "{}", stderr(&out));
    let cfg = dir.join("ours.json");
    assert!(cfg.exists());

    let onnx = dir.join("m.onnx");
    let out = sae(&["export", "--weights", s(&dst), "--config", s(&cfg), "--out", s(&onnx)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&onnx).unwrap();
    assert!(bytes.len() > 40_000_000 && bytes.windows(9).any(|w| w == b"fc.weight"), "{} bytes", bytes.len());

    let images = dir.join("images");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    for (i, path) in ["a.png", "sub/b.jpg"].iter().enumerate() {
        let img =
            image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 5) as u8, (y * 7 + i as u32 * 50) as u8, 90]));
        img.save(images.join(path)).unwrap();
    }
    std::fs::write(dir.join("labels.txt"), "cat\ndog\nbird\n").unwrap();
    let out = sae(&[
        "predict",
        "--weights",
        s(&dst),
        "--config",
        s(&cfg),
        "--labels",
        s(&dir.join("labels.txt")),
        "--size",
        "32",
        "--top",
        "2",
        "--json",
        s(&images),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["image"].as_str().unwrap().ends_with("a.png"));
    let top = lines[1]["top"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    let p: f64 = top.iter().map(|t| t["probability"].as_f64().unwrap()).sum();
    assert!(p > 0.0 && p <= 1.0 + 1e-6 && ["cat", "dog", "bird"].contains(&top[0]["label"].as_str().unwrap()));
    // A labels file with the wrong count is refused.
    std::fs::write(dir.join("two.txt"), "cat\ndog\n").unwrap();
    let out =
        sae(&["predict", "--weights", s(&dst), "--config", s(&cfg), "--labels", s(&dir.join("two.txt")), s(&images)]);
    assert!(
        !out.status.success() && stderr(&out).contains("has 2 names but the model has 3 classes"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_input_fails_with_a_message_naming_it() {
    let dir = scratch("errors");
    std::fs::write(dir.join("junk.pth"), b"definitely not a checkpoint").unwrap();
    let out = sae(&["convert", s(&dir.join("junk.pth")), s(&dir.join("out.safetensors"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("junk.pth"), "{}", stderr(&out));
    let out = sae(&["export", "--model", "resnet9000", "--weights", "w.safetensors", "--out", "x.onnx"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown model \"resnet9000\""), "{}", stderr(&out));
    let out = sae(&["predict", "--model", "resnet18", "--weights", s(&dir.join("missing.safetensors")), "x.png"]);
    assert!(!out.status.success() && stderr(&out).contains("missing.safetensors"), "{}", stderr(&out));
}

#[test]
fn data_check_lists_the_files_that_do_not_decode() {
    let dir = scratch("data");
    std::fs::create_dir_all(dir.join("train/cat")).unwrap();
    std::fs::create_dir_all(dir.join("train/dog")).unwrap();
    for i in 0..5 {
        image::RgbImage::from_pixel(8, 8, image::Rgb([i * 40, 0, 0]))
            .save(dir.join(format!("train/cat/{i}.png")))
            .unwrap();
    }
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(16, 16, image::Rgb([1, 2, 3]))
        .write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    std::fs::write(dir.join("train/dog/truncated.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    std::fs::write(dir.join("train/dog/text.png"), b"hello").unwrap();
    let out = sae(&["data", "check", s(&dir)]);
    assert_eq!(out.status.code(), Some(1));
    let listed = stdout(&out);
    assert!(listed.contains("truncated.jpg") && listed.contains("text.png") && !listed.contains("cat/"), "{listed}");
    assert!(stderr(&out).contains("7 images checked, 2 unreadable"), "{}", stderr(&out));
    std::fs::remove_file(dir.join("train/dog/truncated.jpg")).unwrap();
    std::fs::remove_file(dir.join("train/dog/text.png")).unwrap();
    let out = sae(&["data", "check", s(&dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
}
