//! Augmentation beyond crop and flip: a TrivialAugment-style policy per image (Müller & Hutter,
//! 2021, with torchvision's "wide" magnitude ranges) and mixup / CutMix per batch (as timm
//! mixes: the batch with its own reverse, one λ per batch).
//!
//! The policy works on a transformed image before normalisation: planar RGB in [0, 1], side
//! `size`. Each image draws one op uniformly, one of 31 magnitude bins uniformly and, for ops
//! with a direction, a sign; its generator is seeded by (seed, epoch, index) like the crop, so
//! the result depends on nothing else. Geometric ops map output pixels back through the
//! inverse transform about the image centre, take the nearest source pixel and fill with 0,
//! as torchvision does. Mixing is seeded by (seed, epoch, batch index).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};

/// One operation of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Unchanged.
    Identity,
    /// `x·f`, f = 1 + m, m ∈ [−0.99, 0.99].
    Brightness,
    /// Saturation: `gray + f·(x − gray)` per pixel.
    Color,
    /// `mean + f·(x − mean)`, the mean of the whole image's grey values.
    Contrast,
    /// Blend with a 3×3 smoothing of the interior (kernel 1 1 1 / 1 5 1 / 1 1 1, ÷13).
    Sharpness,
    /// Keep the top bits (8 down to 2) of each 8-bit value.
    Posterize,
    /// Values at or above the threshold (1 down to 0) become `1 − x`.
    Solarize,
    /// Stretch each channel to [0, 1].
    AutoContrast,
    /// Histogram equalisation of each channel over 256 levels.
    Equalize,
    /// Rotation by up to ±135°.
    Rotate,
    /// Horizontal shear by up to ±0.99.
    ShearX,
    /// Vertical shear by up to ±0.99.
    ShearY,
    /// Horizontal shift by up to ±32 pixels.
    TranslateX,
    /// Vertical shift by up to ±32 pixels.
    TranslateY,
}

/// The ops TrivialAugment draws from, uniformly.
pub const POLICY_OPS: [Op; 14] = [
    Op::Identity,
    Op::Brightness,
    Op::Color,
    Op::Contrast,
    Op::Sharpness,
    Op::Posterize,
    Op::Solarize,
    Op::AutoContrast,
    Op::Equalize,
    Op::Rotate,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
];

/// Magnitude bins of the policy.
pub const BINS: usize = 31;

/// The op's parameter at magnitude bin `bin` (0..31) with `negative` direction: the factor,
/// angle in degrees, shear, pixels, bits or threshold the op uses.
pub fn op_parameter(op: Op, bin: usize, negative: bool) -> f32 {
    let t = bin.min(BINS - 1) as f32 / (BINS - 1) as f32;
    let sign = if negative { -1.0 } else { 1.0 };
    match op {
        Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => 1.0 + sign * 0.99 * t,
        Op::Rotate => sign * 135.0 * t,
        Op::ShearX | Op::ShearY => sign * 0.99 * t,
        Op::TranslateX | Op::TranslateY => sign * 32.0 * t,
        // torchvision: 8 − round(bin / 5), from 8 bits down to 2.
        Op::Posterize => 8.0 - (bin as f32 / ((BINS - 1) as f32 / 6.0)).round(),
        Op::Solarize => 1.0 - t,
        Op::Identity | Op::AutoContrast | Op::Equalize => 0.0,
    }
}

