//! The SE / SaE excitation: squeeze (global average pool), K parallel reductions,
//! concatenation, excitation and scaling, as one op.
//!
//! For `u` of shape (N, C, H, W):
//!
//! ```text
//! z   = mean_{H,W} u                               (N, C)
//! h_k = ReLU(W1_k z + b1_k)      k = 1..K          (N, C/r) each
//! h   = concat(h_1, …, h_K)                        (N, K·C/r)
//! s   = sigmoid(W2 h + b2)                         (N, C)
//! out = u ⊙ s         (Gate::S, the original SENet)
//!     = u + u ⊙ s     (Gate::OnePlusS, the SENetV2 authors' code)
//! ```
//!
//! The K branches all read the same `z`, so their concatenation equals one dense layer whose
//! weight is the branches' weights stacked row-wise. [`ExcitationWeights::fc1_weight`] is that
//! stack, (K·C/r, C); models keep one tensor per branch and stack them before calling.
//!
//! The fused CPU kernel reads `u` once in the forward pass to pool it and once to scale it,
//! and in the backward pass reads `u` once and the output gradient twice, which is what the
//! math requires. The gates `s` are recomputed in the backward pass from the pooled values
//! (a few kFLOP per image) rather than kept alive between passes.

use crate::cpu::{
    as_f32, axpy, dispatch_float, matmul_threads, min_planes_per_task, same_dtype, sum, sum_and_dot, uninit, unpack,
    Elem, Mat, Strided4,
};
use crate::Implementation;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// How the gates scale the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Gate {
    /// `u ⊙ s`, the original SENet.
    #[serde(rename = "s")]
    S,
    /// `u + u ⊙ s`, as in the SENetV2 authors' published code (the paper presets).
    #[serde(rename = "one_plus_s")]
    OnePlusS,
}

impl Gate {
    /// The config spelling: `s` or `one_plus_s`.
    pub fn name(self) -> &'static str {
        match self {
            Gate::S => "s",
            Gate::OnePlusS => "one_plus_s",
        }
    }

    /// Scale factor for a gate value `s`.
    #[inline(always)]
    fn factor(self, s: f32) -> f32 {
        match self {
            Gate::S => s,
            Gate::OnePlusS => 1.0 + s,
        }
    }

    /// Numeric code of the gate mode for the GPU kernels (0: `s`, 1: `one_plus_s`).
    #[allow(dead_code)]
    pub(crate) fn code(self) -> u32 {
        match self {
            Gate::S => 0,
            Gate::OnePlusS => 1,
        }
    }
}

impl std::str::FromStr for Gate {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "s" => Ok(Gate::S),
            "one_plus_s" => Ok(Gate::OnePlusS),
            other => Err(crate::error::Error::UnknownGate(other.to_string())),
        }
    }
}

/// The dense layers of an SE (K = 1) or SaE (K > 1) module.
///
/// # Shapes
/// * `fc1_weight`: (K·C/r, C) — the K branch weights stacked in branch order
/// * `fc1_bias`: (K·C/r)
/// * `fc2_weight`: (C, K·C/r)
/// * `fc2_bias`: (C)
#[derive(Debug, Clone, Copy)]
pub struct ExcitationWeights<'a> {
    /// Stacked reduction weights, (K·C/r, C).
    pub fc1_weight: &'a Tensor,
    /// Stacked reduction biases, (K·C/r).
    pub fc1_bias: &'a Tensor,
    /// Excitation weight, (C, K·C/r).
    pub fc2_weight: &'a Tensor,
    /// Excitation bias, (C).
    pub fc2_bias: &'a Tensor,
}

impl ExcitationWeights<'_> {
    /// Checks the shapes against `channels` and returns the hidden width K·C/r.
    fn hidden(&self, channels: usize) -> Result<usize> {
        let (hidden, c1) = self.fc1_weight.dims2()?;
        let expect = |t: &Tensor, name: &str, dims: &[usize]| -> Result<()> {
            if t.dims() != dims {
                bail!("excitation: {name} must have shape {dims:?}, got {:?}", t.dims())
            }
            Ok(())
        };
        expect(self.fc1_weight, "fc1_weight", &[hidden, channels])?;
        if c1 != channels || hidden == 0 {
            bail!("excitation: fc1_weight must have shape (hidden > 0, {channels}), got {:?}", self.fc1_weight.dims())
        }
        expect(self.fc1_bias, "fc1_bias", &[hidden])?;
        expect(self.fc2_weight, "fc2_weight", &[channels, hidden])?;
        expect(self.fc2_bias, "fc2_bias", &[channels])?;
        Ok(hidden)
    }
}

