//! [`Precision`]: the number format a network trains and runs in.
//!
//! `bf16` is mixed precision in the way of PyTorch's autocast: the variables (master weights)
//! stay f32, and so do the optimiser state, BatchNorm's statistics, the classifier head and
//! the loss. Each forward pass rounds the input and each layer's weights to bf16 (their
//! gradients come back as f32), so activations, and the copies autograd keeps of them, take
//! half the memory. What the arithmetic is depends on the device: CUDA multiplies bf16 with
//! f32 accumulation (cuBLAS, tensor cores); on the CPU the convolutions multiply bf16 with f32
//! sums on AMX tiles where the CPU has AMX-BF16, else with dot products where it has AVX-512
//! BF16, and every other CPU kernel (and
//! every kernel on other CPUs) converts to f32 for the arithmetic and rounds each result once
//! (bf16 storage, f32 compute). The CPU convolutions (not the depthwise ones) take the f32
//! weights themselves rather than bf16 copies: their bf16 kernels round them while packing,
//! their f32 products (small multiplies, CPUs without bf16 products) use them unrounded, and
//! their weight gradients are summed and returned in f32 (`sae_kernels::conv2d`). The SE/SaE
//! excitation's CPU kernel does the same with its dense layers' weights (it computes in f32).

use candle_core::{DType, Device};
use sae_kernels::Bf16Multiply;

/// The number format of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in the variables' type (f32).
    #[default]
    F32,
    /// bf16 activations, f32 master weights (see the module docs).
    Bf16,
}

impl Precision {
    /// Every precision, in the order the help text lists them.
    pub const ALL: [Precision; 2] = [Precision::F32, Precision::Bf16];

    /// The name used on command lines and in configs.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The type activations are stored in; `None` for the variables' own type.
    pub fn activation_dtype(self) -> Option<DType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(DType::BF16),
        }
    }

    /// What runs on `device` in this precision, for logs and reports.
    pub fn describe(self, device: &Device) -> &'static str {
        match (self, device) {
            (Precision::F32, _) => "f32",
            (Precision::Bf16, Device::Cpu) => match Bf16Multiply::of_this_cpu() {
                Some(Bf16Multiply::AmxTiles) => {
                    "bf16 mixed precision: bf16 activations, bf16 multiplies with f32 sums in the convolutions (AMX tiles), f32 arithmetic in the other CPU kernels, f32 master weights"
                }
                Some(Bf16Multiply::DotProducts) => {
                    "bf16 mixed precision: bf16 activations, bf16 dot products with f32 sums in the convolutions (AVX-512 BF16), f32 arithmetic in the other CPU kernels, f32 master weights"
                }
                None => {
                    "bf16 mixed precision: bf16 activations, f32 arithmetic in the CPU kernels (bf16 storage, f32 compute: this CPU has no AVX-512 BF16, or SAE_DISABLE_BF16_PRODUCTS is set), f32 master weights"
                }
            },
            (Precision::Bf16, _) => {
                "bf16 mixed precision: bf16 activations and multiplies (f32 accumulation), f32 master weights"
            }
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Precision::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| crate::Error::UnknownPrecision {
            name: s.to_string(),
            known: Precision::ALL.map(Precision::name).to_vec(),
        })
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
