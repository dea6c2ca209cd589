//! Host FFT implementation of the filter and of its gradients.
//!
//! Two real planes (channels `2q` and `2q+1` of one batch item) travel as one complex plane
//! `z = x_a + i x_b`: one complex 2-D FFT gives both half spectra (`X_a = (Z + conj Z~)/2`,
//! `X_b = (Z - conj Z~)/2i` with `Z~[k,l] = Z[-k,-l]`), and one inverse complex 2-D FFT of
//! `V = Y_a + i Y_b` gives both outputs (`y_a = Re v`, `y_b = Im v`), where `Y_a` is the
//! Hermitian extension of the filtered half spectrum that `irfft2` implies: columns `0` and
//! (even `W`) `W/2` symmetrised over `k`, `Y[-k,-l] = conj Y[k,l]` for the others. The
//! transforms of one batch item run as one batched `rustfft` call per direction and axis (rows,
//! then columns after a transpose). O(HW log HW) per plane.

use super::FilterLayout;
use super::{Arc, HashMap, Mutex, OnceLock};
use rustfft::num_complex::Complex;
use rustfft::num_traits::Zero;
use rustfft::{Fft, FftNum, FftPlanner};
use std::ops::Range;

/// Plans per `(H, W)` grid.
pub(super) type PlanCache<T> = Mutex<HashMap<(usize, usize), Arc<Plan<T>>>>;

/// Work buffers kept between calls (fresh large allocations cost page faults).
pub(super) type BufferPool<T> = Mutex<Vec<Vec<Complex<T>>>>;

/// FFT element types, each with its own plan cache and buffer pool.
pub(super) trait Real: FftNum {
    fn plan_cache() -> &'static PlanCache<Self>;
    fn buffer_pool() -> &'static BufferPool<Self>;
}

impl Real for f32 {
    fn plan_cache() -> &'static PlanCache<Self> {
        static CACHE: OnceLock<PlanCache<f32>> = OnceLock::new();
        CACHE.get_or_init(Default::default)
    }

    fn buffer_pool() -> &'static BufferPool<Self> {
        static POOL: OnceLock<BufferPool<f32>> = OnceLock::new();
        POOL.get_or_init(Default::default)
    }
}

impl Real for f64 {
    fn plan_cache() -> &'static PlanCache<Self> {
        static CACHE: OnceLock<PlanCache<f64>> = OnceLock::new();
        CACHE.get_or_init(Default::default)
    }

    fn buffer_pool() -> &'static BufferPool<Self> {
        static POOL: OnceLock<BufferPool<f64>> = OnceLock::new();
        POOL.get_or_init(Default::default)
    }
}

/// Shape of the batch and the memory layout of its planes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub layout: FilterLayout,
}

impl Geom {
    pub fn new(dims: [usize; 4], layout: FilterLayout) -> Self {
        let (n, c, h, w) = layout.ncwh(dims);
        Self { n, c, h, w, layout }
    }

    fn wf(&self) -> usize {
        self.w / 2 + 1
    }

    fn hw(&self) -> usize {
        self.h * self.w
    }

    /// Elements per batch item.
    fn per_item(&self) -> usize {
        self.c * self.hw()
    }

    /// Channel pairs per batch item (the last one half empty for odd `C`).
    fn pairs(&self) -> usize {
        self.c.div_ceil(2)
    }

    /// Index of the real part of weight `(k, l, c)`; the imaginary part follows.
    fn weight_index(&self, k: usize, l: usize, c: usize) -> usize {
        let wf = self.wf();
        2 * match self.layout {
            FilterLayout::Nhwc => (k * wf + l) * self.c + c,
            FilterLayout::Nchw => (c * self.h + k) * wf + l,
        }
    }

    /// Hermitian weight of column `l` in the inverse real FFT.
    fn hermitian_weight(&self, l: usize) -> f64 {
        if self.self_mirrored(l) { 1.0 } else { 2.0 }
    }

