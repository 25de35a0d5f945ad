//! `cargo xtask bench-data`: images per second of the data pipeline (decode, augment,
//! batch, through the prefetching loader) on this machine, written to `results/data.md`.
//! It reads real data: CIFAR-10 and an ImageNet-style folder (default: the shared datasets
//! beside the repository).

use crate::project_root;
use anyhow::{Context, Result};
use sae_data::{Cifar, CifarKind, Dataset, ImageFolder, Loader, LoaderConfig, Normalize, Split, Transform};
use std::fmt::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Images per second over `epochs` epochs of `loader` (the first epoch warms caches).
fn images_per_second<D: Dataset + 'static>(loader: &Loader<D>, epochs: u64) -> Result<(f64, usize)> {
    for b in loader.epoch(0) {
        b?;
    }
    let start = Instant::now();
    let mut images = 0;
    for epoch in 1..=epochs {
        for b in loader.epoch(epoch) {
            images += b?.labels.len();
        }
    }
    Ok((images as f64 / start.elapsed().as_secs_f64(), images))
}

pub fn run(cifar: Option<PathBuf>, folder: Option<PathBuf>) -> Result<()> {
    let root = project_root();
    let shared = root.join("../shared/datasets");
    let cifar = cifar.unwrap_or_else(|| shared.join("cifar-10-batches-bin"));
    let folder = folder.unwrap_or_else(|| shared.join("imagenette-250/train"));
    let cfg = LoaderConfig { batch_size: 256, shuffle: true, drop_last: false, seed: 0, prefetch: 4 };
    let threads = rayon::current_num_threads();

    let mut md = String::new();
    writeln!(md, "# Data pipeline throughput\n")?;
    writeln!(md, "Made by `cargo xtask bench-data` (sae-data and its dependencies at opt-level 3, {threads} rayon threads, batch 256, prefetch 4).")?;
    writeln!(md, "Images per second through `sae_data::Loader`: read, decode, augment, normalise, batch.\n")?;
    writeln!(md, "| data | transform | images/s | images timed | target |")?;
    writeln!(md, "|---|---|---:|---:|---:|")?;

    let train = Arc::new(
        Cifar::load(&cifar, CifarKind::Cifar10, Split::Train)
            .with_context(|| format!("CIFAR-10 at {}", cifar.display()))?,
    );
    for (transform, label, epochs, target) in [
        (Transform::PadCropFlip { pad: 4, size: 32 }, "pad 4 + random crop 32 + flip", 2, "≥ 20,000"),
        (Transform::PadCropFlip { pad: 4, size: 140 }, "pad 4 + crop + flip + bilinear to 140", 1, "—"),
    ] {
        let loader = Loader::new(train.clone(), transform, Normalize::CIFAR10, cfg)?;
        let (ips, n) = images_per_second(&loader, epochs)?;
        eprintln!("CIFAR-10 {label}: {ips:.0} images/s");
        writeln!(md, "| CIFAR-10 train (real, in memory) | {label} | {ips:.0} | {n} | {target} |")?;
    }

    let images = Arc::new(ImageFolder::open(&folder).with_context(|| format!("image folder {}", folder.display()))?);
    let loader = Loader::new(images, Transform::RandomResizedCropFlip { size: 224 }, Normalize::IMAGENET, cfg)?;
    let (ips, n) = images_per_second(&loader, 1)?;
    eprintln!("JPEG folder random resized crop 224: {ips:.0} images/s");
    writeln!(md, "| {} (JPEG) | decode + random resized crop 224 + flip | {ips:.0} | {n} | ≥ 400 |", folder.display())?;
    writeln!(md, "\nMachine: {}.", crate::bench::machine())?;

    let out = root.join("results/data.md");
    std::fs::create_dir_all(out.parent().expect("results dir"))?;
    sae_fs::write_atomic(&out, md.as_bytes())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
