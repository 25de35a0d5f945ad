//! Tensor ops that Candle 0.11 lacks or runs slowly, for SE/SaE networks.
//!
//! Every op comes in two implementations behind one switch, [`Implementation`]:
//!
//! * `Reference` — composed from ordinary, differentiable Candle ops. It is the definition
//!   of what the op computes and runs on every device Candle supports.
//! * `Fused` — a hand-written kernel (`CustomOp`) with its own backward pass: rayon-parallel
//!   on CPU, `.cu` kernels under the `cuda` feature (every op but Adam; the convolution as
//!   im2col/col2im kernels around cuBLAS), `.metal` kernels under `metal` (the excitation
//!   only). Most fuse several steps into one pass; the convolution's im2col + gemm kernel
//!   fuses nothing and is here because Candle's CPU paths are slow. Where a kernel does not exist (a dtype or a
//!   device it does not take), `Fused` runs the reference.
//!
//! A model's `ModelConfig::kernels` (in `sae-models`) is this switch for a whole run: it
//! reaches every op below that the networks use, and the optimiser's Adam update in
//! `sae-train`. The ops:
//!
//! * [`excitation`] — global average pool → K parallel dense layers C → C/r with ReLU →
//!   concat → dense K·C/r → C → sigmoid → scale (SE when K = 1, SaE when K > 1);
//!   [`excitation_backward`] runs its fused backward pass directly, without autograd;
//!   [`excitation_add_relu`] adds a residual block's shortcut and its ReLU in the same pass.
//! * [`adam_update`] — the Adam optimiser's update in place (three passes, no allocation),
//!   for `sae-train`; [`adam_update_reference`] composes it from Candle ops.
//! * [`batch_norm_train`] — BatchNorm with batch statistics (training mode), forward and
//!   backward in two passes each (Candle composes it from a dozen ops), and
//!   [`batch_norm_eval`], its eval mode in one pass; [`batch_norm_train_add_relu`] adds a
//!   residual block's shortcut and its ReLU in the same pass, and
//!   [`batch_norm_excitation_add_relu`] is an SE/SaE block's whole end in training (BatchNorm,
//!   excitation, shortcut, ReLU), pooling from BatchNorm's statistics pass.
//! * [`conv2d`] — 2-D convolution with any stride, padding and groups, forward and backward,
//!   as im2col + matrix multiply (Candle's CPU input gradient is a direct loop).
//! * [`add_channel_bias`] — a convolution's bias, with a backward that sums the gradient per
//!   channel plane by plane (Candle's broadcast reduces element by element; CPU only).
//! * [`relu`] — ReLU with a one-pass backward (Candle's is four passes); [`add_relu`], a residual
//!   addition and its ReLU as one op; [`relu6`], MobileNet's activation (CPU only).
//! * [`max_pool2d`] — 2-D max-pool with padding and any stride, with a backward pass.
//! * [`depthwise_conv2d`] — depthwise 2-D convolution (groups = channels), forward and
//!   backward, without Candle's one-convolution-per-group loop.
//!
//! Each fused op is tested for parity with its reference, forward and every gradient.

use candle_core::{DType, Tensor};

pub mod adam;
pub mod batch_norm;
pub mod bias;
mod cast;
pub mod conv;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda_ops;
pub mod depthwise;
mod direct;
pub mod error;
pub mod excitation;
mod fma;
mod gemm_bf16;
mod layout;
pub mod max_pool;
pub mod relu;
mod winograd;
mod winograd3;

/// The PTX of every `src/cuda/*.cu` file, one `&str` constant per file (`build.rs`).
#[cfg(feature = "cuda")]
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/sae_ptx.rs"));
}

pub use adam::{
    adam_interleaved_applies, adam_kernel_takes, adam_update, adam_update_interleaved, adam_update_reference, AdamStep,
};
pub use batch_norm::{
    batch_norm_eval, batch_norm_eval_affine, batch_norm_train, batch_norm_train_add_relu, batch_norm_train_reference,
    channel_affine, BatchNormOutput,
};
pub use bias::add_channel_bias;
pub use cast::cast;
pub use conv::{conv2d, conv2d_affine, conv2d_reference, Conv2dConfig};
pub use depthwise::{depthwise_conv2d, depthwise_conv2d_reference, DepthwiseConfig};
pub use excitation::{
    batch_norm_excitation_add_relu, excitation, excitation_add_relu, excitation_backward, excitation_branches,
    excitation_reference, ExcitationGradients, ExcitationWeights, Gate,
};
pub use max_pool::{max_pool2d, max_pool2d_reference, MaxPoolConfig};
pub use relu::{add_relu, relu, relu6, relu6_reference};

