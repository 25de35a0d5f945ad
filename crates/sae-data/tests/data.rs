//! Loaders against files the tests write in the exact official layouts, the real CIFAR-10
//! when `SAE_CIFAR10_DIR` names it, augmentation determinism, the loader, and bad input.

use image::{GrayImage, Luma, Rgb, RgbImage};
use sae_data::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn tmp(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("sae-data-{name}-")).tempdir().unwrap()
}

/// Pixel byte of image `i` (global index), channel `c`, pixel `p` — a known pattern.
fn pixel(i: usize, c: usize, p: usize) -> u8 {
    ((i * 7 + c * 50 + p) % 256) as u8
}

/// Writes CIFAR-10 batches: `per_file` records per file, labels i % 10.
fn write_cifar10(dir: &Path, per_file: usize) {
    let mut i = 0;
    for name in [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ] {
        let mut bytes = Vec::new();
        for _ in 0..per_file {
            bytes.push((i % 10) as u8);
            for c in 0..3 {
                bytes.extend((0..1024).map(|p| pixel(i, c, p)));
            }
            i += 1;
        }
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];
    std::fs::write(dir.join("batches.meta.txt"), names.join("\n") + "\n\n").unwrap();
}

/// Writes CIFAR-100 files: coarse label i % 20, fine label (i * 3) % 100.
fn write_cifar100(dir: &Path, train: usize, test: usize) {
    let mut i = 0;
    for (name, n) in [("train.bin", train), ("test.bin", test)] {
        let mut bytes = Vec::new();
        for _ in 0..n {
            bytes.push((i % 20) as u8);
            bytes.push(((i * 3) % 100) as u8);
            for c in 0..3 {
                bytes.extend((0..1024).map(|p| pixel(i, c, p)));
            }
            i += 1;
        }
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let coarse: Vec<String> = (0..20).map(|k| format!("superclass_{k}")).collect();
    let fine: Vec<String> = (0..100).map(|k| format!("class_{k}")).collect();
    std::fs::write(dir.join("coarse_label_names.txt"), coarse.join("\n")).unwrap();
    std::fs::write(dir.join("fine_label_names.txt"), fine.join("\n")).unwrap();
}

#[test]
fn cifar10_reads_the_official_layout() {
    let dir = tmp("c10");
    let dir = dir.path();
    write_cifar10(dir, 20);
    let train = Cifar::load(dir, CifarKind::Cifar10, Split::Train).unwrap();
    let test = Cifar::load(dir, CifarKind::Cifar10, Split::Test).unwrap();
    assert_eq!((train.labels.len(), test.labels.len()), (100, 20));
    assert_eq!(train.class_counts(), vec![10; 10]);
    assert_eq!(train.classes[6], "frog");
    // Record 57 of the train split is in data_batch_3, with label 7 and the known pattern.
    assert_eq!(train.labels[57], 7);
    let (img, label) = train.get(57).unwrap();
    assert_eq!((img.width, img.height, label), (32, 32, 7));
    assert_eq!(&img.data[..3], &[pixel(57, 0, 0), pixel(57, 1, 0), pixel(57, 2, 0)]);
    assert_eq!(img.data[3 * 1023 + 2], pixel(57, 2, 1023));
    assert_eq!(test.labels[0], 0);
    assert_eq!(test.get(0).unwrap().0.data[0], pixel(100, 0, 0));
}

/// A split loaded with only some of its images reads exactly what a `Subset` of the whole
/// split reads, and holds only those images' bytes.
#[test]
fn a_cifar_split_loaded_in_part_reads_what_its_subset_reads() {
    let dir = tmp("c10-part");
    let dir = dir.path();
    write_cifar10(dir, 20);
    let whole = Cifar::load(dir, CifarKind::Cifar10, Split::Train).unwrap();
    let classes = whole.classes.clone();
    let subset = Subset::new(Arc::new(whole), 13, 7);
    let indices = subset_indices(100, 13, 7);
    // Not the first 13 images: a seeded sample of the whole split, from every file.
    assert_ne!(indices, (0..13).collect::<Vec<_>>());
    let part = Cifar::load_only(dir, CifarKind::Cifar10, Split::Train, |total| {
        assert_eq!(total, 100);
        indices.clone()
    })
    .unwrap();
    assert_eq!((part.len(), part.pixels.len(), &part.classes), (13, 13 * 3072, &classes));
    for i in 0..13 {
        let (a, b) = (subset.get(i).unwrap(), part.get(i).unwrap());
        assert_eq!((a.0.data, a.1), (b.0.data, b.1), "image {i}");
    }
    // Unordered, repeated and out-of-range indices: each image once, in order.
    let part = Cifar::load_only(dir, CifarKind::Cifar10, Split::Train, |_| vec![57, 3, 57, 1000]).unwrap();
    assert_eq!(part.labels, [3, 7]);
    assert_eq!(part.get(1).unwrap().0.data[0], pixel(57, 0, 0));
}

#[test]
fn cifar100_gives_fine_or_coarse_labels() {
    let dir = tmp("c100");
    let dir = dir.path();
    write_cifar100(dir, 40, 10);
    let fine = Cifar::load(dir, CifarKind::Cifar100(LabelSet::Fine), Split::Train).unwrap();
    let coarse = Cifar::load(dir, CifarKind::Cifar100(LabelSet::Coarse), Split::Train).unwrap();
    assert_eq!(fine.classes.len(), 100);
    assert_eq!(coarse.classes.len(), 20);
    assert_eq!(fine.labels[13], 39);
    assert_eq!(coarse.labels[13], 13);
    assert_eq!(coarse.classes[13], "superclass_13");
    assert_eq!(fine.pixels, coarse.pixels);
    let test = Cifar::load(dir, CifarKind::Cifar100(LabelSet::Coarse), Split::Test).unwrap();
    assert_eq!(test.labels.len(), 10);
    assert_eq!(test.planes(0)[5], pixel(40, 0, 5));
}

#[test]
fn real_cifar10_has_its_known_values() {
    // Set by .ci/run when the shared datasets are present; without them there is nothing to check.
    let Ok(dir) = std::env::var("SAE_CIFAR10_DIR") else {
        eprintln!("SAE_CIFAR10_DIR not set: real CIFAR-10 checks skipped");
        return;
    };
    let dir = PathBuf::from(dir);
    let train = Cifar::load(&dir, CifarKind::Cifar10, Split::Train).unwrap();
    let test = Cifar::load(&dir, CifarKind::Cifar10, Split::Test).unwrap();
    assert_eq!((train.labels.len(), test.labels.len()), (50_000, 10_000));
    assert_eq!((train.labels[0], &train.classes[6][..]), (6, "frog"));
    assert_eq!(&train.planes(0)[..3], &[59, 43, 50]);
    assert_eq!(&train.planes(0)[3069..], &[140, 84, 72]);
    assert_eq!((test.labels[0], &test.classes[3][..]), (3, "cat"));
    assert_eq!(&test.planes(0)[..3], &[158, 159, 165]);
    assert_eq!(&test.planes(0)[3069..], &[124, 129, 110]);
    assert_eq!(train.class_counts(), vec![5000; 10]);
    assert_eq!(test.class_counts(), vec![1000; 10]);
    let expected = [0.491_399_68, 0.482_158_41, 0.446_530_91];
    for (c, &mean) in expected.iter().enumerate() {
        let sum: u64 =
            (0..50_000).map(|i| train.planes(i)[c * 1024..(c + 1) * 1024].iter().map(|&v| v as u64).sum::<u64>()).sum();
        let got = sum as f64 / (50_000.0 * 1024.0 * 255.0);
        assert!((got - mean).abs() < 1e-7, "channel {c}: mean {got}, expected {mean}");
    }
}

#[test]
fn bad_cifar_files_give_errors_naming_the_file() {
    let dir = tmp("c10-bad");
    let dir = dir.path();
    write_cifar10(dir, 3);
    let batch3 = dir.join("data_batch_3.bin");
    let bytes = std::fs::read(&batch3).unwrap();
    std::fs::write(&batch3, &bytes[..bytes.len() - 100]).unwrap();
    let err = Cifar::load(dir, CifarKind::Cifar10, Split::Train).unwrap_err().to_string();
    assert!(err.contains("data_batch_3.bin") && err.contains("not a whole number of 3073-byte records"), "{err}");

    let mut bytes = bytes.clone();
    bytes[3073] = 12; // record 1's label
    std::fs::write(&batch3, &bytes).unwrap();
    let err = Cifar::load(dir, CifarKind::Cifar10, Split::Train).unwrap_err().to_string();
    assert!(err.contains("data_batch_3.bin") && err.contains("record 1: label 12 out of range 0..10"), "{err}");

    std::fs::remove_file(&batch3).unwrap();
    let err = Cifar::load(dir, CifarKind::Cifar10, Split::Train).unwrap_err().to_string();
    assert!(err.contains("data_batch_3.bin"), "{err}");

    let err = Cifar::load(&dir.join("absent"), CifarKind::Cifar10, Split::Test).unwrap_err().to_string();
    assert!(err.contains("absent") && err.contains("not found"), "{err}");

    // A CIFAR-10 file read as CIFAR-100: 3073 is not a multiple of 3074.
    std::fs::copy(dir.join("test_batch.bin"), dir.join("test.bin")).unwrap();
    let err = Cifar::load(dir, CifarKind::Cifar100(LabelSet::Fine), Split::Test).unwrap_err().to_string();
    assert!(err.contains("test.bin") && err.contains("3074-byte records"), "{err}");

    let dir = tmp("c100-names");

    let dir = dir.path();
    write_cifar100(dir, 2, 2);
    std::fs::write(dir.join("fine_label_names.txt"), "just\ntwo\n").unwrap();
    let err = Cifar::load(dir, CifarKind::Cifar100(LabelSet::Fine), Split::Test).unwrap_err().to_string();
    assert!(err.contains("fine_label_names.txt") && err.contains("lists 2 class names, expected 100"), "{err}");
}

fn write_folder(root: &Path) {
    for (k, class) in ["n01", "n02"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..3 {
            let img = RgbImage::from_fn(40 + i * 10, 30, |x, y| Rgb([(x * 5) as u8, (y * 7) as u8, (k * 100) as u8]));
            img.save(root.join(class).join(format!("img{i}.png"))).unwrap();
        }
    }
    // A greyscale JPEG, as 242 of imagenette's images are.
    GrayImage::from_pixel(50, 50, Luma([200])).save(root.join("n02").join("grey.JPEG")).unwrap();
    std::fs::write(root.join("n01").join("notes.txt"), "not an image").unwrap();
}

#[test]
fn image_folders_list_classes_and_decode_images() {
    let root = tmp("folder");
    let root = root.path();
    write_folder(root);
    let ds = ImageFolder::open(root).unwrap();
    assert_eq!(ds.classes, ["n01", "n02"]);
    assert_eq!(ds.len(), 7);
    let (img, label) = ds.get(6).unwrap();
    assert_eq!((label, img.width, img.height), (1, 60, 30)); // n02/img2.png after grey.JPEG
    let (grey, label) = ds.get(3).unwrap();
    assert_eq!(label, 1);
    assert!(grey.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]), "greyscale must become equal RGB");
    std::fs::write(root.join("classes.txt"), "n02 second class\nn01 first class\n").unwrap();
    let ds = ImageFolder::open_with_class_file(root, &root.join("classes.txt")).unwrap();
    assert_eq!(ds.classes, ["n02", "n01"]);
    assert_eq!(ds.samples[0].1, 0);
}

