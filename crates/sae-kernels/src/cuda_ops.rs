//! CUDA launches of the kernels in `src/cuda/ops.cu` (the ops other than the excitation), for
//! f32, f16 and bf16: one function per op pass, called from the op modules' `cuda_fwd`.
//!
//! Each launch is what `tests/cuda_on_cpu/ops_harness.cpp` replays on the CPU: one thread per
//! output element in a grid-stride loop, or one block per channel / filter tap for the
//! reductions, [`BLOCK`] threads per block. Operands the kernels read with strides take any
//! layout; the others must be contiguous (the op modules make them so) and are checked here.

use crate::layout::{kernel_suffix, KernelStrides};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, WithDType};

const MODULE: &str = "sae_ops";
/// Threads per block, a multiple of 32 (the reductions' `block_total` needs whole warps).
const BLOCK: u32 = 256;

// SAFETY: plain `repr(C)` integers, laid out as the `Strides4` struct of the `.cu` sources.
unsafe impl DeviceRepr for KernelStrides {}

/// The `Geometry` struct of `common.cuh`: input (N, C, H, W), kernel kh × kw, output OH × OW,
/// stride and padding.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelGeometry {
    pub n: u32,
    pub c: u32,
    pub h: u32,
    pub w: u32,
    pub kh: u32,
    pub kw: u32,
    pub oh: u32,
    pub ow: u32,
    pub stride: u32,
    pub pad: u32,
}

// SAFETY: plain `repr(C)` integers, laid out as the `Geometry` struct of `common.cuh`.
unsafe impl DeviceRepr for KernelGeometry {}

impl KernelGeometry {
    /// The geometry of an op without a window (BatchNorm): only (N, C, H, W) is used.
    pub fn planes(op: &str, layout: &Layout) -> Result<Self> {
        let &[n, c, h, w] = layout.dims() else { bail!("{op}: input must be (N, C, H, W), got {:?}", layout.dims()) };
        Self::new(op, [n, c, h, w], [1, 1], [h, w], 1, 0)
    }

    /// Every size must fit the kernels' 32-bit indices.
    pub fn new(op: &str, x: [usize; 4], k: [usize; 2], out: [usize; 2], stride: usize, pad: usize) -> Result<Self> {
        let sizes = [x[0], x[1], x[2], x[3], k[0], k[1], out[0], out[1], stride, pad];
        let mut v = [0u32; 10];
        for (v, &s) in v.iter_mut().zip(&sizes) {
            let Ok(s) = u32::try_from(s) else {
                bail!("{op}: sizes {sizes:?} exceed the CUDA kernels' 32-bit indices")
            };
            *v = s;
        }
        let [n, c, h, w, kh, kw, oh, ow, stride, pad] = v;
        Ok(Self { n, c, h, w, kh, kw, oh, ow, stride, pad })
    }

    fn input_len(&self) -> usize {
        self.n as usize * self.c as usize * self.h as usize * self.w as usize
    }

    fn output_len(&self) -> usize {
        self.n as usize * self.c as usize * self.oh as usize * self.ow as usize
    }
}

