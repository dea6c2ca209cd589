//! The CPU kernel of stride-1 depthwise convolutions (`groups = C_in = C_out`), HorNet's 7×7
//! spatial mixer among them, forward and backward.
//!
//! Through im2col a depthwise convolution is one GEMM per channel with a single output row:
//! `[1 × kh·kw]·[kh·kw × H·W]`, after writing `kh·kw` shifted copies of the plane. On
//! HorNet-T that spent more time in copies, page faults and tiny GEMMs than in arithmetic.
//! Here each plane is copied once into a zero-padded buffer that stays in the L1 cache, and
//! every output row is computed in blocks of 8–32 columns held in registers, with one
//! broadcast weight per tap: `y[r, c..c+B] += w[i, j]·x_pad[r + i, c + j..c + j + B]`.
//!
//! Backward: `dx` is the same kernel on `dy` with the kernel flipped and padding `k − 1 − p`;
//! `dw[i, j] = Σ_n Σ_{r,c} dy[r, c]·x_pad[r + i, c + j]`, accumulated in 8 lanes per tap. Planes
//! (forward, `dx`) or channels (`dw`) are split over threads.

use super::conv::{for_image_chunks, zeroed_by_image_chunks};
use super::pool::compute_threads;

/// Sizes of a depthwise convolution: `n` images of `c` planes `h × w`, kernel `kh × kw`,
/// zero padding `p` on every side, stride 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depthwise {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub p: usize,
}

impl Depthwise {
    pub fn ho(&self) -> usize {
        self.h + 2 * self.p + 1 - self.kh
    }

    pub fn wo(&self) -> usize {
        self.w + 2 * self.p + 1 - self.kw
    }

    /// Whether the kernel handles this geometry: a square kernel, a non-empty output, and
    /// padding below the kernel size (so that the input gradient is a convolution with the
    /// same padding `k − 1 − p` on both axes).
    pub fn supported(&self) -> bool {
        self.kh == self.kw && self.h + 2 * self.p >= self.kh && self.w + 2 * self.p >= self.kw && self.p < self.kh
    }

    fn taps(&self) -> usize {
        self.kh * self.kw
    }
}

/// Threads for `work` multiply-adds over `items` independent items (≥ ~1 ms each).
fn threads(items: usize, work: usize) -> usize {
    compute_threads().min(work >> 21).clamp(1, items.max(1))
}

/// A plane's zero-padded copy: `p` rows above and below, `p` columns left, and on the right
/// enough zero columns that a block of `B` columns starting at any output column `< wo` reads
/// inside the row.
struct Padded {
    buf: Vec<f32>,
    /// Row stride.
    stride: usize,
    p: usize,
    h: usize,
    w: usize,
}

/// Output columns rounded up to whole blocks of `block`.
fn round_up(v: usize, block: usize) -> usize {
    v.div_ceil(block) * block
}

impl Padded {
    fn new(h: usize, w: usize, p: usize, kw: usize, block: usize) -> Self {
        let wo = w + 2 * p + 1 - kw;
        let stride = round_up(wo, block) + kw - 1;
        Self { buf: vec![0.0; (h + 2 * p) * stride], stride, p, h, w }
    }

    /// Writes `plane` (`h × w`) into the interior; the border was zeroed once and stays zero.
    fn load(&mut self, plane: &[f32]) {
        for (y, row) in plane.chunks_exact(self.w).take(self.h).enumerate() {
            self.buf[(y + self.p) * self.stride + self.p..][..self.w].copy_from_slice(row);
        }
    }
}

/// Block width for output rows of `wo` columns: wide blocks reuse each broadcast weight over
/// more columns, narrow ones waste less on short rows (HorNet's last stage is 7 wide).
fn block_for(wo: usize) -> usize {
    match wo {
        0..=8 => 8,
        9..=24 => 16,
        _ => 32,
    }
}

/// One output plane `out` (`ho × wo`) from a padded input plane and one channel's kernel `k`.
fn plane<const B: usize>(src: &Padded, k: &[f32], kh: usize, kw: usize, ho: usize, wo: usize, out: &mut [f32]) {
    let s = src.stride;
    for r in 0..ho {
        let orow = &mut out[r * wo..][..wo];
        for c0 in (0..wo).step_by(B) {
            let mut acc = [0.0f32; B];
            for i in 0..kh {
                let base = &src.buf[(r + i) * s + c0..];
                for j in 0..kw {
                    let wv = k[i * kw + j];
                    let xs = &base[j..j + B];
                    for l in 0..B {
                        acc[l] = wv.mul_add(xs[l], acc[l]);
                    }
                }
            }
            let n = B.min(wo - c0);
            orow[c0..c0 + n].copy_from_slice(&acc[..n]);
        }
    }
}

