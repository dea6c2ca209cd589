//! The global filter layer of GFNet and HorNet: a learnable complex filter applied in the 2-D
//! Fourier domain,
//!
//! ```text
//! y = irfft2(rfft2(x, norm='ortho') * w, s=(H, W), norm='ortho')
//! ```
//!
//! over the two spatial axes, with `w` holding `H x (W/2+1)` complex values per channel.
//!
//! Three implementations sit behind one API:
//!
//! * an FFT path on the CPU, used by [`NdArray`]: `rustfft` plans cached per grid, two real
//!   channels packed into one complex plane (the classic two-for-one real FFT), all transforms
//!   of a batch item in one batched call per axis and direction, O(HW log HW) per plane; the
//!   batch is split over the cores when that pays (at most `nn::pool::compute_threads`).
//!   The DFT-by-matmul path below was measured slower on the CPU at every grid tried (7x7 to
//!   56x56, forward and backward), so the CPU always takes the FFT path;
//! * a custom autodiff op for [`Autodiff<B>`] with an analytic backward (see below), whatever `B`
//!   computes the forward with;
//! * a generic path built from tensor ops ([`global_filter_dft`]: real DFT matrices and matmuls),
//!   exact for any grid and differentiable through burn's autodiff; it is also the default
//!   implementation of [`SpectralBackend`], so any burn backend (CUDA included) gets the layer.
//!
//! # Backward
//!
//! Write `F` for the orthonormal `rfft2` (half spectrum, `Wf = W/2+1` columns) and `c_l` for the
//! Hermitian weight of column `l` in the inverse real FFT: `c_l = 1` for `l = 0` and, when `W` is
//! even, for `l = W/2`; `c_l = 2` otherwise. What `irfft2` computes is exactly
//! `y[h,n] = Re sum_{k,l} c_l Y[k,l] exp(2 pi i (k h/H + l n/W)) / sqrt(HW)` (the imaginary parts
//! of the DC and Nyquist columns after the inverse transform over `H` are dropped). With a real
//! loss `L`, complex gradients taken as `dL/dRe + i dL/dIm`, and `g = dL/dy`:
//!
//! * `dL/dY = c * F(g)`;
//! * `dL/dw = sum_batch c * F(g) * conj(F(x))`;
//! * `dL/dx = irfft2(F(g) * conj(w))` — the `c` weights of the adjoint of `F` cancel those of
//!   `dL/dY`, so the input gradient is the same filter applied to `g` with the conjugate weight.
//!
//! The tests check both gradients against central finite differences of an f64 reference.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::backend::NdArray;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::ndarray::NdArrayTensor;
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Distribution, Tensor, TensorData, TensorMetadata, TensorPrimitive};

/// Memory layout of the input of a global filter, with the matching weight layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FilterLayout {
    /// GFNet: `x` is `[N, H, W, C]`, the weight `[H, W/2+1, C, 2]`.
    Nhwc,
    /// HorNet: `x` is `[N, C, H, W]`, the weight `[C, H, W/2+1, 2]`.
    Nchw,
}

impl FilterLayout {
    /// `(N, C, H, W)` of an input of this layout.
    fn ncwh(self, dims: [usize; 4]) -> (usize, usize, usize, usize) {
        match self {
            FilterLayout::Nhwc => (dims[0], dims[3], dims[1], dims[2]),
            FilterLayout::Nchw => (dims[0], dims[1], dims[2], dims[3]),
        }
    }

    /// The weight shape this layout expects for `C` channels on an `H x W` grid.
    pub fn weight_shape(self, c: usize, h: usize, w: usize) -> [usize; 4] {
        match self {
            FilterLayout::Nhwc => [h, w / 2 + 1, c, 2],
            FilterLayout::Nchw => [c, h, w / 2 + 1, 2],
        }
    }
}

