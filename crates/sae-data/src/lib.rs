//! Everything between files on disk and a batch of normalised pixels: CIFAR-10/100 in their
//! binary layouts (downloaded from the Hugging Face Hub when asked), ImageNet-style image folders, deterministic augmentation, and a parallel,
//! prefetching, seeded loader.
//!
//! This crate knows no tensor library: a [`Batch`] is plain `f32` pixels (N, 3, H, W) and
//! `u32` labels, which the training crate turns into tensors.

pub mod augment;
pub mod cifar;
pub mod error;
pub mod folder;
pub mod hub;
pub mod image_ops;
pub mod loader;
pub mod transform;

pub use augment::{Mixed, Mixing};
pub use cifar::{Cifar, CifarKind, LabelSet, Split};
pub use error::{Error, Result};
pub use folder::ImageFolder;
pub use hub::{fetch_model_file, prepare_cifar, prepare_image_folder, resolve_weights, HubSource};
pub use image_ops::Rgb8Image;
pub use loader::{subset_indices, Batch, Dataset, Loader, LoaderConfig, Subset};
pub use transform::{Normalize, Transform};
