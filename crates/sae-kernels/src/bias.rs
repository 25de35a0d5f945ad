//! A convolution's bias, `x + bias[c]` per channel of `x` (N, C, H, W): [`add_channel_bias`].
//!
//! Candle's `broadcast_add` adds in one pass, but differentiates the broadcast by summing the
//! gradient over (N, H, W) with its general strided reduction, one element at a time: in a
//! network with a bias on every convolution (the paper's Keras convention) those sums were 29 %
//! of a SENetV2-ResNet-14b training step at 32×32 (`perf`, `sae train` on CIFAR-10, the Zen 5
//! EPYC), and the run trained at 489 images/s against 893 without the biases. Here the backward
//! passes the gradient through as it is and sums it plane by plane in `vectorized!` code.

use crate::cpu::{contiguous, dispatch_float, min_planes_per_task, same_dtype, sum, uninit, vectorized, Elem};
use crate::Implementation;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `x + bias[c]` for every element of channel `c` of `x` (N, C, H, W); `bias` (C) has `x`'s
/// dtype. The fused kernels run on the CPU and CUDA for f32, bf16 and f16; elsewhere Candle's
/// `broadcast_add`, the reference.
pub fn add_channel_bias(x: &Tensor, bias: &Tensor, implementation: Implementation) -> Result<Tensor> {
    let c = match x.dims() {
        &[_, c, _, _] => c,
        dims => bail!("add_channel_bias: the input must be (N, C, H, W), got {dims:?}"),
    };
    if bias.dims() != [c] || bias.dtype() != x.dtype() {
        bail!(
            "add_channel_bias: the bias must be ({c}) of the input's dtype {:?}, got {:?} {:?}",
            x.dtype(),
            bias.dims(),
            bias.dtype()
        )
    }
    match implementation {
        Implementation::Fused if crate::has_fused_kernel(x) => {
            x.contiguous()?.apply_op2(&bias.contiguous()?, ChannelBias)
        }
        _ => x.broadcast_add(&bias.reshape((1, c, 1, 1))?),
    }
}

/// (x, bias) → x + bias per channel.
struct ChannelBias;

/// An (N, C, H, W) gradient → its sum over (N, H, W), (C).
struct ChannelSums;

/// (N, C, plane length) of a contiguous (N, C, H, W) layout.
fn planes(op: &str, l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        &[n, c, h, w] => Ok((n, c, h * w)),
        dims => bail!("{op}: expected (N, C, H, W), got {dims:?}"),
    }
}

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "sae-channel-bias"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, b: &CpuStorage, bl: &Layout) -> Result<(CpuStorage, Shape)> {
        const OP: &str = "add_channel_bias";
        let (_, c, plane) = planes(OP, xl)?;
        let out = dispatch_float!(OP, x, |x: T| {
            let x = contiguous(OP, "input", x, xl)?;
            let b = contiguous(OP, "bias", same_dtype::<T>(OP, b)?, bl)?;
            if b.len() != c {
                bail!("{OP}: the bias has {} values for {c} channels", b.len())
            }
            let mut out = uninit::<T>(x.len());
            out.par_chunks_mut(plane.max(1))
                .zip(x.par_chunks(plane.max(1)))
                .enumerate()
                .with_min_len(min_planes_per_task(plane))
                .for_each(|(i, (o, x))| {
                    // The sum rounded once to `T`, as Candle's add of two `T`s.
                    let bias = b[i % c].to_f32();
                    vectorized!(o.iter_mut().zip(x).for_each(|(o, &x)| *o = T::from_f32(x.to_f32() + bias)))
                });
            T::to_cpu_storage_owned(out)
        });
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda_ops::channel_bias(x, xl, b, bl)?, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let bias_grad = grad.contiguous()?.apply_op1_no_bwd(&ChannelSums)?;
        Ok((Some(grad.clone()), Some(bias_grad)))
    }
}

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "sae-channel-sums"
    }

    fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        const OP: &str = "add_channel_bias backward";
        let (n, c, plane) = planes(OP, gl)?;
        let out = dispatch_float!(OP, g, |g: T| {
            let g = contiguous(OP, "gradient", g, gl)?;
            // One task per channel: each plane summed in f32 lanes, the planes in f64.
            let sums: Vec<T> = (0..c)
                .into_par_iter()
                .with_min_len(min_planes_per_task(n * plane))
                .map(|ci| {
                    let total: f64 =
                        (0..n).map(|ni| vectorized!(sum(&g[(ni * c + ci) * plane..][..plane])) as f64).sum();
                    T::from_f32(total as f32)
                })
                .collect();
            T::to_cpu_storage_owned(sums)
        });
        Ok((out, Shape::from(c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, g: &candle_core::CudaStorage, gl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let c = gl.dims().get(1).copied().unwrap_or(0);
        Ok((crate::cuda_ops::channel_sums(g, gl)?, Shape::from(c)))
    }
}