/// Backends that can run the global filter.
///
/// Every method has a default built from tensor ops (the DFT-by-matmul path), so implementing
/// the trait for a backend is one line; [`NdArray`] overrides them with the real-FFT path and
/// [`Autodiff<B>`] with a custom op whose backward calls [`Self::global_filter_backward`] of `B`.
/// Under the `cuda` feature, `burn::backend::Cuda` uses the defaults.
pub trait SpectralBackend: Backend {
    /// The filter on primitives. `x` and `weight` as described by `layout`.
    fn global_filter_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        layout: FilterLayout,
    ) -> FloatTensor<Self> {
        let x = Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(x));
        let weight = Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(weight));
        dft::filter(x, weight, layout).into_primitive().tensor()
    }

    /// Gradients of the filter given the output gradient `grad`: the input gradient is computed
    /// when `weight` is given (it needs only the weight), the weight gradient when `x` is given
    /// (it needs only the input). Returns `(grad_x, grad_weight)`.
    fn global_filter_backward(
        grad: FloatTensor<Self>,
        x: Option<FloatTensor<Self>>,
        weight: Option<FloatTensor<Self>>,
        layout: FilterLayout,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        let float = |t| Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(t));
        let (gx, gw) =
            global_filter_grads_dft(float(grad), x.map(float), weight.map(float), layout);
        let prim = |t: Tensor<Self, 4>| t.into_primitive().tensor();
        (gx.map(prim), gw.map(prim))
    }
}

/// GFNet layout: `x` `[N, H, W, C]`, `weight` `[H, W/2+1, C, 2]` → `[N, H, W, C]`.
pub fn global_filter<B: SpectralBackend>(x: Tensor<B, 4>, weight: Tensor<B, 4>) -> Tensor<B, 4> {
    apply(x, weight, FilterLayout::Nhwc)
}

/// HorNet layout: `x` `[N, C, H, W]`, `weight` `[C, H, W/2+1, 2]` → `[N, C, H, W]`.
pub fn global_filter_nchw<B: SpectralBackend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
) -> Tensor<B, 4> {
    apply(x, weight, FilterLayout::Nchw)
}

/// The generic path (GFNet layout) on any backend, built from tensor ops: real DFT matrices and
/// matmuls, exact for any grid, differentiable through burn's autodiff.
pub fn global_filter_dft<B: Backend>(x: Tensor<B, 4>, weight: Tensor<B, 4>) -> Tensor<B, 4> {
    check_shapes(&x.dims(), &weight.dims(), FilterLayout::Nhwc);
    dft::filter(x, weight, FilterLayout::Nhwc)
}

/// [`global_filter_dft`] for the HorNet layout.
pub fn global_filter_nchw_dft<B: Backend>(x: Tensor<B, 4>, weight: Tensor<B, 4>) -> Tensor<B, 4> {
    check_shapes(&x.dims(), &weight.dims(), FilterLayout::Nchw);
    dft::filter(x, weight, FilterLayout::Nchw)
}

/// The analytic gradients of the filter built from tensor ops (what [`SpectralBackend`]'s default
/// backward runs): given the output gradient `grad`, the input gradient
/// `irfft2(rfft2(grad) * conj(w))` when `weight` is given, and the weight gradient
/// `sum_batch c_l rfft2(grad) * conj(rfft2(x))` when `x` is given (see the module docs).
pub fn global_filter_grads_dft<B: Backend>(
    grad: Tensor<B, 4>,
    x: Option<Tensor<B, 4>>,
    weight: Option<Tensor<B, 4>>,
    layout: FilterLayout,
) -> (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>) {
    let gx = weight.map(|w| dft::filter(grad.clone(), conj(w), layout));
    let gw = x.map(|x| dft::weight_grad(x, grad, layout));
    (gx, gw)
}