/// One thread per element of `count`, in a grid-stride loop.
fn elementwise(count: usize) -> LaunchConfig {
    let blocks = count.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One block per channel or filter tap.
fn per_block(blocks: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Loads kernel `sae_{kernel}_{dtype}` of `ops.cu` (a macro: Candle does not export the
/// function type to name in a signature).
macro_rules! function {
    ($dev:expr, $op:expr, $kernel:expr, $dtype:expr) => {
        $dev.get_or_load_custom_func(
            &format!("sae_{}_{}", $kernel, kernel_suffix($op, $dtype, "CUDA")?),
            MODULE,
            crate::ptx::OPS,
        )?
    };
}

/// The elements of a contiguous operand from its first one.
fn contiguous<'a, T: CudaDType>(op: &str, what: &str, s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("{op}: the {what} must be contiguous on CUDA, got strides {:?}", l.stride()),
    }
}

fn same_dtype(op: &str, what: &str, x: &CudaStorage, other: &CudaStorage) -> Result<()> {
    if x.dtype() != other.dtype() {
        bail!("{op}: {what} dtype {:?} differs from input dtype {:?}", other.dtype(), x.dtype())
    }
    Ok(())
}

/// Runs `$f::<T>` for the storage's float type.
macro_rules! by_dtype {
    ($op:expr, $storage:expr, $f:ident ( $($arg:expr),* )) => {
        match $storage.dtype() {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            other => bail!("{}: unsupported dtype {other:?} on CUDA", $op),
        }
    };
}

fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

/// conv2d: the unrolled input (C·kh·kw, N·OH·OW) of `x` (any strides).
pub(crate) fn im2col(x: &CudaStorage, xl: &Layout, g: KernelGeometry) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        x: &CudaStorage,
        xl: &Layout,
        g: KernelGeometry,
    ) -> Result<CudaStorage> {
        let dev = x.device();
        let xs = KernelStrides::new("conv2d", "input", xl)?;
        let len = g.kh as usize * g.kw as usize * g.output_len();
        let col = unsafe { dev.alloc::<T>(len)? };
        let f = function!(dev, "conv2d", "im2col", T::DTYPE);
        let mut b = f.builder();
        b.arg(x.as_cuda_slice::<T>()?);
        b.arg(&xs);
        b.arg(&g);
        b.arg(&col);
        unsafe { b.launch(elementwise(len)) }.w()?;
        Ok(wrap(col, dev))
    }
    by_dtype!("conv2d", x, run(x, xl, g))
}

/// conv2d backward: the input gradient (N, C, H, W) from the unrolled gradient (contiguous).
pub(crate) fn col2im(dcol: &CudaStorage, dl: &Layout, g: KernelGeometry) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        d: &CudaStorage,
        dl: &Layout,
        g: KernelGeometry,
    ) -> Result<CudaStorage> {
        let dev = d.device();
        let dcol = contiguous::<T>("conv2d backward", "unrolled gradient", d, dl)?;
        let dx = unsafe { dev.alloc::<T>(g.input_len())? };
        let f = function!(dev, "conv2d backward", "col2im", T::DTYPE);
        let mut b = f.builder();
        b.arg(&dcol);
        b.arg(&g);
        b.arg(&dx);
        unsafe { b.launch(elementwise(g.input_len())) }.w()?;
        Ok(wrap(dx, dev))
    }
    by_dtype!("conv2d backward", dcol, run(dcol, dl, g))
}

/// max_pool2d forward: (N, C, OH, OW).
pub(crate) fn max_pool(x: &CudaStorage, xl: &Layout, g: KernelGeometry) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        x: &CudaStorage,
        xl: &Layout,
        g: KernelGeometry,
    ) -> Result<CudaStorage> {
        let dev = x.device();
        let xs = KernelStrides::new("max_pool2d", "input", xl)?;
        let out = unsafe { dev.alloc::<T>(g.output_len())? };
        let f = function!(dev, "max_pool2d", "max_pool_fwd", T::DTYPE);
        let mut b = f.builder();
        b.arg(x.as_cuda_slice::<T>()?);
        b.arg(&xs);
        b.arg(&g);
        b.arg(&out);
        unsafe { b.launch(elementwise(g.output_len())) }.w()?;
        Ok(wrap(out, dev))
    }
    by_dtype!("max_pool2d", x, run(x, xl, g))
}

