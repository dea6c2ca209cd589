//! The fully connected layer `y = x·Wᵀ + b` as one backend op with its own backward.
//!
//! Composed from burn's ops on NdArray, a Linear is a broadcast batched matmul (matrixmultiply,
//! one small GEMM per leading index) and a separate single-threaded bias pass; its backward sums
//! the broadcast weight gradient over the batch afterwards. In DeiT-S training those matmuls were
//! 49 % of the CPU time. [`LinearBackend::linear_forward`] flattens the leading dimensions into one
//! `[M, K]` GEMM (the `gemm` crate's kernels) with the bias written as the GEMM's initial value,
//! and its backward is two GEMMs (`dx = dy·W`, `dW = dyᵀ·x`) plus a column sum for `db`, each
//! split over [`compute_threads`](super::pool::compute_threads) threads by output rows.
//!
//! The defaults compose burn's ops (other backends, CUDA); NdArray has the CPU kernel;
//! `Autodiff<B>` records one node whose backward computes only the gradients its parents need.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};
use burn::tensor::ops::FloatTensor;

use super::conv::host_f32;

/// What the backward needs besides the output gradient.
#[derive(Debug, Clone)]
pub struct LinearSaved<B: Backend> {
    pub x: FloatTensor<B>,
    pub weight: FloatTensor<B>,
}

/// Which gradients a backward call computes (`x`, `weight`, `bias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearGrads {
    pub x: bool,
    pub weight: bool,
    pub bias: bool,
}

pub trait LinearBackend: Backend {
    /// `x·Wᵀ + b` over the last dimension of `x` (any rank ≥ 1): `x` `[..., K]`, `weight`
    /// `[N, K]` (PyTorch's layout), `bias` `[N]`; the result is `[..., N]`.
    fn linear_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        linear_composed::<Self>(x, weight, bias)
    }

    /// `[dx, dweight, dbias]` of [`linear_forward`](Self::linear_forward), each computed only when asked.
    fn linear_backward(grad: FloatTensor<Self>, saved: LinearSaved<Self>, wanted: LinearGrads) -> [Option<FloatTensor<Self>>; 3] {
        linear_backward_composed::<Self>(grad, saved, wanted)
    }
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `(rows, K)` of `x` seen as a matrix over its last dimension.
fn rows_of(shape: &Shape) -> (usize, usize) {
    let k = shape[shape.num_dims() - 1];
    (shape.num_elements().checked_div(k).unwrap_or(0), k)
}

/// `x`'s shape with the last dimension replaced by `n`.
fn with_last(shape: &Shape, n: usize) -> Shape {
    let mut out = shape.clone();
    if let Some(last) = out.as_mut_slice().last_mut() {
        *last = n;
    }
    out
}

fn linear_composed<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, bias: Option<FloatTensor<B>>) -> FloatTensor<B> {
    let shape = x.shape();
    let (m, k) = rows_of(&shape);
    let w = float::<B, 2>(weight);
    let n = w.dims()[0];
    let x2 = float::<B, 2>(B::float_reshape(x, Shape::new([m, k])));
    let mut y = x2.matmul(w.transpose());
    if let Some(b) = bias {
        y = y + float::<B, 1>(b).unsqueeze::<2>();
    }
    B::float_reshape(y.into_primitive().tensor(), with_last(&shape, n))
}

fn linear_backward_composed<B: Backend>(grad: FloatTensor<B>, s: LinearSaved<B>, wanted: LinearGrads) -> [Option<FloatTensor<B>>; 3] {
    let shape = s.x.shape();
    let (m, k) = rows_of(&shape);
    let w = float::<B, 2>(s.weight);
    let n = w.dims()[0];
    let g = float::<B, 2>(B::float_reshape(grad, Shape::new([m, n])));
    let x = float::<B, 2>(B::float_reshape(s.x, Shape::new([m, k])));
    let dx = wanted.x.then(|| B::float_reshape(g.clone().matmul(w).into_primitive().tensor(), shape));
    let dw = wanted.weight.then(|| g.clone().transpose().matmul(x).into_primitive().tensor());
    let db = wanted.bias.then(|| g.sum_dim(0).reshape([n]).into_primitive().tensor());
    [dx, dw, db]
}

/// See [`LinearBackend::linear_forward`].
pub fn linear<B: LinearBackend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, D> {
    float(B::linear_forward(x.into_primitive().tensor(), weight.into_primitive().tensor(), bias.map(|b| b.into_primitive().tensor())))
}

// ---------------------------------------------------------------------------------------------
// Autodiff
// ---------------------------------------------------------------------------------------------

