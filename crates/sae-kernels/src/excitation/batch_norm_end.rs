//! BatchNorm (training mode) → excitation → shortcut addition → ReLU, the end of an SE/SaE
//! residual block, as one op on the CPU.
//!
//! Composed ([`crate::batch_norm_train`], then [`super::excitation_add_relu`]), the forward
//! reads or writes a tensor of the block's output size eight times: BatchNorm's statistics
//! read `x` twice, its normalising pass reads `x` and writes `y`, the excitation reads `y` to
//! pool it, then reads `y` and the shortcut and writes the output; and `y` stays alive for the
//! backward. Here the pooled means come from BatchNorm's statistics pass — the mean of
//! `y = x·A + B` over a plane is `A·mean(x) + B` — and one pass writes
//! `max(gate(s)·(x·A + B) + shortcut, 0)`: five, and `y` never exists. The backward's first
//! pass masks the output gradient by the ReLU (reading the output beside it), writes the
//! masked gradient (that is the shortcut's gradient, which must exist) and takes each plane's
//! Σx, Σg and Σg·x, from which the excitation's and BatchNorm's sums follow
//! (`dy = gate(s)·g + dz/HW` per plane); a second pass writes `dx`: seven against the
//! composition's eleven to thirteen (the ReLU's own pass, the excitation's two passes over `y`
//! and `dy`, BatchNorm's over `x` and `dy`).

use super::cpu::DenseParams;
use super::op::ExcitationOp;
use super::{checked_op, packed_pieces, Dense, Gate};
use crate::batch_norm::short::ShortPlanes;
use crate::batch_norm::{block_end_operands, channel_and_plane_stats, check, check_eps, BatchNormOutput, BatchStats};
use crate::cpu::{
    copy_converted, dispatch_float, f32_contiguous, min_planes_per_task, plane_f32, read_f32, sum, sum_and_dot, uninit,
    vectorized, write_f32, Elem, GradientSlot,
};
use crate::layout::Strided4;
use crate::Implementation;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// `max(excitation(BN(x)) + shortcut, 0)` with BatchNorm's batch statistics (γ `weight`, β
/// `bias`) and the excitation's dense layers as in [`super::excitation_add_relu`]: an SE or
/// SaE residual block's end in training mode. The output's `mean` and `variance` are
/// BatchNorm's batch statistics, as [`crate::batch_norm_train`] returns them.
///
/// One op on the CPU (see the module source), for f32, bf16 or f16 inputs with f32
/// arithmetic; elsewhere [`crate::batch_norm_train`] then [`super::excitation_add_relu`], which
/// compute the same (and, in bf16, round BatchNorm's output, which the op never forms).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_excitation_add_relu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    fc1: &[(&Tensor, &Tensor)],
    fc2_weight: &Tensor,
    fc2_bias: &Tensor,
    gate: Gate,
    shortcut: &Tensor,
    implementation: Implementation,
) -> Result<BatchNormOutput> {
    let dense = Dense { fc1, fc2_weight, fc2_bias };
    if implementation != Implementation::Fused || !x.device().is_cpu() {
        let bn = crate::batch_norm_train(x, weight, bias, eps, false, implementation)?;
        let output = super::excitation_add_relu(&bn.output, fc1, fc2_weight, fc2_bias, gate, shortcut, implementation)?;
        return Ok(BatchNormOutput { output, ..bn });
    }
    let c = check(x, weight, bias)?;
    check_eps(eps)?;
    crate::relu::check_shortcut("batch_norm_excitation", x, shortcut)?;
    let excitation = checked_op(x, dense, gate)?;
    let (stats, plane_means) = {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else { bail!("batch_norm_excitation: the input is not on the CPU") };
        let xs = Strided4::new("batch_norm_excitation", "input", layout)?;
        let per_channel =
            dispatch_float!("batch_norm_excitation", storage, |data: T| channel_and_plane_stats::<T>(data, &xs));
        let (n, inv_hw) = (xs.dims[0], 1.0 / xs.plane_len() as f32);
        let mut plane_means = vec![0f32; n * c];
        for (ci, (_, sums)) in per_channel.iter().enumerate() {
            for (ni, s) in sums.iter().enumerate() {
                plane_means[ni * c + ci] = s * inv_hw;
            }
        }
        let stats: Vec<(f32, f32)> = per_channel.into_iter().map(|(s, _)| s).collect();
        (stats, plane_means)
    };
    let (mean, variance): (Vec<f32>, Vec<f32>) = stats.into_iter().unzip();
    let inv_std = variance.iter().map(|v| 1.0 / (v + eps as f32).sqrt()).collect();
    let op = BatchNormExcitation { stats: BatchStats { mean: mean.clone(), inv_std }, plane_means, excitation };
    // γ, β and the dense layers' weights packed in one copy, in f32 whatever the input's type
    // (bf16 copies of γ and β widen exactly; the dense layers' may be f32 master weights).
    let f32 = |t: &Tensor| if t.dtype() == DType::F32 { Ok(t.clone()) } else { t.to_dtype(DType::F32) };
    let mut pieces = vec![f32(weight)?, f32(bias)?];
    for piece in packed_pieces(dense)? {
        pieces.push(f32(&piece)?);
    }
    let params = Tensor::cat(&pieces, 0)?;
    let output = x.apply_op3(&params, &shortcut.contiguous()?, op)?;
    let device = x.device();
    Ok(BatchNormOutput {
        output,
        mean: Tensor::from_vec(mean, c, device)?,
        variance: Tensor::from_vec(variance, c, device)?,
    })
}

