//! CPU helpers shared by the kernels: element conversion, storage access and vectorisable
//! dot/axpy loops, and the matrix multiply.

use crate::gemm_bf16::{gemm_block_of, ImplicitOperand};
use crate::layout::Strided4;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;
use std::borrow::Cow;

/// An element type the CPU kernels accept; arithmetic is always done in `f32`.
pub(crate) trait Elem: WithDType + Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// The slice itself when the type is `f32`, so `f32` data is never copied to convert it.
    fn as_f32_slice(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
    /// The same for a slice to write into.
    fn as_f32_slice_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        let _ = s;
        None
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    fn as_f32_slice(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_slice_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    /// Round to nearest even without branches (a select for NaN), where `half`'s
    /// `bf16::from_f32` branches per element; no end-to-end speed-up was measurable. Equal to
    /// it on every input (tested), NaN becoming the canonical quiet NaN.
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        let bits = v.to_bits();
        let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
        bf16::from_bits(if v.is_nan() { 0x7FC0 } else { rounded })
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Runs `$body` with `$t` bound to the element type of `$storage` (f32, bf16 or f16) and
/// `$slice` bound to its data; other dtypes are an error naming the op.
macro_rules! dispatch_float {
    ($op:expr, $storage:expr, |$slice:ident : $t:ident| $body:expr) => {
        match $storage {
            candle_core::CpuStorage::F32($slice) => {
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::BF16($slice) => {
                type $t = half::bf16;
                $body
            }
            candle_core::CpuStorage::F16($slice) => {
                type $t = half::f16;
                $body
            }
            other => candle_core::bail!(
                "{}: unsupported dtype {:?}",
                $op,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}
pub(crate) use dispatch_float;

/// Borrows the data of a second storage with the same element type as the first.
pub(crate) fn same_dtype<'a, T: Elem>(op: &str, storage: &'a CpuStorage) -> Result<&'a [T]> {
    match T::cpu_storage_as_slice(storage) {
        Ok(s) => Ok(s),
        Err(_) => bail!("{op}: operands must share one dtype, expected {:?} but got {:?}", T::DTYPE, storage.dtype()),
    }
}

/// Elements per rayon task of the element-wise conversions.
const CONVERT_CHUNK: usize = 1 << 15;

/// The elements of a contiguous storage converted to `dtype` (f32, bf16 or f16), in parallel.
pub(crate) fn convert_storage(storage: &CpuStorage, layout: &Layout, dtype: DType) -> Result<CpuStorage> {
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("dtype conversion: input must be contiguous") };
    fn to<U: Elem>(storage: &CpuStorage, range: std::ops::Range<usize>) -> Result<Vec<U>> {
        Ok(dispatch_float!("dtype conversion", storage, |s: T| convert::<T, U>(&s[range])))
    }
    let range = start..end;
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(to::<f32>(storage, range)?),
        DType::BF16 => CpuStorage::BF16(to::<bf16>(storage, range)?),
        DType::F16 => CpuStorage::F16(to::<f16>(storage, range)?),
        other => bail!("dtype conversion: {other:?} is not a float type the CPU kernels take"),
    })
}

/// `src` converted element by element (rounding to nearest even when narrowing), in parallel.
pub(crate) fn convert<T: Elem, U: Elem>(src: &[T]) -> Vec<U> {
    let mut out = uninit::<U>(src.len());
    out.par_chunks_mut(CONVERT_CHUNK).zip(src.par_chunks(CONVERT_CHUNK)).for_each(|(o, s)| copy_converted(s, o));
    out
}

/// `s` as a slice of `U` when `U` is `T` (the element types are told apart by their dtype).
pub(crate) fn same_type<T: Elem, U: Elem>(s: &[T]) -> Option<&[U]> {
    // SAFETY: equal dtypes are the same Rust type among the `Elem` types (f32, bf16, f16).
    (T::DTYPE == U::DTYPE).then(|| unsafe { std::slice::from_raw_parts(s.as_ptr() as *const U, s.len()) })
}

/// Conversions shorter than this run in the crate's baseline code: the unrolled rows of small
/// images (2–8 values) cost more in the call into [`vectorized!`] code than in the loop.
const SHORT_CONVERSION: usize = 16;

/// `dst[i] = src[i]` converted (as many as the shorter has): a plain copy (`memcpy`) between
/// equal types, which the element loop does not become.
#[inline]
pub(crate) fn copy_converted<T: Elem, U: Elem>(src: &[T], dst: &mut [U]) {
    let n = src.len().min(dst.len());
    if let Some(s) = same_type::<T, U>(&src[..n]) {
        dst[..n].copy_from_slice(s);
        return;
    }
    if n < SHORT_CONVERSION {
        return convert_elements(&src[..n], &mut dst[..n]);
    }
    vectorized!(convert_elements(&src[..n], &mut dst[..n]));
}

/// The conversion loop of [`copy_converted`]: in [`vectorized!`] code 16 lanes wide (writing a
/// bf16 convolution's f32 output took 5.6 % of a SENetV2-ResNet-50 bf16 inference step on the
/// AMD EPYC in the baseline's SSE2 code).
#[inline(always)]
fn convert_elements<T: Elem, U: Elem>(src: &[T], dst: &mut [U]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = U::from_f32(s.to_f32()));
}

