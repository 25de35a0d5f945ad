//! Synchronised BatchNorm: two replicas (threads meeting at a barrier) with two images each
//! compute what one model computes on the four: logits, every gradient, running statistics.

use candle_core::{Device, ModuleT, Tensor};
use sae_models::{config, with_sync_batch_norm, CrossReplicaSum, Model};
use std::sync::{Arc, Barrier, Mutex};

/// Replicas as threads: each writes its values into its slot, and after a barrier every one
/// sums the slots in slot order (so all get bit-identical sums).
struct Threads {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f32>>>,
}

struct Replica {
    group: Arc<Threads>,
    id: usize,
}

impl CrossReplicaSum for Replica {
    fn sum(&self, values: &mut [f32]) -> candle_core::Result<()> {
        self.group.slots.lock().unwrap()[self.id] = values.to_vec();
        self.group.barrier.wait();
        {
            let slots = self.group.slots.lock().unwrap();
            values.iter_mut().enumerate().for_each(|(i, v)| *v = slots.iter().map(|s| s[i]).sum());
        }
        self.group.barrier.wait();
        Ok(())
    }
}

/// Noise: a periodic pattern would repeat values, and a max-pool's tied maxima can swap under
/// rounding, which moves gradients by per cents for reasons that have nothing to do with the
/// synchronisation.
fn images() -> Tensor {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let v: Vec<f32> = (0..4 * 3 * 16 * 16)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 3.0 - 1.5
        })
        .collect();
    Tensor::from_vec(v, (4, 3, 16, 16), &Device::Cpu).unwrap()
}

/// A loss that weighs every logit differently, so every output's gradient is distinct.
fn loss(logits: &Tensor, first_image: usize) -> Tensor {
    let (n, k) = logits.dims2().unwrap();
    let w: Vec<f32> = (0..n * k).map(|i| (((i + first_image * k) * 13 % 7) as f32 - 3.0) / 4.0).collect();
    (logits * Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap()).unwrap().sum_all().unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn two_replicas_of_two_images_equal_one_model_of_four() {
    let name = "seresnet14b";
    let whole = Model::new(config(name, 5).unwrap(), 7, &Device::Cpu).unwrap();
    let x = images();
    let logits = whole.forward_t(&x, true).unwrap();
    let grads = loss(&logits, 0).backward().unwrap();

    let group = Arc::new(Threads { barrier: Barrier::new(2), slots: Mutex::new(vec![Vec::new(); 2]) });
    let replicas: Vec<_> = (0..2)
        .map(|id| {
            let (group, x) = (group.clone(), x.narrow(0, 2 * id, 2).unwrap());
            std::thread::spawn(move || {
                let model = Model::new(config(name, 5).unwrap(), 7, &Device::Cpu).unwrap();
                let sum: Arc<dyn CrossReplicaSum> = Arc::new(Replica { group, id });
                let logits = with_sync_batch_norm(sum, || model.forward_t(&x, true).unwrap());
                // The backward runs outside the closure: the exchanges are in the graph.
                let grads = loss(&logits, 2 * id).backward().unwrap();
                let grads: Vec<(String, Tensor)> =
                    model.trainable_vars().into_iter().map(|(n, v)| (n, grads.get(&v).unwrap().clone())).collect();
                (logits, grads, model.named_vars())
            })
        })
        .collect();
    let results: Vec<_> = replicas.into_iter().map(|h| h.join().unwrap()).collect();

    let joined = Tensor::cat(&[&results[0].0, &results[1].0], 0).unwrap();
    let diff = max_abs(&(&joined - &logits).unwrap());
    assert!(diff <= 1e-4 * max_abs(&logits), "logits differ by {diff}");
    for (i, (name, var)) in whole.trainable_vars().into_iter().enumerate() {
        let expected = grads.get(&var).unwrap();
        let (a, b) = (&results[0].1[i], &results[1].1[i]);
        assert_eq!(a.0, name);
        let summed = (&a.1 + &b.1).unwrap();
        let diff = max_abs(&(&summed - expected).unwrap());
        // 1e-3: the reference and fused BatchNorm round differently, and the SE gates amplify
        // that (the kernel-switch test measures the same amplification).
        assert!(
            diff <= 1e-3 * max_abs(expected) + 1e-7,
            "{name}: gradient differs by {diff} (scale {})",
            max_abs(expected)
        );
    }
    // Running statistics are global, so both replicas hold the whole model's.
    for (name, var) in whole.named_vars() {
        if sae_models::is_running_stat(&name) {
            for r in &results {
                let diff = max_abs(&(r.2[&name].as_tensor() - var.as_tensor()).unwrap());
                assert!(diff <= 1e-5 * max_abs(var.as_tensor()).max(1.0), "{name}: {diff}");
            }
        }
    }
}

#[test]
fn without_synchronisation_the_halves_differ() {
    // The test above would pass for per-replica statistics if the halves were alike; they are not.
    let model = Model::new(config("resnet14b", 5).unwrap(), 7, &Device::Cpu).unwrap();
    let x = images();
    let whole = model.forward_t(&x, true).unwrap().narrow(0, 0, 2).unwrap();
    let half = model.forward_t(&x.narrow(0, 0, 2).unwrap(), true).unwrap();
    assert!(max_abs(&(whole - half).unwrap()) > 1e-3);
}
