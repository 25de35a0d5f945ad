//! Candle's backward pass on the workspace's patched candle-core
//! (`vendor/candle-core/PATCH.md`): the first contribution to a gradient is stored as it is
//! rather than added to zeroes. Gradients must still sum every path, and a variable's
//! gradient that is one part of a buffer of several (the fused convolution returns the input
//! and weight gradients in one) must own its memory, or the buffer would live until the
//! optimiser step.

use candle_core::{CpuStorage, Device, Storage, Tensor, Var};
use sae_kernels::Implementation;
use sae_kernels::{conv2d, Conv2dConfig};

/// Elements of the storage behind `t` (which may be a view of more).
fn storage_len(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => v.len(),
        other => panic!("expected f32 CPU storage, got {:?}", other.dtype()),
    }
}

#[test]
fn gradients_sum_every_path() -> candle_core::Result<()> {
    let x = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
    // d/dx Σ (x + x·x + 3x) = 1 + 2x + 3.
    let y = (x.as_tensor() + (x.as_tensor() * x.as_tensor())?)?;
    let y = (y + x.as_tensor().affine(3.0, 0.0)?)?;
    let grads = y.sum_all()?.backward()?;
    assert_eq!(grads.get(&x).expect("x has a gradient").to_vec1::<f32>()?, [6.0, 0.0, 10.0]);
    // A gradient reached through one path only: d/dx Σ 2x = 2.
    let grads = x.as_tensor().affine(2.0, 0.0)?.sum_all()?.backward()?;
    assert_eq!(grads.get(&x).expect("x has a gradient").to_vec1::<f32>()?, [2.0, 2.0, 2.0]);
    Ok(())
}

#[test]
fn a_gradient_returned_with_others_owns_its_memory() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 6, 6), &dev)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev)?)?;
    let cfg = Conv2dConfig { stride: 1, padding: 1, groups: 1 };
    let y = conv2d(x.as_tensor(), w.as_tensor(), cfg, Implementation::Fused)?;
    let grads = y.sqr()?.sum_all()?.backward()?;
    let (dx, dw) = (grads.get(&x).expect("dx"), grads.get(&w).expect("dw"));
    assert_eq!(storage_len(dw), dw.elem_count(), "the weight gradient holds the packed buffer");
    assert!(storage_len(dx) <= dx.elem_count() + dw.elem_count());
    // And the values are the reference convolution's gradients.
    let y_ref = sae_kernels::conv2d_reference(x.as_tensor(), w.as_tensor(), cfg)?;
    let grads_ref = y_ref.sqr()?.sum_all()?.backward()?;
    for (ours, reference) in [(dx, grads_ref.get(&x).expect("dx")), (dw, grads_ref.get(&w).expect("dw"))] {
        let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-4 * scale, "gradient differs by {diff} (scale {scale})");
    }
    Ok(())
}
