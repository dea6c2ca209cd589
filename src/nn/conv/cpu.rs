//! The CPU convolution kernels on host floats: im2col and the shifted GEMMs, their backward,
//! pooling, and the thread splitting every CPU kernel of `nn` shares.

use super::Geometry;
use crate::nn::depthwise::{self, Depthwise};
use crate::nn::pool::join_all;

/// Column matrix `[Cg·kh·kw, Ho·Wo]` of image `img`, group `grp` (zero where the kernel
/// overhangs the padded border).
fn im2col(x: &[f32], g: &Geometry, img: usize, grp: usize, cols: &mut [f32]) {
    let (hw, pix) = (g.h * g.w, g.pixels());
    for cl in 0..g.cg() {
        let chan = &x[(img * g.c + grp * g.cg() + cl) * hw..][..hw];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = &mut cols[((cl * g.kh + i) * g.kw + j) * pix..][..pix];
                // Output columns whose input column lies inside the image: a contiguous
                // range, so the copy has no per-element bounds test (that test made im2col
                // a third of an RNP eval's CPU time).
                let (lo, hi) = valid_columns(g, j);
                for oy in 0..g.ho {
                    let iy = (oy * g.s + i) as isize - g.p as isize;
                    let dst = &mut row[oy * g.wo..][..g.wo];
                    if iy < 0 || iy >= g.h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &chan[iy as usize * g.w..][..g.w];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if lo < hi {
                        let first = lo * g.s + j - g.p;
                        if g.s == 1 {
                            dst[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                        } else {
                            for (d, &v) in dst[lo..hi].iter_mut().zip(src[first..].iter().step_by(g.s)) {
                                *d = v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The output columns `[lo, hi)` whose kernel column `j` reads inside the image:
/// `0 <= ox·s + j - p < w`.
fn valid_columns(g: &Geometry, j: usize) -> (usize, usize) {
    let lo = g.p.saturating_sub(j).div_ceil(g.s).min(g.wo);
    let hi = if g.w + g.p > j { (g.w + g.p - j).div_ceil(g.s).min(g.wo) } else { 0 };
    (lo, hi.max(lo))
}

/// Adds the column matrix back onto image `img`, group `grp` of `dx` (adjoint of im2col).
fn col2im(cols: &[f32], g: &Geometry, img: usize, grp: usize, dx: &mut [f32]) {
    let (hw, pix) = (g.h * g.w, g.pixels());
    for cl in 0..g.cg() {
        let chan = &mut dx[(img * g.c + grp * g.cg() + cl) * hw..][..hw];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let row = &cols[((cl * g.kh + i) * g.kw + j) * pix..][..pix];
                let (lo, hi) = valid_columns(g, j);
                for oy in 0..g.ho {
                    let iy = (oy * g.s + i) as isize - g.p as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst = &mut chan[iy as usize * g.w..][..g.w];
                    if lo < hi {
                        let first = lo * g.s + j - g.p;
                        let src = &row[oy * g.wo + lo..oy * g.wo + hi];
                        for (d, &v) in dst[first..].iter_mut().step_by(g.s).zip(src) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}

/// `c[m×n] = a·b (+ c when accumulate)` with explicit strides (row, column) for `a` and `b`;
/// `c` is row-major. Single-threaded: parallelism comes from splitting images over threads.
#[allow(clippy::too_many_arguments)]
fn gemm(m: usize, k: usize, n: usize, a: &[f32], (rsa, csa): (usize, usize), b: &[f32], (rsb, csb): (usize, usize), accumulate: bool, c: &mut [f32]) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    assert!(a.len() > (m - 1) * rsa + (k - 1) * csa);
    assert!(b.len() > (k - 1) * rsb + (n - 1) * csb);
    assert!(c.len() >= m * n);
    // SAFETY: the asserts above bound every index the kernel reads or writes; `c` does not
    // alias `a` or `b` (distinct borrows).
    unsafe {
        // gemm's convention: dst = alpha·dst + beta·lhs·rhs (dst read only when asked).
        gemm::gemm(
            m, n, k,
            c.as_mut_ptr(), 1, n as isize, accumulate,
            a.as_ptr(), csa as isize, rsa as isize,
            b.as_ptr(), csb as isize, rsb as isize,
            1.0, 1.0, false, false, false,
            gemm::Parallelism::None,
        );
    }
}

/// [`gemm`] into a destination with row and column strides `(rsc, csc)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(m: usize, k: usize, n: usize, a: &[f32], (rsa, csa): (usize, usize), b: &[f32], (rsb, csb): (usize, usize), accumulate: bool, c: &mut [f32], (rsc, csc): (usize, usize)) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() > (m - 1) * rsc + (n - 1) * csc);
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| (0..n).for_each(|j| c[i * rsc + j * csc] = 0.0));
        }
        return;
    }
    assert!(a.len() > (m - 1) * rsa + (k - 1) * csa);
    assert!(b.len() > (k - 1) * rsb + (n - 1) * csb);
    // SAFETY: the asserts above bound every index the kernel reads or writes; `c` does not
    // alias `a` or `b` (distinct borrows).
    unsafe {
        gemm::gemm(
            m, n, k,
            c.as_mut_ptr(), csc as isize, rsc as isize, accumulate,
            a.as_ptr(), csa as isize, rsa as isize,
            b.as_ptr(), csb as isize, rsb as isize,
            1.0, 1.0, false, false, false,
            gemm::Parallelism::None,
        );
    }
}

/// Where a zero-padded image lies in the flat buffers of the shifted GEMMs. Rows are
/// `w + p` wide and image slots `h + p` rows high: the `p` zero columns at the start of a row
/// are the right border of the row before it as well, and the `p` zero rows at the top of a
/// slot the bottom border of the image before it, because a tap's shift reaches at most `p`
/// past the image's edge in each direction. Pixel `(y, x)` lies at `(y + p)·wp + x + p`,
/// output pixel `(y, x)` at column `y·wp + x`, and tap `(i, j)` reads `i·wp + j` further on.
/// Every row and image padded on both sides, `(h + 2p)·(w + 2p)` columns, was 15 % more
/// product than the output on 28×28 maps and 31 % on 14×14; this layout is 7 % and 15 %.
struct PaddedLayout {
    /// Row stride.
    wp: usize,
    /// Floats per image slot.
    plane: usize,
    /// Zeros after the last slot: its bottom border (and the overhang of the last tap).
    tail: usize,
}

impl PaddedLayout {
    fn of(g: &Geometry) -> Self {
        debug_assert!(2 * g.p < g.kh.min(g.kw), "output no larger than the input");
        let wp = g.w + g.p;
        Self { wp, plane: (g.h + g.p) * wp, tail: g.p * wp + g.p }
    }
}

/// Floats per buffer of a [`ShiftedBatch`]: the padded images, the wide output and the
/// gradient of the padded images of a thread (2 MiB each) stay in the L3 cache together.
const SHIFTED_BATCH_FLOATS: usize = 1 << 19;

/// `dst[j·ds + i] = src[i·ss + j]` for `i < rows`, `j < cols`: 8×8 tiles in AVX2
/// registers, the ragged edges element by element. A channel-by-channel loop with a strided
/// iterator cost about 6 cycles per float, a tenth of a small-CNN training step.
fn transpose(src: &[f32], ss: usize, rows: usize, cols: usize, dst: &mut [f32], ds: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(src.len() > (rows - 1) * ss + cols - 1 && dst.len() > (cols - 1) * ds + rows - 1);
    // Rows [0, r8) and columns [0, c8) go as whole tiles.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    let (r8, c8) = {
        let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
        for i0 in (0..r8).step_by(8) {
            for j0 in (0..c8).step_by(8) {
                // SAFETY: rows i0..i0+8 and columns j0..j0+8 lie within the bounds asserted above.
                unsafe { transpose8x8(src.as_ptr().add(i0 * ss + j0), ss, dst.as_mut_ptr().add(j0 * ds + i0), ds) };
            }
        }
        (r8, c8)
    };
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    let (r8, c8) = (0, 0);
    for i in 0..rows {
        for j in if i < r8 { c8 } else { 0 }..cols {
            dst[j * ds + i] = src[i * ss + j];
        }
    }
}

/// One 8×8 tile of [`transpose`]: rows `src + i·ss` to columns `dst + j·ds`.
///
/// # Safety
/// `src + i·ss + [0, 8)` and `dst + j·ds + [0, 8)` must be valid for `i, j < 8`.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline(always)]
unsafe fn transpose8x8(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees the eight rows and columns; AVX2 is enabled at compile time.
    unsafe {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ss)));
        // Row pairs (0,1), (2,3), (4,5), (6,7) interleaved: `lo` holds columns 0, 1 | 4, 5
        // of each pair, `hi` columns 2, 3 | 6, 7.
        let lo: [__m256; 4] = std::array::from_fn(|k| _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]));
        let hi: [__m256; 4] = std::array::from_fn(|k| _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]));
        for (j, t) in [(0, &lo), (2, &hi)] {
            // Columns j | j + 4 and j + 1 | j + 5 of rows 0–3 and of rows 4–7.
            let (top0, bottom0) = (_mm256_shuffle_ps::<0x44>(t[0], t[1]), _mm256_shuffle_ps::<0x44>(t[2], t[3]));
            let (top1, bottom1) = (_mm256_shuffle_ps::<0xEE>(t[0], t[1]), _mm256_shuffle_ps::<0xEE>(t[2], t[3]));
            _mm256_storeu_ps(dst.add(j * ds), _mm256_permute2f128_ps::<0x20>(top0, bottom0));
            _mm256_storeu_ps(dst.add((j + 4) * ds), _mm256_permute2f128_ps::<0x31>(top0, bottom0));
            _mm256_storeu_ps(dst.add((j + 1) * ds), _mm256_permute2f128_ps::<0x20>(top1, bottom1));
            _mm256_storeu_ps(dst.add((j + 5) * ds), _mm256_permute2f128_ps::<0x31>(top1, bottom1));
        }
    }
}

