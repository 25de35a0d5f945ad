//! A direct 3×3 stride-1 convolution (padding 1, f32, AVX-512F) for layers with few channels,
//! where Winograd's transforms cost more than the multiplies they save.
//!
//! The layout is oneDNN's trick: the input is copied into a channel-blocked, zero-bordered
//! buffer (for each block of 16 channels, the padded image with the 16 channels of a pixel
//! adjacent), so that the 16 channels of one pixel are one vector. Weights are packed as
//! (O/32, C, 3·3, 32). A micro-kernel then keeps 32 output channels × up to [`PIXELS`]
//! adjacent output pixels of one row in 2·[`PIXELS`] registers and runs down the input
//! channels and taps: per step two vector loads of weights (32 output channels) and one
//! broadcast per pixel, no unrolled copy of the input at all. The output comes out blocked
//! the same way and is copied back into planes, where the epilogue runs.
//!
//! The convolutions take it for their output, their input gradient (the output gradient
//! convolved with the turned weights, [`crate::conv`]) and their weight gradient (the same
//! blocked input against the output gradient blocked alike: 9 taps × 32 output channels in
//! registers per input channel). On the Xeon of `results/train-profile.md`, ResNet-50's layer
//! 1 3×3 convolution (64 → 64 channels, batch 16, `xtask bench-layers --only "layer1.0
//! conv2"`, alternating builds, forward / backward ms): at 35×35 (140×140 inputs) 5.9 / 13.4
//! with Winograd's F(2×2, 3×3) for all three, 4.1–4.4 / 11.5–12.8 with the direct output and
//! input gradient, 4.3 / 9.8–10.0 with the direct weight gradient as well; at 8×8 (32×32
//! inputs) 0.55 / 1.11, 0.37 / 1.01, 0.37 / 0.79; at 56×56 (224×224) 12.2 / 28.1, 11.6–12.0 /
//! 27.8–28.7, 11.9–12.2 / 26.4–27.1.

use crate::cpu::uninit;
use rayon::prelude::*;

/// Output pixels of the micro-kernel's tile (adjacent, in one row): 2 × 9 accumulators leave
/// registers for the weights of the three taps of a row the compiler loads ahead; at 12 the
/// tile spilled and ran at half the speed.
const PIXELS: usize = 9;
/// Output channels of the micro-kernel's tile: two vectors.
const BLOCK_OUT: usize = 32;
/// Channels per vector of the blocked layouts.
const LANES: usize = 16;

/// Whether convolutions take this kernel where it fits, decided once per process: the CPU has
/// AVX-512F and runs 512-bit FMAs at (nearly) twice the rate of 256-bit ones
/// ([`crate::fma::wide_fma_ratio`] above 1.5). The kernel's gain over Winograd's F(2×2, 3×3)
/// is fewer passes over memory for 2.25 times the multiplies, which pays where the multiplies
/// are cheap: on the Xeon above (two full-width FMA units) it is faster, on the 2-core AMD EPYC
/// (Zen 4, each 512-bit FMA as two 256-bit halves) slower — layer 1's 3×3 at 140×140, forward /
/// backward ms, `bench-layers` alternating: 7.1–7.2 / 14.3–16.0 direct against 5.3–5.6 /
/// 11.5–11.6 Winograd (in that VM's slow spells, when short parallel tasks wait long for the
/// second core, Winograd's fell to 12–14 / 28–30 and the direct kernel's coarser tasks held).
/// `SAE_DIRECT_CONV=1` (where the CPU has AVX-512F) or `=0` decides instead of the
/// measurement, so that the tests run both paths on every machine.
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let avx512 = crate::fma::fma_register_flops(512, 0).is_some();
        match std::env::var("SAE_DIRECT_CONV").as_deref() {
            _ if !avx512 => false,
            Ok("1") => true,
            Ok("0") => false,
            _ => crate::fma::wide_fma_ratio().is_some_and(|ratio| ratio > 1.5),
        }
    })
}

/// A 3×3 stride-1 convolution with padding 1 of `c`-channel `h × w` images into `oc`
/// channels, computed directly.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Direct {
    c: usize,
    h: usize,
    w: usize,
    oc: usize,
}