/// The node of a Linear with a bias (parents `x`, `weight`, `bias`).
#[derive(Debug)]
struct LinearBackward;

/// The node of a Linear without a bias (parents `x`, `weight`).
#[derive(Debug)]
struct LinearNoBiasBackward;

impl<B: LinearBackend> Backward<B, 3> for LinearBackward {
    type State = LinearSaved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [x, weight, bias] = ops.parents.each_ref().map(Option::is_some);
        let values = B::linear_backward(grad, ops.state, LinearGrads { x, weight, bias });
        for (node, g) in ops.parents.into_iter().zip(values) {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: LinearBackend> Backward<B, 2> for LinearNoBiasBackward {
    type State = LinearSaved<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [x, weight] = ops.parents.each_ref().map(Option::is_some);
        let values = B::linear_backward(grad, ops.state, LinearGrads { x, weight, bias: false });
        for (node, g) in ops.parents.into_iter().zip(values) {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: LinearBackend, C: CheckpointStrategy> LinearBackend for Autodiff<B, C> {
    fn linear_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        let (xp, wp) = (x.primitive, weight.primitive);
        // Compute-bound: the saved tensors are held, never recomputed.
        match bias {
            Some(bias) => {
                let y = B::linear_forward(xp.clone(), wp.clone(), Some(bias.primitive));
                match LinearBackward.prepare::<C>([x.node, weight.node, bias.node]).compute_bound().stateful() {
                    OpsKind::Tracked(prep) => prep.finish(LinearSaved { x: xp, weight: wp }, y),
                    OpsKind::UnTracked(prep) => prep.finish(y),
                }
            }
            None => {
                let y = B::linear_forward(xp.clone(), wp.clone(), None);
                match LinearNoBiasBackward.prepare::<C>([x.node, weight.node]).compute_bound().stateful() {
                    OpsKind::Tracked(prep) => prep.finish(LinearSaved { x: xp, weight: wp }, y),
                    OpsKind::UnTracked(prep) => prep.finish(y),
                }
            }
        }
    }
}

#[cfg(feature = "cuda")]
impl LinearBackend for crate::device::Cuda {}

// ---------------------------------------------------------------------------------------------
// NdArray: the CPU kernel
// ---------------------------------------------------------------------------------------------

impl LinearBackend for NdArray<f32> {
    fn linear_forward(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        let shape = x.shape();
        let (m, k) = rows_of(&shape);
        let n = weight.shape()[0];
        let bias_host = match &bias {
            Some(b) => host_f32(b).map(Some),
            None => Some(None),
        };
        let (Some(xs), Some(ws), Some(bs)) = (host_f32(&x), host_f32(&weight), bias_host) else {
            return linear_composed::<Self>(x, weight, bias);
        };
        let y = cpu::forward(&xs, &ws, bs.as_deref(), m, k, n);
        NdArrayTensor::from_data(TensorData::new(y, with_last(&shape, n)))
    }

    fn linear_backward(grad: FloatTensor<Self>, saved: LinearSaved<Self>, wanted: LinearGrads) -> [Option<FloatTensor<Self>>; 3] {
        let shape = saved.x.shape();
        let (m, k) = rows_of(&shape);
        let n = saved.weight.shape()[0];
        let (Some(g), Some(x), Some(w)) = (host_f32(&grad), host_f32(&saved.x), host_f32(&saved.weight)) else {
            return linear_backward_composed::<Self>(grad, saved, wanted);
        };
        let dx = wanted.x.then(|| NdArrayTensor::from_data(TensorData::new(cpu::grad_input(&g, &w, m, k, n), shape.clone())));
        let (dw, db) = cpu::grad_weight(&g, &x, m, k, n, wanted.weight, wanted.bias);
        [
            dx,
            dw.map(|v| NdArrayTensor::from_data(TensorData::new(v, [n, k]))),
            db.map(|v| NdArrayTensor::from_data(TensorData::new(v, [n]))),
        ]
    }
}

mod cpu {
    //! Row-major GEMMs split over threads by output rows; every thread writes its own rows.

    use super::super::conv::{for_image_chunks, gemm_strided, zeroed_by_image_chunks};
    use super::super::pool::compute_threads;

    /// Threads for a product of `macs` multiply-adds over `rows` output rows: about 1 ms of
    /// work per thread at least (a spawn costs tens of microseconds).
    fn threads(rows: usize, macs: usize) -> usize {
        const MIN_MACS_PER_THREAD: usize = 1 << 21;
        compute_threads().min(macs / MIN_MACS_PER_THREAD).clamp(1, rows.max(1))
    }

    /// `y[m, n] = Σ_k x[m, k]·w[n, k] + b[n]`.
    pub fn forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, k: usize, n: usize) -> Vec<f32> {
        if m == 0 || n == 0 {
            return vec![0.0f32; m * n];
        }
        zeroed_by_image_chunks(m * n, m, threads(m, m * k * n), |first, rows| {
            let count = rows.len() / n;
            if let Some(b) = bias {
                rows.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(b));
            }
            gemm_strided(count, k, n, &x[first * k..], (k, 1), w, (1, k), bias.is_some(), rows, (n, 1));
        })
    }

    /// `dx[m, k] = Σ_n dy[m, n]·w[n, k]`.
    pub fn grad_input(dy: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        if m == 0 || k == 0 {
            return vec![0.0f32; m * k];
        }
        zeroed_by_image_chunks(m * k, m, threads(m, m * k * n), |first, rows| {
            let count = rows.len() / k;
            gemm_strided(count, n, k, &dy[first * n..], (n, 1), w, (k, 1), false, rows, (k, 1));
        })
    }

    /// `dw[n, k] = Σ_m dy[m, n]·x[m, k]` and `db[n] = Σ_m dy[m, n]`, each when asked.
    pub fn grad_weight(dy: &[f32], x: &[f32], m: usize, k: usize, n: usize, weight: bool, bias: bool) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        let dw = weight.then(|| {
            let mut dw = vec![0.0f32; n * k];
            if k > 0 && n > 0 {
                for_image_chunks(&mut dw, n, threads(n, m * k * n), |first, rows| {
                    let count = rows.len() / k;
                    gemm_strided(count, m, k, &dy[first..], (1, n), x, (k, 1), false, rows, (k, 1));
                });
            }
            dw
        });
        let db = bias.then(|| {
            // Row by row in f64: `m` is the batch times the tokens (thousands of rows).
            let mut acc = vec![0.0f64; n];
            for row in dy.chunks_exact(n.max(1)).take(m) {
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64);
            }
            acc.into_iter().map(|v| v as f32).collect()
        });
        (dw, db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cpu, CpuAutodiff};
    use burn::tensor::Distribution;