/// Several images side by side, channels last, for the shifted GEMMs: position `q` of the
/// padded layout holds the `C` channels of
/// one pixel, and the image slots follow each other, so one GEMM covers them all. Per image,
/// the GEMM's column count was the image's pixels: 6 on VGG-16's 2×2 maps, where packing the
/// weight cost more than the product.
///
/// Channels last, the `kw` taps of one kernel row read `kw·C` consecutive floats at every
/// position: the forward is one GEMM per kernel row with `K = kw·C` (a third of the passes
/// over the output at 3×3), and its input is read in place, column by column. With the
/// channels as rows (`[C][positions]`) gemm packed the shifted input for every tap (13 % of
/// a small-CNN training step) and ran the output channels in blocks of 6, with a 2-wide
/// remainder at 32.
struct ShiftedBatch {
    /// Image slots.
    imgs: usize,
    plane: usize,
    wp: usize,
    /// Positions from an image's first output pixel to its last, in the padded layout.
    span: usize,
    /// `[row][C]`, the images' interiors; borders stay zero.
    padded: Vec<f32>,
    /// `[row][O]`: the forward's output, or the backward's output gradient, in the padded
    /// layout; the gradient's positions outside the output pixels stay zero.
    wide: Vec<f32>,
    /// `[row][C]`: the gradient of `padded` (backward with `dx` only).
    dpadded: Vec<f32>,
    /// `[kh][O][kw·C]`: the weight by kernel row, channels last within a tap (forward), or
    /// the weight gradient accumulated in that layout (backward with `dW`).
    w_rows: Vec<f32>,
}

impl ShiftedBatch {
    fn new(g: &Geometry, images: usize, dx: bool) -> Self {
        let PaddedLayout { wp, plane, tail } = PaddedLayout::of(g);
        let imgs = (SHIFTED_BATCH_FLOATS / (g.c.max(g.o) * plane).max(1)).clamp(1, images.max(1));
        // Positions in every buffer: the slots and the tail.
        let row = imgs * plane + tail;
        Self {
            imgs,
            plane,
            wp,
            span: (g.ho - 1) * wp + g.wo,
            padded: vec![0.0; g.c * row],
            wide: vec![0.0; g.o * row],
            dpadded: if dx { vec![0.0; g.c * row] } else { Vec::new() },
            w_rows: vec![0.0; g.o * g.c * g.kh * g.kw],
        }
    }

