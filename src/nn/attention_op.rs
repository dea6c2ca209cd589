//! Multi-head softmax attention from the `qkv` projection's output, as one backend op with an
//! analytic backward.
//!
//! Composed from burn's ops, attention reshapes and permutes `qkv` into `[3, N, H, T, d]` (a
//! copy), runs two batched matmuls (matrixmultiply, one small GEMM per image and head), a scale,
//! a softmax and another permute-and-copy back to `[N, T, C]`; autodiff records each step.
//! [`AttentionBackend::attention_from_qkv`] reads `q`, `k` and `v` in place from `qkv` `[N, T, 3C]`
//! (strided GEMM operands), computes each head's `softmax(scale·q·kᵀ)` into one `T × T` buffer
//! and writes `P·v` straight into its columns of the output. The backward is four GEMMs per
//! head (`dv = Pᵀ·dO`, `dP = dO·vᵀ`, `dq = dS·k`, `dk = dSᵀ·q`, with `dS = scale·P ⊙ (dP − Σ dP ⊙ P)`)
//! written into the columns of `dqkv`. Images are split over [`compute_threads`](super::pool::compute_threads) threads.
//!
//! The defaults compose burn's ops (other backends, CUDA); NdArray has the CPU kernel;
//! `Autodiff<B>` records one node that keeps `qkv` and the probabilities.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorMetadata, TensorPrimitive};

use super::conv::host_f32;

/// What the backward needs besides the output gradient.
#[derive(Debug, Clone)]
pub struct AttentionSaved<B: Backend> {
    /// `[N, T, 3C]`.
    pub qkv: FloatTensor<B>,
    /// `softmax(scale·q·kᵀ)`, `[N, H, T, T]`.
    pub probs: FloatTensor<B>,
    pub heads: usize,
    pub scale: f64,
}

pub trait AttentionBackend: Backend {
    /// `softmax(scale·q·kᵀ + bias)·v` per head (`scale > 0`), from `qkv` `[N, T, 3C]` laid out
    /// as timm's `qkv(x).reshape(N, T, 3, H, d)`; the heads' outputs concatenated, `[N, T, C]`.
    /// `key_bias` `[N, T]`, when given, is added to every query's logit for key `j` (ToMe's
    /// proportional attention, `log(size)`); it is a constant for the backward. With
    /// `keep_probs`, also the probabilities `[N, H, T, T]` (for the backward).
    fn attention_from_qkv(
        qkv: FloatTensor<Self>,
        key_bias: Option<FloatTensor<Self>>,
        heads: usize,
        scale: f64,
        keep_probs: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let (out, probs) = attention_composed::<Self>(float(qkv), key_bias.map(float), heads, scale);
        (out.into_primitive().tensor(), keep_probs.then(|| probs.into_primitive().tensor()))
    }

    /// `dqkv` `[N, T, 3C]` of [`attention_from_qkv`](Self::attention_from_qkv).
    fn attention_backward(grad: FloatTensor<Self>, saved: AttentionSaved<Self>) -> FloatTensor<Self> {
        attention_backward_composed::<Self>(grad, saved)
    }
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `(q, k, v)`, each `[N, H, T, d]`.
fn split_heads<B: Backend>(qkv: Tensor<B, 3>, heads: usize) -> [Tensor<B, 4>; 3] {
    let [n, t, c3] = qkv.dims();
    let d = c3 / 3 / heads;
    let qkv = qkv.reshape([n, t, 3, heads, d]).permute([2, 0, 3, 1, 4]);
    [0, 1, 2].map(|i| qkv.clone().narrow(0, i, 1).reshape([n, heads, t, d]))
}

/// `[N, H, T, d]` → `[N, T, H·d]`.
fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [n, h, t, d] = x.dims();
    x.swap_dims(1, 2).reshape([n, t, h * d])
}

