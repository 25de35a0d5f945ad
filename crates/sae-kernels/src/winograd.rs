//! Winograd's F(2×2, 3×3) convolution (Lavin and Gray, "Fast Algorithms for Convolutional
//! Neural Networks", 2016) for 3×3, stride-1, ungrouped convolutions on the CPU in f32.
//!
//! Each 2×2 block of output pixels ("tile") is computed from the 4×4 input block around it
//! with 16 multiplies per (input, output) channel pair instead of 36:
//!
//! ```text
//! Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A
//! ```
//!
//! where `d` is the 4×4 input block, `g` the 3×3 filter and `⊙` the element-wise product.
//! Summed over input channels, each of the 16 positions of that product is one matrix
//! multiply: `M[t] (O × tiles) = U[t] (O × C) · V[t] (C × tiles)`, with `U = G g Gᵀ` (the
//! transformed weights) and `V = Bᵀ d B` (the transformed input). The input is expanded 4
//! times (16 values per 4 pixels) instead of im2col's 9, and the multiplies are 16/36 of the
//! direct ones for even output sizes. The transforms are additions only; in f32 their
//! rounding is a few ulps of the terms (the parity tests hold the same tolerance as im2col's).
//!
//! The input gradient of such a convolution is one too: the output gradient convolved with
//! the weights rotated by 180° and their channel axes swapped, padded by `2 − padding`
//! ([`transform_weights`] with `rotate`).

use crate::cpu::{matmul_threads, plane_f32, read_f32, uninit, vectorized, write_f32, Elem, Mat, Products};
use crate::layout::Strided4;
use rayon::prelude::*;

/// Tiles per multiply at least, where the batch has them: the 16 products of a chunk of
/// images run one per rayon task, and below this they are too narrow for the gemm kernels.
pub(crate) const MIN_TILES: usize = 512;

/// Tiles a batch needs for Winograd to pay: the 16 products are that narrow. On the Xeon of
/// `results/train-speed.md`, alternating `xtask bench-train-row` runs, with no limit a
/// SENetV2-ResNet-50 140×140 batch-1 inference took 0.031 s (25 and 9 tiles at layers 3 and
/// 4) and the unrolled convolution 0.024–0.026; at 128, 0.024–0.025; ResNet-50 32×32 training
/// (16 tiles at layer 3) 0.119–0.120 s with no limit, 0.107 at 128, 0.108–0.109 unrolled.
const MIN_BATCH_TILES: usize = 128;

/// Tiles of a batch from which the weight gradient is computed this way too (see
/// [`Winograd::<2>::weight_gradient_pays`]).
const MIN_WEIGHT_GRADIENT_TILES: usize = 256;

/// Floats the transformed input and the products of one chunk may take (64 MiB).
pub(crate) const BUDGET: usize = 16 << 20;

/// One call's shapes for Winograd's F(M×M, 3×3): input (n, c, h, w), `oc` output channels,
/// zero padding `pad`. F(2×2, 3×3)'s kernels are below, F(3×3, 3×3)'s in `crate::winograd3`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Winograd<const M: usize> {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) w: usize,
    pub(crate) oc: usize,
    pub(crate) pad: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    /// Tile rows and columns: the output rounded up to a multiple of M, divided by M.
    pub(crate) th: usize,
    pub(crate) tw: usize,
}

impl<const M: usize> Winograd<M> {
    /// The shapes of a 3×3 stride-1 convolution with padding at most 2 (so that its input
    /// gradient is one as well) and a non-empty output.
    pub fn new(n: usize, c: usize, h: usize, w: usize, oc: usize, pad: usize) -> Option<Self> {
        let (oh, ow) = ((h + 2 * pad).checked_sub(2)?, (w + 2 * pad).checked_sub(2)?);
        if pad > 2 || oh == 0 || ow == 0 || n * c * oc == 0 {
            return None;
        }
        Some(Self { n, c, w, oc, pad, oh, ow, th: oh.div_ceil(M), tw: ow.div_ceil(M) })
    }

    /// The input gradient's convolution: the output gradient (n, oc, oh, ow) in, `c`
    /// channels of (h, w) out.
    pub fn input_gradient(&self) -> Self {
        Self::new(self.n, self.oc, self.oh, self.ow, self.c, 2 - self.pad).expect("the transpose of a valid call")
    }