    /// GEMM columns that cover `b` images.
    fn cols(&self, b: usize) -> usize {
        (b - 1) * self.plane + self.span
    }

    /// Writes `b` consecutive images of `x` (`[b, C, H, W]`) into the padded slots,
    /// channels last.
    fn load_input(&mut self, x: &[f32], g: &Geometry, b: usize) {
        let (hw, c) = (g.h * g.w, g.c);
        for i in 0..b {
            let img = &x[i * c * hw..][..c * hw];
            for y in 0..g.h {
                let at = i * self.plane + (y + g.p) * self.wp + g.p;
                transpose(&img[y * g.w..], hw, c, g.w, &mut self.padded[at * c..][..g.w * c], c);
            }
        }
    }

    /// Position offset of kernel tap `tap` in the padded layout.
    fn offset(&self, g: &Geometry, tap: usize) -> usize {
        (tap / g.kw) * self.wp + tap % g.kw
    }

    /// The weight `[O][wc·kh·kw]` (first `C` input channels) into `w_rows`' layout.
    fn load_weight(&mut self, w: &[f32], g: &Geometry) {
        let (taps, kc) = (g.kh * g.kw, g.kw * g.c);
        for i in 0..g.kh {
            for o in 0..g.o {
                let dst = &mut self.w_rows[(i * g.o + o) * kc..][..kc];
                for j in 0..g.kw {
                    for c in 0..g.c {
                        dst[j * g.c + c] = w[o * g.w_row() + c * taps + i * g.kw + j];
                    }
                }
            }
        }
    }

    /// Adds the weight gradient accumulated in `w_rows` to `dw` (`[O][C·kh·kw]`).
    fn add_weight_grad(&self, g: &Geometry, dw: &mut [f32]) {
        let (taps, kc) = (g.kh * g.kw, g.kw * g.c);
        for i in 0..g.kh {
            for o in 0..g.o {
                let src = &self.w_rows[(i * g.o + o) * kc..][..kc];
                for j in 0..g.kw {
                    for c in 0..g.c {
                        dw[o * g.w_row() + c * taps + i * g.kw + j] += src[j * g.c + c];
                    }
                }
            }
        }
    }
}

/// Stride-1 dense convolution of `b` consecutive images, one GEMM per kernel row `i`:
/// `Y[q, o] += Σ_(j, c) X_pad[q + i·wp + j, c] · W[o, c, i, j]`, the images side by side and
/// channels last (see [`ShiftedBatch`]); `s.w_rows` holds the weight ([`ShiftedBatch::load_weight`]).
fn shifted_forward_batch(x: &[f32], g: &Geometry, epi: Epilogue, s: &mut ShiftedBatch, b: usize, out: &mut [f32]) {
    s.load_input(x, g, b);
    let (cols, pix, kc) = (s.cols(b), g.pixels(), g.kw * g.c);
    for i in 0..g.kh {
        let off = i * s.wp * g.c;
        // A = W's kernel row i as [O × kw·C]; B = the padded images from row i on, as
        // [kw·C × positions] (position q's column starts at float q·C).
        gemm_strided(g.o, kc, cols, &s.w_rows[i * g.o * kc..], (kc, 1), &s.padded[off..], (1, g.c), i > 0, &mut s.wide, (1, g.o));
    }
    for (i, dst) in out.chunks_exact_mut(g.o * pix).take(b).enumerate() {
        for oy in 0..g.ho {
            let at = i * s.plane + oy * s.wp;
            transpose(&s.wide[at * g.o..], g.o, g.wo, g.o, &mut dst[oy * g.wo..], pix);
        }
        for (oc, plane) in dst.chunks_exact_mut(pix).enumerate() {
            epi.apply(oc, plane);
        }
    }
}

/// Both gradients of [`shifted_forward_batch`] for `b` consecutive images, channels last
/// and no im2col: with `G` the output gradient in the padded layout and `X` the padded
/// images, `dW[:, :, i, ·] += Gᵀ · X[shifted by row i]` per kernel row (into `s.w_rows`,
/// see [`ShiftedBatch::add_weight_grad`]) and `dX[q + off(i, j), c] += Σ_o W[o, c, i, j] ·
/// G[q, o]` per tap. im2col and col2im moved `kh·kw` copies of every image through memory,
/// twice per backward.
#[allow(clippy::too_many_arguments)]
fn shifted_backward_batch(
    grad: &[f32],
    x: Option<&[f32]>,
    w: Option<&[f32]>,
    g: &Geometry,
    s: &mut ShiftedBatch,
    b: usize,
    dx: Option<&mut [f32]>,
) {
    let (cols, taps, pix, kc) = (s.cols(b), g.kh * g.kw, g.pixels(), g.kw * g.c);
    for i in 0..b {
        let src = &grad[i * g.o * pix..][..g.o * pix];
        for oy in 0..g.ho {
            let at = i * s.plane + oy * s.wp;
            transpose(&src[oy * g.wo..], pix, g.o, g.wo, &mut s.wide[at * g.o..], g.o);
        }
    }
    if let Some(x) = x {
        s.load_input(x, g, b);
        for i in 0..g.kh {
            let off = i * s.wp * g.c;
            // dW_i[o, (j, c)] += Σ_q G[q, o] · X[q + i·wp, (j, c)]
            gemm_strided(g.o, cols, kc, &s.wide, (1, g.o), &s.padded[off..], (g.c, 1), true, &mut s.w_rows[i * g.o * kc..], (kc, 1));
        }
    }
    if let (Some(w), Some(dx)) = (w, dx) {
        // Tap 0 (offset 0) writes positions [0, cols) without reading them; the other taps
        // reach up to `last` positions further, which start from zero.
        let last = s.offset(g, taps - 1);
        s.dpadded[cols * g.c..(cols + last) * g.c].fill(0.0);
        for tap in 0..taps {
            let off = s.offset(g, tap) * g.c;
            // dX[q + off, c] += Σ_o W[o, c, tap] · G[q, o]
            gemm_strided(g.c, g.o, cols, &w[tap..], (taps, g.w_row()), &s.wide, (1, g.o), tap > 0, &mut s.dpadded[off..], (1, g.c));
        }
        let hw = g.h * g.w;
        for i in 0..b {
            let dst = &mut dx[i * g.c * hw..][..g.c * hw];
            for y in 0..g.h {
                let at = i * s.plane + (y + g.p) * s.wp + g.p;
                transpose(&s.dpadded[at * g.c..], g.c, g.w, g.c, &mut dst[y * g.w..], hw);
            }
        }
    }
}

