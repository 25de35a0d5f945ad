//! A matrix multiply on bf16 multiplies with f32 sums for the bf16 mixed-precision
//! convolutions: `out (f32) [+]= a · b`, where `a` and `b` hold bf16 values (stored as f32,
//! the way the convolutions unroll them) and every product and sum is f32.
//!
//! Two micro-kernels, chosen at run time: AMX tiles ([`amx`], `tdpbf16ps`) where the CPU has
//! AMX-BF16 (3.3× sgemm on the Xeon of `results/peak.md`), else AVX-512 BF16 dot products
//! (`vdpbf16ps`: 32 multiplies and adds, twice the work of an f32 FMA in the same time on the
//! AMD EPYC of `results/train-speed-epyc.md`, 468 vs 232 GFLOP/s, but half on that Xeon). The
//! bf16 convolutions use them where [`available`] says the CPU has AVX-512 BF16, and the
//! `gemm` crate's f32 kernels (the same values, multiplied in f32) everywhere else.
//!
//! The structure is the classic packed one (Goto & van de Geijn): `b` is packed block by
//! block into panels of [`NR`] columns with consecutive pairs of `k` interleaved (the operand
//! layout of `vdpbf16ps`), `a` into panels of [`MR`] rows holding each pair as one 32-bit word
//! to broadcast, and a micro-kernel keeps an `MR × NR` tile of `out` in 24 registers while it
//! runs down `k`. Packing rounds to bf16 (to nearest even): exact for values that are bf16
//! already, which is what the callers pass. Blocks at the edges are zero-padded, so the
//! micro-kernel has one shape. Unlike the f32 path, `vdpbf16ps` treats subnormal inputs and
//! results as zero (below 1.2e-38; activations and weights of a trained network are not there).

use crate::cpu::{same_type, Elem, Mat};
use half::bf16;

/// The environment variable that turns bf16 products off ([`available`]).
pub const DISABLE_BF16_PRODUCTS: &str = "SAE_DISABLE_BF16_PRODUCTS";

/// Rows of the micro-tile.
const MR: usize = 12;
/// Columns of the micro-tile: two vectors of 16 f32.
const NR: usize = 32;
/// Depth of a packed block, in elements of `k` (even: packed by pairs).
const KC: usize = 512;
/// Rows of a packed block of `a` (a multiple of [`MR`]).
const MC: usize = 96;
/// Columns of a packed block of `b` (a multiple of [`NR`]).
const NC: usize = 1024;

/// Whether this CPU has AVX-512 BF16 (and AVX-512F and BW) and bf16 products are not turned
/// off, decided once per process. With [`DISABLE_BF16_PRODUCTS`] set, bf16 operands are
/// widened and multiplied in f32 (and AMX tiles are off too), as on CPUs without AVX-512 BF16:
/// so that tests and benchmarks reach that path on every machine.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::env::var_os(DISABLE_BF16_PRODUCTS).is_none()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The 32-bit word `vdpbf16ps` reads as one pair: `lo` and `hi` rounded to bf16 (nearest
/// even, NaN kept), `lo` in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    let bits = |v: f32| <bf16 as Elem>::from_f32(v).to_bits() as u32;
    bits(lo) | (bits(hi) << 16)
}

/// Packs `len` lines of `m` (rows of `a`, or columns of `b`) and depth `p0..p0 + depth` into
/// panels of `width` lines: for each panel, for each of `pairs` pairs of `k`, `width` words of
/// [`pair`] (the layout of `b` for both kernels and of `a` for `vdpbf16ps`). `line_stride`
/// steps from one line to the next and `depth_stride` along `k`.
/// Lines and pairs past the end are zero. Where one of the two strides is 1, blocks of 16
/// lines × 16 pairs are read in memory order, rounded 32 values at a time (`vcvtne2ps2bf16`)
/// and transposed in registers ([`simd`]); a scalar loop over [`pair`] does the rest, and
/// `pack_plain` in the tests is the reference. `data` may be bf16 already (the activations of
/// bf16 convolutions): the same words, taken as they are.
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 BF16 must be available ([`available`]).
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw,avx512bf16"))]
unsafe fn pack<T: Elem>(
    data: &[T],
    first: usize,
    len: usize,
    line_stride: usize,
    depth_stride: usize,
    p0: usize,
    depth: usize,
    width: usize,
    pairs: usize,
    out: &mut Vec<u32>,
) {
    // Full pairs, then the odd last element of `k` paired with zero, then zero pairs up to
    // `pairs`.
    let full = depth / 2;
    debug_assert!(pairs >= depth.div_ceil(2));
    resize_unfilled(out, len.div_ceil(width) * pairs * width);
    let index = |line: usize, p: usize| (first + line) * line_stride + (p0 + p) * depth_stride;
    let at = |line: usize, p: usize| data[index(line, p)].to_f32();
    // f32 and bf16 (f16, which no caller packs, takes the scalar loop).
    let vectorised = cfg!(target_arch = "x86_64")
        && full > 0
        && (line_stride == 1 || depth_stride == 1)
        && (T::as_f32_slice(data).is_some() || same_type::<T, bf16>(data).is_some());
    for (panel, chunk) in out.chunks_exact_mut(pairs * width).enumerate() {
        let l0 = panel * width;
        let lines = width.min(len - l0);
        if vectorised {
            // The last element either branch reads, bounds-checked once for the raw reads.
            let _ = data[index(l0 + lines - 1, 2 * full - 1)];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU features of this function; every read is within the lines and
            // full pairs of this panel (the element above bounds them), every write within
            // `chunk`'s first `full` pairs.
            unsafe {
                let start = index(l0, 0);
                if let Some(data) = same_type::<T, bf16>(data) {
                    let panel = simd::Panel { data: data.as_ptr().add(start) as *const u16, lines, width, full };
                    panel.pack(line_stride, depth_stride, chunk);
                } else if let Some(data) = T::as_f32_slice(data) {
                    let panel = simd::Panel { data: data.as_ptr().add(start), lines, width, full };
                    panel.pack(line_stride, depth_stride, chunk);
                }
            }
        } else {
            for l in 0..lines {
                for q in 0..full {
                    chunk[q * width + l] = pair(at(l0 + l, 2 * q), at(l0 + l, 2 * q + 1));
                }
            }
        }
        if depth % 2 == 1 {
            for l in 0..lines {
                chunk[full * width + l] = pair(at(l0 + l, depth - 1), 0.0);
            }
        }
        // The zeros: pairs past the depth (they meet real values of the other operand), and
        // lines past the end (they only make output the edge tiles drop; written, so that
        // no word is read unwritten).
        if lines < width {
            chunk.chunks_exact_mut(width).for_each(|words| words[lines..].fill(0));
        }
        chunk[depth.div_ceil(2) * width..].fill(0);
    }
}