fn apply<B: SpectralBackend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    layout: FilterLayout,
) -> Tensor<B, 4> {
    check_shapes(&x.dims(), &weight.dims(), layout);
    let out = B::global_filter_forward(
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        layout,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn check_shapes(x: &[usize; 4], w: &[usize; 4], layout: FilterLayout) {
    let (_, c, h, wd) = layout.ncwh(*x);
    let expected = layout.weight_shape(c, h, wd);
    assert!(
        h > 0 && wd > 0 && c > 0,
        "global filter: empty spatial grid or channel dimension in input {x:?}"
    );
    assert_eq!(
        *w, expected,
        "global filter ({layout:?}): input {x:?} needs a weight of shape {expected:?}, got {w:?}"
    );
}

/// Negates the imaginary part of a complex tensor stored with a trailing `[.., 2]`.
fn conj<B: Backend>(w: Tensor<B, 4>) -> Tensor<B, 4> {
    let sign = Tensor::<B, 1>::from_data(
        TensorData::new(vec![1.0f32, -1.0], [2]),
        (&w.device(), w.dtype()),
    );
    w * sign.reshape([1, 1, 1, 2])
}

// ---------------------------------------------------------------------------------------------
// Bilinear resize of a complex weight
// ---------------------------------------------------------------------------------------------

/// Bilinear resize with `align_corners = true` of a complex weight stored `[h, w, C, 2]` (GFNet
/// layout) to `[h2, w2, C, 2]`. This is HorNet's rule (`F.interpolate(weight.permute(3,0,1,2),
/// size, mode='bilinear', align_corners=True)` on its `[C, h, w, 2]` weight): each channel and
/// each of the real and imaginary parts is resized as an independent `h x w` image. Built from
/// two matmuls, so it runs on any backend and is differentiable. Identity when the sizes agree.
pub fn resize_complex_weight<B: Backend>(w: Tensor<B, 4>, h2: usize, w2: usize) -> Tensor<B, 4> {
    let [h, wd, c, two] = w.dims();
    assert_eq!(
        two,
        2,
        "complex weight must end with a dimension of 2, got {:?}",
        w.dims()
    );
    if (h, wd) == (h2, w2) {
        return w;
    }
    let opts = (&w.device(), w.dtype());
    let rh = interp_matrix::<B>(h, h2, opts); // [h2, h]
    let rw = interp_matrix::<B>(wd, w2, opts); // [w2, w]
    let t = rh.matmul(w.reshape([h, wd * c * 2])); // [h2, w*C*2]
    let t = rw.unsqueeze::<3>().matmul(t.reshape([h2, wd, c * 2])); // [h2, w2, C*2]
    t.reshape([h2, w2, c, 2])
}

/// [`resize_complex_weight`] for HorNet's layout `[C, h, w, 2]` → `[C, h2, w2, 2]`.
pub fn resize_complex_weight_nchw<B: Backend>(
    w: Tensor<B, 4>,
    h2: usize,
    w2: usize,
) -> Tensor<B, 4> {
    let [c, h, wd, two] = w.dims();
    assert_eq!(
        two,
        2,
        "complex weight must end with a dimension of 2, got {:?}",
        w.dims()
    );
    if (h, wd) == (h2, w2) {
        return w;
    }
    let opts = (&w.device(), w.dtype());
    let rh = interp_matrix::<B>(h, h2, opts).unsqueeze::<3>(); // [1, h2, h]
    let rw = interp_matrix::<B>(wd, w2, opts); // [w2, w]
    let t = rh.matmul(w.reshape([c, h, wd * 2])); // [C, h2, w*2]
    let t = rw.unsqueeze::<3>().matmul(t.reshape([c * h2, wd, 2])); // [C*h2, w2, 2]
    t.reshape([c, h2, w2, 2])
}

/// `[n_out, n_in]` matrix of 1-D linear interpolation with `align_corners = true`
/// (PyTorch: `src = dst * (n_in - 1) / (n_out - 1)`, or 0 when `n_out == 1`).
fn interp_matrix<B: Backend>(
    n_in: usize,
    n_out: usize,
    (device, dtype): (&B::Device, DType),
) -> Tensor<B, 2> {
    let mut m = vec![0.0f32; n_out * n_in];
    let scale = if n_out > 1 {
        (n_in as f64 - 1.0) / (n_out as f64 - 1.0)
    } else {
        0.0
    };
    for i in 0..n_out {
        let src = scale * i as f64;
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let frac = src - i0 as f64;
        m[i * n_in + i0] += (1.0 - frac) as f32;
        m[i * n_in + i1] += frac as f32;
    }
    Tensor::from_data(TensorData::new(m, [n_out, n_in]), (device, dtype))
}

// ---------------------------------------------------------------------------------------------
// Module
// ---------------------------------------------------------------------------------------------

/// GFNet's `GlobalFilter`: a `complex_weight` parameter `[h, w, C, 2]` (`w = h/2 + 1` in GFNet),
/// applied to `[N, H, W, C]` inputs. When the runtime grid's half spectrum `(H, W/2+1)` differs
/// from `(h, w)`, the weight is resized bilinearly (align_corners, HorNet's rule) first.
#[derive(Module, Debug)]
pub struct GlobalFilter<B: Backend> {
    /// `[h, w, C, 2]`: real and imaginary parts, as in the reference `state_dict`.
    pub complex_weight: Param<Tensor<B, 4>>,
}

impl<B: Backend> GlobalFilter<B> {
    /// GFNet's initialisation: `randn(h, w, dim, 2) * 0.02`.
    pub fn new(dim: usize, h: usize, w: usize, device: &B::Device) -> Self {
        Self {
            complex_weight: Param::from_tensor(Tensor::random(
                [h, w, dim, 2],
                Distribution::Normal(0.0, 0.02),
                device,
            )),
        }
    }

    /// The stored weight, resized to the half spectrum of an `h x w` grid when needed.
    pub fn weight_for(&self, h: usize, w: usize) -> Tensor<B, 4> {
        resize_complex_weight(self.complex_weight.val(), h, w / 2 + 1)
    }
}

impl<B: SpectralBackend> GlobalFilter<B> {
    /// `x`: `[N, H, W, C]` → `[N, H, W, C]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, h, w, _] = x.dims();
        global_filter(x, self.weight_for(h, w))
    }

    /// GFNet's calling convention: tokens `[N, H*W, C]` on an `(H, W)` grid → `[N, H*W, C]`.
    pub fn forward_tokens(&self, x: Tensor<B, 3>, (h, w): (usize, usize)) -> Tensor<B, 3> {
        let [n, tokens, c] = x.dims();
        assert_eq!(
            tokens,
            h * w,
            "global filter: {tokens} tokens do not fill a {h}x{w} grid"
        );
        self.forward(x.reshape([n, h, w, c]))
            .reshape([n, tokens, c])
    }
}

// ---------------------------------------------------------------------------------------------
// Autodiff: custom op with analytic backward
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct GlobalFilterBackward;

#[derive(Debug, Clone)]
struct GlobalFilterState {
    /// Checkpointed input, present when the weight needs a gradient.
    x: Option<NodeId>,
    /// Checkpointed weight, present when the input needs a gradient.
    weight: Option<NodeId>,
    layout: FilterLayout,
}

impl<B: SpectralBackend> Backward<B, 2> for GlobalFilterBackward {
    type State = GlobalFilterState;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let state = ops.state;
        let x: Option<FloatTensor<B>> = state.x.map(|id| checkpointer.retrieve_node_output(id));
        let weight: Option<FloatTensor<B>> =
            state.weight.map(|id| checkpointer.retrieve_node_output(id));
        let (gx, gw) = B::global_filter_backward(grad, x, weight, state.layout);
        if let (Some(node), Some(g)) = (node_x, gx) {
            grads.register::<B>(node.id, g);
        }
        if let (Some(node), Some(g)) = (node_w, gw) {
            grads.register::<B>(node.id, g);
        }
    }
}

