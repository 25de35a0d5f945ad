//! Metal launches of the fused excitation kernels (`src/metal/excitation.metal`, compiled from
//! source at first use and cached per device). The launch sequence is the CUDA one of
//! `cuda.rs`, step for step. This file cannot be compiled on Linux (Candle's Metal backend
//! needs Apple's frameworks); its tests run on macOS only.

use super::op::ExcitationOp;
use crate::layout::{kernel_suffix, KernelStrides};
use candle_core::backend::BackendStorage;
use candle_core::{bail, DType, Layout, MetalDevice, MetalError, MetalStorage, Result, Shape};
use candle_metal_kernels::metal::{Buffer, ComputePipeline};
use objc2_metal::MTLSize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

const SOURCE: &str = include_str!("../metal/excitation.metal");
const THREADS: usize = 256;

/// Pipelines by (device id, kernel name).
fn pipeline(dev: &MetalDevice, name: &str) -> Result<ComputePipeline> {
    static CACHE: OnceLock<Mutex<HashMap<(String, String), ComputePipeline>>> = OnceLock::new();
    let key = (format!("{:?}", dev.id()), name.to_string());
    let mut cache = CACHE.get_or_init(Default::default).lock().map_err(MetalError::from)?;
    if let Some(p) = cache.get(&key) {
        return Ok(p.clone());
    }
    let lib = dev.device().new_library_with_source(SOURCE, None).map_err(MetalError::from)?;
    let func = lib.get_function(name, None).map_err(MetalError::from)?;
    let p = dev.device().new_compute_pipeline_state_with_function(&func).map_err(MetalError::from)?;
    cache.insert(key, p.clone());
    Ok(p)
}

fn suffix(dtype: DType) -> Result<&'static str> {
    kernel_suffix("excitation", dtype, "Metal")
}

fn strides(what: &str, layout: &Layout) -> Result<KernelStrides> {
    KernelStrides::new("excitation", what, layout)
}

