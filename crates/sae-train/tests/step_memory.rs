//! A training step lets go of its graph during the backward pass: its peak heap is well below
//! that of the same step holding the logits (and through them every activation) until the
//! backward pass ends; and with the update during the pass it never holds all the weight
//! gradients at once. Measured with a counting allocator, so this test has a binary of its own.

use candle_core::{Device, ModuleT, Tensor};
use sae_models::Implementation;
use sae_models::Model;
use sae_train::allocator::{measure, Counting};
use sae_train::metrics::cross_entropy;
use sae_train::optim::OptimizerConfig;
use sae_train::{backward_with_step, forward_loss};
use std::alloc::System;
use std::sync::Mutex;

#[global_allocator]
static ALLOCATOR: Counting<System> = Counting(System);

/// Held by each test for its whole run: the count is global, so tests in parallel threads
/// would count each other's memory.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Bytes allocated at most while `f` ran, above what was allocated when it began.
fn peak_of<R>(f: impl FnOnce() -> R) -> (usize, R) {
    let (heap, r) = measure(f);
    (heap.peak - heap.before, r)
}

#[test]
fn the_backward_pass_frees_the_activations_as_it_goes() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    let model = Model::from_name("resnet14b", 10, 1, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (4, 3, 128, 128), &dev).unwrap();
    let labels = Tensor::new(&[1u32, 7, 3, 0], &dev).unwrap();
    let forward = |x: &Tensor| model.forward_t(x, true);
    // Once unmeasured: thread pools and any caches the kernels keep start here.
    let step = || {
        let (_, loss, loss_tensor) = forward_loss(forward, &x, &labels, None, 0.0, 1).unwrap();
        (loss, loss_tensor.backward_consuming().unwrap())
    };
    drop(step());

    let (step, (loss, grads)) = peak_of(step);
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
    assert!(
        holding.saturating_sub(step) > forward_only / 8,
        "peak {:.1} MiB, holding the graph {:.1} MiB, the forward's {:.1} MiB",
        mib(step),
        mib(holding),
        mib(forward_only)
    );
}

/// With the update in the backward pass each gradient is dropped once applied, so the step's
/// peak is below that of the pass followed by `Optimizer::step` by most of the weights' size
/// (the gradients, all live at the end of the pass), less the largest gradients, which are
/// still made whole: 10.8 against 32.0 MiB here, of 30.7 MiB of weights, on a 2-core AMD EPYC.
#[test]
fn the_update_during_the_backward_pass_never_holds_all_the_gradients() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    let model = Model::from_name("resnet14b", 10, 1, &dev).unwrap();
    let mut optimizer = OptimizerConfig::keras_adam().build(model.trainable_vars(), Implementation::Fused);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
    let labels = Tensor::new(&[1u32, 7], &dev).unwrap();
    let forward = |x: &Tensor| model.forward_t(x, true);
    let loss = || forward_loss(forward, &x, &labels, None, 0.0, 1).unwrap().2;
    // Once each unmeasured: thread pools and kernel caches start here.
    optimizer.step(&loss().backward_consuming().unwrap()).unwrap();
    backward_with_step(loss(), optimizer.as_mut()).unwrap();

    let (after, ()) = peak_of(|| optimizer.step(&loss().backward_consuming().unwrap()).unwrap());
    let (during, _) = peak_of(|| backward_with_step(loss(), optimizer.as_mut()).unwrap());
    let weights: usize = model.trainable_vars().iter().map(|(_, v)| v.elem_count() * 4).sum();
    assert!(
        after.saturating_sub(during) > weights / 2,
        "peak {:.1} MiB updating during the pass, {:.1} MiB after it; the weights {:.1} MiB",
        mib(during),
        mib(after),
        mib(weights)
    );
}
