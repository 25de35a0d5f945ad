//! Inference for users who depend on `sae-models` alone: image preprocessing (resize, centre
//! crop, normalise), class labels, and top-k predictions.

use crate::{Error, Model, Result};
use candle_core::{Tensor, D};
use image::imageops::FilterType;
use std::path::Path;

/// Mean of ImageNet's RGB channels on a 0–1 scale.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Standard deviation of ImageNet's RGB channels on a 0–1 scale.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Evaluation preprocessing: resize the shorter side to `resize` (bilinear), crop the centre
/// `crop` × `crop`, scale to 0–1 and normalise per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Shorter side after resizing.
    pub resize: usize,
    /// Side of the centre crop (the model's input size).
    pub crop: usize,
    /// Per-channel mean subtracted after scaling to 0–1.
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    pub std: [f32; 3],
}

impl Preprocess {
    /// The standard ImageNet evaluation transform for input size `crop` (resize to
    /// `crop · 256 / 224`, ImageNet mean and std).
    pub fn imagenet(crop: usize) -> Self {
        Self { resize: (crop * 256 + 112) / 224, crop, mean: IMAGENET_MEAN, std: IMAGENET_STD }
    }

    /// Decodes the image file (JPEG or PNG; greyscale and CMYK become RGB) into a
    /// (3, crop, crop) f32 tensor.
    pub fn load(&self, path: &Path) -> Result<Tensor> {
        let img = image::ImageReader::open(path)
            .map_err(|source| Error::Io { path: path.to_path_buf(), source })?
            .with_guessed_format()
            .map_err(|source| Error::Io { path: path.to_path_buf(), source })?
            .decode()
            .map_err(|e| Error::Image { path: path.to_path_buf(), reason: e.to_string() })?;
        self.apply(&img)
    }

    /// Transforms a decoded image into a (3, crop, crop) f32 tensor.
    pub fn apply(&self, img: &image::DynamicImage) -> Result<Tensor> {
        let rgb = img.to_rgb8();
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        if w == 0 || h == 0 {
            return Err(Error::InvalidConfig("image has zero size".into()));
        }
        let scale = self.resize as f64 / w.min(h) as f64;
        let (nw, nh) = (
            ((w as f64 * scale).round() as usize).max(self.crop),
            ((h as f64 * scale).round() as usize).max(self.crop),
        );
        let resized = image::imageops::resize(&rgb, nw as u32, nh as u32, FilterType::Triangle);
        let (x0, y0) = ((nw - self.crop) / 2, (nh - self.crop) / 2);
        let mut data = vec![0f32; 3 * self.crop * self.crop];
        for y in 0..self.crop {
            for x in 0..self.crop {
                let p = resized.get_pixel((x0 + x) as u32, (y0 + y) as u32);
                for c in 0..3 {
                    data[(c * self.crop + y) * self.crop + x] = (p[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
                }
            }
        }
        Ok(Tensor::from_vec(data, (3, self.crop, self.crop), &candle_core::Device::Cpu)?)
    }
}

/// One class of a prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Class index.
    pub class: usize,
    /// Softmax probability.
    pub probability: f32,
}

/// Reads class labels, one per line (blank lines skipped).
pub fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
}

impl Model {
    /// The `k` most probable classes of each image in `images` (N, C, H, W), in eval mode.
    pub fn top_k(&self, images: &Tensor, k: usize) -> Result<Vec<Vec<Prediction>>> {
        let images = images.to_device(self.device())?;
        let logits = self.forward_without_graph(&images, false)?;
        let probs: Vec<Vec<f32>> = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2()?;
        Ok(probs
            .into_iter()
            .map(|p| {
                let mut ranked: Vec<Prediction> =
                    p.into_iter().enumerate().map(|(class, probability)| Prediction { class, probability }).collect();
                ranked.sort_by(|a, b| b.probability.total_cmp(&a.probability).then(a.class.cmp(&b.class)));
                ranked.truncate(k);
                ranked
            })
            .collect())
    }
}