/// max_pool2d backward: the input gradient from `x` and the output gradient (any strides).
pub(crate) fn max_pool_backward(
    x: &CudaStorage,
    xl: &Layout,
    grad: &CudaStorage,
    gl: &Layout,
    g: KernelGeometry,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        x: &CudaStorage,
        xl: &Layout,
        grad: &CudaStorage,
        gl: &Layout,
        g: KernelGeometry,
    ) -> Result<CudaStorage> {
        let op = "max_pool2d backward";
        same_dtype(op, "gradient", x, grad)?;
        let dev = x.device();
        let (xs, gs) = (KernelStrides::new(op, "input", xl)?, KernelStrides::new(op, "output gradient", gl)?);
        let dx = unsafe { dev.alloc::<T>(g.input_len())? };
        let f = function!(dev, op, "max_pool_bwd", T::DTYPE);
        let mut b = f.builder();
        b.arg(x.as_cuda_slice::<T>()?);
        b.arg(&xs);
        b.arg(grad.as_cuda_slice::<T>()?);
        b.arg(&gs);
        b.arg(&g);
        b.arg(&dx);
        unsafe { b.launch(elementwise(g.input_len())) }.w()?;
        Ok(wrap(dx, dev))
    }
    by_dtype!("max_pool2d backward", x, run(x, xl, grad, gl, g))
}

/// depthwise_conv2d forward; the weight (C, 1, kh, kw) contiguous.
pub(crate) fn depthwise(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    g: KernelGeometry,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        g: KernelGeometry,
    ) -> Result<CudaStorage> {
        let op = "depthwise_conv2d";
        same_dtype(op, "weight", x, w)?;
        let dev = x.device();
        let xs = KernelStrides::new(op, "input", xl)?;
        let w = contiguous::<T>(op, "weight", w, wl)?;
        let out = unsafe { dev.alloc::<T>(g.output_len())? };
        let f = function!(dev, op, "depthwise_fwd", T::DTYPE);
        let mut b = f.builder();
        b.arg(x.as_cuda_slice::<T>()?);
        b.arg(&xs);
        b.arg(&w);
        b.arg(&g);
        b.arg(&out);
        unsafe { b.launch(elementwise(g.output_len())) }.w()?;
        Ok(wrap(out, dev))
    }
    by_dtype!("depthwise_conv2d", x, run(x, xl, w, wl, g))
}

/// depthwise_conv2d backward: packed `[dx | dweight]`.
pub(crate) fn depthwise_backward(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    grad: &CudaStorage,
    gl: &Layout,
    g: KernelGeometry,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        grad: &CudaStorage,
        gl: &Layout,
        g: KernelGeometry,
    ) -> Result<CudaStorage> {
        let op = "depthwise_conv2d backward";
        same_dtype(op, "weight", x, w)?;
        same_dtype(op, "gradient", x, grad)?;
        let dev = x.device();
        let (xs, gs) = (KernelStrides::new(op, "input", xl)?, KernelStrides::new(op, "output gradient", gl)?);
        let w = contiguous::<T>(op, "weight", w, wl)?;
        let grad = grad.as_cuda_slice::<T>()?;
        let (numel, taps) = (g.input_len(), g.c as usize * g.kh as usize * g.kw as usize);
        let mut out = unsafe { dev.alloc::<T>(numel + taps)? };
        {
            let mut dx = out.slice_mut(0..numel);
            let f = function!(dev, op, "depthwise_bwd_input", T::DTYPE);
            let mut b = f.builder();
            b.arg(&w);
            b.arg(grad);
            b.arg(&gs);
            b.arg(&g);
            b.arg(&mut dx);
            unsafe { b.launch(elementwise(numel)) }.w()?;
        }
        {
            let mut dw = out.slice_mut(numel..);
            let f = function!(dev, op, "depthwise_bwd_weight", T::DTYPE);
            let mut b = f.builder();
            b.arg(x.as_cuda_slice::<T>()?);
            b.arg(&xs);
            b.arg(grad);
            b.arg(&gs);
            b.arg(&g);
            b.arg(&mut dw);
            unsafe { b.launch(per_block(taps)) }.w()?;
        }
        Ok(wrap(out, dev))
    }
    by_dtype!("depthwise_conv2d backward", x, run(x, xl, w, wl, grad, gl, g))
}