impl Direct {
    /// The convolution, where this kernel takes it and is faster than Winograd's: an AVX-512
    /// CPU, channels in whole vectors (`c` of 16, `oc` of 32), rows at least 8 wide (a tile's
    /// pixels lie in one row) and at most 64 channels in and out. ResNet-50's other 3×3
    /// stride-1 layers at 140×140 (`bench-layers --only conv2` on the Xeon, a throwaway build
    /// with the limit raised, two runs each, forward / backward ms, Winograd's against
    /// direct): 128 channels at 18×18 3.95–4.18 / 8.8–8.9 against 4.3–4.5 / 10.2–10.5; 256 at
    /// 9×9 4.1 / 8.3–8.5 against 5.0–5.4 / 18.5–19.4 (the weight gradient's 81 pixels per
    /// pass and its 2.4 MB of sums); 512 at 5×5 6.4–6.7 / 13.9–14.9 against 6.0–6.8 /
    /// 13.7–15.2.
    pub(crate) fn new(c: usize, h: usize, w: usize, oc: usize) -> Option<Self> {
        // The gathers index 16 planes with 32-bit offsets.
        let plane_fits = h > 0 && h * w <= i32::MAX as usize / LANES;
        let fits = c.is_multiple_of(LANES) && oc.is_multiple_of(BLOCK_OUT) && w >= 8 && plane_fits;
        (fits && c <= 64 && oc <= 64 && available()).then_some(Self { c, h, w, oc })
    }

    /// The weights (O, C, 3, 3), contiguous, as the micro-kernel reads them: (O/32, C, 9, 32).
    pub(crate) fn pack_weights(&self, w: &[f32]) -> Vec<f32> {
        let mut packed = uninit::<f32>(self.oc * self.c * 9);
        for (o, filters) in w[..self.oc * self.c * 9].chunks_exact(self.c * 9).enumerate() {
            let (block, lane) = (o / BLOCK_OUT, o % BLOCK_OUT);
            for (t, &v) in filters.iter().enumerate() {
                packed[(block * self.c * 9 + t) * BLOCK_OUT + lane] = v;
            }
        }
        packed
    }

    /// `out` (N, O, H, W) = the convolution of `x` (N, C, H, W), both contiguous f32, with the
    /// weights of [`Self::pack_weights`]; `epilogue(o, plane)` runs on each output plane
    /// before it is written. Images in parallel, or an image's blocks of output channels
    /// when there are fewer images than threads.
    pub(crate) fn forward(
        &self,
        x: &[f32],
        packed: &[f32],
        out: &mut [f32],
        epilogue: impl Fn(usize, &mut [f32]) + Sync,
    ) {
        let (image_in, image_out) = (self.c * self.h * self.w, self.oc * self.h * self.w);
        let n = out.len() / image_out;
        assert!(x.len() >= n * image_in && packed.len() >= self.oc * self.c * 9, "direct: operands too short");
        let threads = rayon::current_num_threads();
        let image = |(blocked_in, blocked_out): &mut (Vec<f32>, Vec<f32>), i: usize, out: &mut [f32]| {
            self.block_input(&x[i * image_in..][..image_in], blocked_in);
            if blocked_out.len() != image_out {
                *blocked_out = uninit(image_out);
            }
            let block_len = BLOCK_OUT * self.h * self.w;
            let multiply = |(b, dst): (usize, &mut [f32])| self.multiply(blocked_in, packed, b, dst);
            if n < threads {
                blocked_out.par_chunks_exact_mut(block_len).enumerate().for_each(multiply);
            } else {
                blocked_out.chunks_exact_mut(block_len).enumerate().for_each(multiply);
            }
            self.unblock_output(blocked_out, out, &epilogue);
        };
        if n >= threads {
            out.par_chunks_mut(image_out)
                .enumerate()
                .for_each_init(Default::default, |buffers, (i, o)| image(buffers, i, o));
        } else {
            let mut buffers = Default::default();
            out.chunks_mut(image_out).enumerate().for_each(|(i, o)| image(&mut buffers, i, o));
        }
    }

