//! The element-wise glue of gated and residual blocks as backend ops: a range of channels,
//! HorNet's gated product `a·(b[c₀..c₀+C]·s)`, and the residual sum `x + y·γ` with an optional
//! per-channel layer scale `γ`.
//!
//! burn-ndarray copies a channel range of an NCHW tensor element by element through a strided
//! iterator, and runs every element-wise op on the calling thread. In HorNet-T inference at two
//! threads the channel splits of `gnconv` alone were about a sixth of the time, all of it serial
//! while the other core waited. Here each op is one pass over memory, split by the leading
//! dimension over [`compute_threads`](super::pool::compute_threads) threads, and a channel range is copied as the contiguous
//! block it is in every image. The results are bit for bit those of the composed ops (same
//! products and sums in the same order), so the parity fixtures do not move.
//!
//! A tensor is read as `[outer, C, inner]` around its channel axis (dimension 1 for the range
//! ops; any axis for the layer scale). The defaults compose burn's ops (other backends, CUDA);
//! NdArray has the CPU kernels; `Autodiff<B>` records one node per call.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{IndexingUpdateOp, Int, Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};

use super::conv::{host_f32, zeroed_by_rows};

pub trait ChannelBackend: Backend {
    /// Channels `start .. start + len` of `x` (dimension 1).
    fn channel_slice(x: FloatTensor<Self>, start: usize, len: usize) -> FloatTensor<Self> {
        slice_composed::<Self>(x, start, len)
    }

    /// `x` placed at channels `start ..` of a zero tensor with `channels` channels: the gradient
    /// of [`channel_slice`](Self::channel_slice).
    fn channel_pad(x: FloatTensor<Self>, start: usize, channels: usize) -> FloatTensor<Self> {
        pad_composed::<Self>(x, start, channels)
    }

    /// `a·(b[:, start .. start + C_a]·scale)`, `C_a` the channels of `a`.
    fn gated_product(a: FloatTensor<Self>, b: FloatTensor<Self>, start: usize, scale: f64) -> FloatTensor<Self> {
        gate_composed::<Self>(a, b, start, scale)
    }

    /// `x + y·γ`, `γ` broadcast along `axis` (`None`: `x + y`).
    fn residual(x: FloatTensor<Self>, y: FloatTensor<Self>, gamma: Option<FloatTensor<Self>>, axis: usize) -> FloatTensor<Self> {
        residual_composed::<Self>(x, y, gamma, axis)
    }

    /// `y·γ`, `γ` broadcast along `axis`: the residual's gradient towards `y`.
    fn channel_scale(y: FloatTensor<Self>, gamma: FloatTensor<Self>, axis: usize) -> FloatTensor<Self> {
        scale_composed::<Self>(y, gamma, axis)
    }

    /// Tokens `idx[n, j]` of each image of `x` `[N, T, C]` → `[N, k, C]`.
    fn select_tokens(x: FloatTensor<Self>, idx: IntTensor<Self>) -> FloatTensor<Self> {
        select_tokens_composed::<Self>(x, idx)
    }

    /// `grad` `[N, k, C]` added into zeros `[N, tokens, C]` at the rows `idx`: the gradient of
    /// [`select_tokens`](Self::select_tokens).
    fn scatter_tokens(grad: FloatTensor<Self>, idx: IntTensor<Self>, tokens: usize) -> FloatTensor<Self> {
        scatter_tokens_composed::<Self>(grad, idx, tokens)
    }

    /// `[N, tokens, C]` with `Σ weight[n, i]·x[n, i]` over the tokens `i` whose `target[n, i]`
    /// is each row (ToMe's size-weighted merge); `x` `[N, T, C]`, `target` and `weight` `[N, T]`.
    fn merge_tokens(x: FloatTensor<Self>, target: IntTensor<Self>, weight: FloatTensor<Self>, tokens: usize) -> FloatTensor<Self> {
        let [n, t, _] = split_at_axis(&x.shape(), 1);
        let weighted = float::<Self, 3>(x) * float::<Self, 2>(weight).reshape([n, t, 1]);
        scatter_tokens_composed::<Self>(weighted.into_primitive().tensor(), target, tokens)
    }
}

/// Row `n·T + idx[n, j]` of the `[N·T, C]` rows for every `(n, j)`.
fn token_rows<B: Backend>(idx: IntTensor<B>, tokens: usize) -> Tensor<B, 1, Int> {
    let idx = Tensor::<B, 2, Int>::from_primitive(idx);
    let [n, k] = idx.dims();
    let first_row = Tensor::<B, 1, Int>::arange_step(0..(n * tokens) as i64, tokens.max(1), &idx.device()).reshape([n, 1]);
    (idx + first_row).reshape([n * k])
}

