//! A run's datasets: the training and evaluation splits of its [`DataConfig`], with their
//! augmentation and normalisation, and batches as tensors.

use crate::config::{DataConfig, DatasetKind};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use sae_data::{
    subset_indices, Batch, Cifar, CifarKind, Dataset, ImageFolder, LabelSet, Loader, LoaderConfig, Normalize, Split,
    Subset, Transform,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The two splits of a run's data with their transforms.
pub(crate) struct Splits {
    pub train: Box<dyn Dataset>,
    pub train_transform: Transform,
    pub eval: EvalSplit,
}

/// A run's evaluation split with its transform, and the normalisation both splits share.
pub(crate) struct EvalSplit {
    pub data: Box<dyn Dataset>,
    pub transform: Transform,
    pub normalize: Normalize,
}

/// The CIFAR layout of `dataset`, or `None` for an image folder.
fn cifar_kind(dataset: DatasetKind) -> Option<CifarKind> {
    match dataset {
        DatasetKind::Cifar10 => Some(CifarKind::Cifar10),
        DatasetKind::Cifar100Fine => Some(CifarKind::Cifar100(LabelSet::Fine)),
        DatasetKind::Cifar100Coarse => Some(CifarKind::Cifar100(LabelSet::Coarse)),
        DatasetKind::Folder => None,
    }
}

/// Which of a split's `total` images a run with `limit` reads: a `Subset`'s sample, or all.
/// CIFAR splits load only these (the rest of the file is never held).
fn sample(limit: Option<usize>, seed: u64) -> impl FnOnce(usize) -> Vec<usize> {
    move |total| match limit {
        Some(n) if n < total => subset_indices(total, n, seed),
        _ => (0..total).collect(),
    }
}

/// `split` as a run with `limit` reads it: a seeded `Subset` of it, or all of it.
fn subset<D: Dataset + 'static>(split: D, limit: Option<usize>, seed: u64) -> Box<dyn Dataset> {
    match limit {
        Some(n) if n < split.len() => Box::new(Subset::new(Arc::new(split), n, seed)),
        _ => Box::new(split),
    }
}

pub(crate) fn datasets(cfg: &DataConfig, seed: u64) -> Result<Splits> {
    let size = cfg.input_size;
    match cifar_kind(cfg.dataset) {
        Some(kind) => Ok(Splits {
            train: Box::new(Cifar::load_only(&cfg.dir, kind, Split::Train, sample(cfg.train_images, seed))?),
            train_transform: Transform::PadCropFlip { pad: 4, size },
            eval: eval_split(cfg, seed, None)?,
        }),
        None => {
            let (train, eval) = match cfg.val_fraction {
                Some(fraction) => {
                    let (train, held_out) = held_out_folder(cfg, fraction)?;
                    (train, folder_eval_split(cfg, held_out, seed))
                }
                None => {
                    let train = ImageFolder::open(&folder_train_root(&cfg.dir))?;
                    let eval = eval_split(cfg, seed, Some(&train.classes))?;
                    (train, eval)
                }
            };
            Ok(Splits {
                train: subset(train, cfg.train_images, seed),
                train_transform: Transform::RandomResizedCropFlip { size },
                eval,
            })
        }
    }
}

/// Where a folder dataset's class folders are: `train/`, or the folder itself when it has no
/// `train/` (class folders at the top, as torchvision's `ImageFolder` takes them).
pub fn folder_train_root(dir: &Path) -> PathBuf {
    let train = dir.join("train");
    if train.is_dir() {
        train
    } else {
        dir.to_path_buf()
    }
}

/// A folder's training images and the `fraction` of each class held out for evaluation, for a
/// folder without `val/` (one with `val/` is evaluated on it: the fraction is refused there).
fn held_out_folder(cfg: &DataConfig, fraction: f64) -> Result<(ImageFolder, ImageFolder)> {
    let val = cfg.dir.join("val");
    if val.is_dir() {
        return Err(Error::Config(format!(
            "{} is a validation split: evaluation uses it, so a held-out fraction ({fraction}) is not taken",
            val.display()
        )));
    }
    Ok(ImageFolder::open(&folder_train_root(&cfg.dir))?.split_by_fraction(fraction)?)
}