    /// Column `l` is its own mirror `-l mod W`: the DC column and, for even `W`, `W/2`.
    fn self_mirrored(&self, l: usize) -> bool {
        l == 0 || 2 * l == self.w
    }
}

/// FFT plans for one `H x W` grid.
pub(super) struct Plan<T: FftNum> {
    row_fwd: Arc<dyn Fft<T>>,
    row_inv: Arc<dyn Fft<T>>,
    col_fwd: Arc<dyn Fft<T>>,
    col_inv: Arc<dyn Fft<T>>,
    scratch: usize,
}

fn plan<T: Real>(h: usize, w: usize) -> Arc<Plan<T>> {
    let mut cache = T::plan_cache().lock().unwrap_or_else(|e| e.into_inner());
    cache
        .entry((h, w))
        .or_insert_with(|| {
            let mut planner = FftPlanner::<T>::new();
            let row_fwd = planner.plan_fft_forward(w);
            let row_inv = planner.plan_fft_inverse(w);
            let col_fwd = planner.plan_fft_forward(h);
            let col_inv = planner.plan_fft_inverse(h);
            let scratch = [&row_fwd, &row_inv, &col_fwd, &col_inv]
                .iter()
                .map(|f| f.get_inplace_scratch_len())
                .max()
                .unwrap_or(0);
            Arc::new(Plan {
                row_fwd,
                row_inv,
                col_fwd,
                col_inv,
                scratch,
            })
        })
        .clone()
}

/// `-i mod n` for `i < n`, without a division.
#[inline]
fn mirror(i: usize, n: usize) -> usize {
    if i == 0 { 0 } else { n - i }
}

fn half<T: FftNum>() -> T {
    T::from_f64(0.5).expect("0.5")
}

/// `i * v`.
fn times_i<T: FftNum>(v: Complex<T>) -> Complex<T> {
    Complex::new(-v.im, v.re)
}

/// The two half-spectrum values at `(k, l)` packed in `z1 = Z[k,l]` with `z2 = Z[-k,-l]`.
fn split<T: FftNum>(z1: Complex<T>, z2: Complex<T>) -> (Complex<T>, Complex<T>) {
    let h = half::<T>();
    let c2 = z2.conj();
    // X_a = (z1 + conj z2) / 2, X_b = (z1 - conj z2) / 2i = -i (z1 - conj z2) / 2.
    ((z1 + c2) * h, times_i(c2 - z1) * h)
}

/// Per-thread buffers: the packed planes of one item (`a`, `[q][h][w]`) and their spectra
/// (`b`, `b2`, `[q][l][k]`).
struct Work<T: Real> {
    a: Vec<Complex<T>>,
    b: Vec<Complex<T>>,
    b2: Vec<Complex<T>>,
    scratch: Vec<Complex<T>>,
}

/// A buffer of `len` elements from the pool (contents unspecified: every user overwrites
/// it completely before reading).
fn take_buffer<T: Real>(len: usize) -> Vec<Complex<T>> {
    let pooled = {
        let mut pool = T::buffer_pool().lock().unwrap_or_else(|e| e.into_inner());
        let best = (0..pool.len()).find(|&i| pool[i].capacity() >= len);
        best.map(|i| pool.swap_remove(i))
    };
    let mut v = pooled.unwrap_or_default();
    v.resize(len, Complex::zero());
    v
}

fn return_buffer<T: Real>(v: Vec<Complex<T>>) {
    const KEEP: usize = 8;
    if v.capacity() == 0 {
        return;
    }
    let mut pool = T::buffer_pool().lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < KEEP {
        pool.push(v);
    }
}

impl<T: Real> Work<T> {
    fn new(p: &Plan<T>, g: Geom, second: bool) -> Self {
        let len = g.pairs() * g.hw();
        Work {
            a: take_buffer(len),
            b: take_buffer(len),
            b2: take_buffer(if second { len } else { 0 }),
            scratch: vec![Complex::zero(); p.scratch],
        }
    }
}