/// `vectorized!(body)` runs `body` compiled for AVX-512 where the CPU has it (16 f32 lanes),
/// else for AVX2 and FMA (8), else as the crate is built: x86-64's baseline SSE2, 4 lanes, in
/// which the compiler vectorizes every plain loop of this crate otherwise. The results are the
/// same bits on every path: the code is the same, and Rust neither fuses a multiply and an add
/// nor reorders floating-point operations when it vectorizes. What `body` calls is compiled
/// this way only where it is inlined into it: loops in called functions need
/// `#[inline(always)]`. (A macro, so that the body's closure is always inlined into each
/// target's copy; called from three places, the compiler would otherwise keep one copy, built
/// for the baseline.)
macro_rules! vectorized {
    ($($body:tt)*) => {
        $crate::cpu::run_vectorized(#[inline(always)] || { $($body)* })
    };
}
pub(crate) use vectorized;

/// Set, [`vectorized!`] runs the baseline build's code on every CPU: the tests compare the
/// two paths on whatever machine runs them.
#[cfg(test)]
pub(crate) static BASELINE_VECTORS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The dispatch of [`vectorized!`].
#[inline(always)]
pub(crate) fn run_vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(test)]
    if BASELINE_VECTORS.load(std::sync::atomic::Ordering::Relaxed) {
        return f();
    }
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { run_avx512(f) };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: as above.
            return unsafe { run_avx2(f) };
        }
    }
    f()
}

/// # Safety
/// The CPU must have AVX-512F, BW, VL and DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `data` as f32: the slice itself when `T` is f32, otherwise converted into `buf`.
#[inline(always)]
pub(crate) fn read_f32<'a, T: Elem>(data: &'a [T], buf: &'a mut Vec<f32>) -> &'a [f32] {
    match T::as_f32_slice(data) {
        Some(f) => f,
        None => {
            if buf.len() != data.len() {
                *buf = uninit::<f32>(data.len());
            }
            copy_converted(data, buf);
            buf
        }
    }
}

/// Plane (n, c) of `x` as f32: the data itself when it is a contiguous f32 plane, otherwise
/// converted (or gathered, when strided) into `buf`.
#[inline(always)]
pub(crate) fn plane_f32<'a, T: Elem>(
    x: &'a [T],
    xs: &Strided4,
    n: usize,
    c: usize,
    buf: &'a mut Vec<f32>,
) -> &'a [f32] {
    match xs.contiguous_plane(x, n, c) {
        Some(p) => read_f32(p, buf),
        None => {
            buf.resize(xs.plane_len(), 0.0);
            xs.for_each_in_plane(x, n, c, |k, v| buf[k] = v.to_f32());
            buf
        }
    }
}

/// Lets `fill` write `out` in f32: into `out` itself when `T` is f32, otherwise into `buf`
/// (resized to `out`'s length, contents unspecified), converted into `out` afterwards.
#[inline(always)]
pub(crate) fn write_f32<T: Elem, R>(out: &mut [T], buf: &mut Vec<f32>, fill: impl FnOnce(&mut [f32]) -> R) -> R {
    if let Some(f) = T::as_f32_slice_mut(out) {
        return fill(f);
    }
    if buf.len() != out.len() {
        *buf = uninit::<f32>(out.len());
    }
    let r = fill(buf);
    copy_converted(buf, out);
    r
}

/// `y += alpha * x`.
#[inline]
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// A contiguous storage's data as `f32`: borrowed when it already is `f32`, converted
/// otherwise. The public op functions make small operands (weights) contiguous first.
pub(crate) fn as_f32<'a, T: Elem>(op: &str, what: &str, data: &'a [T], layout: &Layout) -> Result<Cow<'a, [f32]>> {
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{op}: {what} must be contiguous") };
    let data = &data[start..end];
    Ok(match T::as_f32_slice(data) {
        Some(f) => Cow::Borrowed(f),
        None => Cow::Owned(data.iter().map(|v| v.to_f32()).collect()),
    })
}