    /// One image (C, H, W) into `blocked`: (C/16, H+2, W+2, 16), zero on the border.
    fn block_input(&self, x: &[f32], blocked: &mut Vec<f32>) {
        let (hp, wp, plane) = (self.h + 2, self.w + 2, self.h * self.w);
        blocked.clear();
        blocked.resize(self.c / LANES * hp * wp * LANES, 0.0);
        for (cb, dst) in blocked.chunks_exact_mut(hp * wp * LANES).enumerate() {
            let channels = &x[cb * LANES * plane..][..LANES * plane];
            for y in 0..self.h {
                let row = &mut dst[((y + 1) * wp + 1) * LANES..][..self.w * LANES];
                // SAFETY: `available` (AVX-512F); the reads are pixels y·w .. y·w + w of the
                // 16 planes of `channels`, the writes `row`.
                unsafe { gather_pixels(&channels[y * self.w..], plane, self.w, row) };
            }
        }
    }

    /// Output block `b` (32 channels) of the image in `blocked` into `dst`: (2, H, W, 16).
    fn multiply(&self, blocked: &[f32], packed: &[f32], b: usize, dst: &mut [f32]) {
        let weights = &packed[b * self.c * 9 * BLOCK_OUT..][..self.c * 9 * BLOCK_OUT];
        let tiles = self.w.div_ceil(PIXELS);
        for y in 0..self.h {
            let mut x0 = 0;
            for t in 0..tiles {
                // Tiles of balanced widths (35 = 8 + 9 + 9 + 9, 10 = 5 + 5), at most PIXELS.
                let width = self.w * (t + 1) / tiles - x0;
                let tile = Tile { c: self.c, h: self.h, w: self.w, y, x0 };
                // SAFETY: `available`; `tile` lies within the image, whose blocked input,
                // weights and output block the slices hold (checked by their lengths).
                unsafe {
                    match width {
                        9 => tile.run::<9>(blocked, weights, dst),
                        8 => tile.run::<8>(blocked, weights, dst),
                        7 => tile.run::<7>(blocked, weights, dst),
                        6 => tile.run::<6>(blocked, weights, dst),
                        5 => tile.run::<5>(blocked, weights, dst),
                        _ => unreachable!("the tiles of rows at least 8 wide are 5 to 9 pixels"),
                    }
                }
                x0 += width;
            }
        }
    }

    /// The blocked output (O/16, H, W, 16) into planes (O, H, W), each through `epilogue`.
    fn unblock_output(&self, blocked: &[f32], out: &mut [f32], epilogue: &(impl Fn(usize, &mut [f32]) + Sync)) {
        let plane = self.h * self.w;
        for (o, dst) in out.chunks_exact_mut(plane).enumerate() {
            let src = &blocked[(o / LANES * plane) * LANES + o % LANES..];
            // SAFETY: `available`; `src` holds lane o % 16 of the plane's `plane` pixels.
            unsafe { gather_lane(src, dst) };
            epilogue(o, dst);
        }
    }

    /// `dw` (O, C, 3, 3) = the weight gradient of this convolution: `Σ dy[o, p] ·
    /// x[c, p + tap]` over the images and pixels of `x` (N, C, H, W) and `dy` (N, O, H, W),
    /// both contiguous f32. Each thread sums its own range of images into a (C, 9, O)
    /// buffer: per input channel, 9 taps × 32 output channels in registers while it runs over
    /// the pixels (two vector loads of `dy`, nine broadcasts of `x` per pixel).
    pub(crate) fn weight_gradient(&self, x: &[f32], dy: &[f32], dw: &mut [f32]) {
        let (image_in, image_out) = (self.c * self.h * self.w, self.oc * self.h * self.w);
        let n = dy.len() / image_out;
        assert!(x.len() >= n * image_in && dw.len() >= self.oc * self.c * 9, "direct: operands too short");
        let ranges = rayon::current_num_threads().min(n).max(1);
        // At least one image per range (an empty batch has no ranges, and a zero gradient).
        let per_range = n.div_ceil(ranges).max(1);
        let sums: Vec<Vec<f32>> = (0..n.div_ceil(per_range))
            .into_par_iter()
            .map(|r| {
                let (mut blocked_in, mut blocked_dy) = (Vec::new(), Vec::new());
                let mut sum = vec![0f32; self.c * 9 * self.oc];
                for i in r * per_range..((r + 1) * per_range).min(n) {
                    self.block_input(&x[i * image_in..][..image_in], &mut blocked_in);
                    self.block_output_gradient(&dy[i * image_out..][..image_out], &mut blocked_dy);
                    for ci in 0..self.c {
                        for b in 0..self.oc / BLOCK_OUT {
                            // SAFETY: `available`; the blocked buffers are this image's, `ci`
                            // and `b` within them, `sum` (C, 9, O).
                            unsafe { self.weight_gradient_block(&blocked_in, &blocked_dy, ci, b, &mut sum) };
                        }
                    }
                }
                sum
            })
            .collect();
        // (C, 9, O) summed over the ranges → (O, C, 9).
        for (o, filters) in dw[..self.oc * self.c * 9].chunks_exact_mut(self.c * 9).enumerate() {
            for (k, v) in filters.iter_mut().enumerate() {
                *v = sums.iter().map(|s| s[k * self.oc + o]).sum();
            }
        }
    }