/// [`pack`]'s vectorised blocks.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// One panel's full pairs: `lines` lines (at most `width`) from `data`, `full` pairs each;
    /// `E` is f32, or u16 for the bits of bf16 values.
    pub(super) struct Panel<E> {
        pub data: *const E,
        pub lines: usize,
        pub width: usize,
        pub full: usize,
    }

    /// The low `count` bits (at most 16).
    fn mask(count: usize) -> __mmask16 {
        ((1u32 << count.min(16)) - 1) as __mmask16
    }

    /// The 32 values `lo` then `hi` rounded to bf16 in order: as 32-bit words, the pair words
    /// of 32 consecutive values of `k`.
    ///
    /// # Safety
    /// AVX-512F and BF16.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn round(lo: __m512, hi: __m512) -> __m512i {
        // SAFETY: both are 512 bits of plain data.
        unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
    }

    /// The pair words of `lo` and `hi` (16 values each): word `i` is `lo[i]` rounded in its
    /// low half and `hi[i]` in its high half.
    ///
    /// # Safety
    /// AVX-512F, BW and BF16.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn interleave(lo: __m512, hi: __m512) -> __m512i {
        // SAFETY: the CPU features of this function.
        unsafe { interleave_halves(round(lo, hi)) }
    }

    /// Words of pairs from 32 bf16 values as u16s, `lo`'s 16 then `hi`'s 16: `lo[0]`, `hi[0]`,
    /// `lo[1]`, ….
    ///
    /// # Safety
    /// AVX-512F and BW.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn interleave_halves(halves: __m512i) -> __m512i {
        let order = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        _mm512_permutexvar_epi16(order, halves)
    }

    /// `rows` as a 16 × 16 matrix of 32-bit words, transposed.
    ///
    /// # Safety
    /// AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose(rows: &mut [__m512i; 16]) {
        let r = *rows;
        // Within 128-bit lanes: words, then pairs of words; afterwards row 4g + j, lane L holds
        // column 4L + j of rows 4g..4g + 4.
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            let b = 4 * g;
            u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
            u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
            u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
            u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
        }
        // Then the lanes: column 4L + j gathers lane L of rows j, 4 + j, 8 + j and 12 + j.
        for j in 0..4 {
            let even_low = _mm512_shuffle_i32x4::<0x88>(u[j], u[4 + j]);
            let odd_low = _mm512_shuffle_i32x4::<0xdd>(u[j], u[4 + j]);
            let even_high = _mm512_shuffle_i32x4::<0x88>(u[8 + j], u[12 + j]);
            let odd_high = _mm512_shuffle_i32x4::<0xdd>(u[8 + j], u[12 + j]);
            rows[j] = _mm512_shuffle_i32x4::<0x88>(even_low, even_high);
            rows[8 + j] = _mm512_shuffle_i32x4::<0xdd>(even_low, even_high);
            rows[4 + j] = _mm512_shuffle_i32x4::<0x88>(odd_low, odd_high);
            rows[12 + j] = _mm512_shuffle_i32x4::<0xdd>(odd_low, odd_high);
        }
    }

    /// The element types packing reads: f32 values, rounded, and the u16 bits of bf16 values,
    /// which are taken as they are (a line's pair of `k` is two adjacent u16s, already the
    /// word `vdpbf16ps` reads).
    pub(super) trait Source: Sized {
        /// The words of one pair of `k` for `lines` (at most 16) adjacent lines: the values at
        /// `even` in their low halves, those at `odd` in their high halves; zero past `lines`.
        ///
        /// # Safety
        /// AVX-512F, BW and BF16; `lines` values readable at each pointer.
        unsafe fn pair_words(even: *const Self, odd: *const Self, lines: usize) -> __m512i;

        /// The first `pairs` (at most 16) words of a line whose values of `k` are adjacent;
        /// zero past `pairs`.
        ///
        /// # Safety
        /// AVX-512F, BW and BF16; `2 · pairs` values readable at `line`.
        unsafe fn line_words(line: *const Self, pairs: usize) -> __m512i;
    }

    impl Source for f32 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        unsafe fn pair_words(even: *const f32, odd: *const f32, lines: usize) -> __m512i {
            // SAFETY: the caller's contract; masked-off lanes are not read.
            unsafe { interleave(_mm512_maskz_loadu_ps(mask(lines), even), _mm512_maskz_loadu_ps(mask(lines), odd)) }
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        unsafe fn line_words(line: *const f32, pairs: usize) -> __m512i {
            // SAFETY: as above.
            unsafe {
                let lo = _mm512_maskz_loadu_ps(mask(2 * pairs), line);
                let hi = _mm512_maskz_loadu_ps(mask((2 * pairs).saturating_sub(16)), line.wrapping_add(16));
                round(lo, hi)
            }
        }
    }

    impl Source for u16 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        unsafe fn pair_words(even: *const u16, odd: *const u16, lines: usize) -> __m512i {
            let valid = mask32(lines);
            // SAFETY: as for f32; the odd line's values land in lanes 16–31, read from `odd`
            // by a load 16 values before it whose first 16 lanes are masked off.
            unsafe {
                let lo = _mm512_maskz_loadu_epi16(valid, even as *const i16);
                interleave_halves(_mm512_mask_loadu_epi16(lo, valid << 16, odd.wrapping_sub(16) as *const i16))
            }
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        unsafe fn line_words(line: *const u16, pairs: usize) -> __m512i {
            // SAFETY: as above.
            unsafe { _mm512_maskz_loadu_epi16(mask32(2 * pairs), line as *const i16) }
        }
    }

    /// The low `count` bits (at most 32).
    fn mask32(count: usize) -> __mmask32 {
        (((1u64 << count.min(32)) - 1) as u32) as __mmask32
    }

    impl<E: Source> Panel<E> {
        /// The panel's full pairs by whichever of the two ways below its strides allow (one of
        /// them is 1).
        ///
        /// # Safety
        /// As [`Self::pack_lines_contiguous`].
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        pub(super) unsafe fn pack(&self, line_stride: usize, depth_stride: usize, chunk: &mut [u32]) {
            // SAFETY: the caller's contract.
            unsafe {
                if line_stride == 1 {
                    self.pack_lines_contiguous(depth_stride, chunk)
                } else {
                    self.pack_depth_contiguous(line_stride, chunk)
                }
            }
        }

        /// Lines adjacent in memory (pairs `depth_stride` apart): each pair's words are the
        /// even and odd depth's values of 16 lines at a time, interleaved.
        ///
        /// # Safety
        /// AVX-512F, BW and BF16; `data` holds the panel's lines and pairs; `chunk` holds
        /// `full · width` words.
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        pub(super) unsafe fn pack_lines_contiguous(&self, depth_stride: usize, chunk: &mut [u32]) {
            debug_assert!(chunk.len() >= self.full * self.width);
            for q in 0..self.full {
                let even = self.data.wrapping_add(2 * q * depth_stride);
                let odd = even.wrapping_add(depth_stride);
                for l in (0..self.width).step_by(16) {
                    let lines = self.lines.saturating_sub(l).min(16);
                    // SAFETY: the caller's contract.
                    unsafe {
                        let words = E::pair_words(even.wrapping_add(l), odd.wrapping_add(l), lines);
                        let dst = chunk.as_mut_ptr().add(q * self.width + l) as *mut i32;
                        _mm512_mask_storeu_epi32(dst, mask(self.width - l), words);
                    }
                }
            }
        }

        /// Each line's values adjacent in memory (lines `line_stride` apart): 16 lines × 16
        /// pairs are read line by line, rounded, transposed and written pair by pair.
        ///
        /// # Safety
        /// As [`Self::pack_lines_contiguous`].
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        pub(super) unsafe fn pack_depth_contiguous(&self, line_stride: usize, chunk: &mut [u32]) {
            debug_assert!(chunk.len() >= self.full * self.width);
            let mut rows = [_mm512_setzero_si512(); 16];
            for q0 in (0..self.full).step_by(16) {
                let count = (self.full - q0).min(16);
                for l0 in (0..self.width).step_by(16) {
                    for (i, row) in rows.iter_mut().enumerate() {
                        *row = if l0 + i < self.lines {
                            let line = self.data.wrapping_add((l0 + i) * line_stride + 2 * q0);
                            // SAFETY: the caller's contract.
                            unsafe { E::line_words(line, count) }
                        } else {
                            _mm512_setzero_si512()
                        };
                    }
                    // SAFETY: AVX-512F.
                    unsafe { transpose(&mut rows) };
                    let store = mask(self.width - l0);
                    for (q, row) in rows.iter().take(count).enumerate() {
                        // SAFETY: word (q0 + q) · width + l0 + 16 ≤ full · width, masked to the panel.
                        unsafe {
                            let dst = chunk.as_mut_ptr().add((q0 + q) * self.width + l0) as *mut i32;
                            _mm512_mask_storeu_epi32(dst, store, *row);
                        }
                    }
                }
            }
        }
    }
}