/// The weights of an op on `T` inputs, as f32: weights of type `T` converted (in parallel),
/// or f32 master weights of mixed-precision training borrowed as they are.
pub(crate) fn weight_as_f32<'a, T: Elem>(op: &str, w: &'a CpuStorage, layout: &Layout) -> Result<Cow<'a, [f32]>> {
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{op}: the weight must be contiguous") };
    Ok(match w {
        CpuStorage::F32(w) => Cow::Borrowed(&w[start..end]),
        _ => Cow::Owned(convert::<T, f32>(&same_dtype::<T>(op, w)?[start..end])),
    })
}

/// The elements of a contiguous tensor.
pub(crate) fn contiguous<'a, T>(op: &str, what: &str, data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the {what} must be contiguous"),
    }
}

/// All of a storage's `f32` data, to be read with its layout (any strides).
pub(crate) fn f32_storage<'a>(op: &str, what: &str, storage: &'a CpuStorage) -> Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(v) => Ok(v),
        other => bail!("{op}: the CPU kernel takes f32, but the {what} is {:?}", other.dtype()),
    }
}

/// The elements of a contiguous `f32` tensor.
pub(crate) fn f32_contiguous<'a>(op: &str, what: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    contiguous(op, what, f32_storage(op, what, storage)?, layout)
}

/// The elements of a contiguous `f32` tensor, to update in place.
pub(crate) fn f32_contiguous_mut<'a>(
    op: &str,
    what: &str,
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&mut v[start..end]),
        _ => bail!("{op}: the {what} must be contiguous f32"),
    }
}

/// Minimum number of elements of work per rayon task, so that tiny planes are batched.
pub(crate) fn min_planes_per_task(plane_len: usize) -> usize {
    (8192 / plane_len.max(1)).max(1)
}

/// A strided read-only matrix view: element (i, j) is `data[i * rs + j * cs]`. The right
/// operand of a product may be bf16 (see [`matmul_threads`]); everything else is f32.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T = f32> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

/// How a matrix multiply computes its products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Products {
    /// f32 multiplies (the `gemm` crate).
    F32,
    /// bf16 multiplies with f32 sums ([`crate::gemm_bf16`]: AMX tiles or AVX-512 BF16 dot
    /// products); the operands must hold bf16 values, which packing then takes exactly.
    Bf16,
}

impl Products {
    /// bf16 multiplies for operands of type `T` where `T` is bf16 and the CPU has AVX-512
    /// BF16 (the same values and f32 sums; faster than f32 with AMX tiles and with the EPYC's
    /// dot products, slower with the Xeon's dot products alone: see `gemm_bf16`); f32
    /// multiplies otherwise.
    pub(crate) fn for_operands<T: Elem>() -> Self {
        if T::DTYPE == candle_core::DType::BF16 && crate::gemm_bf16::available() {
            Products::Bf16
        } else {
            Products::F32
        }
    }
}

/// `out (m × n, row-major) = [out +] a (m × k) · b (k × n)` through the `gemm` crate (the
/// matrix multiply Candle uses), or with bf16 dot products as `products` allows, parallel on
/// the current rayon pool.
///
/// The output is split into one block of columns (or of rows, when it has few columns) per
/// thread, each multiplied single-threaded. The `gemm` crate's own threading loses up to half
/// its speed on the thin products convolutions make (64 output channels × thousands of
/// pixels): 33 vs 71 GFLOP/s for 64 × 16384 × 576 on the 2-core machine of
/// `results/train-speed.md`, and the split is never markedly slower on the shapes of ResNet-50.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<B: Elem>(
    products: Products,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat<B>,
    out: &mut [f32],
    accumulate: bool,
) {
    matmul_threads(products, rayon::current_num_threads(), m, n, k, a, b, out, accumulate)
}

/// The least depth (`k`) of a product that the bf16 kernel takes on AMX tiles (see
/// [`matmul_threads`]).
const BF16_MIN_DEPTH_AMX: usize = 128;
/// The same with AVX-512 BF16 dot products.
const BF16_MIN_DEPTH_DOT: usize = 32;
/// The most `32/rows + 32/columns` of a block that the bf16 kernel takes on AMX tiles: the
/// cost of packing both operands against the block's multiplies (see [`matmul_threads`]).
const BF16_MAX_BLOCK_COST_AMX: f64 = 0.6;
/// The same with AVX-512 BF16 dot products.
const BF16_MAX_BLOCK_COST_DOT: f64 = 0.8;

