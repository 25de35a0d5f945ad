//! Seeded, reproducible initialisation.
//!
//! Candle cannot seed its CPU random generator, so [`SeededVarMap`] is a `VarBuilder`
//! backend that realises each `Init` hint with its own generator: a ChaCha8 stream seeded
//! from the run seed and the tensor's name. The same seed gives the same weights bit for bit,
//! on every run and whatever order layers are built in.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// A `VarBuilder` backend that creates every requested tensor as a `Var` in a [`VarMap`],
/// initialised deterministically from `seed` and the tensor's name.
pub struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

impl SeededVarMap {
    /// A backend filling `varmap`.
    pub fn new(varmap: VarMap, seed: u64) -> Self {
        Self { varmap, seed }
    }
}

/// FNV-1a of the name mixed with the seed: a stable per-tensor stream id.
fn stream_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Values for `init` over `shape`, drawn from the stream of (`seed`, `name`).
pub fn init_values(seed: u64, name: &str, shape: &Shape, init: Init) -> Vec<f32> {
    let n = shape.elem_count();
    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, name));
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Vec<f32> {
        (0..n).map(|_| (mean + std * rng.sample::<f64, _>(StandardNormal)) as f32).collect()
    };
    let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..up) as f32).collect()
    };
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
        Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
        Init::Kaiming { dist, fan, non_linearity } => {
            let fan = fan.for_shape(shape);
            let std = non_linearity.gain() / (fan as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(&mut rng, -bound, bound)
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = self.varmap.data().lock().expect("var map lock poisoned");
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("tensor {name} requested with shape {shape:?} but exists with {:?}", var.shape())
            }
            return Ok(var.as_tensor().clone());
        }
        let values = init_values(self.seed, name, &shape, init);
        // f32 values become the variable's storage as they are: `Var::from_tensor` would copy
        // them, and the freed copy is memory the allocator keeps but other threads do not
        // reuse.
        let var = if dtype == DType::F32 {
            Var::from_vec(values, shape, dev)?
        } else {
            Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(dev)?)?
        };
        vars.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let vars = self.varmap.data().lock().expect("var map lock poisoned");
        match vars.get(name) {
            Some(var) => Ok(var.as_tensor().clone()),
            None => candle_core::bail!("tensor {name} does not exist"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().expect("var map lock poisoned").contains_key(name)
    }
}

/// A backend that hands out zeros and records each tensor's name and element count: builds
/// a network cheaply to count its parameters.
#[derive(Default, Clone)]
pub struct ShapeRecorder {
    /// (name, element count) of every tensor requested, in request order.
    pub tensors: std::sync::Arc<std::sync::Mutex<Vec<(String, usize)>>>,
}

impl SimpleBackend for ShapeRecorder {
    fn get(&self, shape: Shape, name: &str, _init: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.tensors.lock().expect("recorder lock poisoned").push((name.to_string(), shape.elem_count()));
        Tensor::zeros(shape, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("tensor {name} has no shape in the shape recorder")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}