    pub(crate) fn tiles(&self) -> usize {
        self.th * self.tw
    }

    /// Multiplies per image and channel pair: (M + 2)² per tile.
    pub fn multiplies(&self) -> usize {
        (M + 2) * (M + 2) * self.tiles()
    }
}

impl Winograd<2> {
    /// Whether this is faster than the unrolled convolution: it must save a quarter of the
    /// direct multiplies at least (odd output sizes pay for whole tiles: a 1×1 output takes 16
    /// multiplies per channel pair instead of 9, a 3×3 one 64 instead of 81; the transforms
    /// are not free), and the batch must have [`MIN_BATCH_TILES`] tiles.
    pub fn pays(&self) -> bool {
        4 * 16 * self.tiles() <= 3 * 9 * self.oh * self.ow && self.n * self.tiles() >= MIN_BATCH_TILES
    }

    /// Whether the weight gradient pays this way too: its 16 products are as deep as the
    /// batch has tiles, and each writes an (oc × c) matrix that the adjoint transform reads
    /// back, 16/9 of the weights, so shallow ones lose to the unrolled products. Layer 4 of
    /// ResNet-50 at 140×140 (512 channels, 5×5, 144 tiles in a batch of 16): backward 20.5 ms
    /// with the unrolled weight gradient against 23.6–23.9 ms (`cargo xtask bench-layers`, two
    /// rounds on the 2-core AMD EPYC); layer 3 (9×9, 400 tiles) 13.7–13.9 ms this way against
    /// 15.3–15.4 unrolled; layer 4 at 224×224 (7×7, 256 tiles) level (37–41 ms both ways).
    pub fn weight_gradient_pays(&self) -> bool {
        self.n * self.tiles() >= MIN_WEIGHT_GRADIENT_TILES
    }

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
            // M as (16, oc, cols).
            let mut m = uninit::<f32>(16 * oc * cols);
            m.par_chunks_mut(oc * cols).enumerate().for_each(|(t, m)| {
                let u = Mat { data: &u[t * c..], rs: 16 * c, cs: 1 };
                let v = Mat { data: &v[t * cols..], rs: 16 * cols, cs: 1 };
                matmul_threads(Products::F32, 1, oc, cols, c, u, v, m, false);
            });
            out.par_chunks_mut(plane).enumerate().for_each_init(
                || (Vec::new(), Vec::new()),
                |(buf, rows), (k, y)| {
                    let (i, o) = (k / oc, k % oc);
                    write_f32(y, buf, |y| {
                        self.transform_output(&m, o * cols + i * tiles, oc * cols, rows, y);
                        epilogue(o, y)
                    })
                },
            );
        }
    }

    /// Images per chunk: enough for [`MIN_TILES`] columns, within [`BUDGET`].
    fn images_per_chunk(&self) -> usize {
        let tiles = self.tiles();
        MIN_TILES.div_ceil(tiles).min((BUDGET / (16 * (self.c + self.oc) * tiles)).max(1)).clamp(1, self.n)
    }

    /// `V = Bᵀ d B` of every tile of `images` as (c, 16, cols), cols = images · tiles:
    /// matrix `t` is rows c, `16 · cols` apart.
    fn transformed_input<T: Elem>(&self, x: &[T], xs: &Strided4, images: std::ops::Range<usize>) -> Vec<f32> {
        let (tiles, cols) = (self.tiles(), images.len() * self.tiles());
        let mut v = uninit::<f32>(self.c * 16 * cols);
        v.par_chunks_mut(16 * cols).enumerate().for_each_init(
            || (Vec::new(), Scratch::default()),
            |(buf, scratch), (ci, v)| {
                for (i, n) in images.clone().enumerate() {
                    let x = plane_f32(x, xs, n, ci, buf);
                    self.transform_input(x, scratch, v, i * tiles, cols);
                }
            },
        );
        v
    }

    /// The weight gradient (oc, c, 3, 3), f32, from the input `x` (n, c, h, w, any strides)
    /// and the output gradient `dy` (n, oc, oh, ow, contiguous): the adjoint of
    /// [`Self::forward`], `dU[t] = Σ (A dY Aᵀ)[t] · V[t]ᵀ` summed over tiles as 16 products,
    /// then `dW = Gᵀ dU G` per filter.
    pub fn weight_gradient<T: Elem>(&self, x: &[T], xs: &Strided4, dy: &[T], dw: &mut [f32]) {
        let (c, oc, tiles, plane) = (self.c, self.oc, self.tiles(), self.oh * self.ow);
        let per_chunk = self.images_per_chunk();
        let mut du = uninit::<f32>(16 * oc * c);
        for chunk in 0..self.n.div_ceil(per_chunk) {
            let images = chunk * per_chunk..(chunk * per_chunk + per_chunk).min(self.n);
            let cols = images.len() * tiles;
            let v = self.transformed_input(x, xs, images.clone());
            // dM = A dY Aᵀ as (oc, 16, cols).
            let mut dm = uninit::<f32>(oc * 16 * cols);
            dm.par_chunks_mut(16 * cols).enumerate().for_each_init(
                || (Vec::new(), Scratch::default()),
                |(buf, scratch), (o, dm)| {
                    for (i, n) in images.clone().enumerate() {
                        let dy = read_f32(&dy[(n * oc + o) * plane..][..plane], buf);
                        self.transform_gradient(dy, scratch, dm, i * tiles, cols);
                    }
                },
            );
            du.par_chunks_mut(oc * c).enumerate().for_each(|(t, du)| {
                let dm = Mat { data: &dm[t * cols..], rs: 16 * cols, cs: 1 };
                let vt = Mat { data: &v[t * cols..], rs: 1, cs: 16 * cols };
                matmul_threads(Products::F32, 1, oc, c, cols, dm, vt, du, chunk > 0);
            });
        }
        dw.par_chunks_mut(c * 9).enumerate().for_each_init(Vec::new, |scratch, (o, dw)| {
            scratch.resize(21 * c, 0.0);
            let (columns, taps) = scratch.split_at_mut(12 * c);
            vectorized!(adjoint_filters(&du, o * c, oc * c, c, columns, taps));
            // Tap by tap into the filters of output channel `o`.
            for (i, tap) in taps.chunks_exact(c).enumerate() {
                for (g, &v) in dw.chunks_exact_mut(9).zip(tap) {
                    g[i] = v;
                }
            }
        });
    }

    /// Writes `A dY Aᵀ` of every tile of one output-gradient plane `dy` (oh × ow; zero past
    /// its edges) into `dm` (16 rows, `stride` apart, tile `k` at column `first + k`), as
    /// vector passes over each row of tiles like [`Self::transform_input`].
    fn transform_gradient(&self, dy: &[f32], scratch: &mut Scratch, dm: &mut [f32], first: usize, stride: usize) {
        let tw = self.tw;
        let (even, odd) = (&mut scratch.even, &mut scratch.odd);
        // The two output rows of a row of tiles, split into even and odd columns: even[0..tw]
        // and odd[0..tw] the first row, even[tw..] and odd[tw..] the second.
        for buf in [&mut *even, &mut *odd] {
            buf.clear();
            buf.resize(2 * tw, 0.0);
        }
        for ty in 0..self.th {
            for r in 0..2 {
                let (e, o) = (&mut even[r * tw..][..tw], &mut odd[r * tw..][..tw]);
                let oy = 2 * ty + r;
                if oy >= self.oh {
                    e.fill(0.0);
                    o.fill(0.0);
                    continue;
                }
                let row = &dy[oy * self.ow..][..self.ow];
                let pairs = row.chunks_exact(2);
                if let Some(&last) = pairs.remainder().first() {
                    (e[tw - 1], o[tw - 1]) = (last, 0.0);
                }
                for ((e, o), pair) in e.iter_mut().zip(o.iter_mut()).zip(pairs) {
                    (*e, *o) = (pair[0], pair[1]);
                }
            }
            let (e, o) = (even.split_at(tw), odd.split_at(tw));
            let (e, o) = ([e.0, e.1], [o.0, o.1]);
            let col = first + ty * tw;
            // A dY: rows (y0, y0 + y1, y0 − y1, −y1), each into matrices 4i..4i + 4.
            gradient_row_columns(e, o, |y0, _| y0, dm, 0, stride, col);
            gradient_row_columns(e, o, |y0, y1| y0 + y1, dm, 4, stride, col);
            gradient_row_columns(e, o, |y0, y1| y0 - y1, dm, 8, stride, col);
            gradient_row_columns(e, o, |_, y1| -y1, dm, 12, stride, col);
        }
    }

    /// Writes `Bᵀ d B` of every tile of plane `x` (h × w) into `v` (16 rows, `stride` apart,
    /// tile `k` at column `first + k`). The plane is copied zero-padded into `even` and `odd`,
    /// its even and odd columns, so that every step below is a contiguous vector operation
    /// over a row of tiles (tile `tx` reads columns 2·tx to 2·tx + 3).
    fn transform_input(&self, x: &[f32], scratch: &mut Scratch, v: &mut [f32], first: usize, stride: usize) {
        let (ph, half) = (2 * self.th + 2, self.tw + 1);
        let (even, odd) = (&mut scratch.even, &mut scratch.odd);
        for buf in [&mut *even, &mut *odd] {
            buf.clear();
            buf.resize(ph * half, 0.0);
        }
        // 2·th + 2 ≥ h + 2·pad (and so for the columns): the whole input fits.
        // Input column 2k lands in padded column 2k + pad, 2k + 1 in 2k + 1 + pad: which of
        // the two halves each goes to depends on the padding's parity.
        let (to_even, to_odd) =
            if self.pad.is_multiple_of(2) { (&mut *even, &mut *odd) } else { (&mut *odd, &mut *even) };
        let (even_at, odd_at) = (self.pad / 2, self.pad.div_ceil(2));
        let (even_len, odd_len) = (self.w.div_ceil(2), self.w / 2);
        for (r, row) in x.chunks_exact(self.w).enumerate() {
            let at = (r + self.pad) * half;
            let (dst_e, dst_o) = (&mut to_even[at + even_at..][..even_len], &mut to_odd[at + odd_at..][..odd_len]);
            let pairs = row.chunks_exact(2);
            if let Some(&last) = pairs.remainder().first() {
                dst_e[self.w / 2] = last;
            }
            for ((e, o), pair) in dst_e.iter_mut().zip(dst_o.iter_mut()).zip(pairs) {
                (*e, *o) = (pair[0], pair[1]);
            }
        }
        let (even, odd) = (&*even, &*odd);
        let tw = self.tw;
        for ty in 0..self.th {
            let e: [&[f32]; 4] = std::array::from_fn(|j| &even[(2 * ty + j) * half..][..half]);
            let o: [&[f32]; 4] = std::array::from_fn(|j| &odd[(2 * ty + j) * half..][..half]);
            let col = first + ty * tw;
            // Bᵀ d: rows (d0 − d2, d1 + d2, d2 − d1, d1 − d3), each into matrices 4i..4i + 4.
            tile_row_columns([e[0], e[2]], [o[0], o[2]], |a, b| a - b, v, 0, stride, col);
            tile_row_columns([e[1], e[2]], [o[1], o[2]], |a, b| a + b, v, 4, stride, col);
            tile_row_columns([e[2], e[1]], [o[2], o[1]], |a, b| a - b, v, 8, stride, col);
            tile_row_columns([e[1], e[3]], [o[1], o[3]], |a, b| a - b, v, 12, stride, col);
        }
    }

    /// Writes `Aᵀ m A` of every tile of one output plane `y` (oh × ow), element `t` of tile
    /// `k` being `m[t · stride + first + k]`: per row of tiles, the rows of `Aᵀ m` as vectors
    /// over its tiles, then each tile's two columns.
    fn transform_output(&self, m: &[f32], first: usize, stride: usize, rows: &mut Vec<f32>, y: &mut [f32]) {
        let tw = self.tw;
        rows.resize(8 * tw, 0.0);
        for ty in 0..self.th {
            let e = |t: usize| &m[t * stride + first + ty * tw..][..tw];
            // Aᵀ m: rows (m0 + m1 + m2, m1 − m2 − m3), per column j of the tile.
            for j in 0..4 {
                let (r0, r1) = rows.split_at_mut(4 * tw);
                let (r0, r1) = (&mut r0[j * tw..][..tw], &mut r1[j * tw..][..tw]);
                let (m0, m1, m2, m3) = (e(j), e(4 + j), e(8 + j), e(12 + j));
                for k in 0..tw {
                    r0[k] = m0[k] + m1[k] + m2[k];
                    r1[k] = m1[k] - m2[k] - m3[k];
                }
            }
            // · A: columns (c0 + c1 + c2, c1 − c2 − c3), written as pairs of output pixels.
            for i in 0..2 {
                let oy = 2 * ty + i;
                if oy >= self.oh {
                    break;
                }
                let r = |j: usize| &rows[(4 * i + j) * tw..][..tw];
                let (c0, c1, c2, c3) = (r(0), r(1), r(2), r(3));
                let out = &mut y[oy * self.ow..(oy + 1) * self.ow];
                let (pairs, last) = out.split_at_mut(self.ow / 2 * 2);
                for (k, pair) in pairs.chunks_exact_mut(2).enumerate() {
                    pair[0] = c0[k] + c1[k] + c2[k];
                    pair[1] = c1[k] - c2[k] - c3[k];
                }
                // An odd width: the last tile's first column.
                if let Some(v) = last.first_mut() {
                    let k = tw - 1;
                    *v = c0[k] + c1[k] + c2[k];
                }
            }
        }
    }
}