/// Applies the excitation with the chosen implementation.
///
/// # Shapes
/// * `x`: (N, C, H, W), any strides; the weights as in [`ExcitationWeights`]
/// * returns (N, C, H, W), contiguous
pub fn excitation(
    x: &Tensor,
    weights: &ExcitationWeights,
    gate: Gate,
    implementation: Implementation,
) -> Result<Tensor> {
    match implementation {
        Implementation::Reference => excitation_reference(x, weights, gate),
        Implementation::Fused => excitation_fused(x, weights, gate),
    }
}

/// The excitation composed of plain Candle ops; the definition the fused op is tested against.
pub fn excitation_reference(x: &Tensor, weights: &ExcitationWeights, gate: Gate) -> Result<Tensor> {
    let (_, channels, _, _) = x.dims4()?;
    weights.hidden(channels)?;
    let z = x.mean((2, 3))?;
    let h = z.matmul(&weights.fc1_weight.t()?)?.broadcast_add(weights.fc1_bias)?.relu()?;
    let a = h.matmul(&weights.fc2_weight.t()?)?.broadcast_add(weights.fc2_bias)?;
    let s = (a.neg()?.exp()? + 1.0)?.recip()?.unsqueeze(2)?.unsqueeze(3)?;
    let scaled = x.broadcast_mul(&s)?;
    match gate {
        Gate::S => Ok(scaled),
        Gate::OnePlusS => x + scaled,
    }
}

fn excitation_fused(x: &Tensor, weights: &ExcitationWeights, gate: Gate) -> Result<Tensor> {
    let (op, params) = fused_operands(x, weights, gate)?;
    x.apply_op2(&params, op)
}

/// The gradients of [`excitation`] with respect to its input and every weight.
#[derive(Debug, Clone)]
pub struct ExcitationGradients {
    /// Gradient for the input, (N, C, H, W).
    pub input: Tensor,
    /// Gradient for the stacked reduction weights, (K·C/r, C).
    pub fc1_weight: Tensor,
    /// Gradient for the stacked reduction biases, (K·C/r).
    pub fc1_bias: Tensor,
    /// Gradient for the excitation weight, (C, K·C/r).
    pub fc2_weight: Tensor,
    /// Gradient for the excitation bias, (C).
    pub fc2_bias: Tensor,
}

/// The fused backward pass on its own: the gradients of [`excitation`] for an output gradient
/// `grad` (N, C, H, W), computed by the same kernel Candle's autograd calls, without building
/// a graph or accumulating into a gradient store. For custom training loops, and for
/// measuring the kernels apart from Candle's gradient bookkeeping.
pub fn excitation_backward(
    x: &Tensor,
    weights: &ExcitationWeights,
    gate: Gate,
    grad: &Tensor,
) -> Result<ExcitationGradients> {
    let (op, params) = fused_operands(x, weights, gate)?;
    let packed = x.apply_op3_no_bwd(&params, grad, &ExcitationBackward(op))?;
    let shapes = [
        x.dims(),
        weights.fc1_weight.dims(),
        weights.fc1_bias.dims(),
        weights.fc2_weight.dims(),
        weights.fc2_bias.dims(),
    ];
    let [input, fc1_weight, fc1_bias, fc2_weight, fc2_bias] = unpack(&packed, shapes)?;
    Ok(ExcitationGradients { input, fc1_weight, fc1_bias, fc2_weight, fc2_bias })
}