/// BatchNorm: per-channel (mean, biased variance) of `x` as 2·C f32 values, means first.
pub(crate) fn channel_stats(x: &CudaStorage, xl: &Layout) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(x: &CudaStorage, xl: &Layout) -> Result<CudaStorage> {
        let op = "batch_norm";
        let g = KernelGeometry::planes(op, xl)?;
        let dev = x.device();
        let xs = KernelStrides::new(op, "input", xl)?;
        let stats = unsafe { dev.alloc::<f32>(2 * g.c as usize)? };
        let f = function!(dev, op, "channel_stats", T::DTYPE);
        let mut b = f.builder();
        b.arg(x.as_cuda_slice::<T>()?);
        b.arg(&xs);
        b.arg(&g);
        b.arg(&stats);
        unsafe { b.launch(per_block(g.c as usize)) }.w()?;
        Ok(wrap(stats, dev))
    }
    by_dtype!("batch_norm", x, run(x, xl))
}

/// Per-channel statistics uploaded for a BatchNorm kernel: (mean, 1/√(var + ε)).
pub(crate) type Statistics<'a> = Option<(&'a [f32], &'a [f32])>;

type DeviceStatistics = Option<(CudaSlice<f32>, CudaSlice<f32>)>;

fn upload(dev: &CudaDevice, stats: Statistics) -> Result<DeviceStatistics> {
    Ok(match stats {
        Some((mean, inv_std)) => Some((dev.clone_htod(mean)?, dev.clone_htod(inv_std)?)),
        None => None,
    })
}

/// The kernels' `mean` and `inv_std` arguments: null pointers without statistics.
fn push_statistics<'a>(b: &mut LaunchArgs<'a>, stats: &'a DeviceStatistics) {
    match stats {
        Some((mean, inv_std)) => {
            b.arg(mean);
            b.arg(inv_std);
        }
        None => {
            b.arg(&0u64);
            b.arg(&0u64);
        }
    }
}

/// BatchNorm forward: `(x − mean)·inv_std·a + b` per channel with `stats`, `x·a + b` without
/// (eval mode's folded scale and shift); then a ReLU when `relu` is set. `a`, `b` contiguous.
#[allow(clippy::too_many_arguments)]
pub(crate) fn channel_affine(
    x: &CudaStorage,
    xl: &Layout,
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    stats: Statistics,
    relu: bool,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        x: &CudaStorage,
        xl: &Layout,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        stats: Statistics,
        relu: bool,
    ) -> Result<CudaStorage> {
        let op = "batch_norm";
        same_dtype(op, "weight", x, a)?;
        same_dtype(op, "bias", x, b)?;
        let g = KernelGeometry::planes(op, xl)?;
        let dev = x.device();
        let xs = KernelStrides::new(op, "input", xl)?;
        let (a, b_) = (contiguous::<T>(op, "weight", a, al)?, contiguous::<T>(op, "bias", b, bl)?);
        let out = unsafe { dev.alloc::<T>(g.input_len())? };
        let stats = upload(dev, stats)?;
        let f = function!(dev, op, "channel_affine", T::DTYPE);
        let mut b = f.builder();
        b.arg(x.as_cuda_slice::<T>()?);
        b.arg(&xs);
        b.arg(&a);
        b.arg(&b_);
        push_statistics(&mut b, &stats);
        candle_core::builder_arg!(b, relu as u32);
        b.arg(&g);
        b.arg(&out);
        unsafe { b.launch(elementwise(g.input_len())) }.w()?;
        Ok(wrap(out, dev))
    }
    by_dtype!("batch_norm", x, run(x, xl, a, al, b, bl, stats, relu))
}