/// One row `A dY` of every tile in a row of tiles, times `Aᵀ`, into matrices `m..m + 4` of
/// `dm` (rows `stride` apart, the row's tiles from column `col`): the row is `row(y0, y1)` of
/// the tiles' two output-gradient rows, given split into even (`e`) and odd (`o`) columns, and
/// `· Aᵀ` takes columns (p, p + q, p − q, −q) of each tile's (p, q) = (even, odd). The row's
/// values are computed where they are used, not stored and read back.
#[inline(always)]
fn gradient_row_columns(
    e: [&[f32]; 2],
    o: [&[f32]; 2],
    row: impl Fn(f32, f32) -> f32,
    dm: &mut [f32],
    m: usize,
    stride: usize,
    col: usize,
) {
    let tw = e[0].len();
    let [d0, d1, d2, d3] = four_rows(dm, m * stride + col, stride, tw);
    let ([e0, e1], [o0, o1]) = (e, o);
    for k in 0..tw {
        let (p, q) = (row(e0[k], e1[k]), row(o0[k], o1[k]));
        d0[k] = p;
        d1[k] = p + q;
        d2[k] = p - q;
        d3[k] = -q;
    }
}

/// One row `Bᵀ d` of every tile in a row of tiles, times `B`, into matrices `m..m + 4` of `v`
/// (rows `stride` apart, the row's tiles from column `col`): the row is `row(a, b)` of two
/// rows of the input, given split into even (`e`) and odd (`o`) columns, and `· B` takes
/// columns (c0 − c2, c1 + c2, c2 − c1, c1 − c3) of each tile, where c0 and c2 are even columns
/// tx and tx + 1, c1 and c3 odd columns tx and tx + 1. The row's values are computed where
/// they are used (each even one twice), not stored and read back.
#[inline(always)]
fn tile_row_columns(
    e: [&[f32]; 2],
    o: [&[f32]; 2],
    row: impl Fn(f32, f32) -> f32,
    v: &mut [f32],
    m: usize,
    stride: usize,
    col: usize,
) {
    // Rows of `half` = tiles + 1 columns: tile `k` reads columns k and k + 1.
    let tw = e[0].len() - 1;
    let [v0, v1, v2, v3] = four_rows(v, m * stride + col, stride, tw);
    let ([e0, e1], [o0, o1]) = (e, o);
    for k in 0..tw {
        let (c0, c2) = (row(e0[k], e1[k]), row(e0[k + 1], e1[k + 1]));
        let (c1, c3) = (row(o0[k], o1[k]), row(o0[k + 1], o1[k + 1]));
        v0[k] = c0 - c2;
        v1[k] = c1 + c2;
        v2[k] = c2 - c1;
        v3[k] = c1 - c3;
    }
}