/// Planes `[first, first + out.len()/plane)` of a stride-1 depthwise convolution of `x`
/// (`planes × h × w`) with per-plane kernels `k(plane)`.
#[allow(clippy::too_many_arguments)]
fn planes_range(x: &[f32], kernel: &dyn Fn(usize) -> [usize; 2], kernels: &[f32], h: usize, w: usize, kh: usize, kw: usize, p: usize, first: usize, out: &mut [f32]) {
    let (ho, wo) = (h + 2 * p + 1 - kh, w + 2 * p + 1 - kw);
    let block = block_for(wo);
    let mut pad = Padded::new(h, w, p, kw, block);
    for (i, o) in out.chunks_exact_mut((ho * wo).max(1)).enumerate() {
        let idx = first + i;
        pad.load(&x[idx * h * w..][..h * w]);
        let [at, len] = kernel(idx);
        let k = &kernels[at..][..len];
        match block {
            8 => plane::<8>(&pad, k, kh, kw, ho, wo, o),
            16 => plane::<16>(&pad, k, kh, kw, ho, wo, o),
            _ => plane::<32>(&pad, k, kh, kw, ho, wo, o),
        }
    }
}

/// `y = depthwise_conv(x, w)`: `x` `[n, c, h, w]`, `w` `[c, 1, kh, kw]`; `[n, c, ho, wo]`.
pub fn forward(x: &[f32], w: &[f32], g: &Depthwise) -> Vec<f32> {
    forward_then(x, w, g, |_, _| {})
}

/// [`forward`], then `then(plane_index, plane)` on every output plane by the thread that
/// computed it (the bias and activation of the layer, while the plane is in cache).
pub fn forward_then(x: &[f32], w: &[f32], g: &Depthwise, then: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let (ho, wo) = (g.ho(), g.wo());
    let planes = g.n * g.c;
    let taps = g.taps();
    let kernel = |idx: usize| [(idx % g.c) * taps, taps];
    let t = threads(planes, planes * ho * wo * taps);
    zeroed_by_image_chunks(planes * ho * wo, planes, t, |first, out| {
        planes_range(x, &kernel, w, g.h, g.w, g.kh, g.kw, g.p, first, out);
        for (i, plane) in out.chunks_exact_mut((ho * wo).max(1)).enumerate() {
            then(first + i, plane);
        }
    })
}

/// `dx` from `dy` (`[n, c, ho, wo]`): the convolution of `dy` with the flipped kernels and
/// padding `k − 1 − p`, which gives back `h × w` planes.
pub fn grad_input(dy: &[f32], w: &[f32], g: &Depthwise) -> Vec<f32> {
    let (ho, wo) = (g.ho(), g.wo());
    let taps = g.taps();
    let flipped: Vec<f32> = w.chunks_exact(taps).flat_map(|k| k.iter().rev().copied().collect::<Vec<_>>()).collect();
    let planes = g.n * g.c;
    let kernel = |idx: usize| [(idx % g.c) * taps, taps];
    let t = threads(planes, planes * g.h * g.w * taps);
    zeroed_by_image_chunks(planes * g.h * g.w, planes, t, |first, out| planes_range(dy, &kernel, &flipped, ho, wo, g.kh, g.kw, g.kh - 1 - g.p, first, out))
}