fn select_tokens_composed<B: Backend>(x: FloatTensor<B>, idx: IntTensor<B>) -> FloatTensor<B> {
    let [n, t, c] = split_at_axis(&x.shape(), 1);
    let k = idx.shape()[1];
    let rows = token_rows::<B>(idx, t);
    float::<B, 3>(x).reshape([n * t, c]).select(0, rows).reshape([n, k, c]).into_primitive().tensor()
}

fn scatter_tokens_composed<B: Backend>(grad: FloatTensor<B>, idx: IntTensor<B>, tokens: usize) -> FloatTensor<B> {
    let grad = float::<B, 3>(grad);
    let [n, k, c] = grad.dims();
    let rows = token_rows::<B>(idx, tokens);
    let zeros = Tensor::<B, 2>::zeros([n * tokens, c], &grad.device());
    let out = zeros.select_assign(0, rows, grad.reshape([n * k, c]), IndexingUpdateOp::Add);
    out.reshape([n, tokens, c]).into_primitive().tensor()
}

fn slice_composed<B: Backend>(x: FloatTensor<B>, start: usize, len: usize) -> FloatTensor<B> {
    let shape = with_dim(&x.shape(), 1, len);
    B::float_reshape(flat3::<B>(x, 1).narrow(1, start, len).into_primitive().tensor(), shape)
}

fn pad_composed<B: Backend>(x: FloatTensor<B>, start: usize, channels: usize) -> FloatTensor<B> {
    let shape = x.shape();
    let [outer, c, inner] = split_at_axis(&shape, 1);
    let x = flat3::<B>(x, 1);
    let zeros = Tensor::<B, 3>::zeros([outer, channels, inner], &x.device());
    let y = zeros.slice_assign([0..outer, start..start + c, 0..inner], x);
    B::float_reshape(y.into_primitive().tensor(), with_dim(&shape, 1, channels))
}

fn gate_composed<B: Backend>(a: FloatTensor<B>, b: FloatTensor<B>, start: usize, scale: f64) -> FloatTensor<B> {
    let shape = a.shape();
    let c = shape[1];
    let a = flat3::<B>(a, 1);
    let b = flat3::<B>(b, 1).narrow(1, start, c);
    B::float_reshape((a * b.mul_scalar(scale)).into_primitive().tensor(), shape)
}

fn residual_composed<B: Backend>(x: FloatTensor<B>, y: FloatTensor<B>, gamma: Option<FloatTensor<B>>, axis: usize) -> FloatTensor<B> {
    let shape = x.shape();
    let x = flat3::<B>(x, axis);
    let y = flat3::<B>(y, axis);
    let sum = match gamma {
        Some(g) => x + y * float::<B, 1>(g).reshape([1, shape[axis], 1]),
        None => x + y,
    };
    B::float_reshape(sum.into_primitive().tensor(), shape)
}

fn scale_composed<B: Backend>(y: FloatTensor<B>, gamma: FloatTensor<B>, axis: usize) -> FloatTensor<B> {
    let shape = y.shape();
    let scaled = flat3::<B>(y, axis) * float::<B, 1>(gamma).reshape([1, shape[axis], 1]);
    B::float_reshape(scaled.into_primitive().tensor(), shape)
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `[outer, C, inner]` around `axis`.
fn split_at_axis(shape: &Shape, axis: usize) -> [usize; 3] {
    let dims = shape.as_slice();
    let outer = dims[..axis].iter().product();
    let inner = dims[axis + 1..].iter().product();
    [outer, dims[axis], inner]
}

fn flat3<B: Backend>(t: FloatTensor<B>, axis: usize) -> Tensor<B, 3> {
    let dims = split_at_axis(&t.shape(), axis);
    float(B::float_reshape(t, Shape::new(dims)))
}

fn with_dim(shape: &Shape, axis: usize, n: usize) -> Shape {
    let mut dims = shape.as_slice().to_vec();
    dims[axis] = n;
    Shape::from(dims)
}

/// Channels `start .. start + len` of `x` (dimension 1).
pub fn channel_slice<B: ChannelBackend, const D: usize>(x: Tensor<B, D>, start: usize, len: usize) -> Tensor<B, D> {
    float(B::channel_slice(x.into_primitive().tensor(), start, len))
}

/// HorNet's gate `a·(b[:, start .. start + C_a]·scale)`.
pub fn gated_product<B: ChannelBackend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>, start: usize, scale: f64) -> Tensor<B, D> {
    float(B::gated_product(a.into_primitive().tensor(), b.into_primitive().tensor(), start, scale))
}

/// Tokens `idx[n, j]` of each image of `x` `[N, T, C]` → `[N, k, C]` (DynamicViT's
/// `batch_index_select`): whole rows copied, where burn's `gather` with an index expanded
/// over `C` computed an index per value (a tenth of a DynamicViT forward, on one thread).
pub fn select_tokens<B: ChannelBackend>(x: Tensor<B, 3>, idx: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    float(B::select_tokens(x.into_primitive().tensor(), idx.into_primitive()))
}

