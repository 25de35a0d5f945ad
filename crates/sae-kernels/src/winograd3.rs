//! Winograd's F(3×3, 3×3) convolution for 3×3, stride-1, ungrouped convolutions on the CPU in
//! f32: output, input gradient and weight gradient of the convolutions where it needs at
//! least a fifth fewer multiplies than F(2×2, 3×3) ([`crate::winograd`]; the choice is
//! `conv::Geometry::winograd3`'s).
//!
//! Each 3×3 block of output pixels ("tile") is computed from the 5×5 input block around it
//! with 25 multiplies per (input, output) channel pair instead of 81, `Y = Aᵀ [(G g Gᵀ) ⊙
//! (Bᵀ d B)] A`, the matrices from the interpolation points 0, 1, −1, 2 and ∞ (the fractions
//! in `G`, so that `Bᵀ` and `Aᵀ` are small integers). Per output pixel that is 25/9 ≈ 2.8
//! multiplies against F(2×2, 3×3)'s 4, and the transformed input is 25/9 of the input against
//! 16/4: on ResNet's odd and small images (35, 18, 9 and 5 pixels at 140×140 inputs) F(3×3)
//! tiles also waste less at the edges (a 9×9 output is 9 tiles of 25 against 25 of 16).
//!
//! The transforms run as vector passes over all the tiles of a chunk of images at once (a
//! channel's tiles side by side), not over one row of tiles: rows of 3 or 2 tiles (9×9 and
//! 5×5 outputs) would leave the vectors nearly empty. Their rounding is a few ulps of the
//! terms, about three times F(2×2)'s (`Bᵀ` and `Aᵀ` have entries up to 3 and 4; against f64
//! loops, relative RMS errors of 7–9e-7 against 2–3e-7 on 64 channels of 8×8 images; of the
//! other points tried for the fourth, −2, ½ and −½ were no better); the tests hold it to the
//! same tolerance against plain loops.

use crate::cpu::{matmul_threads, plane_f32, read_f32, uninit, vectorized, write_f32, Elem, Mat, Products};
use crate::layout::Strided4;
use crate::winograd::{transformed_filters, Winograd, BUDGET, MIN_TILES};
use rayon::prelude::*;

/// `Aᵀ` (3 × 5): the output transform.
const AT: [[f32; 5]; 3] = [[1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 2.0, 0.0], [0.0, 1.0, 1.0, 4.0, 1.0]];

/// `A` (5 × 3): `Aᵀ` transposed, the output gradient's transform.
const A: [[f32; 3]; 5] = [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 2.0, 4.0], [0.0, 0.0, 1.0]];