/// One argument of a kernel launch.
enum Arg<'a> {
    In(&'a Buffer, usize),
    Out(&'a Buffer, usize),
    U32(u32),
    U64(u64),
    Strides(KernelStrides),
}

/// Encodes one dispatch of `name` over `groups` threadgroups of 256 threads.
fn launch(dev: &MetalDevice, name: &str, args: &[Arg], groups: usize, shared_floats: usize) -> Result<()> {
    let p = pipeline(dev, name)?;
    let encoder = dev.command_encoder()?;
    encoder.set_label(name);
    encoder.set_compute_pipeline_state(&p);
    let enc = encoder.as_ref();
    for (i, arg) in args.iter().enumerate() {
        match arg {
            Arg::In(b, off) => enc.set_input_buffer(i, Some(b), *off),
            Arg::Out(b, off) => enc.set_output_buffer(i, Some(b), *off),
            Arg::U32(v) => enc.set_bytes(i, v),
            Arg::U64(v) => enc.set_bytes(i, v),
            Arg::Strides(s) => enc.set_bytes(i, s),
        }
    }
    if shared_floats > 0 {
        enc.set_threadgroup_memory_length(0, shared_floats * 4);
    }
    let grid = MTLSize { width: groups, height: 1, depth: 1 };
    let tg = MTLSize { width: THREADS, height: 1, depth: 1 };
    enc.dispatch_thread_groups(grid, tg);
    Ok(())
}

fn buffer(dev: &MetalDevice, floats: usize, dtype: DType, label: &str) -> Result<Arc<Buffer>> {
    dev.new_buffer_builder().with_size_for(floats, dtype).with_label(label).build()
}

/// Runs the plane sums and gates kernels: returns (mean_x, sum_gx, h, s) buffers of f32.
fn pool_and_gate(
    op: &ExcitationOp,
    dev: &MetalDevice,
    x: &MetalStorage,
    xl: &Layout,
    p: &MetalStorage,
    pl: &Layout,
    grad: Option<(&MetalStorage, &Layout)>,
) -> Result<[Arc<Buffer>; 4]> {
    let &[n, c, h, w] = xl.dims() else { bail!("excitation: input must be (N, C, H, W), got {:?}", xl.dims()) };
    let sfx = suffix(x.dtype())?;
    let mean_x = buffer(dev, n * c, DType::F32, "sae-mean")?;
    let sum_gx = buffer(dev, n * c, DType::F32, "sae-sum-gx")?;
    let hid = buffer(dev, n * op.hidden, DType::F32, "sae-hidden")?;
    let s = buffer(dev, n * c, DType::F32, "sae-gates")?;
    let xs = strides("input", xl)?;
    let (g_buf, g_strides, has_grad) = match grad {
        Some((g, gl)) => (g.buffer(), strides("output gradient", gl)?, 1),
        None => (x.buffer(), xs, 0),
    };
    let (cu, hu, wu) = (c as u32, h as u32, w as u32);
    let args = [
        Arg::In(x.buffer(), 0),
        Arg::Strides(xs),
        Arg::In(g_buf, 0),
        Arg::Strides(g_strides),
        Arg::U32(has_grad),
        Arg::U32(cu),
        Arg::U32(hu),
        Arg::U32(wu),
        Arg::Out(&mean_x, 0),
        Arg::Out(&sum_gx, 0),
    ];
    launch(dev, &format!("sae_plane_sums_{sfx}"), &args, n * c, 0)?;
    let p_off = pl.start_offset() * p.dtype().size_in_bytes();
    let args = [
        Arg::In(p.buffer(), p_off),
        Arg::In(&mean_x, 0),
        Arg::U32(cu),
        Arg::U32(op.hidden as u32),
        Arg::Out(&hid, 0),
        Arg::Out(&s, 0),
    ];
    launch(dev, &format!("sae_gates_{sfx}"), &args, n, c + op.hidden)?;
    Ok([mean_x, sum_gx, hid, s])
}

/// Forward pass on Metal.
pub(crate) fn excitation_forward(
    op: &ExcitationOp,
    x: &MetalStorage,
    xl: &Layout,
    p: &MetalStorage,
    pl: &Layout,
) -> Result<(MetalStorage, Shape)> {
    let dev = x.device().clone();
    let &[_, c, h, w] = xl.dims() else { bail!("excitation: input must be (N, C, H, W), got {:?}", xl.dims()) };
    let [_, _, _, s] = pool_and_gate(op, &dev, x, xl, p, pl, None)?;
    let numel = xl.shape().elem_count();
    let out = buffer(&dev, numel, x.dtype(), "sae-excitation")?;
    let args = [
        Arg::In(x.buffer(), 0),
        Arg::Strides(strides("input", xl)?),
        Arg::In(&s, 0),
        Arg::U32(op.gate.code()),
        Arg::U32(c as u32),
        Arg::U32(h as u32),
        Arg::U32(w as u32),
        Arg::U64(numel as u64),
        Arg::Out(&out, 0),
    ];
    launch(&dev, &format!("sae_scale_{}", suffix(x.dtype())?), &args, numel.div_ceil(THREADS), 0)?;
    Ok((MetalStorage::new(out, dev, numel, x.dtype()), xl.shape().clone()))
}

/// Backward pass on Metal: packed `[dx | dparams]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn excitation_backward(
    op: &ExcitationOp,
    x: &MetalStorage,
    xl: &Layout,
    p: &MetalStorage,
    pl: &Layout,
    g: &MetalStorage,
    gl: &Layout,
) -> Result<(MetalStorage, Shape)> {
    let dev = x.device().clone();
    let &[n, c, h, w] = xl.dims() else { bail!("excitation: input must be (N, C, H, W), got {:?}", xl.dims()) };
    if gl.dims() != xl.dims() {
        bail!("excitation backward: gradient shape {:?} differs from input shape {:?}", gl.dims(), xl.dims())
    }
    let sfx = suffix(x.dtype())?;
    let [z, sum_gx, hid, s] = pool_and_gate(op, &dev, x, xl, p, pl, Some((g, gl)))?;
    let da = buffer(&dev, n * c, DType::F32, "sae-da")?;
    let dh = buffer(&dev, n * op.hidden, DType::F32, "sae-dh")?;
    let dz = buffer(&dev, n * c, DType::F32, "sae-dz")?;
    let p_off = pl.start_offset() * p.dtype().size_in_bytes();
    let (cu, hidden) = (c as u32, op.hidden as u32);
    let args = [
        Arg::In(p.buffer(), p_off),
        Arg::In(&sum_gx, 0),
        Arg::In(&s, 0),
        Arg::In(&hid, 0),
        Arg::U32(cu),
        Arg::U32(hidden),
        Arg::Out(&da, 0),
        Arg::Out(&dh, 0),
        Arg::Out(&dz, 0),
    ];
    launch(&dev, &format!("sae_dense_bwd_{sfx}"), &args, n, 2 * op.hidden + c)?;

    let numel = xl.shape().elem_count();
    let params = op.offsets().len;
    let out = buffer(&dev, numel + params, x.dtype(), "sae-excitation-grad")?;
    let args = [
        Arg::In(g.buffer(), 0),
        Arg::Strides(strides("output gradient", gl)?),
        Arg::In(&s, 0),
        Arg::In(&dz, 0),
        Arg::U32(op.gate.code()),
        Arg::U32(cu),
        Arg::U32(h as u32),
        Arg::U32(w as u32),
        Arg::U64(numel as u64),
        Arg::Out(&out, 0),
    ];
    launch(&dev, &format!("sae_input_grad_{sfx}"), &args, numel.div_ceil(THREADS), 0)?;
    let args = [
        Arg::In(&z, 0),
        Arg::In(&hid, 0),
        Arg::In(&da, 0),
        Arg::In(&dh, 0),
        Arg::U32(n as u32),
        Arg::U32(cu),
        Arg::U32(hidden),
        Arg::Out(&out, numel * x.dtype().size_in_bytes()),
    ];
    launch(&dev, &format!("sae_param_grads_{sfx}"), &args, params.div_ceil(THREADS), 0)?;
    Ok((MetalStorage::new(out, dev, numel + params, x.dtype()), Shape::from(numel + params)))
}
