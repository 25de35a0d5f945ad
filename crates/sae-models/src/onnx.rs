//! ONNX export: the eval-mode graph of a [`Model`] with its weights, for onnxruntime,
//! TensorRT or OpenVINO (opset 17, IR version 8).
//!
//! The graph is built from the model's config — the same structure `resnet.rs` and
//! `mobilenet.rs` build — with the model's tensors as initializers under their state-dict
//! names. Everything is a plain ONNX op: `Conv`, `BatchNormalization`, `Relu`, `Clip` (ReLU6),
//! `MaxPool`, `Add`, `Mul`, `Sigmoid`, `GlobalAveragePool`, `Flatten`, `Gemm`. An SE or SaE
//! module is `GlobalAveragePool` → `Conv` 1×1 (the K reduction layers stacked, which equals
//! their concatenation) → `Relu` → `Conv` 1×1 → `Sigmoid` → `Mul` (and `Add` for the
//! `u + u ⊙ s` gate). The input `input` is (batch, C, height, width) with batch and size
//! free; the output `logits` is (batch, classes).
//!
//! [`export_onnx_with_metadata`] also writes key-value strings into the model's
//! `metadata_props` (onnxruntime: `session.get_modelmeta().custom_metadata_map`); `sae export
//! --run` puts a run's class names and preprocessing there.
//!
//! The protobuf is written by hand (a few message types of `onnx.proto`, proto2 encoding), so
//! the export needs no protobuf compiler or generated code.