/// A validation split may lack classes of the training split: its labels follow the training
/// split's class order, and a folder that is no class of it is an error naming it.
#[test]
fn a_split_takes_the_other_splits_classes() {
    let root = tmp("folder-split");
    let root = root.path();
    write_folder(root);
    let classes: Vec<String> = ["n00", "n01", "n02"].map(String::from).to_vec();
    let split = ImageFolder::open_split_of(root, &classes).unwrap();
    assert_eq!(split.classes, classes);
    let whole = ImageFolder::open(root).unwrap();
    assert_eq!(split.len(), whole.len());
    for ((path, label), (whole_path, whole_label)) in split.samples.iter().zip(&whole.samples) {
        assert_eq!((path, *label), (whole_path, whole_label + 1), "n01 is class 1 and n02 class 2 here");
    }
    std::fs::create_dir_all(root.join("zz")).unwrap();
    let err = ImageFolder::open_split_of(root, &classes).unwrap_err().to_string();
    assert!(err.contains("zz") && err.contains("not one of the 3 classes"), "{err}");
}

/// A folder without a validation split gives a fraction of each class to evaluation: the
/// counts round(n · f) within [1, n − 1], disjoint splits that cover the folder, the same
/// images however the files came to be listed (a hash of the name decides, not a seed), and an
/// image added later leaves the other images where they were.
#[test]
fn a_fraction_of_each_class_is_held_out_by_file_name() {
    let dir = tmp("split");
    let root = dir.path();
    let sizes = [("a", 10), ("b", 3), ("c", 1)];
    for (class, n) in sizes {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..n {
            RgbImage::from_pixel(4, 4, Rgb([i as u8, 0, 0])).save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    let (train, eval) = ImageFolder::open(root).unwrap().split_by_fraction(0.25).unwrap();
    let count = |f: &ImageFolder, label: u32| f.samples.iter().filter(|(_, l)| *l == label).count();
    // a: round(2.5) = 3 (rounded half away from zero); b: round(0.75) = 1; c: one image keeps it.
    assert_eq!([count(&eval, 0), count(&eval, 1), count(&eval, 2)], [3, 1, 0]);
    assert_eq!([count(&train, 0), count(&train, 1), count(&train, 2)], [7, 2, 1]);
    assert_eq!((train.classes.len(), eval.classes.len()), (3, 3));
    let mut all: Vec<PathBuf> = train.samples.iter().chain(&eval.samples).map(|(p, _)| p.clone()).collect();
    all.sort();
    let mut listed: Vec<PathBuf> = ImageFolder::open(root).unwrap().samples.into_iter().map(|(p, _)| p).collect();
    listed.sort();
    assert_eq!(all, listed);
    // The listing order does not matter.
    let mut reversed = ImageFolder::open(root).unwrap();
    reversed.samples.reverse();
    assert_eq!(reversed.split_by_fraction(0.25).unwrap().1.samples, eval.samples);
    // A new image in class b (3 → 4 images, still one held out) moves no other image: b's
    // held-out image is the one before or the new one, and the other classes keep theirs.
    RgbImage::from_pixel(4, 4, Rgb([9, 0, 0])).save(root.join("b").join("new.png")).unwrap();
    let (_, eval_after) = ImageFolder::open(root).unwrap().split_by_fraction(0.25).unwrap();
    let of_class =
        |f: &ImageFolder, b: bool| f.samples.iter().filter(|(_, l)| (*l == 1) == b).cloned().collect::<Vec<_>>();
    assert_eq!(of_class(&eval_after, false), of_class(&eval, false));
    let b_after = of_class(&eval_after, true);
    assert_eq!(b_after.len(), 1);
    assert!(b_after == of_class(&eval, true) || b_after[0].0.ends_with("new.png"), "{b_after:?}");
    for bad in [0.0, 1.0, -0.5, f64::NAN] {
        let err = ImageFolder::open(root).unwrap().split_by_fraction(bad).unwrap_err().to_string();
        assert!(err.contains("between 0 and 1"), "{err}");
    }
}

#[test]
fn bad_folders_and_images_give_errors_naming_them() {
    let root = tmp("folder-bad");
    let root = root.path();
    write_folder(root);
    std::fs::create_dir_all(root.join("n03")).unwrap();
    let err = ImageFolder::open(root).unwrap_err().to_string();
    assert!(err.contains("n03") && err.contains("no JPEG or PNG images"), "{err}");
    std::fs::remove_dir(root.join("n03")).unwrap();

    std::fs::write(root.join("n01").join("broken.jpg"), b"\xff\xd8\xff garbage").unwrap();
    let ds = ImageFolder::open(root).unwrap();
    let idx = ds.samples.iter().position(|(p, _)| p.ends_with("broken.jpg")).unwrap();
    let err = ds.get(idx).unwrap_err().to_string();
    assert!(err.contains("broken.jpg") && err.contains("cannot decode"), "{err}");

    let err = ImageFolder::open(&root.join("missing")).unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");
    let err = ImageFolder::open_with_class_file(root, &root.join("nope.txt")).unwrap_err().to_string();
    assert!(err.contains("nope.txt"), "{err}");
}

fn cifar_loader(dir: &Path, transform: Transform, cfg: LoaderConfig) -> Loader<Cifar> {
    let ds = Arc::new(Cifar::load(dir, CifarKind::Cifar10, Split::Train).unwrap());
    Loader::new(ds, transform, Normalize::CIFAR10, cfg).unwrap()
}

const CFG: LoaderConfig = LoaderConfig { batch_size: 16, shuffle: true, drop_last: false, seed: 3, prefetch: 2 };

#[test]
fn augmentation_is_deterministic_whatever_the_thread_count() {
    let dir = tmp("determinism");
    let dir = dir.path();
    write_cifar10(dir, 20);
    let loader = cifar_loader(dir, Transform::PadCropFlip { pad: 4, size: 32 }, CFG);
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| loader.epoch(1).collect::<Result<Vec<_>>>().unwrap())
    };
    let (one, two) = (run(1), run(2));
    assert_eq!(one, two);
    let again = loader.epoch(1).collect::<Result<Vec<_>>>().unwrap();
    assert_eq!(one, again);
    let other_epoch = loader.epoch(2).collect::<Result<Vec<_>>>().unwrap();
    assert_ne!(one[0].indices, other_epoch[0].indices, "epochs must shuffle differently");
    // The same image gets the same augmentation in any batch position.
    let first = &one[0];
    let alone = loader.batch(1, &[first.indices[5]]).unwrap();
    assert_eq!(&first.images[5 * 3072..6 * 3072], &alone.images[..]);
}

