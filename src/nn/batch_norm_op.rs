//! Training-mode BatchNorm (and the ReLU after it) as one backend op with an analytic backward.
//!
//! Composed from burn's tensor ops, a training BatchNorm over an NCHW activation was a transpose,
//! a copy, two reductions, four broadcast element-wise ops and a ReLU, each a pass over memory
//! with its own allocation, and as many again in the backward: about a third of a small-CNN
//! training step on the CPU. [`NormBackend::batch_norm_train`] computes the batch statistics and
//! the normalised, activated output in three passes, and its backward in three more.
//!
//! The defaults compose burn's ops, so every backend runs it; NdArray has the fused CPU kernel,
//! and `Autodiff<B>` records one node whose backward calls the inner backend's
//! [`NormBackend::batch_norm_train_backward`].

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorMetadata, TensorPrimitive};

use super::conv::host_f32;

/// `y = relu?(γ·(x − μ)/√(σ² + ε) + β)` with `μ`, `σ²` the biased batch statistics of each
/// channel, and those statistics (for the running estimates).
pub struct BatchNormTrain<B: Backend> {
    pub output: FloatTensor<B>,
    /// `[C]`, not tracked by autodiff.
    pub mean: FloatTensor<B>,
    /// `[C]`, biased (divided by `N·H·W`), not tracked by autodiff.
    pub var: FloatTensor<B>,
}

/// What the backward needs besides the output gradient.
#[derive(Debug, Clone)]
pub struct BatchNormSaved<B: Backend> {
    pub x: FloatTensor<B>,
    /// The op's output (its sign is the ReLU's mask).
    pub output: FloatTensor<B>,
    pub weight: FloatTensor<B>,
    pub mean: FloatTensor<B>,
    pub var: FloatTensor<B>,
    pub eps: f64,
    pub relu: bool,
}

pub trait NormBackend: Backend {
    /// Training-mode BatchNorm over `(N, H, W)` of an NCHW `x`, `weight` and `bias` of shape
    /// `[C]`, then a ReLU when `relu`.
    fn batch_norm_train(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, eps: f64, relu: bool) -> BatchNormTrain<Self> {
        batch_norm_train_composed::<Self>(x, weight, bias, eps, relu)
    }

    /// Inference BatchNorm as the affine map it is once the statistics are fixed:
    /// `relu?(x·scale[c] + shift[c])` over an NCHW `x`, one pass over memory (the composed ops
    /// took two or three, single-threaded).
    fn channel_affine(x: FloatTensor<Self>, scale: FloatTensor<Self>, shift: FloatTensor<Self>, relu: bool) -> FloatTensor<Self> {
        channel_affine_composed::<Self>(x, scale, shift, relu)
    }

    /// `(dx, dweight, dbias)` of [`batch_norm_train`](Self::batch_norm_train).
    fn batch_norm_train_backward(grad: FloatTensor<Self>, saved: BatchNormSaved<Self>) -> [FloatTensor<Self>; 3] {
        batch_norm_train_backward_composed::<Self>(grad, saved)
    }
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn batch_norm_train_composed<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, bias: FloatTensor<B>, eps: f64, relu: bool) -> BatchNormTrain<B> {
    let x = float::<B, 4>(x);
    let [n, c, h, w] = x.dims();
    let (var, mean) = x.clone().swap_dims(0, 1).reshape([c, n * h * w]).var_mean_bias(1);
    let (mean, var) = (mean.reshape([c]), var.reshape([c]));
    let scale = float::<B, 1>(weight) / (var.clone() + eps).sqrt();
    let shift = float::<B, 1>(bias) - mean.clone() * scale.clone();
    let y = x * scale.reshape([1, c, 1, 1]) + shift.reshape([1, c, 1, 1]);
    let y = if relu { burn::tensor::activation::relu(y) } else { y };
    BatchNormTrain { output: y.into_primitive().tensor(), mean: mean.into_primitive().tensor(), var: var.into_primitive().tensor() }
}

