//! GELU and the last-dimension softmax as backend ops with analytic backwards.
//!
//! burn-ndarray evaluates GELU as `x·½(1 + erf(x/√2))` with one pass per operation, calling
//! libm's scalar `erf`, and autodiff's GELU backward adds `powf`, `exp` and more passes: in DeiT-S
//! training that was about 15 % of the CPU time. Softmax is a max, a subtraction, `exp`, a sum
//! and a division, each a pass with its own allocation and autodiff node. Here GELU is one
//! pass forward and one backward, softmax one row at a time (max, exponentials and sum, scale)
//! with the backward `dx = y·(dy − Σ dy·y)`; both split over [`compute_threads`](super::pool::compute_threads) threads and use
//! polynomial `exp` and `erf` that the compiler vectorises (see [`fast`]). The GELU backward
//! is the exact derivative of the erf form, as PyTorch's; burn's own GELU backward
//! differentiates the tanh approximation instead (up to about 1e-3 away).
//!
//! The defaults compose burn's ops (other backends, CUDA); NdArray has the CPU kernels;
//! `Autodiff<B>` records one node per call.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};

use super::conv::host_f32;

pub trait ActivationBackend: Backend {
    /// The exact (erf-based) GELU, `x·Φ(x)`, element-wise.
    fn gelu_erf(x: FloatTensor<Self>) -> FloatTensor<Self> {
        gelu_composed::<Self>(x)
    }

    /// `dy·GELU′(x)`.
    fn gelu_erf_backward(grad: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        gelu_backward_composed::<Self>(grad, x)
    }

    /// Softmax over the last dimension of `x` (any rank).
    fn softmax_last_dim(x: FloatTensor<Self>) -> FloatTensor<Self> {
        softmax_composed::<Self>(x)
    }

    /// `dx = y·(dy − Σ_last dy·y)` from the softmax's output `y`.
    fn softmax_last_dim_backward(grad: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self> {
        softmax_backward_composed::<Self>(grad, y)
    }

    /// `relu(a + b)` for two tensors of the same shape: a residual sum and its activation.
    fn add_relu(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        add_relu_composed::<Self>(a, b)
    }

    /// `dy` where the ReLU's output `y` is positive, 0 elsewhere (the gradient of both
    /// summands of [`add_relu`](Self::add_relu)).
    fn add_relu_backward(grad: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self> {
        relu_backward_composed::<Self>(grad, y)
    }
}

/// `1/√(2π)`.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `x` as a vector.
fn flat<B: Backend>(x: FloatTensor<B>) -> Tensor<B, 1> {
    let n = x.shape().num_elements();
    float(B::float_reshape(x, Shape::new([n])))
}

/// `x` as a matrix of rows over its last dimension.
fn rows<B: Backend>(x: FloatTensor<B>) -> Tensor<B, 2> {
    let shape = x.shape();
    let d = shape[shape.num_dims() - 1];
    let rows = shape.num_elements().checked_div(d).unwrap_or(0);
    float(B::float_reshape(x, Shape::new([rows, d])))
}

fn reshaped<B: Backend, const D: usize>(t: Tensor<B, D>, shape: Shape) -> FloatTensor<B> {
    B::float_reshape(t.into_primitive().tensor(), shape)
}

fn gelu_composed<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let shape = x.shape();
    reshaped(burn::tensor::activation::gelu(flat::<B>(x)), shape)
}

fn gelu_backward_composed<B: Backend>(grad: FloatTensor<B>, x: FloatTensor<B>) -> FloatTensor<B> {
    let shape = x.shape();
    let (x, g) = (flat::<B>(x), flat::<B>(grad));
    let cdf = (x.clone().mul_scalar(std::f64::consts::FRAC_1_SQRT_2).erf() + 1.0).mul_scalar(0.5);
    let pdf = x.clone().powi_scalar(2).mul_scalar(-0.5).exp().mul_scalar(FRAC_1_SQRT_2PI);
    reshaped(g * (cdf + x * pdf), shape)
}

fn softmax_composed<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let shape = x.shape();
    reshaped(burn::tensor::activation::softmax(rows::<B>(x), 1), shape)
}

