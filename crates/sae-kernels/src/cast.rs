//! [`cast`]: a differentiable dtype conversion that runs in parallel on the CPU.
//!
//! Mixed-precision training converts every weight to bf16 and every weight gradient back to
//! f32 once per step, and Candle's CPU `to_dtype` is a single-threaded loop. The gradient of
//! a conversion is the output gradient converted back to the input's type.

use crate::cpu::convert_storage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// `t` converted to `dtype` (rounded to nearest even when narrowing); `t` itself when it
/// already has that type. CPU float tensors are converted in parallel; anything else by
/// Candle's `to_dtype`.
pub fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let float = |d: DType| matches!(d, DType::F32 | DType::BF16 | DType::F16);
    if t.dtype() == dtype {
        Ok(t.clone())
    } else if t.device().is_cpu() && float(t.dtype()) && float(dtype) {
        t.contiguous()?.apply_op1(Cast(dtype))
    } else {
        t.to_dtype(dtype)
    }
}

struct Cast(DType);

impl CustomOp1 for Cast {
    fn name(&self) -> &'static str {
        "sae-cast"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((convert_storage(s, l, self.0)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(cast(grad, x.dtype())?))
    }
}