fn batch_norm_train_backward_composed<B: Backend>(grad: FloatTensor<B>, s: BatchNormSaved<B>) -> [FloatTensor<B>; 3] {
    let x = float::<B, 4>(s.x);
    let [n, c, h, w] = x.dims();
    let per_channel = |t: Tensor<B, 1>| t.reshape([1, c, 1, 1]);
    let mut dy = float::<B, 4>(grad);
    if s.relu {
        dy = dy.mask_fill(float::<B, 4>(s.output).lower_equal_elem(0.0), 0.0);
    }
    let invstd = (float::<B, 1>(s.var) + s.eps).sqrt().recip();
    let xhat = (x - per_channel(float::<B, 1>(s.mean))) * per_channel(invstd.clone());
    let sum_c = |t: Tensor<B, 4>| t.sum_dim(0).sum_dim(2).sum_dim(3).reshape([c]);
    let dbias = sum_c(dy.clone());
    let dweight = sum_c(dy.clone() * xhat.clone());
    let m = (n * h * w) as f64;
    let k = float::<B, 1>(s.weight) * invstd;
    let dx = (dy - (per_channel(dbias.clone()) + xhat * per_channel(dweight.clone())) / m) * per_channel(k);
    [dx.into_primitive().tensor(), dweight.into_primitive().tensor(), dbias.into_primitive().tensor()]
}

fn channel_affine_composed<B: Backend>(x: FloatTensor<B>, scale: FloatTensor<B>, shift: FloatTensor<B>, relu: bool) -> FloatTensor<B> {
    let x = float::<B, 4>(x);
    let c = x.dims()[1];
    let y = x * float::<B, 1>(scale).reshape([1, c, 1, 1]) + float::<B, 1>(shift).reshape([1, c, 1, 1]);
    let y = if relu { burn::tensor::activation::relu(y) } else { y };
    y.into_primitive().tensor()
}

/// See [`NormBackend::channel_affine`].
pub fn channel_affine<B: NormBackend>(x: Tensor<B, 4>, scale: Tensor<B, 1>, shift: Tensor<B, 1>, relu: bool) -> Tensor<B, 4> {
    float(B::channel_affine(x.into_primitive().tensor(), scale.into_primitive().tensor(), shift.into_primitive().tensor(), relu))
}

/// See [`NormBackend::batch_norm_train`].
pub fn batch_norm_train<B: NormBackend>(x: Tensor<B, 4>, weight: Tensor<B, 1>, bias: Tensor<B, 1>, eps: f64, relu: bool) -> (Tensor<B, 4>, Tensor<B, 1>, Tensor<B, 1>) {
    let out = B::batch_norm_train(x.into_primitive().tensor(), weight.into_primitive().tensor(), bias.into_primitive().tensor(), eps, relu);
    (float(out.output), float(out.mean), float(out.var))
}

// ---------------------------------------------------------------------------------------------
// Autodiff
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct BatchNormBackward;

impl<B: NormBackend> Backward<B, 3> for BatchNormBackward {
    type State = BatchNormSaved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [dx, dw, db] = B::batch_norm_train_backward(grad, ops.state);
        for (node, g) in ops.parents.into_iter().zip([dx, dw, db]) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: NormBackend, C: CheckpointStrategy> NormBackend for Autodiff<B, C> {
    fn batch_norm_train(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, eps: f64, relu: bool) -> BatchNormTrain<Self> {
        let nodes = [x.node.clone(), weight.node.clone(), bias.node.clone()];
        let (xp, wp) = (x.primitive, weight.primitive);
        let out = B::batch_norm_train(xp.clone(), wp.clone(), bias.primitive, eps, relu);
        let (mean, var) = (Self::from_inner(out.mean.clone()), Self::from_inner(out.var.clone()));
        // Compute-bound: the saved tensors are held, never recomputed.
        let output = match BatchNormBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let saved = BatchNormSaved { x: xp, output: out.output.clone(), weight: wp, mean: out.mean, var: out.var, eps, relu };
                prep.finish(saved, out.output)
            }
            OpsKind::UnTracked(prep) => prep.finish(out.output),
        };
        BatchNormTrain { output, mean, var }
    }
}

#[cfg(feature = "cuda")]
impl NormBackend for crate::device::Cuda {}

// ---------------------------------------------------------------------------------------------
// NdArray: the fused CPU kernel
// ---------------------------------------------------------------------------------------------