/// [`matmul`] on at most `threads` threads (1: on the calling thread only, for callers that
/// already run one multiply per rayon task).
///
/// `b` may be bf16 (a bf16 convolution's unrolled input, as it is stored): the bf16 kernel
/// packs it as it is, without a pass that widens it to f32 first, and the `gemm` crate gets it
/// widened block by block where that kernel is taken.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_threads<B: Elem>(
    products: Products,
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat<B>,
    out: &mut [f32],
    accumulate: bool,
) {
    let (last_a, last_b) =
        ((m.max(1) - 1) * a.rs + (k.max(1) - 1) * a.cs, (k.max(1) - 1) * b.rs + (n.max(1) - 1) * b.cs);
    assert!(m * n <= out.len(), "matmul: output too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].iter_mut().for_each(|v| *v = 0.0);
        }
        return;
    }
    assert!(last_a < a.data.len() && last_b < b.data.len(), "matmul: view out of bounds");
    let split = Split::new(threads, m, n, k);
    // The bf16 kernel rounds and repacks both operands on every call: packing `b` costs
    // about as much as a dozen of its rows of multiplies, packing `a` as a dozen of its
    // columns, so it pays only for blocks with many of both: inference's small late-stage
    // images (25 columns) stay on `gemm`. The limit on `32/rows + 32/columns` of a block is
    // 0.6 on AMX (64 rows and at least 320 columns; 1.0 was no faster): on the Xeon,
    // alternating `xtask bench-train-row senetv2_resnet50 140 16 infer fused bf16` runs took
    // 0.200–0.210 s at 0.5 and 0.186–0.191 s at 0.6, training at 140×140 and 32×32 no slower.
    // With `vdpbf16ps` it is 0.8, which takes the 128 × 64 row blocks of layer 3's products
    // at 32×32 (their 64 columns are the batch's pixels; on `gemm` the forward's bf16 unrolled
    // input is widened to f32 first): on the AMD EPYC, six alternating pairs of
    // `bench-train-row resnet50 32 16 train fused bf16 3`, steps 95.1–100.2 ms at 0.6 against
    // 88.0–92.4 ms at 0.8 (and one of 139.6 in a slow spell; backward 54.1–57.5 → 48.7–51.0);
    // 140×140 training and inference take the same products at either limit but for a few
    // per-image weight gradients. The depth matters as well: AMX pads it to 32 and loads and
    // stores its 32×32 block of `out` once per block of depth, which shallow products (the
    // weight gradients of small images, depth = the batch's pixels) do not repay: below a depth
    // of 128 they stay on `gemm` (on the Xeon a 32×32 ResNet-50 bf16 training step 5 % faster:
    // 0.149 → 0.137–0.144 s; 64: 0.142–0.147, 256: 0.140–0.147). `vdpbf16ps` keeps its tile in
    // registers and takes products from a depth of 32 (layer 1's 64-deep 1×1 convolutions): on
    // the AMD EPYC, where it runs at twice the f32 rate, a SENetV2-ResNet-50 140×140 bf16
    // training step took 0.95/0.88/0.87 s against 1.07/0.95/1.00 s with the Xeon's old limits
    // (0.5, 128) in alternating runs, and 0.89/0.90/0.94 s at a depth of 64; batch-16 inference
    // 0.24–0.28 s against 0.26–0.32.
    let multiply: unsafe fn(usize, usize, usize, Mat, Mat<B>, *mut f32, usize, bool) =
        if products == Products::Bf16 && split.bf16_kernel_pays(m, n, k) {
            crate::gemm_bf16::gemm_block
        } else {
            gemm_block_widened
        };
    let out = out.as_mut_ptr() as usize;
    split.run(|start, size| {
        let out = out as *mut f32;
        // SAFETY: the asserts above keep every index the views and the output describe in
        // bounds; `out` is exclusively borrowed and does not alias the inputs; the bf16
        // kernel is chosen only where the CPU has it; the blocks are disjoint column (or row)
        // ranges of `out`, so no two tasks write the same element.
        unsafe {
            if split.split_columns {
                let b = Mat { data: &b.data[start * b.cs..], ..b };
                multiply(m, size, k, a, b, out.add(start), n, accumulate)
            } else {
                let a = Mat { data: &a.data[start * a.rs..], ..a };
                multiply(size, n, k, a, b, out.add(start * n), n, accumulate)
            }
        }
    });
}

