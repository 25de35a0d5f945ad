//! Every file reader refuses damaged input with a typed error and never panics: CIFAR batches,
//! folder images, model weights, checkpoints (weights, optimiser state, `state.json`, the
//! `last.json` pointer), a run's `config.json` and `summary.csv`. Each is fed seeded random
//! mutations of a valid file (flipped bytes, truncation, random ranges, huge size fields,
//! random bytes) and must either load or return an error; headers that claim enormous sizes
//! must be refused before the reader allocates them.

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sae_data::{Cifar, CifarKind, Dataset, LabelSet, Rgb8Image, Split};
use sae_models::Model;
use sae_train::checkpoint::{self, CheckpointState};
use sae_train::{read_summary, OptimizerConfig, TrainConfig};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("sae-corrupt-{name}-")).tempdir().unwrap()
}

/// A damaged copy of `valid`. Mutations favour the first `header` bytes, where the sizes,
/// offsets and names of most formats live.
fn mutate(valid: &[u8], header: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut out = valid.to_vec();
    let pos = |rng: &mut ChaCha8Rng, len: usize| {
        let span = if rng.random_bool(0.8) { header.min(len) } else { len };
        rng.random_range(0..span.max(1))
    };
    match rng.random_range(0..6) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                let i = pos(rng, out.len());
                if let Some(b) = out.get_mut(i) {
                    *b ^= 1 << rng.random_range(0..8);
                }
            }
        }
        1 => out.truncate(rng.random_range(0..valid.len())),
        2 => {
            let i = pos(rng, out.len());
            let end = (i + rng.random_range(1..64)).min(out.len());
            rng.fill(&mut out[i..end]);
        }
        3 => {
            // A size or count field claiming something enormous.
            let i = pos(rng, out.len().saturating_sub(8));
            let huge: u64 = if rng.random_bool(0.5) { u64::MAX } else { rng.random_range(1u64 << 31..1 << 48) };
            let end = (i + 8).min(out.len());
            out[i..end].copy_from_slice(&huge.to_le_bytes()[..end - i]);
        }
        4 => {
            let i = pos(rng, out.len());
            let extra: Vec<u8> = (0..rng.random_range(1..32)).map(|_| rng.random()).collect();
            out.splice(i..i, extra);
        }
        _ => {
            out = (0..rng.random_range(0..2 * header)).map(|_| rng.random()).collect();
        }
    }
    out
}

/// Writes `mutations` damaged versions of `valid` to `path`, calling `read` on each: it must
/// return (Ok or Err), never panic. Returns how many reads failed, so a test can check that
/// damage is noticed.
fn fuzz<T, E: std::fmt::Display>(
    what: &str,
    path: &Path,
    valid: &[u8],
    header: usize,
    mutations: usize,
    mut read: impl FnMut() -> Result<T, E>,
) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(path.to_string_lossy().len() as u64);
    let mut errors = 0;
    for i in 0..mutations {
        let bytes = mutate(valid, header, &mut rng);
        std::fs::write(path, &bytes).unwrap();
        match catch_unwind(AssertUnwindSafe(&mut read)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                errors += 1;
                assert!(!e.to_string().is_empty(), "{what}: empty error message");
            }
            Err(_) => {
                let kept = path.with_extension("panic");
                std::fs::write(&kept, &bytes).unwrap();
                panic!("{what}: mutation {i} made the reader panic; the input is kept in {}", kept.display());
            }
        }
    }
    std::fs::write(path, valid).unwrap();
    errors
}

#[test]
fn cifar_batches_never_panic() {
    let dir = scratch("cifar");
    let dir = dir.path();
    // CIFAR-100 layout: (coarse, fine, 3072 pixels) per record.
    let record = |i: usize| -> Vec<u8> {
        let mut r = vec![(i % 20) as u8, (i % 100) as u8];
        r.extend((0..3072).map(|p| (p * 7 + i) as u8));
        r
    };
    let train: Vec<u8> = (0..6).flat_map(record).collect();
    std::fs::write(dir.join("train.bin"), &train).unwrap();
    std::fs::write(dir.join("test.bin"), (0..3).flat_map(record).collect::<Vec<u8>>()).unwrap();
    std::fs::write(dir.join("coarse_label_names.txt"), (0..20).map(|k| format!("c{k}\n")).collect::<String>()).unwrap();
    std::fs::write(dir.join("fine_label_names.txt"), (0..100).map(|k| format!("f{k}\n")).collect::<String>()).unwrap();
    let kind = CifarKind::Cifar100(LabelSet::Fine);
    let load =
        || Cifar::load(dir, kind, Split::Train).and_then(|c| (0..c.len()).try_for_each(|i| c.get(i).map(|_| ())));
    assert!(load().is_ok());
    let errors = fuzz("CIFAR batch", &dir.join("train.bin"), &train, 64, 200, load);
    assert!(errors > 50, "only {errors} of 200 damaged batches were refused");
    let names = std::fs::read(dir.join("fine_label_names.txt")).unwrap();
    fuzz("CIFAR class names", &dir.join("fine_label_names.txt"), &names, 64, 100, load);
    // A label past the class count names the file and the record.
    let mut bad = train.clone();
    bad[3074 + 1] = 200;
    std::fs::write(dir.join("train.bin"), &bad).unwrap();
    let err = load().unwrap_err().to_string();
    assert!(err.contains("train.bin") && err.contains("200"), "{err}");
}

