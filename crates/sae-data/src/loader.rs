//! A seeded, shuffled, batched loader: images are decoded and augmented in parallel (rayon)
//! on a producer thread that stays up to `prefetch` batches ahead of the consumer on a
//! bounded queue.

use crate::augment::{Mixed, Mixing};
use crate::error::{Error, Result};
use crate::image_ops::Rgb8Image;
use crate::transform::{Normalize, Transform};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// A source of labelled images.
pub trait Dataset: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;
    /// Whether there are no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Image `index` and its label.
    fn get(&self, index: usize) -> Result<(Rgb8Image, u32)>;
    /// Class names in label order.
    fn classes(&self) -> &[String];
}

/// A dataset chosen at run time (CIFAR or a folder, whole or a subset).
impl Dataset for Box<dyn Dataset> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, index: usize) -> Result<(Rgb8Image, u32)> {
        (**self).get(index)
    }
    fn classes(&self) -> &[String] {
        (**self).classes()
    }
}

/// A batch of transformed images.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Planar pixels, (N, 3, size, size), normalised.
    pub images: Vec<f32>,
    /// One label per image.
    pub labels: Vec<u32>,
    /// Dataset indices of the images.
    pub indices: Vec<usize>,
    /// (N, 3, size, size).
    pub shape: [usize; 4],
    /// How the batch was mixed (mixup / CutMix), if it was.
    pub mixed: Option<Mixed>,
}

/// How batches are formed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Shuffle each epoch (seeded by `seed` and the epoch).
    pub shuffle: bool,
    /// Drop the last, incomplete batch.
    pub drop_last: bool,
    /// Seed of the shuffles and the augmentation.
    pub seed: u64,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
}

/// Loads batches of a dataset through a transform.
pub struct Loader<D: Dataset + 'static> {
    dataset: Arc<D>,
    transform: Transform,
    normalize: Normalize,
    config: LoaderConfig,
    augment: Augment,
    shard: Shard,
}

/// This process's part of each epoch when several processes train one model (data
/// parallelism): `rank` of `world`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shard {
    rank: usize,
    world: usize,
}

/// What the loader adds to the transform: the per-image policy and per-batch mixing.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Augment {
    policy: bool,
    mixing: Option<Mixing>,
}

/// Stream tags keeping the policy's and the mixing's random numbers apart from the crop's.
const POLICY_STREAM: u64 = 0x7472_6976_6961_6c00;
const MIXING_STREAM: u64 = 0x6d69_7875_7000_0000;

impl<D: Dataset + 'static> Loader<D> {
    /// A loader; errors for a zero batch size or an invalid transform.
    pub fn new(dataset: Arc<D>, transform: Transform, normalize: Normalize, config: LoaderConfig) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(Error::Invalid("batch size must be at least 1".into()));
        }
        transform.validate()?;
        Ok(Self {
            dataset,
            transform,
            normalize,
            config,
            augment: Augment::default(),
            shard: Shard { rank: 0, world: 1 },
        })
    }

    /// The same loader with the TrivialAugment-style policy on every image (`policy`) and
    /// mixup / CutMix on batches (`mixing`, when active); see [`crate::augment`].
    pub fn with_augmentation(mut self, policy: bool, mixing: Mixing) -> Self {
        self.augment = Augment { policy, mixing: mixing.is_active().then_some(mixing) };
        self
    }

    /// The same loader giving process `rank` of `world` its share of every epoch: batch k of
    /// the epoch holds images `[(k·world + rank)·b, (k·world + rank + 1)·b)` of the epoch's
    /// order (b the batch size), so the ranks' k-th batches together are the k-th batch of
    /// one loader with batch `world·b`: disjoint, and covering the epoch (less the incomplete
    /// last `world·b` images with `drop_last`). Without `drop_last` a rank's last batch may be
    /// short, and a rank may have one batch fewer than another.
    pub fn with_shard(mut self, rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::Invalid(format!("rank {rank} of a world of {world} processes")));
        }
        self.shard = Shard { rank, world };
        Ok(self)
    }

    /// Batches per epoch (of this process's shard).
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.config.batch_size);
        let Shard { rank, world } = self.shard;
        let full = n / (b * world);
        let rest = n % (b * world);
        if self.config.drop_last {
            full
        } else {
            full + usize::from(rest > rank * b)
        }
    }

    /// The dataset.
    pub fn dataset(&self) -> &D {
        &self.dataset
    }

    /// The order of dataset indices in `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.config.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            order.shuffle(&mut rng);
        }
        order
    }

    /// Builds one batch from dataset indices, decoding and transforming (and applying the
    /// per-image policy) in parallel; batches are mixed only within an epoch.
    pub fn batch(&self, epoch: u64, indices: &[usize]) -> Result<Batch> {
        build_batch(&*self.dataset, self.transform, self.normalize, self.augment, self.config.seed, epoch, indices)
    }

    /// The batches of `epoch`, prepared on a producer thread up to `prefetch` ahead. Dropping
    /// the iterator stops the producer.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first` on: the same batches [`Loader::epoch`] gives
    /// from that point, without decoding the ones before (a run resumed mid-epoch).
    pub fn epoch_from(&self, epoch: u64, first: usize) -> EpochIter {
        let order = self.order(epoch);
        let (bs, Shard { rank, world }) = (self.config.batch_size, self.shard);
        let mut chunks: Vec<Vec<usize>> = order
            .chunks(bs * world)
            .filter(|global| !self.config.drop_last || global.len() == bs * world)
            .map(|global| global[(rank * bs).min(global.len())..((rank + 1) * bs).min(global.len())].to_vec())
            .filter(|mine| !mine.is_empty())
            .collect();
        let first = first.min(chunks.len());
        chunks.drain(..first);
        let (tx, rx) = sync_channel(self.config.prefetch.max(1));
        let (dataset, transform, normalize, seed, augment) =
            (self.dataset.clone(), self.transform, self.normalize, self.config.seed, self.augment);
        // Each rank mixes its part of a batch with its own random numbers.
        let mixing_stream = MIXING_STREAM + rank as u64;
        std::thread::spawn(move || {
            for (b, chunk) in (first..).zip(chunks) {
                let batch =
                    build_batch(&*dataset, transform, normalize, augment, seed, epoch, &chunk).map(|mut batch| {
                        if let Some(mixing) = augment.mixing {
                            let mut rng = crate::augment::rng(seed, epoch, b as u64, mixing_stream);
                            batch.mixed = mixing.apply(&mut batch.images, &batch.labels, transform.size(), &mut rng);
                        }
                        batch
                    });
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    break;
                }
            }
        });
        EpochIter { rx }
    }
}