impl NormBackend for NdArray<f32> {
    fn batch_norm_train(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, eps: f64, relu: bool) -> BatchNormTrain<Self> {
        let s = x.shape();
        let (Some(xs), Some(ws), Some(bs)) = (host_f32(&x), host_f32(&weight), host_f32(&bias)) else {
            return batch_norm_train_composed::<Self>(x, weight, bias, eps, relu);
        };
        let dims = [s[0], s[1], s[2], s[3]];
        let (y, mean, var) = cpu::forward(&xs, dims, &ws, &bs, eps, relu);
        let c = dims[1];
        BatchNormTrain {
            output: NdArrayTensor::from_data(TensorData::new(y, dims)),
            mean: NdArrayTensor::from_data(TensorData::new(mean, [c])),
            var: NdArrayTensor::from_data(TensorData::new(var, [c])),
        }
    }

    fn channel_affine(x: FloatTensor<Self>, scale: FloatTensor<Self>, shift: FloatTensor<Self>, relu: bool) -> FloatTensor<Self> {
        let s = x.shape();
        let (Some(xs), Some(sc), Some(sh)) = (host_f32(&x), host_f32(&scale), host_f32(&shift)) else {
            return channel_affine_composed::<Self>(x, scale, shift, relu);
        };
        let dims = [s[0], s[1], s[2], s[3]];
        NdArrayTensor::from_data(TensorData::new(cpu::affine(&xs, dims, &sc, &sh, relu), dims))
    }

    fn batch_norm_train_backward(grad: FloatTensor<Self>, saved: BatchNormSaved<Self>) -> [FloatTensor<Self>; 3] {
        let s = saved.x.shape();
        let dims = [s[0], s[1], s[2], s[3]];
        let host = (host_f32(&grad), host_f32(&saved.x), host_f32(&saved.output), host_f32(&saved.weight), host_f32(&saved.mean), host_f32(&saved.var));
        let (Some(g), Some(x), Some(y), Some(w), Some(m), Some(v)) = host else {
            return batch_norm_train_backward_composed::<Self>(grad, saved);
        };
        let (dx, dw, db) = cpu::backward(&g, &x, &y, dims, &w, &m, &v, saved.eps, saved.relu);
        let c = dims[1];
        [
            NdArrayTensor::from_data(TensorData::new(dx, dims)),
            NdArrayTensor::from_data(TensorData::new(dw, [c])),
            NdArrayTensor::from_data(TensorData::new(db, [c])),
        ]
    }
}

mod cpu {
    //! Statistics are accumulated per plane in sixteen f32 lanes (so the loops vectorise) and
    //! across planes in f64. Reductions run over channel ranges, the element-wise passes over
    //! image ranges, each on up to `compute_threads()` threads.

    use crate::nn::conv::{for_image_ranges, zeroed_by_image_chunks};
    use crate::nn::pool::compute_threads;

    /// Threads for a memory-bound pass over `elements` values: one per 256 K values at least.
    fn threads_for(elements: usize) -> usize {
        compute_threads().min(elements >> 18).max(1)
    }

    const L: usize = 16;

    /// `(Σ (v − k), Σ (v − k)²)` of a plane. The shift `k` (a value near the channel's mean)
    /// keeps the one-pass variance from cancelling when the mean is large against the spread.
    fn plane_moments(plane: &[f32], k: f32) -> (f64, f64) {
        let (mut s, mut q) = ([0.0f32; L], [0.0f32; L]);
        let mut it = plane.chunks_exact(L);
        for chunk in &mut it {
            let chunk: &[f32; L] = chunk.try_into().unwrap_or_else(|_| unreachable!());
            for l in 0..L {
                let d = chunk[l] - k;
                s[l] += d;
                q[l] += d * d;
            }
        }
        let (mut ts, mut tq) = (0.0f64, 0.0f64);
        for &v in it.remainder() {
            let d = (v - k) as f64;
            ts += d;
            tq += d * d;
        }
        (s.iter().map(|&v| v as f64).sum::<f64>() + ts, q.iter().map(|&v| v as f64).sum::<f64>() + tq)
    }

    /// The gradient through the ReLU: `g` where the output is positive. A select, not a branch:
    /// the sign of an activation is a coin flip, and a branch on it mispredicted half the time.
    #[inline(always)]
    fn through_relu<const RELU: bool>(g: f32, y: f32) -> f32 {
        if !RELU || y > 0.0 { g } else { 0.0 }
    }

