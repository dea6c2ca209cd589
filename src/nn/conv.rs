//! 2-D convolution as a backend op with a fast CPU path.
//!
//! burn-ndarray 0.21 computes convolutions with direct loops, and its weight gradient is about
//! 50× slower than its forward (11 s for the backward of one 32→32 3×3 layer at 28×28, batch
//! 64, on 2 cores), which made CNN training impractical. [`ConvBackend`] routes our `Conv2d`
//! through an op that NdArray implements as im2col + one GEMM per image and group
//! (the `gemm` crate, single-threaded per call), with an analytic backward:
//! `dW = Σ_n G_n · cols_nᵀ`, `dx = col2im(Wᵀ · G_n)`. Other backends (CUDA) keep burn's conv.
//!
//! Threads: a call splits its images over [`conv_threads`] threads (a per-thread setting,
//! default all cores). The GEMM itself never spawns, so N rollout workers that each set
//! `set_conv_threads(1)` get N-way parallelism instead of fighting over one GEMM thread pool
//! (matrixmultiply's pool is process-global and was the reason two workers gained nothing).

use std::borrow::Cow;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{ConvOptions, FloatTensor, ModuleOps};
use burn::tensor::{Tensor, TensorData, TensorMetadata, TensorPrimitive};

thread_local! {
    static CONV_THREADS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Threads a convolution called from this thread may use (default: all cores).
pub fn conv_threads() -> usize {
    match CONV_THREADS.with(|c| c.get()) {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    }
}

/// Sets [`conv_threads`] for the calling thread; `0` restores the default (all cores).
pub fn set_conv_threads(threads: usize) {
    CONV_THREADS.with(|c| c.set(threads));
}

/// Geometry of one convolution (square kernels' stride/padding, any kernel shape, no dilation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl ConvGeom {
    fn options(self) -> ConvOptions<2> {
        ConvOptions::new([self.stride; 2], [self.padding; 2], [1, 1], self.groups)
    }
}

/// Backends that run [`conv2d_gemm`]. The defaults are burn's own conv ops, so implementing the
/// trait for a backend is one line.
pub trait ConvBackend: Backend {
    fn conv2d_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>, geom: ConvGeom) -> FloatTensor<Self> {
        Self::conv2d(x, weight, None, geom.options())
    }

    /// `(dx, dW)` given the output gradient; `dx` is computed when `weight` is given, `dW` when
    /// `x` is given; `shapes` are the input and weight shapes.
    fn conv2d_backward(
        grad: FloatTensor<Self>,
        x: Option<FloatTensor<Self>>,
        weight: Option<FloatTensor<Self>>,
        shapes: ([usize; 4], [usize; 4]),
        geom: ConvGeom,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        let (xs, ws) = shapes;
        let device = Self::float_device(&grad);
        let zeros = |s: [usize; 4]| Tensor::<Self, 4>::zeros(s, &device).into_primitive().tensor();
        let dx = weight.clone().map(|w| Self::conv2d_x_backward(zeros(xs), w, grad.clone(), geom.options()));
        let dw = x.map(|x| Self::conv2d_weight_backward(x, weight.unwrap_or_else(|| zeros(ws)), grad, geom.options()));
        (dx, dw)
    }
}

/// `conv2d` with PyTorch semantics (weight `[O, C/groups, kh, kw]`, symmetric padding, no
/// dilation), plus an optional bias.
pub fn conv2d_gemm<B: ConvBackend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    stride: usize,
    padding: usize,
    groups: usize,
) -> Tensor<B, 4> {
    let o = weight.dims()[0];
    let geom = ConvGeom { stride, padding, groups };
    let y = B::conv2d_forward(x.into_primitive().tensor(), weight.into_primitive().tensor(), geom);
    let y = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(y));
    match bias {
        Some(b) => y + b.reshape([1, o, 1, 1]),
        None => y,
    }
}

// ---------------------------------------------------------------------------------------------
// Autodiff: the op with its analytic backward
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct ConvBackward;

#[derive(Debug, Clone)]
struct ConvState {
    x: Option<NodeId>,
    weight: Option<NodeId>,
    shapes: ([usize; 4], [usize; 4]),
    geom: ConvGeom,
}