    use crate::nn::test_util::{host, max_rel};

    /// The op and burn's matmul agree on the output and on the three gradients, for 2-D and
    /// 3-D inputs, with and without a bias, at sizes that run on one thread and on several.
    #[test]
    fn linear_matches_composed_ops() {
        let device = Default::default();
        for (m, k, n, with_bias) in [(5, 7, 3, true), (6, 7, 4, false), (8 * 197, 384, 1536, true), (200, 96, 96, false)] {
            let x0 = Tensor::<CpuAutodiff, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
            let w0 = Tensor::<CpuAutodiff, 2>::random([n, k], Distribution::Normal(0.0, 0.2), &device);
            let b0 = Tensor::<CpuAutodiff, 1>::random([n], Distribution::Normal(0.0, 0.5), &device);
            let r = Tensor::<CpuAutodiff, 2>::random([m, n], Distribution::Default, &device);
            let run = |fused: bool| {
                let (x, w, b) = (x0.clone().require_grad(), w0.clone().require_grad(), b0.clone().require_grad());
                let bias = with_bias.then(|| b.clone());
                let y: Tensor<CpuAutodiff, 2> = if fused {
                    linear(x.clone(), w.clone(), bias)
                } else {
                    let y = x.clone().matmul(w.clone().transpose());
                    match bias {
                        Some(b) => y + b.unsqueeze(),
                        None => y,
                    }
                };
                let grads = (y.clone() * r.clone()).sum().backward();
                let gb = with_bias.then(|| host(b.grad(&grads).unwrap()));
                (host(y), host(x.grad(&grads).unwrap()), host(w.grad(&grads).unwrap()), gb)
            };
            let (a, b) = (run(true), run(false));
            assert!(max_rel(&a.0, &b.0) < 1e-5, "output {m}x{k}x{n}");
            assert!(max_rel(&a.1, &b.1) < 1e-5, "dx {m}x{k}x{n}");
            assert!(max_rel(&a.2, &b.2) < 1e-5, "dweight {m}x{k}x{n}");
            if let (Some(ga), Some(gb)) = (a.3, b.3) {
                assert!(max_rel(&ga, &gb) < 1e-5, "dbias {m}x{k}x{n}");
            }
        }
    }