/// Applies `op` with `parameter` (see [`op_parameter`]) to a planar RGB image in [0, 1] of side
/// `size`, in place.
pub fn apply_op(op: Op, parameter: f32, img: &mut [f32], size: usize) {
    let plane = size * size;
    debug_assert_eq!(img.len(), 3 * plane);
    let gray = |img: &[f32], i: usize| 0.299 * img[i] + 0.587 * img[plane + i] + 0.114 * img[2 * plane + i];
    let blend = |img: &mut [f32], toward: &[f32], f: f32| {
        for (x, &d) in img.iter_mut().zip(toward) {
            *x = (d + f * (*x - d)).clamp(0.0, 1.0);
        }
    };
    match op {
        Op::Identity => {}
        Op::Brightness => img.iter_mut().for_each(|x| *x = (*x * parameter).clamp(0.0, 1.0)),
        Op::Color => {
            let g: Vec<f32> = (0..plane).map(|i| gray(img, i)).collect();
            let degenerate: Vec<f32> = g.iter().cycle().take(3 * plane).copied().collect();
            blend(img, &degenerate, parameter);
        }
        Op::Contrast => {
            let mean = (0..plane).map(|i| gray(img, i)).sum::<f32>() / plane as f32;
            blend(img, &vec![mean; 3 * plane], parameter);
        }
        Op::Sharpness => {
            let mut smooth = img.to_vec();
            for c in 0..3 {
                let p = &img[c * plane..(c + 1) * plane];
                for y in 1..size.saturating_sub(1) {
                    for x in 1..size - 1 {
                        let mut s = 4.0 * p[y * size + x];
                        for dy in 0..3 {
                            for dx in 0..3 {
                                s += p[(y + dy - 1) * size + x + dx - 1];
                            }
                        }
                        smooth[c * plane + y * size + x] = s / 13.0;
                    }
                }
            }
            blend(img, &smooth, parameter);
        }
        Op::Posterize => {
            let mask = !((1u32 << (8 - parameter as u32).min(8)) - 1) & 0xff;
            img.iter_mut().for_each(|x| *x = (((*x * 255.0).round() as u32) & mask) as f32 / 255.0);
        }
        Op::Solarize => img.iter_mut().for_each(|x| {
            if *x >= parameter {
                *x = 1.0 - *x;
            }
        }),
        Op::AutoContrast => {
            for p in img.chunks_mut(plane) {
                let (lo, hi) = p.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
                if hi > lo {
                    p.iter_mut().for_each(|v| *v = (*v - lo) / (hi - lo));
                }
            }
        }
        Op::Equalize => img.chunks_mut(plane).for_each(equalize),
        Op::Rotate | Op::ShearX | Op::ShearY | Op::TranslateX | Op::TranslateY => {
            // The inverse map of output (x, y) to source, about the centre.
            let (sin, cos) = parameter.to_radians().sin_cos();
            let inverse = |x: f32, y: f32| -> (f32, f32) {
                match op {
                    Op::Rotate => (cos * x - sin * y, sin * x + cos * y),
                    Op::ShearX => (x - parameter * y, y),
                    Op::ShearY => (x, y - parameter * x),
                    Op::TranslateX => (x - parameter, y),
                    _ => (x, y - parameter),
                }
            };
            let c = size as f32 / 2.0;
            let src = img.to_vec();
            for y in 0..size {
                for x in 0..size {
                    let (sx, sy) = inverse(x as f32 + 0.5 - c, y as f32 + 0.5 - c);
                    let (sx, sy) = ((sx + c).floor(), (sy + c).floor());
                    let inside = sx >= 0.0 && sy >= 0.0 && sx < size as f32 && sy < size as f32;
                    for ch in 0..3 {
                        img[ch * plane + y * size + x] =
                            if inside { src[ch * plane + sy as usize * size + sx as usize] } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// Histogram equalisation of one channel (values in [0, 1] as 256 levels), as PIL does: the
/// cumulative histogram without the last level's count, in steps of `(n − count(last)) / 255`.
fn equalize(p: &mut [f32]) {
    let level = |v: f32| ((v * 255.0).round() as usize).min(255);
    let mut hist = [0usize; 256];
    p.iter().for_each(|&v| hist[level(v)] += 1);
    let last = hist.iter().rposition(|&n| n > 0).map_or(0, |i| hist[i]);
    let step = (p.len() - last) / 255;
    if step == 0 {
        return;
    }
    let mut lut = [0f32; 256];
    let mut n = step / 2;
    for (l, &count) in hist.iter().enumerate() {
        lut[l] = (n / step).min(255) as f32 / 255.0;
        n += count;
    }
    p.iter_mut().for_each(|v| *v = lut[level(*v)]);
}

/// TrivialAugment on one image: an op, a magnitude bin and a sign from `rng`.
pub fn trivial_augment(img: &mut [f32], size: usize, rng: &mut impl Rng) {
    let op = POLICY_OPS[rng.random_range(0..POLICY_OPS.len())];
    let bin = rng.random_range(0..BINS);
    let negative = rng.random_bool(0.5);
    apply_op(op, op_parameter(op, bin, negative), img, size);
}

/// Mixing of a batch with its reverse: mixup (`λ·x + (1 − λ)·x_rev`) or CutMix (a box of
/// `x_rev` pasted into `x`, λ the area left), λ ~ Beta(α, α).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mixing {
    /// Mixup's α; 0 turns mixup off.
    pub mixup_alpha: f32,
    /// CutMix's α; 0 turns CutMix off.
    pub cutmix_alpha: f32,
    /// Probability that a batch is mixed at all.
    pub prob: f32,
    /// With both on, the probability of CutMix rather than mixup.
    pub switch_prob: f32,
}

/// How a batch was mixed: the loss is `λ·CE(y) + (1 − λ)·CE(partner_labels)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mixed {
    /// The labels mixed in (the batch's labels reversed).
    pub partner_labels: Vec<u32>,
    /// The weight of the batch's own labels.
    pub lambda: f32,
}

impl Mixing {
    /// Whether this mixes anything.
    pub fn is_active(&self) -> bool {
        self.prob > 0.0 && (self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0)
    }

    /// Mixes `images` ((N, 3, size, size) planar) with their reverse, drawn from `rng`;
    /// `None` when this batch is left as it is.
    pub fn apply(&self, images: &mut [f32], labels: &[u32], size: usize, rng: &mut impl Rng) -> Option<Mixed> {
        let n = labels.len();
        if !self.is_active() || n < 2 || !rng.random_bool(self.prob.clamp(0.0, 1.0) as f64) {
            return None;
        }
        let cutmix = match (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0) {
            (true, true) => rng.random_bool(self.switch_prob.clamp(0.0, 1.0) as f64),
            (false, true) => true,
            _ => false,
        };
        let alpha = if cutmix { self.cutmix_alpha } else { self.mixup_alpha };
        let lambda = Beta::new(alpha, alpha).map_or(1.0, |b| b.sample(rng));
        let per_image = images.len() / n;
        let original = images.to_vec();
        let lambda = if cutmix {
            // A box of side √(1 − λ) of the image's, centred uniformly, clipped to the image.
            let side = ((1.0 - lambda).sqrt() * size as f32) as usize;
            let (cy, cx) = (rng.random_range(0..size), rng.random_range(0..size));
            let (y0, y1) = (cy.saturating_sub(side / 2), (cy + side / 2).min(size));
            let (x0, x1) = (cx.saturating_sub(side / 2), (cx + side / 2).min(size));
            for i in 0..n {
                let (dst, src) = (i * per_image, (n - 1 - i) * per_image);
                for c in 0..3 {
                    for y in y0..y1 {
                        let row = c * size * size + y * size;
                        images[dst + row + x0..dst + row + x1]
                            .copy_from_slice(&original[src + row + x0..src + row + x1]);
                    }
                }
            }
            1.0 - ((y1 - y0) * (x1 - x0)) as f32 / (size * size) as f32
        } else {
            for i in 0..n {
                let (dst, src) = (i * per_image, (n - 1 - i) * per_image);
                for k in 0..per_image {
                    images[dst + k] = lambda * original[dst + k] + (1.0 - lambda) * original[src + k];
                }
            }
            lambda
        };
        Some(Mixed { partner_labels: labels.iter().rev().copied().collect(), lambda })
    }
}

/// The generator of an image's policy or a batch's mixing: its own stream, apart from the
/// crop's, for (seed, epoch, index).
pub(crate) fn rng(seed: u64, epoch: u64, index: u64, purpose: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(crate::transform::stream(seed ^ purpose, epoch, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3×3 image: channel c at (y, x) is `values[c][y * 3 + x]`.
    fn image(values: [[f32; 9]; 3]) -> Vec<f32> {
        values.concat()
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    const RAMP: [f32; 9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

    #[test]
    fn colour_ops_match_hand_values() {
        let mut img = image([RAMP, RAMP, RAMP]);
        apply_op(Op::Brightness, 1.5, &mut img, 3);
        assert!(close(&img[..3], &[0.15, 0.3, 0.45]) && img[8] == 1.0, "{img:?}");
        // Saturation 0 gives grey: 0.299·R + 0.587·G + 0.114·B everywhere.
        let mut img = image([[1.0; 9], [0.5; 9], [0.0; 9]]);
        apply_op(Op::Color, 0.0, &mut img, 3);
        assert!(close(&img, &[0.5925; 27]), "{img:?}");
        // Contrast 0 gives the mean grey of the image.
        let mut img = image([RAMP, RAMP, RAMP]);
        apply_op(Op::Contrast, 0.0, &mut img, 3);
        assert!(close(&img, &[0.5; 27]), "{img:?}");
        // Contrast 2 doubles the distance from it.
        let mut img = image([RAMP, RAMP, RAMP]);
        apply_op(Op::Contrast, 2.0, &mut img, 3);
        assert!(close(&img[..3], &[0.0, 0.0, 0.1]) && close(&img[6..9], &[0.9, 1.0, 1.0]), "{img:?}");
        // Solarize at 0.5: 0.5 and above invert.
        let mut img = image([RAMP, RAMP, RAMP]);
        apply_op(Op::Solarize, 0.5, &mut img, 3);
        assert!(close(&img[..9], &[0.1, 0.2, 0.3, 0.4, 0.5, 0.4, 0.3, 0.2, 0.1]), "{img:?}");
        // Posterize to 2 bits: 0.4·255 = 102 → 64; 0.9·255 = 229.5 → 230 → 192.
        let mut img = image([RAMP, RAMP, RAMP]);
        apply_op(Op::Posterize, 2.0, &mut img, 3);
        assert!((img[3] - 64.0 / 255.0).abs() < 1e-6 && (img[8] - 192.0 / 255.0).abs() < 1e-6, "{img:?}");
        // Autocontrast stretches 0.1..0.9 to 0..1.
        let mut img = image([RAMP, RAMP, RAMP]);
        apply_op(Op::AutoContrast, 0.0, &mut img, 3);
        assert!(close(&img[..9], &[0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]), "{img:?}");
        // Sharpness 0 is the smoothing: the centre of the ramp is (4·0.5 + 4.5) / 13.
        let mut img = image([RAMP, RAMP, RAMP]);
        apply_op(Op::Sharpness, 0.0, &mut img, 3);
        assert!((img[4] - 6.5 / 13.0).abs() < 1e-6 && img[0] == 0.1, "{img:?}");
    }

    #[test]
    fn equalize_spreads_the_levels_as_pil_does() {
        // Levels 0 ×3, 51 ×3, 102 ×3 (n = 9, last level's count 3): step = 6 / 255 = 0 → unchanged.
        let mut few = [0.0, 0.0, 0.0, 0.2, 0.2, 0.2, 0.4, 0.4, 0.4];
        let before = few;
        equalize(&mut few);
        assert_eq!(few, before);
        // 512 values: 256 of level 10 and 256 of level 20: step = 256 / 255 = 1; level 10 maps
        // to (0 + 0) / 1 = 0 and level 20 to min(255, 256) = 255.
        let mut p: Vec<f32> = (0..512).map(|i| if i < 256 { 10.0 / 255.0 } else { 20.0 / 255.0 }).collect();
        equalize(&mut p);
        assert_eq!((p[0], p[511]), (0.0, 1.0));
    }

    #[test]
    fn geometric_ops_move_pixels_as_worked_out_by_hand() {
        let one = |v: [f32; 9]| image([v, v, v]);
        // Translate right by one pixel: columns shift, the first fills with 0.
        let mut img = one(RAMP);
        apply_op(Op::TranslateX, 1.0, &mut img, 3);
        assert!(close(&img[..9], &[0.0, 0.1, 0.2, 0.0, 0.4, 0.5, 0.0, 0.7, 0.8]), "{img:?}");
        let mut img = one(RAMP);
        apply_op(Op::TranslateY, -1.0, &mut img, 3);
        assert!(close(&img[..9], &[0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.0, 0.0, 0.0]), "{img:?}");
        // Rotating by 90° counter-clockwise (y down): the top row becomes the left column, read
        // upwards.
        let mut img = one(RAMP);
        apply_op(Op::Rotate, 90.0, &mut img, 3);
        assert!(close(&img[..9], &[0.3, 0.6, 0.9, 0.2, 0.5, 0.8, 0.1, 0.4, 0.7]), "{img:?}");
        // Shear x by 1: row y reads from x − (y − 1): the top row shifts left, the bottom right.
        let mut img = one(RAMP);
        apply_op(Op::ShearX, 1.0, &mut img, 3);
        assert!(close(&img[..9], &[0.2, 0.3, 0.0, 0.4, 0.5, 0.6, 0.0, 0.7, 0.8]), "{img:?}");
    }

    #[test]
    fn magnitudes_span_the_wide_ranges() {
        assert_eq!(op_parameter(Op::Rotate, 30, true), -135.0);
        assert_eq!(op_parameter(Op::Brightness, 0, false), 1.0);
        assert!((op_parameter(Op::Contrast, 30, true) - 0.01).abs() < 1e-6);
        assert_eq!((op_parameter(Op::Posterize, 0, false), op_parameter(Op::Posterize, 30, false)), (8.0, 2.0));
        assert_eq!((op_parameter(Op::Solarize, 0, false), op_parameter(Op::Solarize, 30, false)), (1.0, 0.0));
        assert_eq!(op_parameter(Op::TranslateX, 15, false), 16.0);
    }

    #[test]
    fn mixup_and_cutmix_mix_with_the_reversed_batch() {
        // Two 2×2 images: all 1 and all 0.
        let batch = || [vec![1.0f32; 12], vec![0.0f32; 12]].concat();
        let mixup = Mixing { mixup_alpha: 0.4, cutmix_alpha: 0.0, prob: 1.0, switch_prob: 0.0 };
        let mut images = batch();
        let mixed = mixup.apply(&mut images, &[3, 5], 2, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        let l = mixed.lambda;
        assert!((0.0..=1.0).contains(&l) && mixed.partner_labels == [5, 3]);
        assert!(
            images[..12].iter().all(|&v| (v - l).abs() < 1e-6)
                && images[12..].iter().all(|&v| (v - (1.0 - l)).abs() < 1e-6)
        );
        let cutmix = Mixing { mixup_alpha: 0.0, cutmix_alpha: 1.0, prob: 1.0, switch_prob: 0.0 };
        let side = 8;
        let batch = [vec![1.0f32; 3 * side * side], vec![0.0f32; 3 * side * side]].concat();
        for seed in 0..20 {
            let mut images = batch.clone();
            let mixed = cutmix.apply(&mut images, &[0, 1], side, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            // λ is the share of the first image still its own: the ones left in it.
            let own = images[..3 * side * side].iter().filter(|&&v| v == 1.0).count() as f32 / (3 * side * side) as f32;
            assert!((mixed.lambda - own).abs() < 1e-6, "seed {seed}: λ {} vs {own}", mixed.lambda);
        }
        // Off, or a single image: nothing happens.
        let off = Mixing { prob: 0.0, ..mixup };
        assert!(off.apply(&mut batch.clone(), &[0, 1], side, &mut ChaCha8Rng::seed_from_u64(0)).is_none());
        assert!(mixup.apply(&mut [0.5; 12], &[1], 2, &mut ChaCha8Rng::seed_from_u64(0)).is_none());
    }
}