/// (x, [γ | β | the excitation's packed parameters], shortcut) → the block's end.
struct BatchNormExcitation {
    stats: BatchStats,
    /// Each plane's mean of `x`, (N × C), from the statistics pass.
    plane_means: Vec<f32>,
    excitation: ExcitationOp,
}

/// (x, the block's output, its gradient) → [dx | dγ | dβ | d(excitation parameters)] for an
/// f32 input; for a bf16 or f16 one → dx, with the parameters' gradient (f32) in `slot`. The
/// gradient masked by the output's ReLU (the shortcut's gradient) goes to `shortcut_gradient`.
/// The parameters (f32, contiguous) are read from `params`: Candle's custom ops take at most
/// three operands.
struct BatchNormExcitationBackward {
    stats: BatchStats,
    excitation: ExcitationOp,
    params: Tensor,
    slot: GradientSlot,
    shortcut_gradient: GradientSlot,
}

/// The parameter operand split into γ, β and the excitation's packed parameters.
fn split_params<'a>(
    op: &str,
    p: &'a [f32],
    c: usize,
    excitation: &ExcitationOp,
) -> Result<(&'a [f32], &'a [f32], &'a [f32])> {
    if p.len() != 2 * c + excitation.offsets().len {
        bail!("{op}: the parameters have {} values, expected {}", p.len(), 2 * c + excitation.offsets().len)
    }
    let (gamma, rest) = p.split_at(c);
    let (beta, dense) = rest.split_at(c);
    Ok((gamma, beta, dense))
}

