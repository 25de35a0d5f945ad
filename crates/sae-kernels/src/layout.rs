//! The layout of an (N, C, H, W) operand, one description for every backend: [`Strided4`]
//! (dims, strides, offset) for the CPU kernels, [`KernelStrides`] as the GPU kernels receive
//! it (the `Strides4` struct of the `.cu` and `.metal` sources), and the element-type suffix
//! of the GPU kernels' names. A leaf: it depends on no op.

use candle_core::{bail, DType, Layout, Result};

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

/// The offset and strides of an (N, C, H, W) operand, laid out as the `Strides4` struct of
/// the `.cu` and `.metal` kernel sources (five 64-bit integers), passed to kernels by value.
#[allow(dead_code)] // Used by the `cuda` and `metal` features only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct KernelStrides {
    pub offset: u64,
    pub s0: u64,
    pub s1: u64,
    pub s2: u64,
    pub s3: u64,
}

#[allow(dead_code)] // Used by the `cuda` and `metal` features only.
impl KernelStrides {
    pub fn new(op: &str, what: &str, layout: &Layout) -> Result<Self> {
        let s = Strided4::new(op, what, layout)?;
        let [s0, s1, s2, s3] = s.strides.map(|v| v as u64);
        Ok(Self { offset: s.offset as u64, s0, s1, s2, s3 })
    }
}

/// The suffix of a GPU kernel's name for an element type (`sae_scale_f32`, …); `backend` names
/// the device in the error for other types.
#[allow(dead_code)] // Used by the `cuda` and `metal` features only.
pub(crate) fn kernel_suffix(op: &str, dtype: DType, backend: &str) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("{op}: unsupported dtype {other:?} on {backend}"),
    })
}