fn softmax_backward_composed<B: Backend>(grad: FloatTensor<B>, y: FloatTensor<B>) -> FloatTensor<B> {
    let shape = y.shape();
    let (y, g) = (rows::<B>(y), rows::<B>(grad));
    let dot = (g.clone() * y.clone()).sum_dim(1);
    reshaped(y * (g - dot), shape)
}

fn add_relu_composed<B: Backend>(a: FloatTensor<B>, b: FloatTensor<B>) -> FloatTensor<B> {
    let shape = a.shape();
    reshaped(burn::tensor::activation::relu(flat::<B>(a) + flat::<B>(b)), shape)
}

fn relu_backward_composed<B: Backend>(grad: FloatTensor<B>, y: FloatTensor<B>) -> FloatTensor<B> {
    let shape = y.shape();
    reshaped(flat::<B>(grad).mask_fill(flat::<B>(y).lower_equal_elem(0.0), 0.0), shape)
}

/// See [`ActivationBackend::add_relu`]. A ResNet block's `relu(out + shortcut)` was two of
/// burn-ndarray's passes forward and two backward, each on one thread.
pub fn add_relu<B: ActivationBackend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    assert_eq!(a.dims(), b.dims(), "add_relu: the summands' shapes differ");
    float(B::add_relu(a.into_primitive().tensor(), b.into_primitive().tensor()))
}

/// See [`ActivationBackend::gelu_erf`].
pub fn gelu<B: ActivationBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    float(B::gelu_erf(x.into_primitive().tensor()))
}

/// See [`ActivationBackend::softmax_last_dim`].
pub fn softmax_last_dim<B: ActivationBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    float(B::softmax_last_dim(x.into_primitive().tensor()))
}

// ---------------------------------------------------------------------------------------------
// Autodiff
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct GeluBackward;

impl<B: ActivationBackend> Backward<B, 1> for GeluBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::gelu_erf_backward(grad, ops.state));
        }
    }
}

#[derive(Debug)]
struct SoftmaxBackward;

impl<B: ActivationBackend> Backward<B, 1> for SoftmaxBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::softmax_last_dim_backward(grad, ops.state));
        }
    }
}

#[derive(Debug)]
struct AddReluBackward;

impl<B: ActivationBackend> Backward<B, 2> for AddReluBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let g = B::add_relu_backward(grad, ops.state);
        match ops.parents {
            [Some(a), Some(b)] => {
                grads.register::<B>(a.id, g.clone());
                grads.register::<B>(b.id, g);
            }
            [Some(node), None] | [None, Some(node)] => grads.register::<B>(node.id, g),
            [None, None] => {}
        }
    }
}

