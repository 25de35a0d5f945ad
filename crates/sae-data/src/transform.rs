//! Training and evaluation transforms. Each draws its randomness from a generator seeded by
//! (seed, epoch, index), so an image's augmentation does not depend on thread count, batch
//! composition or what ran before.

use crate::error::{Error, Result};
use crate::image_ops::{sample, Region, Rgb8Image};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Per-channel normalisation, on a 0–1 scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    /// Channel means.
    pub mean: [f32; 3],
    /// Channel standard deviations.
    pub std: [f32; 3],
}

impl Normalize {
    /// CIFAR-10 training-set statistics (means measured on the real files; std the usual values).
    pub const CIFAR10: Normalize =
        Normalize { mean: [0.491_399_7, 0.482_158_4, 0.446_530_9], std: [0.247_032_3, 0.243_485_3, 0.261_587_8] };
    /// CIFAR-100 training-set statistics.
    pub const CIFAR100: Normalize =
        Normalize { mean: [0.507_070_8, 0.486_548_8, 0.440_917_9], std: [0.267_334_3, 0.256_438_7, 0.276_150_4] };
    /// ImageNet statistics.
    pub const IMAGENET: Normalize = Normalize { mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };
}

/// How an image becomes a `size` × `size` input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    /// CIFAR training: zero-pad by `pad`, random 32×32 crop, random horizontal flip, then a
    /// bilinear resize to `size` (the paper's 70 or 140; 32 keeps the crop).
    PadCropFlip {
        /// Padding on each side.
        pad: usize,
        /// Output side.
        size: usize,
    },
    /// Folder training: random resized crop (area fraction 0.08–1, aspect 3/4–4/3, as
    /// torchvision), random horizontal flip, bilinear to `size`.
    RandomResizedCropFlip {
        /// Output side.
        size: usize,
    },
    /// Evaluation: resize the shorter side to `resize`, centre-crop `size` (bilinear).
    ResizeCenterCrop {
        /// Shorter side after resizing.
        resize: usize,
        /// Output side.
        size: usize,
    },
}

/// Stream id of (seed, epoch, index): SplitMix64 steps over the three numbers.
pub(crate) fn stream(seed: u64, epoch: u64, index: u64) -> u64 {
    let mut z = seed;
    for v in [epoch, index] {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_add(v.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
    }
    z
}

impl Transform {
    /// Output side length.
    pub fn size(&self) -> usize {
        match *self {
            Transform::PadCropFlip { size, .. }
            | Transform::RandomResizedCropFlip { size }
            | Transform::ResizeCenterCrop { size, .. } => size,
        }
    }

    /// Checks the sizes.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Transform::ResizeCenterCrop { resize, size } if size == 0 || resize < size => {
                Err(Error::Invalid(format!("centre crop {size} needs resize ≥ crop > 0, got resize {resize}")))
            }
            _ if self.size() == 0 => Err(Error::Invalid("output size must be positive".into())),
            _ => Ok(()),
        }
    }

    /// Writes image `index` of `epoch`, transformed, into `out` (3 · size · size floats).
    pub fn apply(&self, img: &Rgb8Image, norm: Normalize, seed: u64, epoch: u64, index: u64, out: &mut [f32]) {
        let mut rng = ChaCha8Rng::seed_from_u64(stream(seed, epoch, index));
        let size = self.size();
        let (w, h) = (img.width as f32, img.height as f32);
        let (region, flip, zero_outside) = match *self {
            Transform::PadCropFlip { pad, .. } => {
                let max = 2 * pad;
                let (dx, dy) = (rng.random_range(0..=max), rng.random_range(0..=max));
                let flip = rng.random_bool(0.5);
                let region = Region {
                    x: dx as f32 - pad as f32,
                    y: dy as f32 - pad as f32,
                    w: img.width.min(32) as f32,
                    h: img.height.min(32) as f32,
                };
                (region, flip, true)
            }
            Transform::RandomResizedCropFlip { .. } => {
                let area = w * h;
                let mut region = None;
                for _ in 0..10 {
                    let target = area * rng.random_range(0.08f32..1.0);
                    let log_ratio = rng.random_range((3f32 / 4.0).ln()..(4f32 / 3.0).ln());
                    let ratio = log_ratio.exp();
                    let cw = (target * ratio).sqrt().round();
                    let ch = (target / ratio).sqrt().round();
                    if cw >= 1.0 && ch >= 1.0 && cw <= w && ch <= h {
                        let x = rng.random_range(0..=(w - cw) as usize) as f32;
                        let y = rng.random_range(0..=(h - ch) as usize) as f32;
                        region = Some(Region { x, y, w: cw, h: ch });
                        break;
                    }
                }
                // Fallback (torchvision): the largest centred crop within the aspect range.
                let region = region.unwrap_or_else(|| {
                    let (cw, ch) = if w / h < 0.75 {
                        (w, (w / 0.75).round())
                    } else if w / h > 4.0 / 3.0 {
                        ((h * 4.0 / 3.0).round(), h)
                    } else {
                        (w, h)
                    };
                    Region { x: ((w - cw) / 2.0).floor(), y: ((h - ch) / 2.0).floor(), w: cw, h: ch }
                });
                (region, rng.random_bool(0.5), false)
            }
            Transform::ResizeCenterCrop { resize, size } => {
                // The crop of the resized image mapped back to source pixels.
                let scale = resize as f32 / w.min(h);
                let side = size as f32 / scale;
                let region = Region { x: (w - side) / 2.0, y: (h - side) / 2.0, w: side, h: side };
                (region, false, false)
            }
        };
        sample(img, region, size, size, flip, zero_outside, norm.mean, norm.std, out);
    }
}
