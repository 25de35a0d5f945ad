//! An RGB image in memory and the one resampling routine every transform uses: bilinear
//! sampling of a (possibly out-of-image) rectangle, optional horizontal flip, and
//! normalisation, written straight into planar `f32` output.

use crate::error::{io, Error, Result};
use std::path::Path;

/// 8-bit RGB pixels, interleaved, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8Image {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// `height · width · 3` bytes.
    pub data: Vec<u8>,
}

impl Rgb8Image {
    /// Decodes a JPEG or PNG file; greyscale, CMYK and alpha images become RGB.
    pub fn open(path: &Path) -> Result<Self> {
        let reader = image::ImageReader::open(path).map_err(io(path))?.with_guessed_format().map_err(io(path))?;
        let img = reader.decode().map_err(|e| Error::Decode { path: path.to_path_buf(), reason: e.to_string() })?;
        let rgb = img.to_rgb8();
        let (width, height) = (rgb.width() as usize, rgb.height() as usize);
        if width == 0 || height == 0 {
            return Err(Error::Decode { path: path.to_path_buf(), reason: "image has zero size".into() });
        }
        Ok(Self { width, height, data: rgb.into_raw() })
    }

    #[inline(always)]
    fn px(&self, x: usize, y: usize, c: usize) -> f32 {
        self.data[(y * self.width + x) * 3 + c] as f32
    }
}

/// A source rectangle in pixel coordinates (may extend past the image when `zero_outside`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Region {
    /// Left edge.
    pub x: f32,
    /// Top edge.
    pub y: f32,
    /// Width.
    pub w: f32,
    /// Height.
    pub h: f32,
}

/// Samples `region` of `img` into an `out_w` × `out_h` planar output (`3 · out_h · out_w`
/// floats), as `(value / 255 − mean) / std` per channel. Bilinear, half-pixel centres (like
/// PyTorch's `align_corners = False`, without antialiasing). Outside the image, pixels are 0
/// (zero padding) when `zero_outside`, else the nearest edge pixel.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    img: &Rgb8Image,
    region: Region,
    out_w: usize,
    out_h: usize,
    flip: bool,
    zero_outside: bool,
    mean: [f32; 3],
    std: [f32; 3],
    out: &mut [f32],
) {
    let plane = out_w * out_h;
    debug_assert_eq!(out.len(), 3 * plane);
    let scale = [1.0 / (255.0 * std[0]), 1.0 / (255.0 * std[1]), 1.0 / (255.0 * std[2])];
    let shift = [-mean[0] / std[0], -mean[1] / std[1], -mean[2] / std[2]];
    let sx = region.w / out_w as f32;
    let sy = region.h / out_h as f32;
    // Exact copy when the region is an integer-aligned window of the same size (CIFAR crops).
    let exact = sx == 1.0 && sy == 1.0 && region.x.fract() == 0.0 && region.y.fract() == 0.0;
    let (w, h) = (img.width as isize, img.height as isize);
    let fetch = |x: isize, y: isize, c: usize| -> f32 {
        if x >= 0 && y >= 0 && x < w && y < h {
            img.px(x as usize, y as usize, c)
        } else if zero_outside {
            0.0
        } else {
            img.px(x.clamp(0, w - 1) as usize, y.clamp(0, h - 1) as usize, c)
        }
    };
    for oy in 0..out_h {
        let fy = region.y + (oy as f32 + 0.5) * sy - 0.5;
        let y0 = fy.floor();
        let ty = fy - y0;
        let y0 = y0 as isize;
        for ox in 0..out_w {
            let dst_x = if flip { out_w - 1 - ox } else { ox };
            let fx = region.x + (ox as f32 + 0.5) * sx - 0.5;
            let o = oy * out_w + dst_x;
            if exact {
                let (x, y) = (fx.round() as isize, fy.round() as isize);
                for c in 0..3 {
                    out[c * plane + o] = fetch(x, y, c) * scale[c] + shift[c];
                }
                continue;
            }
            let x0 = fx.floor();
            let tx = fx - x0;
            let x0 = x0 as isize;
            for c in 0..3 {
                let top = fetch(x0, y0, c) * (1.0 - tx) + fetch(x0 + 1, y0, c) * tx;
                let bottom = fetch(x0, y0 + 1, c) * (1.0 - tx) + fetch(x0 + 1, y0 + 1, c) * tx;
                out[c * plane + o] = (top * (1.0 - ty) + bottom * ty) * scale[c] + shift[c];
            }
        }
    }
}