/// How [`matmul_threads`] divides a product among threads: into `len.div_ceil(block)` blocks
/// of columns (`split_columns`) or rows, or none (`single`).
#[derive(Clone, Copy)]
struct Split {
    single: bool,
    split_columns: bool,
    len: usize,
    block: usize,
}

impl Split {
    fn new(threads: usize, m: usize, n: usize, k: usize) -> Self {
        let single = m * n * k < 1 << 16 || threads <= 1;
        let split_columns = n >= m || n >= 64 * threads;
        let len = if split_columns { n } else { m };
        Self { single, split_columns, len, block: if single { len } else { len.div_ceil(threads) } }
    }

    /// Runs `task(start, size)` for every block: here where the split is `single`, else one
    /// rayon task per block.
    fn run(&self, task: impl Fn(usize, usize) + Sync) {
        if self.single {
            return task(0, self.len);
        }
        let task = &task;
        rayon::scope(|s| {
            for start in (0..self.len).step_by(self.block) {
                s.spawn(move |_| task(start, self.block.min(self.len - start)));
            }
        });
    }

    /// Whether the bf16 kernel takes a block of this split (see [`matmul_threads`]).
    fn bf16_kernel_pays(&self, m: usize, n: usize, k: usize) -> bool {
        let (block_rows, block_cols) = if self.split_columns { (m, self.block) } else { (self.block, n) };
        let (max_cost, min_depth) = if crate::gemm_bf16::amx_available() {
            (BF16_MAX_BLOCK_COST_AMX, BF16_MIN_DEPTH_AMX)
        } else {
            (BF16_MAX_BLOCK_COST_DOT, BF16_MIN_DEPTH_DOT)
        };
        let cost = 32.0 / block_rows as f64 + 32.0 / block_cols as f64;
        crate::gemm_bf16::available() && cost <= max_cost && k >= min_depth
    }
}

/// Whether [`matmul_threads_unrolled`] takes an `m × n × k` product on `threads` threads (the
/// bf16 kernel on this CPU, blocks large enough to repay its packing).
pub(crate) fn bf16_kernel_takes(threads: usize, m: usize, n: usize, k: usize) -> bool {
    m > 0 && n > 0 && Split::new(threads, m, n, k).bf16_kernel_pays(m, n, k)
}

/// [`matmul_threads`] with bf16 products and `b` bf16 images' unrolled input or its transpose,
/// packed straight from the images ([`crate::gemm_bf16::Unrolled`], [`crate::gemm_bf16::UnrolledT`]):
/// `out (m × n) [+]= a (m × k) · b`. Returns false, having done nothing, where the bf16 kernel
/// would not take the product (the caller then unrolls the images and calls
/// [`matmul_threads`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_threads_unrolled<B: ImplicitOperand>(
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: B,
    out: &mut [f32],
    accumulate: bool,
) -> bool {
    if !bf16_kernel_takes(threads, m, n, k) {
        return false;
    }
    let split = Split::new(threads, m, n, k);
    assert!(m * n <= out.len(), "matmul: output too small");
    assert!((m - 1) * a.rs + (k - 1) * a.cs < a.data.len(), "matmul: view out of bounds");
    assert!(b.fits(k, n), "matmul: unrolled image out of bounds");
    let out = out.as_mut_ptr() as usize;
    split.run(|start, size| {
        let out = out as *mut f32;
        // SAFETY: the asserts above keep every view in bounds, `bf16_kernel_pays` checked the
        // CPU; each task writes its own column (or row) range of `out`, which no input aliases.
        unsafe {
            if split.split_columns {
                gemm_block_of(m, size, k, a, &b.columns_from(start), out.add(start), n, accumulate)
            } else {
                let a = Mat { data: &a.data[start * a.rs..], ..a };
                gemm_block_of(size, n, k, a, &b, out.add(start * n), n, accumulate)
            }
        }
    });
    true
}

/// [`gemm_block`] with a `b` of any element type: f32 as it is, other types widened to a
/// row-major f32 copy first.
///
/// # Safety
/// As [`gemm_block`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block_widened<B: Elem>(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat<B>,
    out: *mut f32,
    out_rs: usize,
    accumulate: bool,
) {
    if let Some(data) = B::as_f32_slice(b.data) {
        // SAFETY: the caller's contract.
        return unsafe { gemm_block(m, n, k, a, Mat { data, rs: b.rs, cs: b.cs }, out, out_rs, accumulate) };
    }
    let mut wide = uninit::<f32>(k * n);
    for (p, row) in wide.chunks_exact_mut(n).enumerate() {
        if b.cs == 1 {
            copy_converted(&b.data[p * b.rs..][..n], row);
        } else {
            row.iter_mut().enumerate().for_each(|(j, v)| *v = b.data[p * b.rs + j * b.cs].to_f32());
        }
    }
    // SAFETY: the caller's contract; `wide` is the k × n view of `b`.
    unsafe { gemm_block(m, n, k, a, Mat { data: &wide, rs: n, cs: 1 }, out, out_rs, accumulate) }
}