impl<T: Real> Drop for Work<T> {
    fn drop(&mut self) {
        return_buffer(std::mem::take(&mut self.a));
        return_buffer(std::mem::take(&mut self.b));
        return_buffer(std::mem::take(&mut self.b2));
    }
}

impl<T: FftNum> Plan<T> {
    /// Full 2-D spectra of the channel pairs of one item, into `b` (`[q][l][k]`).
    fn forward_item(
        &self,
        g: Geom,
        item: &[T],
        a: &mut [Complex<T>],
        b: &mut [Complex<T>],
        scratch: &mut [Complex<T>],
    ) {
        let (h, w, hw, c) = (g.h, g.w, g.hw(), g.c);
        // Pack: a[q][h][w] = x[2q] + i x[2q+1].
        match g.layout {
            FilterLayout::Nhwc => {
                for (p, px) in item.chunks_exact(c).enumerate() {
                    let pairs = px.chunks_exact(2);
                    if let [re] = pairs.remainder() {
                        a[(c / 2) * hw + p] = Complex::new(*re, T::zero());
                    }
                    for (q, pair) in pairs.enumerate() {
                        a[q * hw + p] = Complex::new(pair[0], pair[1]);
                    }
                }
            }
            FilterLayout::Nchw => {
                for (q, planes) in item.chunks(2 * hw).enumerate() {
                    let (pa, pb) = planes.split_at(hw);
                    let dst = &mut a[q * hw..(q + 1) * hw];
                    if pb.is_empty() {
                        for (d, &re) in dst.iter_mut().zip(pa) {
                            *d = Complex::new(re, T::zero());
                        }
                    } else {
                        for ((d, &re), &im) in dst.iter_mut().zip(pa).zip(pb) {
                            *d = Complex::new(re, im);
                        }
                    }
                }
            }
        }
        let n = self.row_fwd.get_inplace_scratch_len();
        self.row_fwd.process_with_scratch(a, &mut scratch[..n]);
        // Transpose each plane [h][w] -> [w][h].
        for (pa, pb) in a.chunks_exact(hw).zip(b.chunks_exact_mut(hw)) {
            for k in 0..h {
                for l in 0..w {
                    pb[l * h + k] = pa[k * w + l];
                }
            }
        }
        let n = self.col_fwd.get_inplace_scratch_len();
        self.col_fwd.process_with_scratch(b, &mut scratch[..n]);
    }

    /// Inverse of [`Self::forward_item`] (unnormalised): `b` holds `V = Y_a + i Y_b` per pair
    /// (consumed); writes `Re` and `Im` of the result to channels `2q` and `2q+1` of `item`.
    fn inverse_item(
        &self,
        g: Geom,
        b: &mut [Complex<T>],
        a: &mut [Complex<T>],
        item: &mut [T],
        scratch: &mut [Complex<T>],
    ) {
        let (h, w, hw, c) = (g.h, g.w, g.hw(), g.c);
        let n = self.col_inv.get_inplace_scratch_len();
        self.col_inv.process_with_scratch(b, &mut scratch[..n]);
        for (pb, pa) in b.chunks_exact(hw).zip(a.chunks_exact_mut(hw)) {
            for l in 0..w {
                for k in 0..h {
                    pa[k * w + l] = pb[l * h + k];
                }
            }
        }
        let n = self.row_inv.get_inplace_scratch_len();
        self.row_inv.process_with_scratch(a, &mut scratch[..n]);
        match g.layout {
            FilterLayout::Nhwc => {
                for (p, px) in item.chunks_exact_mut(c).enumerate() {
                    let mut pairs = px.chunks_exact_mut(2);
                    for (q, pair) in pairs.by_ref().enumerate() {
                        let v = a[q * hw + p];
                        pair[0] = v.re;
                        pair[1] = v.im;
                    }
                    if let [re] = pairs.into_remainder() {
                        *re = a[(c / 2) * hw + p].re;
                    }
                }
            }
            FilterLayout::Nchw => {
                for (q, planes) in item.chunks_mut(2 * hw).enumerate() {
                    let (pa, pb) = planes.split_at_mut(hw);
                    let src = &a[q * hw..(q + 1) * hw];
                    for (d, v) in pa.iter_mut().zip(src) {
                        *d = v.re;
                    }
                    for (d, v) in pb.iter_mut().zip(src) {
                        *d = v.im;
                    }
                }
            }
        }
    }
}