/// ToMe's merge: row `j` of the result `[N, tokens, C]` is `Σ weight[n, i]·x[n, i]` over the
/// tokens with `target[n, i] = j`. The weights are constants (no gradient flows into them); the
/// gradient towards `x` is `weight·dy[target]`.
pub fn merge_tokens<B: ChannelBackend>(x: Tensor<B, 3>, target: Tensor<B, 2, Int>, weight: Tensor<B, 2>, tokens: usize) -> Tensor<B, 3> {
    float(B::merge_tokens(x.into_primitive().tensor(), target.into_primitive(), weight.into_primitive().tensor(), tokens))
}

/// `y·γ`, `γ` broadcast along `axis`: a per-channel scale as one pass.
pub fn channel_scale<B: ChannelBackend, const D: usize>(y: Tensor<B, D>, gamma: Tensor<B, 1>, axis: usize) -> Tensor<B, D> {
    float(B::channel_scale(y.into_primitive().tensor(), gamma.into_primitive().tensor(), axis))
}

/// The residual sum `x + y·γ`, `γ` (a layer scale) broadcast along `axis`.
pub fn residual<B: ChannelBackend, const D: usize>(x: Tensor<B, D>, y: Tensor<B, D>, gamma: Option<Tensor<B, 1>>, axis: usize) -> Tensor<B, D> {
    let gamma = gamma.map(|g| g.into_primitive().tensor());
    float(B::residual(x.into_primitive().tensor(), y.into_primitive().tensor(), gamma, axis))
}

// Autodiff
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct SliceBackward;

impl<B: ChannelBackend> Backward<B, 1> for SliceBackward {
    /// `(start, channels of the input)`.
    type State = (usize, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (start, channels) = ops.state;
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::channel_pad(grad, start, channels));
        }
    }
}

#[derive(Debug)]
struct GateBackward;

impl<B: ChannelBackend> Backward<B, 2> for GateBackward {
    /// `(a, b, start, scale)`.
    type State = (FloatTensor<B>, FloatTensor<B>, usize, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (a, b, start, scale) = ops.state;
        let [node_a, node_b] = ops.parents;
        if let Some(node) = node_b {
            let channels = b.shape()[1];
            // ∂/∂b[start + c] = g·a·scale, zero on b's other channels.
            let db = B::channel_pad(B::gated_product(grad.clone(), a, 0, scale), start, channels);
            grads.register::<B>(node.id, db);
        }
        if let Some(node) = node_a {
            grads.register::<B>(node.id, B::gated_product(grad, b, start, scale));
        }
    }
}

#[derive(Debug)]
struct ResidualBackward;

impl<B: ChannelBackend> Backward<B, 2> for ResidualBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        match ops.parents {
            [Some(x), Some(y)] => {
                grads.register::<B>(x.id, grad.clone());
                grads.register::<B>(y.id, grad);
            }
            [Some(node), None] | [None, Some(node)] => grads.register::<B>(node.id, grad),
            [None, None] => {}
        }
    }
}

#[derive(Debug)]
struct ScaledResidualBackward;

impl<B: ChannelBackend> Backward<B, 3> for ScaledResidualBackward {
    /// `(y, γ, axis)`.
    type State = (FloatTensor<B>, FloatTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (y, gamma, axis) = ops.state;
        let [node_x, node_y, node_gamma] = ops.parents;
        if let Some(node) = node_gamma {
            let c = gamma.shape()[0];
            let gy = flat3::<B>(grad.clone(), axis) * flat3::<B>(y, axis);
            let dgamma = gy.sum_dim(2).sum_dim(0).reshape([c]);
            grads.register::<B>(node.id, dgamma.into_primitive().tensor());
        }
        if let Some(node) = node_y {
            grads.register::<B>(node.id, B::channel_scale(grad.clone(), gamma, axis));
        }
        if let Some(node) = node_x {
            grads.register::<B>(node.id, grad);
        }
    }
}

#[derive(Debug)]
struct SelectTokensBackward;

impl<B: ChannelBackend> Backward<B, 1> for SelectTokensBackward {
    /// `(idx, tokens of the input)`.
    type State = (IntTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (idx, tokens) = ops.state;
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::scatter_tokens(grad, idx, tokens));
        }
    }
}

#[derive(Debug)]
struct MergeTokensBackward;