/// A folder's evaluation split from its images (the run's `seed`), with the folder's
/// evaluation transform.
fn folder_eval_split(cfg: &DataConfig, images: ImageFolder, seed: u64) -> EvalSplit {
    let (transform, normalize) = eval_preprocessing(cfg);
    EvalSplit { data: subset(images, cfg.eval_images, eval_seed(seed)), transform, normalize }
}

/// How `cfg`'s evaluation split turns an image into an input: the centre crop of its input
/// size (a folder's after resizing to 256/224 of it, as ImageNet evaluation does) and its
/// dataset's normalisation. `sae predict --run` prepares images the same way.
pub fn eval_preprocessing(cfg: &DataConfig) -> (Transform, Normalize) {
    let size = cfg.input_size;
    match cifar_kind(cfg.dataset) {
        Some(CifarKind::Cifar10) => (Transform::ResizeCenterCrop { resize: size, size }, Normalize::CIFAR10),
        Some(CifarKind::Cifar100(_)) => (Transform::ResizeCenterCrop { resize: size, size }, Normalize::CIFAR100),
        None => (Transform::ResizeCenterCrop { resize: (size * 256 + 112) / 224, size }, Normalize::IMAGENET),
    }
}

/// The evaluation split of `cfg`, read without the training split. An image folder's `val/`
/// takes its labels from `train/`'s classes: `train_classes` where the caller has them, else
/// `train/`'s folder names (its images are not scanned).
fn eval_split(cfg: &DataConfig, seed: u64, train_classes: Option<&[String]>) -> Result<EvalSplit> {
    match cifar_kind(cfg.dataset) {
        Some(kind) => {
            let (transform, normalize) = eval_preprocessing(cfg);
            let sample = sample(cfg.eval_images, eval_seed(seed));
            Ok(EvalSplit {
                data: Box::new(Cifar::load_only(&cfg.dir, kind, Split::Test, sample)?),
                transform,
                normalize,
            })
        }
        None => {
            if let Some(fraction) = cfg.val_fraction {
                return Ok(folder_eval_split(cfg, held_out_folder(cfg, fraction)?.1, seed));
            }
            let val = cfg.dir.join("val");
            if !val.is_dir() {
                return Err(Error::Config(format!(
                    "{} has no val/ to evaluate on: hold out a fraction of each class's images with --val-fraction 0.1 (`val_fraction` in a config)",
                    cfg.dir.display()
                )));
            }
            let classes = match train_classes {
                Some(classes) => classes.to_vec(),
                None => ImageFolder::class_names(&folder_train_root(&cfg.dir))?,
            };
            // val/ may lack some classes (few validation images); its labels follow train/'s.
            Ok(folder_eval_split(cfg, ImageFolder::open_split_of(&val, &classes)?, seed))
        }
    }
}

/// The seed of a run's evaluation subset: another stream than its training subset's.
fn eval_seed(seed: u64) -> u64 {
    seed ^ 1
}

pub(crate) fn to_tensors(batch: &Batch, device: &Device) -> Result<(Tensor, Tensor)> {
    let x = Tensor::from_slice(&batch.images, &batch.shape, device)?;
    let y = Tensor::from_slice(&batch.labels, batch.labels.len(), device)?;
    Ok((x, y))
}

/// A loader over any of the datasets a run can read.
pub type DatasetLoader = Loader<Box<dyn Dataset>>;

/// The evaluation split of `cfg` as a loader of batches of `batch_size`, and its class names:
/// what `sae eval` evaluates a model on.
pub fn eval_loader(cfg: &DataConfig, seed: u64, batch_size: usize) -> Result<(DatasetLoader, Vec<String>)> {
    let eval = eval_split(cfg, seed, None)?;
    let classes = eval.data.classes().to_vec();
    let loader_cfg = LoaderConfig { batch_size, shuffle: false, drop_last: false, seed, prefetch: 3 };
    Ok((Loader::new(Arc::new(eval.data), eval.transform, eval.normalize, loader_cfg)?, classes))
}
