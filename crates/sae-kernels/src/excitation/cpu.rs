//! The excitation's CPU kernels: a rayon-parallel pass over the planes to pool them, the dense
//! layers for the whole batch through `gemm`, and a second pass to scale (forward) or to form
//! the input gradient (backward).

use super::op::ExcitationOp;
use crate::cpu::{
    axpy, matmul_threads, min_planes_per_task, sum, sum_and_dot, uninit, vectorized, Elem, Mat, Products,
};
use crate::layout::Strided4;
use candle_core::{bail, Layout, Result};
use rayon::prelude::*;

impl ExcitationOp {
    fn check(&self, x: &Strided4, params_len: usize) -> Result<()> {
        if x.dims[1] != self.channels {
            bail!("excitation: input has {} channels, weights expect {}", x.dims[1], self.channels)
        }
        if params_len != self.offsets().len {
            bail!("excitation: the parameters have {params_len} values, expected {}", self.offsets().len)
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
    ///
    /// The reduction layer may come as K branches (`w1`, `b1`: one slice each, rows in
    /// concatenation order): each branch's product fills its own rows of `hᵀ`.
    pub(crate) fn gates(&self, p: &DenseParams, z: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (c, hd) = (self.channels, self.hidden);
        let n = z.len() / c;
        // hᵀ = ReLU(W1 zᵀ + b1): W1 is (hidden, C) row-major, z is read transposed.
        let mut ht = vec![0f32; hd * n];
        let mut rows = ht.as_mut_slice();
        for w1 in &p.w1 {
            let (branch, rest) = rows.split_at_mut(w1.len() / c * n);
            dense_matmul(w1.len() / c, n, c, Mat { data: w1, rs: c, cs: 1 }, Mat { data: z, rs: 1, cs: c }, branch);
            rows = rest;
        }
        for (row, b) in ht.chunks_mut(n).zip(p.b1.iter().flat_map(|b| b.iter())) {
            row.iter_mut().for_each(|v| *v = (*v + b).max(0.0));
        }
        // s = sigmoid(W2 hᵀ + b2)ᵀ: W2 is (C, hidden) row-major.
        let mut st = vec![0f32; c * n];
        dense_matmul(c, n, hd, Mat { data: p.w2, rs: hd, cs: 1 }, Mat { data: &ht, rs: n, cs: 1 }, &mut st);
        let mut s = vec![0f32; n * c];
        for (ci, (row, b)) in st.chunks(n).zip(p.b2).enumerate() {
            for (ni, v) in row.iter().enumerate() {
                s[ni * c + ci] = 1.0 / (1.0 + (-(v + b)).exp());
            }
        }
        (ht, s)
    }

    /// The forward pass; `p` is the parameters in f32 (converted, or f32 master weights).
    /// With a `residual` (contiguous, `x`'s shape: `crate::relu::shortcut_slice`) the output is `max(excitation(x) +
    /// residual, 0)`, formed in the scaling pass: a residual block's addition and ReLU without
    /// writing and reading back the excitation's output.
    pub(crate) fn cpu_forward<T: Elem>(
        &self,
        x: &[T],
        xl: &Layout,
        p: &DenseParams,
        residual: Option<&[T]>,
    ) -> Result<Vec<T>> {
        let xs = Strided4::new("excitation", "input", xl)?;
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
                    Some(values) => vectorized!(sum(values)),
                    None => {
                        let mut total = 0f32;
                        xs.for_each_in_plane(x, plane / c, plane % c, |_, v| total += v.to_f32());
                        total
                    }
                };
                total * inv_hw
            })
            .collect();
        let (_, s) = self.gates(p, &z);
        let mut out = uninit::<T>(n * c * hw);
        out.par_chunks_mut(hw).with_min_len(min_len).enumerate().for_each(|(plane, out)| {
            let g = self.gate.factor(s[plane]);
            let (ni, ci) = (plane / c, plane % c);
            match (xs.contiguous_plane(x, ni, ci), residual) {
                (Some(src), None) => vectorized!(for (o, &v) in out.iter_mut().zip(src) {
                    *o = T::from_f32(v.to_f32() * g);
                }),
                (Some(src), Some(r)) => {
                    let r = &r[plane * hw..(plane + 1) * hw];
                    vectorized!(for (o, (&v, &r)) in out.iter_mut().zip(src.iter().zip(r)) {
                        *o = T::from_f32((v.to_f32() * g + r.to_f32()).max(0.0));
                    })
                }
                (None, None) => xs.for_each_in_plane(x, ni, ci, |k, v| out[k] = T::from_f32(v.to_f32() * g)),
                (None, Some(r)) => {
                    let r = &r[plane * hw..(plane + 1) * hw];
                    xs.for_each_in_plane(x, ni, ci, |k, v| {
                        out[k] = T::from_f32((v.to_f32() * g + r[k].to_f32()).max(0.0))
                    })
                }
            }
        });
        Ok(out)
    }

    /// The dense layers' backward for the whole batch, from the pooled means `z` (N × C) and
    /// `sgx` = Σ_hw g ⊙ u per plane (the gradient reaching the gate through the scale), with the
    /// weights on the left as in `gates`: da = ds·s(1−s), dhᵀ = W2ᵀ daᵀ masked by the ReLU,
    /// dzᵀ = W1ᵀ dhᵀ, and the parameter gradients dW1 = dhᵀ z, db1 = Σ dh, dW2 = daᵀ h,
    /// db2 = Σ da, written into `dp` (packed as the parameters). Returns the gates `s` (N × C)
    /// and `dzᵀ` (C × N).
    pub(crate) fn dense_backward(
        &self,
        p: &[f32],
        z: &[f32],
        sgx: &[f32],
        dp: &mut [f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (c, hd, o) = (self.channels, self.hidden, self.offsets());
        let n = z.len() / c;
        let (ht, s) = self.gates(&DenseParams::packed(self, p)?, z);
        let da: Vec<f32> = sgx.iter().zip(&s).map(|(&sgx, &s)| sgx * s * (1.0 - s)).collect();
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
        dense_matmul(hd, c, n, Mat { data: &dht, rs: n, cs: 1 }, Mat { data: z, rs: c, cs: 1 }, &mut dp[..o.b1]);
        dense_matmul(c, hd, n, Mat { data: &da, rs: 1, cs: c }, Mat { data: &ht, rs: 1, cs: n }, &mut dp[o.w2..o.b2]);
        for (db1, row) in dp[o.b1..o.w2].iter_mut().zip(dht.chunks(n)) {
            *db1 = row.iter().sum();
        }
        let db2 = &mut dp[o.b2..];
        db2.fill(0.0);
        for row in da.chunks(c) {
            axpy(1.0, row, db2);
        }
        Ok((s, dzt))
    }

    /// The backward pass; `p` as in [`Self::cpu_forward`]: the input's gradient, and the
    /// parameters' in f32 (for a [`crate::cpu::GradientSlot`]), each written in full.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cpu_backward<T: Elem>(
        &self,
        x: &[T],
        xl: &Layout,
        p: &[f32],
        g: &[T],
        gl: &Layout,
    ) -> Result<(Vec<T>, Vec<f32>)> {
        let xs = Strided4::new("excitation backward", "input", xl)?;
        let gs = Strided4::new("excitation backward", "output gradient", gl)?;
        if gs.dims != xs.dims {
            bail!("excitation backward: gradient shape {:?} differs from input shape {:?}", gs.dims, xs.dims)
        }
        self.check(&xs, p.len())?;
        let [n, c, _, _] = xs.dims;
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
                        let (sx, sgx) = vectorized!(sum_and_dot(xp, gp));
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
        let sgx: Vec<f32> = sums.iter().map(|s| s.1).collect();

        let (mut dx, mut dp) = (uninit::<T>(n * c * hw), uninit::<f32>(o.len));
        let (s, dzt) = self.dense_backward(p, &z, &sgx, &mut dp)?;

        // Pass 2: dx = g·gate(s) + dz/HW.
        dx.par_chunks_mut(hw).with_min_len(min_len).enumerate().for_each(|(plane, dx)| {
            let factor = self.gate.factor(s[plane]);
            let shift = dzt[(plane % c) * n + plane / c] * inv_hw;
            match gs.contiguous_plane(g, plane / c, plane % c) {
                Some(gp) => vectorized!(for (d, &v) in dx.iter_mut().zip(gp) {
                    *d = T::from_f32(v.to_f32() * factor + shift);
                }),
                None => gs.for_each_in_plane(g, plane / c, plane % c, |k, v| {
                    dx[k] = T::from_f32(v.to_f32() * factor + shift)
                }),
            }
        });
        Ok((dx, dp))
    }
}

