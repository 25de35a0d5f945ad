//! ImageNet-style folders: `<root>/<class>/<image>` (JPEG or PNG), classes from the sorted
//! folder names or from a file listing them (first word of each line, as imagenette's
//! `classes.txt` with `wnid name`). Images are decoded when asked for.

use crate::error::{io, Error, Result};
use crate::image_ops::Rgb8Image;
use crate::loader::Dataset;
use std::path::{Path, PathBuf};

/// Image file extensions, compared case-insensitively.
const EXTENSIONS: [&str; 3] = ["jpeg", "jpg", "png"];

/// Whether `path` names an image the loaders read: a `.jpg`, `.jpeg` or `.png` file name (any
/// case).
pub fn is_image_file(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    ext.is_some_and(|e| EXTENSIONS.contains(&e.as_str()))
}

/// An image folder split.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// Image paths with their class index, sorted by class then file name.
    pub samples: Vec<(PathBuf, u32)>,
    /// Class names (folder names) in index order.
    pub classes: Vec<String>,
}

impl ImageFolder {
    /// Scans `root`, taking the classes from its sub-folders in sorted order.
    pub fn open(root: &Path) -> Result<Self> {
        Self::with_classes(root, Self::class_names(root)?)
    }

    /// The classes [`Self::open`] takes from `root`: its sub-folders' names, sorted, without
    /// scanning their images (what another split's labels need).
    pub fn class_names(root: &Path) -> Result<Vec<String>> {
        let mut classes: Vec<String> = std::fs::read_dir(root)
            .map_err(io(root))?
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .collect();
        classes.sort();
        if classes.is_empty() {
            return Err(Error::Format { path: root.to_path_buf(), reason: "no class folders".into() });
        }
        Ok(classes)
    }

    /// Scans `root` with the classes listed in `classes_file` (first word of each non-empty
    /// line), in the file's order.
    pub fn open_with_class_file(root: &Path, classes_file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(classes_file).map_err(io(classes_file))?;
        let classes: Vec<String> = text.lines().filter_map(|l| l.split_whitespace().next()).map(String::from).collect();
        if classes.is_empty() {
            return Err(Error::Format { path: classes_file.to_path_buf(), reason: "lists no classes".into() });
        }
        Self::with_classes(root, classes)
    }

    /// Scans `root` as a split of a dataset whose classes are `classes` (another split's, in
    /// its order, so that labels agree): its sub-folders must be among them, but may be fewer —
    /// a validation split without images of some class is still one. Errors name a folder that
    /// is not a class, or a split without images.
    pub fn open_split_of(root: &Path, classes: &[String]) -> Result<Self> {
        let mut present = Vec::new();
        for entry in std::fs::read_dir(root).map_err(io(root))?.flatten() {
            let Some(name) = entry.file_name().to_str().map(String::from) else { continue };
            if !entry.path().is_dir() {
                continue;
            }
            if !classes.contains(&name) {
                return Err(Error::Format {
                    path: entry.path(),
                    reason: format!("is not one of the {} classes of the training split", classes.len()),
                });
            }
            present.push(name);
        }
        if present.is_empty() {
            return Err(Error::Format { path: root.to_path_buf(), reason: "no class folders".into() });
        }
        let mut split = Self::with_classes(root, present)?;
        // Labels by the given classes' order, not the folders found.
        for (_, label) in &mut split.samples {
            let name = &split.classes[*label as usize];
            *label = classes.iter().position(|c| c == name).expect("checked above") as u32;
        }
        split.samples.sort_by_key(|(_, label)| *label);
        split.classes = classes.to_vec();
        Ok(split)
    }

    /// Splits off `fraction` (between 0 and 1) of each class's images for evaluation, for a
    /// folder without a validation split; returns (training, evaluation), both with all the
    /// classes. Which images go is fixed by a hash of each file's name (FNV-1a), not by a seed
    /// or the order the files are listed in: runs of different seeds evaluate on the same
    /// images, and an image added later does not reshuffle the others. A class of n ≥ 2 images
    /// gives round(n · fraction) of them, at least one and at most n − 1; a class of one image
    /// gives none.
    pub fn split_by_fraction(self, fraction: f64) -> Result<(Self, Self)> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(Error::Invalid(format!("the evaluation fraction must lie between 0 and 1, got {fraction}")));
        }
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        for label in 0..self.classes.len() as u32 {
            let mut class: Vec<&(PathBuf, u32)> = self.samples.iter().filter(|(_, l)| *l == label).collect();
            let n = class.len();
            let held_out = if n < 2 { 0 } else { ((n as f64 * fraction).round() as usize).clamp(1, n - 1) };
            class.sort_by_key(|(path, _)| (fnv1a(path.file_name().map_or(&[][..], |f| f.as_encoded_bytes())), path));
            let (to_eval, to_train) = class.split_at(held_out);
            eval.extend(to_eval.iter().map(|&s| s.clone()));
            train.extend(to_train.iter().map(|&s| s.clone()));
        }
        // Each split in the order the folder lists them: by class, then file name.
        for split in [&mut train, &mut eval] {
            split.sort_by(|(pa, la), (pb, lb)| la.cmp(lb).then_with(|| pa.cmp(pb)));
        }
        Ok((Self { samples: train, classes: self.classes.clone() }, Self { samples: eval, classes: self.classes }))
    }

    fn with_classes(root: &Path, classes: Vec<String>) -> Result<Self> {
        let mut samples = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(io(&dir))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file() && is_image_file(p))
                .collect();
            if files.is_empty() {
                return Err(Error::Format { path: dir, reason: "class folder holds no JPEG or PNG images".into() });
            }
            files.sort();
            samples.extend(files.into_iter().map(|f| (f, label as u32)));
        }
        Ok(Self { samples, classes })
    }
}

/// 64-bit FNV-1a of `bytes`: a fixed hash, the same on every machine and Rust version.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn get(&self, index: usize) -> Result<(Rgb8Image, u32)> {
        let (path, label) = &self.samples[index];
        Ok((Rgb8Image::open(path)?, *label))
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }
}