    /// One image's output gradient (O, H, W) into `blocked`: (O/16, H, W, 16).
    fn block_output_gradient(&self, dy: &[f32], blocked: &mut Vec<f32>) {
        let plane = self.h * self.w;
        if blocked.len() != self.oc * plane {
            *blocked = uninit(self.oc * plane);
        }
        for (ob, dst) in blocked.chunks_exact_mut(plane * LANES).enumerate() {
            // SAFETY: `available`; the 16 planes of block `ob` and its `plane` pixels.
            unsafe { gather_pixels(&dy[ob * LANES * plane..], plane, plane, dst) };
        }
    }

    /// `sum[ci, tap, b·32 .. b·32 + 32] += Σ_pixels x[ci, pixel + tap] · dy[b·32 .., pixel]`.
    ///
    /// # Safety
    /// AVX-512F; `blocked_in` and `blocked_dy` one image's blocked input and output gradient,
    /// `ci < c`, `b < oc / 32`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn weight_gradient_block(
        &self,
        blocked_in: &[f32],
        blocked_dy: &[f32],
        ci: usize,
        b: usize,
        sum: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let (hp, wp, plane) = (self.h + 2, self.w + 2, self.h * self.w);
        assert!(ci < self.c && b < self.oc / BLOCK_OUT, "direct: channel outside the convolution");
        assert!(blocked_in.len() >= self.c * hp * wp && blocked_dy.len() >= self.oc * plane);
        assert!(sum.len() >= self.c * 9 * self.oc);
        // SAFETY: the asserts bound the reads: padded pixels (y + ky, x + kx) of channel ci,
        // pixels of output block b; and the writes, row (ci, tap) of `sum`.
        unsafe {
            let x = blocked_in.as_ptr().add((ci / LANES) * hp * wp * LANES + ci % LANES);
            let (d0, d1) =
                (blocked_dy.as_ptr().add(2 * b * plane * LANES), blocked_dy.as_ptr().add((2 * b + 1) * plane * LANES));
            let mut acc = [[_mm512_setzero_ps(); 2]; 9];
            for y in 0..self.h {
                for xx in 0..self.w {
                    let p = (y * self.w + xx) * LANES;
                    let (g0, g1) = (_mm512_loadu_ps(d0.add(p)), _mm512_loadu_ps(d1.add(p)));
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let v = _mm512_set1_ps(*x.add(((y + t / 3) * wp + xx + t % 3) * LANES));
                        acc[0] = _mm512_fmadd_ps(v, g0, acc[0]);
                        acc[1] = _mm512_fmadd_ps(v, g1, acc[1]);
                    }
                }
            }
            for (t, acc) in acc.iter().enumerate() {
                let dst = sum.as_mut_ptr().add((ci * 9 + t) * self.oc + b * BLOCK_OUT);
                _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), acc[0]));
                _mm512_storeu_ps(dst.add(LANES), _mm512_add_ps(_mm512_loadu_ps(dst.add(LANES)), acc[1]));
            }
        }
    }

    /// Elsewhere [`available`] is false and nothing calls this.
    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn weight_gradient_block(&self, _: &[f32], _: &[f32], _: usize, _: usize, _: &mut [f32]) {
        unreachable!("the direct convolution is x86-64 only")
    }
}

/// A tile of output pixels `x0..x0 + N` of row `y`, for all input channels.
struct Tile {
    c: usize,
    h: usize,
    w: usize,
    y: usize,
    x0: usize,
}