/// Shortens how long Candle's CPU worker threads spin after each of its elementwise ops,
/// unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set already; call it first thing in `main`,
/// before any tensor op (Candle reads the variable when it starts its pool).
///
/// Candle runs large elementwise ops (the adds of backpropagation among them) on a pool of
/// its own whose workers spin 25,000 times before sleeping, while our kernels run on rayon's
/// threads: on a 2-core machine the spinning takes the cores from the convolutions. A limit
/// of 1,000 made a ResNet-50 training step at 32×32 10–20 % faster on the 2-core EPYC of
/// `results/train-speed.md` (`xtask bench-train-row`, 3 A/B pairs), with no change at 140×140.
pub fn shorten_candle_spin() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // Single-threaded still: this runs before anything starts a thread.
        std::env::set_var(VAR, "1000");
    }
}

/// The bf16 multiply instructions of the bf16 convolutions on a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Multiply {
    /// AMX tiles (`tdpbf16ps`, Intel AMX-BF16).
    AmxTiles,
    /// AVX-512 BF16 dot products (`vdpbf16ps`).
    DotProducts,
}

impl Bf16Multiply {
    /// What runs on this CPU: AMX tiles where the CPU and OS have them, else AVX-512 BF16 dot
    /// products; `None` where there are neither, or the environment variable
    /// [`DISABLE_BF16_PRODUCTS`] is set, and the same values are multiplied in f32.
    pub fn of_this_cpu() -> Option<Bf16Multiply> {
        if !gemm_bf16::available() {
            None
        } else if gemm_bf16::amx_available() {
            Some(Bf16Multiply::AmxTiles)
        } else {
            Some(Bf16Multiply::DotProducts)
        }
    }

    /// "AMX tiles (`tdpbf16ps`)" or "AVX-512 BF16 dot products (`vdpbf16ps`)", for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Bf16Multiply::AmxTiles => "AMX tiles (`tdpbf16ps`)",
            Bf16Multiply::DotProducts => "AVX-512 BF16 dot products (`vdpbf16ps`)",
        }
    }
}

/// FLOPs of `iterations` rounds of four independent AMX `tdpbf16ps` on tile registers, for a
/// peak measurement (run it on every thread at once); `None` without AMX.
pub fn amx_register_flops(iterations: usize) -> Option<f64> {
    gemm_bf16::amx_register_flops(iterations)
}

pub use fma::fma_register_flops;
pub use gemm_bf16::DISABLE_BF16_PRODUCTS;

/// Whether this process's f32 3×3 stride-1 convolutions with at most 64 channels in and out
/// (ResNet's first stage) run the direct AVX-512 kernel rather than Winograd's algorithm:
/// where the CPU has AVX-512F with full-width 512-bit FMA units, measured once per process;
/// `SAE_DIRECT_CONV=1` or `0` decides instead. For reports.
pub fn direct_conv3x3_in_use() -> bool {
    direct::available()
}

/// Whether the fused kernels take `t`: f32, bf16 or f16 on the CPU and on CUDA. Elsewhere
/// `Fused` runs the reference.
pub(crate) fn has_fused_kernel(t: &Tensor) -> bool {
    (t.device().is_cpu() || t.device().is_cuda()) && matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16)
}

/// Which implementation of an op to run. This is the one switch between the plain
/// composition of Candle ops and the hand-written kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Implementation {
    /// Composition of ordinary Candle ops (differentiated by Candle's autograd).
    Reference,
    /// Hand-written kernels with hand-written backward passes (the default); the reference
    /// where an op has no kernel for the operands' dtype or device.
    #[default]
    Fused,
}

impl Implementation {
    /// Both implementations, reference first.
    pub const ALL: [Implementation; 2] = [Implementation::Reference, Implementation::Fused];

    /// Lower-case name, as used in configs and benchmark labels.
    pub fn name(self) -> &'static str {
        match self {
            Implementation::Reference => "reference",
            Implementation::Fused => "fused",
        }
    }
}

impl std::str::FromStr for Implementation {
    type Err = error::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reference" => Ok(Implementation::Reference),
            "fused" => Ok(Implementation::Fused),
            other => Err(error::Error::UnknownImplementation(other.to_string())),
        }
    }
}

impl std::fmt::Display for Implementation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