/// How many threads a call over `images` images of `macs_per_image` MACs uses: the
/// caller's [`compute_threads`](crate::nn::pool::compute_threads), fewer when the work is too small to pay for a spawn.
fn split(images: usize, macs_per_image: usize) -> usize {
    // About 0.5 ms of work per thread at least (a spawn costs tens of microseconds).
    const MIN_MACS_PER_THREAD: usize = 1 << 21;
    let by_work = (images * macs_per_image / MIN_MACS_PER_THREAD).max(1);
    crate::nn::pool::compute_threads().min(images).min(by_work).max(1)
}

/// Runs `f(first_image, images)` over `threads` contiguous image ranges, the first on the
/// calling thread.
pub(crate) fn for_image_ranges<R: Send>(n: usize, threads: usize, f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
    let ranges: Vec<(usize, usize)> =
        (0..threads).map(|t| (t * n / threads, (t + 1) * n / threads)).filter(|(a, b)| b > a).collect();
    if ranges.len() <= 1 {
        return vec![f(0, n)];
    }
    let f = &f;
    join_all(ranges.into_iter().map(|(a, b)| move || f(a, b - a)).collect())
}

/// What the forward applies to each output channel as it is written.
#[derive(Clone, Copy)]
pub struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub relu: bool,
}

impl Epilogue<'_> {
    pub const NONE: Epilogue<'static> = Epilogue { bias: None, relu: false };

    fn apply(&self, channel: usize, row: &mut [f32]) {
        let b = self.bias.map_or(0.0, |b| b[channel]);
        match (b != 0.0, self.relu) {
            (false, false) => {}
            (true, false) => row.iter_mut().for_each(|v| *v += b),
            // `<` rather than `max` so that a NaN passes through, as in PyTorch.
            (_, true) => row.iter_mut().for_each(|v| {
                let y = *v + b;
                *v = if y < 0.0 { 0.0 } else { y };
            }),
        }
    }
}

/// Whether the shifted GEMMs ([`ShiftedBatch`]) apply: dense, stride 1, and enough input channels
/// for a GEMM with `K = C` to run well (the first layer of a network, with 1 or 3 input
/// channels, keeps im2col's `K = C·kh·kw`).
fn shifted(g: &Geometry) -> bool {
    g.s == 1 && g.groups == 1 && g.c >= 8 && 2 * g.p < g.kh.min(g.kw)
}

/// Whether a [`shifted`] layer runs as im2col over several images instead. The shifted
/// GEMMs compute every position of the padded layout, `(H+p)·(W+p)` per image where `H·W`
/// are kept (1.27× the work at 8×8 with a 3×3 kernel, 1.56× at 4×4, 2.25× at 2×2); im2col
/// computes no extra product but copies `K` floats per pixel in, and col2im adds them back,
/// a cost per multiply-add of about `1/O`. Measured on VGG-16 and ResNet-20 training
/// (2026-12-07, AVX-512 and AVX2 GEMM kernels): at 8×8, im2col won 3 % of a VGG step with
/// 256 output channels and lost 10 % of a ResNet-20 step with 64; at 4×4 and smaller it won
/// with 16 and more.
fn batched_im2col(g: &Geometry) -> bool {
    let (plane, pix) = (PaddedLayout::of(g).plane, g.pixels());
    shifted(g) && (2 * plane > 3 * pix || (plane - pix) * g.o > 24 * pix)
}

/// Column matrices of at most this many floats per [`batched_im2col`] GEMM (1 MiB, the L2
/// cache of a core on current x86 servers), so that im2col's output is still in cache when
/// the GEMM reads it. VGG-16 training at one thread, alternating: 42.2 img/s against 40.4
/// with 4 MiB, 38.8 with 16 MiB (2026-12-07, AVX-512 VM).
const BATCHED_COLS_FLOATS: usize = 1 << 18;

/// Images per [`batched_im2col`] GEMM.
fn batched_images(g: &Geometry, count: usize) -> usize {
    (BATCHED_COLS_FLOATS / (g.k() * g.pixels()).max(1)).clamp(1, count.max(1))
}

/// Where each column of a small map's column matrix reads: for tap `t` and output pixel `q`,
/// `src[t·pix + q]` indexes the channel plane, or is `h·w` (a zero after the plane) where the
/// tap overhangs the border. On maps of 8×8 and smaller, im2col's and col2im's copies per
/// output row are 2 to 8 floats long, and their per-row bounds, fills and `memcpy` calls
/// cost more than the floats: 10 % of a VGG-16 training step, against 3 % as one indexed
/// load per float.
struct TapTable {
    src: Vec<u32>,
}

impl TapTable {
    fn new(g: &Geometry) -> Self {
        let hw = g.h * g.w;
        let mut src = Vec::with_capacity(g.kh * g.kw * g.pixels());
        for i in 0..g.kh {
            for j in 0..g.kw {
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        let (iy, ix) = ((oy * g.s + i) as isize - g.p as isize, (ox * g.s + j) as isize - g.p as isize);
                        let inside = (0..g.h as isize).contains(&iy) && (0..g.w as isize).contains(&ix);
                        src.push(if inside { iy as usize * g.w + ix as usize } else { hw } as u32);
                    }
                }
            }
        }
        Self { src }
    }

    /// Image `img`'s column matrix into rows `stride` floats apart; `plane` holds `h·w + 1`
    /// floats.
    fn im2col(&self, x: &[f32], g: &Geometry, img: usize, cols: &mut [f32], stride: usize, plane: &mut [f32]) {
        let (hw, pix, taps) = (g.h * g.w, g.pixels(), g.kh * g.kw);
        plane[hw] = 0.0;
        for cl in 0..g.c {
            plane[..hw].copy_from_slice(&x[(img * g.c + cl) * hw..][..hw]);
            for (t, src) in self.src.chunks_exact(pix).enumerate() {
                let row = &mut cols[(cl * taps + t) * stride..][..pix];
                for (d, &at) in row.iter_mut().zip(src) {
                    *d = plane[at as usize];
                }
            }
        }
    }

    /// Adds the column matrix (rows `stride` floats apart) back onto image `img` of `dx`.
    fn col2im(&self, cols: &[f32], g: &Geometry, img: usize, dx: &mut [f32], stride: usize, plane: &mut [f32]) {
        let (hw, pix, taps) = (g.h * g.w, g.pixels(), g.kh * g.kw);
        for cl in 0..g.c {
            plane.fill(0.0);
            for (t, src) in self.src.chunks_exact(pix).enumerate() {
                let row = &cols[(cl * taps + t) * stride..][..pix];
                for (&v, &at) in row.iter().zip(src) {
                    plane[at as usize] += v;
                }
            }
            for (d, &v) in dx[(img * g.c + cl) * hw..][..hw].iter_mut().zip(&plane[..hw]) {
                *d += v;
            }
        }
    }
}