/// The weights of channel pairs as `P = (w_a + w_b)/2` and `M = (w_a - w_b)/2`,
/// `[pairs][P, M][Wf][H]`, from `[2 * pairs][Wf][H]`: with them the interior of the
/// filtered packed spectrum is `V[k,l] = Z[k,l] P + conj(Z[-k,-l]) M` (see [`filter_item`]).
fn pair_weights<T: FftNum>(wp: &[Complex<T>], plane: usize) -> Vec<Complex<T>> {
    let hlf = half::<T>();
    let mut out = Vec::with_capacity(wp.len());
    for pair in wp.chunks_exact(2 * plane) {
        let (wa, wb) = pair.split_at(plane);
        out.extend(wa.iter().zip(wb).map(|(a, b)| (*a + *b) * hlf));
        out.extend(wa.iter().zip(wb).map(|(a, b)| (*a - *b) * hlf));
    }
    out
}

/// Turns the packed spectra `Z` of one item (in `b`) into `V = Y_a + i Y_b` in place, with
/// `Y = X * w` and the Hermitian extension `irfft2` implies. `pw`: pair weights from
/// [`pair_weights`].
///
/// Interior columns (`l` and its mirror `W-l` distinct): with `X_a = (z1 + conj z2)/2`,
/// `X_b = (z1 - conj z2)/2i` (`z1 = Z[k,l]`, `z2 = Z[-k,-l]`), `V[k,l] = X_a w_a + i X_b w_b
/// = z1 P + conj(z2) M` and `V[-k,-l] = conj(X_a w_a) + i conj(X_b w_b)
/// = conj(conj(z2) P + z1 M)`. Self-mirrored columns (DC, even-`W` Nyquist): `Y` is
/// symmetrised over `k` first, `Y_sym[k] = (Y[k] + conj Y[-k])/2`, which is what dropping
/// the imaginary part after the inverse transform over `H` amounts to.
fn filter_item<T: FftNum>(g: Geom, b: &mut [Complex<T>], pw: &[Complex<T>]) {
    let (h, w, hw, wf) = (g.h, g.w, g.hw(), g.wf());
    let hlf = half::<T>();
    let plane = wf * h;
    for (z, pm) in b.chunks_exact_mut(hw).zip(pw.chunks_exact(2 * plane)) {
        let (wp, wm) = pm.split_at(plane);
        for l in 0..wf {
            let (wpl, wml) = (&wp[l * h..(l + 1) * h], &wm[l * h..(l + 1) * h]);
            if g.self_mirrored(l) {
                // Mirror pairs (k, -k) within the column.
                for k in 0..=h / 2 {
                    let km = mirror(k, h);
                    let (i1, i2) = (l * h + k, l * h + km);
                    let (z1, z2) = (z[i1], z[i2]);
                    let (xa1, xb1) = split(z1, z2);
                    let (xa2, xb2) = split(z2, z1);
                    let (wa1, wb1) = (wpl[k] + wml[k], wpl[k] - wml[k]);
                    let (wa2, wb2) = (wpl[km] + wml[km], wpl[km] - wml[km]);
                    let (ya1, yb1) = (xa1 * wa1, xb1 * wb1);
                    let (ya2, yb2) = (xa2 * wa2, xb2 * wb2);
                    let sa = (ya1 + ya2.conj()) * hlf;
                    let sb = (yb1 + yb2.conj()) * hlf;
                    z[i1] = sa + times_i(sb);
                    z[i2] = sa.conj() + times_i(sb.conj());
                }
            } else {
                let lm = w - l;
                let (col, colm) = {
                    let (lo, hi) = z.split_at_mut(lm * h);
                    (&mut lo[l * h..(l + 1) * h], &mut hi[..h])
                };
                for k in 0..h {
                    let km = mirror(k, h);
                    let z1 = col[k];
                    let z2c = colm[km].conj();
                    col[k] = z1 * wpl[k] + z2c * wml[k];
                    colm[km] = (z2c * wpl[k] + z1 * wml[k]).conj();
                }
            }
        }
    }
}