impl<B: ChannelBackend> Backward<B, 1> for MergeTokensBackward {
    /// `(target, weight)`.
    type State = (IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (target, weight) = ops.state;
        if let [Some(node)] = ops.parents {
            let picked = float::<B, 3>(B::select_tokens(grad, target));
            let [n, t, _] = picked.dims();
            let dx = picked * float::<B, 2>(weight).reshape([n, t, 1]);
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
    }
}

impl<B: ChannelBackend, C: CheckpointStrategy> ChannelBackend for Autodiff<B, C> {
    fn merge_tokens(x: FloatTensor<Self>, target: IntTensor<Self>, weight: FloatTensor<Self>, tokens: usize) -> FloatTensor<Self> {
        let weight = weight.primitive;
        let y = B::merge_tokens(x.primitive, target.clone(), weight.clone(), tokens);
        match MergeTokensBackward.prepare::<C>([x.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((target, weight), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn select_tokens(x: FloatTensor<Self>, idx: IntTensor<Self>) -> FloatTensor<Self> {
        let tokens = x.primitive.shape()[1];
        let y = B::select_tokens(x.primitive, idx.clone());
        match SelectTokensBackward.prepare::<C>([x.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((idx, tokens), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn channel_slice(x: FloatTensor<Self>, start: usize, len: usize) -> FloatTensor<Self> {
        let channels = x.primitive.shape()[1];
        let y = B::channel_slice(x.primitive, start, len);
        match SliceBackward.prepare::<C>([x.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((start, channels), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn gated_product(a: FloatTensor<Self>, b: FloatTensor<Self>, start: usize, scale: f64) -> FloatTensor<Self> {
        let y = B::gated_product(a.primitive.clone(), b.primitive.clone(), start, scale);
        match GateBackward.prepare::<C>([a.node, b.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((a.primitive, b.primitive, start, scale), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn residual(x: FloatTensor<Self>, y: FloatTensor<Self>, gamma: Option<FloatTensor<Self>>, axis: usize) -> FloatTensor<Self> {
        match gamma {
            None => {
                let out = B::residual(x.primitive, y.primitive, None, axis);
                ResidualBackward.prepare::<C>([x.node, y.node]).compute_bound().stateless(out)
            }
            Some(g) => {
                let out = B::residual(x.primitive, y.primitive.clone(), Some(g.primitive.clone()), axis);
                match ScaledResidualBackward.prepare::<C>([x.node, y.node, g.node]).compute_bound().stateful() {
                    OpsKind::Tracked(prep) => prep.finish((y.primitive, g.primitive, axis), out),
                    OpsKind::UnTracked(prep) => prep.finish(out),
                }
            }
        }
    }
}

#[cfg(feature = "cuda")]
impl ChannelBackend for crate::device::Cuda {}

// ---------------------------------------------------------------------------------------------
// NdArray: the CPU kernels
// ---------------------------------------------------------------------------------------------

fn ndarray(data: Vec<f32>, shape: Shape) -> FloatTensor<NdArray<f32>> {
    NdArrayTensor::from_data(TensorData::new(data, shape))
}

impl ChannelBackend for NdArray<f32> {
    fn merge_tokens(x: FloatTensor<Self>, target: IntTensor<Self>, weight: FloatTensor<Self>, tokens: usize) -> FloatTensor<Self> {
        let [n, t, c] = split_at_axis(&x.shape(), 1);
        let (Some(xs), Some(ws)) = (host_f32(&x), host_f32(&weight)) else {
            let weighted = float::<Self, 3>(x) * float::<Self, 2>(weight).reshape([n, t, 1]);
            return scatter_tokens_composed::<Self>(weighted.into_primitive().tensor(), target, tokens);
        };
        let (_, _, rows) = host_indices(target);
        assert!(rows.iter().all(|&r| r < tokens), "token index out of range 0..{tokens}");
        let out = zeroed_by_rows(n * tokens * c, n, |first, chunk| {
            for (o, image) in chunk.chunks_exact_mut(tokens * c).enumerate() {
                let img = first + o;
                let (src, picks, w) = (&xs[img * t * c..][..t * c], &rows[img * t..][..t], &ws[img * t..][..t]);
                for ((v, &r), &w) in src.chunks_exact(c).zip(picks).zip(w) {
                    image[r * c..(r + 1) * c].iter_mut().zip(v).for_each(|(o, &v)| *o = w.mul_add(v, *o));
                }
            }
        });
        ndarray(out, Shape::new([n, tokens, c]))
    }

    fn channel_slice(x: FloatTensor<Self>, start: usize, len: usize) -> FloatTensor<Self> {
        let shape = x.shape();
        let [outer, c, inner] = split_at_axis(&shape, 1);
        let Some(xs) = host_f32(&x) else {
            return slice_composed::<Self>(x, start, len);
        };
        let out = zeroed_by_rows(outer * len * inner, outer, |first, chunk| {
            for (o, block) in chunk.chunks_exact_mut(len * inner).enumerate() {
                let from = ((first + o) * c + start) * inner;
                block.copy_from_slice(&xs[from..from + len * inner]);
            }
        });
        ndarray(out, with_dim(&shape, 1, len))
    }

    fn channel_pad(x: FloatTensor<Self>, start: usize, channels: usize) -> FloatTensor<Self> {
        let shape = x.shape();
        let [outer, c, inner] = split_at_axis(&shape, 1);
        let Some(xs) = host_f32(&x) else {
            return pad_composed::<Self>(x, start, channels);
        };
        let out = zeroed_by_rows(outer * channels * inner, outer, |first, chunk| {
            for (o, block) in chunk.chunks_exact_mut(channels * inner).enumerate() {
                let from = (first + o) * c * inner;
                block[start * inner..(start + c) * inner].copy_from_slice(&xs[from..from + c * inner]);
            }
        });
        ndarray(out, with_dim(&shape, 1, channels))
    }

    fn gated_product(a: FloatTensor<Self>, b: FloatTensor<Self>, start: usize, scale: f64) -> FloatTensor<Self> {
        let shape = a.shape();
        let [outer, c, inner] = split_at_axis(&shape, 1);
        let cb = b.shape()[1];
        let (Some(av), Some(bv)) = (host_f32(&a), host_f32(&b)) else {
            return gate_composed::<Self>(a, b, start, scale);
        };
        let s = scale as f32;
        let out = zeroed_by_rows(outer * c * inner, outer, |first, chunk| {
            for (o, block) in chunk.chunks_exact_mut(c * inner).enumerate() {
                let at = (first + o) * c * inner;
                let bt = ((first + o) * cb + start) * inner;
                let (ar, br) = (&av[at..at + c * inner], &bv[bt..bt + c * inner]);
                for ((y, &u), &v) in block.iter_mut().zip(ar).zip(br) {
                    *y = u * (v * s);
                }
            }
        });
        ndarray(out, shape)
    }

    fn residual(x: FloatTensor<Self>, y: FloatTensor<Self>, gamma: Option<FloatTensor<Self>>, axis: usize) -> FloatTensor<Self> {
        let shape = x.shape();
        let [outer, c, inner] = split_at_axis(&shape, axis);
        let gv = match &gamma {
            Some(g) => host_f32(g).map(Some),
            None => Some(None),
        };
        let (Some(xv), Some(yv), Some(gv)) = (host_f32(&x), host_f32(&y), gv) else {
            return residual_composed::<Self>(x, y, gamma, axis);
        };
        // Without a scale every channel is alike: whole blocks are rows.
        let dims = if gv.is_some() { [outer, c, inner] } else { [outer, 1, c * inner] };
        let out = scaled_sum(Some(&xv), &yv, gv.as_deref(), dims);
        ndarray(out, shape)
    }

    fn channel_scale(y: FloatTensor<Self>, gamma: FloatTensor<Self>, axis: usize) -> FloatTensor<Self> {
        let shape = y.shape();
        let [outer, c, inner] = split_at_axis(&shape, axis);
        let (Some(yv), Some(gv)) = (host_f32(&y), host_f32(&gamma)) else {
            return scale_composed::<Self>(y, gamma, axis);
        };
        let out = scaled_sum(None, &yv, Some(&gv), [outer, c, inner]);
        ndarray(out, shape)
    }

    fn select_tokens(x: FloatTensor<Self>, idx: IntTensor<Self>) -> FloatTensor<Self> {
        let [_, t, c] = split_at_axis(&x.shape(), 1);
        let Some(xs) = host_f32(&x) else {
            return select_tokens_composed::<Self>(x, idx);
        };
        let (n, k, rows) = host_indices(idx);
        assert!(rows.iter().all(|&r| r < t), "token index out of range 0..{t}");
        let out = zeroed_by_rows(n * k * c, n, |first, chunk| {
            for (o, image) in chunk.chunks_exact_mut(k * c).enumerate() {
                let (src, picks) = (&xs[(first + o) * t * c..], &rows[(first + o) * k..]);
                for (row, &r) in image.chunks_exact_mut(c).zip(picks) {
                    row.copy_from_slice(&src[r * c..(r + 1) * c]);
                }
            }
        });
        ndarray(out, Shape::new([n, k, c]))
    }

    fn scatter_tokens(grad: FloatTensor<Self>, idx: IntTensor<Self>, tokens: usize) -> FloatTensor<Self> {
        let [_, k, c] = split_at_axis(&grad.shape(), 1);
        let Some(gs) = host_f32(&grad) else {
            return scatter_tokens_composed::<Self>(grad, idx, tokens);
        };
        let (n, _, rows) = host_indices(idx);
        assert!(rows.iter().all(|&r| r < tokens), "token index out of range 0..{tokens}");
        let out = zeroed_by_rows(n * tokens * c, n, |first, chunk| {
            for (o, image) in chunk.chunks_exact_mut(tokens * c).enumerate() {
                let (src, picks) = (&gs[(first + o) * k * c..], &rows[(first + o) * k..]);
                for (g, &r) in src.chunks_exact(c).take(k).zip(picks) {
                    image[r * c..(r + 1) * c].iter_mut().zip(g).for_each(|(o, &v)| *o += v);
                }
            }
        });
        ndarray(out, Shape::new([n, tokens, c]))
    }
}

/// `x + y·γ` (or `y·γ` without `x`; `γ = 1` when absent) over `[outer, c, inner]`, `γ` per channel.
fn scaled_sum(x: Option<&[f32]>, y: &[f32], gamma: Option<&[f32]>, [outer, c, inner]: [usize; 3]) -> Vec<f32> {
    zeroed_by_rows(outer * c * inner, outer, |first, chunk| {
        let (at, len) = (first * c * inner, chunk.len());
        let rows = chunk.chunks_exact_mut(inner).zip(y[at..at + len].chunks_exact(inner));
        for (r, (o, ys)) in rows.enumerate() {
            // Chunks start at a whole outer block, so row `r` is channel `r % c`. `v·1` is `v`
            // exactly, so the unscaled sum stays bit for bit `x + y`.
            let g = gamma.map_or(1.0, |g| g[r % c]);
            match x {
                Some(x) => o.iter_mut().zip(&x[at + r * inner..]).zip(ys).for_each(|((o, &u), &v)| *o = u + v * g),
                None => o.iter_mut().zip(ys).for_each(|(o, &v)| *o = v * g),
            }
        }
    })
}

fn host_indices(idx: IntTensor<NdArray<f32>>) -> (usize, usize, Vec<usize>) {
    let idx = Tensor::<NdArray<f32>, 2, Int>::from_primitive(idx);
    let [n, k] = idx.dims();
    let values = idx.into_data().convert::<i64>().into_vec::<i64>().unwrap_or_default();
    (n, k, values.into_iter().map(|v| v as usize).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{host, max_rel};
    use crate::{Cpu, CpuAutodiff};
    use burn::tensor::Distribution;

    /// The merge against its definition (composed: weights, then burn's scatter-add), output and
    /// gradient, with several tokens merging into one row and rows receiving none.
    #[test]
    fn token_merge_matches_the_composed_scatter() {
        let dev = Default::default();
        let (n, t, c, tokens) = (3, 7, 5, 4);
        let target: Vec<i64> = (0..n * t).map(|i| ((i * 5 + i / t) % 3) as i64).collect();
        let target = Tensor::<CpuAutodiff, 2, Int>::from_data(TensorData::new(target, [n, t]), &dev);
        let weight = Tensor::<CpuAutodiff, 2>::random([n, t], Distribution::Uniform(0.1, 1.0), &dev);
        let x0 = Tensor::<CpuAutodiff, 3>::random([n, t, c], Distribution::Normal(0.0, 1.0), &dev);
        let r = Tensor::<CpuAutodiff, 3>::random([n, tokens, c], Distribution::Normal(0.0, 1.0), &dev);
        let run = |ours: bool| {
            let x = x0.clone().require_grad();
            let y = if ours {
                merge_tokens(x.clone(), target.clone(), weight.clone(), tokens)
            } else {
                let w = (x.clone() * weight.clone().reshape([n, t, 1])).into_primitive().tensor();
                float(scatter_tokens_composed::<CpuAutodiff>(w, target.clone().into_primitive(), tokens))
            };
            let grads = (y.clone() * r.clone()).sum().backward();
            (host(y), host(x.grad(&grads).unwrap()))
        };
        let (a, b) = (run(true), run(false));
        assert!(max_rel(&a.0, &b.0) < 1e-6 && max_rel(&a.1, &b.1) < 1e-6, "{} {}", max_rel(&a.0, &b.0), max_rel(&a.1, &b.1));
        // The last row receives no token: zeros.
        assert!(a.0.chunks(tokens * c).all(|img| img[3 * c..].iter().all(|&v| v == 0.0)));
    }

    fn normal<const D: usize>(shape: [usize; D]) -> Tensor<Cpu, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn prim<const D: usize>(t: Tensor<Cpu, D>) -> FloatTensor<Cpu> {
        t.into_primitive().tensor()
    }

    fn values(t: FloatTensor<Cpu>) -> Vec<f32> {
        host(float::<Cpu, 1>(t.clone()).reshape([t.shape().num_elements()]))
    }

    /// The kernels against burn's ops (the defaults), bit for bit: at a size that one thread
    /// computes, at one split over threads (≥ 2¹⁷ values), and on a strided (permuted) input.
    #[test]
    fn kernels_equal_burns_ops() {
        for shape in [[3, 10, 2, 3], [4, 12, 48, 64]] {
            let x = normal(shape);
            let y = normal(shape);
            let small = normal([shape[0], 4, shape[2], shape[3]]);
            let gamma = normal([shape[1]]);
            let ours = |f: &dyn Fn() -> FloatTensor<Cpu>, theirs: FloatTensor<Cpu>, what: &str| {
                assert_eq!(values(f()), values(theirs), "{what} {shape:?}");
            };
            ours(&|| Cpu::channel_slice(prim(x.clone()), 3, 5), slice_composed::<Cpu>(prim(x.clone()), 3, 5), "slice");
            ours(&|| Cpu::channel_pad(prim(small.clone()), 2, 9), pad_composed::<Cpu>(prim(small.clone()), 2, 9), "pad");
            ours(
                &|| Cpu::gated_product(prim(small.clone()), prim(x.clone()), 5, 1.0 / 3.0),
                gate_composed::<Cpu>(prim(small.clone()), prim(x.clone()), 5, 1.0 / 3.0),
                "gate",
            );
            ours(&|| Cpu::residual(prim(x.clone()), prim(y.clone()), None, 1), residual_composed::<Cpu>(prim(x.clone()), prim(y.clone()), None, 1), "sum");
            for axis in [1, 3] {
                let gamma = normal([shape[axis]]);
                ours(
                    &|| Cpu::residual(prim(x.clone()), prim(y.clone()), Some(prim(gamma.clone())), axis),
                    residual_composed::<Cpu>(prim(x.clone()), prim(y.clone()), Some(prim(gamma.clone())), axis),
                    "scaled residual",
                );
                ours(
                    &|| Cpu::channel_scale(prim(y.clone()), prim(gamma.clone()), axis),
                    scale_composed::<Cpu>(prim(y.clone()), prim(gamma.clone()), axis),
                    "channel scale",
                );
            }
            let strided = x.clone().permute([0, 1, 3, 2]);
            ours(&|| Cpu::channel_slice(prim(strided.clone()), 1, 4), slice_composed::<Cpu>(prim(strided.clone()), 1, 4), "strided slice");
            ours(
                &|| Cpu::residual(prim(strided.clone()), prim(y.clone().permute([0, 1, 3, 2])), Some(prim(gamma.clone())), 1),
                residual_composed::<Cpu>(prim(strided.clone()), prim(y.clone().permute([0, 1, 3, 2])), Some(prim(gamma.clone())), 1),
                "strided residual",
            );
        }
    }

    /// `gnconv`'s chain (slices of one projection, gates that read several channel ranges of
    /// one map, a layer-scaled residual) through autodiff: the ops' gradients against those
    /// of burn's `narrow`, `mul` and `add` on every input, at one thread and at several.
    #[test]
    fn gradients_match_burns_autodiff() {
        for [n, h, w] in [[2, 3, 5], [4, 48, 64]] {
            let (d0, d1, d2) = (2, 4, 8);
            let sum = d0 + d1 + d2;
            let fused = normal([n, d0 + sum, h, w]);
            let base = normal([n, d0 + sum, h, w]);
            let pw1 = normal([d1, d0]);
            let pw2 = normal([d2, d1]);
            let skip = normal([n, d2, h, w]);
            let gamma = normal([d2]);
            let r = normal([n, d2, h, w]);
            let run = |ours: bool| {
                let leaf = |t: &Tensor<Cpu, 4>| Tensor::<CpuAutodiff, 4>::from_inner(t.clone()).require_grad();
                let (fused, dw, skip) = (leaf(&fused), leaf(&base), leaf(&skip));
                let pw1 = Tensor::<CpuAutodiff, 2>::from_inner(pw1.clone()).require_grad();
                let pw2 = Tensor::<CpuAutodiff, 2>::from_inner(pw2.clone()).require_grad();
                let gamma = Tensor::<CpuAutodiff, 1>::from_inner(gamma.clone()).require_grad();
                // The "depthwise conv" of `abc`: an element-wise map, so that `dw` depends on
                // the slice and its gradient flows back into `fused`.
                let mix = |x: Tensor<CpuAutodiff, 4>, m: &Tensor<CpuAutodiff, 2>| {
                    let [n, c, h, w] = x.dims();
                    let flat = x.swap_dims(1, 3).reshape([n * w * h, c]).matmul(m.clone().transpose());
                    flat.reshape([n, w, h, m.dims()[0]]).swap_dims(1, 3)
                };
                let y = if ours {
                    let pwa = channel_slice(fused.clone(), 0, d0);
                    let abc = channel_slice(fused.clone(), d0, sum);
                    let dwm = abc * dw.clone().narrow(1, 0, sum);
                    let x = gated_product(pwa, dwm.clone(), 0, 0.5);
                    let x = gated_product(mix(x, &pw1), dwm.clone(), d0, 0.5);
                    let x = gated_product(mix(x, &pw2), dwm, d0 + d1, 0.5);
                    residual(skip.clone(), x, Some(gamma.clone()), 1)
                } else {
                    let pwa = fused.clone().narrow(1, 0, d0);
                    let abc = fused.clone().narrow(1, d0, sum);
                    let dwm = (abc * dw.clone().narrow(1, 0, sum)).mul_scalar(0.5);
                    let parts = dwm.split_with_sizes(vec![d0, d1, d2], 1);
                    let x = pwa * parts[0].clone();
                    let x = mix(x, &pw1) * parts[1].clone();
                    let x = mix(x, &pw2) * parts[2].clone();
                    skip.clone() + x * gamma.clone().reshape([1, d2, 1, 1])
                };
                let g = (y.clone() * Tensor::from_inner(r.clone())).sum().backward();
                let grads = vec![
                    host(fused.grad(&g).unwrap()),
                    host(dw.grad(&g).unwrap()),
                    host(skip.grad(&g).unwrap()),
                    host(pw1.grad(&g).unwrap()),
                    host(pw2.grad(&g).unwrap()),
                    host(gamma.grad(&g).unwrap()),
                ];
                (host(y.inner()), grads)
            };
            let (ours, theirs) = (run(true), run(false));
            assert!(max_rel(&ours.0, &theirs.0) < 1e-6, "forward");
            for (i, (a, b)) in ours.1.iter().zip(&theirs.1).enumerate() {
                let err = max_rel(a, b);
                assert!(err < 1e-5, "gradient {i} at {n}×{h}×{w}: {err}");
                assert!(a.iter().any(|&v| v != 0.0), "gradient {i} is zero");
            }
        }
    }

    /// Token residuals (`[N, T, C]`, γ on the last axis, as GFNet's) and the plain sum.
    #[test]
    fn token_residual_gradients_match_burns_autodiff() {
        let x = normal([3, 7, 5]);
        let y = normal([3, 7, 5]);
        let gamma = normal([5]);
        for scaled in [false, true] {
            let run = |ours: bool| {
                let xa = Tensor::<CpuAutodiff, 3>::from_inner(x.clone()).require_grad();
                let ya = Tensor::<CpuAutodiff, 3>::from_inner(y.clone()).require_grad();
                let ga = Tensor::<CpuAutodiff, 1>::from_inner(gamma.clone()).require_grad();
                let out = match (ours, scaled) {
                    (true, s) => residual(xa.clone(), ya.clone() * 2.0, s.then(|| ga.clone()), 2),
                    (false, true) => xa.clone() + ya.clone() * 2.0 * ga.clone().reshape([1, 1, 5]),
                    (false, false) => xa.clone() + ya.clone() * 2.0,
                };
                let g = (out.clone() * out.clone()).sum().backward();
                let dg = scaled.then(|| host(ga.grad(&g).unwrap()));
                (host(out.inner()), host(xa.grad(&g).unwrap()), host(ya.grad(&g).unwrap()), dg)
            };
            let (ours, theirs) = (run(true), run(false));
            assert_eq!(ours.0, theirs.0);
            assert!(max_rel(&ours.1, &theirs.1) < 1e-6 && max_rel(&ours.2, &theirs.2) < 1e-6);
            if let (Some(a), Some(b)) = (ours.3, theirs.3) {
                assert!(max_rel(&a, &b) < 1e-5);
            }
        }
    }

    /// Token selection against burn's `gather` (forward and gradient), with a token picked
    /// twice so that the gradient must add, at one thread and split over threads.
    #[test]
    fn token_selection_matches_burns_gather() {
        for [n, t, c] in [[2, 5, 3], [4, 197, 384]] {
            let x = normal([n, t, c]);
            let picks: Vec<i64> = (0..n).flat_map(|i| [0, (i + 2) % t, t - 1, (i + 2) % t].map(|v| v as i64)).collect();
            let idx = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(picks, [n, 4]), &Default::default());
            let r = normal([n, 4, c]);
            let run = |ours: bool| {
                let xa = Tensor::<CpuAutodiff, 3>::from_inner(x.clone()).require_grad();
                let ia = Tensor::<CpuAutodiff, 2, Int>::from_inner(idx.clone());
                let y = if ours { select_tokens(xa.clone(), ia) } else { xa.clone().gather(1, ia.reshape([n, 4, 1]).expand([n, 4, c])) };
                let g = (y.clone() * Tensor::from_inner(r.clone())).sum().backward();
                (host(y.inner()), host(xa.grad(&g).unwrap()))
            };
            let (ours, theirs) = (run(true), run(false));
            assert_eq!(ours.0, theirs.0, "forward");
            assert_eq!(ours.1, theirs.1, "gradient");
            assert_eq!(values(Cpu::select_tokens(prim(x.clone()), idx.clone().into_primitive())), host(select_tokens(x.clone(), idx.clone())));
            let composed = select_tokens_composed::<Cpu>(prim(x.clone()), idx.clone().into_primitive());
            assert_eq!(values(composed), ours.0, "composed forward");
            let grad = prim(r.clone());
            assert_eq!(values(Cpu::scatter_tokens(grad.clone(), idx.clone().into_primitive(), t)), values(scatter_tokens_composed::<Cpu>(grad, idx.into_primitive(), t)));
        }
    }
}