/// BatchNorm backward: packed `[dx | da | db]` from `x`, the per-channel `a` (γ, or the eval
/// scale) and the contiguous output gradient `dy`; `stats` as in [`channel_affine`].
pub(crate) fn channel_affine_backward(
    x: &CudaStorage,
    xl: &Layout,
    a: &CudaStorage,
    al: &Layout,
    dy: &CudaStorage,
    dl: &Layout,
    stats: Statistics,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        x: &CudaStorage,
        xl: &Layout,
        a: &CudaStorage,
        al: &Layout,
        dy: &CudaStorage,
        dl: &Layout,
        stats: Statistics,
    ) -> Result<CudaStorage> {
        let op = "batch_norm backward";
        same_dtype(op, "weight", x, a)?;
        same_dtype(op, "gradient", x, dy)?;
        if dl.dims() != xl.dims() {
            bail!("{op}: gradient shape {:?}, expected {:?}", dl.dims(), xl.dims())
        }
        let g = KernelGeometry::planes(op, xl)?;
        let dev = x.device();
        let xs = KernelStrides::new(op, "input", xl)?;
        let (a, dy) = (contiguous::<T>(op, "weight", a, al)?, contiguous::<T>(op, "output gradient", dy, dl)?);
        let (numel, c) = (g.input_len(), g.c as usize);
        let mut out = unsafe { dev.alloc::<T>(numel + 2 * c)? };
        let sums = unsafe { dev.alloc::<f32>(2 * c)? };
        let stats = upload(dev, stats)?;
        {
            let mut params = out.slice_mut(numel..);
            let f = function!(dev, op, "channel_grad_sums", T::DTYPE);
            let mut b = f.builder();
            b.arg(x.as_cuda_slice::<T>()?);
            b.arg(&xs);
            b.arg(&dy);
            push_statistics(&mut b, &stats);
            b.arg(&g);
            b.arg(&sums);
            b.arg(&mut params);
            unsafe { b.launch(per_block(c)) }.w()?;
        }
        {
            let mut dx = out.slice_mut(0..numel);
            let f = function!(dev, op, "channel_input_grad", T::DTYPE);
            let mut b = f.builder();
            b.arg(x.as_cuda_slice::<T>()?);
            b.arg(&xs);
            b.arg(&dy);
            b.arg(&a);
            push_statistics(&mut b, &stats);
            b.arg(&sums);
            b.arg(&g);
            b.arg(&mut dx);
            unsafe { b.launch(elementwise(numel)) }.w()?;
        }
        Ok(wrap(out, dev))
    }
    by_dtype!("batch_norm backward", x, run(x, xl, a, al, dy, dl, stats))
}

/// `max(x (+ y), 0)` of contiguous operands.
pub(crate) fn relu(x: &CudaStorage, xl: &Layout, y: Option<(&CudaStorage, &Layout)>) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        x: &CudaStorage,
        xl: &Layout,
        y: Option<(&CudaStorage, &Layout)>,
    ) -> Result<CudaStorage> {
        let op = "relu";
        let dev = x.device();
        let count = xl.shape().elem_count();
        let xv = contiguous::<T>(op, "input", x, xl)?;
        let out = unsafe { dev.alloc::<T>(count)? };
        let f = function!(dev, op, "relu_fwd", T::DTYPE);
        let mut b = f.builder();
        b.arg(&xv);
        let yv;
        match y {
            Some((y, yl)) => {
                same_dtype(op, "second operand", x, y)?;
                if yl.shape().elem_count() != count {
                    bail!("add_relu: operand shapes {:?} and {:?} differ", xl.dims(), yl.dims())
                }
                yv = contiguous::<T>(op, "second operand", y, yl)?;
                b.arg(&yv);
            }
            None => {
                b.arg(&0u64);
            }
        }
        b.arg(&count);
        b.arg(&out);
        unsafe { b.launch(elementwise(count)) }.w()?;
        Ok(wrap(out, dev))
    }
    by_dtype!("relu", x, run(x, xl, y))
}

/// `min(max(x, 0), 6)` of a contiguous operand.
pub(crate) fn relu6(x: &CudaStorage, xl: &Layout) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(x: &CudaStorage, xl: &Layout) -> Result<CudaStorage> {
        let op = "relu6";
        let dev = x.device();
        let count = xl.shape().elem_count();
        let xv = contiguous::<T>(op, "input", x, xl)?;
        let out = unsafe { dev.alloc::<T>(count)? };
        let f = function!(dev, op, "relu6_fwd", T::DTYPE);
        let mut b = f.builder();
        b.arg(&xv);
        b.arg(&count);
        b.arg(&out);
        unsafe { b.launch(elementwise(count)) }.w()?;
        Ok(wrap(out, dev))
    }
    by_dtype!("relu6", x, run(x, xl))
}