fn attention_composed<B: Backend>(
    qkv: Tensor<B, 3>,
    key_bias: Option<Tensor<B, 2>>,
    heads: usize,
    scale: f64,
) -> (Tensor<B, 3>, Tensor<B, 4>) {
    let [q, k, v] = split_heads(qkv, heads);
    let mut logits = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    if let Some(b) = key_bias {
        let [n, t] = b.dims();
        logits = logits + b.reshape([n, 1, 1, t]);
    }
    let probs = burn::tensor::activation::softmax(logits, 3);
    (merge_heads(probs.clone().matmul(v)), probs)
}

fn attention_backward_composed<B: Backend>(grad: FloatTensor<B>, s: AttentionSaved<B>) -> FloatTensor<B> {
    let [q, k, v] = split_heads(float::<B, 3>(s.qkv), s.heads);
    let p = float::<B, 4>(s.probs);
    let [n, h, t, d] = q.dims();
    let go = float::<B, 3>(grad).reshape([n, t, h, d]).swap_dims(1, 2);
    let dv = p.clone().swap_dims(2, 3).matmul(go.clone());
    let dp = go.matmul(v.swap_dims(2, 3));
    let ds = (p.clone() * (dp.clone() - (dp * p).sum_dim(3))).mul_scalar(s.scale);
    let dq = ds.clone().matmul(k);
    let dk = ds.swap_dims(2, 3).matmul(q);
    // [3, N, H, T, d] → [N, T, 3, H, d] → [N, T, 3C]
    let all = Tensor::stack::<5>(vec![dq, dk, dv], 0).permute([1, 3, 0, 2, 4]);
    all.reshape([n, t, 3 * h * d]).into_primitive().tensor()
}

/// See [`AttentionBackend::attention_from_qkv`]: `qkv` `[N, T, 3C]` → `[N, T, C]`.
pub fn attention<B: AttentionBackend>(qkv: Tensor<B, 3>, heads: usize, scale: f64) -> Tensor<B, 3> {
    attention_with_key_bias(qkv, None, heads, scale)
}

/// [`attention`] with `key_bias` `[N, T]` added to the logits of each key (ToMe's proportional
/// attention); no gradient flows into the bias.
pub fn attention_with_key_bias<B: AttentionBackend>(
    qkv: Tensor<B, 3>,
    key_bias: Option<Tensor<B, 2>>,
    heads: usize,
    scale: f64,
) -> Tensor<B, 3> {
    let bias = key_bias.map(|b| b.into_primitive().tensor());
    float(B::attention_from_qkv(qkv.into_primitive().tensor(), bias, heads, scale, false).0)
}

// ---------------------------------------------------------------------------------------------
// Autodiff
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct AttentionBackward;

impl<B: AttentionBackend> Backward<B, 1> for AttentionBackward {
    type State = AttentionSaved<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::attention_backward(grad, ops.state));
        }
    }
}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn attention_from_qkv(
        qkv: FloatTensor<Self>,
        key_bias: Option<FloatTensor<Self>>,
        heads: usize,
        scale: f64,
        _keep_probs: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let prep = AttentionBackward.prepare::<C>([qkv.node]).compute_bound().stateful();
        let qp = qkv.primitive;
        // The bias only shifts the logits: given the probabilities it saves, the backward is the
        // same, and the bias itself gets no gradient.
        let bias = key_bias.map(|b| b.primitive);
        let out = match prep {
            OpsKind::Tracked(prep) => {
                let (out, probs) = B::attention_from_qkv(qp.clone(), bias, heads, scale, true);
                let probs = probs.expect("the probabilities were asked for");
                prep.finish(AttentionSaved { qkv: qp, probs, heads, scale }, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::attention_from_qkv(qp, bias, heads, scale, false).0),
        };
        (out, None)
    }
}

#[cfg(feature = "cuda")]
impl AttentionBackend for crate::device::Cuda {}

// ---------------------------------------------------------------------------------------------
// NdArray: the CPU kernel
// ---------------------------------------------------------------------------------------------