impl<B: SpectralBackend, C: CheckpointStrategy> SpectralBackend for Autodiff<B, C> {
    fn global_filter_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        layout: FilterLayout,
    ) -> FloatTensor<Self> {
        match GlobalFilterBackward
            .prepare::<C>([x.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_needs_grad = !x.node.requirement.is_none();
                let w_needs_grad = !weight.node.requirement.is_none();
                let state = GlobalFilterState {
                    x: w_needs_grad.then(|| prep.checkpoint(&x)),
                    weight: x_needs_grad.then(|| prep.checkpoint(&weight)),
                    layout,
                };
                let out = B::global_filter_forward(x.primitive, weight.primitive, layout);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::global_filter_forward(
                x.primitive,
                weight.primitive,
                layout,
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA: the default (DFT-by-matmul) forward and backward
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "cuda")]
impl SpectralBackend for burn::backend::Cuda {}

// ---------------------------------------------------------------------------------------------
// NdArray: real-FFT path
// ---------------------------------------------------------------------------------------------

macro_rules! ndarray_spectral {
    ($elem:ty) => {
        impl SpectralBackend for NdArray<$elem> {
            fn global_filter_forward(
                x: FloatTensor<Self>,
                weight: FloatTensor<Self>,
                layout: FilterLayout,
            ) -> FloatTensor<Self> {
                let dims = shape4(&x);
                let geom = fft_cpu::Geom::new(dims, layout);
                let xs = host::<$elem>(&x);
                let ws = host::<$elem>(&weight);
                let out = fft_cpu::forward(&xs, &ws, geom, false);
                NdArrayTensor::from_data(TensorData::new(out, dims))
            }

            fn global_filter_backward(
                grad: FloatTensor<Self>,
                x: Option<FloatTensor<Self>>,
                weight: Option<FloatTensor<Self>>,
                layout: FilterLayout,
            ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
                let dims = shape4(&grad);
                let geom = fft_cpu::Geom::new(dims, layout);
                let (_, c, h, w) = layout.ncwh(dims);
                let gs = host::<$elem>(&grad);
                let xs = x.as_ref().map(host::<$elem>);
                let ws = weight.as_ref().map(host::<$elem>);
                let (gx, gw) = fft_cpu::backward(&gs, xs.as_deref(), ws.as_deref(), geom);
                let gx = gx.map(|v| NdArrayTensor::from_data(TensorData::new(v, dims)));
                let gw = gw.map(|v| {
                    NdArrayTensor::from_data(TensorData::new(v, layout.weight_shape(c, h, w)))
                });
                (gx, gw)
            }
        }
    };
}

ndarray_spectral!(f32);
ndarray_spectral!(f64);

fn shape4<T: TensorMetadata>(t: &T) -> [usize; 4] {
    let s = t.shape();
    assert_eq!(
        s.num_dims(),
        4,
        "global filter: expected a rank-4 tensor, got {s:?}"
    );
    [s[0], s[1], s[2], s[3]]
}

/// Element types the host FFT path runs in.
trait HostElem: fft_cpu::Real + burn::tensor::Element {
    /// The row-major data of `t` if it holds this element type: borrowed when contiguous,
    /// otherwise copied into standard layout (ndarray's strided copy; much faster than reading
    /// a shared tensor out through `into_data`).
    fn host_data(t: &NdArrayTensor) -> Option<Cow<'_, [Self]>>;
}

macro_rules! host_elem {
    ($elem:ty, $variant:ident) => {
        impl HostElem for $elem {
            fn host_data(t: &NdArrayTensor) -> Option<Cow<'_, [Self]>> {
                let NdArrayTensor::$variant(s) = t else {
                    return None;
                };
                let v = s.view();
                Some(match v.to_slice() {
                    Some(sl) => Cow::Borrowed(sl),
                    None => {
                        let len = v.len();
                        let (mut data, offset) = v
                            .as_standard_layout()
                            .into_owned()
                            .into_raw_vec_and_offset();
                        data.drain(..offset.unwrap_or(0));
                        data.truncate(len);
                        Cow::Owned(data)
                    }
                })
            }
        }
    };
}

host_elem!(f32, F32);
host_elem!(f64, F64);

/// The row-major host data of `t` in element type `E` (converted when it holds another type).
fn host<E: HostElem>(t: &NdArrayTensor) -> Cow<'_, [E]> {
    if let Some(data) = E::host_data(t) {
        return data;
    }
    let data = Tensor::<NdArray, 4>::from_primitive(TensorPrimitive::Float(t.clone()))
        .into_data()
        .convert::<E>();
    Cow::Owned(
        data.to_vec::<E>()
            .expect("host data of the converted element type"),
    )
}

