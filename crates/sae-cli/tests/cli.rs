//! The `sae` binary end to end on generated files: exit codes, outputs and error messages.

mod common;

use common::{s, scratch, write_cifar10};
use std::path::Path;
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

/// Class folders `class0`–`class2` under `dir`, four `side`×`side` PNGs each: red, green or blue
/// (learnable), each image a shade apart.
fn write_colour_classes(dir: &Path, side: u32) {
    for (c, colour) in [(0u8, [250u8, 10, 10]), (1, [10, 250, 10]), (2, [10, 10, 250])] {
        let d = dir.join(format!("class{c}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..4u8 {
            image::RgbImage::from_pixel(side, side, image::Rgb([colour[0], colour[1] ^ i, colour[2]]))
                .save(d.join(format!("{i}.png")))
                .unwrap();
        }
    }
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
    let dir = dir.path();
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

    // Back to a PyTorch state dict (PyTorch loading it is in sae-models' tests/torch_interop.rs):
    // every tensor as it was, and each BatchNorm's num_batches_tracked; converted again, the
    // same weights.
    let back = dir.join("back.safetensors");
    let out = sae(&["export", "--weights", s(&dst), "--config", s(&cfg), "--format", "pytorch", "--out", s(&back)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let exported = candle_core::safetensors::load(&back, &candle_core::Device::Cpu).unwrap();
    let batch_norms = tensors.keys().filter(|k| k.ends_with("running_mean")).count();
    assert_eq!(exported.len(), tensors.len() - 1 + batch_norms);
    for (name, t) in &tensors {
        let e = &exported[name];
        if name != "bn1.num_batches_tracked" {
            let diff =
                (t - e).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }
    }
    let again = dir.join("again.safetensors");
    assert!(sae(&["convert", s(&back), s(&again)]).status.success());
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&dst).unwrap());
    // SENetV2 and MobileNet go to sae's own PyTorch module (PyTorch loading them is in
    // tests/torch_interop.rs), with the config beside the weights.
    let v2 = dir.join("v2.safetensors");
    sae_models::Model::from_name("senetv2_resnet14b", 3, 1, &candle_core::Device::Cpu).unwrap().save(&v2).unwrap();
    let args = ["export", "--model", "senetv2_resnet14b", "--classes", "3", "--weights", s(&v2), "--format", "pytorch"];
    let out = sae(&[&args[..], &["--out", s(&back)]].concat());
    assert!(out.status.success() && stderr(&out).contains("no torchvision or timm model takes it"), "{}", stderr(&out));
    assert!(std::fs::read_to_string(dir.join("back.json")).unwrap().contains("senetv2_resnet14b"));
    let mobilenet = dir.join("mobilenet.safetensors");
    sae_models::Model::from_name("mobilenet_v1", 3, 1, &candle_core::Device::Cpu).unwrap().save(&mobilenet).unwrap();
    let args =
        ["export", "--model", "mobilenet_v1", "--classes", "3", "--weights", s(&mobilenet), "--format", "pytorch"];
    let out = sae(&[&args[..], &["--out", s(&back)]].concat());
    assert!(out.status.success() && stderr(&out).contains("only ResNets and ResNeXts"), "{}", stderr(&out));
    assert!(std::fs::read_to_string(dir.join("back.json")).unwrap().contains("mobilenet_v1"));

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
    let dir = dir.path();
    std::fs::write(dir.join("junk.pth"), b"definitely not a checkpoint").unwrap();
    let out = sae(&["convert", s(&dir.join("junk.pth")), s(&dir.join("out.safetensors"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("junk.pth"), "{}", stderr(&out));
    let out = sae(&["export", "--model", "resnet9000", "--weights", "w.safetensors", "--out", "x.onnx"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown model \"resnet9000\""), "{}", stderr(&out));
    let out =
        sae(&["train", "--model", "resnet18", "--data", s(dir), "--precision", "fp8", "--out", s(&dir.join("r"))]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("unknown precision \"fp8\"; known precisions: f32, bf16"), "{}", stderr(&out));
    let out = sae(&["predict", "--model", "resnet18", "--weights", s(&dir.join("missing.safetensors")), "x.png"]);
    assert!(!out.status.success() && stderr(&out).contains("missing.safetensors"), "{}", stderr(&out));
    // A CIFAR-10 directory with its test batch alone: training names the missing file, and
    // says what the system said once.
    let test_only = dir.join("test-only");
    std::fs::create_dir_all(&test_only).unwrap();
    std::fs::write(test_only.join("test_batch.bin"), vec![0u8; 3073]).unwrap();
    let out = sae(&["train", "--model", "resnet14b", "--data", s(&test_only), "--out", s(&dir.join("r"))]);
    let message = stderr(&out);
    assert!(!out.status.success() && message.contains("data_batch_1.bin: "), "{message}");
    let system = message.rsplit("data_batch_1.bin: ").next().unwrap().trim();
    assert_eq!(message.matches(system).count(), 1, "{message}");
}

#[test]
fn data_check_lists_the_files_that_do_not_decode() {
    let dir = scratch("data");
    let dir = dir.path();
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
    let out = sae(&["data", "check", s(dir)]);
    assert_eq!(out.status.code(), Some(1));
    let listed = stdout(&out);
    assert!(listed.contains("truncated.jpg") && listed.contains("text.png") && !listed.contains("cat/"), "{listed}");
    assert!(stderr(&out).contains("7 images checked, 2 unreadable"), "{}", stderr(&out));
    std::fs::remove_file(dir.join("train/dog/truncated.jpg")).unwrap();
    std::fs::remove_file(dir.join("train/dog/text.png")).unwrap();
    let out = sae(&["data", "check", s(dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn train_eval_resume_and_fine_tune() {
    let dir = scratch("train");
    let dir = dir.path();
    let data = dir.join("cifar");
    std::fs::create_dir_all(&data).unwrap();
    write_cifar10(&data, 2);
    let run = dir.join("run");
    let out = sae(&[
        "train",
        "--model",
        "resnet14b",
        "--data",
        s(&data),
        "--input-size",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "10",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--momentum",
        "0.9",
        "--schedule",
        "cosine",
        "--warmup-epochs",
        "0.5",
        "--ema-decay",
        "0.5",
        "--checkpoint-every",
        "2",
        "--accumulate",
        "2",
        "--clip-grad-norm",
        "5",
        "--stem",
        "cifar",
        "--bn-eps",
        "0.001",
        "--trivial-augment",
        "--mixup",
        "0.8",
        "--cutmix",
        "1.0",
        "--precision",
        "bf16",
        "--out",
        s(&run),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["optimizer"]["kind"], "sgd");
    assert_eq!(cfg["optimizer"]["momentum"], 0.9);
    assert_eq!(cfg["schedule"]["kind"], "cosine");
    assert_eq!(cfg["steps"]["accumulate"], 2);
    assert_eq!((cfg["model"]["stem"].as_str(), cfg["model"]["bn_eps"].as_f64()), (Some("cifar"), Some(0.001)));
    assert_eq!(
        (cfg["augment"]["trivial_augment"].as_bool(), cfg["augment"]["cutmix_alpha"].as_f64()),
        (Some(true), Some(1.0))
    );
    assert_eq!(cfg["data"]["dataset"], "cifar10");
    assert_eq!(cfg["precision"], "bf16");
    assert!(stderr(&out).contains("bf16 mixed precision"), "{}", stderr(&out));
    for file in ["summary.csv", "train.log", "curves.png", "checkpoints/epoch-0001/ema.safetensors"] {
        assert!(run.join(file).exists(), "{file}");
    }
    // Resume for a second epoch.
    let out = sae(&["train", "--out", s(&run), "--resume", "--epochs", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(run.join("summary.csv")).unwrap().lines().count(), 3);

    let out = sae(&["eval", s(&run), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(e["images"], 20);
    let confusion: Vec<Vec<u64>> = serde_json::from_value(e["confusion"].clone()).unwrap();
    assert_eq!(confusion.len(), 10);
    let correct: u64 = (0..10).map(|i| confusion[i][i]).sum();
    let total: u64 = confusion.iter().flatten().sum();
    assert_eq!(total, 20);
    assert!((e["top1"].as_f64().unwrap() - 100.0 * correct as f64 / 20.0).abs() < 1e-9);
    assert_eq!(e["per_class"].as_array().unwrap().len(), 10);
    assert_eq!(e["per_class"][3]["images"], 2);
    let png = image::open(run.join("confusion.png")).unwrap();
    assert!(png.width() >= 360);

    // Evaluation reads the test split alone: a directory without the training batches gives
    // the same numbers as the run's own data.
    let last = sae(&["eval", s(&run), "--last", "--json"]);
    assert!(last.status.success(), "{}", stderr(&last));
    let test_only = dir.join("cifar-test-only");
    std::fs::create_dir_all(&test_only).unwrap();
    for file in ["test_batch.bin", "batches.meta.txt"] {
        std::fs::copy(data.join(file), test_only.join(file)).unwrap();
    }
    let alone =
        sae(&["eval", s(&run), "--last", "--json", "--data", s(&test_only), "--confusion", s(&dir.join("c.png"))]);
    assert!(alone.status.success(), "{}", stderr(&alone));
    assert_eq!(stdout(&alone), stdout(&last));

    // Fine-tune on a 3-class folder from the CIFAR run's weights: the head is replaced.
    let folder = dir.join("folder");
    for split in ["train", "val"] {
        write_colour_classes(&folder.join(split), 20);
    }
    let weights = run.join("checkpoints/epoch-0002/model.safetensors");
    let tuned = dir.join("tuned");
    let out = sae(&[
        "train",
        "--config",
        s(&run.join("config.json")),
        "--data",
        s(&folder),
        "--input-size",
        "16",
        "--init",
        s(&weights),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--out",
        s(&tuned),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tuned.join("config.json")).unwrap()).unwrap();
    assert_eq!((cfg["model"]["num_classes"].as_u64(), cfg["data"]["dataset"].as_str()), (Some(3), Some("folder")));
    // The cosine schedule of the config file is stretched to the new --epochs.
    assert_eq!(
        (cfg["schedule"]["kind"].as_str(), cfg["schedule"]["total_epochs"].as_f64()),
        (Some("cosine"), Some(2.0))
    );
    let out = sae(&[
        "predict",
        "--config",
        s(&tuned.join("config.json")),
        "--weights",
        s(&tuned.join("checkpoints/epoch-0002/model.safetensors")),
        "--size",
        "16",
        "--top",
        "3",
        "--json",
        s(&folder.join("val/class1")),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 4);
    // A run predicts with its class names and its checkpoint: each image's top class as
    // `sae eval` counted it (its confusion matrix, a row per true class).
    assert_eq!(std::fs::read_to_string(tuned.join("classes.txt")).unwrap(), "class0\nclass1\nclass2\n");
    let out = sae(&["predict", "--run", s(&tuned), "--top", "1", "--json", s(&folder.join("val"))]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut counted = vec![vec![0u64; 3]; 3];
    for line in stdout(&out).lines() {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        let truth = (0..3).find(|c| p["image"].as_str().unwrap().contains(&format!("class{c}/"))).unwrap();
        let class = p["top"][0]["class"].as_u64().unwrap();
        assert_eq!(p["top"][0]["label"], format!("class{class}"));
        counted[truth][class as usize] += 1;
    }
    let out = sae(&["eval", s(&tuned), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(e["confusion"], serde_json::json!(counted));
    // Its ONNX export says what the outputs are and how to prepare an input (the folder's
    // 16×16: resize to 18, ImageNet's statistics); onnxruntime reading them back is in
    // sae-models' tests/onnx.rs.
    let onnx = dir.join("tuned.onnx");
    let out = sae(&["export", "--run", s(&tuned), "--out", s(&onnx)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = String::from_utf8_lossy(&std::fs::read(&onnx).unwrap()).into_owned();
    for text in [
        r#"class_names"#,
        r#"["class0","class1","class2"]"#,
        r#"{"crop":16,"mean":[0.485,0.456,0.406],"resize":18,"std":[0.229,0.224,0.225]}"#,
    ] {
        assert!(bytes.contains(text), "{text} not in the ONNX file");
    }
    // A run's images are prepared as its evaluation prepared them, so --size is refused.
    let out = sae(&["predict", "--run", s(&tuned), "--size", "32", s(&folder.join("val"))]);
    assert!(!out.status.success() && stderr(&out).contains("--size"), "{}", stderr(&out));
    // A folder's val/ without one of train/'s classes is evaluated with train/'s labels.
    std::fs::remove_dir_all(folder.join("val/class0")).unwrap();
    let out = sae(&["eval", s(&tuned), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let per_class: Vec<_> = e["per_class"].as_array().unwrap().iter().map(|c| c["images"].as_u64()).collect();
    assert_eq!((e["images"].as_u64(), per_class), (Some(8), vec![Some(0), Some(4), Some(4)]));
}

#[test]
fn train_refuses_inconsistent_settings() {
    let dir = scratch("train-errors");
    let dir = dir.path();
    let data = dir.join("cifar");
    std::fs::create_dir_all(&data).unwrap();
    write_cifar10(&data, 1);
    let run = s(&dir.join("run")).to_string();
    let out = sae(&["train", "--model", "resnet14b", "--data", s(&data), "--momentum", "0.9", "--out", &run]);
    assert!(!out.status.success() && stderr(&out).contains("SGD settings"), "{}", stderr(&out));
    let out = sae(&[
        "train",
        "--model",
        "resnet14b",
        "--data",
        s(&data),
        "--optimizer",
        "sgd",
        "--beta1",
        "0.8",
        "--out",
        &run,
    ]);
    assert!(!out.status.success() && stderr(&out).contains("Adam settings"), "{}", stderr(&out));
    let out = sae(&[
        "train",
        "--model",
        "resnet14b",
        "--data",
        s(&data),
        "--optimizer",
        "adamw",
        "--momentum",
        "0.9",
        "--out",
        &run,
    ]);
    assert!(!out.status.success() && stderr(&out).contains("AdamW's weight decay is decoupled"), "{}", stderr(&out));
    let out = sae(&["train", "--model", "resnet14b", "--data", s(dir), "--out", &run]);
    assert!(!out.status.success() && stderr(&out).contains("not a CIFAR-10/100 binary directory"), "{}", stderr(&out));
    let out = sae(&["train", "--model", "resnet14b", "--data", s(&data), "--ema-decay", "1.5", "--out", &run]);
    assert!(!out.status.success() && stderr(&out).contains("ema_decay must be in [0, 1)"), "{}", stderr(&out));
    // A CPU-only build names what is missing for a GPU.
    let out = sae(&["train", "--model", "resnet14b", "--data", s(&data), "--device", "cuda", "--out", &run]);
    assert!(!out.status.success() && stderr(&out).contains("no CUDA support"), "{}", stderr(&out));
    let out = sae(&["train", "--out", &run, "--resume"]);
    assert!(!out.status.success() && stderr(&out).contains("config.json"), "{}", stderr(&out));
}

/// The model weights of a run's last checkpoint.
fn last_weights(run: &Path) -> Vec<u8> {
    let last: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoints/last.json")).unwrap()).unwrap();
    std::fs::read(run.join("checkpoints").join(last["dir"].as_str().unwrap()).join("model.safetensors")).unwrap()
}

#[test]
fn kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run() {
    let dir = scratch("kill9");
    let dir = dir.path();
    let data = dir.join("cifar");
    std::fs::create_dir_all(&data).unwrap();
    write_cifar10(&data, 4);
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--model",
            "seresnet14b",
            "--data",
            s(&data),
            "--input-size",
            "16",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--checkpoint-every",
            "1",
            "--trivial-augment",
            "--mixup",
            "0.4",
            "--out",
            s(out),
        ]
        .map(String::from)
        .to_vec()
    };
    let straight = dir.join("straight");
    let out = sae(&args(&straight).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", stderr(&out));

    // Kill the process once a mid-epoch checkpoint of the second epoch exists.
    let killed = dir.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sae"))
        .args(args(&killed))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pointer = killed.join("checkpoints/last.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let text = std::fs::read_to_string(&pointer).unwrap_or_default();
        if text.contains("epoch-0001-batch") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no mid-epoch checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SIGKILL: no destructors, no flushing; whatever was being written is left as it is.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!killed.join("checkpoints/epoch-0002").exists(), "killed too late to test a mid-epoch resume");
    let out = sae(&["train", "--out", s(&killed), "--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(last_weights(&straight), last_weights(&killed), "weights differ after kill -9 and resume");

    // A run's config.json is a complete config: training from it reproduces the run.
    let again = dir.join("again");
    let out = sae(&["train", "--config", s(&straight.join("config.json")), "--out", s(&again)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let read = |p: &Path| std::fs::read_to_string(p.join("config.json")).unwrap();
    assert_eq!(read(&straight), read(&again));
    assert_eq!(last_weights(&straight), last_weights(&again));
}

#[cfg(not(feature = "mpi"))]
#[test]
fn several_processes_without_mpi_support_are_an_error_not_independent_runs() {
    let dir = scratch("no-mpi");
    let dir = dir.path();
    let out = Command::new(env!("CARGO_BIN_EXE_sae"))
        .args(["train", "--model", "resnet14b", "--data", s(dir), "--out", s(&dir.join("run"))])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("2 processes") && err.contains("--features mpi"), "{err}");
    assert!(!dir.join("run").exists());
}

/// `sae compare` on runs written by hand around one real run's config: two settings (two
/// learning rates) over seeds 0–2, checked against a hand calculation, an unfinished run left
/// out, and the errors.
#[test]
fn compare_runs_over_seeds() {
    let dir = scratch("compare");
    let dir = dir.path();
    let data = dir.join("cifar");
    write_cifar10(&data, 1);
    let real = dir.join("real");
    let args = [
        "train",
        "--model",
        "resnet14b",
        "--data",
        s(&data),
        "--input-size",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "10",
        "--optimizer",
        "adamw",
        "--weight-decay",
        "0.05",
        "--out",
        s(&real),
    ];
    let out = sae(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(real.join("config.json")).unwrap()).unwrap();
    // PyTorch's AdamW defaults but the decay given.
    assert_eq!(
        cfg["optimizer"],
        serde_json::json!({"kind": "adamw", "lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.05})
    );
    cfg["epochs"] = 3.into();
    let runs = dir.join("runs");
    // Evaluation top-1 of epochs 1–3: the last-three mean is the middle value, 5 below the last.
    let write_run = |name: &str, lr: f64, seed: u64, top1: &[f64]| {
        let run = runs.join(name);
        std::fs::create_dir_all(&run).unwrap();
        let mut cfg = cfg.clone();
        cfg["optimizer"]["lr"] = lr.into();
        cfg["seed"] = seed.into();
        std::fs::write(run.join("config.json"), cfg.to_string()).unwrap();
        let mut csv =
            "epoch,train_loss,train_top1,eval_loss,eval_top1,eval_top5,lr,seconds,images_per_second\n".to_string();
        for (e, t) in top1.iter().enumerate() {
            csv += &format!("{},1.0,50.0,1.0,{t},90.0,{lr},1.0,100.0\n", e + 1);
        }
        std::fs::write(run.join("summary.csv"), csv).unwrap();
    };
    for (seed, last) in [(0, 50.0), (1, 52.0), (2, 54.0)] {
        write_run(&format!("a{seed}"), 0.05, seed, &[last - 10.0, last - 5.0, last]);
    }
    for (seed, last) in [(0, 48.0), (1, 49.0), (2, 53.0)] {
        write_run(&format!("b{seed}"), 0.1, seed, &[last - 10.0, last - 5.0, last]);
    }
    write_run("b3-unfinished", 0.1, 3, &[10.0]);
    // A run that has not finished an epoch has no summary yet.
    write_run("b4-just-started", 0.1, 4, &[]);
    std::fs::remove_file(runs.join("b4-just-started/summary.csv")).unwrap();
    let out = sae(&["compare", s(&runs)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("b3-unfinished: 1 of 3 epochs finished, left out"), "{}", stderr(&out));
    assert!(stderr(&out).contains("b4-just-started: no epoch finished yet, left out"), "{}", stderr(&out));
    let table = stdout(&out);
    // a: 50, 52, 54 → 52 ± 2, half-width t(0.975, 2) · 2 / √3 = 4.97. b: 48, 49, 53 → 50 ± 2.65
    // (half-width 6.57). Paired a − b: 2, 3, 1 → 2 ± 1, half-width 2.48, t = 2√3 on 2 degrees of
    // freedom: p = 1 − 2√3 / √14 = 0.074.
    for row in [
        "| optimizer.lr=0.05 | 3 | 0, 1, 2 | 3/3 | 52.00 ± 2.00 [47.03, 56.97] | 47.00 ± 2.00 [42.03, 51.97] | 90.00 ± 0.00 [90.00, 90.00] |",
        "| optimizer.lr=0.1 | 3 | 0, 1, 2 | 3/3 | 50.00 ± 2.65 [43.43, 56.57] | 45.00 ± 2.65 [38.43, 51.57] |",
        // Seeds for a 1-point gap at a spread of 1: ⌈(1.96 + 0.84)² · 1²⌉ = 8.
        "| optimizer.lr=0.05 | optimizer.lr=0.1 | paired over 3 seeds | +2.00 [-0.48, +4.48] | 0.074 | not resolved | +2.00 [-0.48, +4.48] | 0.074 | not resolved | 8 |",
    ] {
        assert!(table.contains(row), "{row}\nnot in\n{table}");
    }
    let plot = dir.join("compare.png");
    let out = sae(&["compare", s(&runs), "--unfinished", "--json", "--plot", s(&plot)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(image::open(&plot).unwrap().width(), 900);
    let j: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(j["settings"][1]["runs"].as_array().unwrap().len(), 4);
    assert!((j["settings"][0]["top1"]["mean"].as_f64().unwrap() - 52.0).abs() < 1e-9);
    assert!(
        (j["comparisons"][0]["top1"]["p"].as_f64().unwrap() - (1.0 - 2.0 * 3f64.sqrt() / 14f64.sqrt())).abs() < 1e-6
    );

    // Two runs of one setting and seed cannot be told apart by seed.
    std::fs::create_dir_all(runs.join("copy")).unwrap();
    for file in ["config.json", "summary.csv"] {
        std::fs::copy(runs.join("a1").join(file), runs.join("copy").join(file)).unwrap();
    }
    let out = sae(&["compare", s(&runs)]);
    assert!(
        !out.status.success() && stderr(&out).contains("the same setting with the same seed 1"),
        "{}",
        stderr(&out)
    );
    let out = sae(&["compare", s(&data)]);
    assert!(
        !out.status.success() && stderr(&out).contains("neither a run directory nor a folder of runs"),
        "{}",
        stderr(&out)
    );

    // Setting a's seed 2 trained from another copy of the data: another setting, unless
    // `--ignore` says the field does not matter.
    let moved = dir.join("moved");
    for seed in 0..3 {
        let (from, to) = (runs.join(format!("a{seed}")), moved.join(format!("a{seed}")));
        std::fs::create_dir_all(&to).unwrap();
        std::fs::copy(from.join("summary.csv"), to.join("summary.csv")).unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(from.join("config.json")).unwrap()).unwrap();
        if seed == 2 {
            cfg["data"]["dir"] = "/elsewhere/cifar".into();
        }
        std::fs::write(to.join("config.json"), cfg.to_string()).unwrap();
    }
    let settings = |extra: &[&str]| {
        let out = sae(&[&["compare", s(&moved), "--json"], extra].concat());
        assert!(out.status.success(), "{}", stderr(&out));
        let j: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        let names = j["settings"].as_array().unwrap().iter();
        names
            .map(|s| (s["setting"].as_str().unwrap().to_string(), s["runs"].as_array().unwrap().len()))
            .collect::<Vec<_>>()
    };
    let two = settings(&[]);
    assert_eq!(two.len(), 2, "{two:?}");
    assert!(two[0].0.starts_with("data.dir="), "{two:?}");
    for ignore in ["data.dir", "data"] {
        assert_eq!(settings(&["--ignore", ignore]), [("all runs".to_string(), 3)]);
    }
    let out = sae(&["compare", s(&moved), "--ignore", "data.folder"]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("--ignore data.folder: no run's config has that field"), "{err}");
    assert!(err.contains("data, epochs,"), "{err}");
}

/// A folder of class folders without val/ (torchvision's layout) trains with a held-out
/// fraction of each class, which `sae eval` evaluates again; without the fraction the error
/// says how to give it, and a folder with val/ refuses one.
#[test]
fn a_folder_without_val_holds_out_a_fraction_of_each_class() {
    let dir = scratch("val-fraction");
    let dir = dir.path();
    let flat = dir.join("flat");
    write_colour_classes(&flat, 12);
    let train = |data: &Path, run: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--model", "resnet14b", "--data", s(data), "--input-size", "8"];
        args.extend(["--epochs", "1", "--batch-size", "3", "--out", s(run)]);
        args.extend(extra);
        sae(&args)
    };
    let out = train(&flat, &dir.join("refused"), &[]);
    assert!(!out.status.success() && stderr(&out).contains("--val-fraction 0.1"), "{}", stderr(&out));
    let run = dir.join("run");
    let out = train(&flat, &run, &["--val-fraction", "0.25"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!((cfg["data"]["dataset"].as_str(), cfg["data"]["val_fraction"].as_f64()), (Some("folder"), Some(0.25)));
    // One image of each class's four held out and evaluated.
    let out = sae(&["eval", s(&run), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let per_class: Vec<_> = e["per_class"].as_array().unwrap().iter().map(|c| c["images"].as_u64()).collect();
    assert_eq!((e["images"].as_u64(), per_class), (Some(3), vec![Some(1); 3]));
    // Its weights with its config.json evaluate as the run does: the config's data section (input
    // size, held-out fraction) under the --data given.
    let (weights, config) = (run.join("checkpoints/epoch-0001/model.safetensors"), run.join("config.json"));
    let args = ["eval", "--weights", s(&weights), "--config", s(&config), "--data", s(&flat), "--json"];
    let by_weights = sae(&args);
    assert!(by_weights.status.success(), "{}", stderr(&by_weights));
    assert_eq!(stdout(&by_weights), stdout(&out));
    // With val/ beside train/, evaluation uses it and a fraction is refused.
    let split = dir.join("split");
    std::fs::create_dir_all(&split).unwrap();
    std::fs::rename(&flat, split.join("train")).unwrap();
    std::fs::create_dir_all(split.join("val/class0")).unwrap();
    let out = train(&split, &dir.join("both"), &["--val-fraction", "0.25"]);
    assert!(!out.status.success() && stderr(&out).contains("is a validation split"), "{}", stderr(&out));
}

/// `--seeds` trains one run per seed under --out, keeps finished runs when run again, refuses a
/// changed setting for runs already there, and names bad seed lists.
#[test]
fn seeds_train_one_run_each_and_keep_finished_ones() {
    let dir = scratch("seeds");
    let dir = dir.path();
    let data = dir.join("cifar");
    write_cifar10(&data, 1);
    let out = dir.join("runs");
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--model", "resnet14b", "--data", s(&data), "--input-size", "8", "--epochs", "1"];
        args.extend(["--batch-size", "10", "--out", s(&out)]);
        args.extend(extra);
        sae(&args)
    };
    let first = train(&["--seeds", "0,1"]);
    assert!(first.status.success(), "{}", stderr(&first));
    for seed in [0u64, 1] {
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(format!("seed-{seed}/config.json"))).unwrap())
                .unwrap();
        assert_eq!(cfg["seed"], seed);
    }
    assert!(stderr(&first).contains("2 seeds: eval top-1"), "{}", stderr(&first));
    // Again: both runs are finished and kept, with the same results.
    let summary = std::fs::read_to_string(out.join("seed-1/summary.csv")).unwrap();
    let again = train(&["--seeds", "0-1"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(std::fs::read_to_string(out.join("seed-1/summary.csv")).unwrap(), summary);
    let last_line = |o: &Output| stderr(o).lines().last().unwrap_or_default().to_string();
    assert_eq!(last_line(&again), last_line(&first));
    // Another setting over the same runs is refused, not mixed in.
    let changed = train(&["--seeds", "0-1", "--lr", "0.01"]);
    assert!(
        !changed.status.success() && stderr(&changed).contains("made with a different config"),
        "{}",
        stderr(&changed)
    );
    for (bad, message) in [("1-0", "runs backwards"), ("0,x", "is not a seed"), ("0,0-1", "names a seed twice")] {
        let out = train(&["--seeds", bad]);
        assert!(!out.status.success() && stderr(&out).contains(message), "{bad}: {}", stderr(&out));
    }
    let out = train(&["--seeds", "0-1", "--seed", "3"]);
    assert!(!out.status.success() && stderr(&out).contains("cannot be used with"), "{}", stderr(&out));
}

/// `sae benchmark`: a line per model and mode whose numbers agree with each other and with
/// `sae models` (images/s is the batch over the median step; GFLOP/s two FLOP per
/// multiply-accumulate, three passes' worth for training), the same rows in its CSV, a run's
/// input size and precision by default, and errors for bad input.
#[test]
fn benchmark_reports_rows_that_agree() {
    let dir = scratch("benchmark");
    let dir = dir.path();
    let csv = dir.join("speed.csv");
    let args = ["benchmark", "--model", "resnet14b,seresnet14b", "--classes", "10", "--input-size", "32"];
    let tail = ["--batch-size", "2", "--seconds", "0", "--repeats", "2", "--json", "--csv", s(&csv)];
    let out = sae(&[&args[..], &tail[..]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let models = sae(&["models", "--classes", "10", "--size", "32", "--json"]);
    let models: Vec<serde_json::Value> = stdout(&models).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let expected = [("resnet14b", "infer"), ("resnet14b", "train"), ("seresnet14b", "infer"), ("seresnet14b", "train")];
    assert_eq!(rows.len(), expected.len(), "{rows:?}");
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    for (row, (model, mode)) in rows.iter().zip(expected) {
        assert_eq!((row["model"].as_str(), row["mode"].as_str()), (Some(model), Some(mode)));
        let counts = models.iter().find(|m| m["model"] == model).unwrap();
        assert_eq!((&row["params"], &row["macs"]), (&counts["params"], &counts["macs"]));
        assert_eq!((row["input_size"].as_u64(), row["precision"].as_str()), (Some(32), Some("f32")));
        assert_eq!(row["repeats"].as_u64(), Some(2));
        let f = |key: &str| row[key].as_f64().unwrap();
        assert!(f("step_seconds") > 0.0 && row["steps"].as_u64().unwrap() >= 3, "{row}");
        assert!(close(f("images_per_second"), 2.0 / f("step_seconds")), "{row}");
        let passes = if mode == "train" { 3.0 } else { 1.0 };
        assert!(close(f("gflops"), 2.0 * passes * f("macs") * 2.0 / f("step_seconds") / 1e9), "{row}");
        assert_eq!(f("backward_seconds") > 0.0, mode == "train", "{row}");
    }
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5);
    let header: Vec<&str> = lines[0].split(',').collect();
    for (line, row) in lines[1..].iter().zip(&rows) {
        let fields: Vec<&str> = line.split(',').collect();
        let field = |key: &str| fields[header.iter().position(|h| *h == key).unwrap()];
        assert_eq!(field("model"), row["model"].as_str().unwrap());
        // (serde_json reads floats to within an ulp or so.)
        assert!(close(field("step_seconds").parse::<f64>().unwrap(), row["step_seconds"].as_f64().unwrap()), "{line}");
    }

    // A run's config: its model, input size and precision unless given.
    let data = dir.join("cifar");
    write_cifar10(&data, 1);
    let run = dir.join("run");
    let train = ["train", "--model", "resnet14b", "--data", s(&data), "--input-size", "16", "--epochs", "1"];
    let out = sae(&[&train[..], &["--batch-size", "10", "--precision", "bf16", "--out", s(&run)]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let config = run.join("config.json");
    let out =
        sae(&["benchmark", "--config", s(&config), "--mode", "infer", "--batch-size", "1", "--seconds", "0", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let row: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!((row["model"].as_str(), row["input_size"].as_u64()), (Some("resnet14b"), Some(16)));
    assert_eq!((row["precision"].as_str(), row["mode"].as_str()), (Some("bf16"), Some("infer")));

    for (bad, message) in [
        (&["--model", "resnet13"][..], "resnet13"),
        (&["--model", "resnet14b", "--batch-size", "0"], "--batch-size must be at least 1"),
        (&["--model", "resnet14b", "--repeats", "0"], "--repeats must be at least 1"),
        (&["--model", "resnet14b", "--seconds=-1"], "--seconds -1 is not a duration"),
        (&["--model", "resnet14b", "--input-size", "0", "--seconds", "0"], "benchmarking resnet14b (infer) at 0×0"),
    ] {
        let out = sae(&[&["benchmark"][..], bad].concat());
        assert!(!out.status.success() && stderr(&out).contains(message), "{bad:?}: {}", stderr(&out));
    }
}

/// `sae benchmark --pytorch PYTHON`: the same networks in PyTorch beside ours (each row's
/// PyTorch timing, and its parameter count equal to ours), in f32 and bf16 autocast; a Python
/// that cannot run is an error naming it. Needs `SAE_TORCH_PYTHON` (a Python with torch) for
/// the comparison itself.
#[test]
fn benchmark_beside_pytorch() {
    let out = sae(&["benchmark", "--model", "resnet14b", "--seconds", "0", "--pytorch", "/nonexistent/python"]);
    assert!(!out.status.success() && stderr(&out).contains("/nonexistent/python"), "{}", stderr(&out));
    let Some(python) = std::env::var_os("SAE_TORCH_PYTHON") else {
        eprintln!("skipped: SAE_TORCH_PYTHON is not set");
        return;
    };
    let python = python.to_string_lossy().to_string();
    // A process per model and mode: few of them, as each imports torch.
    for (models, mode, precision, count) in
        [("senetv2_resnet14b,mobilenet_v1", "both", "f32", 4), ("seresnet14b", "train", "bf16", 1)]
    {
        let args = ["benchmark", "--model", models, "--classes", "10", "--input-size", "32", "--batch-size", "2"];
        let tail = ["--mode", mode, "--seconds", "0", "--precision", precision, "--pytorch", &python, "--json"];
        // One thread on both sides: PyTorch's OpenMP threads wait for each other by spinning, and
        // beside the other tests' processes on a small machine a step then takes a second.
        let out = Command::new(env!("CARGO_BIN_EXE_sae"))
            .args([&args[..], &tail[..]].concat())
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let rows: Vec<serde_json::Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.len(), count);
        for row in &rows {
            let torch = &row["pytorch"];
            assert_eq!(torch["params"], row["params"], "{row}");
            let (ips, step) = (torch["images_per_second"].as_f64().unwrap(), torch["step_seconds"].as_f64().unwrap());
            assert!(step > 0.0 && (ips * step - 2.0).abs() < 1e-9, "{row}");
        }
    }
}