/// Sets `out`'s length to `len` without writing it (zero-filling it was a pass over the
/// packed operands of its own: 2.8 % of a bf16 inference step on the Xeon): the packing
/// functions write every word, their zero padding included.
#[allow(clippy::uninit_vec)]
fn resize_unfilled(out: &mut Vec<u32>, len: usize) {
    out.clear();
    out.reserve(len);
    // SAFETY: the capacity is `len`, u32 has no invalid bit patterns, and every caller
    // writes each word before the buffer is read.
    unsafe { out.set_len(len) };
    // In the unit tests, words that packing fails to write are pairs of NaNs, which the
    // products then show (fresh memory is often zero, which would hide them).
    if cfg!(test) {
        out.fill(0x7FC0_7FC0);
    }
}

/// `out (m × n, rows out_rs apart) = [out +] a (m × k) · b (k × n)` on one thread, with
/// bf16 dot products: AMX tiles where [`amx::available`] says so, `vdpbf16ps` otherwise.
///
/// # Safety
/// [`available`] must be true; the views must hold every element they describe, and the
/// `m × n` block at `out` must be in bounds and written by no one else during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_block<B: Elem>(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat<B>,
    out: *mut f32,
    out_rs: usize,
    accumulate: bool,
) {
    // SAFETY: the caller's contract.
    unsafe { gemm_block_of(m, n, k, a, &b, out, out_rs, accumulate) }
}

/// [`gemm_block`] with `b` any [`OperandB`]: a matrix, or an [`Unrolled`] image.
///
/// # Safety
/// As [`gemm_block`]; `b` must describe at least `k` rows and `n` columns.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_block_of(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: &dyn OperandB,
    out: *mut f32,
    out_rs: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if amx::available() {
        // SAFETY: the caller's contract and `amx::available`.
        return unsafe { amx::gemm_block(m, n, k, a, b, out, out_rs, accumulate) };
    }
    // SAFETY: the caller's contract.
    unsafe { gemm_block_dot(m, n, k, a, b, out, out_rs, accumulate) }
}

/// The right operand of a product as both kernels pack it: panels of [`NR`] columns, for each
/// pair of `k` the columns' [`pair`] words.
pub(crate) trait OperandB {
    /// Packs columns `j0..j0 + cols` and depth `p0..p0 + depth` into `out`: one panel per
    /// [`NR`] columns, `pairs` pairs each, zero past the columns and the depth.
    ///
    /// # Safety
    /// [`available`] must be true; the columns and depth must lie within the operand.
    unsafe fn pack_panels(&self, j0: usize, cols: usize, p0: usize, depth: usize, pairs: usize, out: &mut Vec<u32>);
}

impl<B: Elem> OperandB for Mat<'_, B> {
    unsafe fn pack_panels(&self, j0: usize, cols: usize, p0: usize, depth: usize, pairs: usize, out: &mut Vec<u32>) {
        // SAFETY: the caller's contract.
        unsafe { pack(self.data, j0, cols, self.cs, self.rs, p0, depth, NR, pairs, out) }
    }
}

/// The unrolled input of bf16 images for a stride-1 ungrouped convolution ([`Unrolled::new`]),
/// packed straight from the images instead of from an im2col copy of them (the copy and the
/// pass that read it back were 15 % of a bf16 ResNet-50 inference step on the AMD EPYC): row
/// (ci, ky, kx), column `first + (i · oh + oy) · ow + ox` is `x[i, ci, oy + ky − pad, ox + kx −
/// pad]`, 0 outside the image.
#[derive(Clone, Copy)]
pub(crate) struct Unrolled<'a> {
    /// The images, (N, C, H, W) contiguous.
    x: &'a [bf16],
    channels: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    pad: usize,
    /// The output pixel of column 0 (threads take ranges of columns).
    first: usize,
}

/// Where one tap's row of an [`Unrolled`] operand finds a panel's values in the image: the
/// lanes in `mask` read `x[start + lane]` (offset by the row's channel plane), one run of
/// adjacent values per output row the panel crosses.
#[derive(Clone, Copy)]
struct Run {
    mask: u32,
    start: isize,
}

impl<'a> Unrolled<'a> {
    /// The images `x` ((N, C, H, W) contiguous; `C = channels`) unrolled for a stride-1
    /// `kh × kw` convolution with zero padding `pad` (`h + 2·pad ≥ kh`, `w + 2·pad ≥ kw`).
    pub(crate) fn new(
        x: &'a [bf16],
        (channels, h, w): (usize, usize, usize),
        (kh, kw): (usize, usize),
        pad: usize,
    ) -> Self {
        let (oh, ow) = (h + 2 * pad + 1 - kh, w + 2 * pad + 1 - kw);
        Self { x, channels, h, w, kh, kw, oh, ow, pad, first: 0 }
    }

    /// Each tap's [`Run`]s for the `lanes` (at most [`NR`]) columns from column `j`: tap `t`'s
    /// are `runs[bounds[t]..bounds[t + 1]]`.
    fn panel_runs(&self, j: usize, lanes: usize, runs: &mut Vec<Run>, bounds: &mut Vec<usize>) {
        runs.clear();
        bounds.clear();
        bounds.push(0);
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                let mut lane = 0;
                while lane < lanes {
                    let column = self.first + j + lane;
                    let (image, pixel) = (column / (self.oh * self.ow), column % (self.oh * self.ow));
                    let (oy, ox) = (pixel / self.ow, pixel % self.ow);
                    let len = (self.ow - ox).min(lanes - lane);
                    if let Some(iy) = (oy + ky).checked_sub(self.pad).filter(|&iy| iy < self.h) {
                        // Input columns ox + kx − pad, … clipped to 0..w: lanes lo..hi of the run.
                        let lo = self.pad.saturating_sub(ox + kx).min(len);
                        let hi = (self.w + self.pad).saturating_sub(ox + kx).clamp(lo, len);
                        if hi > lo {
                            let mask = ((1u64 << (hi - lo)) - 1) << (lane + lo);
                            let at = (image * self.channels * self.h + iy) * self.w + ox + lo + kx - self.pad;
                            runs.push(Run { mask: mask as u32, start: at as isize - (lane + lo) as isize });
                        }
                    }
                    lane += len;
                }
                bounds.push(runs.len());
            }
        }
    }

    /// [`OperandB::pack_panels`] word by word from the runs (where the vectorised packing
    /// does not compile, and the tests' second opinion on it).
    #[cfg(any(test, not(target_arch = "x86_64")))]
    fn pack_plain(&self, j0: usize, cols: usize, p0: usize, depth: usize, pairs: usize, out: &mut Vec<u32>) {
        out.clear();
        out.resize(cols.div_ceil(NR) * pairs * NR, 0);
        let (taps, plane) = (self.kh * self.kw, self.h * self.w);
        let (mut runs, mut bounds) = (Vec::new(), Vec::new());
        for (panel, chunk) in out.chunks_exact_mut(pairs * NR).enumerate() {
            self.panel_runs(j0 + panel * NR, NR.min(cols - panel * NR), &mut runs, &mut bounds);
            for p in 0..depth {
                let (r, shift) = (p0 + p, 16 * (p % 2));
                for run in &runs[bounds[r % taps]..bounds[r % taps + 1]] {
                    for lane in (0..NR).filter(|l| run.mask >> l & 1 == 1) {
                        let v = self.x[((r / taps * plane) as isize + run.start + lane as isize) as usize];
                        chunk[p / 2 * NR + lane] |= (v.to_bits() as u32) << shift;
                    }
                }
            }
        }
    }

    /// [`OperandB::pack_panels`] with AVX-512: each row of a pair is one masked load per run
    /// into a vector of 32 bf16 lanes, and the pair's words are the two rows interleaved.
    ///
    /// # Safety
    /// AVX-512F and BW; as [`OperandB::pack_panels`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pack_simd(&self, j0: usize, cols: usize, p0: usize, depth: usize, pairs: usize, out: &mut Vec<u32>) {
        use std::arch::x86_64::*;
        resize_unfilled(out, cols.div_ceil(NR) * pairs * NR);
        // Words 0–15 of a pair are (even[i], odd[i]) for lanes i = 0..16, words 16–31 the same
        // for lanes 16..32 (the odd row's indices are 32 up).
        let low = _mm512_set_epi16(
            47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33,
            1, 32, 0,
        );
        let high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
        let (mut runs, mut bounds) = (Vec::new(), Vec::new());
        let end = p0 + depth;
        for (panel, chunk) in out.chunks_exact_mut(pairs * NR).enumerate() {
            self.panel_runs(j0 + panel * NR, NR.min(cols - panel * NR), &mut runs, &mut bounds);
            // SAFETY: the runs are this panel's.
            let row =
                |r: usize| if r < end { unsafe { self.row_vector(&runs, &bounds, r) } } else { _mm512_setzero_si512() };
            for q in 0..depth.div_ceil(2) {
                let (even, odd) = (row(p0 + 2 * q), row(p0 + 2 * q + 1));
                // SAFETY: words q · NR .. (q + 1) · NR of the chunk.
                unsafe {
                    let dst = chunk.as_mut_ptr().add(q * NR) as *mut __m512i;
                    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(even, low, odd));
                    _mm512_storeu_si512(dst.add(1), _mm512_permutex2var_epi16(even, high, odd));
                }
            }
            chunk[depth.div_ceil(2) * NR..].fill(0);
        }
    }
}

