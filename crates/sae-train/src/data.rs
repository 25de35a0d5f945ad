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
    pub eval: Box<dyn Dataset>,
    pub train_transform: Transform,
    pub eval_transform: Transform,
    pub normalize: Normalize,
}

pub(crate) fn datasets(cfg: &DataConfig, seed: u64) -> Result<Splits> {
    fn subset<D: Dataset + 'static>(d: D, limit: Option<usize>, seed: u64) -> Box<dyn Dataset> {
        match limit {
            Some(n) if n < d.len() => Box::new(Subset::new(Arc::new(d), n, seed)),
            _ => Box::new(d),
        }
    }
    let size = cfg.input_size;
    // The images a `Subset` would read, loaded alone: the rest of the split is never held.
    let sample = |limit: Option<usize>, seed: u64| {
        move |total: usize| match limit {
            Some(n) if n < total => subset_indices(total, n, seed),
            _ => (0..total).collect(),
        }
    };
    let cifar = |kind| -> Result<_> {
        let train = Cifar::load_only(&cfg.dir, kind, Split::Train, sample(cfg.train_images, seed))?;
        let test = Cifar::load_only(&cfg.dir, kind, Split::Test, sample(cfg.eval_images, seed ^ 1))?;
        let norm = if kind == CifarKind::Cifar10 { Normalize::CIFAR10 } else { Normalize::CIFAR100 };
        Ok(Splits {
            train: Box::new(train),
            eval: Box::new(test),
            train_transform: Transform::PadCropFlip { pad: 4, size },
            eval_transform: Transform::ResizeCenterCrop { resize: size, size },
            normalize: norm,
        })
    };
    match cfg.dataset {
        DatasetKind::Cifar10 => cifar(CifarKind::Cifar10),
        DatasetKind::Cifar100Fine => cifar(CifarKind::Cifar100(LabelSet::Fine)),
        DatasetKind::Cifar100Coarse => cifar(CifarKind::Cifar100(LabelSet::Coarse)),
        DatasetKind::Folder => {
            let train = ImageFolder::open(&cfg.dir.join("train"))?;
            // val/ may lack some classes (few validation images); its labels follow train/'s.
            let val = ImageFolder::open_split_of(&cfg.dir.join("val"), &train.classes)?;
            Ok(Splits {
                train: subset(train, cfg.train_images, seed),
                eval: subset(val, cfg.eval_images, seed ^ 1),
                train_transform: Transform::RandomResizedCropFlip { size },
                eval_transform: Transform::ResizeCenterCrop { resize: (size * 256 + 112) / 224, size },
                normalize: Normalize::IMAGENET,
            })
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
    let splits = datasets(cfg, seed)?;
    let classes = splits.eval.classes().to_vec();
    let loader_cfg = LoaderConfig { batch_size, shuffle: false, drop_last: false, seed, prefetch: 3 };
    Ok((Loader::new(Arc::new(splits.eval), splits.eval_transform, splits.normalize, loader_cfg)?, classes))
}