impl<B: ConvBackend> Backward<B, 2> for ConvBackward {
    type State = ConvState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let st = ops.state;
        let x: Option<FloatTensor<B>> = st.x.map(|id| checkpointer.retrieve_node_output(id));
        let w: Option<FloatTensor<B>> = st.weight.map(|id| checkpointer.retrieve_node_output(id));
        let (dx, dw) = B::conv2d_backward(grad, x, w, st.shapes, st.geom);
        if let (Some(node), Some(g)) = (node_x, dx) {
            grads.register::<B>(node.id, g);
        }
        if let (Some(node), Some(g)) = (node_w, dw) {
            grads.register::<B>(node.id, g);
        }
    }
}

impl<B: ConvBackend, C: CheckpointStrategy> ConvBackend for Autodiff<B, C> {
    fn conv2d_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>, geom: ConvGeom) -> FloatTensor<Self> {
        let shapes = (dims4(&x.primitive), dims4(&weight.primitive));
        match ConvBackward.prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_needs = !x.node.requirement.is_none();
                let w_needs = !weight.node.requirement.is_none();
                // dW needs x, dx needs W.
                let state = ConvState {
                    x: w_needs.then(|| prep.checkpoint(&x)),
                    weight: x_needs.then(|| prep.checkpoint(&weight)),
                    shapes,
                    geom,
                };
                prep.finish(state, B::conv2d_forward(x.primitive, weight.primitive, geom))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::conv2d_forward(x.primitive, weight.primitive, geom)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA: burn's own conv kernels (forward and both backward ops stay on the device)
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "cuda")]
impl ConvBackend for crate::device::Cuda {}

// ---------------------------------------------------------------------------------------------
// NdArray: im2col + GEMM
// ---------------------------------------------------------------------------------------------

impl ConvBackend for NdArray<f32> {
    fn conv2d_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>, geom: ConvGeom) -> FloatTensor<Self> {
        let (xd, wd) = (dims4(&x), dims4(&weight));
        let (Some(xs), Some(ws)) = (host_f32(&x), host_f32(&weight)) else {
            return Self::conv2d(x, weight, None, geom.options());
        };
        let g = Geometry::new(xd, wd, geom);
        let out = cpu::forward(&xs, &ws, &g);
        NdArrayTensor::from_data(TensorData::new(out, [g.n, g.o, g.ho, g.wo]))
    }

    fn conv2d_backward(
        grad: FloatTensor<Self>,
        x: Option<FloatTensor<Self>>,
        weight: Option<FloatTensor<Self>>,
        shapes: ([usize; 4], [usize; 4]),
        geom: ConvGeom,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        let g = Geometry::new(shapes.0, shapes.1, geom);
        let gs = host_f32(&grad).expect("conv2d gradient is f32");
        let xs = x.as_ref().and_then(host_f32);
        let ws = weight.as_ref().and_then(host_f32);
        let (dx, dw) = cpu::backward(&gs, xs.as_deref(), ws.as_deref(), &g);
        (
            dx.map(|v| NdArrayTensor::from_data(TensorData::new(v, shapes.0))),
            dw.map(|v| NdArrayTensor::from_data(TensorData::new(v, shapes.1))),
        )
    }
}

fn dims4<T: TensorMetadata>(t: &T) -> [usize; 4] {
    let s = t.shape();
    [s[0], s[1], s[2], s[3]]
}

/// Row-major f32 data of an NdArray tensor: borrowed when contiguous, else copied.
pub(crate) fn host_f32(t: &NdArrayTensor) -> Option<Cow<'_, [f32]>> {
    let NdArrayTensor::F32(s) = t else { return None };
    let v = s.view();
    Some(match v.to_slice() {
        Some(sl) => Cow::Borrowed(sl),
        None => Cow::Owned(v.iter().copied().collect()),
    })
}

/// Sizes of one convolution, per group.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    s: usize,
    p: usize,
    groups: usize,
}

impl Geometry {
    fn new(x: [usize; 4], w: [usize; 4], geom: ConvGeom) -> Self {
        let [n, c, h, wi] = x;
        let [o, _, kh, kw] = w;
        let (s, p) = (geom.stride, geom.padding);
        Self { n, c, h, w: wi, o, kh, kw, ho: (h + 2 * p - kh) / s + 1, wo: (wi + 2 * p - kw) / s + 1, s, p, groups: geom.groups }
    }
    fn cg(&self) -> usize {
        self.c / self.groups
    }
    fn og(&self) -> usize {
        self.o / self.groups
    }
    /// Rows of the column matrix per group.
    fn k(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    fn pixels(&self) -> usize {
        self.ho * self.wo
    }
}

mod cpu {
    use super::Geometry;

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