/// `dw` `[c, 1, kh, kw]` from `dy` and `x`.
pub fn grad_weight(dy: &[f32], x: &[f32], g: &Depthwise) -> Vec<f32> {
    let (ho, wo) = (g.ho(), g.wo());
    let taps = g.taps();
    let mut dw = vec![0.0f32; g.c * taps];
    let t = threads(g.c, g.n * g.c * ho * wo * taps);
    for_image_chunks(&mut dw, g.c, t, |first, out| {
        let mut pad = Padded::new(g.h, g.w, g.p, g.kw, 8);
        let row8 = round_up(wo, 8);
        let mut dyrow = vec![0.0f32; row8];
        for (ci, dwc) in out.chunks_exact_mut(taps).enumerate() {
            let ch = first + ci;
            let mut acc = vec![[0.0f32; 8]; taps];
            for img in 0..g.n {
                let plane = (img * g.c + ch) * g.h * g.w;
                pad.load(&x[plane..][..g.h * g.w]);
                let dyp = &dy[(img * g.c + ch) * ho * wo..][..ho * wo];
                for r in 0..ho {
                    // The row's tail beyond `wo` stays zero, so whole blocks add nothing extra.
                    dyrow[..wo].copy_from_slice(&dyp[r * wo..][..wo]);
                    for i in 0..g.kh {
                        let base = &pad.buf[(r + i) * pad.stride..];
                        for j in 0..g.kw {
                            let a = &mut acc[i * g.kw + j];
                            for c0 in (0..row8).step_by(8) {
                                let xs = &base[c0 + j..c0 + j + 8];
                                let ds = &dyrow[c0..c0 + 8];
                                for l in 0..8 {
                                    a[l] = ds[l].mul_add(xs[l], a[l]);
                                }
                            }
                        }
                    }
                }
            }
            for (d, a) in dwc.iter_mut().zip(&acc) {
                *d = a.iter().sum();
            }
        }
    });
    dw
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct sums in f64, the definition.
    fn reference(x: &[f32], w: &[f32], g: &Depthwise) -> Vec<f64> {
        let (ho, wo) = (g.ho(), g.wo());
        let mut y = vec![0.0f64; g.n * g.c * ho * wo];
        for n in 0..g.n {
            for c in 0..g.c {
                for r in 0..ho {
                    for col in 0..wo {
                        let mut s = 0.0f64;
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let (yy, xx) = ((r + i) as isize - g.p as isize, (col + j) as isize - g.p as isize);
                                if yy >= 0 && xx >= 0 && (yy as usize) < g.h && (xx as usize) < g.w {
                                    s += w[(c * g.kh + i) * g.kw + j] as f64 * x[((n * g.c + c) * g.h + yy as usize) * g.w + xx as usize] as f64;
                                }
                            }
                        }
                        y[((n * g.c + c) * ho + r) * wo + col] = s;
                    }
                }
            }
        }
        y
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0).collect()
    }

    /// Forward, `dx` and `dw` against the definition (the gradients as the adjoint of the
    /// forward: `⟨dy, conv(x)⟩` differentiated by hand in f64), on widths that use each block
    /// size, a partial last block, and padding smaller than the kernel's half.
    #[test]
    fn forward_and_gradients_match_the_definition() {
        for g in [
            Depthwise { n: 2, c: 3, h: 9, w: 7, kh: 7, kw: 7, p: 3 },
            Depthwise { n: 1, c: 2, h: 20, w: 21, kh: 3, kw: 3, p: 1 },
            Depthwise { n: 2, c: 2, h: 6, w: 40, kh: 5, kw: 5, p: 1 },
            Depthwise { n: 1, c: 1, h: 4, w: 4, kh: 3, kw: 3, p: 0 },
        ] {
            let x = values(g.n * g.c * g.h * g.w, 1);
            let w = values(g.c * g.kh * g.kw, 2);
            let dy = values(g.n * g.c * g.ho() * g.wo(), 3);
            let want = reference(&x, &w, &g);
            let got = forward(&x, &w, &g);
            let err = got.iter().zip(&want).fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
            assert!(err < 1e-5, "forward {g:?}: {err}");
            // <dy, y(x)> is linear in x and in w: its gradient entries are the differences
            // between the reference with a unit perturbation and without.
            let dot = |y: &[f64]| y.iter().zip(&dy).map(|(&a, &b)| a * b as f64).sum::<f64>();
            let base = dot(&want);
            let dx = grad_input(&dy, &w, &g);
            for k in (0..x.len()).step_by(5) {
                let mut xp = x.clone();
                xp[k] += 1.0;
                let num = dot(&reference(&xp, &w, &g)) - base;
                assert!((num - dx[k] as f64).abs() < 1e-4, "dx[{k}] {g:?}: {num} vs {}", dx[k]);
            }
            let dw = grad_weight(&dy, &x, &g);
            for k in 0..w.len() {
                let mut wp = w.clone();
                wp[k] += 1.0;
                let num = dot(&reference(&x, &wp, &g)) - base;
                assert!((num - dw[k] as f64).abs() < 1e-3, "dw[{k}] {g:?}: {num} vs {}", dw[k]);
            }
        }
    }
}