impl Unrolled<'_> {
    /// Row `r`'s values at the columns `runs` were made for ([`Self::panel_runs`]), as 32
    /// bf16 lanes: one masked load per run of its tap.
    ///
    /// # Safety
    /// AVX-512F and BW; `runs` and `bounds` from `panel_runs` of this operand; `r` one of its
    /// rows.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn row_vector(&self, runs: &[Run], bounds: &[usize], r: usize) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let taps = self.kh * self.kw;
        let base = (self.x.as_ptr() as *const i16).wrapping_add(r / taps * self.h * self.w);
        let mut v = _mm512_setzero_si512();
        for run in &runs[bounds[r % taps]..bounds[r % taps + 1]] {
            // SAFETY: the lanes in the mask read x[r / taps · plane + start + lane], inside the
            // images (`panel_runs`); the others are not read.
            v = unsafe { _mm512_mask_loadu_epi16(v, run.mask, base.wrapping_offset(run.start)) };
        }
        v
    }

    /// The value at row `r`, column `column` (plainly, for the fallbacks and tests).
    #[cfg(any(test, not(target_arch = "x86_64")))]
    fn at(&self, r: usize, column: usize) -> u16 {
        let (ci, ky, kx) = (r / (self.kh * self.kw), r / self.kw % self.kh, r % self.kw);
        let (image, pixel) = (column / (self.oh * self.ow), column % (self.oh * self.ow));
        let iy = (pixel / self.ow + ky).checked_sub(self.pad).filter(|&iy| iy < self.h);
        let ix = (pixel % self.ow + kx).checked_sub(self.pad).filter(|&ix| ix < self.w);
        match (iy, ix) {
            (Some(iy), Some(ix)) => self.x[((image * self.channels + ci) * self.h + iy) * self.w + ix].to_bits(),
            _ => 0,
        }
    }
}

/// The transpose of an [`Unrolled`] operand, packed straight from the images too: row `p` is
/// output pixel `p`, column `first + r` unrolled row `r` — the right operand of a convolution's
/// weight gradient `dW = dy · colᵀ`.
#[derive(Clone, Copy)]
pub(crate) struct UnrolledT<'a> {
    image: Unrolled<'a>,
    first: usize,
}

impl<'a> UnrolledT<'a> {
    pub(crate) fn new(image: Unrolled<'a>) -> Self {
        Self { image: Unrolled { first: 0, ..image }, first: 0 }
    }

    /// [`OperandB::pack_panels`] plainly, word by word.
    #[cfg(any(test, not(target_arch = "x86_64")))]
    fn pack_plain(&self, j0: usize, cols: usize, p0: usize, depth: usize, pairs: usize, out: &mut Vec<u32>) {
        out.clear();
        out.resize(cols.div_ceil(NR) * pairs * NR, 0);
        for line in 0..cols {
            let (panel, l, r) = (line / NR, line % NR, self.first + j0 + line);
            for p in 0..depth {
                let word = &mut out[(panel * pairs + p / 2) * NR + l];
                *word |= (self.image.at(r, p0 + p) as u32) << (16 * (p % 2));
            }
        }
    }

    /// [`OperandB::pack_panels`] with AVX-512: for each 32 pixels of depth, each line's 16
    /// pairs are one [`Unrolled::row_vector`], and 16 lines at a time are transposed into the
    /// panels' pair-major order.
    ///
    /// # Safety
    /// AVX-512F and BW; as [`OperandB::pack_panels`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pack_simd(&self, j0: usize, cols: usize, p0: usize, depth: usize, pairs: usize, out: &mut Vec<u32>) {
        use std::arch::x86_64::*;
        resize_unfilled(out, cols.div_ceil(NR) * pairs * NR);
        let (mut runs, mut bounds) = (Vec::new(), Vec::new());
        let filled = depth.div_ceil(2);
        for q0 in (0..filled).step_by(16) {
            let j = p0 + 2 * q0;
            self.image.panel_runs(j, NR.min(p0 + depth - j), &mut runs, &mut bounds);
            let count = (filled - q0).min(16);
            for (panel, chunk) in out.chunks_exact_mut(pairs * NR).enumerate() {
                for l0 in (0..NR).step_by(16) {
                    let mut rows = [_mm512_setzero_si512(); 16];
                    for (i, row) in rows.iter_mut().enumerate() {
                        let line = panel * NR + l0 + i;
                        if line < cols {
                            // SAFETY: the runs of these pixels; the line is a row of the image.
                            *row = unsafe { self.image.row_vector(&runs, &bounds, self.first + j0 + line) };
                        }
                    }
                    // SAFETY: AVX-512F.
                    unsafe { simd::transpose(&mut rows) };
                    for (q, row) in rows.iter().take(count).enumerate() {
                        // SAFETY: words (q0 + q) · NR + l0 .. + 16 of the chunk.
                        unsafe {
                            _mm512_storeu_si512(chunk.as_mut_ptr().add((q0 + q) * NR + l0) as *mut __m512i, *row)
                        };
                    }
                }
            }
        }
        for chunk in out.chunks_exact_mut(pairs * NR) {
            chunk[filled * NR..].fill(0);
        }
    }
}