/// One single-threaded `gemm` call writing an `m × n` block whose rows are `out_rs` apart.
///
/// # Safety
/// The views and the `m × n` block at `out` must be in bounds, and `out` must not alias them
/// or be written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block(m: usize, n: usize, k: usize, a: Mat, b: Mat, out: *mut f32, out_rs: usize, accumulate: bool) {
    if n < NARROW && m > n && a.rs == 1 {
        // SAFETY: the caller's contract.
        return unsafe { gemm_narrow(m, n, k, a, b, out, out_rs, accumulate) };
    }
    // SAFETY: the caller's contract.
    unsafe { gemm_strided(m, n, k, a, b, out, 1, out_rs, accumulate) }
}

/// Columns below which [`gemm_block`] multiplies into a column-major buffer when `a` is
/// column-major. The `gemm` crate lays its micro-tiles out along the output's contiguous
/// dimension, up to 64 (four AVX-512 vectors) long, so a row-major output only 16 wide gets
/// 16-long tiles that wait on loads (its `x1x6` kernel took 11 % of a 32×32 ResNet-50 training
/// step on the Xeon, where layer 4's unrolled batch is 16 columns wide). A column-major output
/// turns the tiles along `m`; `a` is then the operand the crate packs, which is fast only
/// when its columns are contiguous (the input gradient's `Wᵀ`): with a row-major `a` (the
/// forward's `W`) the forward step got 25 % slower. `xtask bench-train-row resnet50 32 16
/// train fused f32|bf16 4`, alternating on the Xeon: backward 2–6 % faster, no change at 140×140
/// (no product there is this narrow).
const NARROW: usize = 64;

/// [`gemm_block`] through a column-major `m × n` buffer, transposed into `out` afterwards
/// (`m·n` copies against `m·n·k` multiplies).
///
/// # Safety
/// As [`gemm_block`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_narrow(m: usize, n: usize, k: usize, a: Mat, b: Mat, out: *mut f32, out_rs: usize, accumulate: bool) {
    let mut column_major = uninit::<f32>(m * n);
    if accumulate {
        for i in 0..m {
            for j in 0..n {
                // SAFETY: the caller's contract keeps the `m × n` block at `out` in bounds.
                column_major[j * m + i] = unsafe { *out.add(i * out_rs + j) };
            }
        }
    }
    // SAFETY: the buffer is `m × n` with rows 1 and columns `m` apart; the views are the
    // caller's.
    unsafe { gemm_strided(m, n, k, a, b, column_major.as_mut_ptr(), m, 1, accumulate) };
    for i in 0..m {
        for j in 0..n {
            // SAFETY: as above.
            unsafe { *out.add(i * out_rs + j) = column_major[j * m + i] };
        }
    }
}

/// One single-threaded `gemm` call: `out` (element `(i, j)` at `i·out_rs + j·out_cs`) `[+]=`
/// `a · b`.
///
/// # Safety
/// As [`gemm_block`], for the block these strides describe.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    out: *mut f32,
    out_cs: usize,
    out_rs: usize,
    accumulate: bool,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            out_cs as isize,
            out_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// A gradient a backward op computes beside its output, in another dtype than the output
/// (f32 for the f32 master weights of a bf16 input): a custom op returns one storage of one
/// dtype, so its CPU kernel leaves this one here for the op's `bwd` to take.
#[derive(Debug, Default)]
pub(crate) struct GradientSlot(std::sync::Mutex<Option<Tensor>>);

impl GradientSlot {
    /// Leaves `gradient` in the slot (`op` names the kernel in errors).
    pub(crate) fn put(&self, op: &str, gradient: Tensor) -> Result<()> {
        match self.0.lock() {
            Ok(mut slot) => *slot = Some(gradient),
            Err(_) => bail!("{op}: the gradient slot is poisoned"),
        }
        Ok(())
    }

    /// The gradient the kernel left, or an error naming `op` if it left none.
    pub(crate) fn take(self, op: &str) -> Result<Tensor> {
        match self.0.into_inner() {
            Ok(Some(gradient)) => Ok(gradient),
            _ => bail!("{op}: the kernel left no gradient in its slot"),
        }
    }

