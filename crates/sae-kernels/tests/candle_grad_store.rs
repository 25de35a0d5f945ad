//! Candle's backward pass on the workspace's patched candle-core
//! (`vendor/candle-core/PATCH.md`): the first contribution to a gradient is stored as it is
//! rather than added to zeroes, and later ones are added into it in place when nothing else
//! holds it. Gradients must still sum every path, a gradient shared by two inputs must not be
//! written through one of them, and a variable's
//! gradient that is one part of a buffer of several (the fused BatchNorm returns the input,
//! scale and shift gradients in one) must own its memory, or the buffer would live until the
//! optimiser step. `backward_consuming` lets go of each node of the graph once its gradient
//! has been passed on, so that the activations are freed during the pass.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor, Var};
use sae_kernels::{batch_norm_train, batch_norm_train_reference, Implementation};
use std::sync::{Arc, Mutex};

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

#[test]
fn a_variable_whose_gradient_starts_a_larger_buffer_owns_its_memory() -> candle_core::Result<()> {
    // `cat`'s backward hands each input a slice of one gradient; the first slice starts the
    // buffer. The fused SE/SaE ops pack their weights this way, and a first piece kept as a view
    // held its layer's whole packed gradient until the optimiser step (19 MiB of
    // SENetV2-ResNet-50's). An intermediate tensor's slice may stay a view: it is freed in the pass.
    let dev = Device::Cpu;
    let (a, b) = (Var::new(&[1f32, 2.0], &dev)?, Var::new(&[3f32, 4.0, 5.0], &dev)?);
    let c = Tensor::new(&[1f32, 10.0, 100.0, 1000.0, 10000.0], &dev)?;
    let grads = (Tensor::cat(&[a.as_tensor(), b.as_tensor()], 0)? * &c)?.sum_all()?.backward()?;
    let (ga, gb) = (grads.get(&a).expect("a has a gradient"), grads.get(&b).expect("b has a gradient"));
    assert_eq!(ga.to_vec1::<f32>()?, [1.0, 10.0]);
    assert_eq!(gb.to_vec1::<f32>()?, [100.0, 1000.0, 10000.0]);
    assert_eq!(storage_len(ga), 2, "the first piece's gradient holds the whole buffer");
    assert_eq!(storage_len(gb), 3);
    Ok(())
}

#[test]
fn a_gradient_shared_by_two_inputs_is_not_summed_into_in_place() -> candle_core::Result<()> {
    // `x + y` hands the same gradient tensor to both inputs; x's other contribution (through
    // `3x`) must not be added into the memory that y's gradient shares. Both orders of the
    // loss's terms, so that either contribution reaches x first.
    let dev = Device::Cpu;
    let x = Var::new(&[1f32, 2.0, 3.0], &dev)?;
    let y = Var::new(&[4f32, 5.0, 6.0], &dev)?;
    let c = Tensor::new(&[1f32, 10.0, 100.0], &dev)?;
    for sum_first in [true, false] {
        let through_sum = ((x.as_tensor() + y.as_tensor())? * &c)?.sum_all()?;
        let through_x = x.as_tensor().affine(3.0, 0.0)?.sum_all()?;
        let loss = if sum_first { (through_sum + through_x)? } else { (through_x + through_sum)? };
        let grads = loss.backward()?;
        let gy = grads.get(&y).expect("y has a gradient").to_vec1::<f32>()?;
        assert_eq!(gy, [1.0, 10.0, 100.0], "sum first: {sum_first}");
        let gx = grads.get(&x).expect("x has a gradient").to_vec1::<f32>()?;
        assert_eq!(gx, [4.0, 13.0, 103.0], "sum first: {sum_first}");
    }
    Ok(())
}

#[test]
fn a_gradient_held_by_nothing_else_is_summed_in_place() -> candle_core::Result<()> {
    // x feeds two products; its second contribution is added into the first one's buffer,
    // which no other gradient shares (a planted error in that add fails this).
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        let x = Var::from_tensor(&Tensor::new(&[1f32, -2.0, 3.0, 0.5], &dev)?.to_dtype(dtype)?)?;
        let a = Tensor::new(&[2f32, 4.0, 8.0, 16.0], &dev)?.to_dtype(dtype)?;
        let b = Tensor::new(&[0.5f32, 0.25, 1.0, 3.0], &dev)?.to_dtype(dtype)?;
        let loss = ((x.as_tensor() * &a)?.sum_all()? + (x.as_tensor() * &b)?.sum_all()?)?;
        let grads = loss.backward()?;
        let gx = grads.get(&x).expect("x has a gradient").to_dtype(DType::F32)?;
        assert_eq!(gx.to_vec1::<f32>()?, [2.5, 4.25, 9.0, 19.0], "{dtype:?}");
    }
    Ok(())
}