/// Checks the weights against `x` and packs them for the fused ops.
fn fused_operands(x: &Tensor, weights: &ExcitationWeights, gate: Gate) -> Result<(Excitation, Tensor)> {
    let (_, channels, _, _) = x.dims4()?;
    let hidden = weights.hidden(channels)?;
    for (name, t) in [
        ("fc1_weight", weights.fc1_weight),
        ("fc1_bias", weights.fc1_bias),
        ("fc2_weight", weights.fc2_weight),
        ("fc2_bias", weights.fc2_bias),
    ] {
        if t.dtype() != x.dtype() {
            bail!("excitation: {name} has dtype {:?} but the input has {:?}", t.dtype(), x.dtype())
        }
    }
    // One flat parameter tensor keeps the op at two operands; Candle's `cat` backward splits
    // the parameter gradient back onto the individual weights.
    let params = Tensor::cat(
        &[
            weights.fc1_weight.flatten_all()?,
            weights.fc1_bias.clone(),
            weights.fc2_weight.flatten_all()?,
            weights.fc2_bias.clone(),
        ],
        0,
    )?;
    Ok((Excitation { channels, hidden, gate }, params))
}

/// Forward op: (x, packed params) → scaled x.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Excitation {
    pub channels: usize,
    pub hidden: usize,
    pub gate: Gate,
}

/// Backward op: (x, packed params, output gradient) → [dx | dparams] packed in one 1-D tensor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExcitationBackward(pub Excitation);

/// Offsets of the four parameter blocks inside the packed parameter vector.
pub(crate) struct ParamOffsets {
    pub b1: usize,
    pub w2: usize,
    pub b2: usize,
    pub len: usize,
}

impl Excitation {
    pub fn offsets(&self) -> ParamOffsets {
        let (c, h) = (self.channels, self.hidden);
        ParamOffsets { b1: h * c, w2: h * c + h, b2: 2 * h * c + h, len: 2 * h * c + h + c }
    }

    fn check(&self, x: &Strided4, params_len: usize) -> Result<()> {
        if x.dims[1] != self.channels {
            bail!("excitation: input has {} channels, weights expect {}", x.dims[1], self.channels)
        }
        if params_len != self.offsets().len {
            bail!("excitation: packed parameters have {params_len} values, expected {}", self.offsets().len)
        }
        Ok(())
    }

    /// Computes the hidden activations, transposed: `hᵀ` (hidden × N, after ReLU), and the
    /// gates `s` (N × C) from the pooled means `z` (N × C), with two small matrix products for
    /// the whole batch.
    ///
    /// The products are taken with the weight matrix on the left (`hᵀ = W1 zᵀ`, `sᵀ = W2 hᵀ`):
    /// with the batch as the short side, `gemm` reads the weights in place instead of repacking
    /// them on every call (the repacking was most of the dense layers' time in a profile at
    /// C = 2048, K = 4).
    fn gates(&self, p: &[f32], z: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (c, hd) = (self.channels, self.hidden);
        let o = self.offsets();
        let n = z.len() / c;
        // hᵀ = ReLU(W1 zᵀ + b1): W1 is (hidden, C) row-major, z is read transposed.
        let mut ht = vec![0f32; hd * n];
        dense_matmul(hd, n, c, Mat { data: &p[..o.b1], rs: c, cs: 1 }, Mat { data: z, rs: 1, cs: c }, &mut ht);
        for (row, b) in ht.chunks_mut(n).zip(&p[o.b1..o.w2]) {
            row.iter_mut().for_each(|v| *v = (*v + b).max(0.0));
        }
        // s = sigmoid(W2 hᵀ + b2)ᵀ: W2 is (C, hidden) row-major.
        let mut st = vec![0f32; c * n];
        dense_matmul(c, n, hd, Mat { data: &p[o.w2..o.b2], rs: hd, cs: 1 }, Mat { data: &ht, rs: n, cs: 1 }, &mut st);
        let mut s = vec![0f32; n * c];
        for (ci, (row, b)) in st.chunks(n).zip(&p[o.b2..]).enumerate() {
            for (ni, v) in row.iter().enumerate() {
                s[ni * c + ci] = 1.0 / (1.0 + (-(v + b)).exp());
            }
        }
        (ht, s)
    }

