//! CIFAR-10 and CIFAR-100 in the official binary layouts, read fully into memory.
//!
//! * CIFAR-10: `data_batch_1.bin` … `data_batch_5.bin` (train) and `test_batch.bin`; records of
//!   1 label byte (0–9) + 3,072 pixel bytes (R, G, B planes of 32×32, row-major); class names
//!   in `batches.meta.txt`.
//! * CIFAR-100: `train.bin` and `test.bin`; records of 1 coarse label byte (0–19), 1 fine
//!   label byte (0–99) and the same 3,072 pixel bytes; names in `coarse_label_names.txt` and
//!   `fine_label_names.txt`.

use crate::error::{io, Error, Result};
use crate::image_ops::Rgb8Image;
use crate::loader::Dataset;
use std::path::{Path, PathBuf};

/// Pixel bytes of one image.
pub const IMAGE_BYTES: usize = 3 * 32 * 32;

/// Which CIFAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarKind {
    /// 10 classes.
    Cifar10,
    /// 100 fine / 20 coarse classes.
    Cifar100(LabelSet),
}

/// CIFAR-100's two label sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelSet {
    /// The 100 fine classes.
    Fine,
    /// The 20 coarse superclasses (what the paper's 20-way heads imply).
    Coarse,
}

/// Training or test split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// 50,000 images.
    Train,
    /// 10,000 images.
    Test,
}

/// A CIFAR split in memory.
#[derive(Debug, Clone)]
pub struct Cifar {
    /// Pixel bytes, [`IMAGE_BYTES`] per image, planar R, G, B.
    pub pixels: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u32>,
    /// Class names in label order.
    pub classes: Vec<String>,
}

impl CifarKind {
    pub(crate) fn files(self, split: Split) -> Vec<&'static str> {
        match (self, split) {
            (CifarKind::Cifar10, Split::Train) => {
                vec!["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"]
            }
            (CifarKind::Cifar10, Split::Test) => vec!["test_batch.bin"],
            (CifarKind::Cifar100(_), Split::Train) => vec!["train.bin"],
            (CifarKind::Cifar100(_), Split::Test) => vec!["test.bin"],
        }
    }

    fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            CifarKind::Cifar100(_) => 2,
        }
    }

    /// Number of classes of the label set.
    pub fn num_classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100(LabelSet::Coarse) => 20,
            CifarKind::Cifar100(LabelSet::Fine) => 100,
        }
    }

    fn names_file(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "batches.meta.txt",
            CifarKind::Cifar100(LabelSet::Coarse) => "coarse_label_names.txt",
            CifarKind::Cifar100(LabelSet::Fine) => "fine_label_names.txt",
        }
    }
}

fn read_names(path: &Path, expected: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if names.len() != expected {
        return Err(Error::Format {
            path: path.to_path_buf(),
            reason: format!("lists {} class names, expected {expected}", names.len()),
        });
    }
    Ok(names)
}

impl Cifar {
    /// Reads a split from `dir`, checking every file's size and every label.
    pub fn load(dir: &Path, kind: CifarKind, split: Split) -> Result<Self> {
        Self::load_only(dir, kind, split, |total| (0..total).collect())
    }

    /// [`Cifar::load`], keeping only the images `keep(total)` names (`total`: the split's
    /// images; indices in any order, each kept once and in ascending order, those past the end
    /// ignored): a seeded sample of a few hundred (`subset_indices`) holds only their bytes,
    /// not the split's 150 MB. The file sizes are read first, so the kept images' bytes are
    /// allocated once (growing by doubling, the whole training set passed through 268 MB of
    /// capacity with the old 134 MB beside it).
    pub fn load_only(
        dir: &Path,
        kind: CifarKind,
        split: Split,
        keep: impl FnOnce(usize) -> Vec<usize>,
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "dataset directory not found"),
            });
        }
        let record = kind.label_bytes() + IMAGE_BYTES;
        let whole_records = |path: &Path, len: usize| {
            if len == 0 || !len.is_multiple_of(record) {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    reason: format!(
                        "size {len} bytes is not a whole number of {record}-byte records (truncated or not {kind:?})"
                    ),
                });
            }
            Ok(len / record)
        };
        let paths: Vec<PathBuf> = kind.files(split).into_iter().map(|name| dir.join(name)).collect();
        let mut total = 0;
        for path in &paths {
            total += whole_records(path, std::fs::metadata(path).map_err(io(path))?.len() as usize)?;
        }
        let mut keep = keep(total);
        keep.sort_unstable();
        keep.dedup();
        keep.retain(|&i| i < total);
        let mut pixels = Vec::with_capacity(keep.len() * IMAGE_BYTES);
        let mut labels = Vec::with_capacity(keep.len());
        let (mut kept, mut first) = (keep.iter().peekable(), 0);
        for path in paths {
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let records = whole_records(&path, bytes.len())?;
            for (i, rec) in bytes.chunks_exact(record).enumerate() {
                let label = match kind {
                    CifarKind::Cifar10 => rec[0],
                    CifarKind::Cifar100(LabelSet::Coarse) => rec[0],
                    CifarKind::Cifar100(LabelSet::Fine) => rec[1],
                } as usize;
                let limit = kind.num_classes();
                if label >= limit {
                    return Err(Error::Format {
                        path,
                        reason: format!("record {i}: label {label} out of range 0..{limit}"),
                    });
                }
                if kept.next_if_eq(&&(first + i)).is_some() {
                    labels.push(label as u32);
                    pixels.extend_from_slice(&rec[kind.label_bytes()..]);
                }
            }
            first += records;
        }
        let classes = read_names(&dir.join(kind.names_file()), kind.num_classes())?;
        Ok(Self { pixels, labels, classes })
    }

    /// Planar bytes of image `i`.
    pub fn planes(&self, i: usize) -> &[u8] {
        &self.pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// Images per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

impl Dataset for Cifar {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn get(&self, index: usize) -> Result<(Rgb8Image, u32)> {
        let planes = self.planes(index);
        let mut data = vec![0u8; IMAGE_BYTES];
        for p in 0..1024 {
            for c in 0..3 {
                data[p * 3 + c] = planes[c * 1024 + p];
            }
        }
        Ok((Rgb8Image { width: 32, height: 32, data }, self.labels[index]))
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }
}