impl BatchNormExcitation {
    fn forward<T: Elem>(&self, x: &[T], xs: &Strided4, p: &[f32], r: &[T]) -> Result<Vec<T>> {
        let [n, c, _, _] = xs.dims;
        let hw = xs.plane_len();
        let (gamma, beta, dense) = split_params("batch_norm_excitation", p, c, &self.excitation)?;
        let affine: Vec<(f32, f32)> = (0..c).map(|ci| self.stats.affine(ci, gamma, beta)).collect();
        // The pooled means of BatchNorm's output, from the plane means of its input.
        let z: Vec<f32> = (0..n * c)
            .map(|plane| {
                let (scale, shift) = affine[plane % c];
                self.plane_means[plane] * scale + shift
            })
            .collect();
        let (_, s) = self.excitation.gates(&DenseParams::packed(&self.excitation, dense)?, &z);
        if let Some(runs) = ShortPlanes::new(xs) {
            return Ok(self.forward_runs(x, xs, &runs, &affine, &s, r));
        }
        let mut out = uninit::<T>(n * c * hw);
        let planes = out.par_chunks_mut(hw).with_min_len(min_planes_per_task(hw)).enumerate();
        planes.for_each_init(
            Default::default,
            |(x_buf, r_buf, out_buf): &mut (Vec<f32>, Vec<f32>, Vec<f32>), (plane, out)| {
                let (scale, shift) = affine[plane % c];
                let g = self.excitation.gate.factor(s[plane]);
                let src = plane_f32(x, xs, plane / c, plane % c, x_buf);
                let r = read_f32(&r[plane * hw..(plane + 1) * hw], r_buf);
                write_f32(out, out_buf, |out| {
                    vectorized!(for (o, (&v, &r)) in out.iter_mut().zip(src.iter().zip(r)) {
                        *o = ((v * scale + shift) * g + r).max(0.0);
                    })
                })
            },
        );
        Ok(out)
    }

    /// [`Self::forward`]'s output pass over short planes, as runs of channels image by image
    /// (`batch_norm::short`), with gate(s) spread per image.
    fn forward_runs<T: Elem>(
        &self,
        x: &[T],
        xs: &Strided4,
        runs: &ShortPlanes,
        affine: &[(f32, f32)],
        s: &[f32],
        r: &[T],
    ) -> Vec<T> {
        let c = xs.dims[1];
        let mut out = uninit::<T>(xs.dims.iter().product());
        runs.task_runs(&mut out).into_par_iter().zip(runs.blocks()).for_each(|(outs, channels)| {
            vectorized!({
                let scale = runs.spread(&channels, |ci| affine[ci].0);
                let shift = runs.spread(&channels, |ci| affine[ci].1);
                for (ni, out) in outs.into_iter().enumerate() {
                    let gate = runs.spread(&channels, |ci| self.excitation.gate.factor(s[ni * c + ci]));
                    let values = runs.run(x, ni, &channels).iter().zip(runs.contiguous_run(r, ni, &channels));
                    let coefficients = scale.iter().zip(&shift).zip(&gate);
                    for (o, ((&v, &r), ((&a, &b), &g))) in out.iter_mut().zip(values.zip(coefficients)) {
                        *o = T::from_f32(((v.to_f32() * a + b) * g + r.to_f32()).max(0.0));
                    }
                }
            })
        });
        out
    }
}

impl CustomOp3 for BatchNormExcitation {
    fn name(&self) -> &'static str {
        "sae-batch-norm-excitation-add-relu"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        p: &CpuStorage,
        pl: &Layout,
        r: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "batch_norm_excitation";
        let xs = Strided4::new(op, "input", xl)?;
        let p = f32_contiguous(op, "parameters", p, pl)?;
        let len = xl.shape().elem_count();
        let out = dispatch_float!(op, x, |x: T| {
            let r = crate::relu::shortcut_slice::<T>(op, r, rl, len)?;
            T::to_cpu_storage_owned(self.forward(x, &xs, p, r)?)
        });
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _r: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = "batch_norm_excitation backward";
        let backward = BatchNormExcitationBackward {
            stats: self.stats.clone(),
            excitation: self.excitation,
            params: params.clone(),
            slot: GradientSlot::default(),
            shortcut_gradient: GradientSlot::default(),
        };
        let out = x.apply_op3_no_bwd(&res.contiguous()?, &grad.contiguous()?, &backward)?;
        let shortcut = backward.shortcut_gradient.take(op)?;
        let (dx, dparams) = backward.slot.gradients(op, &out, x.dims(), params)?;
        Ok((Some(dx), Some(dparams), Some(shortcut)))
    }
}