/// [`OperandB`] for the operands packed from images: their `pack_simd`, or `pack_plain`
/// where that does not compile.
macro_rules! packed_from_images {
    ($operand:ty) => {
        impl OperandB for $operand {
            unsafe fn pack_panels(
                &self,
                j0: usize,
                cols: usize,
                p0: usize,
                depth: usize,
                pairs: usize,
                out: &mut Vec<u32>,
            ) {
                debug_assert!(pairs >= depth.div_ceil(2));
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the caller's contract (`available`: AVX-512F and BW).
                unsafe {
                    self.pack_simd(j0, cols, p0, depth, pairs, out)
                }
                #[cfg(not(target_arch = "x86_64"))]
                self.pack_plain(j0, cols, p0, depth, pairs, out);
            }
        }
    };
}
packed_from_images!(Unrolled<'_>);
packed_from_images!(UnrolledT<'_>);

/// An operand packed straight from images ([`Unrolled`], [`UnrolledT`]), which
/// `cpu::matmul_threads_unrolled` splits between threads by columns.
pub(crate) trait ImplicitOperand: OperandB + Copy + Send + Sync {
    /// The operand from column `start` on.
    fn columns_from(self, start: usize) -> Self;
    /// Whether the operand has `rows` rows and `cols` columns.
    fn fits(&self, rows: usize, cols: usize) -> bool;
}

impl ImplicitOperand for Unrolled<'_> {
    fn columns_from(self, start: usize) -> Self {
        Self { first: self.first + start, ..self }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        let images = self.x.len() / (self.channels * self.h * self.w);
        rows <= self.channels * self.kh * self.kw && self.first + cols <= images * self.oh * self.ow
    }
}

impl ImplicitOperand for UnrolledT<'_> {
    fn columns_from(self, start: usize) -> Self {
        Self { first: self.first + start, ..self }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        self.image.fits(self.first + cols, rows)
    }
}

/// Whether the bf16 products run on AMX tiles (see [`amx`]).
pub(crate) fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// FLOPs of `iterations` rounds of four independent `tdpbf16ps` on registers; `None` without
/// AMX.
pub(crate) fn amx_register_flops(iterations: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if amx::available() {
        // SAFETY: AMX is available.
        return Some(unsafe { amx::register_flops(iterations) });
    }
    let _ = iterations;
    None
}

/// [`gemm_block`] with `vdpbf16ps` (AVX-512 BF16).
///
/// # Safety
/// As [`gemm_block`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block_dot(
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: &dyn OperandB,
    out: *mut f32,
    out_rs: usize,
    accumulate: bool,
) {
    /// `a`'s panels as `vdpbf16ps` broadcasts them: for each pair, [`MR`] rows' words.
    ///
    /// # Safety
    /// As [`pack`].
    unsafe fn pack_a(a: &Mat, first: usize, len: usize, p0: usize, depth: usize, pairs: usize, out: &mut Vec<u32>) {
        // SAFETY: the caller's contract.
        unsafe { pack(a.data, first, len, a.rs, a.cs, p0, depth, MR, pairs, out) }
    }
    let micro = MicroKernel { rows: MR, block_rows: MC, pair_multiple: 1, pack_a, multiply: kernel };
    // SAFETY: the caller's contract.
    unsafe { gemm_blocked(&micro, m, n, k, a, b, out, out_rs, accumulate) }
}

/// A micro-kernel and how its operands are packed, for [`gemm_blocked`].
struct MicroKernel {
    /// Rows of its tile of `out` (its columns are [`NR`]).
    rows: usize,
    /// Rows of a packed block of `a` (a multiple of `rows`).
    block_rows: usize,
    /// The packed depth, in pairs, is rounded up to a multiple of this.
    pair_multiple: usize,
    /// Packs `len` rows of `a` from `first`, depth `p0..p0 + depth`, into panels of `rows`
    /// rows with `pairs` pairs each.
    pack_a: unsafe fn(&Mat, usize, usize, usize, usize, usize, &mut Vec<u32>),
    /// The `rows × NR` tile at `c` (rows `rs` apart) `[+]= a_panel · b_panel` over `pairs`.
    multiply: unsafe fn(usize, &[u32], &[u32], *mut f32, usize, bool),
}

/// The blocked product both bf16 kernels share: `b` packed block by block into panels of
/// [`NR`] columns, `a` by `micro.pack_a`, and the micro-kernel run over every pair of panels.
///
/// # Safety
/// As [`gemm_block`], and whatever `micro`'s functions need (AVX-512, or configured tiles).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_blocked(
    micro: &MicroKernel,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: &dyn OperandB,
    out: *mut f32,
    out_rs: usize,
    accumulate: bool,
) {
    let mr = micro.rows;
    let (mut packed_a, mut packed_b) = (Vec::new(), Vec::new());
    let mut tile = vec![0f32; mr * NR];
    for j0 in (0..n).step_by(NC) {
        let cols = NC.min(n - j0);
        for p0 in (0..k).step_by(KC) {
            let depth = KC.min(k - p0);
            let pairs = depth.div_ceil(2).next_multiple_of(micro.pair_multiple);
            // The first block of `k` writes or accumulates as asked; the later ones add.
            let add = accumulate || p0 > 0;
            // SAFETY: the caller's contract (`available`).
            unsafe { b.pack_panels(j0, cols, p0, depth, pairs, &mut packed_b) };
            for i0 in (0..m).step_by(micro.block_rows) {
                let rows = micro.block_rows.min(m - i0);
                // SAFETY: as above.
                unsafe { (micro.pack_a)(&a, i0, rows, p0, depth, pairs, &mut packed_a) };
                for (jp, b_panel) in packed_b.chunks_exact(pairs * NR).enumerate() {
                    let width = NR.min(cols - jp * NR);
                    for (ip, a_panel) in packed_a.chunks_exact(pairs * mr).enumerate() {
                        let height = mr.min(rows - ip * mr);
                        // SAFETY: the caller's contract; the tile's rows and columns are the
                        // valid `height × width` corner of the block at (i0 + ip·mr, j0 + jp·NR).
                        unsafe {
                            let c = out.add((i0 + ip * mr) * out_rs + j0 + jp * NR);
                            if height == mr && width == NR {
                                (micro.multiply)(pairs, a_panel, b_panel, c, out_rs, add);
                            } else {
                                // An edge: the full tile into a buffer, then its valid corner.
                                (micro.multiply)(pairs, a_panel, b_panel, tile.as_mut_ptr(), NR, false);
                                for r in 0..height {
                                    let row = c.add(r * out_rs);
                                    for (j, &v) in tile[r * NR..r * NR + width].iter().enumerate() {
                                        *row.add(j) = if add { *row.add(j) + v } else { v };
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The micro-kernel: the `MR × NR` tile at `c` (rows `rs` apart) `[+]= a_panel · b_panel`
/// over `pairs` pairs of `k`.
///
/// # Safety
/// AVX-512F and AVX-512 BF16 must be available; the panels must hold `pairs` pairs; the tile
/// at `c` must be writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(pairs: usize, a_panel: &[u32], b_panel: &[u32], c: *mut f32, rs: usize, add: bool) {
    use std::arch::x86_64::*;
    assert!(a_panel.len() >= pairs * MR && b_panel.len() >= pairs * NR, "gemm_bf16: panels too short");
    // SAFETY: the caller's contract and the lengths above.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (a, b) = (a_panel.as_ptr(), b_panel.as_ptr());
        for q in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR + 16) as *const _));
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(q * MR + r) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], pair, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], pair, b1);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let row = c.add(r * rs);
            for (h, v) in acc.iter().enumerate() {
                let dst = row.add(16 * h);
                let v = if add { _mm512_add_ps(*v, _mm512_loadu_ps(dst)) } else { *v };
                _mm512_storeu_ps(dst, v);
            }
        }
    }
}

/// Elsewhere [`available`] is false and nothing calls this.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: usize, _: &[u32], _: &[u32], _: *mut f32, _: usize, _: bool) {
    unreachable!("bf16 dot products are x86-64 only")
}

