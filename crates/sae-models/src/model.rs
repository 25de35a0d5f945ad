//! [`Model`]: a network with its config and its variables — build it seeded, run it, save
//! and load its weights as safetensors, count its parameters and multiply-accumulates.

use crate::config::{Arch, ModelConfig};
use crate::init::{SeededVarMap, ShapeRecorder};
use crate::mobilenet::MobileNetV1;
use crate::resnet::ResNet;
use crate::tensor_file::TensorFile;
use crate::{registry, Error, Precision, Result};
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Suffixes of the tensors that are state, not parameters: no gradient, no optimiser.
const RUNNING_STATS: [&str; 2] = [".running_mean", ".running_var"];

/// Whether the tensor called `name` is a BatchNorm running statistic.
pub fn is_running_stat(name: &str) -> bool {
    RUNNING_STATS.iter().any(|s| name.ends_with(s))
}

/// The network behind a [`Model`].
#[derive(Debug, Clone)]
enum Network {
    ResNet(ResNet),
    MobileNetV1(MobileNetV1),
}

impl Network {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(match cfg.arch {
            Arch::Resnet { .. } => Network::ResNet(ResNet::new(cfg, vb)?),
            Arch::MobilenetV1 { .. } => Network::MobileNetV1(MobileNetV1::new(cfg, vb)?),
        })
    }
}

/// Parameter counts in the two conventions of the paper's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ParamCounts {
    /// Trainable numbers, PyTorch style: BatchNorm weight and bias only, and convolution
    /// biases only where the config has them.
    pub trainable: usize,
    /// The authors' Keras count: convolution biases (for ResNets; Keras MobileNet has none)
    /// and all four BatchNorm vectors. This reproduces the paper's printed counts.
    pub keras: usize,
}

impl ModelConfig {
    /// Counts parameters without allocating real weights.
    pub fn param_counts(&self) -> Result<ParamCounts> {
        self.validate()?;
        let count = |cfg: &ModelConfig| -> Result<Vec<(String, usize)>> {
            let recorder = ShapeRecorder::default();
            let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
            Network::new(cfg, vb)?;
            let tensors = recorder.tensors.lock().expect("recorder lock poisoned");
            Ok(tensors.clone())
        };
        let trainable = count(self)?.iter().filter(|(n, _)| !is_running_stat(n)).map(|(_, c)| c).sum();
        let mut keras_cfg = self.clone();
        keras_cfg.conv_bias = matches!(self.arch, Arch::Resnet { .. });
        let keras = count(&keras_cfg)?.iter().map(|(_, c)| c).sum();
        Ok(ParamCounts { trainable, keras })
    }
}

/// A model: config, variables and network.
pub struct Model {
    config: ModelConfig,
    varmap: VarMap,
    network: Network,
    device: Device,
    precision: Precision,
}

impl Model {
    /// Builds `config` with weights initialised from `seed` (same seed → same weights).
    pub fn new(config: ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::new_with_dtype(config, seed, device, DType::F32)
    }

    /// [`Model::new`] with every variable in `dtype` (the f32 initial values, rounded once), for
    /// running the whole network in bf16 or f16 on a GPU.
    pub fn new_with_dtype(config: ModelConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        config.validate()?;
        let varmap = VarMap::new();
        let backend = SeededVarMap::new(varmap.clone(), seed);
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let network = Network::new(&config, vb)?;
        Ok(Self { config, varmap, network, device: device.clone(), precision: Precision::F32 })
    }

    /// Builds the registered model `name` with `num_classes` outputs (see [`registry::create`]).
    pub fn from_name(name: &str, num_classes: usize, seed: u64, device: &Device) -> Result<Self> {
        registry::create(name, num_classes, seed, device)
    }

    /// Builds `config` and loads its weights from a safetensors file.
    pub fn load(config: ModelConfig, weights: &Path, device: &Device) -> Result<Self> {
        let model = Self::new(config, 0, device)?;
        model.load_weights(weights)?;
        Ok(model)
    }

    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The precision [`Model::forward_t`] runs in (f32 unless set).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Runs the forward pass in `precision` from now on (the variables do not change).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The variables (parameters and BatchNorm running statistics) by name.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// All variables, sorted by name.
    pub fn named_vars(&self) -> BTreeMap<String, Var> {
        let data = self.varmap.data().lock().expect("var map lock poisoned");
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The trainable variables (everything but BatchNorm running statistics), sorted by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.named_vars().into_iter().filter(|(n, _)| !is_running_stat(n)).collect()
    }