/// `G` (5 × 3): the filter transform.
const G: [[f32; 3]; 5] = [
    [0.5, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [1.0 / 6.0, -1.0 / 6.0, 1.0 / 6.0],
    [1.0 / 6.0, 1.0 / 3.0, 2.0 / 3.0],
    [0.0, 0.0, 1.0],
];

/// `Gᵀ` (3 × 5): its adjoint, from the transformed weight gradient to the filter's.
const GT: [[f32; 5]; 3] = [
    [0.5, 0.5, 1.0 / 6.0, 1.0 / 6.0, 0.0],
    [0.0, 0.5, -1.0 / 6.0, 1.0 / 3.0, 0.0],
    [0.0, 0.5, 1.0 / 6.0, 2.0 / 3.0, 1.0],
];

/// `Bᵀ` (5 × 5): the input transform.
const BT: [[f32; 5]; 5] = [
    [2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 2.0, 1.0, -1.0, 0.0],
    [0.0, -2.0, 3.0, -1.0, 0.0],
    [0.0, -1.0, 0.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0],
];

impl Winograd<3> {
    /// `out` (n, oc, oh, ow) = the convolution of `x` (n, c, h, w, any strides) with the
    /// transformed weights `u` ([`transform_weights`]); `epilogue(channel, plane)` then runs
    /// on each output plane in f32 before it is written.
    pub fn forward<T: Elem>(
        &self,
        x: &[T],
        xs: &Strided4,
        u: &[f32],
        out: &mut [T],
        epilogue: impl Fn(usize, &mut [f32]) + Sync,
    ) {
        let (c, oc, tiles, plane) = (self.c, self.oc, self.tiles(), self.oh * self.ow);
        let per_chunk = self.images_per_chunk();
        for (chunk, out) in out.chunks_mut(per_chunk * oc * plane).enumerate() {
            let images = chunk * per_chunk..(chunk * per_chunk + per_chunk).min(self.n);
            let cols = images.len() * tiles;
            let v = self.transformed_input(x, xs, images.clone());
            // M as (25, oc, cols).
            let mut m = uninit::<f32>(25 * oc * cols);
            m.par_chunks_mut(oc * cols).enumerate().for_each(|(t, m)| {
                let u = Mat { data: &u[t * c..], rs: 25 * c, cs: 1 };
                let v = Mat { data: &v[t * cols..], rs: 25 * cols, cs: 1 };
                matmul_threads(Products::F32, 1, oc, cols, c, u, v, m, false);
            });
            // Aᵀ M A of every tile of the chunk, per output channel: (oc, 9, cols).
            let mut y = uninit::<f32>(oc * 9 * cols);
            y.par_chunks_mut(9 * cols).enumerate().for_each_init(Vec::new, |rows, (o, y)| {
                rows.resize(15 * cols, 0.0);
                let m: [&[f32]; 25] = std::array::from_fn(|t| &m[(t * oc + o) * cols..][..cols]);
                vectorized!(output_tiles(m, rows, y));
            });
            out.par_chunks_mut(plane).enumerate().for_each_init(Vec::new, |buf, (k, plane)| {
                let (i, o) = (k / oc, k % oc);
                write_f32(plane, buf, |plane| {
                    self.untile(&y[o * 9 * cols + i * tiles..], cols, plane);
                    epilogue(o, plane)
                })
            });
        }
    }

    /// The weight gradient (oc, c, 3, 3), f32, from the input `x` (n, c, h, w, any strides)
    /// and the output gradient `dy` (n, oc, oh, ow, contiguous): the adjoint of
    /// [`Self::forward`], `dU[t] = Σ (A dY Aᵀ)[t] · V[t]ᵀ` summed over tiles as 25 products,
    /// then `dW = Gᵀ dU G` per filter.
    pub fn weight_gradient<T: Elem>(&self, x: &[T], xs: &Strided4, dy: &[T], dw: &mut [f32]) {
        let (c, oc, tiles, plane) = (self.c, self.oc, self.tiles(), self.oh * self.ow);
        let per_chunk = self.images_per_chunk();
        let mut du = uninit::<f32>(25 * oc * c);
        for chunk in 0..self.n.div_ceil(per_chunk) {
            let images = chunk * per_chunk..(chunk * per_chunk + per_chunk).min(self.n);
            let cols = images.len() * tiles;
            let v = self.transformed_input(x, xs, images.clone());
            // dM = A dY Aᵀ as (oc, 25, cols).
            let mut dm = uninit::<f32>(oc * 25 * cols);
            dm.par_chunks_mut(25 * cols).enumerate().for_each_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(buf, d, rows), (o, dm)| {
                    d.resize(9 * cols, 0.0);
                    rows.resize(15 * cols, 0.0);
                    for (i, n) in images.clone().enumerate() {
                        let dy = read_f32(&dy[(n * oc + o) * plane..][..plane], buf);
                        self.tile(dy, d, i * tiles, cols);
                    }
                    vectorized!(gradient_tiles(d, cols, rows, dm));
                },
            );
            du.par_chunks_mut(oc * c).enumerate().for_each(|(t, du)| {
                let dm = Mat { data: &dm[t * cols..], rs: 25 * cols, cs: 1 };
                let vt = Mat { data: &v[t * cols..], rs: 1, cs: 25 * cols };
                matmul_threads(Products::F32, 1, oc, c, cols, dm, vt, du, chunk > 0);
            });
        }
        dw.par_chunks_mut(c * 9).enumerate().for_each_init(Vec::new, |scratch, (o, dw)| {
            scratch.resize(24 * c, 0.0);
            let (halves, taps) = scratch.split_at_mut(15 * c);
            let du: [&[f32]; 25] = std::array::from_fn(|t| &du[(t * oc + o) * c..][..c]);
            vectorized!(filter_gradient_tiles(du, halves, taps));
            // Tap by tap into the filters of output channel `o`.
            for (i, tap) in taps.chunks_exact(c).enumerate() {
                for (g, &v) in dw.chunks_exact_mut(9).zip(tap) {
                    g[i] = v;
                }
            }
        });
    }

    /// Writes the 9 values of every tile of the output-gradient plane `dy` (oh × ow) into `d`
    /// (row `3·r + s` the value at (r, s) of the tiles, rows `stride` apart, tile `k` at column
    /// `first + k`), 0 past the plane's edges.
    fn tile(&self, dy: &[f32], d: &mut [f32], first: usize, stride: usize) {
        let (th, tw) = (self.th, self.tw);
        for (t, d) in d.chunks_exact_mut(stride).enumerate() {
            let (r, s) = (t / 3, t % 3);
            for (ty, d) in d[first..][..th * tw].chunks_exact_mut(tw).enumerate() {
                let oy = 3 * ty + r;
                if oy >= self.oh {
                    d.fill(0.0);
                    continue;
                }
                let row = &dy[oy * self.ow..][..self.ow];
                for (tx, v) in d.iter_mut().enumerate() {
                    *v = row.get(3 * tx + s).copied().unwrap_or(0.0);
                }
            }
        }
    }

    /// Images per chunk: the batch in as many equal chunks as it has [`MIN_TILES`] columns
    /// for (a short last chunk would run narrow products), within [`BUDGET`].
    fn images_per_chunk(&self) -> usize {
        let tiles = self.tiles();
        let chunks = (self.n * tiles / MIN_TILES).max(1);
        self.n.div_ceil(chunks).min((BUDGET / (25 * (self.c + self.oc) * tiles)).max(1))
    }

    /// `V = Bᵀ d B` of every tile of `images` as (c, 25, cols), cols = images · tiles:
    /// matrix `t` is rows c, `25 · cols` apart.
    fn transformed_input<T: Elem>(&self, x: &[T], xs: &Strided4, images: std::ops::Range<usize>) -> Vec<f32> {
        let (tiles, cols) = (self.tiles(), images.len() * self.tiles());
        let mut v = uninit::<f32>(self.c * 25 * cols);
        v.par_chunks_mut(25 * cols).enumerate().for_each_init(
            || (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
            |(buf, phases, d, rows), (ci, v)| {
                d.resize(25 * cols, 0.0);
                rows.resize(25 * cols, 0.0);
                for (i, n) in images.clone().enumerate() {
                    let x = plane_f32(x, xs, n, ci, buf);
                    self.tile_values(x, phases, d, i * tiles, cols);
                }
                vectorized!(input_tiles(d, cols, rows, v));
            },
        );
        v
    }

    /// Writes the 25 input values of every tile of plane `x` (h × w) into `d` (row `5·a + b`
    /// the values at (a, b) of the tiles, rows `stride` apart, tile `k` at column `first + k`),
    /// 0 outside the image. The plane is first copied zero-padded into `phases`, its columns
    /// split by their remainder mod 3, so that a tile row's values at one (a, b) are one
    /// contiguous run (tile `tx` reads padded columns 3·tx to 3·tx + 4).
    fn tile_values(&self, x: &[f32], phases: &mut Vec<f32>, d: &mut [f32], first: usize, stride: usize) {
        let (th, tw) = (self.th, self.tw);
        // Padded rows 3·th + 2 ≥ h + 2·pad, padded columns 3·(tw + 1) ≥ w + 2·pad.
        let (rows, width) = (3 * th + 2, tw + 1);
        let len = rows * width;
        phases.clear();
        phases.resize(3 * len, 0.0);
        // Input column ix lands in padded column ix + pad: phase (ix + pad) mod 3, at (ix +
        // pad) / 3. The first `head` columns fill the phases from `pad` on; from there on
        // every three columns are one entry of each phase.
        let (head, pad) = ((3 - self.pad) % 3, self.pad);
        let first_whole = (head + pad) / 3;
        let (p0, rest) = phases.split_at_mut(len);
        let (p1, p2) = rest.split_at_mut(len);
        for (r, row) in x.chunks_exact(self.w).enumerate() {
            let at = (r + pad) * width;
            let (lead, body) = row.split_at(head.min(row.len()));
            for (ix, &v) in lead.iter().enumerate() {
                [&mut *p0, &mut *p1, &mut *p2][ix + pad][at] = v;
            }
            let whole = body.chunks_exact(3);
            let (tail, at) = (whole.remainder(), at + first_whole);
            let count = body.len() / 3;
            for (k, three) in whole.enumerate() {
                (p0[at + k], p1[at + k], p2[at + k]) = (three[0], three[1], three[2]);
            }
            for (j, &v) in tail.iter().enumerate() {
                [&mut *p0, &mut *p1, &mut *p2][j][at + count] = v;
            }
        }
        // Row a of every tile of a row of tiles: columns b = 0, 1, 2 are phases 0, 1, 2 from
        // the tile's index on, b = 3, 4 phases 0, 1 one further (all five in one loop, not
        // five copies: runs of 2–12 values went through `memmove` calls).
        let (p0, p1, p2) = (&p0[..], &p1[..], &p2[..]);
        for a in 0..5 {
            let rows = &mut d[5 * a * stride..][..5 * stride];
            let mut rows = rows.chunks_exact_mut(stride).map(|r| &mut r[first..]);
            let [d0, d1, d2, d3, d4] = std::array::from_fn(|_| rows.next().expect("five rows"));
            for ty in 0..th {
                let at = (3 * ty + a) * width;
                let (s0, s1, s2) = (&p0[at..][..tw + 1], &p1[at..][..tw + 1], &p2[at..][..tw + 1]);
                let dst = ty * tw..(ty + 1) * tw;
                let (d0, d1, d2) = (&mut d0[dst.clone()], &mut d1[dst.clone()], &mut d2[dst.clone()]);
                let (d3, d4) = (&mut d3[dst.clone()], &mut d4[dst]);
                for tx in 0..tw {
                    (d0[tx], d1[tx], d2[tx], d3[tx], d4[tx]) = (s0[tx], s1[tx], s2[tx], s0[tx + 1], s1[tx + 1]);
                }
            }
        }
    }

    /// Writes tile values `y` (9 rows `stride` apart: row `3·r + s` the output at (r, s) of
    /// each tile, this image's tiles from column 0) into the output plane (oh × ow), dropping
    /// what lies past its edges.
    fn untile(&self, y: &[f32], stride: usize, plane: &mut [f32]) {
        let tw = self.tw;
        for (oy, row) in plane.chunks_exact_mut(self.ow).enumerate() {
            let (ty, r) = (oy / 3, oy % 3);
            let tiles: [&[f32]; 3] = std::array::from_fn(|s| &y[(3 * r + s) * stride + ty * tw..][..tw]);
            for (tx, three) in row.chunks_mut(3).enumerate() {
                for (s, v) in three.iter_mut().enumerate() {
                    *v = tiles[s][tx];
                }
            }
        }
    }
}

/// `out[k] = Σ_j coef[j] · rows[j][k]` for every k of `out`: one row of a small matrix
/// product, as a vector pass over the columns. Called with constant coefficients
/// ([`each_row!`]), the zero terms drop out and ±1 costs no multiply (−0.0 is the sum's exact
/// start: −0.0 + x is x for every x).
#[inline(always)]
fn combine<const N: usize>(coef: &[f32; N], rows: [&[f32]; N], out: &mut [f32]) {
    let len = out.len();
    let rows = rows.map(|r| &r[..len]);
    for (k, o) in out.iter_mut().enumerate() {
        let mut s = -0.0;
        for j in 0..N {
            if coef[j] != 0.0 {
                s += coef[j] * rows[j][k];
            }
        }
        *o = s;
    }
}

/// [`combine`] for the listed rows of the constant matrix `$m`, row `$i` into `$out`: spelled
/// out row by row so that each call's coefficients are constants.
macro_rules! each_row {
    ($m:ident [$($r:literal),*], $rows:expr, |$i:ident| $out:expr) => {
        $({
            let $i: usize = $r;
            combine(&$m[$r], $rows, $out);
        })*
    };
}

/// `Bᵀ d B` of the tiles whose 25 values are the rows of `d` (`cols` long; row `5·a + b` the
/// value at (a, b)) into the 25 rows of `v`, through `rows` (25 rows: `Bᵀ d`).
#[inline(always)]
fn input_tiles(d: &[f32], cols: usize, rows: &mut [f32], v: &mut [f32]) {
    // (Bᵀ d) row i, column b into rows[5·i + b].
    for b in 0..5 {
        let column: [&[f32]; 5] = std::array::from_fn(|a| &d[(5 * a + b) * cols..][..cols]);
        each_row!(BT[0, 1, 2, 3, 4], column, |i| &mut rows[(5 * i + b) * cols..][..cols]);
    }
    // (Bᵀ d B) row i, column k = Σ_b (Bᵀ d)[i][b] · Bᵀ[k][b].
    for i in 0..5 {
        let r: [&[f32]; 5] = std::array::from_fn(|b| &rows[(5 * i + b) * cols..][..cols]);
        each_row!(BT[0, 1, 2, 3, 4], r, |k| &mut v[(5 * i + k) * cols..][..cols]);
    }
}

/// `Aᵀ m A` of the tiles whose 25 products are `m` (row `5·a + b` the product at (a, b)) into
/// the 9 rows of `y` (row `3·r + s` the output at (r, s)), through `rows` (15 rows: `Aᵀ m`).
#[inline(always)]
fn output_tiles(m: [&[f32]; 25], rows: &mut [f32], y: &mut [f32]) {
    let cols = m[0].len();
    for b in 0..5 {
        let column: [&[f32]; 5] = std::array::from_fn(|a| m[5 * a + b]);
        each_row!(AT[0, 1, 2], column, |r| &mut rows[(5 * r + b) * cols..][..cols]);
    }
    for r in 0..3 {
        let row: [&[f32]; 5] = std::array::from_fn(|b| &rows[(5 * r + b) * cols..][..cols]);
        each_row!(AT[0, 1, 2], row, |s| &mut y[(3 * r + s) * cols..][..cols]);
    }
}

/// `A dY Aᵀ` of the tiles whose 9 output-gradient values are the rows of `d` (`cols` long;
/// row `3·r + s` the value at (r, s)) into the 25 rows of `dm`, through `rows` (15 rows:
/// `A dY`).
#[inline(always)]
fn gradient_tiles(d: &[f32], cols: usize, rows: &mut [f32], dm: &mut [f32]) {
    for s in 0..3 {
        let column: [&[f32]; 3] = std::array::from_fn(|r| &d[(3 * r + s) * cols..][..cols]);
        each_row!(A[0, 1, 2, 3, 4], column, |a| &mut rows[(3 * a + s) * cols..][..cols]);
    }
    for a in 0..5 {
        let row: [&[f32]; 3] = std::array::from_fn(|s| &rows[(3 * a + s) * cols..][..cols]);
        each_row!(A[0, 1, 2, 3, 4], row, |b| &mut dm[(5 * a + b) * cols..][..cols]);
    }
}

/// `Gᵀ dU G` of filters whose 25 entries are `du` (entry `5·a + b` at (a, b), one value per
/// filter) into `taps` tap by tap (`taps[(3·i + j) · c + k]`), through `halves` (15 rows:
/// `dU G`).
#[inline(always)]
fn filter_gradient_tiles(du: [&[f32]; 25], halves: &mut [f32], taps: &mut [f32]) {
    let c = du[0].len();
    for a in 0..5 {
        let row: [&[f32]; 5] = std::array::from_fn(|b| du[5 * a + b]);
        each_row!(GT[0, 1, 2], row, |j| &mut halves[(3 * a + j) * c..][..c]);
    }
    for j in 0..3 {
        let column: [&[f32]; 5] = std::array::from_fn(|a| &halves[(3 * a + j) * c..][..c]);
        each_row!(GT[0, 1, 2], column, |i| &mut taps[(3 * i + j) * c..][..c]);
    }
}

/// `G g Gᵀ` of every 3×3 filter of `w` (o, c, 3, 3) as (o, 25, c): matrix `t` is rows `o`,
/// `25 · c` apart. With `rotate`, of the input gradient's filters instead: each rotated by
/// 180°, as (c, 25, o).
pub(crate) fn transform_weights(w: &[f32], o: usize, c: usize, rotate: bool) -> Vec<f32> {
    transformed_filters(w, o, c, rotate, 25, 15, |taps, rows, u| {
        vectorized!(filter_tiles(taps, taps.len() / 9, rows, u))
    })
}

/// `G g Gᵀ` of `cols` filters given tap by tap (`taps[(3·ky + kx) · cols + k]`) into the 25
/// rows of `u`, through `rows` (15 rows: `G g`).
#[inline(always)]
fn filter_tiles(taps: &[f32], cols: usize, rows: &mut [f32], u: &mut [f32]) {
    for j in 0..3 {
        let column: [&[f32]; 3] = std::array::from_fn(|i| &taps[(3 * i + j) * cols..][..cols]);
        each_row!(G[0, 1, 2, 3, 4], column, |a| &mut rows[(3 * a + j) * cols..][..cols]);
    }
    for a in 0..5 {
        let row: [&[f32]; 3] = std::array::from_fn(|j| &rows[(3 * a + j) * cols..][..cols]);
        each_row!(G[0, 1, 2, 3, 4], row, |b| &mut u[(5 * a + b) * cols..][..cols]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::winograd::tests::{assert_products_match_plain_loops, contiguous};

    /// All three products against plain loops, for paddings 0, 1 and 2 (the input gradient's
    /// own padding is then 2, 1 and 0), sizes that are and are not multiples of 3, a 1×1
    /// output, a batch in two chunks of one image, a batch of small images in one chunk, and
    /// wide channel counts (70 in, 131 out).
    #[test]
    fn output_and_gradients_match_plain_loops() {
        let cases = [
            ([2, 3, 7, 6], 4, 0),
            ([2, 3, 7, 6], 4, 1),
            ([3, 2, 5, 8], 5, 2),
            ([2, 4, 1, 1], 3, 1),
            ([2, 2, 9, 9], 3, 1),
            ([2, 2, 70, 67], 3, 1),
            ([40, 2, 5, 5], 3, 1),
            ([1, 70, 4, 4], 131, 1),
        ];
        for (case, (dims, o, pad)) in cases.into_iter().enumerate() {
            let [n, c, h, wd] = dims;
            let wg = Winograd::<3>::new(n, c, h, wd, o, pad).unwrap();
            assert_products_match_plain_loops(case, dims, o, pad, |x, w, dy| {
                let mut y = vec![f32::NAN; n * o * wg.oh * wg.ow];
                wg.forward(x, &contiguous(dims), &transform_weights(w, o, c, false), &mut y, |_, _| ());
                let mut dx = vec![f32::NAN; x.len()];
                let dys = contiguous([n, o, wg.oh, wg.ow]);
                wg.input_gradient().forward(dy, &dys, &transform_weights(w, o, c, true), &mut dx, |_, _| ());
                let mut dw = vec![f32::NAN; w.len()];
                wg.weight_gradient(x, &contiguous(dims), dy, &mut dw);
                [y, dx, dw]
            });
        }
    }
}