    /// `(Σ d, Σ d·(x − μ))` over a plane, `d` the output gradient through the ReLU's mask.
    fn plane_grad_sums<const RELU: bool>(g: &[f32], x: &[f32], y: &[f32], mu: f32) -> (f64, f64) {
        let (mut s1, mut s2) = ([0.0f32; L], [0.0f32; L]);
        let (mut gi, mut xi, mut yi) = (g.chunks_exact(L), x.chunks_exact(L), y.chunks_exact(L));
        for ((gc, xc), yc) in (&mut gi).zip(&mut xi).zip(&mut yi) {
            let gc: &[f32; L] = gc.try_into().unwrap_or_else(|_| unreachable!());
            let xc: &[f32; L] = xc.try_into().unwrap_or_else(|_| unreachable!());
            let yc: &[f32; L] = yc.try_into().unwrap_or_else(|_| unreachable!());
            for l in 0..L {
                let d = through_relu::<RELU>(gc[l], yc[l]);
                s1[l] += d;
                s2[l] += d * (xc[l] - mu);
            }
        }
        let (mut t1, mut t2) = (0.0f64, 0.0f64);
        for ((&gv, &xv), &yv) in gi.remainder().iter().zip(xi.remainder()).zip(yi.remainder()) {
            let d = through_relu::<RELU>(gv, yv) as f64;
            t1 += d;
            t2 += d * (xv - mu) as f64;
        }
        (s1.iter().map(|&v| v as f64).sum::<f64>() + t1, s2.iter().map(|&v| v as f64).sum::<f64>() + t2)
    }

    /// `dx = k·(d − mg − (x − μ)·mgx)` over a plane.
    fn plane_dx<const RELU: bool>(out: &mut [f32], g: &[f32], x: &[f32], y: &[f32], [k, mg, mgx, mu]: [f32; 4]) {
        for (((o, &gv), &xv), &yv) in out.iter_mut().zip(g).zip(x).zip(y) {
            *o = k * (through_relu::<RELU>(gv, yv) - mg - (xv - mu) * mgx);
        }
    }

    /// `(y, mean, biased var)`.
    pub fn forward(x: &[f32], dims: [usize; 4], weight: &[f32], bias: &[f32], eps: f64, relu: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let [n, c, h, w] = dims;
        let (hw, m) = (h * w, (n * h * w).max(1) as f64);
        let threads = threads_for(x.len());
        let stats: Vec<(f64, f64)> = for_image_ranges(c, threads, |first, count| {
            (first..first + count)
                .map(|ch| {
                    let k = if hw > 0 && n > 0 { x[ch * hw] } else { 0.0 };
                    let (s, q) = (0..n).map(|img| plane_moments(&x[(img * c + ch) * hw..][..hw], k)).fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
                    let (ds, dq) = (s / m, q / m);
                    (k as f64 + ds, (dq - ds * ds).max(0.0))
                })
                .collect::<Vec<_>>()
        })
        .concat();
        let (scale, shift): (Vec<f32>, Vec<f32>) = (0..c)
            .map(|ch| {
                let (mean, var) = stats[ch];
                let s = weight[ch] as f64 / (var + eps).sqrt();
                (s as f32, (bias[ch] as f64 - mean * s) as f32)
            })
            .unzip();
        let y = affine(x, dims, &scale, &shift, relu);
        (y, stats.iter().map(|s| s.0 as f32).collect(), stats.iter().map(|s| s.1 as f32).collect())
    }

    /// `relu?(x·scale[c] + shift[c])`.
    pub fn affine(x: &[f32], [n, c, h, w]: [usize; 4], scale: &[f32], shift: &[f32], relu: bool) -> Vec<f32> {
        let hw = h * w;
        zeroed_by_image_chunks(x.len(), n, threads_for(x.len()), |first, out| {
            for (p, plane) in out.chunks_exact_mut(hw.max(1)).enumerate() {
                let ch = p % c;
                let src = &x[(first * c + p) * hw..][..hw];
                let (s, b) = (scale[ch], shift[ch]);
                if relu {
                    // `<` keeps a NaN as NaN, as PyTorch's ReLU does.
                    plane.iter_mut().zip(src).for_each(|(o, &v)| {
                        let z = v * s + b;
                        *o = if z < 0.0 { 0.0 } else { z };
                    });
                } else {
                    plane.iter_mut().zip(src).for_each(|(o, &v)| *o = v * s + b);
                }
            }
        })
    }