/// Four rows of `len` values of `buf`, the first at `first` and each `stride` after the one
/// before (`len ≤ stride`), to write side by side.
#[inline(always)]
fn four_rows(buf: &mut [f32], first: usize, stride: usize, len: usize) -> [&mut [f32]; 4] {
    let (r0, rest) = buf[first..].split_at_mut(stride);
    let (r1, rest) = rest.split_at_mut(stride);
    let (r2, r3) = rest.split_at_mut(stride);
    [&mut r0[..len], &mut r1[..len], &mut r2[..len], &mut r3[..len]]
}

/// Per-task buffers of [`Winograd::transform_input`] and [`Winograd::transform_gradient`]: a
/// plane's (or a row of tiles') even and odd columns.
#[derive(Default)]
struct Scratch {
    even: Vec<f32>,
    odd: Vec<f32>,
}

/// `G g Gᵀ` of every 3×3 filter of `w` (o, c, 3, 3) as (o, 16, c): matrix `t` is rows `o`,
/// `16 · c` apart. With `rotate`, of the input gradient's filters instead: each rotated by
/// 180°, as (c, 16, o).
pub(crate) fn transform_weights(w: &[f32], o: usize, c: usize, rotate: bool) -> Vec<f32> {
    transformed_filters(w, o, c, rotate, 16, 6, |taps, halves, u| {
        vectorized!(transform_filters(taps, halves, taps.len() / 9, u))
    })
}