impl AttentionBackend for NdArray<f32> {
    fn attention_from_qkv(
        qkv: FloatTensor<Self>,
        key_bias: Option<FloatTensor<Self>>,
        heads: usize,
        scale: f64,
        keep_probs: bool,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let s = qkv.shape();
        let (n, t, c3) = (s[0], s[1], s[2]);
        let bias = key_bias.as_ref().map(host_f32);
        let (Some(qs), None | Some(Some(_))) = (host_f32(&qkv), &bias) else {
            let (out, probs) = attention_composed::<Self>(float(qkv), key_bias.map(float), heads, scale);
            return (out.into_primitive().tensor(), keep_probs.then(|| probs.into_primitive().tensor()));
        };
        let g = cpu::Geom { n, t, heads, d: c3 / 3 / heads };
        let (out, probs) = cpu::forward(&qs, bias.flatten().as_deref(), &g, scale as f32, keep_probs);
        (
            NdArrayTensor::from_data(TensorData::new(out, [n, t, c3 / 3])),
            probs.map(|p| NdArrayTensor::from_data(TensorData::new(p, [n, heads, t, t]))),
        )
    }

    fn attention_backward(grad: FloatTensor<Self>, saved: AttentionSaved<Self>) -> FloatTensor<Self> {
        let s = saved.qkv.shape();
        let (n, t, c3) = (s[0], s[1], s[2]);
        let (Some(gs), Some(qs), Some(ps)) = (host_f32(&grad), host_f32(&saved.qkv), host_f32(&saved.probs)) else {
            return attention_backward_composed::<Self>(grad, saved);
        };
        let g = cpu::Geom { n, t, heads: saved.heads, d: c3 / 3 / saved.heads };
        NdArrayTensor::from_data(TensorData::new(cpu::backward(&gs, &qs, &ps, &g, saved.scale as f32), [n, t, c3]))
    }
}

mod cpu {
    use crate::nn::activation_op::fast::{exp, lanes};
    use crate::nn::conv::{for_image_chunks, gemm_strided, zeroed_by_image_chunks};
    use crate::nn::pool::compute_threads;

    #[derive(Debug, Clone, Copy)]
    pub struct Geom {
        pub n: usize,
        pub t: usize,
        pub heads: usize,
        pub d: usize,
    }

    impl Geom {
        fn c(&self) -> usize {
            self.heads * self.d
        }
    }

    /// Threads: images split over at most [`compute_threads`], ~1 ms of work each at least.
    fn threads(g: &Geom) -> usize {
        let macs = 2 * g.n * g.heads * g.t * g.t * g.d;
        compute_threads().min(macs >> 21).clamp(1, g.n.max(1))
    }