#[test]
fn policy_and_mixing_are_deterministic_and_resume_mid_epoch() {
    let dir = tmp("augment-determinism");
    let dir = dir.path();
    write_cifar10(dir, 20);
    let mixing = sae_data::Mixing { mixup_alpha: 0.2, cutmix_alpha: 1.0, prob: 0.8, switch_prob: 0.5 };
    let plain = cifar_loader(dir, Transform::PadCropFlip { pad: 4, size: 32 }, CFG);
    let loader = cifar_loader(dir, Transform::PadCropFlip { pad: 4, size: 32 }, CFG).with_augmentation(true, mixing);
    let epoch = loader.epoch(1).collect::<Result<Vec<_>>>().unwrap();
    assert_eq!(epoch, loader.epoch(1).collect::<Result<Vec<_>>>().unwrap());
    // Resuming at batch 2 gives the same batches, mixing included.
    assert_eq!(&epoch[2..], &loader.epoch_from(1, 2).collect::<Result<Vec<_>>>().unwrap()[..]);
    // The policy changes images; the mixing mixes some batches with weights in [0, 1].
    let base = plain.epoch(1).collect::<Result<Vec<_>>>().unwrap();
    assert_eq!(epoch[0].indices, base[0].indices);
    assert_ne!(epoch[0].images, base[0].images);
    let mixed: Vec<f32> = epoch.iter().filter_map(|b| b.mixed.as_ref().map(|m| m.lambda)).collect();
    assert!(!mixed.is_empty() && mixed.iter().all(|l| (0.0..=1.0).contains(l)), "{mixed:?}");
    assert!(base.iter().all(|b| b.mixed.is_none()));
}

