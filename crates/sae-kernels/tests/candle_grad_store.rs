//! Candle's backward pass on the workspace's patched candle-core
//! (`vendor/candle-core/PATCH.md`): the first contribution to a gradient is stored as it is
//! rather than added to zeroes. Gradients must still sum every path, and a variable's
//! gradient that is one part of a buffer of several (the fused BatchNorm returns the input,
//! scale and shift gradients in one) must own its memory, or the buffer would live until the
//! optimiser step.

use candle_core::{CpuStorage, Device, Storage, Tensor, Var};
use sae_kernels::{batch_norm_train, batch_norm_train_reference, Implementation};

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
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev)?)?;
    let scale = Var::from_tensor(&Tensor::randn(1f32, 0.1, 3, &dev)?)?;
    let shift = Var::from_tensor(&Tensor::randn(0f32, 0.1, 3, &dev)?)?;
    let probe = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev)?;
    let grads = |fused: bool| -> candle_core::Result<Vec<Tensor>> {
        let out = if fused {
            batch_norm_train(&x, &scale, &shift, 1e-5, false, Implementation::Fused)?
        } else {
            batch_norm_train_reference(&x, &scale, &shift, 1e-5)?
        };
        let grads = (out.output * &probe)?.sum_all()?.backward()?;
        Ok([&x, &scale, &shift].iter().map(|v| grads.get(v).expect("a gradient").clone()).collect())
    };
    let (fused, reference) = (grads(true)?, grads(false)?);
    // The shift's gradient is the last part of the fused op's buffer, the scale's the middle.
    for (name, g) in ["scale", "shift"].iter().zip(&fused[1..]) {
        assert_eq!(storage_len(g), g.elem_count(), "the {name} gradient holds the whole buffer");
    }
    for (ours, reference) in fused.iter().zip(&reference) {
        let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-4, "a gradient differs by {diff}");
    }
    Ok(())
}
