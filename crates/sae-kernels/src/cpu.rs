//! CPU helpers shared by the kernels: element conversion, strided 4-D plane access and
//! vectorisable dot/axpy loops.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, WithDType};
use half::{bf16, f16};

/// An element type the CPU kernels accept; arithmetic is always done in `f32`.
pub(crate) trait Elem: WithDType + Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
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
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
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

/// Element offsets of an (N, C, H, W) tensor with arbitrary strides.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Strided4 {
    pub dims: [usize; 4],
    pub strides: [usize; 4],
    pub offset: usize,
}

impl Strided4 {
    pub fn new(op: &str, what: &str, layout: &Layout) -> Result<Self> {
        let dims: [usize; 4] = match layout.dims().try_into() {
            Ok(d) => d,
            Err(_) => bail!("{op}: {what} must be 4-D (N, C, H, W), got shape {:?}", layout.dims()),
        };
        let strides: [usize; 4] = layout.stride().try_into().expect("rank checked above");
        Ok(Self { dims, strides, offset: layout.start_offset() })
    }

    pub fn plane_len(&self) -> usize {
        self.dims[2] * self.dims[3]
    }

    /// Calls `f(k, value)` for every element of plane (n, c) in row-major order.
    #[inline(always)]
    pub fn for_each_in_plane<T: Copy>(&self, data: &[T], n: usize, c: usize, mut f: impl FnMut(usize, T)) {
        let base = self.offset + n * self.strides[0] + c * self.strides[1];
        let [_, _, h, w] = self.dims;
        if self.strides[3] == 1 && self.strides[2] == w {
            for (k, &v) in data[base..base + h * w].iter().enumerate() {
                f(k, v);
            }
        } else {
            for i in 0..h {
                let row = base + i * self.strides[2];
                for j in 0..w {
                    f(i * w + j, data[row + j * self.strides[3]]);
                }
            }
        }
    }

    /// Plane (n, c) as a slice when it is stored contiguously.
    #[inline(always)]
    pub fn contiguous_plane<'a, T>(&self, data: &'a [T], n: usize, c: usize) -> Option<&'a [T]> {
        let [_, _, h, w] = self.dims;
        if self.strides[3] == 1 && self.strides[2] == w {
            let base = self.offset + n * self.strides[0] + c * self.strides[1];
            Some(&data[base..base + h * w])
        } else {
            None
        }
    }
}

/// Dot product with eight independent accumulators, so that LLVM vectorises it without
/// reassociating floating-point sums on its own.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let chunks = n / 8;
    for i in 0..chunks {
        for l in 0..8 {
            acc[l] += a[i * 8 + l] * b[i * 8 + l];
        }
    }
    let mut total = 0f32;
    for i in chunks * 8..n {
        total += a[i] * b[i];
    }
    total + acc.iter().sum::<f32>()
}

/// `y += alpha * x`.
#[inline]
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// Copies a contiguous storage's data into an `f32` vector. The public op functions make
/// small operands (weights) contiguous before calling a kernel, so this never copies twice.
pub(crate) fn to_f32_vec<T: Elem>(op: &str, what: &str, data: &[T], layout: &Layout) -> Result<Vec<f32>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(data[start..end].iter().map(|v| v.to_f32()).collect()),
        None => bail!("{op}: {what} must be contiguous"),
    }
}

/// Minimum number of elements of work per rayon task, so that tiny planes are batched.
pub(crate) fn min_planes_per_task(plane_len: usize) -> usize {
    (8192 / plane_len.max(1)).max(1)
}