#[test]
fn pad_crop_flip_moves_pixels_and_keeps_values() {
    let dir = tmp("crop");
    let dir = dir.path();
    write_cifar10(dir, 2);
    let ds = Cifar::load(dir, CifarKind::Cifar10, Split::Train).unwrap();
    let (img, _) = ds.get(0).unwrap();
    let norm = Normalize { mean: [0.0; 3], std: [1.0; 3] };
    let mut shifted = 0;
    for index in 0..20u64 {
        let mut out = vec![0f32; 3 * 32 * 32];
        Transform::PadCropFlip { pad: 4, size: 32 }.apply(&img, norm, 0, 0, index, &mut out);
        // Every output is either zero padding or one of the image's own byte values / 255.
        assert!(out.iter().all(|&v| v == 0.0 || img.data.contains(&((v * 255.0).round() as u8))));
        let original: Vec<f32> = (0..1024).map(|p| img.data[p * 3] as f32 / 255.0).collect();
        if out[..1024] != original[..] {
            shifted += 1;
        }
    }
    assert!(shifted >= 15, "crops/flips should usually change the image, changed {shifted}/20");
    // No padding, no flip: the identity.
    let mut out = vec![0f32; 3 * 32 * 32];
    Transform::ResizeCenterCrop { resize: 32, size: 32 }.apply(&img, norm, 0, 0, 0, &mut out);
    for p in 0..1024 {
        assert!((out[1024 + p] - img.data[p * 3 + 1] as f32 / 255.0).abs() < 1e-6);
    }
}