impl<B: ActivationBackend, C: CheckpointStrategy> ActivationBackend for Autodiff<B, C> {
    fn add_relu(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let y = B::add_relu(a.primitive, b.primitive);
        match AddReluBackward.prepare::<C>([a.node, b.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn gelu_erf(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let xp = x.primitive;
        let y = B::gelu_erf(xp.clone());
        match GeluBackward.prepare::<C>([x.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(xp, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn softmax_last_dim(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let y = B::softmax_last_dim(x.primitive);
        match SoftmaxBackward.prepare::<C>([x.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

#[cfg(feature = "cuda")]
impl ActivationBackend for crate::device::Cuda {}

// ---------------------------------------------------------------------------------------------
// NdArray: the CPU kernels
// ---------------------------------------------------------------------------------------------

impl ActivationBackend for NdArray<f32> {
    fn gelu_erf(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = x.shape();
        let Some(xs) = host_f32(&x) else {
            return gelu_composed::<Self>(x);
        };
        NdArrayTensor::from_data(TensorData::new(cpu::gelu(&xs), shape))
    }

    fn gelu_erf_backward(grad: FloatTensor<Self>, x: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = x.shape();
        let (Some(g), Some(xs)) = (host_f32(&grad), host_f32(&x)) else {
            return gelu_backward_composed::<Self>(grad, x);
        };
        NdArrayTensor::from_data(TensorData::new(cpu::gelu_backward(&g, &xs), shape))
    }

    fn softmax_last_dim(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = x.shape();
        let d = shape[shape.num_dims() - 1];
        let Some(xs) = host_f32(&x) else {
            return softmax_composed::<Self>(x);
        };
        NdArrayTensor::from_data(TensorData::new(cpu::softmax(&xs, d), shape))
    }

    fn softmax_last_dim_backward(grad: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = y.shape();
        let d = shape[shape.num_dims() - 1];
        let (Some(g), Some(ys)) = (host_f32(&grad), host_f32(&y)) else {
            return softmax_backward_composed::<Self>(grad, y);
        };
        NdArrayTensor::from_data(TensorData::new(cpu::softmax_backward(&g, &ys, d), shape))
    }

    fn add_relu(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = a.shape();
        let (Some(av), Some(bv)) = (host_f32(&a), host_f32(&b)) else {
            return add_relu_composed::<Self>(a, b);
        };
        NdArrayTensor::from_data(TensorData::new(cpu::add_relu(&av, &bv), shape))
    }

    fn add_relu_backward(grad: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = y.shape();
        let (Some(g), Some(ys)) = (host_f32(&grad), host_f32(&y)) else {
            return relu_backward_composed::<Self>(grad, y);
        };
        NdArrayTensor::from_data(TensorData::new(cpu::relu_backward(&g, &ys), shape))
    }
}

pub mod fast {
    //! `exp` and `erf` for `f32` as straight-line polynomial code, so that a loop over a slice
    //! compiles to SIMD (libm's scalar calls do not vectorise).

    /// `eˣ` to within a few ulp on `[-87, 88]`, 0 below (where `eˣ` leaves the normal floats)
    /// and `e⁸⁸` above. Cephes' `expf`: `x = n·ln 2 + r` with `|r| ≤ ln2/2`, a polynomial in
    /// `r`, and `2ⁿ` built in the exponent bits.
    #[inline(always)]
    pub fn exp(x_in: f32) -> f32 {
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let x = x_in.clamp(-87.0, 88.0);
        let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
        let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
        let p = 1.987_569_2e-4f32
            .mul_add(r, 1.398_2e-3)
            .mul_add(r, 8.333_452e-3)
            .mul_add(r, 4.166_579_6e-2)
            .mul_add(r, 1.666_666_5e-1)
            .mul_add(r, 0.5);
        let y = p.mul_add(r * r, r) + 1.0;
        let e = y * f32::from_bits(((n as i32 + 127) as u32) << 23);
        if x_in < -87.0 { 0.0 } else { e }
    }

    /// `erf(x)` to within 5e-7 absolute: a rational minimax approximation (odd degree-13 over
    /// even degree-8) on `[-4, 4]`, where `|erf| < 1 − 1.6e-8` outside.
    #[inline(always)]
    pub fn erf(x: f32) -> f32 {
        let x = x.clamp(-4.0, 4.0);
        let x2 = x * x;
        let p = (-2.726_142_3e-10f32)
            .mul_add(x2, 2.770_681_4e-8)
            .mul_add(x2, -2.101_024e-6)
            .mul_add(x2, -5.692_506_5e-5)
            .mul_add(x2, -7.349_906_3e-4)
            .mul_add(x2, -2.954_6e-3)
            .mul_add(x2, -1.609_603_3e-2)
            * x;
        let q = (-1.456_607_2e-5f32)
            .mul_add(x2, -2.133_740_6e-4)
            .mul_add(x2, -1.682_827e-3)
            .mul_add(x2, -7.373_329e-3)
            .mul_add(x2, -1.426_473_9e-2);
        p / q
    }

    /// Eight running lanes, so that the reduction vectorises (a single accumulator would fix
    /// the order of the additions and keep the loop scalar).
    #[inline(always)]
    pub fn lanes<const MAX: bool>(row: &[f32], init: f32) -> f32 {
        let mut acc = [init; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a = if MAX { if v > *a { v } else { *a } } else { *a + v };
            }
        }
        let fold = |a: f32, v: f32| if MAX { a.max(v) } else { a + v };
        let tail = chunks.remainder().iter().fold(init, |a, &v| fold(a, v));
        acc.into_iter().fold(tail, fold)
    }
}

mod cpu {
    use super::fast::{erf, exp, lanes};
    use crate::nn::conv::zeroed_by_rows;

    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const FRAC_1_SQRT_2PI: f32 = super::FRAC_1_SQRT_2PI as f32;

    /// A buffer of `len` values filled by `f(first_index, chunk)` over contiguous chunks (whole
    /// rows of `d`), each zeroed and filled by its own thread.
    fn by_rows(len: usize, d: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
        zeroed_by_rows(len, len.checked_div(d).unwrap_or(0), |first_row, chunk| f(first_row * d, chunk))
    }

    pub fn add_relu(a: &[f32], b: &[f32]) -> Vec<f32> {
        by_rows(a.len(), 1, |at, out| {
            for ((o, &u), &v) in out.iter_mut().zip(&a[at..]).zip(&b[at..]) {
                // `<` rather than `max` so that a NaN passes through, as in PyTorch.
                let z = u + v;
                *o = if z < 0.0 { 0.0 } else { z };
            }
        })
    }

    pub fn relu_backward(grad: &[f32], y: &[f32]) -> Vec<f32> {
        by_rows(y.len(), 1, |at, out| {
            for ((o, &g), &v) in out.iter_mut().zip(&grad[at..]).zip(&y[at..]) {
                *o = if v > 0.0 { g } else { 0.0 };
            }
        })
    }

    pub fn gelu(x: &[f32]) -> Vec<f32> {
        by_rows(x.len(), 1, |at, out| {
            for (o, &v) in out.iter_mut().zip(&x[at..]) {
                *o = 0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2));
            }
        })
    }

    pub fn gelu_backward(grad: &[f32], x: &[f32]) -> Vec<f32> {
        by_rows(x.len(), 1, |at, out| {
            for ((o, &v), &g) in out.iter_mut().zip(&x[at..]).zip(&grad[at..]) {
                let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
                let pdf = exp(-0.5 * v * v) * FRAC_1_SQRT_2PI;
                *o = g * v.mul_add(pdf, cdf);
            }
        })
    }

    pub fn softmax(x: &[f32], d: usize) -> Vec<f32> {
        by_rows(x.len(), d, |at, out| {
            for (yr, xr) in out.chunks_exact_mut(d).zip(x[at..].chunks_exact(d)) {
                let max = lanes::<true>(xr, f32::NEG_INFINITY);
                // A row of -inf (every key masked) gives NaN, as burn's composed softmax.
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = exp(v - max);
                }
                let inv = 1.0 / lanes::<false>(yr, 0.0);
                yr.iter_mut().for_each(|o| *o *= inv);
            }
        })
    }

    pub fn softmax_backward(grad: &[f32], y: &[f32], d: usize) -> Vec<f32> {
        by_rows(y.len(), d, |at, out| {
            for ((o, yr), gr) in out.chunks_exact_mut(d).zip(y[at..].chunks_exact(d)).zip(grad[at..].chunks_exact(d)) {
                // Σ dy·y first into `o` (the products), then the lanes' sum.
                for ((p, &a), &b) in o.iter_mut().zip(yr).zip(gr) {
                    *p = a * b;
                }
                let dot = lanes::<false>(o, 0.0);
                for ((p, &a), &b) in o.iter_mut().zip(yr).zip(gr) {
                    *p = a * (b - dot);
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cpu, CpuAutodiff};
    use burn::tensor::Distribution;

    use crate::nn::test_util::host;

    fn max_abs(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    /// `erf` against a series in f64 and `exp` against `f64::exp`, over the whole useful range.
    #[test]
    fn polynomial_exp_and_erf_are_accurate() {
        let mut worst_erf = 0.0f64;
        let mut worst_exp = 0.0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 / 10_000.0;
            worst_erf = worst_erf.max((fast::erf(x) as f64 - erf64(x as f64)).abs());
        }
        for i in -8_700..8_800 {
            let x = i as f32 / 100.0 + 0.003;
            let want = (x as f64).exp();
            worst_exp = worst_exp.max((fast::exp(x) as f64 - want).abs() / want);
        }
        assert!(worst_erf < 6e-7, "erf: {worst_erf}");
        assert!(worst_exp < 3e-7, "exp: {worst_exp}");
        assert_eq!(fast::exp(-1000.0), 0.0);
        assert!(fast::exp(f32::NAN).is_nan());
    }

    /// GELU's output against burn's composed GELU, and its gradient against the exact
    /// derivative `Φ(x) + x·φ(x)` in f64, on a tensor large enough for several threads. (burn's
    /// own GELU backward is the derivative of the tanh approximation, up to ~1e-3 off; PyTorch's
    /// exact GELU, the reference models' choice, differentiates the erf form as here.)
    #[test]
    fn gelu_matches_burn_and_the_exact_derivative() {
        let device = Default::default();
        for dims in [[3, 5, 7], [8, 197, 1536]] {
            let x = Tensor::<CpuAutodiff, 3>::random(dims, Distribution::Normal(0.0, 3.0), &device).require_grad();
            let r = Tensor::<CpuAutodiff, 3>::random(dims, Distribution::Default, &device);
            let y = gelu(x.clone());
            let grads = (y.clone() * r.clone()).sum().backward();
            let (ours, dx) = (host(y), host(x.grad(&grads).unwrap()));
            let burns = host(burn::tensor::activation::gelu(x.clone().inner()));
            assert!(max_abs(&ours, &burns) < 5e-6, "output {dims:?}: {}", max_abs(&ours, &burns));
            let want: Vec<f32> = host(x.inner())
                .iter()
                .zip(host(r))
                .map(|(&v, w)| {
                    let v = v as f64;
                    let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
                    (w as f64 * (0.5 * (1.0 + erf64(v / std::f64::consts::SQRT_2)) + v * pdf)) as f32
                })
                .collect();
            assert!(max_abs(&dx, &want) < 2e-6, "dx {dims:?}: {}", max_abs(&dx, &want));
        }
    }

    /// Softmax's output and gradient against burn's composed softmax, with rows of one value,
    /// rows shorter than the SIMD lanes and attention-sized rows.
    #[test]
    fn softmax_matches_burn() {
        let device = Default::default();
        for dims in [[2, 3, 1], [2, 3, 5], [8, 6, 197 * 2], [2, 4, 33]] {
            let x0 = Tensor::<CpuAutodiff, 3>::random(dims, Distribution::Normal(0.0, 4.0), &device);
            let r = Tensor::<CpuAutodiff, 3>::random(dims, Distribution::Default, &device);
            let run = |ours: bool| {
                let x = x0.clone().require_grad();
                let y = if ours { softmax_last_dim(x.clone()) } else { burn::tensor::activation::softmax(x.clone(), 2) };
                let grads = (y.clone() * r.clone()).sum().backward();
                (host(y), host(x.grad(&grads).unwrap()))
            };
            let (a, b) = (run(true), run(false));
            assert!(max_abs(&a.0, &b.0) < 1e-6, "output {dims:?}: {}", max_abs(&a.0, &b.0));
            assert!(max_abs(&a.1, &b.1) < 1e-6, "dx {dims:?}: {}", max_abs(&a.1, &b.1));
        }
    }

    /// Both backwards against f64 central differences of `Σ r·f(x)`.
    #[test]
    fn gradients_match_finite_differences() {
        let device = Default::default();
        let (rows, d) = (3, 6);
        let xs: Vec<f64> = (0..rows * d).map(|i| ((i * 7 % 13) as f64 - 6.0) / 2.5).collect();
        let r: Vec<f64> = (0..rows * d).map(|i| ((i * 5 % 9) as f64 - 4.0) / 3.0).collect();
        let phi = |x: f64| 0.5 * (1.0 + erf64(x / std::f64::consts::SQRT_2));
        let gelu_loss = |xs: &[f64]| xs.iter().zip(&r).map(|(&x, &w)| w * x * phi(x)).sum::<f64>();
        let softmax_loss = |xs: &[f64]| {
            let mut total = 0.0;
            for row in 0..rows {
                let v = &xs[row * d..][..d];
                let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = v.iter().map(|a| (a - m).exp()).sum();
                total += v.iter().enumerate().map(|(j, a)| r[row * d + j] * (a - m).exp() / z).sum::<f64>();
            }
            total
        };
        let t = |v: &[f64]| Tensor::<CpuAutodiff, 2>::from_data(TensorData::new(v.iter().map(|&a| a as f32).collect::<Vec<_>>(), [rows, d]), &device);
        for (name, ours, loss) in [
            ("gelu", gelu::<CpuAutodiff, 2> as fn(Tensor<CpuAutodiff, 2>) -> Tensor<CpuAutodiff, 2>, &gelu_loss as &dyn Fn(&[f64]) -> f64),
            ("softmax", softmax_last_dim::<CpuAutodiff, 2>, &softmax_loss),
        ] {
            let x = t(&xs).require_grad();
            let grads = (ours(x.clone()) * t(&r)).sum().backward();
            let g = host(x.grad(&grads).unwrap());
            let h = 1e-5;
            for k in 0..xs.len() {
                let (mut p, mut q) = (xs.clone(), xs.clone());
                p[k] += h;
                q[k] -= h;
                let num = (loss(&p) - loss(&q)) / (2.0 * h);
                assert!((num - g[k] as f64).abs() < 2e-5 * (1.0 + num.abs()), "{name} dx[{k}]: {num} vs {}", g[k]);
            }
        }
    }

    /// erf in f64 for the references, to about 1e-13: the Maclaurin series (A&S 7.1.5) below
    /// |x| = 3, the asymptotic series of erfc (A&S 7.1.23, five terms) beyond.
    fn erf64(x: f64) -> f64 {
        if x.abs() >= 3.0 {
            let z = 1.0 / (2.0 * x * x);
            let series = 1.0 - z + 3.0 * z * z - 15.0 * z.powi(3) + 105.0 * z.powi(4);
            return x.signum() * (1.0 - (-x * x).exp() / (x.abs() * std::f64::consts::PI.sqrt()) * series);
        }
        let (mut term, mut sum, mut k) = (x, x, 0.0f64);
        while term.abs() > 1e-17 {
            k += 1.0;
            term *= -x * x / k;
            sum += term / (2.0 * k + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// `relu(a + b)` and both summands' gradients equal burn's composed ops, with exact zeros
    /// and negative sums in the input.
    #[test]
    fn add_relu_and_its_gradients_match_burn() {
        let device = Default::default();
        let mut av = Tensor::<Cpu, 3>::random([3, 5, 7], Distribution::Normal(0.0, 1.0), &device);
        av = av.slice_assign([0..1, 0..1, 0..3], Tensor::zeros([1, 1, 3], &device));
        let bv = Tensor::<Cpu, 3>::random([3, 5, 7], Distribution::Normal(0.0, 1.0), &device);
        let bv = bv.slice_assign([0..1, 0..1, 0..3], Tensor::zeros([1, 1, 3], &device));
        let r = Tensor::<CpuAutodiff, 3>::random([3, 5, 7], Distribution::Default, &device);
        let grads = |fused: bool| {
            let a = Tensor::<CpuAutodiff, 3>::from_inner(av.clone()).require_grad();
            let b = Tensor::<CpuAutodiff, 3>::from_inner(bv.clone()).require_grad();
            let y = if fused { add_relu(a.clone(), b.clone()) } else { burn::tensor::activation::relu(a.clone() + b.clone()) };
            let g = (y.clone() * r.clone()).sum().backward();
            (host(y.inner()), host(a.grad(&g).unwrap()), host(b.grad(&g).unwrap()))
        };
        let (ours, theirs) = (grads(true), grads(false));
        assert_eq!(ours.0, theirs.0, "forward");
        assert!(ours.0.contains(&0.0) && ours.0.iter().any(|&v| v > 0.0));
        assert_eq!(ours.1, theirs.1, "da");
        assert_eq!(ours.2, theirs.2, "db");
    }

    /// Inference (no autodiff) runs the same kernels.
    #[test]
    fn plain_backend_agrees_with_autodiff() {
        let device = Default::default();
        let x = Tensor::<Cpu, 2>::random([4, 9], Distribution::Normal(0.0, 2.0), &device);
        let xa = Tensor::<CpuAutodiff, 2>::from_inner(x.clone());
        assert_eq!(host(gelu(x.clone())), host(gelu(xa.clone())));
        assert_eq!(host(softmax_last_dim(x)), host(softmax_last_dim(xa)));
    }
}