/// Adds `G_c * conj(X_c)` over the half spectrum of each channel of one item to `acc`
/// (`[C][Wf][H]`), from the packed spectra of the output gradient (`bg`) and the input
/// (`bx`).
fn accumulate_weight_grad<T: FftNum>(
    g: Geom,
    bg: &[Complex<T>],
    bx: &[Complex<T>],
    acc: &mut [Complex<T>],
) {
    let (h, w, hw, wf) = (g.h, g.w, g.hw(), g.wf());
    let plane = wf * h;
    for (q, (zg, zx)) in bg.chunks_exact(hw).zip(bx.chunks_exact(hw)).enumerate() {
        let has_b = 2 * q + 1 < g.c;
        for l in 0..wf {
            let lm = mirror(l, w);
            for k in 0..h {
                let km = mirror(k, h);
                let (i1, i2) = (l * h + k, lm * h + km);
                let (ga, gb) = split(zg[i1], zg[i2]);
                let (xa, xb) = split(zx[i1], zx[i2]);
                let o = l * h + k;
                acc[2 * q * plane + o] = acc[2 * q * plane + o] + ga * xa.conj();
                if has_b {
                    acc[(2 * q + 1) * plane + o] =
                        acc[(2 * q + 1) * plane + o] + gb * xb.conj();
                }
            }
        }
    }
}

/// Threads for `items` batch items of `work` scalar elements in all: at most
/// [`compute_threads`](crate::nn::pool::compute_threads), no more than pay off.
fn threads_for(items: usize, work: usize) -> usize {
    const MIN_WORK_PER_THREAD: usize = 1 << 15;
    crate::nn::pool::compute_threads().min(items).min(work / MIN_WORK_PER_THREAD).max(1)
}

/// Runs `f(items, dst_chunk)` over the batch split into contiguous item ranges, on as many
/// threads as pay; `dst` holds `dst_per_item` elements per item and is split alike. Returns
/// the per-range results in order.
fn for_item_ranges<T: Send, R: Send>(
    g: Geom,
    dst: &mut [T],
    dst_per_item: usize,
    f: impl Fn(Range<usize>, &mut [T]) -> R + Sync,
) -> Vec<R> {
    let nt = threads_for(g.n, g.n * g.per_item());
    if nt <= 1 {
        return vec![f(0..g.n, dst)];
    }
    let items_per = g.n.div_ceil(nt);
    let f = &f;
    let mut tasks = Vec::with_capacity(nt);
    let mut rest = dst;
    let mut start = 0;
    while start < g.n {
        let end = (start + items_per).min(g.n);
        let (head, tail) = rest.split_at_mut((end - start) * dst_per_item);
        rest = tail;
        tasks.push(move || f(start..end, head));
        start = end;
    }
    crate::nn::pool::join_all(tasks)
}

/// Packs the weight (layout per `g`) into `[2 * pairs][Wf][H]` complex (a zero channel pads
/// odd `C`), times `scale`, conjugated when asked.
fn pack_weight<T: FftNum>(w: &[T], g: Geom, scale: f64, conj: bool) -> Vec<Complex<T>> {
    assert_eq!(
        w.len(),
        g.c * g.h * g.wf() * 2,
        "global filter: weight size"
    );
    let (h, wf) = (g.h, g.wf());
    let s = T::from_f64(scale).expect("scale");
    let mut out = vec![Complex::zero(); 2 * g.pairs() * wf * h];
    for c in 0..g.c {
        for l in 0..wf {
            for k in 0..h {
                let i = g.weight_index(k, l, c);
                let im = if conj { -w[i + 1] } else { w[i + 1] };
                out[(c * wf + l) * h + k] = Complex::new(w[i] * s, im * s);
            }
        }
    }
    out
}