    /// How many threads a call over `images` images of `macs_per_image` MACs uses: the
    /// caller's [`super::conv_threads`], fewer when the work is too small to pay for a spawn.
    fn split(images: usize, macs_per_image: usize) -> usize {
        // About 0.5 ms of work per thread at least (a spawn costs tens of microseconds).
        const MIN_MACS_PER_THREAD: usize = 1 << 21;
        let by_work = (images * macs_per_image / MIN_MACS_PER_THREAD).max(1);
        super::conv_threads().min(images).min(by_work).max(1)
    }

    /// Runs `f(first_image, images)` over `threads` contiguous image ranges, the first on the
    /// calling thread.
    fn for_image_ranges<R: Send>(n: usize, threads: usize, f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
        let ranges: Vec<(usize, usize)> =
            (0..threads).map(|t| (t * n / threads, (t + 1) * n / threads)).filter(|(a, b)| b > a).collect();
        if ranges.len() <= 1 {
            return vec![f(0, n)];
        }
        std::thread::scope(|scope| {
            let f = &f;
            let handles: Vec<_> =
                ranges[1..].iter().map(|&(a, b)| scope.spawn(move || f(a, b - a))).collect();
            let mut out = vec![f(ranges[0].0, ranges[0].1 - ranges[0].0)];
            out.extend(handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))));
            out
        })
    }

    /// Output of images `first..first + count`, `[count, O, Ho, Wo]`.
    fn forward_range(x: &[f32], w: &[f32], g: &Geometry, first: usize, count: usize) -> Vec<f32> {
        let (k, pix, og) = (g.k(), g.pixels(), g.og());
        let mut out = vec![0.0f32; count * g.o * pix];
        let mut cols = vec![0.0f32; k * pix];
        for i in 0..count {
            for grp in 0..g.groups {
                im2col(x, g, first + i, grp, &mut cols);
                let wg = &w[grp * og * k..][..og * k];
                let dst = &mut out[(i * g.o + grp * og) * pix..][..og * pix];
                gemm(og, k, pix, wg, (k, 1), &cols, (pix, 1), false, dst);
            }
        }
        out
    }

    pub fn forward(x: &[f32], w: &[f32], g: &Geometry) -> Vec<f32> {
        let threads = split(g.n, g.o * g.k() * g.pixels());
        let parts = for_image_ranges(g.n, threads, |first, count| forward_range(x, w, g, first, count));
        if parts.len() == 1 {
            return parts.into_iter().next().unwrap_or_default();
        }
        parts.concat()
    }

    /// `(dx of images first..first+count, this range's share of dW)`.
    fn backward_range(
        grad: &[f32],
        x: Option<&[f32]>,
        w: Option<&[f32]>,
        g: &Geometry,
        first: usize,
        count: usize,
    ) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        let (k, pix, og) = (g.k(), g.pixels(), g.og());
        let mut dw = x.map(|_| vec![0.0f32; g.o * k]);
        let mut dx = w.map(|_| vec![0.0f32; count * g.c * g.h * g.w]);
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
        (dx, dw)
    }

    pub fn backward(grad: &[f32], x: Option<&[f32]>, w: Option<&[f32]>, g: &Geometry) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        let threads = split(g.n, 2 * g.o * g.k() * g.pixels());
        let parts = for_image_ranges(g.n, threads, |first, count| backward_range(grad, x, w, g, first, count));
        let mut dx: Option<Vec<f32>> = None;
        let mut dw: Option<Vec<f32>> = None;
        for (pdx, pdw) in parts {
            if let Some(p) = pdx {
                match dx.as_mut() {
                    Some(d) => d.extend(p),
                    None => dx = Some(p),
                }
            }
            if let Some(p) = pdw {
                match dw.as_mut() {
                    Some(d) => d.iter_mut().zip(p).for_each(|(d, v)| *d += v),
                    None => dw = Some(p),
                }
            }
        }
        (dx, dw)
    }
}