impl CustomOp3 for BatchNormExcitationBackward {
    fn name(&self) -> &'static str {
        "sae-batch-norm-excitation-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "batch_norm_excitation backward";
        let xs = Strided4::new(op, "input", xl)?;
        let (p_storage, pl) = self.params.storage_and_layout();
        let Storage::Cpu(p) = &*p_storage else { bail!("{op}: the parameters are not on the CPU") };
        let p = f32_contiguous(op, "parameters", p, pl)?;
        let (out, dparams) = dispatch_float!(op, x, |x: T| {
            let (y, g) = block_end_operands::<T>(op, &xs, y, yl, g, gl)?;
            let (out, dparams) = self.backward(x, &xs, p, y, g)?;
            (T::to_cpu_storage_owned(out), dparams)
        });
        self.slot.output(op, out, xl.shape().elem_count(), dparams)
    }
}

impl BatchNormExcitationBackward {
    /// dx, and the parameters' gradient (in f32). The output gradient `g` masked by the output `y`'s ReLU goes to
    /// the shortcut's slot.
    fn backward<T: Elem>(&self, x: &[T], xs: &Strided4, p: &[f32], y: &[T], g: &[T]) -> Result<(Vec<T>, Vec<f32>)> {
        let [n, c, _, _] = xs.dims;
        let hw = xs.plane_len();
        let (inv_hw, count) = (1.0 / hw as f32, (n * hw) as f32);
        let (gamma, beta, dense) = split_params("batch_norm_excitation backward", p, c, &self.excitation)?;
        let (mean, inv_std) = (&self.stats.mean, &self.stats.inv_std);
        let affine: Vec<(f32, f32)> = (0..c).map(|ci| self.stats.affine(ci, gamma, beta)).collect();
        let min_len = min_planes_per_task(hw);

        // The gradient masked by the ReLU (written out: it is the shortcut's gradient), and
        // each plane's (Σx, Σg, Σg·x) of it: all that the excitation's and BatchNorm's sums need.
        let mut masked = uninit::<T>(n * c * hw);
        let runs = ShortPlanes::new(xs);
        let sums: Vec<[f32; 3]> = if let Some(runs) = &runs {
            masked_plane_sums(x, xs, runs, g, y, &mut masked)
        } else {
            masked
                .par_chunks_mut(hw)
                .with_min_len(min_len)
                .enumerate()
                .map_init(Default::default, |(x_buf, m_buf): &mut (Vec<f32>, Vec<f32>), (plane, m)| {
                    let xp = plane_f32(x, xs, plane / c, plane % c, x_buf);
                    let (gp, yp) = (&g[plane * hw..(plane + 1) * hw], &y[plane * hw..(plane + 1) * hw]);
                    write_f32(m, m_buf, |m| {
                        vectorized!({
                            // As the ReLU's own backward: a select, so that a non-finite gradient
                            // where the output is clamped stays out.
                            for (d, (&gv, &yv)) in m.iter_mut().zip(gp.iter().zip(yp)) {
                                let gv = gv.to_f32();
                                *d = if yv.to_f32() > 0.0 { gv } else { 0.0 };
                            }
                            let (sx, sgx) = sum_and_dot(xp, m);
                            [sx, sum(m), sgx]
                        })
                    })
                })
                .collect()
        };
        // The excitation's input is y = x·A + B: its pooled means, and Σ g·y per plane.
        let (z, sgy): (Vec<f32>, Vec<f32>) = sums
            .iter()
            .enumerate()
            .map(|(plane, &[sx, sg, sgx])| {
                let (scale, shift) = affine[plane % c];
                (sx * inv_hw * scale + shift, sgx * scale + sg * shift)
            })
            .unzip();
        // Both written in full below.
        let (mut dx, mut dparams) = (uninit::<T>(n * c * hw), uninit::<f32>(p.len()));
        let (dbn, dexcitation) = dparams.split_at_mut(2 * c);
        let (s, dzt) = self.excitation.dense_backward(dense, &z, &sgy, dexcitation)?;
        // dy = gate(s)·g + e per plane, e = dz/HW; BatchNorm's sums over a channel's planes
        // follow from the planes' sums: Σ dy = F·Σg + HW·e, Σ dy·(x − μ) = F·(Σg·x − μ·Σg)
        // + e·(Σx − HW·μ) (centred per plane before the f64 sum, as `batch_norm` does).
        let factor = |plane: usize| self.excitation.gate.factor(s[plane]);
        let shift = |plane: usize| dzt[(plane % c) * n + plane / c] * inv_hw;
        // Per channel: dx = a·dy + k·x + b (as BatchNorm's backward), so per plane
        // dx = (a·F)·g + k·x + (a·e + b).
        let channel: Vec<(f32, f32, f32)> = (0..c)
            .map(|ci| {
                let (mut dy, mut dy_x) = (0f64, 0f64);
                for ni in 0..n {
                    let plane = ni * c + ci;
                    let [sx, sg, sgx] = sums[plane];
                    let (f, e) = (factor(plane), shift(plane));
                    dy += (f * sg + hw as f32 * e) as f64;
                    dy_x += (f * (sgx - mean[ci] * sg) + e * (sx - hw as f32 * mean[ci])) as f64;
                }
                let (dy, dgamma) = (dy as f32, dy_x as f32 * inv_std[ci]);
                dbn[ci] = dgamma;
                dbn[c + ci] = dy;
                let a = gamma[ci] * inv_std[ci];
                let k = -a * inv_std[ci] * dgamma / count;
                (a, k, -a * dy / count - k * mean[ci])
            })
            .collect();
        // dx = ag·g + k·x + offset per plane: (a·F, k, a·e + b).
        let coefficients = |plane: usize| {
            let (a, k, b) = channel[plane % c];
            (a * factor(plane), k, a * shift(plane) + b)
        };
        if let Some(runs) = &runs {
            input_gradient_runs(x, xs, runs, &masked, &coefficients, &mut dx);
        } else {
            let planes = dx.par_chunks_mut(hw).with_min_len(min_len).enumerate();
            planes.for_each_init(
                Default::default,
                |(x_buf, g_buf, dx_buf): &mut (Vec<f32>, Vec<f32>, Vec<f32>), (plane, dx)| {
                    let (ag, k, offset) = coefficients(plane);
                    let xp = plane_f32(x, xs, plane / c, plane % c, x_buf);
                    let gp = read_f32(&masked[plane * hw..(plane + 1) * hw], g_buf);
                    write_f32(dx, dx_buf, |dx| {
                        vectorized!(for (d, (&gv, &xv)) in dx.iter_mut().zip(gp.iter().zip(xp)) {
                            *d = gv * ag + xv * k + offset;
                        })
                    })
                },
            );
        }
        let masked = Tensor::from_vec(masked, xs.dims.to_vec(), &candle_core::Device::Cpu)?;
        self.shortcut_gradient.put("batch_norm_excitation backward", masked)?;
        Ok((dx, dparams))
    }
}

