//! A training step lets go of its graph during the backward pass: its peak heap is well below
//! that of the same step holding the logits (and through them every activation) until the
//! backward pass ends. Measured with a counting allocator, so this test has a binary of its own.

use candle_core::{Device, ModuleT, Tensor};
use sae_models::Model;
use sae_train::allocator::{measure, Counting};
use sae_train::forward_backward;
use sae_train::metrics::cross_entropy;
use std::alloc::System;

#[global_allocator]
static ALLOCATOR: Counting<System> = Counting(System);

/// Bytes allocated at most while `f` ran, above what was allocated when it began.
fn peak_of<R>(f: impl FnOnce() -> R) -> (usize, R) {
    let (heap, r) = measure(f);
    (heap.peak - heap.before, r)
}

#[test]
fn the_backward_pass_frees_the_activations_as_it_goes() {
    let dev = Device::Cpu;
    let model = Model::from_name("resnet14b", 10, 1, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (4, 3, 128, 128), &dev).unwrap();
    let labels = Tensor::new(&[1u32, 7, 3, 0], &dev).unwrap();
    let forward = |x: &Tensor| model.forward_t(x, true);
    // Once unmeasured: thread pools and any caches the kernels keep start here.
    drop(forward_backward(forward, &x, &labels, None, 0.0, 1).unwrap());

    let (step, (_, loss, grads)) = peak_of(|| forward_backward(forward, &x, &labels, None, 0.0, 1).unwrap());
    let (holding, (held_loss, held_grads)) = peak_of(|| {
        let logits = model.forward_t(&x, true).unwrap();
        let loss = cross_entropy(&logits, &labels, 0.0).unwrap();
        let value = loss.to_scalar::<f32>().unwrap();
        let grads = loss.backward_consuming().unwrap();
        drop(logits);
        (value, grads)
    });
    // The same step: the same loss and gradients (to rounding, should a kernel's sums depend on
    // how rayon split its work).
    assert!((loss - held_loss).abs() <= 1e-6 * loss.abs(), "loss {loss} against {held_loss}");
    let max_abs = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    for (name, var) in model.trainable_vars() {
        let (a, b) = (grads.get(&var).unwrap(), held_grads.get(&var).unwrap());
        let diff = max_abs(&(a - b).unwrap());
        assert!(diff <= 1e-5 * max_abs(b), "{name}: gradients differ by {diff}");
    }
    let (forward_only, logits) = peak_of(|| model.forward_t(&x, true).unwrap());
    drop(logits);
    // Holding the graph, the step's peak is every activation and every gradient at once; let go,
    // the first activations are freed before the last gradients exist. ResNet's early layers
    // hold most of the activations and its late ones most of the weights, so that saves a
    // part of the forward's memory, not all of it: 12.5 of 53 MiB here (96.4 MiB held, 83.9
    // let go, on a 2-core AMD EPYC; the same at 224×224: 25.6 of 162.5).
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    assert!(
        holding.saturating_sub(step) > forward_only / 8,
        "peak {:.1} MiB, holding the graph {:.1} MiB, the forward's {:.1} MiB",
        mib(step),
        mib(holding),
        mib(forward_only)
    );
}