    /// A CPU backward kernel's result: `dx` (`out`, `numel` values) as the op's output, and
    /// the parameters' gradient (`dparams`, f32) left in the slot for [`Self::gradients`].
    pub(crate) fn output(
        &self,
        op: &str,
        out: CpuStorage,
        numel: usize,
        dparams: Vec<f32>,
    ) -> Result<(CpuStorage, Shape)> {
        let len = dparams.len();
        self.put(op, Tensor::from_vec(dparams, len, &candle_core::Device::Cpu)?)?;
        Ok((out, Shape::from(numel)))
    }

    /// The gradients of `x` (its shape) and of `params` (their shape and dtype) from a backward
    /// op's result `out`: `dx` with the parameters' gradient in the slot (the CPU kernels), or
    /// `[dx | dparams]` packed in `out` with the slot empty (the GPU kernels).
    pub(crate) fn gradients(
        self,
        op: &str,
        out: &Tensor,
        x_dims: &[usize],
        params: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        match self.0.into_inner() {
            // Its own buffer, not a view into dx's: the gradient store keeps it as it is, and
            // the views `cat`'s backward cuts from it for each weight are copied once.
            Ok(Some(dparams)) => Ok((out.reshape(x_dims)?, dparams.to_dtype(params.dtype())?.reshape(params.dims())?)),
            Ok(None) => {
                let [dx, dparams] = unpack(out, [x_dims, params.dims()])?;
                Ok((dx, dparams))
            }
            Err(_) => bail!("{op}: the gradient slot is poisoned"),
        }
    }
}

/// Splits the 1-D result of a backward op, the gradients of its operands one after another,
/// into one tensor per operand with the given shapes (views, no copies).
pub(crate) fn unpack<const K: usize>(packed: &Tensor, shapes: [&[usize]; K]) -> Result<[Tensor; K]> {
    let mut start = 0;
    let mut parts = Vec::with_capacity(K);
    for dims in shapes {
        let len = dims.iter().product();
        parts.push(packed.narrow(0, start, len)?.reshape(dims)?);
        start += len;
    }
    match parts.try_into() {
        Ok(parts) => Ok(parts),
        Err(_) => bail!("unpack: expected {K} parts"),
    }
}

/// A vector of `len` floats with unspecified values, for outputs that are written in full
/// before anything reads them: zero-filling them first would be one more pass over memory
/// (the way Candle's own CPU backend allocates its outputs, `alloc_uninit`).
#[allow(clippy::uninit_vec)]
pub(crate) fn uninit<T: Elem>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: the element types (f32, bf16, f16) are plain bits with no invalid patterns and
    // the capacity is `len`; every caller writes each element before reading it.
    unsafe { v.set_len(len) };
    v
}

/// Sum of a slice in `f32` with eight independent accumulators (vectorisable).
#[inline(always)]
pub(crate) fn sum<T: Elem>(v: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|x| x.to_f32()).sum();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l].to_f32();
        }
    }
    tail + acc.iter().sum::<f32>()
}

/// (Σ x, Σ g·x) with eight independent accumulators each (vectorisable).
#[inline(always)]
pub(crate) fn sum_and_dot<T: Elem, U: Elem>(x: &[T], g: &[U]) -> (f32, f32) {
    let (mut sx, mut sgx) = ([0f32; 8], [0f32; 8]);
    let n = x.len().min(g.len());
    let full = n / 8 * 8;
    for (xc, gc) in x[..full].chunks_exact(8).zip(g[..full].chunks_exact(8)) {
        for l in 0..8 {
            let xv = xc[l].to_f32();
            sx[l] += xv;
            sgx[l] += gc[l].to_f32() * xv;
        }
    }
    let (mut tx, mut tgx) = (0f32, 0f32);
    for k in full..n {
        let xv = x[k].to_f32();
        tx += xv;
        tgx += g[k].to_f32() * xv;
    }
    (tx + sx.iter().sum::<f32>(), tgx + sgx.iter().sum::<f32>())
}