/// The filter `irfft2(rfft2(x) * w)` (orthonormal), or with `conj(w)` when `conj` (the input
/// gradient). Returns the output in `x`'s layout.
pub(super) fn forward<T: Real>(x: &[T], w: &[T], g: Geom, conj: bool) -> Vec<T> {
    let per = g.per_item();
    assert_eq!(x.len(), g.n * per, "global filter: input size");
    let p = plan::<T>(g.h, g.w);
    let pw = pair_weights(&pack_weight(w, g, 1.0 / g.hw() as f64, conj), g.wf() * g.h);
    let mut y = vec![T::zero(); x.len()];
    for_item_ranges(g, &mut y, per, |items, ys| {
        let Work { a, b, scratch, .. } = &mut Work::new(&p, g, false);
        let xs = &x[items.start * per..items.end * per];
        for (xi, yi) in xs.chunks_exact(per).zip(ys.chunks_exact_mut(per)) {
            p.forward_item(g, xi, a, b, scratch);
            filter_item(g, b, &pw);
            p.inverse_item(g, b, a, yi, scratch);
        }
    });
    y
}

/// Both gradients from one transform of the output gradient `gr` per plane: the input
/// gradient `irfft2(F(gr) * conj(w))` when `w` is given, and the weight gradient
/// `sum_n c_l * F(gr) * conj(F(x))` (orthonormal `F`, weight layout of `g`) when `x` is given.
pub(super) fn backward<T: Real>(
    gr: &[T],
    x: Option<&[T]>,
    w: Option<&[T]>,
    g: Geom,
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let per = g.per_item();
    assert_eq!(gr.len(), g.n * per, "global filter: gradient size");
    if let Some(x) = x {
        assert_eq!(x.len(), gr.len(), "global filter: input size");
    }
    let p = plan::<T>(g.h, g.w);
    let plane = g.wf() * g.h;
    let wp = w.map(|w| pair_weights(&pack_weight(w, g, 1.0 / g.hw() as f64, true), plane));
    let mut gx = vec![T::zero(); if wp.is_some() { gr.len() } else { 0 }];
    let gx_per_item = if wp.is_some() { per } else { 0 };
    // Each item range accumulates its own `[C][Wf][H]` weight gradient; summed afterwards.
    let partials = for_item_ranges(g, &mut gx, gx_per_item, |items, gx_out| {
        let mut acc = vec![Complex::<T>::zero(); if x.is_some() { g.c * plane } else { 0 }];
        let Work { a, b, b2, scratch } = &mut Work::new(&p, g, x.is_some());
        for (i, item) in items.enumerate() {
            let span = item * per..(item + 1) * per;
            p.forward_item(g, &gr[span.clone()], a, b, scratch);
            if let Some(x) = x {
                p.forward_item(g, &x[span], a, b2, scratch);
                accumulate_weight_grad(g, b, b2, &mut acc);
            }
            if let Some(wp) = &wp {
                filter_item(g, b, wp);
                p.inverse_item(g, b, a, &mut gx_out[i * per..(i + 1) * per], scratch);
            }
        }
        acc
    });
    let gw = x.map(|_| {
        let mut acc = vec![Complex::<T>::zero(); g.c * plane];
        for part in partials {
            for (a, b) in acc.iter_mut().zip(part) {
                *a = *a + b;
            }
        }
        let mut out = vec![T::zero(); g.c * plane * 2];
        let scale = 1.0 / g.hw() as f64;
        for c in 0..g.c {
            for l in 0..g.wf() {
                let s = T::from_f64(scale * g.hermitian_weight(l)).expect("scale");
                for k in 0..g.h {
                    let v = acc[c * plane + l * g.h + k];
                    let i = g.weight_index(k, l, c);
                    out[i] = v.re * s;
                    out[i + 1] = v.im * s;
                }
            }
        }
        out
    });
    (wp.map(|_| gx), gw)
}