#[test]
fn resizing_keeps_shapes_and_ranges() {
    let root = tmp("resize");
    let root = root.path();
    write_folder(root);
    let ds = Arc::new(ImageFolder::open(root).unwrap());
    for transform in
        [Transform::RandomResizedCropFlip { size: 24 }, Transform::ResizeCenterCrop { resize: 28, size: 24 }]
    {
        let loader = Loader::new(ds.clone(), transform, Normalize::IMAGENET, CFG).unwrap();
        let batches = loader.epoch(0).collect::<Result<Vec<_>>>().unwrap();
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!(b.shape, [7, 3, 24, 24]);
        assert_eq!(b.images.len(), 7 * 3 * 24 * 24);
        let lo = (0.0 - 0.485) / 0.229 - 1e-4;
        let hi = (1.0 - 0.406) / 0.225 + 1e-4;
        assert!(b.images.iter().all(|v| v.is_finite() && *v >= lo && *v <= hi));
    }
    // Upscaling CIFAR to the paper's 70×70 keeps the mean colour.
    let dir = tmp("resize-cifar");
    let dir = dir.path();
    write_cifar10(dir, 2);
    let c = Cifar::load(dir, CifarKind::Cifar10, Split::Train).unwrap();
    let (img, _) = c.get(1).unwrap();
    let norm = Normalize { mean: [0.0; 3], std: [1.0; 3] };
    let mut out = vec![0f32; 3 * 70 * 70];
    Transform::ResizeCenterCrop { resize: 70, size: 70 }.apply(&img, norm, 0, 0, 0, &mut out);
    let src_mean = (0..1024).map(|p| img.data[p * 3] as f32).sum::<f32>() / 1024.0 / 255.0;
    let out_mean = out[..4900].iter().sum::<f32>() / 4900.0;
    assert!((src_mean - out_mean).abs() < 0.02, "{src_mean} vs {out_mean}");
}