/// The backward's first pass over short planes, as runs of channels image by image
/// (`batch_norm::short`): the output gradient `g` masked by the output `y`'s ReLU into
/// `masked`, and each plane's (Σx, Σg, Σg·x) of the masked gradient, (N × C).
fn masked_plane_sums<T: Elem>(
    x: &[T],
    xs: &Strided4,
    runs: &ShortPlanes,
    g: &[T],
    y: &[T],
    masked: &mut [T],
) -> Vec<[f32; 3]> {
    let [n, c, _, _] = xs.dims;
    let hw = xs.plane_len();
    let mut sums = vec![[0f32; 3]; n * c];
    let tasks = runs.task_runs(masked).into_par_iter().zip(runs.task_runs_of(&mut sums, 1));
    tasks.zip(runs.blocks()).for_each(|((masked, sums), channels)| {
        vectorized!({
            let mut m32 = vec![0f32; channels.len() * hw];
            for (ni, (masked, sums)) in masked.into_iter().zip(sums).enumerate() {
                let (gr, yr) = (runs.contiguous_run(g, ni, &channels), runs.contiguous_run(y, ni, &channels));
                // As the ReLU's own backward: a select (see `BatchNormExcitationBackward::backward`).
                for (d, (&gv, &yv)) in m32.iter_mut().zip(gr.iter().zip(yr)) {
                    let gv = gv.to_f32();
                    *d = if yv.to_f32() > 0.0 { gv } else { 0.0 };
                }
                copy_converted(&m32, masked);
                let planes = runs.run(x, ni, &channels).chunks_exact(hw).zip(m32.chunks_exact(hw));
                for (s, (xp, mp)) in sums.iter_mut().zip(planes) {
                    let (mut sx, mut sg, mut sgx) = (0f32, 0f32, 0f32);
                    for (&xv, &mv) in xp.iter().zip(mp) {
                        let xv = xv.to_f32();
                        sx += xv;
                        sg += mv;
                        sgx += mv * xv;
                    }
                    *s = [sx, sg, sgx];
                }
            }
        })
    });
    sums
}