    /// Row-wise `softmax(scale·row + bias)` in place.
    fn softmax_rows(p: &mut [f32], t: usize, scale: f32, bias: Option<&[f32]>) {
        if let Some(b) = bias {
            for row in p.chunks_exact_mut(t) {
                for (v, &bj) in row.iter_mut().zip(b) {
                    *v = scale.mul_add(*v, bj);
                }
                let max = lanes::<true>(row, f32::NEG_INFINITY);
                for v in row.iter_mut() {
                    *v = exp(*v - max);
                }
                let inv = 1.0 / lanes::<false>(row, 0.0);
                row.iter_mut().for_each(|v| *v *= inv);
            }
            return;
        }
        for row in p.chunks_exact_mut(t) {
            let max = lanes::<true>(row, f32::NEG_INFINITY);
            for v in row.iter_mut() {
                *v = exp(scale * (*v - max));
            }
            let inv = 1.0 / lanes::<false>(row, 0.0);
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }

    /// `(out [N, T, C], probs [N, H, T, T] when kept)`; `bias` `[N, T]` is added to each key's logits.
    pub fn forward(qkv: &[f32], bias: Option<&[f32]>, g: &Geom, scale: f32, keep_probs: bool) -> (Vec<f32>, Option<Vec<f32>>) {
        let (t, d, c) = (g.t, g.d, g.c());
        let mut out = vec![0.0f32; g.n * t * c];
        let mut probs = keep_probs.then(|| vec![0.0f32; g.n * g.heads * t * t]);
        let per_image = g.heads * t * t;
        // The probabilities of the images a thread computes are written by it too: pair each
        // image's output slab with its probability slab.
        let probs_ptr = probs.as_mut().map(|p| SyncPtr(p.as_mut_ptr()));
        for_image_chunks(&mut out, g.n, threads(g), |first, chunk| {
            let mut scratch = vec![0.0f32; if keep_probs { 0 } else { t * t }];
            for (i, o) in chunk.chunks_exact_mut(t * c).enumerate() {
                let img = first + i;
                let x = &qkv[img * t * 3 * c..][..t * 3 * c];
                for h in 0..g.heads {
                    let p: &mut [f32] = match &probs_ptr {
                        // SAFETY: image `img`'s slab of `probs` is written by this thread only
                        // (images are split between threads), and `probs` outlives the scope.
                        Some(ptr) => unsafe { std::slice::from_raw_parts_mut(ptr.0.add(img * per_image + h * t * t), t * t) },
                        None => &mut scratch,
                    };
                    let (q, k, v) = (&x[h * d..], &x[c + h * d..], &x[2 * c + h * d..]);
                    gemm_strided(t, d, t, q, (3 * c, 1), k, (1, 3 * c), false, p, (t, 1));
                    softmax_rows(p, t, scale, bias.map(|b| &b[img * t..][..t]));
                    gemm_strided(t, t, d, p, (t, 1), v, (3 * c, 1), false, &mut o[h * d..], (c, 1));
                }
            }
        });
        (out, probs)
    }

    struct SyncPtr(*mut f32);
    // SAFETY: used only to hand each thread its own disjoint part of one buffer (see `forward`).
    unsafe impl Sync for SyncPtr {}
    unsafe impl Send for SyncPtr {}

    /// `dqkv [N, T, 3C]` from `dout [N, T, C]`.
    pub fn backward(dout: &[f32], qkv: &[f32], probs: &[f32], g: &Geom, scale: f32) -> Vec<f32> {
        let (t, d, c) = (g.t, g.d, g.c());
        zeroed_by_image_chunks(g.n * t * 3 * c, g.n, threads(g), |first, chunk| {
            let mut ds = vec![0.0f32; t * t];
            for (i, dx) in chunk.chunks_exact_mut(t * 3 * c).enumerate() {
                let img = first + i;
                let x = &qkv[img * t * 3 * c..][..t * 3 * c];
                let go = &dout[img * t * c..][..t * c];
                for h in 0..g.heads {
                    let p = &probs[(img * g.heads + h) * t * t..][..t * t];
                    let (q, k, v) = (&x[h * d..], &x[c + h * d..], &x[2 * c + h * d..]);
                    let gh = &go[h * d..];
                    // dv = Pᵀ·dO
                    gemm_strided(t, t, d, p, (1, t), gh, (c, 1), false, &mut dx[2 * c + h * d..], (3 * c, 1));
                    // dP = dO·vᵀ, then dS = scale·P ⊙ (dP − Σ_row dP ⊙ P)
                    gemm_strided(t, d, t, gh, (c, 1), v, (1, 3 * c), false, &mut ds, (t, 1));
                    for (dr, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                        let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                        dr.iter_mut().zip(pr).for_each(|(a, &b)| *a = scale * b * (*a - dot));
                    }
                    // dq = dS·k, dk = dSᵀ·q
                    gemm_strided(t, t, d, &ds, (t, 1), k, (3 * c, 1), false, &mut dx[h * d..], (3 * c, 1));
                    gemm_strided(t, t, d, &ds, (1, t), q, (3 * c, 1), false, &mut dx[c + h * d..], (3 * c, 1));
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

    use crate::nn::test_util::{host, max_rel};

    /// The op against burn's composed attention and its autodiff (output and `dqkv`), with a
    /// token count that is not a multiple of the SIMD width, one head, and DeiT-S's shape.
    #[test]
    fn attention_matches_composed_ops() {
        let device = Default::default();
        for (n, t, heads, d) in [(2, 5, 2, 4), (3, 7, 1, 8), (8, 197, 6, 64)] {
            let c = heads * d;
            let scale = (d as f64).powf(-0.5);
            let x0 = Tensor::<CpuAutodiff, 3>::random([n, t, 3 * c], Distribution::Normal(0.0, 1.0), &device);
            let r = Tensor::<CpuAutodiff, 3>::random([n, t, c], Distribution::Default, &device);
            // ToMe's proportional attention: log(size) of each key, sizes 1 to 4.
            let sizes = Tensor::<CpuAutodiff, 2>::random([n, t], Distribution::Uniform(1.0, 4.0), &device);
            for bias in [None, Some(sizes.log())] {
                let run = |ours: bool| {
                    let x = x0.clone().require_grad();
                    let y = if ours {
                        attention_with_key_bias(x.clone(), bias.clone(), heads, scale)
                    } else {
                        attention_composed(x.clone(), bias.clone(), heads, scale).0
                    };
                    let grads = (y.clone() * r.clone()).sum().backward();
                    (host(y), host(x.grad(&grads).unwrap()))
                };
                let (a, b) = (run(true), run(false));
                let with = if bias.is_some() { "with a key bias" } else { "" };
                assert!(max_rel(&a.0, &b.0) < 1e-5, "output {n} {t} {heads} {d} {with}: {}", max_rel(&a.0, &b.0));
                assert!(max_rel(&a.1, &b.1) < 1e-4, "dqkv {n} {t} {heads} {d} {with}: {}", max_rel(&a.1, &b.1));
                // Inference (no autodiff) gives the same output.
                let inner = |t: Tensor<CpuAutodiff, 2>| Tensor::<Cpu, 2>::from_data(t.into_data(), &device);
                let plain = attention_with_key_bias(
                    Tensor::<Cpu, 3>::from_data(x0.clone().into_data(), &device),
                    bias.clone().map(inner),
                    heads,
                    scale,
                );
                assert!(max_rel(&host(plain), &a.0) < 1e-6);
            }
        }
    }

    /// The backward against f64 central differences of `Σ r·attention(qkv)`.
    #[test]
    fn attention_gradient_matches_finite_differences() {
        let device = Default::default();
        let (n, t, heads, d) = (1, 3, 2, 2);
        let c = heads * d;
        let scale = 0.7;
        let xs: Vec<f64> = (0..n * t * 3 * c).map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0).collect();
        let r: Vec<f64> = (0..n * t * c).map(|i| ((i * 5 % 7) as f64 - 3.0) / 3.0).collect();
        let loss = |xs: &[f64]| {
            let mut total = 0.0;
            for h in 0..heads {
                let at = |row: usize, part: usize, j: usize| xs[row * 3 * c + part * c + h * d + j];
                for i in 0..t {
                    let s: Vec<f64> = (0..t).map(|j| scale * (0..d).map(|l| at(i, 0, l) * at(j, 1, l)).sum::<f64>()).collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                    for l in 0..d {
                        let o: f64 = (0..t).map(|j| (s[j] - m).exp() / z * at(j, 2, l)).sum();
                        total += r[i * c + h * d + l] * o;
                    }
                }
            }
            total
        };
        let t3 = |v: &[f64], s: [usize; 3]| Tensor::<CpuAutodiff, 3>::from_data(TensorData::new(v.iter().map(|&a| a as f32).collect::<Vec<_>>(), s), &device);
        let x = t3(&xs, [n, t, 3 * c]).require_grad();
        let grads = (attention(x.clone(), heads, scale) * t3(&r, [n, t, c])).sum().backward();
        let g = host(x.grad(&grads).unwrap());
        let hstep = 1e-5;
        for k in 0..xs.len() {
            let (mut p, mut q) = (xs.clone(), xs.clone());
            p[k] += hstep;
            q[k] -= hstep;
            let num = (loss(&p) - loss(&q)) / (2.0 * hstep);
            assert!((num - g[k] as f64).abs() < 1e-4 * (1.0 + num.abs()), "dqkv[{k}]: {num} vs {}", g[k]);
        }
    }
}