fn build_batch<D: Dataset + ?Sized>(
    dataset: &D,
    transform: Transform,
    normalize: Normalize,
    augment: Augment,
    seed: u64,
    epoch: u64,
    indices: &[usize],
) -> Result<Batch> {
    let size = transform.size();
    let per_image = 3 * size * size;
    let mut images = vec![0f32; indices.len() * per_image];
    let labels = images
        .par_chunks_mut(per_image)
        .zip(indices.par_iter())
        .map(|(out, &index)| {
            let (img, label) = dataset.get(index)?;
            if augment.policy {
                // The policy works on [0, 1] pixels; normalisation follows it.
                let unit = Normalize { mean: [0.0; 3], std: [1.0; 3] };
                transform.apply(&img, unit, seed, epoch, index as u64, out);
                let mut rng = crate::augment::rng(seed, epoch, index as u64, POLICY_STREAM);
                crate::augment::trivial_augment(out, transform.size(), &mut rng);
                let plane = out.len() / 3;
                for (c, p) in out.chunks_mut(plane).enumerate() {
                    p.iter_mut().for_each(|v| *v = (*v - normalize.mean[c]) / normalize.std[c]);
                }
            } else {
                transform.apply(&img, normalize, seed, epoch, index as u64, out);
            }
            Ok(label)
        })
        .collect::<Result<Vec<u32>>>()?;
    Ok(Batch { images, labels, indices: indices.to_vec(), shape: [indices.len(), 3, size, size], mixed: None })
}

/// The batches of one epoch, in order; an error ends the epoch.
pub struct EpochIter {
    rx: Receiver<Result<Batch>>,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

/// A fixed subset of another dataset (for scaled-down presets): the first `len` indices of a
/// seeded permutation, so the subset is a uniform sample of every class.
pub struct Subset<D: Dataset> {
    inner: Arc<D>,
    indices: Vec<usize>,
}

impl<D: Dataset> Subset<D> {
    /// `len` images of `inner` drawn without replacement with `seed` (all when `len` ≥ its size).
    pub fn new(inner: Arc<D>, len: usize, seed: u64) -> Self {
        let indices = subset_indices(inner.len(), len, seed);
        Self { inner, indices }
    }
}

/// The indices, in order, of the images a [`Subset::new`] of `len` out of `total` reads.
pub fn subset_indices(total: usize, len: usize, seed: u64) -> Vec<usize> {
    let mut indices: Vec<usize> = (0..total).collect();
    indices.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    indices.truncate(len);
    indices.sort_unstable();
    indices
}

impl<D: Dataset> Dataset for Subset<D> {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, index: usize) -> Result<(Rgb8Image, u32)> {
        self.inner.get(self.indices[index])
    }
    fn classes(&self) -> &[String] {
        self.inner.classes()
    }
}