use crate::config::{Arch, Attention, BlockKind, Stem};
use crate::protobuf::{field_bytes, field_f32, field_varint};
use crate::{Error, Gate, Model, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// The ONNX opset the graph uses.
pub const OPSET: i64 = 17;
const IR_VERSION: i64 = 8;

/// Writes the eval-mode ONNX graph of `model`, weights included, to `path` (atomically).
pub fn export_onnx(model: &Model, path: &Path) -> Result<()> {
    export_onnx_with_metadata(model, path, &[])
}

/// [`export_onnx`] with `metadata` as the model's `metadata_props`, (key, value) in order.
pub fn export_onnx_with_metadata(model: &Model, path: &Path, metadata: &[(String, String)]) -> Result<()> {
    let cfg = model.config();
    let tensors: BTreeMap<String, Tensor> =
        model.named_vars().into_iter().map(|(name, var)| (name, var.as_tensor().clone())).collect();
    let mut g = GraphBuilder { tensors, nodes: Vec::new(), initializers: Vec::new(), next: 0 };
    let logits = match cfg.arch {
        Arch::Resnet { block, layers, groups, .. } => {
            let mut y = match cfg.stem {
                Stem::Imagenet => {
                    let y = g.conv_bn("input", "conv1", "bn1", 2, 3, 1, cfg.bn_eps)?;
                    let y = g.relu(&y);
                    g.node(
                        "MaxPool",
                        &[&y],
                        vec![ints("kernel_shape", &[3, 3]), ints("strides", &[2, 2]), ints("pads", &[1; 4])],
                    )
                }
                Stem::Cifar => {
                    let y = g.conv_bn("input", "conv1", "bn1", 1, 1, 1, cfg.bn_eps)?;
                    g.relu(&y)
                }
            };
            let expansion = if block == BlockKind::Bottleneck { 4 } else { 1 };
            let mut in_ch = 64;
            for (stage, &count) in layers.iter().enumerate() {
                let planes = 64 << stage;
                for i in 0..count {
                    let p = format!("layer{}.{i}", stage + 1);
                    let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                    let eps = cfg.bn_eps;
                    let mut r = match block {
                        BlockKind::Basic => {
                            let r = g.conv_bn(&y, &format!("{p}.conv1"), &format!("{p}.bn1"), stride, 1, 1, eps)?;
                            let r = g.relu(&r);
                            g.conv_bn(&r, &format!("{p}.conv2"), &format!("{p}.bn2"), 1, 1, 1, eps)?
                        }
                        BlockKind::Bottleneck => {
                            let r = g.conv_bn(&y, &format!("{p}.conv1"), &format!("{p}.bn1"), 1, 0, 1, eps)?;
                            let r = g.relu(&r);
                            let r =
                                g.conv_bn(&r, &format!("{p}.conv2"), &format!("{p}.bn2"), stride, 1, groups, eps)?;
                            let r = g.relu(&r);
                            g.conv_bn(&r, &format!("{p}.conv3"), &format!("{p}.bn3"), 1, 0, 1, eps)?
                        }
                    };
                    if cfg.attention != Attention::None {
                        r = g.excitation(&r, &format!("{p}.se"), cfg.gate)?;
                    }
                    let out_ch = planes * expansion;
                    let shortcut = if stride != 1 || in_ch != out_ch {
                        let (conv, bn) = (format!("{p}.downsample.0"), format!("{p}.downsample.1"));
                        g.conv_bn(&y, &conv, &bn, stride, 0, 1, eps)?
                    } else {
                        y.clone()
                    };
                    let sum = g.node("Add", &[&r, &shortcut], vec![]);
                    y = g.relu(&sum);
                    in_ch = out_ch;
                }
            }
            g.head(&y, "fc")?
        }
        Arch::MobilenetV1 { .. } => {
            let stride = if cfg.stem == Stem::Imagenet { 2 } else { 1 };
            g.relu6_bounds()?;
            let y = g.conv_bn("input", "conv_stem", "bn1", stride, 1, 1, cfg.bn_eps)?;
            let mut y = g.relu6(&y);
            for (i, &(_, stride)) in crate::mobilenet::BLOCKS.iter().enumerate() {
                let p = format!("blocks.{i}");
                let channels = g.tensor(&format!("{p}.conv_dw.weight"))?.dim(0)?;
                let dw = g.conv_bn(
                    &y,
                    &format!("{p}.conv_dw"),
                    &format!("{p}.bn1"),
                    stride as i64,
                    1,
                    channels,
                    cfg.bn_eps,
                )?;
                let dw = g.relu6(&dw);
                let pw = g.conv_bn(&dw, &format!("{p}.conv_pw"), &format!("{p}.bn2"), 1, 0, 1, cfg.bn_eps)?;
                y = g.relu6(&pw);
            }
            g.head(&y, "classifier")?
        }
    };
    let bytes = g.model_proto(&logits, cfg.in_channels, cfg.num_classes, &cfg.name, metadata);
    Ok(sae_fs::write_atomic(path, &bytes)?)
}

/// Nodes and initializers of the graph being built; each node's output is a fresh name.
struct GraphBuilder {
    tensors: BTreeMap<String, Tensor>,
    nodes: Vec<Vec<u8>>,
    initializers: Vec<Vec<u8>>,
    next: usize,
}

impl GraphBuilder {
    fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::InvalidConfig(format!("ONNX export: the model has no tensor {name:?}")))
    }

    /// Adds `t` as an f32 initializer named `name`.
    fn initializer(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut p = Vec::new();
        for &d in t.dims() {
            field_varint(&mut p, 1, d as u64);
        }
        field_varint(&mut p, 2, 1); // FLOAT
        field_bytes(&mut p, 8, name.as_bytes());
        field_bytes(&mut p, 9, &values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        self.initializers.push(p);
        Ok(())
    }

    /// The model tensor `name` as an initializer.
    fn weight(&mut self, name: &str) -> Result<String> {
        let t = self.tensor(name)?.clone();
        self.initializer(name, &t)?;
        Ok(name.to_string())
    }

    fn node(&mut self, op: &str, inputs: &[&str], attributes: Vec<Vec<u8>>) -> String {
        self.next += 1;
        let output = format!("{}_{}", op.to_lowercase(), self.next);
        let mut p = Vec::new();
        for i in inputs {
            field_bytes(&mut p, 1, i.as_bytes());
        }
        field_bytes(&mut p, 2, output.as_bytes());
        field_bytes(&mut p, 3, output.as_bytes());
        field_bytes(&mut p, 4, op.as_bytes());
        for a in attributes {
            field_bytes(&mut p, 5, &a);
        }
        self.nodes.push(p);
        output
    }

    fn relu(&mut self, x: &str) -> String {
        self.node("Relu", &[x], vec![])
    }

    /// ReLU6 as `Clip` between the scalar initializers `relu6.min` and `relu6.max`, which
    /// [`GraphBuilder::relu6_bounds`] adds once.
    fn relu6(&mut self, x: &str) -> String {
        self.node("Clip", &[x, "relu6.min", "relu6.max"], vec![])
    }

    fn relu6_bounds(&mut self) -> Result<()> {
        let cpu = candle_core::Device::Cpu;
        self.initializer("relu6.min", &Tensor::new(0f32, &cpu)?)?;
        self.initializer("relu6.max", &Tensor::new(6f32, &cpu)?)
    }

    /// Convolution `conv` (with its bias when the model has one), then eval-mode BatchNorm `bn`.
    #[allow(clippy::too_many_arguments)]
    fn conv_bn(
        &mut self,
        x: &str,
        conv: &str,
        bn: &str,
        stride: i64,
        pad: i64,
        groups: usize,
        eps: f64,
    ) -> Result<String> {
        let w = self.weight(&format!("{conv}.weight"))?;
        let k = self.tensor(&w)?.dim(2)? as i64;
        let bias_name = format!("{conv}.bias");
        let mut inputs = vec![x.to_string(), w];
        if self.tensors.contains_key(&bias_name) {
            inputs.push(self.weight(&bias_name)?);
        }
        let attrs = vec![
            ints("kernel_shape", &[k, k]),
            ints("strides", &[stride, stride]),
            ints("pads", &[pad; 4]),
            int("group", groups as i64),
        ];
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let y = self.node("Conv", &inputs, attrs);
        let names = ["weight", "bias", "running_mean", "running_var"].map(|n| format!("{bn}.{n}"));
        for n in &names {
            self.weight(n)?;
        }
        let [scale, bias, mean, var] = names.each_ref().map(String::as_str);
        Ok(self.node("BatchNormalization", &[&y, scale, bias, mean, var], vec![float("epsilon", eps as f32)]))
    }

    /// The SE / SaE module at `p` (`p.fc1` or `p.fc1.{k}`, and `p.fc2`) on `x`.
    fn excitation(&mut self, x: &str, p: &str, gate: Gate) -> Result<String> {
        let z = self.node("GlobalAveragePool", &[x], vec![]);
        let branches: Vec<String> = if self.tensors.contains_key(&format!("{p}.fc1.weight")) {
            vec![format!("{p}.fc1")]
        } else {
            (0..)
                .map(|k| format!("{p}.fc1.{k}"))
                .take_while(|b| self.tensors.contains_key(&format!("{b}.weight")))
                .collect()
        };
        let stack = |what: &str| -> Result<Tensor> {
            let parts =
                branches.iter().map(|b| self.tensor(&format!("{b}.{what}")).cloned()).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        };
        let (w1, b1) = (stack("weight")?, stack("bias")?);
        let (hidden, channels) = w1.dims2()?;
        let (w1_name, b1_name) = (format!("{p}.fc1.stacked.weight"), format!("{p}.fc1.stacked.bias"));
        self.initializer(&w1_name, &w1.reshape((hidden, channels, 1, 1))?)?;
        self.initializer(&b1_name, &b1)?;
        let one = vec![ints("kernel_shape", &[1, 1])];
        let h = self.node("Conv", &[&z, &w1_name, &b1_name], one.clone());
        let h = self.relu(&h);
        let w2 = self.tensor(&format!("{p}.fc2.weight"))?.reshape((channels, hidden, 1, 1))?;
        let w2_name = format!("{p}.fc2.conv.weight");
        self.initializer(&w2_name, &w2)?;
        let b2 = self.weight(&format!("{p}.fc2.bias"))?;
        let a = self.node("Conv", &[&h, &w2_name, &b2], one);
        let s = self.node("Sigmoid", &[&a], vec![]);
        let scaled = self.node("Mul", &[x, &s], vec![]);
        Ok(match gate {
            Gate::S => scaled,
            Gate::OnePlusS => self.node("Add", &[x, &scaled], vec![]),
        })
    }

    /// Global average pool, flatten and the dense layer `p`.
    fn head(&mut self, x: &str, p: &str) -> Result<String> {
        let pooled = self.node("GlobalAveragePool", &[x], vec![]);
        let flat = self.node("Flatten", &[&pooled], vec![int("axis", 1)]);
        let (w, b) = (self.weight(&format!("{p}.weight"))?, self.weight(&format!("{p}.bias"))?);
        Ok(self.node("Gemm", &[&flat, &w, &b], vec![int("transB", 1)]))
    }

    /// The serialised `ModelProto`, with `logits` renamed as the graph's output.
    fn model_proto(
        mut self,
        logits: &str,
        channels: usize,
        classes: usize,
        name: &str,
        metadata: &[(String, String)],
    ) -> Vec<u8> {
        // The last node's output becomes `logits`.
        let identity = {
            let mut p = Vec::new();
            field_bytes(&mut p, 1, logits.as_bytes());
            field_bytes(&mut p, 2, b"logits");
            field_bytes(&mut p, 3, b"output");
            field_bytes(&mut p, 4, b"Identity");
            p
        };
        self.nodes.push(identity);
        let mut graph = Vec::new();
        for n in &self.nodes {
            field_bytes(&mut graph, 1, n);
        }
        field_bytes(&mut graph, 2, name.as_bytes());
        for t in &self.initializers {
            field_bytes(&mut graph, 5, t);
        }
        field_bytes(
            &mut graph,
            11,
            &value_info(
                "input",
                &[Dim::Param("batch"), Dim::Value(channels), Dim::Param("height"), Dim::Param("width")],
            ),
        );
        field_bytes(&mut graph, 12, &value_info("logits", &[Dim::Param("batch"), Dim::Value(classes)]));
        let mut model = Vec::new();
        field_varint(&mut model, 1, IR_VERSION as u64);
        field_bytes(&mut model, 2, b"sae");
        field_bytes(&mut model, 3, env!("CARGO_PKG_VERSION").as_bytes());
        field_bytes(&mut model, 7, &graph);
        let mut opset = Vec::new();
        field_bytes(&mut opset, 1, b"");
        field_varint(&mut opset, 2, OPSET as u64);
        field_bytes(&mut model, 8, &opset);
        for (key, value) in metadata {
            // A StringStringEntryProto: key = 1, value = 2.
            let mut entry = Vec::new();
            field_bytes(&mut entry, 1, key.as_bytes());
            field_bytes(&mut entry, 2, value.as_bytes());
            field_bytes(&mut model, 14, &entry);
        }
        model
    }
}