#[test]
fn folder_images_never_panic() {
    let dir = scratch("images");
    let dir = dir.path();
    let img = image::RgbImage::from_fn(37, 23, |x, y| image::Rgb([(x * 7) as u8, (y * 11) as u8, (x * y) as u8]));
    for (name, format) in [("a.png", image::ImageFormat::Png), ("b.jpg", image::ImageFormat::Jpeg)] {
        let path = dir.join(name);
        img.save_with_format(&path, format).unwrap();
        let valid = std::fs::read(&path).unwrap();
        assert_eq!(Rgb8Image::open(&path).unwrap().width, 37);
        let errors = fuzz(name, &path, &valid, 256, 150, || Rgb8Image::open(&path));
        assert!(errors > 30, "{name}: only {errors} of 150 damaged images were refused");
    }
    // A PNG whose header claims 100,000 × 100,000 pixels (30 GB) is refused before decoding.
    let mut png = std::fs::read(dir.join("a.png")).unwrap();
    png[16..24].copy_from_slice(&[0, 1, 0x86, 0xA0, 0, 1, 0x86, 0xA0]);
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    let path = dir.join("huge.png");
    std::fs::write(&path, &png).unwrap();
    let err = Rgb8Image::open(&path).unwrap_err().to_string();
    assert!(err.contains("huge.png"), "{err}");
}

/// CRC-32 (IEEE) as PNG chunks use it, bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn weights_and_checkpoints_never_panic() {
    let run = scratch("checkpoint");
    let run = run.path();
    let model = Model::from_name("mobilenet_v1", 10, 0, &Device::Cpu).unwrap();
    let mut optimizer = OptimizerConfig::keras_adam().build(model.trainable_vars(), model.config().kernels);
    // One step so that the optimiser has moments to save.
    let x = candle_core::Tensor::ones((1, 3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let loss = candle_core::ModuleT::forward_t(&model, &x, true).unwrap().sum_all().unwrap();
    optimizer.step(&loss.backward().unwrap()).unwrap();
    let mut state = CheckpointState { epoch: 1, step: 1, ..Default::default() };
    checkpoint::save(run, &model, None, optimizer.as_ref(), &mut state, Some(10.0)).unwrap();
    let dir = run.join("checkpoints/epoch-0001");
    let mut load = || checkpoint::load_dir(&dir, &model, None, optimizer.as_mut());
    assert!(load().is_ok());
    for (file, header, mutations, min_errors) in
        [("model.safetensors", 16_384, 60, 20), ("optimizer.safetensors", 16_384, 60, 20), ("state.json", 64, 100, 30)]
    {
        let path = dir.join(file);
        let valid = std::fs::read(&path).unwrap();
        let errors = fuzz(file, &path, &valid, header, mutations, &mut load);
        assert!(errors >= min_errors, "{file}: only {errors} of {mutations} damaged files were refused");
    }
    let pointer = run.join("checkpoints/last.json");
    let valid = std::fs::read(&pointer).unwrap();
    fuzz("last.json", &pointer, &valid, 64, 100, || checkpoint::load_last(run, &model, None, optimizer.as_mut()));
    // A safetensors header claiming an 18-exabyte length is refused, naming the file.
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = model.load_weights(&path).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn run_config_and_summary_never_panic() {
    let dir = scratch("run-files");
    let dir = dir.path();
    let summary = "epoch,train_loss,train_top1,eval_loss,eval_top1,eval_top5,lr,seconds,images_per_second\n\
                   1,2.302585,10.0000,2.300000,11.0000,50.0000,1.000000e-3,12.50,80.00\n\
                   2,2.100000,20.0000,2.000000,21.0000,60.0000,1.000000e-3,12.40,81.00\n";
    std::fs::write(dir.join("summary.csv"), summary).unwrap();
    assert_eq!(read_summary(dir).unwrap().len(), 2);
    let errors = fuzz("summary.csv", &dir.join("summary.csv"), summary.as_bytes(), 300, 200, || read_summary(dir));
    assert!(errors > 50, "only {errors} of 200 damaged summaries were refused");

    let cfg = TrainConfig {
        model: sae_models::config("resnet18", 10).unwrap(),
        data: sae_train::DataConfig {
            dataset: sae_train::DatasetKind::Cifar10,
            dir: "/data/cifar".into(),
            input_size: 32,
            train_images: Some(100),
            eval_images: None,
            val_fraction: None,
        },
        optimizer: OptimizerConfig::keras_adam(),
        schedule: sae_train::Schedule::Constant,
        epochs: 2,
        batch_size: 8,
        seed: 0,
        label_smoothing: 0.1,
        steps: Default::default(),
        augment: Default::default(),
        precision: sae_models::Precision::Bf16,
    };
    let json = serde_json::to_string_pretty(&cfg).unwrap();
    std::fs::write(dir.join("config.json"), &json).unwrap();
    assert_eq!(TrainConfig::read(dir).unwrap(), cfg);
    let errors = fuzz("config.json", &dir.join("config.json"), json.as_bytes(), 2_000, 200, || {
        TrainConfig::read(dir).and_then(|c| c.validate().map(|()| c))
    });
    assert!(errors > 100, "only {errors} of 200 damaged configs were refused");
}
