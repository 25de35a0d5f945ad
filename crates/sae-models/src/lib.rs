//! SENetV2 (Squeeze Aggregated Excitation) and its baselines on Candle: a registry of
//! ResNets with no attention, SE or SaE modules, ResNeXt-50 and MobileNet v1; seeded
//! initialisation; safetensors weights with PyTorch state-dict names; parameter and
//! multiply-accumulate counts; and an inference API.
//!
//! ```no_run
//! use candle_core::Device;
//! use sae_models::{Model, Preprocess};
//! # fn main() -> sae_models::Result<()> {
//! let model = Model::from_name("senetv2_resnet50", 1000, 0, &Device::Cpu)?;
//! model.load_weights("senetv2_resnet50.safetensors".as_ref())?;
//! let image = Preprocess::imagenet(224).load("cat.jpg".as_ref())?.unsqueeze(0)?;
//! for p in &model.top_k(&image, 5)?[0] {
//!     println!("class {} p={:.3}", p.class, p.probability);
//! }
//! # Ok(()) }
//! ```
//!
//! This crate depends on no dataset or training code.

pub mod config;
pub mod convert;
pub mod error;
pub mod inference;
pub mod init;
pub mod layers;
pub mod mobilenet;
pub mod model;
pub mod onnx;
pub mod precision;
pub mod protobuf;
pub mod registry;
pub mod resnet;
pub mod sync_batch_norm;
pub mod tensor_file;

pub use config::{Arch, Attention, BlockKind, ModelConfig, PaperPreset, Stem};
pub use convert::{
    convert_checkpoint, export_pytorch_state_dict, infer_config, pytorch_incompatibility, read_state_dict,
};
pub use error::{Error, Result};
pub use inference::{read_labels, Prediction, Preprocess, IMAGENET_MEAN, IMAGENET_STD};
pub use model::{is_running_stat, Model, ParamCounts};
pub use onnx::{export_onnx, export_onnx_with_metadata};
pub use precision::Precision;
pub use registry::{config, create, list};
pub use sae_kernels::{Gate, Implementation};
pub use sync_batch_norm::{with_sync_batch_norm, CrossReplicaSum};
pub use tensor_file::TensorFile;