    /// Multiply-accumulates of convolutions and dense layers for one `h` × `w` image.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        match &self.network {
            Network::ResNet(n) => n.macs(h, w),
            Network::MobileNetV1(n) => n.macs(h, w),
        }
    }

    /// Writes every variable to a safetensors file (through a temporary file and a rename, so
    /// an interrupted save never leaves a truncated file).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> =
            self.named_vars().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        sae_fs::write_atomic_with(path, |tmp| Ok(candle_core::safetensors::save(&tensors, tmp)?))
    }

    /// Loads every variable from a safetensors file. The file must hold exactly this model's
    /// tensors with the same shapes and dtypes; anything else is an error naming the tensor.
    /// PyTorch's bookkeeping is accepted as PyTorch and timm save it: BatchNorm's
    /// `num_batches_tracked` is ignored and 1×1-convolution weights (O, I, 1, 1) load into
    /// dense layers (O, I), as timm's SE modules store them. Every check is made on the file's
    /// header before anything changes; then the tensors are read one at a time
    /// ([`TensorFile`]), so loading holds one tensor beside the model, not the whole file.
    pub fn load_weights(&self, path: &Path) -> Result<()> {
        let mut file = TensorFile::open(path)?;
        let vars = self.named_vars();
        self.check_state_dict(&vars, file.shapes()?, path)?;
        for (name, var) in &vars {
            let t = file
                .read(name, &self.device)?
                .ok_or_else(|| Error::MissingTensor { path: path.to_path_buf(), name: name.clone() })?;
            var.set(&t.reshape(var.dims())?)?;
        }
        Ok(())
    }

    /// Loads every variable from named tensors (a PyTorch state dict read by the caller), with
    /// the checks and allowances of [`Model::load_weights`]; `source` names the file in errors.
    /// Nothing changes unless every tensor fits.
    pub fn load_state_dict(&self, tensors: HashMap<String, Tensor>, source: &Path) -> Result<()> {
        let vars = self.named_vars();
        let shapes = tensors.iter().map(|(name, t)| (name.clone(), t.dtype(), t.dims().to_vec())).collect();
        self.check_state_dict(&vars, shapes, source)?;
        for (name, var) in &vars {
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::MissingTensor { path: source.to_path_buf(), name: name.clone() })?;
            var.set(&t.reshape(var.dims())?.to_device(&self.device)?)?;
        }
        Ok(())
    }

    /// Whether tensors of these names, dtypes and shapes load into `vars` (see
    /// [`Model::load_weights`]): every variable present with its dtype and its shape (or a
    /// dense layer's as (O, I, 1, 1)), nothing else but BatchNorm's `num_batches_tracked`.
    fn check_state_dict(
        &self,
        vars: &BTreeMap<String, Var>,
        shapes: Vec<(String, DType, Vec<usize>)>,
        path: &Path,
    ) -> Result<()> {
        let bookkeeping = |name: &str| {
            name.strip_suffix("num_batches_tracked").is_some_and(|bn| vars.contains_key(&format!("{bn}running_mean")))
        };
        let found: HashMap<String, (DType, Vec<usize>)> = shapes
            .into_iter()
            .filter(|(name, _, _)| !bookkeeping(name))
            .map(|(name, dtype, dims)| (name, (dtype, dims)))
            .collect();
        if let Some(name) = found.keys().filter(|k| !vars.contains_key(*k)).min() {
            return Err(Error::UnexpectedTensor {
                path: path.to_path_buf(),
                name: name.clone(),
                model: self.config.name.clone(),
            });
        }
        for (name, var) in vars {
            let (dtype, dims) =
                found.get(name).ok_or_else(|| Error::MissingTensor { path: path.to_path_buf(), name: name.clone() })?;
            let dense_as_conv =
                matches!((var.dims(), dims.as_slice()), (&[o, i], &[to, ti, 1, 1]) if (o, i) == (to, ti));
            if dims != var.dims() && !dense_as_conv {
                return Err(Error::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                    found: dims.clone(),
                });
            }
            if *dtype != var.dtype() {
                return Err(Error::DtypeMismatch {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    expected: var.dtype().as_str().to_string(),
                    found: dtype.as_str().to_string(),
                });
            }
        }
        Ok(())
    }
}

impl Model {
    /// [`ModuleT::forward_t`] without a gradient graph, for evaluation, prediction and
    /// BatchNorm recalibration (PyTorch's `torch.no_grad()`): every block's output is
    /// detached, so each block's activations are freed as soon as the next block has its
    /// output, where a forward that could be differentiated keeps every activation of the
    /// network alive until its result is dropped. The logits are the same; no gradient
    /// reaches the weights before the head.
    pub fn forward_without_graph(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_graph(x, train, false)
    }

    fn forward_graph(&self, x: &Tensor, train: bool, graph: bool) -> candle_core::Result<Tensor> {
        let cast;
        let x = match self.precision.activation_dtype() {
            Some(dtype) => {
                cast = sae_kernels::cast(x, dtype)?;
                &cast
            }
            None => x,
        };
        match &self.network {
            Network::ResNet(n) => n.forward_graph(x, train, graph),
            Network::MobileNetV1(n) => n.forward_graph(x, train, graph),
        }
    }
}

impl ModuleT for Model {
    /// Logits (N, num_classes) for images (N, in_channels, H, W): f32 whatever the precision.
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_graph(x, train, true)
    }
}