/// Forward of images `first..` into `out` by [`batched_im2col`]: one GEMM
/// `W[O × K] · cols[K × images·pix]` per batch of images.
fn batched_im2col_forward(x: &[f32], w: &[f32], g: &Geometry, epi: Epilogue, first: usize, out: &mut [f32]) {
    let (k, pix) = (g.k(), g.pixels());
    let slab = g.o * pix;
    let count = out.len() / slab.max(1);
    let per = batched_images(g, count);
    let (mut cols, mut wide) = (vec![0.0f32; k * per * pix], vec![0.0f32; g.o * per * pix]);
    let (table, mut plane) = (TapTable::new(g), vec![0.0f32; g.h * g.w + 1]);
    let mut i = 0;
    while i < count {
        let b = per.min(count - i);
        let n = b * pix;
        for j in 0..b {
            table.im2col(x, g, first + i + j, &mut cols[j * pix..], n, &mut plane);
        }
        gemm(g.o, k, n, w, (g.w_row(), 1), &cols, (n, 1), false, &mut wide);
        for j in 0..b {
            let dst = &mut out[(i + j) * slab..][..slab];
            for (oc, row) in dst.chunks_exact_mut(pix).enumerate() {
                row.copy_from_slice(&wide[oc * n + j * pix..][..pix]);
                epi.apply(oc, row);
            }
        }
        i += b;
    }
}

/// Backward of images `first..first + count` by [`batched_im2col`]: `dW += G·colsᵀ` and
/// `cols = Wᵀ·G` (then col2im) per batch of images, `G` the batch's output gradient laid
/// out as `[O × images·pix]`.
#[allow(clippy::too_many_arguments)]
fn batched_im2col_backward(grad: &[f32], x: Option<&[f32]>, w: Option<&[f32]>, g: &Geometry, first: usize, count: usize, dx: Option<&mut [f32]>, dw: Option<&mut [f32]>) {
    let (k, pix) = (g.k(), g.pixels());
    let per = batched_images(g, count);
    let (mut cols, mut gw) = (vec![0.0f32; k * per * pix], vec![0.0f32; g.o * per * pix]);
    let (table, mut plane) = (TapTable::new(g), vec![0.0f32; g.h * g.w + 1]);
    let (mut dx, mut dw) = (dx, dw);
    let mut i = 0;
    while i < count {
        let b = per.min(count - i);
        let n = b * pix;
        for j in 0..b {
            let gr = &grad[(first + i + j) * g.o * pix..][..g.o * pix];
            for (oc, src) in gr.chunks_exact(pix).enumerate() {
                gw[oc * n + j * pix..][..pix].copy_from_slice(src);
            }
        }
        if let (Some(x), Some(dw)) = (x, dw.as_deref_mut()) {
            for j in 0..b {
                table.im2col(x, g, first + i + j, &mut cols[j * pix..], n, &mut plane);
            }
            // dW[O×K] += G[O×n] · colsᵀ[n×K]
            gemm(g.o, n, k, &gw, (n, 1), &cols, (1, n), true, dw);
        }
        if let (Some(w), Some(dx)) = (w, dx.as_deref_mut()) {
            // cols[K×n] = Wᵀ[K×O] · G[O×n]
            gemm(k, g.o, n, w, (1, k), &gw, (n, 1), false, &mut cols);
            for j in 0..b {
                table.col2im(&cols[j * pix..], g, i + j, dx, n, &mut plane);
            }
        }
        i += b;
    }
}

/// One thread's im2col column matrix, kept from image to image.
struct Scratch {
    cols: Vec<f32>,
}

impl Scratch {
    /// A column matrix for images of up to `g.c` input channels.
    fn new(g: &Geometry) -> Self {
        Self { cols: vec![0.0; g.k() * g.pixels()] }
    }
}

/// im2col + one GEMM per group, for one image (`x` holds the whole batch, `img` indexes it).
fn image_im2col(x: &[f32], w: &[f32], g: &Geometry, epi: Epilogue, img: usize, s: &mut Scratch, dst: &mut [f32]) {
    let (k, pix, og) = (g.k(), g.pixels(), g.og());
    for grp in 0..g.groups {
        im2col(x, g, img, grp, &mut s.cols);
        // Rows of the stored weight are w_row apart; a channel slice uses the first k.
        let wg = &w[grp * og * g.w_row()..];
        let dst = &mut dst[grp * og * pix..][..og * pix];
        gemm(og, k, pix, wg, (g.w_row(), 1), &s.cols, (pix, 1), false, dst);
        for (oc, row) in dst.chunks_exact_mut(pix).enumerate() {
            epi.apply(grp * og + oc, row);
        }
    }
}

/// Whether a layer is a 1×1 convolution on maps large enough for one GEMM per image,
/// `Y = W·X` on the image as it lies (no copy in or out). HorNet's `proj_in`/`proj_out` are
/// these; through the shifted path's channels-last copies they cost 13 % of its inference.
fn pointwise(g: &Geometry) -> bool {
    g.kh == 1 && g.kw == 1 && g.s == 1 && g.p == 0 && g.groups == 1 && g.pixels() >= 64
}