    fn cpu_forward<T: Elem>(&self, x: &[T], xl: &Layout, p: &[T], pl: &Layout) -> Result<Vec<T>> {
        let xs = Strided4::new("excitation", "input", xl)?;
        let p = as_f32("excitation", "parameters", p, pl)?;
        self.check(&xs, p.len())?;
        let [n, c, _, _] = xs.dims;
        let hw = xs.plane_len();
        let inv_hw = 1.0 / hw as f32;
        let min_len = min_planes_per_task(hw);
        let z: Vec<f32> = (0..n * c)
            .into_par_iter()
            .with_min_len(min_len)
            .map(|plane| {
                let total = match xs.contiguous_plane(x, plane / c, plane % c) {
                    Some(values) => sum(values),
                    None => {
                        let mut total = 0f32;
                        xs.for_each_in_plane(x, plane / c, plane % c, |_, v| total += v.to_f32());
                        total
                    }
                };
                total * inv_hw
            })
            .collect();
        let (_, s) = self.gates(&p, &z);
        let mut out = uninit::<T>(n * c * hw);
        out.par_chunks_mut(hw).with_min_len(min_len).enumerate().for_each(|(plane, out)| {
            let g = self.gate.factor(s[plane]);
            match xs.contiguous_plane(x, plane / c, plane % c) {
                Some(src) => {
                    for (o, &v) in out.iter_mut().zip(src) {
                        *o = T::from_f32(v.to_f32() * g);
                    }
                }
                None => xs.for_each_in_plane(x, plane / c, plane % c, |k, v| out[k] = T::from_f32(v.to_f32() * g)),
            }
        });
        Ok(out)
    }

    fn cpu_backward<T: Elem>(
        &self,
        x: &[T],
        xl: &Layout,
        p: &[T],
        pl: &Layout,
        g: &[T],
        gl: &Layout,
    ) -> Result<Vec<T>> {
        let xs = Strided4::new("excitation backward", "input", xl)?;
        let gs = Strided4::new("excitation backward", "output gradient", gl)?;
        if gs.dims != xs.dims {
            bail!("excitation backward: gradient shape {:?} differs from input shape {:?}", gs.dims, xs.dims)
        }
        let p = as_f32("excitation backward", "parameters", p, pl)?;
        self.check(&xs, p.len())?;
        let [n, c, _, _] = xs.dims;
        let hd = self.hidden;
        let o = self.offsets();
        let hw = xs.plane_len();
        let inv_hw = 1.0 / hw as f32;
        let min_len = min_planes_per_task(hw);

        // Pass 1: one read of x and of the gradient per plane gives the pooled mean z and
        // ds_raw = Σ_hw g ⊙ x, the gradient reaching the gate through the scale.
        let sums: Vec<(f32, f32)> = (0..n * c)
            .into_par_iter()
            .with_min_len(min_len)
            .map_init(
                || vec![0f32; hw],
                |gbuf, plane| {
                    let (ni, ci) = (plane / c, plane % c);
                    if let (Some(xp), Some(gp)) = (xs.contiguous_plane(x, ni, ci), gs.contiguous_plane(g, ni, ci)) {
                        let (sx, sgx) = sum_and_dot(xp, gp);
                        return (sx * inv_hw, sgx);
                    }
                    gs.for_each_in_plane(g, ni, ci, |k, v| gbuf[k] = v.to_f32());
                    let (mut sx, mut sgx) = (0f32, 0f32);
                    xs.for_each_in_plane(x, ni, ci, |k, v| {
                        let v = v.to_f32();
                        sx += v;
                        sgx += gbuf[k] * v;
                    });
                    (sx * inv_hw, sgx)
                },
            )
            .collect();
        let z: Vec<f32> = sums.iter().map(|s| s.0).collect();
        let (ht, s) = self.gates(&p, &z);

        // The dense layers for the whole batch, weights on the left as in `gates`:
        // da = ds·s(1−s), dhᵀ = W2ᵀ daᵀ masked by the ReLU, dzᵀ = W1ᵀ dhᵀ, and the parameter
        // gradients dW1 = dhᵀ z, db1 = Σ dh, dW2 = daᵀ h, db2 = Σ da.
        let da: Vec<f32> = sums.iter().zip(&s).map(|(&(_, sgx), &s)| sgx * s * (1.0 - s)).collect();
        let (w1, w2) = (&p[..o.b1], &p[o.w2..o.b2]);
        let mut dht = vec![0f32; hd * n];
        dense_matmul(hd, n, c, Mat { data: w2, rs: 1, cs: hd }, Mat { data: &da, rs: 1, cs: c }, &mut dht);
        for (d, &hv) in dht.iter_mut().zip(&ht) {
            if hv <= 0.0 {
                *d = 0.0;
            }
        }
        let mut dzt = vec![0f32; c * n];
        dense_matmul(c, n, hd, Mat { data: w1, rs: 1, cs: c }, Mat { data: &dht, rs: n, cs: 1 }, &mut dzt);

        // The parameter gradients go straight into the packed output when it is f32.
        let numel = n * c * hw;
        let mut out = uninit::<T>(numel + o.len);
        let (dx, dparams) = out.split_at_mut(numel);
        let mut converted = Vec::new();
        let dp = match T::as_f32_slice_mut(dparams) {
            Some(dp) => dp,
            None => {
                converted = uninit::<f32>(o.len);
                &mut converted
            }
        };
        dense_matmul(hd, c, n, Mat { data: &dht, rs: n, cs: 1 }, Mat { data: &z, rs: c, cs: 1 }, &mut dp[..o.b1]);
        dense_matmul(c, hd, n, Mat { data: &da, rs: 1, cs: c }, Mat { data: &ht, rs: 1, cs: n }, &mut dp[o.w2..o.b2]);
        for (db1, row) in dp[o.b1..o.w2].iter_mut().zip(dht.chunks(n)) {
            *db1 = row.iter().sum();
        }
        let db2 = &mut dp[o.b2..];
        db2.fill(0.0);
        for row in da.chunks(c) {
            axpy(1.0, row, db2);
        }
        for (d, v) in dparams.iter_mut().zip(&converted) {
            *d = T::from_f32(*v);
        }

        // Pass 2: dx = g·gate(s) + dz/HW, written straight into the packed output.
        dx.par_chunks_mut(hw).with_min_len(min_len).enumerate().for_each(|(plane, dx)| {
            let factor = self.gate.factor(s[plane]);
            let shift = dzt[(plane % c) * n + plane / c] * inv_hw;
            gs.for_each_in_plane(g, plane / c, plane % c, |k, v| dx[k] = T::from_f32(v.to_f32() * factor + shift));
        });
        Ok(out)
    }
}