/// The gradient through a ReLU or ReLU6 from its (contiguous) output and output gradient.
pub(crate) fn activation_backward(
    activation: crate::relu::Activation,
    out: &CudaStorage,
    ol: &Layout,
    dy: &CudaStorage,
    dl: &Layout,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        (op, kernel): (&str, &str),
        out: &CudaStorage,
        ol: &Layout,
        dy: &CudaStorage,
        dl: &Layout,
    ) -> Result<CudaStorage> {
        same_dtype(op, "gradient", out, dy)?;
        let count = ol.shape().elem_count();
        if dl.shape().elem_count() != count {
            bail!("{op}: output has {count} elements, its gradient {}", dl.shape().elem_count())
        }
        let dev = out.device();
        let (o, d) = (contiguous::<T>(op, "output", out, ol)?, contiguous::<T>(op, "output gradient", dy, dl)?);
        let dx = unsafe { dev.alloc::<T>(count)? };
        let f = function!(dev, op, kernel, T::DTYPE);
        let mut b = f.builder();
        b.arg(&o);
        b.arg(&d);
        b.arg(&count);
        b.arg(&dx);
        unsafe { b.launch(elementwise(count)) }.w()?;
        Ok(wrap(dx, dev))
    }
    let kernel = match activation {
        crate::relu::Activation::Relu => "relu_bwd",
        crate::relu::Activation::Relu6 => "relu6_bwd",
    };
    let names = (activation.backward_name(), kernel);
    by_dtype!(names.0, out, run(names, out, ol, dy, dl))
}

/// `x + bias[c]` of a contiguous (N, C, H, W) `x` and its (C) bias.
pub(crate) fn channel_bias(x: &CudaStorage, xl: &Layout, bias: &CudaStorage, bl: &Layout) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        x: &CudaStorage,
        xl: &Layout,
        bias: &CudaStorage,
        bl: &Layout,
    ) -> Result<CudaStorage> {
        let op = "add_channel_bias";
        same_dtype(op, "bias", x, bias)?;
        let g = KernelGeometry::planes(op, xl)?;
        if bl.shape().elem_count() != g.c as usize {
            bail!("{op}: the bias has {} values for {} channels", bl.shape().elem_count(), g.c)
        }
        let dev = x.device();
        let (xv, bv) = (contiguous::<T>(op, "input", x, xl)?, contiguous::<T>(op, "bias", bias, bl)?);
        let count = g.input_len();
        let out = unsafe { dev.alloc::<T>(count)? };
        let f = function!(dev, op, "channel_bias", T::DTYPE);
        let mut b = f.builder();
        b.arg(&xv);
        b.arg(&bv);
        b.arg(&g);
        b.arg(&out);
        unsafe { b.launch(elementwise(count)) }.w()?;
        Ok(wrap(out, dev))
    }
    by_dtype!("add_channel_bias", x, run(x, xl, bias, bl))
}

/// The per-channel sums (C) of a contiguous (N, C, H, W) gradient: a bias's gradient.
pub(crate) fn channel_sums(grad: &CudaStorage, gl: &Layout) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(grad: &CudaStorage, gl: &Layout) -> Result<CudaStorage> {
        let op = "add_channel_bias backward";
        let g = KernelGeometry::planes(op, gl)?;
        let dev = grad.device();
        let gv = contiguous::<T>(op, "gradient", grad, gl)?;
        let sums = unsafe { dev.alloc::<T>(g.c as usize)? };
        let f = function!(dev, op, "channel_sums", T::DTYPE);
        let mut b = f.builder();
        b.arg(&gv);
        b.arg(&g);
        b.arg(&sums);
        unsafe { b.launch(per_block(g.c as usize)) }.w()?;
        Ok(wrap(sums, dev))
    }
    by_dtype!("add_channel_bias backward", grad, run(grad, gl))
}
