//! CUDA launches of the fused excitation kernels (`src/cuda/excitation.cu`, compiled to PTX
//! by `build.rs` when the `cuda` feature is on and loaded by the driver at first use).
//!
//! Forward: plane sums → gates → scale. Backward: plane sums (with the gradient) → gates →
//! dense backward → parameter gradients and input gradient, written into one packed output
//! `[dx | dparams]` (the CPU kernel returns dparams apart, see `ExcitationBackwardOp`).

use super::op::ExcitationOp;
use crate::layout::{kernel_suffix, KernelStrides};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, WithDType};

const MODULE: &str = "sae_excitation";
const BLOCK: u32 = 256;

fn suffix(dtype: DType) -> Result<&'static str> {
    kernel_suffix("excitation", dtype, "CUDA")
}

fn strides(what: &str, layout: &Layout) -> Result<KernelStrides> {
    KernelStrides::new("excitation", what, layout)
}

fn grid(elements: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((elements as u32).div_ceil(BLOCK), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn per_block(blocks: usize, shared_floats: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: (shared_floats * 4) as u32,
    }
}

struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
}

impl Dims {
    fn new(layout: &Layout) -> Result<Self> {
        match layout.dims() {
            &[n, c, h, w] => Ok(Self { n, c, h, w }),
            other => bail!("excitation: input must be (N, C, H, W), got {other:?}"),
        }
    }
    fn numel(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
}

/// z (N·C) and h, s from the plane sums and the gates kernel; `grad` adds Σ g·x per plane.
#[allow(clippy::type_complexity)]
fn pool_and_gate<T: CudaDType + DeviceRepr + WithDType>(
    op: &ExcitationOp,
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    xl: &Layout,
    p: &CudaView<'_, T>,
    grad: Option<(&CudaSlice<T>, &Layout)>,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
    let d = Dims::new(xl)?;
    let sfx = suffix(T::DTYPE)?;
    let planes = d.n * d.c;
    let (c, h, w, hidden) = (d.c as u32, d.h as u32, d.w as u32, op.hidden as u32);
    let mean_x = unsafe { dev.alloc::<f32>(planes)? };
    let sum_gx = dev.alloc_zeros::<f32>(planes)?;
    let func = dev.get_or_load_custom_func(&format!("sae_plane_sums_{sfx}"), MODULE, crate::ptx::EXCITATION)?;
    let xs = strides("input", xl)?;
    let mut b = func.builder();
    b.arg(x);
    b.arg(&xs);
    let (g_strides, g_slice);
    match grad {
        Some((g, gl)) => {
            g_strides = strides("output gradient", gl)?;
            g_slice = g;
            b.arg(g_slice);
        }
        None => {
            g_strides = xs;
            // A null pointer tells the kernel there is no gradient.
            b.arg(&0u64);
        }
    }
    b.arg(&g_strides);
    candle_core::builder_arg!(b, c, h, w);
    b.arg(&mean_x);
    b.arg(&sum_gx);
    unsafe { b.launch(per_block(planes, 0)) }.w()?;

    let hid = unsafe { dev.alloc::<f32>(d.n * op.hidden)? };
    let s = unsafe { dev.alloc::<f32>(planes)? };
    let func = dev.get_or_load_custom_func(&format!("sae_gates_{sfx}"), MODULE, crate::ptx::EXCITATION)?;
    let mut b = func.builder();
    b.arg(p);
    b.arg(&mean_x);
    candle_core::builder_arg!(b, c, hidden);
    b.arg(&hid);
    b.arg(&s);
    unsafe { b.launch(per_block(d.n, d.c + op.hidden)) }.w()?;
    Ok((mean_x, sum_gx, hid, s))
}

fn forward<T: CudaDType + DeviceRepr + WithDType>(
    op: &ExcitationOp,
    dev: &CudaDevice,
    x: &CudaStorage,
    xl: &Layout,
    p: &CudaStorage,
    pl: &Layout,
) -> Result<CudaStorage> {
    let d = Dims::new(xl)?;
    let x = x.as_cuda_slice::<T>()?;
    let p = p.as_cuda_slice::<T>()?.slice(pl.start_offset()..);
    let (_, _, _, s) = pool_and_gate::<T>(op, dev, x, xl, &p, None)?;
    let numel = d.numel();
    let out = unsafe { dev.alloc::<T>(numel)? };
    let func =
        dev.get_or_load_custom_func(&format!("sae_scale_{}", suffix(T::DTYPE)?), MODULE, crate::ptx::EXCITATION)?;
    let mut b = func.builder();
    b.arg(x);
    let xs = strides("input", xl)?;
    b.arg(&xs);
    b.arg(&s);
    candle_core::builder_arg!(b, op.gate.code(), d.c as u32, d.h as u32, d.w as u32, numel);
    b.arg(&out);
    unsafe { b.launch(grid(numel)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

#[allow(clippy::too_many_arguments)]
fn backward<T: CudaDType + DeviceRepr + WithDType>(
    op: &ExcitationOp,
    dev: &CudaDevice,
    x: &CudaStorage,
    xl: &Layout,
    p: &CudaStorage,
    pl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> Result<CudaStorage> {
    let d = Dims::new(xl)?;
    if gl.dims() != xl.dims() {
        bail!("excitation backward: gradient shape {:?} differs from input shape {:?}", gl.dims(), xl.dims())
    }
    let sfx = suffix(T::DTYPE)?;
    let x = x.as_cuda_slice::<T>()?;
    let g = g.as_cuda_slice::<T>()?;
    let p = p.as_cuda_slice::<T>()?.slice(pl.start_offset()..);
    let (z, sum_gx, hid, s) = pool_and_gate::<T>(op, dev, x, xl, &p, Some((g, gl)))?;
    let (c, hidden) = (d.c as u32, op.hidden as u32);

    let da = unsafe { dev.alloc::<f32>(d.n * d.c)? };
    let dh = unsafe { dev.alloc::<f32>(d.n * op.hidden)? };
    let dz = unsafe { dev.alloc::<f32>(d.n * d.c)? };
    let func = dev.get_or_load_custom_func(&format!("sae_dense_bwd_{sfx}"), MODULE, crate::ptx::EXCITATION)?;
    let mut b = func.builder();
    b.arg(&p);
    b.arg(&sum_gx);
    b.arg(&s);
    b.arg(&hid);
    candle_core::builder_arg!(b, c, hidden);
    b.arg(&da);
    b.arg(&dh);
    b.arg(&dz);
    unsafe { b.launch(per_block(d.n, 2 * op.hidden + d.c)) }.w()?;

    let numel = d.numel();
    let params = op.offsets().len;
    let mut out = unsafe { dev.alloc::<T>(numel + params)? };
    {
        let mut dx = out.slice_mut(0..numel);
        let func = dev.get_or_load_custom_func(&format!("sae_input_grad_{sfx}"), MODULE, crate::ptx::EXCITATION)?;
        let mut b = func.builder();
        b.arg(g);
        let gs = strides("output gradient", gl)?;
        b.arg(&gs);
        b.arg(&s);
        b.arg(&dz);
        candle_core::builder_arg!(b, op.gate.code(), c, d.h as u32, d.w as u32, numel);
        b.arg(&mut dx);
        unsafe { b.launch(grid(numel)) }.w()?;
    }
    {
        let mut dparams = out.slice_mut(numel..);
        let func = dev.get_or_load_custom_func(&format!("sae_param_grads_{sfx}"), MODULE, crate::ptx::EXCITATION)?;
        let mut b = func.builder();
        b.arg(&z);
        b.arg(&hid);
        b.arg(&da);
        b.arg(&dh);
        candle_core::builder_arg!(b, d.n as u32, c, hidden);
        b.arg(&mut dparams);
        unsafe { b.launch(grid(params)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Forward pass on CUDA.
pub(crate) fn excitation_forward(
    op: &ExcitationOp,
    x: &CudaStorage,
    xl: &Layout,
    p: &CudaStorage,
    pl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let out = match x.dtype() {
        DType::F32 => forward::<f32>(op, &dev, x, xl, p, pl)?,
        DType::F16 => forward::<half::f16>(op, &dev, x, xl, p, pl)?,
        DType::BF16 => forward::<half::bf16>(op, &dev, x, xl, p, pl)?,
        other => bail!("excitation: unsupported dtype {other:?} on CUDA"),
    };
    Ok((out, xl.shape().clone()))
}

/// Backward pass on CUDA: packed `[dx | dparams]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn excitation_backward(
    op: &ExcitationOp,
    x: &CudaStorage,
    xl: &Layout,
    p: &CudaStorage,
    pl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let out = match x.dtype() {
        DType::F32 => backward::<f32>(op, &dev, x, xl, p, pl, g, gl)?,
        DType::F16 => backward::<half::f16>(op, &dev, x, xl, p, pl, g, gl)?,
        DType::BF16 => backward::<half::bf16>(op, &dev, x, xl, p, pl, g, gl)?,
        other => bail!("excitation backward: unsupported dtype {other:?} on CUDA"),
    };
    Ok((out, Shape::from(xl.shape().elem_count() + op.offsets().len)))
}