/// One dimension of a value's shape: fixed or named (free).
enum Dim<'a> {
    Value(usize),
    Param(&'a str),
}

/// A `ValueInfoProto` of an f32 tensor.
fn value_info(name: &str, dims: &[Dim]) -> Vec<u8> {
    let mut shape = Vec::new();
    for d in dims {
        let mut dim = Vec::new();
        match d {
            Dim::Value(v) => field_varint(&mut dim, 1, *v as u64),
            Dim::Param(p) => field_bytes(&mut dim, 2, p.as_bytes()),
        }
        field_bytes(&mut shape, 1, &dim);
    }
    let mut tensor_type = Vec::new();
    field_varint(&mut tensor_type, 1, 1); // FLOAT
    field_bytes(&mut tensor_type, 2, &shape);
    let mut type_proto = Vec::new();
    field_bytes(&mut type_proto, 1, &tensor_type);
    let mut out = Vec::new();
    field_bytes(&mut out, 1, name.as_bytes());
    field_bytes(&mut out, 2, &type_proto);
    out
}

/// An `AttributeProto` holding one int.
fn int(name: &str, v: i64) -> Vec<u8> {
    let mut p = Vec::new();
    field_bytes(&mut p, 1, name.as_bytes());
    field_varint(&mut p, 3, v as u64);
    field_varint(&mut p, 20, 2); // INT
    p
}

/// An `AttributeProto` holding a list of ints.
fn ints(name: &str, v: &[i64]) -> Vec<u8> {
    let mut p = Vec::new();
    field_bytes(&mut p, 1, name.as_bytes());
    for &x in v {
        field_varint(&mut p, 8, x as u64);
    }
    field_varint(&mut p, 20, 7); // INTS
    p
}

/// An `AttributeProto` holding one float.
fn float(name: &str, v: f32) -> Vec<u8> {
    let mut p = Vec::new();
    field_bytes(&mut p, 1, name.as_bytes());
    field_f32(&mut p, 2, v);
    field_varint(&mut p, 20, 1); // FLOAT
    p
}