/// Host FFT implementation of the filter and of its gradients.
///
/// Two real planes (channels `2q` and `2q+1` of one batch item) travel as one complex plane
/// `z = x_a + i x_b`: one complex 2-D FFT gives both half spectra (`X_a = (Z + conj Z~)/2`,
/// `X_b = (Z - conj Z~)/2i` with `Z~[k,l] = Z[-k,-l]`), and one inverse complex 2-D FFT of
/// `V = Y_a + i Y_b` gives both outputs (`y_a = Re v`, `y_b = Im v`), where `Y_a` is the
/// Hermitian extension of the filtered half spectrum that `irfft2` implies: columns `0` and
/// (even `W`) `W/2` symmetrised over `k`, `Y[-k,-l] = conj Y[k,l]` for the others. The
/// transforms of one batch item run as one batched `rustfft` call per direction and axis (rows,
/// then columns after a transpose). O(HW log HW) per plane.
mod fft_cpu {
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
}

// ---------------------------------------------------------------------------------------------
// Generic path: DFT by matmul
// ---------------------------------------------------------------------------------------------

mod dft {
    use super::FilterLayout;
    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, Tensor, TensorData};
    use std::any::{Any, TypeId};
    use std::collections::HashMap;
    use std::f64::consts::PI;
    use std::sync::{Arc, Mutex, OnceLock};

    /// Backend, grid, device and dtype of a set of DFT matrices.
    type MatsKey = (TypeId, usize, usize, String, String);

    /// The DFT matrices per grid and device, built once: on a GPU, rebuilding them on the host
    /// and uploading them at every call put four host-to-device copies into every filter call.
    #[allow(clippy::type_complexity)]
    static MATS: OnceLock<Mutex<HashMap<MatsKey, Box<dyn Any + Send + Sync>>>> = OnceLock::new();

    /// Real DFT matrices of one `H x W` grid.
    struct Mats<B: Backend> {
        /// `[1, 2Wf, W]`: rows `l` hold `cos(2 pi l n / W) s`, rows `Wf + l` hold
        /// `-sin(2 pi l n / W) s`, with `s = 1/sqrt(HW)`.
        w_fwd: Tensor<B, 3>,
        /// `[1, W, 2Wf]`: `c_l cos(2 pi l n / W) s` then `-c_l sin(2 pi l n / W) s`.
        w_inv: Tensor<B, 3>,
        /// `[1, H, H]`: `cos(2 pi k h / H)`, `sin(2 pi k h / H)`.
        h_cos: Tensor<B, 3>,
        h_sin: Tensor<B, 3>,
    }

    fn angle(a: usize, b: usize, n: usize) -> f64 {
        // Reduce the index product first: exact angles for any grid size.
        2.0 * PI * ((a * b) % n) as f64 / n as f64
    }

    impl<B: Backend> Mats<B> {
        /// The matrices for `h x w` on `device` in `dtype`, from the cache or built and cached.
        fn cached(h: usize, w: usize, device: &B::Device, dtype: DType) -> Arc<Self> {
            let key = (TypeId::of::<B>(), h, w, format!("{device:?}"), format!("{dtype:?}"));
            let cache = MATS.get_or_init(Default::default);
            if let Some(m) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key).and_then(|b| b.downcast_ref::<Arc<Self>>()) {
                return m.clone();
            }
            let m = Arc::new(Self::new(h, w, device, dtype));
            cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, Box::new(m.clone()));
            m
        }

        /// Built in f64 and stored in `dtype`.
        fn new(h: usize, w: usize, device: &B::Device, dtype: DType) -> Self {
            let wf = w / 2 + 1;
            let s = 1.0 / ((h * w) as f64).sqrt();
            let mut w_fwd = vec![0.0f64; 2 * wf * w];
            let mut w_inv = vec![0.0f64; w * 2 * wf];
            for l in 0..wf {
                let cl = if l == 0 || (w.is_multiple_of(2) && l == w / 2) {
                    1.0
                } else {
                    2.0
                };
                for n in 0..w {
                    let (sin, cos) = angle(l, n, w).sin_cos();
                    w_fwd[l * w + n] = cos * s;
                    w_fwd[(wf + l) * w + n] = -sin * s;
                    w_inv[n * 2 * wf + l] = cl * cos * s;
                    w_inv[n * 2 * wf + wf + l] = -cl * sin * s;
                }
            }
            let mut hc = vec![0.0f64; h * h];
            let mut hs = vec![0.0f64; h * h];
            for k in 0..h {
                for j in 0..h {
                    let (sin, cos) = angle(k, j, h).sin_cos();
                    hc[k * h + j] = cos;
                    hs[k * h + j] = sin;
                }
            }
            let t = |v: Vec<f64>, a: usize, b: usize| {
                let data = TensorData::new(v, [1, a, b]).convert_dtype(dtype);
                Tensor::<B, 3>::from_data(data, (device, dtype))
            };
            Self {
                w_fwd: t(w_fwd, 2 * wf, w),
                w_inv: t(w_inv, w, 2 * wf),
                h_cos: t(hc, h, h),
                h_sin: t(hs, h, h),
            }
        }

        /// Orthonormal `rfft2` over `(H, W)` of `x` `[N, H, W, C]`: `(re, im)`, each
        /// `[N, H, Wf*C]`.
        fn rfft2(&self, x: Tensor<B, 4>) -> (Tensor<B, 3>, Tensor<B, 3>) {
            let [n, h, w, c] = x.dims();
            let wf = w / 2 + 1;
            let a = self.w_fwd.clone().matmul(x.reshape([n * h, w, c])); // [N*H, 2Wf, C]
            let ar = a.clone().narrow(1, 0, wf).reshape([n, h, wf * c]);
            let ai = a.narrow(1, wf, wf).reshape([n, h, wf * c]);
            let (hc, hs) = (&self.h_cos, &self.h_sin);
            let xr = hc.clone().matmul(ar.clone()) + hs.clone().matmul(ai.clone());
            let xi = hc.clone().matmul(ai) - hs.clone().matmul(ar);
            (xr, xi)
        }

        /// Orthonormal `irfft2` with `s = (H, W)` of a half spectrum `(re, im)` `[N, H, Wf*C]`
        /// → `[N, H, W, C]`.
        fn irfft2(&self, yr: Tensor<B, 3>, yi: Tensor<B, 3>, w: usize, c: usize) -> Tensor<B, 4> {
            let [n, h, _] = yr.dims();
            let wf = w / 2 + 1;
            let (hc, hs) = (&self.h_cos, &self.h_sin);
            let zr = hc.clone().matmul(yr.clone()) - hs.clone().matmul(yi.clone());
            let zi = hc.clone().matmul(yi) + hs.clone().matmul(yr);
            let z = Tensor::cat(
                vec![zr.reshape([n * h, wf, c]), zi.reshape([n * h, wf, c])],
                1,
            ); // [N*H, 2Wf, C]
            self.w_inv.clone().matmul(z).reshape([n, h, w, c])
        }
    }

    /// To GFNet layout.
    fn to_nhwc<B: Backend>(
        x: Tensor<B, 4>,
        w: Tensor<B, 4>,
        layout: FilterLayout,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match layout {
            FilterLayout::Nhwc => (x, w),
            FilterLayout::Nchw => (x.permute([0, 2, 3, 1]), w.permute([1, 2, 0, 3])),
        }
    }

    /// The filter, layout per `layout`.
    pub(super) fn filter<B: Backend>(
        x: Tensor<B, 4>,
        weight: Tensor<B, 4>,
        layout: FilterLayout,
    ) -> Tensor<B, 4> {
        let (x, weight) = to_nhwc(x, weight, layout);
        let [_, h, w, c] = x.dims();
        let wf = w / 2 + 1;
        let mats = Mats::<B>::cached(h, w, &x.device(), x.dtype());
        let (xr, xi) = mats.rfft2(x);
        let wr = weight.clone().narrow(3, 0, 1).reshape([1, h, wf * c]);
        let wi = weight.narrow(3, 1, 1).reshape([1, h, wf * c]);
        let yr = xr.clone() * wr.clone() - xi.clone() * wi.clone();
        let yi = xr * wi + xi * wr;
        let y = mats.irfft2(yr, yi, w, c);
        match layout {
            FilterLayout::Nhwc => y,
            FilterLayout::Nchw => y.permute([0, 3, 1, 2]),
        }
    }

    /// The weight gradient `sum_n c_l F(g) conj(F(x))`, in the weight layout of `layout`.
    pub(super) fn weight_grad<B: Backend>(
        x: Tensor<B, 4>,
        grad: Tensor<B, 4>,
        layout: FilterLayout,
    ) -> Tensor<B, 4> {
        let (x, grad) = match layout {
            FilterLayout::Nhwc => (x, grad),
            FilterLayout::Nchw => (x.permute([0, 2, 3, 1]), grad.permute([0, 2, 3, 1])),
        };
        let [_, h, w, c] = x.dims();
        let wf = w / 2 + 1;
        let (device, dtype) = (x.device(), x.dtype());
        let mats = Mats::<B>::cached(h, w, &device, dtype);
        let (xr, xi) = mats.rfft2(x);
        let (gr, gi) = mats.rfft2(grad);
        let re = (gr.clone() * xr.clone() + gi.clone() * xi.clone()).sum_dim(0);
        let im = (gi * xr - gr * xi).sum_dim(0);
        let cl: Vec<f32> = (0..wf)
            .map(|l| {
                if l == 0 || (w.is_multiple_of(2) && l == w / 2) {
                    1.0
                } else {
                    2.0
                }
            })
            .collect();
        let cl = Tensor::<B, 4>::from_data(TensorData::new(cl, [1, 1, wf, 1]), (&device, dtype));
        let re = re.reshape([1, h, wf, c]) * cl.clone();
        let im = im.reshape([1, h, wf, c]) * cl;
        let gw = Tensor::cat(vec![re, im], 0).permute([1, 2, 3, 0]); // [H, Wf, C, 2]
        match layout {
            FilterLayout::Nhwc => gw,
            FilterLayout::Nchw => gw.permute([2, 0, 1, 3]),
        }
    }
}