/// The dense layers' parameters in f32, as slices: of the packed operand, or of each weight's
/// own storage (which saves the copy into one operand where no weight needs a gradient).
pub(crate) struct DenseParams<'a> {
    /// The reduction weights, one (rows, C) slice per branch (one for the stack).
    pub w1: Vec<&'a [f32]>,
    /// Their biases, one per branch.
    pub b1: Vec<&'a [f32]>,
    /// The excitation weight, (C, hidden).
    pub w2: &'a [f32],
    /// Its bias, (C).
    pub b2: &'a [f32],
}

impl<'a> DenseParams<'a> {
    /// The parameters inside the packed operand `p` of `op` ([`ExcitationOp::offsets`]).
    pub fn packed(op: &ExcitationOp, p: &'a [f32]) -> Result<Self> {
        let o = op.offsets();
        if p.len() != o.len {
            bail!("excitation: packed parameters have {} values, expected {}", p.len(), o.len)
        }
        let rows = op.hidden / op.branches;
        Ok(Self {
            w1: p[..o.b1].chunks(rows * op.channels).collect(),
            b1: p[o.b1..o.w2].chunks(rows).collect(),
            w2: &p[o.w2..o.b2],
            b2: &p[o.b2..],
        })
    }

    /// The number of values, as in the packed operand.
    fn len(&self) -> usize {
        self.w1.iter().chain(&self.b1).map(|v| v.len()).sum::<usize>() + self.w2.len() + self.b2.len()
    }
}

