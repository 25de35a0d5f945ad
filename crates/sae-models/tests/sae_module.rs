//! The SaE module against a computation written out by hand in plain loops, on the tiny
//! example of C = 64, K = 4, r = 32 (four branches of 2 units), for both gate modes and both
//! kernel implementations.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sae_models::init::SeededVarMap;
use sae_models::layers::Excitation;
use sae_models::{config, Gate, Implementation};

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

#[test]
fn sae_module_matches_hand_computation() {
    let (n, c, h, w, k, r) = (2, 64, 3, 3, 4, 32);
    let cr = c / r;
    let x: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let xt = Tensor::from_vec(x.clone(), (n, c, h, w), &Device::Cpu).unwrap();
    for gate in [Gate::S, Gate::OnePlusS] {
        for kernels in Implementation::ALL {
            let mut cfg = config("senetv2_resnet50", 10).unwrap();
            cfg.gate = gate;
            cfg.kernels = kernels;
            let varmap = VarMap::new();
            let vb = VarBuilder::from_backend(Box::new(SeededVarMap::new(varmap.clone(), 5)), DType::F32, Device::Cpu);
            let module = Excitation::new(c, Some(k), &cfg, vb).unwrap();
            let get = |name: &str| -> Vec<f64> {
                let vars = varmap.data().lock().unwrap();
                let t = vars.get(name).unwrap_or_else(|| panic!("no tensor {name}")).as_tensor().clone();
                t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
            };
            let w2 = get("fc2.weight");
            let b2 = get("fc2.bias");
            assert_eq!(w2.len(), c * k * cr);
            let out = module.forward(&xt).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for img in 0..n {
                // Squeeze.
                let z: Vec<f64> = (0..c)
                    .map(|ch| (0..h * w).map(|p| x[(img * c + ch) * h * w + p] as f64).sum::<f64>() / (h * w) as f64)
                    .collect();
                // K branches of C → C/r with ReLU, concatenated in branch order.
                let mut hidden = Vec::new();
                for branch in 0..k {
                    let w1 = get(&format!("fc1.{branch}.weight"));
                    let b1 = get(&format!("fc1.{branch}.bias"));
                    for j in 0..cr {
                        let a: f64 = b1[j] + (0..c).map(|ch| w1[j * c + ch] * z[ch]).sum::<f64>();
                        hidden.push(a.max(0.0));
                    }
                }
                // Excite, then scale.
                for ch in 0..c {
                    let a = b2[ch] + (0..k * cr).map(|j| w2[ch * k * cr + j] * hidden[j]).sum::<f64>();
                    let s = sigmoid(a);
                    for p in 0..h * w {
                        let i = (img * c + ch) * h * w + p;
                        let u = x[i] as f64;
                        let expected = match gate {
                            Gate::S => u * s,
                            Gate::OnePlusS => u + u * s,
                        };
                        assert!(
                            (out[i] as f64 - expected).abs() < 1e-5,
                            "{gate:?} {kernels}: {} vs {expected}",
                            out[i]
                        );
                    }
                }
            }
        }
    }
}