#[test]
fn loader_batches_drop_or_keep_the_last_and_report_errors() {
    let dir = tmp("loader");
    let dir = dir.path();
    write_cifar10(dir, 10); // 50 train images
    let keep = cifar_loader(dir, Transform::PadCropFlip { pad: 4, size: 32 }, CFG);
    let sizes: Vec<usize> = keep.epoch(0).map(|b| b.unwrap().labels.len()).collect();
    assert_eq!(sizes, [16, 16, 16, 2]);
    assert_eq!(keep.batches_per_epoch(), 4);
    let mut all: Vec<usize> = keep.epoch(0).flat_map(|b| b.unwrap().indices).collect();
    all.sort();
    assert_eq!(all, (0..50).collect::<Vec<_>>(), "an epoch visits every image once");
    let drop = cifar_loader(dir, Transform::PadCropFlip { pad: 4, size: 32 }, LoaderConfig { drop_last: true, ..CFG });
    assert_eq!(drop.epoch(0).count(), 3);
    assert_eq!(drop.batches_per_epoch(), 3);
    let ordered =
        cifar_loader(dir, Transform::PadCropFlip { pad: 4, size: 32 }, LoaderConfig { shuffle: false, ..CFG });
    assert_eq!(ordered.epoch(0).next().unwrap().unwrap().indices, (0..16).collect::<Vec<_>>());
    let labels = ordered.epoch(0).next().unwrap().unwrap().labels;
    assert_eq!(labels[..12], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);

    let ds = Arc::new(Cifar::load(dir, CifarKind::Cifar10, Split::Train).unwrap());
    assert!(Loader::new(
        ds.clone(),
        Transform::PadCropFlip { pad: 4, size: 32 },
        Normalize::CIFAR10,
        LoaderConfig { batch_size: 0, ..CFG }
    )
    .is_err());
    let bad = Transform::ResizeCenterCrop { resize: 10, size: 32 };
    assert!(Loader::new(ds, bad, Normalize::CIFAR10, CFG)
        .err()
        .expect("invalid transform")
        .to_string()
        .contains("resize"));

    // An undecodable image surfaces as the epoch's error, naming the file.
    let root = tmp("loader-bad");
    let root = root.path();
    write_folder(root);
    std::fs::write(root.join("n02").join("zz.png"), b"\x89PNG broken").unwrap();
    let ds = Arc::new(ImageFolder::open(root).unwrap());
    let loader = Loader::new(ds, Transform::RandomResizedCropFlip { size: 16 }, Normalize::IMAGENET, CFG).unwrap();
    let results: Vec<Result<Batch>> = loader.epoch(0).collect();
    let err = results.into_iter().find_map(|r| r.err()).expect("an error").to_string();
    assert!(err.contains("zz.png"), "{err}");
}