/// The dense layers' products are small (batch × C × C/r); below a few million
/// multiply-adds, waking the thread pool costs more than it saves.
fn dense_matmul(m: usize, n: usize, k: usize, a: Mat, b: Mat, out: &mut [f32]) {
    let threads = if m * n * k < 1 << 22 { 1 } else { rayon::current_num_threads() };
    matmul_threads(Products::F32, threads, m, n, k, a, b, out, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::excitation::op::Gate;

    /// The passes over planes in `vectorized!` code (the pooling sums, the scaling with and
    /// without the residual end, the backward's sums and its input gradient) compute the
    /// baseline build's bits.
    #[test]
    fn vectorized_passes_equal_the_baseline_bit_for_bit() {
        use crate::cpu::BASELINE_VECTORS;
        use std::sync::atomic::Ordering;
        for (dims, gate) in [([3usize, 5, 7, 5], Gate::OnePlusS), ([2, 4, 9, 9], Gate::S)] {
            let [n, c, h, w] = dims;
            let op = ExcitationOp { channels: c, hidden: 4, branches: 2, gate };
            let value = |i: usize, k: usize| ((i * k) % 97) as f32 * 0.031 - 1.5;
            let len = n * c * h * w;
            let (x, r, g): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                (0..len).map(|i| value(i, 7919)).collect(),
                (0..len).map(|i| value(i, 13)).collect(),
                (0..len).map(|i| value(i, 31)).collect(),
            );
            let p: Vec<f32> = (0..op.offsets().len).map(|i| value(i, 101) * 0.2).collect();
            let layout = Layout::contiguous((n, c, h, w));
            let run = |baseline: bool| {
                BASELINE_VECTORS.store(baseline, Ordering::SeqCst);
                let params = DenseParams::packed(&op, &p).unwrap();
                let plain = op.cpu_forward::<f32>(&x, &layout, &params, None).unwrap();
                let ended = op.cpu_forward::<f32>(&x, &layout, &params, Some(&r)).unwrap();
                let (dx, dparams) = op.cpu_backward::<f32>(&x, &layout, &p, &g, &layout).unwrap();
                BASELINE_VECTORS.store(false, Ordering::SeqCst);
                [plain, ended, dx, dparams]
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (k, (wide, baseline)) in run(false).iter().zip(run(true).iter()).enumerate() {
                assert_eq!(bits(wide), bits(baseline), "{dims:?}, pass {k}");
            }
        }
    }
}