    /// A rank-4 input keeps its leading dimensions; an input that is a permuted (strided) view
    /// gives the same result as its contiguous copy.
    #[test]
    fn linear_keeps_leading_dims_and_reads_strided_inputs() {
        let device = Default::default();
        let x = Tensor::<Cpu, 4>::random([2, 6, 3, 5], Distribution::Default, &device);
        let w = Tensor::<Cpu, 2>::random([4, 6], Distribution::Default, &device);
        let b = Tensor::<Cpu, 1>::random([4], Distribution::Default, &device);
        let permuted = x.clone().permute([0, 2, 3, 1]);
        let contiguous = Tensor::<Cpu, 4>::from_data(permuted.clone().into_data(), &device);
        let y1 = linear(permuted, w.clone(), Some(b.clone()));
        let y2 = linear(contiguous.clone(), w.clone(), Some(b.clone()));
        assert_eq!(y1.dims(), [2, 3, 5, 4]);
        let want = contiguous.matmul(w.transpose().unsqueeze::<4>()) + b.unsqueeze::<4>();
        assert!(max_rel(&host(y1.clone()), &host(y2)) == 0.0);
        assert!(max_rel(&host(y1), &host(want)) < 1e-6);
    }

    /// The backward against f64 central differences of `Σ r·(x·Wᵀ + b)`, which is linear, so
    /// the check is exact up to rounding: it pins the index conventions of the three GEMMs.
    #[test]
    fn linear_gradient_matches_finite_differences() {
        let (m, k, n) = (3, 4, 2);
        let device = Default::default();
        let xs: Vec<f64> = (0..m * k).map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0).collect();
        let ws: Vec<f64> = (0..n * k).map(|i| ((i * 5 % 7) as f64 - 3.0) / 3.0).collect();
        let r: Vec<f64> = (0..m * n).map(|i| ((i * 3 % 5) as f64 - 2.0) / 2.0).collect();
        let loss = |xs: &[f64], ws: &[f64], b: f64| {
            let mut total = 0.0;
            for i in 0..m {
                for j in 0..n {
                    let y: f64 = (0..k).map(|l| xs[i * k + l] * ws[j * k + l]).sum::<f64>() + b;
                    total += r[i * n + j] * y;
                }
            }
            total
        };
        let t = |v: &[f64], s: [usize; 2]| Tensor::<CpuAutodiff, 2>::from_data(TensorData::new(v.iter().map(|&a| a as f32).collect::<Vec<_>>(), s), &device);
        let x = t(&xs, [m, k]).require_grad();
        let w = t(&ws, [n, k]).require_grad();
        let b = Tensor::<CpuAutodiff, 1>::full([n], 0.25, &device).require_grad();
        let grads = (linear(x.clone(), w.clone(), Some(b.clone())) * t(&r, [m, n])).sum().backward();
        let (gx, gw, gb) = (host(x.grad(&grads).unwrap()), host(w.grad(&grads).unwrap()), host(b.grad(&grads).unwrap()));
        let h = 1e-3;
        for i in 0..m * k {
            let (mut p, mut q) = (xs.clone(), xs.clone());
            p[i] += h;
            q[i] -= h;
            let num = (loss(&p, &ws, 0.25) - loss(&q, &ws, 0.25)) / (2.0 * h);
            assert!((num - gx[i] as f64).abs() < 1e-5, "dx[{i}]: {num} vs {}", gx[i]);
        }
        for i in 0..n * k {
            let (mut p, mut q) = (ws.clone(), ws.clone());
            p[i] += h;
            q[i] -= h;
            let num = (loss(&xs, &p, 0.25) - loss(&xs, &q, 0.25)) / (2.0 * h);
            assert!((num - gw[i] as f64).abs() < 1e-5, "dweight[{i}]: {num} vs {}", gw[i]);
        }
        for j in 0..n {
            let num: f64 = (0..m).map(|i| r[i * n + j]).sum();
            assert!((num - gb[j] as f64).abs() < 1e-6, "dbias[{j}]");
        }
    }

    /// Only the gradients the graph needs are computed: a frozen weight gets none and the input
    /// still gets its gradient.
    #[test]
    fn frozen_weight_gets_no_gradient() {
        let device = Default::default();
        let x = Tensor::<CpuAutodiff, 2>::random([4, 3], Distribution::Default, &device).require_grad();
        let w = Tensor::<CpuAutodiff, 2>::random([2, 3], Distribution::Default, &device);
        let grads = linear(x.clone(), w.clone(), None).sum().backward();
        assert!(w.grad(&grads).is_none());
        let gx = host(x.grad(&grads).unwrap());
        let col_sums: Vec<f32> = (0..3).map(|l| host(w.clone().inner()).chunks(3).map(|r| r[l]).sum()).collect();
        for row in gx.chunks(3) {
            assert!(max_rel(row, &col_sums) < 1e-6);
        }
    }
}