/// The backward's dx pass over short planes, as runs of channels image by image: `dx = ag·g
/// + k·x + offset` with the masked gradient `g` and each plane's `coefficients(plane)` (plane
/// `ni · C + ci`), `k` the channel's.
fn input_gradient_runs<T: Elem>(
    x: &[T],
    xs: &Strided4,
    runs: &ShortPlanes,
    masked: &[T],
    coefficients: &(impl Fn(usize) -> (f32, f32, f32) + Sync),
    dx: &mut [T],
) {
    let c = xs.dims[1];
    runs.task_runs(dx).into_par_iter().zip(runs.blocks()).for_each(|(dxs, channels)| {
        vectorized!({
            let k = runs.spread(&channels, |ci| coefficients(ci).1);
            for (ni, dx) in dxs.into_iter().enumerate() {
                let ag = runs.spread(&channels, |ci| coefficients(ni * c + ci).0);
                let offset = runs.spread(&channels, |ci| coefficients(ni * c + ci).2);
                let values = runs.run(x, ni, &channels).iter().zip(runs.contiguous_run(masked, ni, &channels));
                let terms = ag.iter().zip(&k).zip(&offset);
                for (d, ((&xv, &gv), ((&ag, &k), &offset))) in dx.iter_mut().zip(values.zip(terms)) {
                    *d = T::from_f32(gv.to_f32() * ag + xv.to_f32() * k + offset);
                }
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(len: usize, k: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..len).map(|i| ((i * k + 7) % 101) as f32 / 101.0 * scale + offset).collect()
    }

    fn var(len: usize, dims: &[usize], k: usize, scale: f32, offset: f32) -> Var {
        Var::from_tensor(&Tensor::from_vec(values(len, k, scale, offset), dims, &Device::Cpu).unwrap()).unwrap()
    }

    fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
        let (got, want) = (
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(got.len(), want.len(), "{what}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 2e-4 * scale, "{what}[{i}]: {g} vs {w} (scale {scale})");
        }
    }

    /// The op's output, batch statistics and every gradient (input, γ, β, each reduction
    /// branch, the excitation layer, the shortcut) against the reference — BatchNorm, the
    /// excitation and the residual end composed of Candle ops, through Candle's autograd: SE
    /// and SaE, both gates, a strided input.
    #[test]
    fn equals_the_reference() {
        for (dims, branches, gate, strided) in [
            ([3usize, 8, 5, 7], 1, Gate::S, false),
            ([2, 16, 9, 9], 2, Gate::OnePlusS, false),
            ([2, 8, 6, 4], 2, Gate::OnePlusS, true),
            // Short planes, taken as runs of channels (`batch_norm::short`).
            ([3, 40, 2, 2], 2, Gate::OnePlusS, false),
            ([4, 24, 1, 1], 1, Gate::S, false),
        ] {
            let [n, c, h, w] = dims;
            let len = n * c * h * w;
            let x = if strided { var(len, &[n, c, w, h], 13, 4.0, 3.0) } else { var(len, &dims, 13, 4.0, 3.0) };
            let xt = if strided { x.as_tensor().transpose(2, 3).unwrap() } else { x.as_tensor().clone() };
            let gamma = var(c, &[c], 5, 1.0, 0.5);
            let beta = var(c, &[c], 3, 1.0, -0.5);
            let rows = 4;
            let fc1: Vec<(Var, Var)> = (0..branches)
                .map(|k| (var(rows * c, &[rows, c], 17 + k, 1.0, -0.5), var(rows, &[rows], 19 + k, 0.5, -0.1)))
                .collect();
            let fc2 = (var(c * rows * branches, &[c, rows * branches], 23, 1.0, -0.5), var(c, &[c], 29, 0.5, -0.2));
            let shortcut = var(len, &dims, 31, 2.0, -1.0);
            let weights = Tensor::from_vec(values(len, 37, 2.0, -1.0), &dims[..], &Device::Cpu).unwrap();
            let fc1_refs: Vec<(&Tensor, &Tensor)> = fc1.iter().map(|(w, b)| (w.as_tensor(), b.as_tensor())).collect();
            let run = |implementation: Implementation| {
                let out = batch_norm_excitation_add_relu(
                    &xt,
                    &gamma,
                    &beta,
                    1e-5,
                    &fc1_refs,
                    &fc2.0,
                    &fc2.1,
                    gate,
                    &shortcut,
                    implementation,
                )
                .unwrap();
                let grads = (out.output.clone() * &weights).unwrap().sum_all().unwrap().backward().unwrap();
                let mut tracked: Vec<&Tensor> = vec![x.as_tensor(), gamma.as_tensor(), beta.as_tensor()];
                for (w, b) in &fc1 {
                    tracked.extend([w.as_tensor(), b.as_tensor()]);
                }
                tracked.extend([fc2.0.as_tensor(), fc2.1.as_tensor(), shortcut.as_tensor()]);
                let gradients: Vec<Tensor> = tracked.iter().map(|t| grads.get(t).unwrap().clone()).collect();
                (out, gradients)
            };
            let (fused, composed) = (run(Implementation::Fused), run(Implementation::Reference));
            let case = format!("{dims:?} K={branches} {gate:?} strided {strided}");
            assert_close(&format!("{case} output"), &fused.0.output, &composed.0.output);
            assert_close(&format!("{case} mean"), &fused.0.mean, &composed.0.mean);
            assert_close(&format!("{case} variance"), &fused.0.variance, &composed.0.variance);
            let positive =
                fused.0.output.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().filter(|v| **v > 0.0).count();
            assert!(
                positive > len / 4 && positive < len,
                "{case}: the ReLU should clamp some values and pass most ({positive} of {len})"
            );
            for (k, (f, w)) in fused.1.iter().zip(&composed.1).enumerate() {
                assert_close(&format!("{case} gradient {k}"), f, w);
            }
        }
    }

    /// bf16 activations with f32 master weights for the dense layers (bf16 γ and β, as the
    /// model passes them): the op computes in f32 where the composition rounds BatchNorm's
    /// output to bf16, so they agree within bf16's rounding (2⁻⁸ relative, a few roundings
    /// deep): 3 % of each tensor's largest value. The master weights' gradients come back f32.
    #[test]
    fn bf16_equals_the_composition_within_its_rounding() {
        // Planes of 6×5, and short ones (runs of channels).
        for dims in [[2usize, 8, 6, 5], [3, 40, 2, 2]] {
            bf16_equals_the_composition(dims);
        }
    }

    fn bf16_equals_the_composition(dims: [usize; 4]) {
        let [n, c, h, w] = dims;
        let len = n * c * h * w;
        let bf16_var = |len: usize, dims: &[usize], k: usize, scale: f32, offset: f32| {
            Var::from_tensor(&var(len, dims, k, scale, offset).as_tensor().to_dtype(DType::BF16).unwrap()).unwrap()
        };
        let x = bf16_var(len, &dims, 13, 4.0, 3.0);
        let (gamma, beta) = (bf16_var(c, &[c], 5, 1.0, 0.5), bf16_var(c, &[c], 3, 1.0, -0.5));
        let (w1, b1) = (var(4 * c, &[4, c], 17, 1.0, -0.5), var(4, &[4], 19, 0.5, -0.1));
        let (w2, b2) = (var(c * 4, &[c, 4], 23, 1.0, -0.5), var(c, &[c], 29, 0.5, -0.2));
        let shortcut = bf16_var(len, &dims, 31, 2.0, -1.0);
        let weights = Tensor::from_vec(values(len, 37, 2.0, -1.0), &dims[..], &Device::Cpu).unwrap();
        let fc1 = [(w1.as_tensor(), b1.as_tensor())];
        let tracked = [&x, &gamma, &beta, &w1, &b1, &w2, &b2, &shortcut];
        let run = |fused: bool| {
            let output = if fused {
                batch_norm_excitation_add_relu(
                    &x,
                    &gamma,
                    &beta,
                    1e-5,
                    &fc1,
                    &w2,
                    &b2,
                    Gate::OnePlusS,
                    &shortcut,
                    Implementation::Fused,
                )
                .unwrap()
                .output
            } else {
                let bn = crate::batch_norm_train(&x, &gamma, &beta, 1e-5, false, Implementation::Fused).unwrap();
                super::super::excitation_add_relu(
                    &bn.output,
                    &fc1,
                    &w2,
                    &b2,
                    Gate::OnePlusS,
                    &shortcut,
                    Implementation::Fused,
                )
                .unwrap()
            };
            assert_eq!(output.dtype(), DType::BF16);
            let loss = (output.to_dtype(DType::F32).unwrap() * &weights).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let gradients: Vec<Tensor> = tracked.iter().map(|t| grads.get(t).unwrap().clone()).collect();
            (output, gradients)
        };
        let (fused, composed) = (run(true), run(false));
        let close = |what: &str, got: &Tensor, want: &Tensor| {
            let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (got, want) = (f32s(got), f32s(want));
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 0.03 * scale, "bf16 {what}[{i}]: {g} vs {w} (scale {scale})");
            }
        };
        close("output", &fused.0, &composed.0);
        for (k, (f, w)) in fused.1.iter().zip(&composed.1).enumerate() {
            assert_eq!(f.dtype(), tracked[k].dtype(), "gradient {k}'s dtype");
            close(&format!("gradient {k}"), f, w);
        }
    }

    /// A wrong shortcut shape is an error that names the shortcut.
    #[test]
    fn a_wrong_shortcut_is_an_error() {
        let x = var(2 * 4 * 3 * 3, &[2, 4, 3, 3], 3, 1.0, 0.0);
        let (gamma, beta) = (var(4, &[4], 1, 1.0, 0.5), var(4, &[4], 2, 1.0, 0.0));
        let (w1, b1) = (var(8, &[2, 4], 3, 1.0, -0.5), var(2, &[2], 5, 1.0, 0.0));
        let (w2, b2) = (var(8, &[4, 2], 7, 1.0, -0.5), var(4, &[4], 9, 1.0, 0.0));
        let shortcut = Tensor::zeros((2, 4, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let fc1 = [(w1.as_tensor(), b1.as_tensor())];
        let err = batch_norm_excitation_add_relu(
            &x,
            &gamma,
            &beta,
            1e-5,
            &fc1,
            &w2,
            &b2,
            Gate::S,
            &shortcut,
            Implementation::Fused,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("shortcut"), "{err}");
    }
}
