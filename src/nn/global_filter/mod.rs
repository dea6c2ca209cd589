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

mod autodiff;
mod fft_cpu;
mod ndarray;

// ---------------------------------------------------------------------------------------------
// CUDA: the default (DFT-by-matmul) forward and backward
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "cuda")]
impl SpectralBackend for burn::backend::Cuda {}

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