/// An identity op that logs, in `log`, when its backward runs and when its node is dropped
/// (the op is owned by the node of the graph that it made).
struct Probe {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
}

impl CustomOp1 for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = storage else { candle_core::bail!("probe: f32 only") };
        let v = layout.contiguous_offsets().map(|(a, b)| v[a..b].to_vec()).expect("a contiguous input");
        Ok((CpuStorage::F32(v), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.log.lock().unwrap().push(format!("{} backward", self.name));
        Ok(Some(grad_res.clone()))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.log.lock().unwrap().push(format!("{} dropped", self.name));
    }
}

/// What happened, in order, by the end of the backward pass of `Σ 2·outer(inner(x))`
/// (`consuming` or not; the root is still held after a plain one), and x's gradient.
fn probed_pass(consuming: bool) -> candle_core::Result<(Vec<String>, Vec<f32>)> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let x = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
    let probe = |name| Probe { name, log: log.clone() };
    let loss = x.as_tensor().apply_op1(probe("inner"))?.apply_op1(probe("outer"))?.affine(2.0, 0.0)?.sum_all()?;
    let grads = if consuming { loss.backward_consuming()? } else { loss.backward()? };
    let gradient = grads.get(&x).expect("x has a gradient").to_vec1::<f32>()?;
    let log = log.lock().unwrap().clone();
    Ok((log, gradient))
}

#[test]
fn a_consuming_backward_frees_each_node_once_passed() -> candle_core::Result<()> {
    let (log, gradient) = probed_pass(true)?;
    // The outer node goes as soon as its turn is over, before the inner one's backward.
    assert_eq!(log, ["outer backward", "outer dropped", "inner backward", "inner dropped"]);
    assert_eq!(gradient, [2.0, 2.0, 2.0]);
    // `backward` frees nothing: the caller's root holds the graph.
    let (log, gradient) = probed_pass(false)?;
    assert_eq!(log, ["outer backward", "inner backward"]);
    assert_eq!(gradient, [2.0, 2.0, 2.0]);
    Ok(())
}

#[test]
fn a_consuming_backward_sums_every_path() -> candle_core::Result<()> {
    let x = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
    // d/dx Σ (x + x·x + 3x) = 1 + 2x + 3, as in `gradients_sum_every_path`.
    let y = (x.as_tensor() + (x.as_tensor() * x.as_tensor())?)?;
    let grads = (y + x.as_tensor().affine(3.0, 0.0)?)?.sum_all()?.backward_consuming()?;
    assert_eq!(grads.get(&x).expect("x has a gradient").to_vec1::<f32>()?, [6.0, 0.0, 10.0]);
    Ok(())
}

/// `backward_consuming_with` hands each variable's gradient over once, complete (every path
/// summed), after every node that reads the variable has had its turn: the hook zeroes each
/// variable in place and the other's gradient is still computed from the old values. What it
/// returns is stored; `None` stores nothing; its error ends the pass.
#[test]
fn a_consuming_backward_hands_each_variable_its_whole_gradient_once() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Var::new(&[1f32, -2.0, 3.0], &dev)?;
    let w = Var::new(&[0.5f32, 4.0, -1.0], &dev)?;
    // d/dx Σ (x·w + x·x) = w + 2x, d/dw = x.
    let loss =
        || -> candle_core::Result<Tensor> { ((x.as_tensor() * w.as_tensor())? + x.as_tensor().sqr()?)?.sum_all() };
    let mut seen = Vec::new();
    let grads = loss()?.backward_consuming_with(&mut |var, grad| {
        let name = if var.id() == x.id() { "x" } else { "w" };
        seen.push((name, grad.to_vec1::<f32>()?));
        var.zero_set()?;
        Ok((name == "w").then_some(grad))
    })?;
    seen.sort_by_key(|(name, _)| *name);
    assert_eq!(seen, [("w", vec![1.0, -2.0, 3.0]), ("x", vec![2.5, 0.0, 5.0])]);
    assert!(grads.get(&x).is_none(), "x's gradient was stored though the hook returned None");
    assert_eq!(grads.get(&w).expect("w's gradient is stored").to_vec1::<f32>()?, [1.0, -2.0, 3.0]);
    assert_eq!(x.to_vec1::<f32>()?, [0.0; 3]);

    let err = loss()?.backward_consuming_with(&mut |_, _| candle_core::bail!("planted")).unwrap_err();
    assert!(err.to_string().contains("planted"), "{err}");
    Ok(())
}