#[test]
fn shards_are_disjoint_cover_the_epoch_and_make_up_the_whole_batches() {
    let dir = tmp("shards");
    let dir = dir.path();
    write_cifar10(dir, 10); // 50 train images
    let transform = Transform::PadCropFlip { pad: 4, size: 32 };
    let cfg = LoaderConfig { batch_size: 4, ..CFG };
    let shard = |rank, world, drop_last| {
        cifar_loader(dir, transform, LoaderConfig { drop_last, ..cfg }).with_shard(rank, world).unwrap()
    };
    for world in [1, 2, 3] {
        for drop_last in [false, true] {
            let epochs: Vec<Vec<Batch>> =
                (0..world).map(|r| shard(r, world, drop_last).epoch(5).collect::<Result<_>>().unwrap()).collect();
            for (r, batches) in epochs.iter().enumerate() {
                assert_eq!(batches.len(), shard(r, world, drop_last).batches_per_epoch(), "rank {r} of {world}");
            }
            let mut seen: Vec<usize> = epochs.iter().flatten().flat_map(|b| b.indices.clone()).collect();
            let visited = seen.len();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), visited, "world {world}: an image in two shards");
            // Without drop_last every image; with it all but the incomplete last 4·world.
            let expected = if drop_last { 50 - 50 % (4 * world) } else { 50 };
            assert_eq!(visited, expected, "world {world}, drop_last {drop_last}");
            // Batch k of the ranks together is batch k of one loader with batch 4·world,
            // and every image is transformed as there (augmentation is keyed by index).
            let whole = cifar_loader(dir, transform, LoaderConfig { batch_size: 4 * world, drop_last, ..cfg });
            for (k, big) in whole.epoch(5).enumerate() {
                let big = big.unwrap();
                let parts: Vec<&Batch> = epochs.iter().filter_map(|e| e.get(k)).collect();
                let indices: Vec<usize> = parts.iter().flat_map(|b| b.indices.clone()).collect();
                let images: Vec<f32> = parts.iter().flat_map(|b| b.images.clone()).collect();
                assert_eq!(indices, big.indices, "world {world}, batch {k}");
                assert_eq!(images, big.images);
            }
        }
    }
    let loader = cifar_loader(dir, transform, cfg);
    assert!(loader.with_shard(2, 2).err().unwrap().to_string().contains("rank 2 of a world of 2"));
}