/// Output of images `first..` into `out` (`[count, O, Ho, Wo]`, `count` from its length).
fn forward_range(x: &[f32], w: &[f32], g: &Geometry, epi: Epilogue, first: usize, out: &mut [f32]) {
    let slab = g.o * g.pixels();
    if pointwise(g) {
        let (pix, chw) = (g.pixels(), g.c * g.pixels());
        for (i, dst) in out.chunks_exact_mut(slab.max(1)).enumerate() {
            gemm(g.o, g.c, pix, w, (g.w_row(), 1), &x[(first + i) * chw..][..chw], (pix, 1), false, dst);
            for (oc, row) in dst.chunks_exact_mut(pix).enumerate() {
                epi.apply(oc, row);
            }
        }
        return;
    }
    if batched_im2col(g) {
        batched_im2col_forward(x, w, g, epi, first, out);
        return;
    }
    if shifted(g) {
        let count = out.len() / slab.max(1);
        let mut s = ShiftedBatch::new(g, count, false);
        s.load_weight(w, g);
        let chw = g.c * g.h * g.w;
        let mut i = 0;
        while i < count {
            let b = s.imgs.min(count - i);
            shifted_forward_batch(&x[(first + i) * chw..][..b * chw], g, epi, &mut s, b, &mut out[i * slab..][..b * slab]);
            i += b;
        }
        return;
    }
    let mut scratch = Scratch::new(g);
    for (i, dst) in out.chunks_exact_mut(slab.max(1)).enumerate() {
        image_im2col(x, w, g, epi, first + i, &mut scratch, dst);
    }
}

/// [`ConvBackend::conv2d_bias_act_ragged`](super::ConvBackend::conv2d_bias_act_ragged):
/// every image runs the same per-image kernel as [`forward`], on its own channel block
/// `[0, c_out[i]) × [0, c_in[i])` of the weight, so each image's output is bit for bit what
/// a batch of images with its widths gives; the batch is split over threads as one. RNP's
/// grouping of images by action instead ran one call per (previous, new) action pair, with
/// a gather before and a concatenation after, and a small group ran on one core.
///
/// `g.c` is the channel count of `x` (the widest input), `g.o` that of the output (the
/// widest `c_out`): channels that no image of the batch computes are not stored at all.
pub fn forward_ragged(x: &[f32], w: &[f32], g: &Geometry, c_in: &[usize], c_out: &[usize], epi: Epilogue) -> Vec<f32> {
    let (pix, hw) = (g.pixels(), g.h * g.w);
    let slab = g.o * pix;
    let macs: usize = c_in.iter().zip(c_out).map(|(&a, &b)| a * b).sum::<usize>() * g.kh * g.kw * pix;
    let threads = split(g.n, macs / g.n.max(1));
    zeroed_by_image_chunks(g.n * slab, g.n, threads, |first, chunk| {
        // Sized by the first image that needs it: zeroing a column matrix for the widest
        // input on every call cost a routed batch-1 forward 5 %.
        let mut scratch = Scratch { cols: Vec::new() };
        // One shifted batch of one image per (input, output) width, its weight loaded once.
        let mut batches: Vec<((usize, usize), ShiftedBatch)> = Vec::new();
        for (i, dst) in chunk.chunks_exact_mut(slab.max(1)).enumerate() {
            let img = first + i;
            let gi = Geometry { n: 1, c: c_in[img], o: c_out[img], ..*g };
            if shifted(g) && shifted(&gi) {
                let at = match batches.iter().position(|(widths, _)| *widths == (gi.c, gi.o)) {
                    Some(at) => at,
                    None => {
                        let mut s = ShiftedBatch::new(&gi, 1, false);
                        s.load_weight(w, &gi);
                        batches.push(((gi.c, gi.o), s));
                        batches.len() - 1
                    }
                };
                // The same GEMMs, in the same order, as a batch of images of these widths.
                shifted_forward_batch(&x[img * g.c * hw..][..gi.c * hw], &gi, epi, &mut batches[at].1, 1, &mut dst[..gi.o * pix]);
            } else {
                // im2col reads channel planes `g.c` apart in `x`: give it this image alone.
                let xi = &x[img * g.c * hw..][..gi.c * hw];
                if scratch.cols.len() < gi.k() * pix {
                    scratch.cols.resize(gi.k() * pix, 0.0);
                }
                image_im2col(xi, w, &gi, epi, 0, &mut scratch, dst);
            }
        }
    })
}

/// The geometry as a stride-1 depthwise convolution that [`depthwise`](crate::nn::depthwise)'s
/// direct kernel handles, if it is one.
fn as_depthwise(g: &Geometry) -> Option<Depthwise> {
    let d = Depthwise { n: g.n, c: g.c, h: g.h, w: g.w, kh: g.kh, kw: g.kw, p: g.p };
    (g.groups == g.c && g.o == g.c && g.wc == 1 && g.s == 1 && g.c > 0 && d.supported()).then_some(d)
}

pub fn forward(x: &[f32], w: &[f32], g: &Geometry, epi: Epilogue) -> Vec<f32> {
    if let Some(d) = as_depthwise(g) {
        return depthwise::forward_then(x, w, &d, |plane, values| epi.apply(plane % g.o, values));
    }
    let threads = split(g.n, g.o * g.k() * g.pixels());
    zeroed_by_image_chunks(g.n * g.o * g.pixels(), g.n, threads, |first, chunk| forward_range(x, w, g, epi, first, chunk))
}

/// Splits `out` (`images` equal slabs) into `threads` contiguous ranges of images and runs
/// `f(first_image, slab_range)` on each, the first on the calling thread: every thread
/// writes its own part of the output, so nothing is concatenated afterwards.
pub(crate) fn for_image_chunks<T: Send, R: Send>(out: &mut [T], images: usize, threads: usize, f: impl Fn(usize, &mut [T]) -> R + Sync) -> Vec<R> {
    let per = out.len().checked_div(images).unwrap_or(0);
    let threads = threads.clamp(1, images.max(1));
    if threads == 1 {
        return vec![f(0, out)];
    }
    let f = &f;
    let mut rest = out;
    let mut tasks = Vec::with_capacity(threads);
    for t in 0..threads {
        let (a, b) = (t * images / threads, (t + 1) * images / threads);
        let (chunk, tail) = std::mem::take(&mut rest).split_at_mut((b - a) * per);
        rest = tail;
        tasks.push(move || f(a, chunk));
    }
    join_all(tasks)
}