impl Tile {
    /// The tile's 32 output channels × `N` pixels into the output block `dst` (2, H, W, 16).
    ///
    /// # Safety
    /// AVX-512F; `blocked` the image's blocked input, `weights` one output block's packed
    /// weights, `dst` one output block, the tile within the image.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const N: usize>(&self, blocked: &[f32], weights: &[f32], dst: &mut [f32]) {
        use std::arch::x86_64::*;
        let (hp, wp) = (self.h + 2, self.w + 2);
        assert!(self.x0 + N <= self.w && self.y < self.h, "direct: tile outside the image");
        assert!(blocked.len() >= self.c * hp * wp && weights.len() >= self.c * 9 * BLOCK_OUT, "direct: short operands");
        assert!(dst.len() >= BLOCK_OUT * self.h * self.w, "direct: short output");
        let (x, w) = (blocked.as_ptr(), weights.as_ptr());
        // SAFETY: the asserts bound every read: input pixels (y + ky, x0 + i + kx) of the
        // padded image, weights of the block; writes of pixels of the tile.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; N];
            for ci in 0..self.c {
                let (cb, lane) = (ci / LANES, ci % LANES);
                for ky in 0..3 {
                    let row = x.add(((cb * hp + self.y + ky) * wp + self.x0) * LANES + lane);
                    for kx in 0..3 {
                        let taps = w.add((ci * 9 + ky * 3 + kx) * BLOCK_OUT);
                        let (w0, w1) = (_mm512_loadu_ps(taps), _mm512_loadu_ps(taps.add(LANES)));
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let v = _mm512_set1_ps(*row.add((i + kx) * LANES));
                            acc[0] = _mm512_fmadd_ps(v, w0, acc[0]);
                            acc[1] = _mm512_fmadd_ps(v, w1, acc[1]);
                        }
                    }
                }
            }
            let plane = self.h * self.w;
            let out = dst.as_mut_ptr().add((self.y * self.w + self.x0) * LANES);
            for (i, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(i * LANES), acc[0]);
                _mm512_storeu_ps(out.add((plane + i) * LANES), acc[1]);
            }
        }
    }

    /// Elsewhere [`available`] is false and nothing calls this.
    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run<const N: usize>(&self, _: &[f32], _: &[f32], _: &mut [f32]) {
        unreachable!("the direct convolution is x86-64 only")
    }
}

/// `row[p·16 + l] = channels[l·plane + p]` for `p < width`, `l < 16`: the 16 channels of
/// each pixel as one vector (a gather).
///
/// # Safety
/// AVX-512F; `channels` must hold 15·plane + width values and `row` 16·width.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_pixels(channels: &[f32], plane: usize, width: usize, row: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(channels.len() >= 15 * plane + width && row.len() >= LANES * width && plane <= i32::MAX as usize / 16);
    // SAFETY: AVX-512F (the caller's contract).
    let index = unsafe { lane_offsets(plane as i32) };
    for x in 0..width {
        // SAFETY: the assert above.
        unsafe {
            let v = _mm512_i32gather_ps::<4>(index, channels.as_ptr().add(x));
            _mm512_storeu_ps(row.as_mut_ptr().add(x * LANES), v);
        }
    }
}

/// The gathers' offsets: `l · stride` in lane `l`.
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lane_offsets(stride: i32) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    _mm512_mullo_epi32(lanes, _mm512_set1_epi32(stride))
}

/// `dst[p] = src[p·16]` for every `p` of `dst`: one lane of a blocked plane.
///
/// # Safety
/// AVX-512F; `src` must hold 16·(dst.len() − 1) + 1 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_lane(src: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(dst.is_empty() || src.len() > LANES * (dst.len() - 1));
    // SAFETY: AVX-512F (the caller's contract).
    let index = unsafe { lane_offsets(LANES as i32) };
    let whole = dst.len() / LANES * LANES;
    for p in (0..whole).step_by(LANES) {
        // SAFETY: the assert above.
        unsafe {
            _mm512_storeu_ps(dst.as_mut_ptr().add(p), _mm512_i32gather_ps::<4>(index, src.as_ptr().add(p * LANES)))
        };
    }
    for p in whole..dst.len() {
        dst[p] = src[p * LANES];
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn gather_pixels(_: &[f32], _: usize, _: usize, _: &mut [f32]) {
    unreachable!("the direct convolution is x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn gather_lane(_: &[f32], _: &mut [f32]) {
    unreachable!("the direct convolution is x86-64 only")
}