    /// `(dx, dweight, dbias)`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        grad: &[f32],
        x: &[f32],
        y: &[f32],
        dims: [usize; 4],
        weight: &[f32],
        mean: &[f32],
        var: &[f32],
        eps: f64,
        relu: bool,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let [n, c, h, w] = dims;
        let (hw, m) = (h * w, (n * h * w).max(1) as f64);
        let threads = threads_for(x.len());
        let sums: Vec<(f64, f64)> = for_image_ranges(c, threads, |first, count| {
            (first..first + count)
                .map(|ch| {
                    (0..n)
                        .map(|img| {
                            let at = (img * c + ch) * hw;
                            let (g, xv, yv) = (&grad[at..][..hw], &x[at..][..hw], &y[at..][..hw]);
                            if relu { plane_grad_sums::<true>(g, xv, yv, mean[ch]) } else { plane_grad_sums::<false>(g, xv, yv, mean[ch]) }
                        })
                        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
                })
                .collect::<Vec<_>>()
        })
        .concat();
        let invstd: Vec<f64> = var.iter().map(|&v| 1.0 / (v as f64 + eps).sqrt()).collect();
        let dbias: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
        let dweight: Vec<f32> = sums.iter().zip(&invstd).map(|(s, &is)| (s.1 * is) as f32).collect();
        // dx = k·(d − Σd/M − (x − μ)·Σd(x − μ)·invstd²/M), k = γ·invstd.
        let coef: Vec<[f32; 4]> = (0..c)
            .map(|ch| {
                let k = weight[ch] as f64 * invstd[ch];
                let (s1, s2) = sums[ch];
                [k as f32, (s1 / m) as f32, (s2 * invstd[ch] * invstd[ch] / m) as f32, mean[ch]]
            })
            .collect();
        let dx = zeroed_by_image_chunks(x.len(), n, threads, |first, out| {
            for (p, plane) in out.chunks_exact_mut(hw.max(1)).enumerate() {
                let at = (first * c + p) * hw;
                let (g, xv, yv) = (&grad[at..][..hw], &x[at..][..hw], &y[at..][..hw]);
                if relu {
                    plane_dx::<true>(plane, g, xv, yv, coef[p % c]);
                } else {
                    plane_dx::<false>(plane, g, xv, yv, coef[p % c]);
                }
            }
        });
        (dx, dweight, dbias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cpu, CpuAutodiff};
    use burn::tensor::Distribution;

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    fn vec<const D: usize>(t: Tensor<CpuAutodiff, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    /// The fused op and burn's composed ops agree on the output, the statistics and all three
    /// gradients, with and without the ReLU, on planes that are not a multiple of the lane width.
    #[test]
    fn fused_batch_norm_matches_composed_ops() {
        let device = Default::default();
        for (relu, dims) in [(true, [5, 3, 7, 9]), (false, [4, 6, 4, 4]), (true, [2, 40, 33, 33])] {
            let c = dims[1];
            let x0 = Tensor::<CpuAutodiff, 4>::random(dims, Distribution::Normal(0.5, 2.0), &device);
            let w0 = Tensor::<CpuAutodiff, 1>::random([c], Distribution::Uniform(0.5, 1.5), &device);
            let b0 = Tensor::<CpuAutodiff, 1>::random([c], Distribution::Uniform(-0.5, 0.5), &device);
            let r = Tensor::<CpuAutodiff, 4>::random(dims, Distribution::Default, &device);
            let run = |fused: bool| {
                let (x, w, b) = (x0.clone().require_grad(), w0.clone().require_grad(), b0.clone().require_grad());
                let (y, mean, var) = if fused {
                    batch_norm_train(x.clone(), w.clone(), b.clone(), 1e-5, relu)
                } else {
                    let o = batch_norm_train_composed::<CpuAutodiff>(
                        x.clone().into_primitive().tensor(),
                        w.clone().into_primitive().tensor(),
                        b.clone().into_primitive().tensor(),
                        1e-5,
                        relu,
                    );
                    (float(o.output), float(o.mean), float(o.var))
                };
                let grads = (y.clone() * r.clone()).sum().backward();
                let g = |t: &Tensor<CpuAutodiff, 1>| t.grad(&grads).unwrap().into_data().convert::<f32>().to_vec::<f32>().unwrap();
                let gx = x.grad(&grads).unwrap().into_data().convert::<f32>().to_vec::<f32>().unwrap();
                (vec(y), vec(mean.detach()), vec(var.detach()), gx, g(&w), g(&b))
            };
            let (fused, composed) = (run(true), run(false));
            assert!(max_rel(&fused.0, &composed.0) < 1e-5, "output, relu={relu}");
            assert!(max_rel(&fused.1, &composed.1) < 1e-5, "mean");
            assert!(max_rel(&fused.2, &composed.2) < 1e-5, "var");
            assert!(max_rel(&fused.3, &composed.3) < 1e-4, "dx, relu={relu} {dims:?}");
            assert!(max_rel(&fused.4, &composed.4) < 1e-4, "dweight");
            assert!(max_rel(&fused.5, &composed.5) < 1e-4, "dbias");
        }
    }

    /// The analytic backward against central differences in f64 of the loss `Σ r·y`.
    #[test]
    fn fused_batch_norm_gradient_matches_finite_differences() {
        let dims = [3, 2, 3, 4];
        let device = Default::default();
        let x = Tensor::<Cpu, 4>::random(dims, Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Cpu, 1>::random([2], Distribution::Uniform(0.5, 1.5), &device);
        let b = Tensor::<Cpu, 1>::random([2], Distribution::Uniform(-0.3, 0.3), &device);
        let r: Vec<f64> = Tensor::<Cpu, 4>::random(dims, Distribution::Default, &device).into_data().convert::<f64>().to_vec().unwrap();
        let xs: Vec<f64> = x.clone().into_data().convert::<f64>().to_vec().unwrap();
        let (ws, bs): (Vec<f64>, Vec<f64>) = (w.clone().into_data().convert::<f64>().to_vec().unwrap(), b.clone().into_data().convert::<f64>().to_vec().unwrap());
        // f64 reference of Σ r·relu(bn(x)).
        let loss = |xs: &[f64], ws: &[f64], bs: &[f64]| {
            let [n, c, h, wd] = dims;
            let hw = h * wd;
            let mut total = 0.0;
            for ch in 0..c {
                let vals: Vec<(usize, f64)> = (0..n).flat_map(|i| (0..hw).map(move |p| (i * c + ch) * hw + p)).map(|k| (k, xs[k])).collect();
                let mu = vals.iter().map(|v| v.1).sum::<f64>() / vals.len() as f64;
                let var = vals.iter().map(|v| (v.1 - mu).powi(2)).sum::<f64>() / vals.len() as f64;
                for (k, v) in vals {
                    let z = ws[ch] * (v - mu) / (var + 1e-5).sqrt() + bs[ch];
                    total += r[k] * z.max(0.0);
                }
            }
            total
        };
        let xa = Tensor::<CpuAutodiff, 4>::from_inner(x).require_grad();
        let wa = Tensor::<CpuAutodiff, 1>::from_inner(w).require_grad();
        let ba = Tensor::<CpuAutodiff, 1>::from_inner(b).require_grad();
        let (y, _, _) = batch_norm_train(xa.clone(), wa.clone(), ba.clone(), 1e-5, true);
        let rt = Tensor::<CpuAutodiff, 4>::from_data(TensorData::new(r.iter().map(|&v| v as f32).collect::<Vec<_>>(), dims), &device);
        let grads = (y * rt).sum().backward();
        let gx: Vec<f32> = xa.grad(&grads).unwrap().into_data().convert::<f32>().to_vec().unwrap();
        let gw: Vec<f32> = wa.grad(&grads).unwrap().into_data().convert::<f32>().to_vec().unwrap();
        let gb: Vec<f32> = ba.grad(&grads).unwrap().into_data().convert::<f32>().to_vec().unwrap();
        let h = 1e-6;
        let central = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
        for k in 0..xs.len() {
            let num = central(&|d| {
                let mut p = xs.clone();
                p[k] += d;
                loss(&p, &ws, &bs)
            });
            assert!((num - gx[k] as f64).abs() < 1e-3 * (1.0 + num.abs()), "dx[{k}]: {num} vs {}", gx[k]);
        }
        for ch in 0..2 {
            let nw = central(&|d| {
                let mut p = ws.clone();
                p[ch] += d;
                loss(&xs, &p, &bs)
            });
            let nb = central(&|d| {
                let mut p = bs.clone();
                p[ch] += d;
                loss(&xs, &ws, &p)
            });
            assert!((nw - gw[ch] as f64).abs() < 1e-3 * (1.0 + nw.abs()), "dweight[{ch}]: {nw} vs {}", gw[ch]);
            assert!((nb - gb[ch] as f64).abs() < 1e-3 * (1.0 + nb.abs()), "dbias[{ch}]: {nb} vs {}", gb[ch]);
        }
    }
}