/// The transformed filters of `w` (o, c, 3, 3), `entries` per filter, as (o, entries, c):
/// matrix `t` is rows `o`, `entries · c` apart. With `rotate`, of the input gradient's filters
/// instead (each rotated by 180°), as (c, entries, o). `transform(taps, scratch, u)` transforms
/// one row's filters, given tap by tap (`taps[(3·ky + kx) · cols + k]`, so that it runs as
/// vector operations over the filters), into the `entries` rows of `u`, through `scratch`
/// (`scratch_rows` rows of `cols`).
pub(crate) fn transformed_filters(
    w: &[f32],
    o: usize,
    c: usize,
    rotate: bool,
    entries: usize,
    scratch_rows: usize,
    transform: impl Fn(&[f32], &mut [f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let (rows, cols) = if rotate { (c, o) } else { (o, c) };
    let mut u = uninit::<f32>(rows * entries * cols);
    u.par_chunks_mut(entries * cols).enumerate().for_each_init(Vec::new, |scratch, (r, u)| {
        // Rotated, tap 8 − i is tap i.
        scratch.resize((9 + scratch_rows) * cols, 0.0);
        let (taps, rest) = scratch.split_at_mut(9 * cols);
        for k in 0..cols {
            let (oi, ci) = if rotate { (k, r) } else { (r, k) };
            for (i, &v) in w[(oi * c + ci) * 9..][..9].iter().enumerate() {
                taps[if rotate { 8 - i } else { i } * cols + k] = v;
            }
        }
        transform(taps, rest, u);
    });
    u
}

/// `G g Gᵀ` of `cols` filters given tap by tap into the 16 rows of `u` (`u[t · cols + k]`),
/// as passes over the filters. `G g`: per column of the filter, rows (g0, (g0 + g1 + g2)/2,
/// (g0 − g1 + g2)/2, g2) — its middle two rows go to `halves` — then the same on the columns
/// of each row.
#[inline(always)]
fn transform_filters(taps: &[f32], halves: &mut [f32], cols: usize, u: &mut [f32]) {
    // Row `j` of `rows`, rows `cols` long.
    #[inline(always)]
    fn row(rows: &[f32], j: usize, cols: usize) -> &[f32] {
        &rows[j * cols..][..cols]
    }
    let (sums, diffs) = halves.split_at_mut(3 * cols);
    for j in 0..3 {
        let (a, b, d) = (row(taps, j, cols), row(taps, 3 + j, cols), row(taps, 6 + j, cols));
        let (sum, diff) = (&mut sums[j * cols..][..cols], &mut diffs[j * cols..][..cols]);
        for k in 0..cols {
            sum[k] = 0.5 * (a[k] + b[k] + d[k]);
            diff[k] = 0.5 * (a[k] - b[k] + d[k]);
        }
    }
    let (sums, diffs) = (&*sums, &*diffs);
    for (i, rows) in [&taps[..3 * cols], sums, diffs, &taps[6 * cols..]].into_iter().enumerate() {
        let (a, b, d) = (row(rows, 0, cols), row(rows, 1, cols), row(rows, 2, cols));
        let [u0, u1, u2, u3] = four_rows(u, 4 * i * cols, cols, cols);
        for k in 0..cols {
            u0[k] = a[k];
            u1[k] = 0.5 * (a[k] + b[k] + d[k]);
            u2[k] = 0.5 * (a[k] - b[k] + d[k]);
            u3[k] = d[k];
        }
    }
}

/// `Gᵀ dU G` of `c` filters whose 16 entries are `du[first + t · stride + k]`, into `taps`
/// tap by tap (`taps[(3·ky + kx) · c + k]`), as passes over the filters: rows (u0 + (u1 + u2)/2,
/// (u1 − u2)/2, (u1 + u2)/2 + u3) into `columns`, then the same on the columns of each row.
#[inline(always)]
fn adjoint_filters(du: &[f32], first: usize, stride: usize, c: usize, columns: &mut [f32], taps: &mut [f32]) {
    // Three rows of `c` into `out`.
    #[inline(always)]
    fn adjoint(a: &[f32], b: &[f32], cc: &[f32], d: &[f32], out: &mut [f32]) {
        let c = a.len();
        let (o0, rest) = out.split_at_mut(c);
        let (o1, o2) = rest.split_at_mut(c);
        for k in 0..c {
            o0[k] = a[k] + 0.5 * (b[k] + cc[k]);
            o1[k] = 0.5 * (b[k] - cc[k]);
            o2[k] = 0.5 * (b[k] + cc[k]) + d[k];
        }
    }
    let u = |t: usize| &du[first + t * stride..][..c];
    // Column j's three values at rows 3j..3j + 3 of `columns`.
    for j in 0..4 {
        adjoint(u(j), u(4 + j), u(8 + j), u(12 + j), &mut columns[3 * j * c..][..3 * c]);
    }
    let column = |j: usize, i: usize| &columns[(3 * j + i) * c..][..c];
    for i in 0..3 {
        adjoint(column(0, i), column(1, i), column(2, i), column(3, i), &mut taps[3 * i * c..][..3 * c]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A 3×3 stride-1 convolution's output, input gradient and weight gradient as plain f64
    /// loops over taps, from the values `x` (n, c, h, w), `w` (o, c, 3, 3) and `dy` (n, o, oh, ow).
    struct Plain {
        y: Vec<f64>,
        dx: Vec<f64>,
        dw: Vec<f64>,
    }

    #[allow(clippy::too_many_arguments)]
    fn plain(x: &[f32], w: &[f32], dy: &[f32], [n, c, h, wd]: [usize; 4], o: usize, pad: usize) -> Plain {
        let (oh, ow) = (h + 2 * pad - 2, wd + 2 * pad - 2);
        let (mut y, mut dx, mut dw) = (vec![0.0; n * o * oh * ow], vec![0.0; n * c * h * wd], vec![0.0; o * c * 9]);
        for ni in 0..n {
            for oi in 0..o {
                for yy in 0..oh {
                    for xx in 0..ow {
                        let out = ((ni * o + oi) * oh + yy) * ow + xx;
                        for ci in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = ((yy + ky).checked_sub(pad), (xx + kx).checked_sub(pad));
                                    let (Some(iy), Some(ix)) = (iy, ix) else { continue };
                                    if iy >= h || ix >= wd {
                                        continue;
                                    }
                                    let (xi, wi) =
                                        (((ni * c + ci) * h + iy) * wd + ix, (oi * c + ci) * 9 + ky * 3 + kx);
                                    y[out] += x[xi] as f64 * w[wi] as f64;
                                    dx[xi] += dy[out] as f64 * w[wi] as f64;
                                    dw[wi] += dy[out] as f64 * x[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        Plain { y, dx, dw }
    }

    fn values(seed: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| (((i + seed) * 7919 % 1009) as f32 / 504.5) - 1.0).collect()
    }

    fn assert_close(what: &str, got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
        for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - r).abs() <= 1e-5 * scale, "{what}: element {i}: {g} vs {r}");
        }
    }

    pub(crate) fn contiguous(dims: [usize; 4]) -> Strided4 {
        let [_, c, h, w] = dims;
        Strided4 { dims, strides: [c * h * w, h * w, w, 1], offset: 0 }
    }

    /// Output, input gradient and weight gradient from `products(x, w, dy)` against the plain
    /// loops, for input `dims`, `o` output channels and padding `pad` (values from `seed`).
    pub(crate) fn assert_products_match_plain_loops(
        seed: usize,
        dims: [usize; 4],
        o: usize,
        pad: usize,
        products: impl Fn(&[f32], &[f32], &[f32]) -> [Vec<f32>; 3],
    ) {
        let [n, c, h, wd] = dims;
        let (oh, ow) = (h + 2 * pad - 2, wd + 2 * pad - 2);
        let x = values(seed, n * c * h * wd);
        let w = values(seed + 100, o * c * 9);
        let dy = values(seed + 200, n * o * oh * ow);
        let want = plain(&x, &w, &dy, dims, o, pad);
        let [y, dx, dw] = products(&x, &w, &dy);
        let what = format!("{dims:?} → {o} channels, padding {pad}");
        assert_close(&format!("{what}: output"), &y, &want.y);
        assert_close(&format!("{what}: input gradient"), &dx, &want.dx);
        assert_close(&format!("{what}: weight gradient"), &dw, &want.dw);
    }

    /// All three products against the plain loops, for paddings 0, 1 and 2 (the input
    /// gradient's own padding is then 2, 1 and 0), odd and even sizes, a 1×1 output, and
    /// images of over 512 tiles, which go one image per chunk, and wide channel counts (70 in,
    /// 131 out).
    #[test]
    fn output_and_gradients_match_plain_loops() {
        let cases = [
            ([2, 3, 7, 6], 4, 0),
            ([2, 3, 7, 6], 4, 1),
            ([3, 2, 5, 8], 5, 2),
            ([2, 4, 1, 1], 3, 1),
            ([2, 2, 46, 45], 3, 1),
            ([1, 70, 4, 4], 131, 1),
        ];
        for (case, (dims, o, pad)) in cases.into_iter().enumerate() {
            let [n, c, h, wd] = dims;
            let wg = Winograd::<2>::new(n, c, h, wd, o, pad).unwrap();
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

    /// The filter transforms run in [`vectorized!`] code: the CPU's widest vectors give the
    /// same bits as the baseline build's four lanes (odd filter counts leave remainders).
    #[test]
    fn vectorized_filter_transforms_equal_the_baseline_bit_for_bit() {
        use crate::cpu::BASELINE_VECTORS;
        use std::sync::atomic::Ordering;
        let ([n, c, h, wd], o) = ([2, 37, 6, 5], 21);
        let wg = Winograd::<2>::new(n, c, h, wd, o, 1).unwrap();
        let (x, w, dy) = (values(1, n * c * h * wd), values(2, o * c * 9), values(3, n * o * wg.oh * wg.ow));
        let run = |baseline: bool| {
            BASELINE_VECTORS.store(baseline, Ordering::SeqCst);
            let mut dw = vec![f32::NAN; w.len()];
            wg.weight_gradient(&x, &contiguous([n, c, h, wd]), &dy, &mut dw);
            let out = (transform_weights(&w, o, c, false), transform_weights(&w, o, c, true), dw);
            BASELINE_VECTORS.store(false, Ordering::SeqCst);
            out
        };
        let (wide, baseline) = (run(false), run(true));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&wide.0), bits(&baseline.0), "forward filters");
        assert_eq!(bits(&wide.1), bits(&baseline.1), "rotated filters");
        assert_eq!(bits(&wide.2), bits(&baseline.2), "weight gradient");
    }

    #[test]
    fn pays_only_where_it_saves_multiplies_on_enough_tiles() {
        // ResNet-50's 3×3 convolutions at 140×140, batch 16 and 1.
        assert!(Winograd::<2>::new(16, 64, 35, 35, 64, 1).unwrap().pays());
        assert!(Winograd::<2>::new(16, 512, 5, 5, 512, 1).unwrap().pays());
        assert!(!Winograd::<2>::new(1, 512, 5, 5, 512, 1).unwrap().pays());
        // 1×1 and 3×3 outputs save too little whatever the batch.
        assert!(!Winograd::<2>::new(256, 8, 1, 1, 8, 1).unwrap().pays());
        assert!(!Winograd::<2>::new(256, 8, 3, 3, 8, 1).unwrap().pays());
        assert!(Winograd::<2>::new(1, 8, 3, 3, 8, 3).is_none());
    }
}