/// Threads for an element-wise pass over `len` values: one per 64 K values at least.
pub(crate) fn elementwise_threads(len: usize) -> usize {
    crate::nn::pool::compute_threads().min(len >> 16).max(1)
}

/// A buffer of `len` values in `rows` equal rows, zeroed and filled by `f(first_row, chunk)`
/// over contiguous ranges of rows, as many as [`elementwise_threads`] gives.
pub(crate) fn zeroed_by_rows(len: usize, rows: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    if rows == 0 || len == 0 {
        return vec![0.0f32; len];
    }
    zeroed_by_image_chunks(len, rows, elementwise_threads(len), f)
}

/// A buffer of `len` floats as [`for_image_chunks`] fills it: each thread zeroes its own
/// slab, then runs `f` on it. `vec![0.0; len]` zeroed the whole output on the calling thread
/// before the split (5 % of a 2-thread small-CNN training step, all of it serial).
pub(crate) fn zeroed_by_image_chunks(len: usize, images: usize, threads: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    use std::mem::MaybeUninit;
    if threads.clamp(1, images.max(1)) == 1 {
        let mut out = vec![0.0f32; len];
        f(0, &mut out);
        return out;
    }
    let mut buf: Vec<MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` needs no initialisation; the capacity is `len`.
    unsafe { buf.set_len(len) };
    // The slabs cover `[0, covered)`; a remainder (none when `len` is a multiple of
    // `images`) is zeroed here and given to no thread, as in `for_image_chunks`.
    let covered = len / images * images;
    for v in &mut buf[covered..] {
        v.write(0.0);
    }
    for_image_chunks(&mut buf[..covered], images, threads, |first, chunk| {
        for v in chunk.iter_mut() {
            v.write(0.0);
        }
        // SAFETY: every element of the chunk was written just above.
        f(first, unsafe { &mut *(chunk as *mut [MaybeUninit<f32>] as *mut [f32]) });
    });
    let mut buf = std::mem::ManuallyDrop::new(buf);
    // SAFETY: every element was written (the slabs by their threads, the remainder above);
    // `MaybeUninit<f32>` has the layout of `f32`; pointer, length and capacity are `buf`'s.
    unsafe { Vec::from_raw_parts(buf.as_mut_ptr() as *mut f32, len, buf.capacity()) }
}

/// The mean of every `hw`-long plane of `x`. ndarray's `mean_dim` over the reshaped planes
/// took 0.8 ms for a `[64, 32, 28, 28]` activation (this loop 0.2 ms); RNP pools every
/// decision layer's input, and at batch 64 that cost about as much as the router itself.
pub fn plane_means(x: &[f32], hw: usize) -> Vec<f32> {
    if hw == 0 {
        return Vec::new();
    }
    x.chunks_exact(hw)
        .map(|plane| {
            // Sixteen partial sums, so that the loop vectorises.
            let mut acc = [0.0f32; 16];
            let mut lanes = plane.chunks_exact(16);
            for chunk in &mut lanes {
                for (a, &v) in acc.iter_mut().zip(chunk) {
                    *a += v;
                }
            }
            let tail: f32 = lanes.remainder().iter().sum();
            (acc.iter().sum::<f32>() + tail) / hw as f32
        })
        .collect()
}

/// 2×2 / stride-2 max-pool of an NCHW tensor (trailing odd row / column dropped).
pub fn max_pool2x2(x: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
    let (ho, wo) = (h / 2, w / 2);
    let mut out = vec![0.0f32; n * c * ho * wo];
    if out.is_empty() {
        return out;
    }
    // Memory-bound: a thread pays for itself from about 256 K input values.
    let threads = crate::nn::pool::compute_threads().min((n * c * h * w) >> 18).max(1);
    for_image_chunks(&mut out, n, threads, |first, chunk| {
        for (p, plane) in chunk.chunks_exact_mut(ho * wo).enumerate() {
            let src = &x[(first * c + p) * h * w..][..h * w];
            for (oy, orow) in plane.chunks_exact_mut(wo).enumerate() {
                let (r0, r1) = (&src[2 * oy * w..][..w], &src[(2 * oy + 1) * w..][..w]);
                for (ox, o) in orow.iter_mut().enumerate() {
                    *o = r0[2 * ox].max(r0[2 * ox + 1]).max(r1[2 * ox].max(r1[2 * ox + 1]));
                }
            }
        }
    });
    out
}

/// [`max_pool2x2`] and the in-plane position (`row · w + column`) of each maximum; the first
/// of equal values wins, scanning the window row by row.
pub fn max_pool2x2_with_indices(x: &[f32], [n, c, h, w]: [usize; 4]) -> (Vec<f32>, Vec<i64>) {
    let (ho, wo) = (h / 2, w / 2);
    let per = c * ho * wo;
    let mut out = vec![0.0f32; n * per];
    let mut idx = vec![0i64; n * per];
    if per == 0 {
        return (out, idx);
    }
    let pool = |first: usize, out: &mut [f32], idx: &mut [i64]| {
        for (p, (plane, iplane)) in out.chunks_exact_mut(ho * wo).zip(idx.chunks_exact_mut(ho * wo)).enumerate() {
            let src = &x[(first * c + p) * h * w..][..h * w];
            for oy in 0..ho {
                let (r0, r1) = (&src[2 * oy * w..][..2 * wo], &src[(2 * oy + 1) * w..][..2 * wo]);
                let dst = plane[oy * wo..][..wo].iter_mut().zip(&mut iplane[oy * wo..][..wo]);
                for (ox, (o, i)) in dst.enumerate() {
                    let (a, b, cc, d) = (r0[2 * ox], r0[2 * ox + 1], r1[2 * ox], r1[2 * ox + 1]);
                    // `>` keeps the first maximum; a NaN wins, as in PyTorch.
                    let (mut best, mut at) = (a, 0);
                    for (k, v) in [(1, b), (2, cc), (3, d)] {
                        if v > best || (v.is_nan() && !best.is_nan()) {
                            (best, at) = (v, k);
                        }
                    }
                    *o = best;
                    *i = ((2 * oy + at / 2) * w + 2 * ox + at % 2) as i64;
                }
            }
        }
    };
    // Memory-bound: a thread pays for itself from about 256 K input values.
    let threads = crate::nn::pool::compute_threads().min((n * c * h * w) >> 18).clamp(1, n.max(1));
    if threads == 1 {
        pool(0, &mut out, &mut idx);
        return (out, idx);
    }
    let pool = &pool;
    let (mut rest_o, mut rest_i) = (&mut out[..], &mut idx[..]);
    let mut tasks = Vec::with_capacity(threads);
    for t in 0..threads {
        let (a, b) = (t * n / threads, (t + 1) * n / threads);
        let (co, to) = std::mem::take(&mut rest_o).split_at_mut((b - a) * per);
        let (ci, ti) = std::mem::take(&mut rest_i).split_at_mut((b - a) * per);
        (rest_o, rest_i) = (to, ti);
        tasks.push(move || pool(a, co, ci));
    }
    join_all(tasks);
    (out, idx)
}

/// The input gradient of a 2×2 max-pool: each output gradient goes to its maximum's place.
pub fn max_pool2x2_backward(grad: &[f32], idx: &[i64], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
    let per = (h / 2) * (w / 2);
    let mut dx = vec![0.0f32; n * c * h * w];
    if per == 0 {
        return dx;
    }
    for ((plane, g), i) in dx.chunks_exact_mut(h * w).zip(grad.chunks_exact(per)).zip(idx.chunks_exact(per)) {
        for (&gv, &iv) in g.iter().zip(i) {
            plane[iv as usize] += gv;
        }
    }
    dx
}

/// `(dx of images first..first+count, this range's share of dW)`.
fn backward_range(
    grad: &[f32],
    x: Option<&[f32]>,
    w: Option<&[f32]>,
    g: &Geometry,
    first: usize,
    count: usize,
    mut dx: Option<&mut [f32]>,
) -> Option<Vec<f32>> {
    let (k, pix, og) = (g.k(), g.pixels(), g.og());
    let mut dw = x.map(|_| vec![0.0f32; g.o * k]);
    if pointwise(g) {
        let chw = g.c * pix;
        for i in 0..count {
            let img = first + i;
            let gr = &grad[img * g.o * pix..][..g.o * pix];
            if let (Some(x), Some(dw)) = (x, dw.as_mut()) {
                // dW[o, c] += Σ_p G[o, p]·X[c, p]
                gemm(g.o, pix, g.c, gr, (pix, 1), &x[img * chw..][..chw], (1, pix), true, dw);
            }
            if let (Some(w), Some(dx)) = (w, dx.as_mut()) {
                // dX[c, p] = Σ_o W[o, c]·G[o, p]
                gemm(g.c, g.o, pix, w, (1, g.w_row()), gr, (pix, 1), false, &mut dx[i * chw..][..chw]);
            }
        }
        return dw;
    }
    if batched_im2col(g) {
        batched_im2col_backward(grad, x, w, g, first, count, dx.as_deref_mut(), dw.as_deref_mut());
        return dw;
    }
    if shifted(g) {
        let mut s = ShiftedBatch::new(g, count, w.is_some());
        let chw = g.c * g.h * g.w;
        let mut i = 0;
        while i < count {
            let b = s.imgs.min(count - i);
            let img = first + i;
            let gr = &grad[img * g.o * pix..][..b * g.o * pix];
            let xs = x.map(|x| &x[img * chw..][..b * chw]);
            let dxs = dx.as_mut().map(|d| &mut d[i * chw..][..b * chw]);
            shifted_backward_batch(gr, xs, w, g, &mut s, b, dxs);
            i += b;
        }
        if let Some(dw) = dw.as_mut() {
            s.add_weight_grad(g, dw);
        }
        return dw;
    }
    let mut cols = vec![0.0f32; k * pix];
    for i in 0..count {
        let img = first + i;
        for grp in 0..g.groups {
            let gr = &grad[(img * g.o + grp * og) * pix..][..og * pix];
            if let (Some(x), Some(dw)) = (x, dw.as_mut()) {
                im2col(x, g, img, grp, &mut cols);
                // dW_g[og×k] += G[og×pix] · colsᵀ[pix×k]
                gemm(og, pix, k, gr, (pix, 1), &cols, (1, pix), true, &mut dw[grp * og * k..][..og * k]);
            }
            if let (Some(w), Some(dx)) = (w, dx.as_mut()) {
                // cols[k×pix] = W_gᵀ[k×og] · G[og×pix]
                let wg = &w[grp * og * k..][..og * k];
                gemm(k, og, pix, wg, (1, k), gr, (pix, 1), false, &mut cols);
                col2im(&cols, g, i, grp, dx);
            }
        }
    }
    dw
}

pub fn backward(grad: &[f32], x: Option<&[f32]>, w: Option<&[f32]>, g: &Geometry) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    if let Some(d) = as_depthwise(g) {
        return (w.map(|w| depthwise::grad_input(grad, w, &d)), x.map(|x| depthwise::grad_weight(grad, x, &d)));
    }
    let threads = split(g.n, 2 * g.o * g.k() * g.pixels());
    // Each range's share of dW, added in range order after.
    let parts = std::sync::Mutex::new(Vec::new());
    let dx = match w {
        Some(_) => {
            let chw = g.c * g.h * g.w;
            Some(zeroed_by_image_chunks(g.n * chw, g.n, threads, |first, chunk| {
                let part = backward_range(grad, x, w, g, first, chunk.len() / chw.max(1), Some(chunk));
                parts.lock().unwrap_or_else(|e| e.into_inner()).push((first, part));
            }))
        }
        None => {
            for_image_ranges(g.n, threads, |first, count| {
                let part = backward_range(grad, x, w, g, first, count, None);
                parts.lock().unwrap_or_else(|e| e.into_inner()).push((first, part));
            });
            None
        }
    };
    let mut parts = parts.into_inner().unwrap_or_else(|e| e.into_inner());
    parts.sort_by_key(|&(first, _)| first);
    let mut dw: Option<Vec<f32>> = None;
    for p in parts.into_iter().filter_map(|(_, p)| p) {
        match dw.as_mut() {
            Some(d) => d.iter_mut().zip(p).for_each(|(d, v)| *d += v),
            None => dw = Some(p),
        }
    }
    (dx, dw)
}