/// Asks the CPU to bring `data` into cache ahead of its use (one hint per 64-byte line).
#[inline]
pub(crate) fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let (start, bytes) = (data.as_ptr() as *const i8, std::mem::size_of_val(data));
        for offset in (0..bytes).step_by(64) {
            // SAFETY: a hint, never a load: any address is allowed; these are within `data`.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(start.add(offset)) }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

#[cfg(test)]
mod tests {
    use super::{matmul_threads, Elem, Mat, Products};
    use half::bf16;

    /// Products narrow enough for the column-major detour (`n` < 64 with a column-major `a`),
    /// written and accumulated, against a plain f64 loop; and the same shapes with a
    /// row-major `a`, which take the direct call.
    #[test]
    fn narrow_products_match_a_plain_loop() {
        let (m, n, k) = (70, 5, 33);
        let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 25.0;
        let a_data: Vec<f32> = (0..m * k).map(value).collect();
        let b_data: Vec<f32> = (0..k * n).map(|i| value(i + 7)).collect();
        for a_column_major in [true, false] {
            let a =
                if a_column_major { Mat { data: &a_data, rs: 1, cs: m } } else { Mat { data: &a_data, rs: k, cs: 1 } };
            let b = Mat { data: &b_data, rs: n, cs: 1 };
            for accumulate in [false, true] {
                // Past the `m × n` result: 16 values nothing may write.
                let start: Vec<f32> = (0..m * n + 16).map(|i| value(i + 3)).collect();
                let mut out = start.clone();
                matmul_threads(Products::F32, 1, m, n, k, a, b, &mut out, accumulate);
                for i in 0..m {
                    for j in 0..n {
                        let product: f64 =
                            (0..k).map(|p| a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j] as f64).sum();
                        let want = product + if accumulate { start[i * n + j] as f64 } else { 0.0 };
                        let got = out[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-4,
                            "a column-major {a_column_major}, accumulate {accumulate}, ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
                assert_eq!(out[m * n..], start[m * n..], "nothing past the block is written");
            }
        }
    }

    /// The branch-free rounding equals `half`'s on every f32 whose bits step through the
    /// whole range (ties, subnormals, infinities, the largest finite values), and bf16 → f32
    /// is exact.
    #[test]
    fn bf16_conversion_matches_half_on_every_kind_of_value() {
        let specials = [0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN, f32::MIN_POSITIVE, 1e-45];
        let stepped = (0..=u32::MAX).step_by(65_521).map(f32::from_bits);
        for v in specials.into_iter().chain(stepped) {
            let ours = <bf16 as Elem>::from_f32(v);
            if v.is_nan() {
                assert!(ours.is_nan(), "{v:e} ({:#x})", v.to_bits());
            } else {
                assert_eq!(ours.to_bits(), bf16::from_f32(v).to_bits(), "{v:e} ({:#x})", v.to_bits());
            }
            assert_eq!(<bf16 as Elem>::to_f32(ours).to_bits(), ours.to_f32().to_bits());
        }
        // Ties round to even: 1 + 2⁻⁸ → 1, 1 + 3·2⁻⁸ → 1 + 2⁻⁶.
        assert_eq!(<bf16 as Elem>::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        assert_eq!(<bf16 as Elem>::from_f32(1.0 + 3.0 / 256.0).to_f32(), 1.0 + 1.0 / 64.0);
    }

    /// Slice conversions (16 lanes wide where the CPU has AVX-512) give the element-wise
    /// conversion's bits for f32 ↔ bf16 and f32 ↔ f16, at every length up to 40 (whole vectors
    /// and tails) and from every offset, on values of every kind (NaN, ±∞, ±0, subnormals,
    /// ties).
    #[test]
    fn slice_conversions_equal_element_conversions() {
        let values: Vec<f32> = (0..=u32::MAX).step_by(4_093_127).map(f32::from_bits).chain([f32::NAN, -0.0]).collect();
        let bits_bf16 = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let bits_f16 = |v: &[half::f16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let bits_f32 = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for start in 0..16 {
            for len in 0..=40 {
                let src = &values[start..start + len];
                let mut narrow = vec![bf16::ZERO; len];
                super::copy_converted(src, &mut narrow);
                let want: Vec<bf16> = src.iter().map(|&v| <bf16 as Elem>::from_f32(v)).collect();
                assert_eq!(bits_bf16(&narrow), bits_bf16(&want), "f32 → bf16 from {start}, {len} values");
                let mut wide = vec![0f32; len];
                super::copy_converted(&narrow, &mut wide);
                assert_eq!(bits_f32(&wide), bits_f32(&want.iter().map(|v| v.to_f32()).collect::<Vec<_>>()));
                let mut half = vec![half::f16::ZERO; len];
                super::copy_converted(src, &mut half);
                let want: Vec<half::f16> = src.iter().map(|&v| half::f16::from_f32(v)).collect();
                assert_eq!(bits_f16(&half), bits_f16(&want), "f32 → f16 from {start}, {len} values");
            }
        }
    }
}