impl CustomOp2 for Excitation {
    fn name(&self) -> &'static str {
        "sae-excitation"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, p: &CpuStorage, pl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_float!("excitation", x, |x: T| {
            let p = same_dtype::<T>("excitation", p)?;
            T::to_cpu_storage_owned(self.cpu_forward::<T>(x, xl, p, pl)?)
        });
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        p: &candle_core::CudaStorage,
        pl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::excitation_forward(self, x, xl, p, pl)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        xl: &Layout,
        p: &candle_core::MetalStorage,
        pl: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        crate::metal::excitation_forward(self, x, xl, p, pl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(params, grad, &ExcitationBackward(*self))?;
        let [dx, dparams] = unpack(&packed, [x.dims(), params.dims()])?;
        Ok((Some(dx), Some(dparams)))
    }
}

impl CustomOp3 for ExcitationBackward {
    fn name(&self) -> &'static str {
        "sae-excitation-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        p: &CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch_float!("excitation backward", x, |x: T| {
            let p = same_dtype::<T>("excitation backward", p)?;
            let g = same_dtype::<T>("excitation backward", g)?;
            T::to_cpu_storage_owned(self.0.cpu_backward::<T>(x, xl, p, pl, g, gl)?)
        });
        Ok((out, Shape::from(xl.shape().elem_count() + self.0.offsets().len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::excitation_backward(&self.0, x, xl, p, pl, g, gl)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        x: &candle_core::MetalStorage,
        xl: &Layout,
        p: &candle_core::MetalStorage,
        pl: &Layout,
        g: &candle_core::MetalStorage,
        gl: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        crate::metal::excitation_backward(&self.0, x, xl, p, pl, g, gl)
    }
}

/// The dense layers' products are small (batch × C × C/r); below a few million
/// multiply-adds, waking the thread pool costs more than it saves.
fn dense_matmul(m: usize, n: usize, k: usize, a: Mat, b: Mat, out: &mut [f32]) {
    let threads = if m * n * k < 1 << 22 { 1 } else { rayon::current_num_threads() };
    matmul_threads(threads, m, n, k, a, b, out, false)
}
