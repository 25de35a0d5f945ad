//! A run's datasets: the training and evaluation splits of its [`DataConfig`], with their
//! augmentation and normalisation, and batches as tensors.

use crate::config::{DataConfig, DatasetKind};
use crate::Result;
use candle_core::{Device, Tensor};
use sae_data::{
    subset_indices, Batch, Cifar, CifarKind, Dataset, ImageFolder, LabelSet, Loader, LoaderConfig, Normalize, Split,
    Subset, Transform,
};
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
            let train = ImageFolder::open(&cfg.dir.join("train"))?;
            let eval = eval_split(cfg, seed, Some(&train.classes))?;
            Ok(Splits {
                train: subset(train, cfg.train_images, seed),
                train_transform: Transform::RandomResizedCropFlip { size },
                eval,
            })
        }
    }
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
    let seed = seed ^ 1;
    let (transform, normalize) = eval_preprocessing(cfg);
    match cifar_kind(cfg.dataset) {
        Some(kind) => Ok(EvalSplit {
            data: Box::new(Cifar::load_only(&cfg.dir, kind, Split::Test, sample(cfg.eval_images, seed))?),
            transform,
            normalize,
        }),
        None => {
            let classes = match train_classes {
                Some(classes) => classes.to_vec(),
                None => ImageFolder::class_names(&cfg.dir.join("train"))?,
            };
            // val/ may lack some classes (few validation images); its labels follow train/'s.
            let val = ImageFolder::open_split_of(&cfg.dir.join("val"), &classes)?;
            Ok(EvalSplit { data: subset(val, cfg.eval_images, seed), transform, normalize })
        }
    }
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