/// The same product on AMX tiles (Intel Advanced Matrix Extensions, `tdpbf16ps`): one
/// instruction multiplies a 16 × 32 tile of bf16 `a` by a 32 × 16 tile of `b` into a 16 × 16
/// tile of f32 sums, 16 times the work of a `vdpbf16ps`. The micro-kernel keeps a 32 × 32
/// block of `out` in four of the eight tile registers and streams two tiles of `a` and two
/// of `b` through the other four. `b` is packed as for `vdpbf16ps` (panels of [`NR`]
/// columns, pairs of `k` interleaved: the tile layout AMX calls VNNI), `a` into panels of 32
/// rows with each row's pairs contiguous (a tile row), and the depth is zero-padded to whole
/// tiles of 16 pairs.
///
/// Rust has no stable AMX intrinsics, so the tile instructions are inline assembly; Linux
/// hands the tile registers to a process only after it asks (`arch_prctl`), which
/// [`available`](amx::available) does once.
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{gemm_blocked, Mat, MicroKernel, NR};

    /// Rows of the micro-tile: two tiles of 16.
    const MR: usize = 32;
    /// Pairs of `k` in one tile row (64 bytes).
    const TILE_PAIRS: usize = 16;
    /// Rows of a packed block of `a` (a multiple of [`MR`]).
    const MC: usize = 128;

    /// Whether this CPU has AMX-BF16 tiles and the OS lets this process use them, decided
    /// once per process; false when `SAE_DISABLE_AMX` is set (to compare with `vdpbf16ps`).
    pub(crate) fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| std::env::var_os("SAE_DISABLE_AMX").is_none() && request_tiles())
    }

    #[cfg(target_os = "linux")]
    fn request_tiles() -> bool {
        if !super::available() {
            return false;
        }
        // CPUID leaf 7: EDX bit 22 is AMX-BF16 and bit 24 AMX-TILE.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments; it fails cleanly on kernels
        // that do not know it.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    #[cfg(not(target_os = "linux"))]
    fn request_tiles() -> bool {
        false
    }

    /// The tile configuration of this thread while alive: eight tiles of 16 rows × 64 bytes
    /// (palette 1); released on drop, so the OS need not save the tiles on a context switch.
    struct Tiles;

    impl Tiles {
        /// # Safety
        /// [`available`] must be true.
        unsafe fn configure() -> Tiles {
            #[repr(C, align(64))]
            struct Config([u8; 64]);
            let mut config = Config([0; 64]);
            config.0[0] = 1;
            for tile in 0..8 {
                config.0[16 + 2 * tile] = 64;
                config.0[48 + tile] = 16;
            }
            // SAFETY: the caller's contract; the configuration is 64 valid bytes.
            unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
            Tiles
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: tiles are configured (`configure` made `self`).
            unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
        }
    }

    /// FLOPs of `iterations` rounds of four independent `tdpbf16ps` on zeroed tiles (each
    /// 16 × 16 × 32 multiply-adds).
    ///
    /// # Safety
    /// [`available`] must be true.
    pub(crate) unsafe fn register_flops(iterations: usize) -> f64 {
        use std::arch::asm;
        // SAFETY: the caller's contract; only tile registers are touched.
        unsafe {
            let _tiles = Tiles::configure();
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "tilezero tmm4",
                "tilezero tmm5",
                "tilezero tmm6",
                "tilezero tmm7",
                options(nostack, nomem),
            );
            for _ in 0..iterations {
                asm!(
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    options(nostack, nomem),
                );
            }
        }
        iterations as f64 * 4.0 * (16 * 16 * 32 * 2) as f64
    }

    /// Packs `len` rows of `a` (depth `p0..p0 + depth`) into panels of [`MR`] rows, each row
    /// its `pairs` words of [`pair`](super::pair) in order (zero past the data).
    ///
    /// # Safety
    /// AVX-512F, AVX-512BW and AVX-512 BF16 must be available (for the rounding, vectorised).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_rows(a: &Mat, first: usize, len: usize, p0: usize, depth: usize, pairs: usize, out: &mut Vec<u32>) {
        super::resize_unfilled(out, len.div_ceil(MR) * MR * pairs);
        // The zeros first, as in `pack`: the pairs past the depth (the half-filled last word
        // of an odd depth included) and the rows past the end; the values are written below.
        let filled = depth / 2;
        for words in out.chunks_exact_mut(pairs).take(len) {
            words[filled..].fill(0);
        }
        out[len * pairs..].fill(0);
        if a.rs == 1 && a.cs != 1 {
            // A column-major `a` (the input gradient's Wᵀ): row by row, every pair would read
            // two lines `cs` apart. Instead, for 16 rows at a time, each pair's words come from
            // two contiguous runs of 16 values (the even and the odd depth), interleaved, and
            // 16 pairs of them are transposed in registers into 16 rows of 16 words
            // ([`simd::transpose`](super::simd::transpose)). On the Xeon this pass was 3.7 % of
            // a 32×32 ResNet-50 bf16 training step done a word at a time (with the stores
            // `pairs` apart), four times the row-major branch's share for the same weights.
            // (Packing `Wᵀ` once per convolution instead of per image gained nothing
            // measurable: `results/train-profile.md`.)
            use super::simd::{transpose, Source};
            use std::arch::x86_64::{_mm512_mask_storeu_epi32, _mm512_setzero_si512};
            let mut block = [_mm512_setzero_si512(); 16];
            for r0 in (0..len).step_by(16) {
                let rows = 16.min(len - r0);
                for q0 in (0..filled).step_by(16) {
                    let count = 16.min(filled - q0);
                    for (q, words) in block.iter_mut().enumerate() {
                        *words = if q < count {
                            let even = first + r0 + (p0 + 2 * (q0 + q)) * a.cs;
                            // The run's last value, bounds-checked once for the raw reads.
                            let _ = a.data[even + a.cs + rows - 1];
                            // SAFETY: the CPU features of this function; `rows` values from
                            // `even` and from `even + cs` are in `a.data` (checked above).
                            unsafe {
                                f32::pair_words(a.data.as_ptr().add(even), a.data.as_ptr().add(even + a.cs), rows)
                            }
                        } else {
                            _mm512_setzero_si512()
                        };
                    }
                    // SAFETY: AVX-512F.
                    unsafe { transpose(&mut block) };
                    let store = ((1u32 << count) - 1) as u16;
                    for (r, words) in block.iter().take(rows).enumerate() {
                        let start = (r0 + r) * pairs + q0;
                        let _ = out[start + count - 1];
                        // SAFETY: words `start..start + count` are in `out` (checked above).
                        unsafe { _mm512_mask_storeu_epi32(out.as_mut_ptr().add(start) as *mut i32, store, *words) };
                    }
                }
            }
            if depth % 2 == 1 {
                let last = first + (p0 + depth - 1) * a.cs;
                for r in 0..len {
                    out[r * pairs + filled] = super::pair(a.data[last + r], 0.0);
                }
            }
            return;
        }
        let at = |row: usize, p: usize| a.data[(first + row) * a.rs + (p0 + p) * a.cs];
        for (row, words) in out.chunks_exact_mut(pairs).take(len).enumerate() {
            if a.cs == 1 {
                // A row's words are its values rounded in order, two to a word, the first in
                // the low half: on x86-64 (little-endian) that is the words' memory as u16s,
                // written by a plain conversion loop that vectorises.
                let start = (first + row) * a.rs + p0;
                let line = &a.data[start..start + depth];
                // SAFETY: the u16 view covers exactly the memory of `words`, and u16 has no
                // invalid bit patterns and a smaller alignment than u32.
                let halves = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u16, 2 * words.len()) };
                for (h, &v) in halves.iter_mut().zip(line) {
                    *h = <super::bf16 as super::Elem>::from_f32(v).to_bits();
                }
            } else {
                for (q, w) in words[..depth.div_ceil(2)].iter_mut().enumerate() {
                    let hi = if 2 * q + 1 < depth { at(row, 2 * q + 1) } else { 0.0 };
                    *w = super::pair(at(row, 2 * q), hi);
                }
            }
        }
    }

    /// [`gemm_block`](super::gemm_block) on AMX tiles.
    ///
    /// # Safety
    /// [`available`] must be true; otherwise as [`gemm_block`](super::gemm_block).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_block(
        m: usize,
        n: usize,
        k: usize,
        a: Mat,
        b: &dyn super::OperandB,
        out: *mut f32,
        out_rs: usize,
        accumulate: bool,
    ) {
        // SAFETY: the caller's contract.
        let _tiles = unsafe { Tiles::configure() };
        let micro =
            MicroKernel { rows: MR, block_rows: MC, pair_multiple: TILE_PAIRS, pack_a: pack_rows, multiply: kernel };
        // SAFETY: the caller's contract; the tiles are configured.
        unsafe { gemm_blocked(&micro, m, n, k, a, b, out, out_rs, accumulate) }
    }

    /// The micro-kernel: the 32 × 32 block at `c` (rows `rs` floats apart) `[+]= a_panel ·
    /// b_panel` over `pairs` pairs of `k` (a multiple of 16). Tiles 0–3 hold the block's
    /// quarters, 4–5 the two 16-row halves of `a`, 6–7 the two 16-column halves of `b`.
    ///
    /// # Safety
    /// Tiles configured by [`Tiles::configure`]; the panels must hold `pairs` pairs; the block
    /// at `c` must be readable and writable.
    unsafe fn kernel(pairs: usize, a_panel: &[u32], b_panel: &[u32], c: *mut f32, rs: usize, add: bool) {
        use std::arch::asm;
        assert!(
            pairs.is_multiple_of(TILE_PAIRS) && a_panel.len() >= pairs * MR && b_panel.len() >= pairs * NR,
            "gemm_bf16: AMX panels too short"
        );
        let (a, b) = (a_panel.as_ptr(), b_panel.as_ptr());
        let (a_stride, b_stride, c_stride) = (pairs * 4, NR * 4, rs * 4);
        // SAFETY: the caller's contract and the lengths above: every tile row read or
        // written lies in the panels or the block.
        unsafe {
            let (c0, c1, c2, c3) = (c, c.add(16), c.add(16 * rs), c.add(16 * rs + 16));
            if add {
                asm!(
                    "tileloadd tmm0, [{c0} + {s}*1]",
                    "tileloadd tmm1, [{c1} + {s}*1]",
                    "tileloadd tmm2, [{c2} + {s}*1]",
                    "tileloadd tmm3, [{c3} + {s}*1]",
                    c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, s = in(reg) c_stride,
                    options(nostack, readonly),
                );
            } else {
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            }
            for q0 in (0..pairs).step_by(TILE_PAIRS) {
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a.add(q0),
                    a1 = in(reg) a.add(16 * pairs + q0),
                    b0 = in(reg) b.add(q0 * NR),
                    b1 = in(reg) b.add(q0 * NR + 16),
                    sa = in(reg) a_stride,
                    sb = in(reg) b_stride,
                    options(nostack, readonly),
                );
            }
            asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c1} + {s}*1], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c3} + {s}*1], tmm3",
                c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, s = in(reg) c_stride,
                options(nostack),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next state of a linear congruential generator (Knuth's MMIX constants).
    fn next_state(s: &mut u64) -> u64 {
        *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *s
    }

    /// Deterministic values that are exact in bf16 (8 significant bits), of both signs.
    fn bf16_values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                let mantissa = ((next_state(&mut s) >> 33) % 256) as f32 - 128.0;
                mantissa / 64.0
            })
            .collect()
    }

    /// The plain product in f64 (exact here: the values are small multiples of 1/64).
    fn reference(m: usize, n: usize, k: usize, a: &Mat, b: &Mat) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] =
                    (0..k).map(|p| a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64).sum();
            }
        }
        out
    }

    /// [`pack`] written plainly: every word from [`pair`], zero past the lines and pairs.
    #[allow(clippy::too_many_arguments)]
    fn pack_plain(
        data: &[f32],
        first: usize,
        len: usize,
        line_stride: usize,
        depth_stride: usize,
        p0: usize,
        depth: usize,
        width: usize,
        pairs: usize,
    ) -> Vec<u32> {
        let mut out = vec![0u32; len.div_ceil(width) * pairs * width];
        let at = |line: usize, p: usize| data[(first + line) * line_stride + (p0 + p) * depth_stride];
        for line in 0..len {
            let (panel, l) = (line / width, line % width);
            for q in 0..depth.div_ceil(2) {
                let hi = if 2 * q + 1 < depth { at(line, 2 * q + 1) } else { 0.0 };
                out[(panel * pairs + q) * width + l] = pair(at(line, 2 * q), hi);
            }
        }
        out
    }

    /// The vectorised packing rounds as [`pair`] does, word for word, on values that are not
    /// bf16 already (ties to even included), a NaN and infinities, for either stride 1, both
    /// widths, partial panels and odd depths; and packing the same values stored as bf16
    /// gives the words of their f32 copies.
    #[test]
    fn packing_equals_the_plain_rounding() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let mut s = 7u64;
        let mut data: Vec<f32> = (0..40_000)
            .map(|i| {
                let r = next_state(&mut s) >> 40;
                // Every 7th value a tie: 8 significant bits and a half.
                let mantissa = if i % 7 == 0 { (r % 256) as f32 * 2.0 + 1.0 } else { r as f32 };
                mantissa * if i % 2 == 0 { 1.0 } else { -1e-6 }
            })
            .collect();
        data[123] = f32::NAN;
        data[456] = f32::INFINITY;
        data[789] = f32::NEG_INFINITY;
        let stored: Vec<bf16> = data.iter().map(|&v| <bf16 as Elem>::from_f32(v)).collect();
        let widened: Vec<f32> = stored.iter().map(|v| v.to_f32()).collect();
        for width in [MR, NR] {
            for (len, depth) in [(1, 2), (5, 3), (12, 32), (13, 33), (32, 64), (45, 70), (70, 1), (33, 97)] {
                let (first, p0) = (3, 5);
                let span = (first + len) + (p0 + depth);
                let strides = [(1, span), (span, 1), (span, 2 * span + 1)];
                for (line_stride, depth_stride) in strides {
                    assert!((first + len - 1) * line_stride + (p0 + depth - 1) * depth_stride < data.len());
                    let pairs = depth.div_ceil(2) + 1;
                    let mut got = Vec::new();
                    // SAFETY: available() is true; every index is within `data` (asserted).
                    unsafe { pack(&data, first, len, line_stride, depth_stride, p0, depth, width, pairs, &mut got) };
                    let want = pack_plain(&data, first, len, line_stride, depth_stride, p0, depth, width, pairs);
                    let mut got_bf16 = Vec::new();
                    // SAFETY: as above; `stored` is as long as `data`.
                    unsafe {
                        pack(&stored, first, len, line_stride, depth_stride, p0, depth, width, pairs, &mut got_bf16)
                    };
                    let want_bf16 =
                        pack_plain(&widened, first, len, line_stride, depth_stride, p0, depth, width, pairs);
                    for (source, got, want) in [("f32", &got, &want), ("bf16", &got_bf16, &want_bf16)] {
                        assert_eq!(got.len(), want.len());
                        for (i, (g, w)) in got.iter().zip(want).enumerate() {
                            assert_eq!(
                                g, w,
                                "{source}: width {width}, {len} lines, depth {depth}, strides ({line_stride}, {depth_stride}): word {i}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Packing images' unrolled input (and its transpose) straight from the images gives the
    /// words of packing their im2col matrix (built here by plain loops), vectorised and plain:
    /// kernel sizes 1–7 with and without padding, images narrower and wider than a panel,
    /// panels that cross output rows and images, columns from an offset (a thread's range),
    /// odd depths from an odd row.
    #[test]
    fn packing_from_the_image_equals_packing_its_unrolled_copy() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let cases = [
            (1, 3, 9, 7, 3, 3, 1),
            (1, 2, 5, 35, 3, 3, 1),
            (3, 4, 6, 5, 3, 3, 0),
            (2, 2, 11, 13, 5, 5, 2),
            (1, 1, 9, 9, 7, 7, 3),
            (5, 3, 3, 3, 3, 3, 1),
        ];
        for (n, c, h, w, kh, kw, pad) in cases {
            let x: Vec<bf16> = bf16_values(n * c * h * w, 11).iter().map(|&v| bf16::from_f32(v)).collect();
            let (oh, ow) = (h + 2 * pad + 1 - kh, w + 2 * pad + 1 - kw);
            let (rows, cols) = (c * kh * kw, n * oh * ow);
            let mut col = vec![0f32; rows * cols];
            for (r, row) in col.chunks_exact_mut(cols).enumerate() {
                let (ci, ky, kx) = (r / (kh * kw), r / kw % kh, r % kw);
                for (column, v) in row.iter_mut().enumerate() {
                    let (i, pixel) = (column / (oh * ow), column % (oh * ow));
                    let (iy, ix) =
                        ((pixel / ow + ky) as isize - pad as isize, (pixel % ow + kx) as isize - pad as isize);
                    if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                        *v = x[((i * c + ci) * h + iy as usize) * w + ix as usize].to_f32();
                    }
                }
            }
            let image = Unrolled::new(&x, (c, h, w), (kh, kw), pad);
            assert!(image.fits(rows, cols) && !image.fits(rows + 1, cols) && !image.fits(rows, cols + 1));
            let transposed = UnrolledT::new(image);
            assert!(
                transposed.fits(cols, rows) && !transposed.fits(cols + 1, rows) && !transposed.fits(cols, rows + 1)
            );
            // The transpose (the weight gradient's colᵀ): lines are unrolled rows, the depth is
            // pixels.
            for (start, p0) in [(0, 0), (3, 1), (rows / 2, cols / 3)] {
                let operand = transposed.columns_from(start);
                let (len, depth) = (rows - start, cols - p0);
                let pairs = depth.div_ceil(2) + 1;
                let mut want = Vec::new();
                // SAFETY: available() is true; colᵀ's view of the im2col matrix, in bounds.
                unsafe { pack(&col, start, len, cols, 1, p0, depth, NR, pairs, &mut want) };
                let (mut got, mut plain) = (Vec::new(), Vec::new());
                // SAFETY: as above; columns start.. and rows p0.. lie within the transpose's.
                unsafe { operand.pack_panels(0, len, p0, depth, pairs, &mut got) };
                operand.pack_plain(0, len, p0, depth, pairs, &mut plain);
                for (what, words) in [("transposed, vectorised", &got), ("transposed, plain", &plain)] {
                    assert_eq!(words.len(), want.len());
                    for (i, (g, w)) in words.iter().zip(&want).enumerate() {
                        assert_eq!(g, w, "{what}: {n}×{c}×{h}×{w}, kernel {kh}×{kw}, pad {pad}, lines from {start}, pixels from {p0}: word {i}");
                    }
                }
            }
            for (start, p0) in [(0, 0), (5, 1), (cols / 2, rows / 3)] {
                let operand = image.columns_from(start);
                let (len, depth) = (cols - start, rows - p0);
                let pairs = depth.div_ceil(2) + 1;
                let mut want = Vec::new();
                // SAFETY: available() is true; the view is the im2col matrix, in bounds.
                unsafe { pack(&col, start, len, 1, cols, p0, depth, NR, pairs, &mut want) };
                let (mut got, mut plain) = (Vec::new(), Vec::new());
                // SAFETY: as above; columns start.. and rows p0.. lie within the image's.
                unsafe { operand.pack_panels(0, len, p0, depth, pairs, &mut got) };
                operand.pack_plain(0, len, p0, depth, pairs, &mut plain);
                for (what, words) in [("vectorised", &got), ("plain", &plain)] {
                    assert_eq!(words.len(), want.len());
                    for (i, (g, w)) in words.iter().zip(&want).enumerate() {
                        assert_eq!(g, w, "{what}: {n}×{c}×{h}×{w}, kernel {kh}×{kw}, pad {pad}, columns from {start}, depth from {p0}: word {i}");
                    }
                }
            }
        }
    }

    /// The signature of [`gemm_block`] and of each kernel behind it.
    type GemmBlock = unsafe fn(usize, usize, usize, Mat, &dyn OperandB, *mut f32, usize, bool);

    /// The kernels this CPU can run, by name: `vdpbf16ps` always (where [`available`]), AMX
    /// tiles where the CPU has them.
    fn kernels() -> Vec<(&'static str, GemmBlock)> {
        let mut kernels: Vec<(&'static str, GemmBlock)> = vec![("vdpbf16ps", gemm_block_dot)];
        #[cfg(target_arch = "x86_64")]
        if amx::available() {
            kernels.push(("AMX", amx::gemm_block));
        } else {
            eprintln!("AMX not tested: this CPU or OS has no AMX-BF16 tiles");
        }
        kernels
    }

    /// Every edge: odd `k`, `k` across blocks, rows and columns not multiples of the tile,
    /// one row, one column, transposed (column-major) views, and accumulation.
    #[test]
    fn products_equal_the_plain_loop() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16 (the f32 path is tested by the convolution tests)");
            return;
        }
        for (name, kernel) in kernels() {
            products_of_one_kernel_equal_the_plain_loop(name, kernel);
        }
    }

    fn products_of_one_kernel_equal_the_plain_loop(name: &str, gemm_block: GemmBlock) {
        let shapes = [
            (1, 1, 1),
            (12, 32, 2),
            (13, 33, 3),
            (32, 32, 32),
            (1, 100, 7),
            (100, 1, 9),
            (37, 70, 1100),
            (97, 1030, 64),
            (160, 64, 33),
        ];
        for (m, n, k) in shapes {
            for (transpose_a, transpose_b) in [(false, false), (true, true), (false, true), (true, false)] {
                let (av, bv) = (bf16_values(m * k, 1), bf16_values(k * n, 2));
                let a = if transpose_a { Mat { data: &av, rs: 1, cs: m } } else { Mat { data: &av, rs: k, cs: 1 } };
                let b = if transpose_b { Mat { data: &bv, rs: 1, cs: k } } else { Mat { data: &bv, rs: n, cs: 1 } };
                let want = reference(m, n, k, &a, &b);
                let prior = bf16_values(m * n, 3);
                for accumulate in [false, true] {
                    let mut out = prior.clone();
                    // SAFETY: available() is true; the views and output are in bounds.
                    unsafe { gemm_block(m, n, k, a, &b, out.as_mut_ptr(), n, accumulate) };
                    for (i, (&got, &w)) in out.iter().zip(&want).enumerate() {
                        let w = if accumulate { w + prior[i] as f64 } else { w };
                        // f32 sums of exact products: relative rounding of ~k·2⁻²⁴.
                        let tol = 1e-6 * (k as f64).max(1.0) * (1.0 + w.abs());
                        assert!(
                            (got as f64 - w).abs() <= tol,
                            "{name} {m}×{n}×{k} ({transpose_a}, {transpose_b}, accumulate {accumulate}) [{i}]: {got} vs {w}"
                        );
                    }
                }
            }
        }
        // A NaN operand stays NaN through packing: its row of the result is NaN, the rest not.
        let (m, n, k) = (20, 40, 30);
        let mut av = bf16_values(m * k, 4);
        av[5 * k + 7] = f32::NAN;
        let bv = bf16_values(k * n, 5);
        let mut out = vec![0f32; m * n];
        // SAFETY: as above.
        unsafe {
            gemm_block(
                m,
                n,
                k,
                Mat { data: &av, rs: k, cs: 1 },
                &Mat { data: &bv, rs: n, cs: 1 },
                out.as_mut_ptr(),
                n,
                false,
            )
        };
        for (i, row) in out.chunks(n).enumerate() {
            assert!(row.iter().all(|v| v.is_nan() == (i == 5)), "{name} row {i}: {row:?}");
        }
    }
}
