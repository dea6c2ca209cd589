//! 2-D convolution as a backend op with a fast CPU path.
//!
//! burn-ndarray 0.21 computes convolutions with direct loops, and its weight gradient is about
//! 50× slower than its forward (11 s for the backward of one 32→32 3×3 layer at 28×28, batch
//! 64, on 2 cores), which made CNN training impractical. [`ConvBackend`] routes our `Conv2d`
//! through an op that NdArray implements as im2col + one GEMM per image and group
//! (the `gemm` crate, single-threaded per call), with an analytic backward:
//! `dW = Σ_n G_n · cols_nᵀ`, `dx = col2im(Wᵀ · G_n)`. Other backends (CUDA) keep burn's conv.
//!
//! Threads: a call splits its images over [`compute_threads`](super::pool::compute_threads) threads. The GEMM itself never
//! spawns, so N rollout workers with one thread each get N-way parallelism instead of fighting
//! over one GEMM thread pool (matrixmultiply's pool is process-global and was the reason two
//! workers gained nothing).

use std::borrow::Cow;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{ConvOptions, FloatTensor, IntTensor, ModuleOps};
use burn::tensor::{Tensor, TensorData, TensorMetadata, TensorPrimitive};

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

    /// `relu?(conv2d(x, weight) + bias[o])`, for inference. The default composes the ops (and
    /// so is differentiable under autodiff); NdArray applies the bias and ReLU while each
    /// image's output is still in cache instead of two more passes over the whole tensor.
    ///
    /// Only output channels `[0, c_out)` and the input's `C` channels of `weight` and `bias` are
    /// used (RNP's channel slices); NdArray reads that block in place instead of copying it.
    fn conv2d_bias_act_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        c_out: usize,
        relu: bool,
        geom: ConvGeom,
    ) -> FloatTensor<Self> {
        conv2d_bias_act_composed::<Self>(x, weight, bias, c_out, relu, geom)
    }

    /// 2×2 max-pool with stride 2 (odd trailing rows and columns dropped, like PyTorch's
    /// default `ceil_mode=False`).
    fn max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], false)
    }

    /// [`max_pool2x2`](Self::max_pool2x2) and the position of each maximum in its input plane
    /// (`row · W + column`, burn's convention), for the backward.
    fn max_pool2x2_with_indices(x: FloatTensor<Self>) -> (FloatTensor<Self>, IntTensor<Self>) {
        let out = Self::max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], false);
        (out.output, out.indices)
    }

    /// The gradient of [`max_pool2x2`](Self::max_pool2x2) with respect to its input `x`.
    fn max_pool2x2_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>, indices: IntTensor<Self>) -> FloatTensor<Self> {
        Self::max_pool2d_with_indices_backward(x, [2, 2], [2, 2], [0, 0], [1, 1], false, grad, indices).x_grad
    }

    /// Whether [`conv2d_bias_act_ragged`](Self::conv2d_bias_act_ragged) runs on this backend.
    fn has_ragged_conv() -> bool {
        false
    }

    /// RNP's inference convolution over a whole batch whose images kept different channels:
    /// image `i` reads input channels `[0, c_in[i])` of `x` (`[N, C, H, W]`, `C` at most the
    /// weight's input channels; channels beyond `c_in[i]` are ignored) and computes output
    /// channels `[0, c_out[i])` of `relu?(conv2d(x, weight) + bias)`. The output has
    /// `max(c_out)` channels, image `i`'s beyond `c_out[i]` zero.
    ///
    /// The default computes the dense block `[0, max c_out) × [0, C)` with the inputs and
    /// outputs masked: the same numbers on any backend, none of the savings. Backends whose
    /// kernel computes only each image's block say so with
    /// [`has_ragged_conv`](Self::has_ragged_conv); RNP's routed forward uses this op only there.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_bias_act_ragged(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        c_in: &[usize],
        c_out: &[usize],
        relu: bool,
        geom: ConvGeom,
    ) -> FloatTensor<Self> {
        conv2d_bias_act_ragged_masked::<Self>(x, weight, bias, c_in, c_out, relu, geom)
    }

    /// Global average pool, `[N, C, H, W] → [N, C]`.
    fn global_avg_pool(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let x = Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(x));
        let [n, c, h, w] = x.dims();
        x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c]).into_primitive().tensor()
    }
}

/// [`ConvBackend::conv2d_bias_act_forward`] from separate ops: slice, conv, bias, ReLU.
fn conv2d_bias_act_composed<B: ConvBackend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    c_out: usize,
    relu: bool,
    geom: ConvGeom,
) -> FloatTensor<B> {
    let (weight, bias) = channel_block::<B>(weight, bias, c_out, dims4(&x)[1], geom.groups);
    bias_act_composed::<B>(B::conv2d_forward(x, weight, geom), bias, relu)
}

/// [`ConvBackend::conv2d_bias_act_ragged`]'s default: the dense block, inputs and outputs masked.
#[allow(clippy::too_many_arguments)]
fn conv2d_bias_act_ragged_masked<B: ConvBackend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    c_in: &[usize],
    c_out: &[usize],
    relu: bool,
    geom: ConvGeom,
) -> FloatTensor<B> {
    let x = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(x));
    let [n, c, _, _] = x.dims();
    let device = x.device();
    let o = c_out.iter().copied().max().unwrap_or(0);
    let mask = |widths: &[usize], width: usize| {
        let m: Vec<f32> = widths.iter().flat_map(|&w| (0..width).map(move |j| if j < w { 1.0 } else { 0.0 })).collect();
        Tensor::<B, 4>::from_data(TensorData::new(m, [n, width, 1, 1]), &device)
    };
    let x = (x * mask(c_in, c)).into_primitive().tensor();
    let y = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(conv2d_bias_act_composed::<B>(x, weight, bias, o, relu, geom)));
    (y * mask(c_out, o)).into_primitive().tensor()
}

/// `weight[0..c_out, 0..c_in]` and `bias[0..c_out]` (no copy when that is all of them).
fn channel_block<B: Backend>(
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    c_out: usize,
    c_in: usize,
    groups: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let w = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(weight));
    let b = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(bias));
    let [o, i, kh, kw] = w.dims();
    if c_out == o && c_in == i * groups {
        return (w.into_primitive().tensor(), b.into_primitive().tensor());
    }
    assert_eq!(groups, 1, "channel slicing is defined for dense convolutions");
    (w.slice([0..c_out, 0..c_in, 0..kh, 0..kw]).into_primitive().tensor(), b.slice(0..c_out).into_primitive().tensor())
}

fn bias_act_composed<B: Backend>(y: FloatTensor<B>, bias: FloatTensor<B>, relu: bool) -> FloatTensor<B> {
    let y = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(y));
    let o = y.dims()[1];
    let b = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(bias)).reshape([1, o, 1, 1]);
    let y = y + b;
    let y = if relu { burn::tensor::activation::relu(y) } else { y };
    y.into_primitive().tensor()
}

/// `relu?(conv2d(x, weight[0..c_out, 0..C]) + bias[0..c_out])`, `C` being `x`'s channels: the
/// inference form of conv → BatchNorm → ReLU once the BatchNorm is folded into `weight` and
/// `bias` (see `ConvBn::folded`), on a channel slice of the layer.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_bias_act<B: ConvBackend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
    c_out: usize,
    relu: bool,
    stride: usize,
    padding: usize,
    groups: usize,
) -> Tensor<B, 4> {
    let geom = ConvGeom { stride, padding, groups };
    let [o, i, _, _] = weight.dims();
    let c_in = x.dims()[1];
    assert!(c_out <= o && c_in <= i * groups, "conv2d_bias_act: {c_out}×{c_in} channels of a {o}×{} weight", i * groups);
    let y = B::conv2d_bias_act_forward(
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        bias.into_primitive().tensor(),
        c_out,
        relu,
        geom,
    );
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// See [`ConvBackend::conv2d_bias_act_ragged`] (dense convolutions only).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_bias_act_ragged<B: ConvBackend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
    c_in: &[usize],
    c_out: &[usize],
    relu: bool,
    stride: usize,
    padding: usize,
) -> Tensor<B, 4> {
    let [o, i, _, _] = weight.dims();
    let [n, c, _, _] = x.dims();
    assert!(c_in.len() == n && c_out.len() == n, "conv2d_bias_act_ragged: widths for {} / {} of {n} images", c_in.len(), c_out.len());
    assert!(c <= i && c_in.iter().all(|&w| w <= c) && c_out.iter().all(|&w| w <= o), "conv2d_bias_act_ragged: widths beyond a {o}×{i} weight or a {c}-channel input");
    let geom = ConvGeom { stride, padding, groups: 1 };
    let y = B::conv2d_bias_act_ragged(
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        bias.into_primitive().tensor(),
        c_in,
        c_out,
        relu,
        geom,
    );
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// Global average pool `[N, C, H, W] → [N, C]` (see [`ConvBackend::global_avg_pool`]): RNP's
/// observation of every decision layer and the CNNs' last pooling.
pub fn global_avg_pool<B: ConvBackend>(x: Tensor<B, 4>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::global_avg_pool(x.into_primitive().tensor())))
}

/// 2×2 max-pool, stride 2, no padding (see [`ConvBackend::max_pool2x2`]).
pub fn max_pool2x2<B: ConvBackend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(B::max_pool2x2(x.into_primitive().tensor())))
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
    let (x, weight) = (x.into_primitive().tensor(), weight.into_primitive().tensor());
    // The bias goes into the op, which on NdArray adds it while each image's output is in
    // cache; under autodiff the default composes it, and so stays differentiable.
    let y = match bias {
        Some(b) => B::conv2d_bias_act_forward(x, weight, b.into_primitive().tensor(), o, false, geom),
        None => B::conv2d_forward(x, weight, geom),
    };
    Tensor::from_primitive(TensorPrimitive::Float(y))
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

#[derive(Debug)]
struct MaxPoolBackward;

impl<B: ConvBackend> Backward<B, 1> for MaxPoolBackward {
    /// The input (for its shape) and the positions of the maxima.
    type State = (FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            let (x, indices) = ops.state;
            grads.register::<B>(node.id, B::max_pool2x2_backward(x, grad, indices));
        }
    }
}

impl<B: ConvBackend, C: CheckpointStrategy> ConvBackend for Autodiff<B, C> {
    fn max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match MaxPoolBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, indices) = B::max_pool2x2_with_indices(x.primitive.clone());
                prep.finish((x.primitive, indices), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::max_pool2x2(x.primitive)),
        }
    }

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
        let out = cpu::forward(&xs, &ws, &g, cpu::Epilogue::NONE);
        NdArrayTensor::from_data(TensorData::new(out, [g.n, g.o, g.ho, g.wo]))
    }

    fn conv2d_bias_act_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        c_out: usize,
        relu: bool,
        geom: ConvGeom,
    ) -> FloatTensor<Self> {
        let (xd, wd) = (dims4(&x), dims4(&weight));
        let (Some(xs), Some(ws), Some(bs)) = (host_f32(&x), host_f32(&weight), host_f32(&bias)) else {
            return conv2d_bias_act_composed::<Self>(x, weight, bias, c_out, relu, geom);
        };
        let mut g = Geometry::new(xd, wd, geom);
        if c_out != wd[0] || xd[1] != wd[1] * geom.groups {
            assert_eq!(geom.groups, 1, "channel slicing is defined for dense convolutions");
            // The GEMM reads the block [0..c_out, 0..C] of the full weight in place.
            g.o = c_out;
        }
        let out = cpu::forward(&xs, &ws, &g, cpu::Epilogue { bias: Some(&bs), relu });
        NdArrayTensor::from_data(TensorData::new(out, [g.n, g.o, g.ho, g.wo]))
    }

    fn max_pool2x2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let [n, c, h, w] = dims4(&x);
        let Some(xs) = host_f32(&x) else {
            return Self::max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], false);
        };
        let out = cpu::max_pool2x2(&xs, [n, c, h, w]);
        NdArrayTensor::from_data(TensorData::new(out, [n, c, h / 2, w / 2]))
    }

    fn max_pool2x2_with_indices(x: FloatTensor<Self>) -> (FloatTensor<Self>, IntTensor<Self>) {
        let [n, c, h, w] = dims4(&x);
        let Some(xs) = host_f32(&x) else {
            let out = Self::max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], false);
            return (out.output, out.indices);
        };
        let (out, idx) = cpu::max_pool2x2_with_indices(&xs, [n, c, h, w]);
        let shape = [n, c, h / 2, w / 2];
        (NdArrayTensor::from_data(TensorData::new(out, shape)), NdArrayTensor::from_data(TensorData::new(idx, shape)))
    }

    fn max_pool2x2_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>, indices: IntTensor<Self>) -> FloatTensor<Self> {
        let [n, c, h, w] = dims4(&x);
        let idx = match &indices {
            NdArrayTensor::I64(s) => s.view().to_slice().map(Cow::Borrowed).unwrap_or_else(|| Cow::Owned(s.view().iter().copied().collect())),
            _ => return Self::max_pool2d_with_indices_backward(x, [2, 2], [2, 2], [0, 0], [1, 1], false, grad, indices).x_grad,
        };
        let Some(gs) = host_f32(&grad) else {
            return Self::max_pool2d_with_indices_backward(x, [2, 2], [2, 2], [0, 0], [1, 1], false, grad, indices).x_grad;
        };
        NdArrayTensor::from_data(TensorData::new(cpu::max_pool2x2_backward(&gs, &idx, [n, c, h, w]), [n, c, h, w]))
    }

    fn has_ragged_conv() -> bool {
        true
    }

    fn conv2d_bias_act_ragged(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        c_in: &[usize],
        c_out: &[usize],
        relu: bool,
        geom: ConvGeom,
    ) -> FloatTensor<Self> {
        let (xd, wd) = (dims4(&x), dims4(&weight));
        let (xs, ws, bs) = (host_f32(&x), host_f32(&weight), host_f32(&bias));
        let (Some(xs), Some(ws), Some(bs)) = (xs, ws, bs) else {
            return conv2d_bias_act_ragged_masked::<Self>(x, weight, bias, c_in, c_out, relu, geom);
        };
        let mut g = Geometry::new(xd, wd, geom);
        g.o = c_out.iter().copied().max().unwrap_or(0);
        let out = cpu::forward_ragged(&xs, &ws, &g, c_in, c_out, cpu::Epilogue { bias: Some(&bs), relu });
        NdArrayTensor::from_data(TensorData::new(out, [g.n, g.o, g.ho, g.wo]))
    }

    fn global_avg_pool(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let [n, c, h, w] = dims4(&x);
        let Some(xs) = host_f32(&x) else {
            let x = Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(x));
            return x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c]).into_primitive().tensor();
        };
        NdArrayTensor::from_data(TensorData::new(cpu::plane_means(&xs, h * w), [n, c]))
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
        // A permuted view of contiguous memory (e.g. tokens [N, P, C] seen as [N, C, H, W]):
        // copied with an inner loop per row, where the element iterator steps one index at a time.
        None => match v.as_slice_memory_order() {
            Some(mem) if v.strides().iter().zip(v.shape()).all(|(&s, &n)| s > 0 || n == 1) => {
                let strides: Vec<usize> = v.strides().iter().map(|&s| s as usize).collect();
                Cow::Owned(strided_copy(mem, v.shape(), &strides))
            }
            _ => Cow::Owned(v.iter().copied().collect()),
        },
    })
}

/// The elements of the view `(shape, strides)` of `mem` (strides in elements, non-negative, the
/// view starting at `mem[0]`) in row-major order.
fn strided_copy(mem: &[f32], shape: &[usize], strides: &[usize]) -> Vec<f32> {
    let Some((&inner, outer)) = shape.split_last() else { return mem[..1].to_vec() };
    let step = strides[shape.len() - 1];
    let mut out = Vec::with_capacity(shape.iter().product());
    if inner == 0 || outer.contains(&0) {
        return out;
    }
    let mut idx = vec![0usize; outer.len()];
    loop {
        let base: usize = idx.iter().zip(strides).map(|(i, s)| i * s).sum();
        out.extend(mem[base..].iter().step_by(step.max(1)).take(inner));
        let mut k = outer.len();
        loop {
            if k == 0 {
                return out;
            }
            k -= 1;
            idx[k] += 1;
            if idx[k] < outer[k] {
                break;
            }
            idx[k] = 0;
        }
    }
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
    /// Input channels per group of the weight as stored (more than `c / groups` when the
    /// forward uses a channel slice of a larger weight).
    wc: usize,
}

impl Geometry {
    fn new(x: [usize; 4], w: [usize; 4], geom: ConvGeom) -> Self {
        let [n, c, h, wi] = x;
        let [o, wc, kh, kw] = w;
        let (s, p) = (geom.stride, geom.padding);
        Self { n, c, h, w: wi, o, kh, kw, ho: (h + 2 * p - kh) / s + 1, wo: (wi + 2 * p - kw) / s + 1, s, p, groups: geom.groups, wc }
    }
    /// Distance between output channels in the stored weight.
    fn w_row(&self) -> usize {
        self.wc * self.kh * self.kw
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

/// Splitting work over images (or channels, or rows) on scoped threads, for the CPU kernels.
pub(crate) use cpu::{elementwise_threads, for_image_chunks, for_image_ranges, gemm_strided, zeroed_by_image_chunks, zeroed_by_rows};

mod cpu {
    use super::Geometry;
    use crate::nn::depthwise::{self, Depthwise};
    use crate::nn::pool::join_all;

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

    /// [`gemm`] into a destination with row and column strides `(rsc, csc)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_strided(m: usize, k: usize, n: usize, a: &[f32], (rsa, csa): (usize, usize), b: &[f32], (rsb, csb): (usize, usize), accumulate: bool, c: &mut [f32], (rsc, csc): (usize, usize)) {
        if m == 0 || n == 0 {
            return;
        }
        assert!(c.len() > (m - 1) * rsc + (n - 1) * csc);
        if k == 0 {
            if !accumulate {
                (0..m).for_each(|i| (0..n).for_each(|j| c[i * rsc + j * csc] = 0.0));
            }
            return;
        }
        assert!(a.len() > (m - 1) * rsa + (k - 1) * csa);
        assert!(b.len() > (k - 1) * rsb + (n - 1) * csb);
        // SAFETY: the asserts above bound every index the kernel reads or writes; `c` does not
        // alias `a` or `b` (distinct borrows).
        unsafe {
            gemm::gemm(
                m, n, k,
                c.as_mut_ptr(), csc as isize, rsc as isize, accumulate,
                a.as_ptr(), csa as isize, rsa as isize,
                b.as_ptr(), csb as isize, rsb as isize,
                1.0, 1.0, false, false, false,
                gemm::Parallelism::None,
            );
        }
    }

    /// Where a zero-padded image lies in the flat buffers of the shifted GEMMs. Rows are
    /// `w + p` wide and image slots `h + p` rows high: the `p` zero columns at the start of a row
    /// are the right border of the row before it as well, and the `p` zero rows at the top of a
    /// slot the bottom border of the image before it, because a tap's shift reaches at most `p`
    /// past the image's edge in each direction. Pixel `(y, x)` lies at `(y + p)·wp + x + p`,
    /// output pixel `(y, x)` at column `y·wp + x`, and tap `(i, j)` reads `i·wp + j` further on.
    /// Every row and image padded on both sides, `(h + 2p)·(w + 2p)` columns, was 15 % more
    /// product than the output on 28×28 maps and 31 % on 14×14; this layout is 7 % and 15 %.
    struct PaddedLayout {
        /// Row stride.
        wp: usize,
        /// Floats per image slot.
        plane: usize,
        /// Zeros after the last slot: its bottom border (and the overhang of the last tap).
        tail: usize,
    }

    impl PaddedLayout {
        fn of(g: &Geometry) -> Self {
            debug_assert!(2 * g.p < g.kh.min(g.kw), "output no larger than the input");
            let wp = g.w + g.p;
            Self { wp, plane: (g.h + g.p) * wp, tail: g.p * wp + g.p }
        }
    }

    /// Floats per buffer of a [`ShiftedBatch`]: the padded images, the wide output and the
    /// gradient of the padded images of a thread (2 MiB each) stay in the L3 cache together.
    const SHIFTED_BATCH_FLOATS: usize = 1 << 19;

    /// `dst[j·ds + i] = src[i·ss + j]` for `i < rows`, `j < cols`: 8×8 tiles in AVX2
    /// registers, the ragged edges element by element. A channel-by-channel loop with a strided
    /// iterator cost about 6 cycles per float, a tenth of a small-CNN training step.
    fn transpose(src: &[f32], ss: usize, rows: usize, cols: usize, dst: &mut [f32], ds: usize) {
        if rows == 0 || cols == 0 {
            return;
        }
        assert!(src.len() > (rows - 1) * ss + cols - 1 && dst.len() > (cols - 1) * ds + rows - 1);
        // Rows [0, r8) and columns [0, c8) go as whole tiles.
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
        let (r8, c8) = {
            let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
            for i0 in (0..r8).step_by(8) {
                for j0 in (0..c8).step_by(8) {
                    // SAFETY: rows i0..i0+8 and columns j0..j0+8 lie within the bounds asserted above.
                    unsafe { transpose8x8(src.as_ptr().add(i0 * ss + j0), ss, dst.as_mut_ptr().add(j0 * ds + i0), ds) };
                }
            }
            (r8, c8)
        };
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
        let (r8, c8) = (0, 0);
        for i in 0..rows {
            for j in if i < r8 { c8 } else { 0 }..cols {
                dst[j * ds + i] = src[i * ss + j];
            }
        }
    }

    /// One 8×8 tile of [`transpose`]: rows `src + i·ss` to columns `dst + j·ds`.
    ///
    /// # Safety
    /// `src + i·ss + [0, 8)` and `dst + j·ds + [0, 8)` must be valid for `i, j < 8`.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    #[inline(always)]
    unsafe fn transpose8x8(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees the eight rows and columns; AVX2 is enabled at compile time.
        unsafe {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ss)));
            // Row pairs (0,1), (2,3), (4,5), (6,7) interleaved: `lo` holds columns 0, 1 | 4, 5
            // of each pair, `hi` columns 2, 3 | 6, 7.
            let lo: [__m256; 4] = std::array::from_fn(|k| _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]));
            let hi: [__m256; 4] = std::array::from_fn(|k| _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]));
            for (j, t) in [(0, &lo), (2, &hi)] {
                // Columns j | j + 4 and j + 1 | j + 5 of rows 0–3 and of rows 4–7.
                let (top0, bottom0) = (_mm256_shuffle_ps::<0x44>(t[0], t[1]), _mm256_shuffle_ps::<0x44>(t[2], t[3]));
                let (top1, bottom1) = (_mm256_shuffle_ps::<0xEE>(t[0], t[1]), _mm256_shuffle_ps::<0xEE>(t[2], t[3]));
                _mm256_storeu_ps(dst.add(j * ds), _mm256_permute2f128_ps::<0x20>(top0, bottom0));
                _mm256_storeu_ps(dst.add((j + 4) * ds), _mm256_permute2f128_ps::<0x31>(top0, bottom0));
                _mm256_storeu_ps(dst.add((j + 1) * ds), _mm256_permute2f128_ps::<0x20>(top1, bottom1));
                _mm256_storeu_ps(dst.add((j + 5) * ds), _mm256_permute2f128_ps::<0x31>(top1, bottom1));
            }
        }
    }

    /// Several images side by side, channels last, for the shifted GEMMs: position `q` of the
    /// padded layout holds the `C` channels of
    /// one pixel, and the image slots follow each other, so one GEMM covers them all. Per image,
    /// the GEMM's column count was the image's pixels: 6 on VGG-16's 2×2 maps, where packing the
    /// weight cost more than the product.
    ///
    /// Channels last, the `kw` taps of one kernel row read `kw·C` consecutive floats at every
    /// position: the forward is one GEMM per kernel row with `K = kw·C` (a third of the passes
    /// over the output at 3×3), and its input is read in place, column by column. With the
    /// channels as rows (`[C][positions]`) gemm packed the shifted input for every tap (13 % of
    /// a small-CNN training step) and ran the output channels in blocks of 6, with a 2-wide
    /// remainder at 32.
    struct ShiftedBatch {
        /// Image slots.
        imgs: usize,
        plane: usize,
        wp: usize,
        /// Positions from an image's first output pixel to its last, in the padded layout.
        span: usize,
        /// `[row][C]`, the images' interiors; borders stay zero.
        padded: Vec<f32>,
        /// `[row][O]`: the forward's output, or the backward's output gradient, in the padded
        /// layout; the gradient's positions outside the output pixels stay zero.
        wide: Vec<f32>,
        /// `[row][C]`: the gradient of `padded` (backward with `dx` only).
        dpadded: Vec<f32>,
        /// `[kh][O][kw·C]`: the weight by kernel row, channels last within a tap (forward), or
        /// the weight gradient accumulated in that layout (backward with `dW`).
        w_rows: Vec<f32>,
    }

    impl ShiftedBatch {
        fn new(g: &Geometry, images: usize, dx: bool) -> Self {
            let PaddedLayout { wp, plane, tail } = PaddedLayout::of(g);
            let imgs = (SHIFTED_BATCH_FLOATS / (g.c.max(g.o) * plane).max(1)).clamp(1, images.max(1));
            // Positions in every buffer: the slots and the tail.
            let row = imgs * plane + tail;
            Self {
                imgs,
                plane,
                wp,
                span: (g.ho - 1) * wp + g.wo,
                padded: vec![0.0; g.c * row],
                wide: vec![0.0; g.o * row],
                dpadded: if dx { vec![0.0; g.c * row] } else { Vec::new() },
                w_rows: vec![0.0; g.o * g.c * g.kh * g.kw],
            }
        }

        /// GEMM columns that cover `b` images.
        fn cols(&self, b: usize) -> usize {
            (b - 1) * self.plane + self.span
        }

        /// Writes `b` consecutive images of `x` (`[b, C, H, W]`) into the padded slots,
        /// channels last.
        fn load_input(&mut self, x: &[f32], g: &Geometry, b: usize) {
            let (hw, c) = (g.h * g.w, g.c);
            for i in 0..b {
                let img = &x[i * c * hw..][..c * hw];
                for y in 0..g.h {
                    let at = i * self.plane + (y + g.p) * self.wp + g.p;
                    transpose(&img[y * g.w..], hw, c, g.w, &mut self.padded[at * c..][..g.w * c], c);
                }
            }
        }

        /// Position offset of kernel tap `tap` in the padded layout.
        fn offset(&self, g: &Geometry, tap: usize) -> usize {
            (tap / g.kw) * self.wp + tap % g.kw
        }

        /// The weight `[O][wc·kh·kw]` (first `C` input channels) into `w_rows`' layout.
        fn load_weight(&mut self, w: &[f32], g: &Geometry) {
            let (taps, kc) = (g.kh * g.kw, g.kw * g.c);
            for i in 0..g.kh {
                for o in 0..g.o {
                    let dst = &mut self.w_rows[(i * g.o + o) * kc..][..kc];
                    for j in 0..g.kw {
                        for c in 0..g.c {
                            dst[j * g.c + c] = w[o * g.w_row() + c * taps + i * g.kw + j];
                        }
                    }
                }
            }
        }

        /// Adds the weight gradient accumulated in `w_rows` to `dw` (`[O][C·kh·kw]`).
        fn add_weight_grad(&self, g: &Geometry, dw: &mut [f32]) {
            let (taps, kc) = (g.kh * g.kw, g.kw * g.c);
            for i in 0..g.kh {
                for o in 0..g.o {
                    let src = &self.w_rows[(i * g.o + o) * kc..][..kc];
                    for j in 0..g.kw {
                        for c in 0..g.c {
                            dw[o * g.w_row() + c * taps + i * g.kw + j] += src[j * g.c + c];
                        }
                    }
                }
            }
        }
    }

    /// Stride-1 dense convolution of `b` consecutive images, one GEMM per kernel row `i`:
    /// `Y[q, o] += Σ_(j, c) X_pad[q + i·wp + j, c] · W[o, c, i, j]`, the images side by side and
    /// channels last (see [`ShiftedBatch`]); `s.w_rows` holds the weight ([`ShiftedBatch::load_weight`]).
    fn shifted_forward_batch(x: &[f32], g: &Geometry, epi: Epilogue, s: &mut ShiftedBatch, b: usize, out: &mut [f32]) {
        s.load_input(x, g, b);
        let (cols, pix, kc) = (s.cols(b), g.pixels(), g.kw * g.c);
        for i in 0..g.kh {
            let off = i * s.wp * g.c;
            // A = W's kernel row i as [O × kw·C]; B = the padded images from row i on, as
            // [kw·C × positions] (position q's column starts at float q·C).
            gemm_strided(g.o, kc, cols, &s.w_rows[i * g.o * kc..], (kc, 1), &s.padded[off..], (1, g.c), i > 0, &mut s.wide, (1, g.o));
        }
        for (i, dst) in out.chunks_exact_mut(g.o * pix).take(b).enumerate() {
            for oy in 0..g.ho {
                let at = i * s.plane + oy * s.wp;
                transpose(&s.wide[at * g.o..], g.o, g.wo, g.o, &mut dst[oy * g.wo..], pix);
            }
            for (oc, plane) in dst.chunks_exact_mut(pix).enumerate() {
                epi.apply(oc, plane);
            }
        }
    }

    /// Both gradients of [`shifted_forward_batch`] for `b` consecutive images, channels last
    /// and no im2col: with `G` the output gradient in the padded layout and `X` the padded
    /// images, `dW[:, :, i, ·] += Gᵀ · X[shifted by row i]` per kernel row (into `s.w_rows`,
    /// see [`ShiftedBatch::add_weight_grad`]) and `dX[q + off(i, j), c] += Σ_o W[o, c, i, j] ·
    /// G[q, o]` per tap. im2col and col2im moved `kh·kw` copies of every image through memory,
    /// twice per backward.
    #[allow(clippy::too_many_arguments)]
    fn shifted_backward_batch(
        grad: &[f32],
        x: Option<&[f32]>,
        w: Option<&[f32]>,
        g: &Geometry,
        s: &mut ShiftedBatch,
        b: usize,
        dx: Option<&mut [f32]>,
    ) {
        let (cols, taps, pix, kc) = (s.cols(b), g.kh * g.kw, g.pixels(), g.kw * g.c);
        for i in 0..b {
            let src = &grad[i * g.o * pix..][..g.o * pix];
            for oy in 0..g.ho {
                let at = i * s.plane + oy * s.wp;
                transpose(&src[oy * g.wo..], pix, g.o, g.wo, &mut s.wide[at * g.o..], g.o);
            }
        }
        if let Some(x) = x {
            s.load_input(x, g, b);
            for i in 0..g.kh {
                let off = i * s.wp * g.c;
                // dW_i[o, (j, c)] += Σ_q G[q, o] · X[q + i·wp, (j, c)]
                gemm_strided(g.o, cols, kc, &s.wide, (1, g.o), &s.padded[off..], (g.c, 1), true, &mut s.w_rows[i * g.o * kc..], (kc, 1));
            }
        }
        if let (Some(w), Some(dx)) = (w, dx) {
            // Tap 0 (offset 0) writes positions [0, cols) without reading them; the other taps
            // reach up to `last` positions further, which start from zero.
            let last = s.offset(g, taps - 1);
            s.dpadded[cols * g.c..(cols + last) * g.c].fill(0.0);
            for tap in 0..taps {
                let off = s.offset(g, tap) * g.c;
                // dX[q + off, c] += Σ_o W[o, c, tap] · G[q, o]
                gemm_strided(g.c, g.o, cols, &w[tap..], (taps, g.w_row()), &s.wide, (1, g.o), tap > 0, &mut s.dpadded[off..], (1, g.c));
            }
            let hw = g.h * g.w;
            for i in 0..b {
                let dst = &mut dx[i * g.c * hw..][..g.c * hw];
                for y in 0..g.h {
                    let at = i * s.plane + (y + g.p) * s.wp + g.p;
                    transpose(&s.dpadded[at * g.c..], g.c, g.w, g.c, &mut dst[y * g.w..], hw);
                }
            }
        }
    }

    /// How many threads a call over `images` images of `macs_per_image` MACs uses: the
    /// caller's [`compute_threads`](crate::nn::pool::compute_threads), fewer when the work is too small to pay for a spawn.
    fn split(images: usize, macs_per_image: usize) -> usize {
        // About 0.5 ms of work per thread at least (a spawn costs tens of microseconds).
        const MIN_MACS_PER_THREAD: usize = 1 << 21;
        let by_work = (images * macs_per_image / MIN_MACS_PER_THREAD).max(1);
        crate::nn::pool::compute_threads().min(images).min(by_work).max(1)
    }

    /// Runs `f(first_image, images)` over `threads` contiguous image ranges, the first on the
    /// calling thread.
    pub(crate) fn for_image_ranges<R: Send>(n: usize, threads: usize, f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
        let ranges: Vec<(usize, usize)> =
            (0..threads).map(|t| (t * n / threads, (t + 1) * n / threads)).filter(|(a, b)| b > a).collect();
        if ranges.len() <= 1 {
            return vec![f(0, n)];
        }
        let f = &f;
        join_all(ranges.into_iter().map(|(a, b)| move || f(a, b - a)).collect())
    }

    /// What the forward applies to each output channel as it is written.
    #[derive(Clone, Copy)]
    pub struct Epilogue<'a> {
        pub bias: Option<&'a [f32]>,
        pub relu: bool,
    }

    impl Epilogue<'_> {
        pub const NONE: Epilogue<'static> = Epilogue { bias: None, relu: false };

        fn apply(&self, channel: usize, row: &mut [f32]) {
            let b = self.bias.map_or(0.0, |b| b[channel]);
            match (b != 0.0, self.relu) {
                (false, false) => {}
                (true, false) => row.iter_mut().for_each(|v| *v += b),
                // `<` rather than `max` so that a NaN passes through, as in PyTorch.
                (_, true) => row.iter_mut().for_each(|v| {
                    let y = *v + b;
                    *v = if y < 0.0 { 0.0 } else { y };
                }),
            }
        }
    }

    /// Whether the shifted GEMMs ([`ShiftedBatch`]) apply: dense, stride 1, and enough input channels
    /// for a GEMM with `K = C` to run well (the first layer of a network, with 1 or 3 input
    /// channels, keeps im2col's `K = C·kh·kw`).
    fn shifted(g: &Geometry) -> bool {
        g.s == 1 && g.groups == 1 && g.c >= 8 && 2 * g.p < g.kh.min(g.kw)
    }

    /// Whether a [`shifted`] layer runs as im2col over several images instead. The shifted
    /// GEMMs compute every position of the padded layout, `(H+p)·(W+p)` per image where `H·W`
    /// are kept (1.27× the work at 8×8 with a 3×3 kernel, 1.56× at 4×4, 2.25× at 2×2); im2col
    /// computes no extra product but copies `K` floats per pixel in, and col2im adds them back,
    /// a cost per multiply-add of about `1/O`. Measured on VGG-16 and ResNet-20 training
    /// (2026-12-07, AVX-512 and AVX2 GEMM kernels): at 8×8, im2col won 3 % of a VGG step with
    /// 256 output channels and lost 10 % of a ResNet-20 step with 64; at 4×4 and smaller it won
    /// with 16 and more.
    fn batched_im2col(g: &Geometry) -> bool {
        let (plane, pix) = (PaddedLayout::of(g).plane, g.pixels());
        shifted(g) && (2 * plane > 3 * pix || (plane - pix) * g.o > 24 * pix)
    }

    /// Column matrices of at most this many floats per [`batched_im2col`] GEMM (1 MiB, the L2
    /// cache of a core on current x86 servers), so that im2col's output is still in cache when
    /// the GEMM reads it. VGG-16 training at one thread, alternating: 42.2 img/s against 40.4
    /// with 4 MiB, 38.8 with 16 MiB (2026-12-07, AVX-512 VM).
    const BATCHED_COLS_FLOATS: usize = 1 << 18;

    /// Images per [`batched_im2col`] GEMM.
    fn batched_images(g: &Geometry, count: usize) -> usize {
        (BATCHED_COLS_FLOATS / (g.k() * g.pixels()).max(1)).clamp(1, count.max(1))
    }

    /// Where each column of a small map's column matrix reads: for tap `t` and output pixel `q`,
    /// `src[t·pix + q]` indexes the channel plane, or is `h·w` (a zero after the plane) where the
    /// tap overhangs the border. On maps of 8×8 and smaller, im2col's and col2im's copies per
    /// output row are 2 to 8 floats long, and their per-row bounds, fills and `memcpy` calls
    /// cost more than the floats: 10 % of a VGG-16 training step, against 3 % as one indexed
    /// load per float.
    struct TapTable {
        src: Vec<u32>,
    }

    impl TapTable {
        fn new(g: &Geometry) -> Self {
            let hw = g.h * g.w;
            let mut src = Vec::with_capacity(g.kh * g.kw * g.pixels());
            for i in 0..g.kh {
                for j in 0..g.kw {
                    for oy in 0..g.ho {
                        for ox in 0..g.wo {
                            let (iy, ix) = ((oy * g.s + i) as isize - g.p as isize, (ox * g.s + j) as isize - g.p as isize);
                            let inside = (0..g.h as isize).contains(&iy) && (0..g.w as isize).contains(&ix);
                            src.push(if inside { iy as usize * g.w + ix as usize } else { hw } as u32);
                        }
                    }
                }
            }
            Self { src }
        }

        /// Image `img`'s column matrix into rows `stride` floats apart; `plane` holds `h·w + 1`
        /// floats.
        fn im2col(&self, x: &[f32], g: &Geometry, img: usize, cols: &mut [f32], stride: usize, plane: &mut [f32]) {
            let (hw, pix, taps) = (g.h * g.w, g.pixels(), g.kh * g.kw);
            plane[hw] = 0.0;
            for cl in 0..g.c {
                plane[..hw].copy_from_slice(&x[(img * g.c + cl) * hw..][..hw]);
                for (t, src) in self.src.chunks_exact(pix).enumerate() {
                    let row = &mut cols[(cl * taps + t) * stride..][..pix];
                    for (d, &at) in row.iter_mut().zip(src) {
                        *d = plane[at as usize];
                    }
                }
            }
        }

        /// Adds the column matrix (rows `stride` floats apart) back onto image `img` of `dx`.
        fn col2im(&self, cols: &[f32], g: &Geometry, img: usize, dx: &mut [f32], stride: usize, plane: &mut [f32]) {
            let (hw, pix, taps) = (g.h * g.w, g.pixels(), g.kh * g.kw);
            for cl in 0..g.c {
                plane.fill(0.0);
                for (t, src) in self.src.chunks_exact(pix).enumerate() {
                    let row = &cols[(cl * taps + t) * stride..][..pix];
                    for (&v, &at) in row.iter().zip(src) {
                        plane[at as usize] += v;
                    }
                }
                for (d, &v) in dx[(img * g.c + cl) * hw..][..hw].iter_mut().zip(&plane[..hw]) {
                    *d += v;
                }
            }
        }
    }


    /// Forward of images `first..` into `out` by [`batched_im2col`]: one GEMM
    /// `W[O × K] · cols[K × images·pix]` per batch of images.
    fn batched_im2col_forward(x: &[f32], w: &[f32], g: &Geometry, epi: Epilogue, first: usize, out: &mut [f32]) {
        let (k, pix) = (g.k(), g.pixels());
        let slab = g.o * pix;
        let count = out.len() / slab.max(1);
        let per = batched_images(g, count);
        let (mut cols, mut wide) = (vec![0.0f32; k * per * pix], vec![0.0f32; g.o * per * pix]);
        let (table, mut plane) = (TapTable::new(g), vec![0.0f32; g.h * g.w + 1]);
        let mut i = 0;
        while i < count {
            let b = per.min(count - i);
            let n = b * pix;
            for j in 0..b {
                table.im2col(x, g, first + i + j, &mut cols[j * pix..], n, &mut plane);
            }
            gemm(g.o, k, n, w, (g.w_row(), 1), &cols, (n, 1), false, &mut wide);
            for j in 0..b {
                let dst = &mut out[(i + j) * slab..][..slab];
                for (oc, row) in dst.chunks_exact_mut(pix).enumerate() {
                    row.copy_from_slice(&wide[oc * n + j * pix..][..pix]);
                    epi.apply(oc, row);
                }
            }
            i += b;
        }
    }

    /// Backward of images `first..first + count` by [`batched_im2col`]: `dW += G·colsᵀ` and
    /// `cols = Wᵀ·G` (then col2im) per batch of images, `G` the batch's output gradient laid
    /// out as `[O × images·pix]`.
    #[allow(clippy::too_many_arguments)]
    fn batched_im2col_backward(grad: &[f32], x: Option<&[f32]>, w: Option<&[f32]>, g: &Geometry, first: usize, count: usize, dx: Option<&mut [f32]>, dw: Option<&mut [f32]>) {
        let (k, pix) = (g.k(), g.pixels());
        let per = batched_images(g, count);
        let (mut cols, mut gw) = (vec![0.0f32; k * per * pix], vec![0.0f32; g.o * per * pix]);
        let (table, mut plane) = (TapTable::new(g), vec![0.0f32; g.h * g.w + 1]);
        let (mut dx, mut dw) = (dx, dw);
        let mut i = 0;
        while i < count {
            let b = per.min(count - i);
            let n = b * pix;
            for j in 0..b {
                let gr = &grad[(first + i + j) * g.o * pix..][..g.o * pix];
                for (oc, src) in gr.chunks_exact(pix).enumerate() {
                    gw[oc * n + j * pix..][..pix].copy_from_slice(src);
                }
            }
            if let (Some(x), Some(dw)) = (x, dw.as_deref_mut()) {
                for j in 0..b {
                    table.im2col(x, g, first + i + j, &mut cols[j * pix..], n, &mut plane);
                }
                // dW[O×K] += G[O×n] · colsᵀ[n×K]
                gemm(g.o, n, k, &gw, (n, 1), &cols, (1, n), true, dw);
            }
            if let (Some(w), Some(dx)) = (w, dx.as_deref_mut()) {
                // cols[K×n] = Wᵀ[K×O] · G[O×n]
                gemm(k, g.o, n, w, (1, k), &gw, (n, 1), false, &mut cols);
                for j in 0..b {
                    table.col2im(&cols[j * pix..], g, i + j, dx, n, &mut plane);
                }
            }
            i += b;
        }
    }

    /// One thread's im2col column matrix, kept from image to image.
    struct Scratch {
        cols: Vec<f32>,
    }

    impl Scratch {
        /// A column matrix for images of up to `g.c` input channels.
        fn new(g: &Geometry) -> Self {
            Self { cols: vec![0.0; g.k() * g.pixels()] }
        }
    }

    /// im2col + one GEMM per group, for one image (`x` holds the whole batch, `img` indexes it).
    fn image_im2col(x: &[f32], w: &[f32], g: &Geometry, epi: Epilogue, img: usize, s: &mut Scratch, dst: &mut [f32]) {
        let (k, pix, og) = (g.k(), g.pixels(), g.og());
        for grp in 0..g.groups {
            im2col(x, g, img, grp, &mut s.cols);
            // Rows of the stored weight are w_row apart; a channel slice uses the first k.
            let wg = &w[grp * og * g.w_row()..];
            let dst = &mut dst[grp * og * pix..][..og * pix];
            gemm(og, k, pix, wg, (g.w_row(), 1), &s.cols, (pix, 1), false, dst);
            for (oc, row) in dst.chunks_exact_mut(pix).enumerate() {
                epi.apply(grp * og + oc, row);
            }
        }
    }

    /// Whether a layer is a 1×1 convolution on maps large enough for one GEMM per image,
    /// `Y = W·X` on the image as it lies (no copy in or out). HorNet's `proj_in`/`proj_out` are
    /// these; through the shifted path's channels-last copies they cost 13 % of its inference.
    fn pointwise(g: &Geometry) -> bool {
        g.kh == 1 && g.kw == 1 && g.s == 1 && g.p == 0 && g.groups == 1 && g.pixels() >= 64
    }

    /// Output of images `first..` into `out` (`[count, O, Ho, Wo]`, `count` from its length).
    fn forward_range(x: &[f32], w: &[f32], g: &Geometry, epi: Epilogue, first: usize, out: &mut [f32]) {
        let slab = g.o * g.pixels();
        if pointwise(g) {
            let (pix, chw) = (g.pixels(), g.c * g.pixels());
            for (i, dst) in out.chunks_exact_mut(slab.max(1)).enumerate() {
                gemm(g.o, g.c, pix, w, (g.w_row(), 1), &x[(first + i) * chw..][..chw], (pix, 1), false, dst);
                for (oc, row) in dst.chunks_exact_mut(pix).enumerate() {
                    epi.apply(oc, row);
                }
            }
            return;
        }
        if batched_im2col(g) {
            batched_im2col_forward(x, w, g, epi, first, out);
            return;
        }
        if shifted(g) {
            let count = out.len() / slab.max(1);
            let mut s = ShiftedBatch::new(g, count, false);
            s.load_weight(w, g);
            let chw = g.c * g.h * g.w;
            let mut i = 0;
            while i < count {
                let b = s.imgs.min(count - i);
                shifted_forward_batch(&x[(first + i) * chw..][..b * chw], g, epi, &mut s, b, &mut out[i * slab..][..b * slab]);
                i += b;
            }
            return;
        }
        let mut scratch = Scratch::new(g);
        for (i, dst) in out.chunks_exact_mut(slab.max(1)).enumerate() {
            image_im2col(x, w, g, epi, first + i, &mut scratch, dst);
        }
    }

    /// [`ConvBackend::conv2d_bias_act_ragged`](super::ConvBackend::conv2d_bias_act_ragged):
    /// every image runs the same per-image kernel as [`forward`], on its own channel block
    /// `[0, c_out[i]) × [0, c_in[i])` of the weight, so each image's output is bit for bit what
    /// a batch of images with its widths gives; the batch is split over threads as one. RNP's
    /// grouping of images by action instead ran one call per (previous, new) action pair, with
    /// a gather before and a concatenation after, and a small group ran on one core.
    ///
    /// `g.c` is the channel count of `x` (the widest input), `g.o` that of the output (the
    /// widest `c_out`): channels that no image of the batch computes are not stored at all.
    pub fn forward_ragged(x: &[f32], w: &[f32], g: &Geometry, c_in: &[usize], c_out: &[usize], epi: Epilogue) -> Vec<f32> {
        let (pix, hw) = (g.pixels(), g.h * g.w);
        let slab = g.o * pix;
        let macs: usize = c_in.iter().zip(c_out).map(|(&a, &b)| a * b).sum::<usize>() * g.kh * g.kw * pix;
        let threads = split(g.n, macs / g.n.max(1));
        zeroed_by_image_chunks(g.n * slab, g.n, threads, |first, chunk| {
            // Sized by the first image that needs it: zeroing a column matrix for the widest
            // input on every call cost a routed batch-1 forward 5 %.
            let mut scratch = Scratch { cols: Vec::new() };
            // One shifted batch of one image per (input, output) width, its weight loaded once.
            let mut batches: Vec<((usize, usize), ShiftedBatch)> = Vec::new();
            for (i, dst) in chunk.chunks_exact_mut(slab.max(1)).enumerate() {
                let img = first + i;
                let gi = Geometry { n: 1, c: c_in[img], o: c_out[img], ..*g };
                if shifted(g) && shifted(&gi) {
                    let at = match batches.iter().position(|(widths, _)| *widths == (gi.c, gi.o)) {
                        Some(at) => at,
                        None => {
                            let mut s = ShiftedBatch::new(&gi, 1, false);
                            s.load_weight(w, &gi);
                            batches.push(((gi.c, gi.o), s));
                            batches.len() - 1
                        }
                    };
                    // The same GEMMs, in the same order, as a batch of images of these widths.
                    shifted_forward_batch(&x[img * g.c * hw..][..gi.c * hw], &gi, epi, &mut batches[at].1, 1, &mut dst[..gi.o * pix]);
                } else {
                    // im2col reads channel planes `g.c` apart in `x`: give it this image alone.
                    let xi = &x[img * g.c * hw..][..gi.c * hw];
                    if scratch.cols.len() < gi.k() * pix {
                        scratch.cols.resize(gi.k() * pix, 0.0);
                    }
                    image_im2col(xi, w, &gi, epi, 0, &mut scratch, dst);
                }
            }
        })
    }

    /// The geometry as a stride-1 depthwise convolution that [`depthwise`](crate::nn::depthwise)'s
    /// direct kernel handles, if it is one.
    fn as_depthwise(g: &Geometry) -> Option<Depthwise> {
        let d = Depthwise { n: g.n, c: g.c, h: g.h, w: g.w, kh: g.kh, kw: g.kw, p: g.p };
        (g.groups == g.c && g.o == g.c && g.wc == 1 && g.s == 1 && g.c > 0 && d.supported()).then_some(d)
    }

    pub fn forward(x: &[f32], w: &[f32], g: &Geometry, epi: Epilogue) -> Vec<f32> {
        if let Some(d) = as_depthwise(g) {
            return depthwise::forward_then(x, w, &d, |plane, values| epi.apply(plane % g.o, values));
        }
        let threads = split(g.n, g.o * g.k() * g.pixels());
        zeroed_by_image_chunks(g.n * g.o * g.pixels(), g.n, threads, |first, chunk| forward_range(x, w, g, epi, first, chunk))
    }

    /// Splits `out` (`images` equal slabs) into `threads` contiguous ranges of images and runs
    /// `f(first_image, slab_range)` on each, the first on the calling thread: every thread
    /// writes its own part of the output, so nothing is concatenated afterwards.
    pub(crate) fn for_image_chunks<T: Send, R: Send>(out: &mut [T], images: usize, threads: usize, f: impl Fn(usize, &mut [T]) -> R + Sync) -> Vec<R> {
        let per = out.len().checked_div(images).unwrap_or(0);
        let threads = threads.clamp(1, images.max(1));
        if threads == 1 {
            return vec![f(0, out)];
        }
        let f = &f;
        let mut rest = out;
        let mut tasks = Vec::with_capacity(threads);
        for t in 0..threads {
            let (a, b) = (t * images / threads, (t + 1) * images / threads);
            let (chunk, tail) = std::mem::take(&mut rest).split_at_mut((b - a) * per);
            rest = tail;
            tasks.push(move || f(a, chunk));
        }
        join_all(tasks)
    }

    /// Threads for an element-wise pass over `len` values: one per 64 K values at least.
    pub(crate) fn elementwise_threads(len: usize) -> usize {
        crate::nn::pool::compute_threads().min(len >> 16).max(1)
    }

    /// A buffer of `len` values in `rows` equal rows, zeroed and filled by `f(first_row, chunk)`
    /// over contiguous ranges of rows, as many as [`elementwise_threads`] gives.
    pub(crate) fn zeroed_by_rows(len: usize, rows: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
        if rows == 0 || len == 0 {
            return vec![0.0f32; len];
        }
        zeroed_by_image_chunks(len, rows, elementwise_threads(len), f)
    }

    /// A buffer of `len` floats as [`for_image_chunks`] fills it: each thread zeroes its own
    /// slab, then runs `f` on it. `vec![0.0; len]` zeroed the whole output on the calling thread
    /// before the split (5 % of a 2-thread small-CNN training step, all of it serial).
    pub(crate) fn zeroed_by_image_chunks(len: usize, images: usize, threads: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
        use std::mem::MaybeUninit;
        if threads.clamp(1, images.max(1)) == 1 {
            let mut out = vec![0.0f32; len];
            f(0, &mut out);
            return out;
        }
        let mut buf: Vec<MaybeUninit<f32>> = Vec::with_capacity(len);
        // SAFETY: `MaybeUninit` needs no initialisation; the capacity is `len`.
        unsafe { buf.set_len(len) };
        // The slabs cover `[0, covered)`; a remainder (none when `len` is a multiple of
        // `images`) is zeroed here and given to no thread, as in `for_image_chunks`.
        let covered = len / images * images;
        for v in &mut buf[covered..] {
            v.write(0.0);
        }
        for_image_chunks(&mut buf[..covered], images, threads, |first, chunk| {
            for v in chunk.iter_mut() {
                v.write(0.0);
            }
            // SAFETY: every element of the chunk was written just above.
            f(first, unsafe { &mut *(chunk as *mut [MaybeUninit<f32>] as *mut [f32]) });
        });
        let mut buf = std::mem::ManuallyDrop::new(buf);
        // SAFETY: every element was written (the slabs by their threads, the remainder above);
        // `MaybeUninit<f32>` has the layout of `f32`; pointer, length and capacity are `buf`'s.
        unsafe { Vec::from_raw_parts(buf.as_mut_ptr() as *mut f32, len, buf.capacity()) }
    }

    /// The mean of every `hw`-long plane of `x`. ndarray's `mean_dim` over the reshaped planes
    /// took 0.8 ms for a `[64, 32, 28, 28]` activation (this loop 0.2 ms); RNP pools every
    /// decision layer's input, and at batch 64 that cost about as much as the router itself.
    pub fn plane_means(x: &[f32], hw: usize) -> Vec<f32> {
        if hw == 0 {
            return Vec::new();
        }
        x.chunks_exact(hw)
            .map(|plane| {
                // Sixteen partial sums, so that the loop vectorises.
                let mut acc = [0.0f32; 16];
                let mut lanes = plane.chunks_exact(16);
                for chunk in &mut lanes {
                    for (a, &v) in acc.iter_mut().zip(chunk) {
                        *a += v;
                    }
                }
                let tail: f32 = lanes.remainder().iter().sum();
                (acc.iter().sum::<f32>() + tail) / hw as f32
            })
            .collect()
    }

    /// 2×2 / stride-2 max-pool of an NCHW tensor (trailing odd row / column dropped).
    pub fn max_pool2x2(x: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
        let (ho, wo) = (h / 2, w / 2);
        let mut out = vec![0.0f32; n * c * ho * wo];
        if out.is_empty() {
            return out;
        }
        // Memory-bound: a thread pays for itself from about 256 K input values.
        let threads = crate::nn::pool::compute_threads().min((n * c * h * w) >> 18).max(1);
        for_image_chunks(&mut out, n, threads, |first, chunk| {
            for (p, plane) in chunk.chunks_exact_mut(ho * wo).enumerate() {
                let src = &x[(first * c + p) * h * w..][..h * w];
                for (oy, orow) in plane.chunks_exact_mut(wo).enumerate() {
                    let (r0, r1) = (&src[2 * oy * w..][..w], &src[(2 * oy + 1) * w..][..w]);
                    for (ox, o) in orow.iter_mut().enumerate() {
                        *o = r0[2 * ox].max(r0[2 * ox + 1]).max(r1[2 * ox].max(r1[2 * ox + 1]));
                    }
                }
            }
        });
        out
    }

    /// [`max_pool2x2`] and the in-plane position (`row · w + column`) of each maximum; the first
    /// of equal values wins, scanning the window row by row.
    pub fn max_pool2x2_with_indices(x: &[f32], [n, c, h, w]: [usize; 4]) -> (Vec<f32>, Vec<i64>) {
        let (ho, wo) = (h / 2, w / 2);
        let per = c * ho * wo;
        let mut out = vec![0.0f32; n * per];
        let mut idx = vec![0i64; n * per];
        if per == 0 {
            return (out, idx);
        }
        let pool = |first: usize, out: &mut [f32], idx: &mut [i64]| {
            for (p, (plane, iplane)) in out.chunks_exact_mut(ho * wo).zip(idx.chunks_exact_mut(ho * wo)).enumerate() {
                let src = &x[(first * c + p) * h * w..][..h * w];
                for oy in 0..ho {
                    let (r0, r1) = (&src[2 * oy * w..][..2 * wo], &src[(2 * oy + 1) * w..][..2 * wo]);
                    let dst = plane[oy * wo..][..wo].iter_mut().zip(&mut iplane[oy * wo..][..wo]);
                    for (ox, (o, i)) in dst.enumerate() {
                        let (a, b, cc, d) = (r0[2 * ox], r0[2 * ox + 1], r1[2 * ox], r1[2 * ox + 1]);
                        // `>` keeps the first maximum; a NaN wins, as in PyTorch.
                        let (mut best, mut at) = (a, 0);
                        for (k, v) in [(1, b), (2, cc), (3, d)] {
                            if v > best || (v.is_nan() && !best.is_nan()) {
                                (best, at) = (v, k);
                            }
                        }
                        *o = best;
                        *i = ((2 * oy + at / 2) * w + 2 * ox + at % 2) as i64;
                    }
                }
            }
        };
        // Memory-bound: a thread pays for itself from about 256 K input values.
        let threads = crate::nn::pool::compute_threads().min((n * c * h * w) >> 18).clamp(1, n.max(1));
        if threads == 1 {
            pool(0, &mut out, &mut idx);
            return (out, idx);
        }
        let pool = &pool;
        let (mut rest_o, mut rest_i) = (&mut out[..], &mut idx[..]);
        let mut tasks = Vec::with_capacity(threads);
        for t in 0..threads {
            let (a, b) = (t * n / threads, (t + 1) * n / threads);
            let (co, to) = std::mem::take(&mut rest_o).split_at_mut((b - a) * per);
            let (ci, ti) = std::mem::take(&mut rest_i).split_at_mut((b - a) * per);
            (rest_o, rest_i) = (to, ti);
            tasks.push(move || pool(a, co, ci));
        }
        join_all(tasks);
        (out, idx)
    }

    /// The input gradient of a 2×2 max-pool: each output gradient goes to its maximum's place.
    pub fn max_pool2x2_backward(grad: &[f32], idx: &[i64], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
        let per = (h / 2) * (w / 2);
        let mut dx = vec![0.0f32; n * c * h * w];
        if per == 0 {
            return dx;
        }
        for ((plane, g), i) in dx.chunks_exact_mut(h * w).zip(grad.chunks_exact(per)).zip(idx.chunks_exact(per)) {
            for (&gv, &iv) in g.iter().zip(i) {
                plane[iv as usize] += gv;
            }
        }
        dx
    }

    /// `(dx of images first..first+count, this range's share of dW)`.
    fn backward_range(
        grad: &[f32],
        x: Option<&[f32]>,
        w: Option<&[f32]>,
        g: &Geometry,
        first: usize,
        count: usize,
        mut dx: Option<&mut [f32]>,
    ) -> Option<Vec<f32>> {
        let (k, pix, og) = (g.k(), g.pixels(), g.og());
        let mut dw = x.map(|_| vec![0.0f32; g.o * k]);
        if pointwise(g) {
            let chw = g.c * pix;
            for i in 0..count {
                let img = first + i;
                let gr = &grad[img * g.o * pix..][..g.o * pix];
                if let (Some(x), Some(dw)) = (x, dw.as_mut()) {
                    // dW[o, c] += Σ_p G[o, p]·X[c, p]
                    gemm(g.o, pix, g.c, gr, (pix, 1), &x[img * chw..][..chw], (1, pix), true, dw);
                }
                if let (Some(w), Some(dx)) = (w, dx.as_mut()) {
                    // dX[c, p] = Σ_o W[o, c]·G[o, p]
                    gemm(g.c, g.o, pix, w, (1, g.w_row()), gr, (pix, 1), false, &mut dx[i * chw..][..chw]);
                }
            }
            return dw;
        }
        if batched_im2col(g) {
            batched_im2col_backward(grad, x, w, g, first, count, dx.as_deref_mut(), dw.as_deref_mut());
            return dw;
        }
        if shifted(g) {
            let mut s = ShiftedBatch::new(g, count, w.is_some());
            let chw = g.c * g.h * g.w;
            let mut i = 0;
            while i < count {
                let b = s.imgs.min(count - i);
                let img = first + i;
                let gr = &grad[img * g.o * pix..][..b * g.o * pix];
                let xs = x.map(|x| &x[img * chw..][..b * chw]);
                let dxs = dx.as_mut().map(|d| &mut d[i * chw..][..b * chw]);
                shifted_backward_batch(gr, xs, w, g, &mut s, b, dxs);
                i += b;
            }
            if let Some(dw) = dw.as_mut() {
                s.add_weight_grad(g, dw);
            }
            return dw;
        }
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
        dw
    }

    pub fn backward(grad: &[f32], x: Option<&[f32]>, w: Option<&[f32]>, g: &Geometry) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        if let Some(d) = as_depthwise(g) {
            return (w.map(|w| depthwise::grad_input(grad, w, &d)), x.map(|x| depthwise::grad_weight(grad, x, &d)));
        }
        let threads = split(g.n, 2 * g.o * g.k() * g.pixels());
        // Each range's share of dW, added in range order after.
        let parts = std::sync::Mutex::new(Vec::new());
        let dx = match w {
            Some(_) => {
                let chw = g.c * g.h * g.w;
                Some(zeroed_by_image_chunks(g.n * chw, g.n, threads, |first, chunk| {
                    let part = backward_range(grad, x, w, g, first, chunk.len() / chw.max(1), Some(chunk));
                    parts.lock().unwrap_or_else(|e| e.into_inner()).push((first, part));
                }))
            }
            None => {
                for_image_ranges(g.n, threads, |first, count| {
                    let part = backward_range(grad, x, w, g, first, count, None);
                    parts.lock().unwrap_or_else(|e| e.into_inner()).push((first, part));
                });
                None
            }
        };
        let mut parts = parts.into_inner().unwrap_or_else(|e| e.into_inner());
        parts.sort_by_key(|&(first, _)| first);
        let mut dw: Option<Vec<f32>> = None;
        for p in parts.into_iter().filter_map(|(_, p)| p) {
            match dw.as_mut() {
                Some(d) => d.iter_mut().zip(p).for_each(|(d, v)| *d += v),
                None => dw = Some(p),
            }
        }
        (dx, dw)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn strided_copy_reads_a_permuted_view_in_row_major_order() {
        // [2, 3, 4] row-major, viewed as its permutation [4, 2, 3] (strides 1, 12, 4).
        let mem: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let got = super::strided_copy(&mem, &[4, 2, 3], &[1, 12, 4]);
        let want: Vec<f32> = (0..4).flat_map(|c| (0..2).flat_map(move |a| (0..3).map(move |b| (a * 12 + b * 4 + c) as f32))).collect();
        assert_eq!(got, want);
        assert_eq!(super::strided_copy(&mem, &[2, 1, 3], &[12, 99, 4]), vec![0.0, 4.0, 8.0, 12.0, 16.0, 20.0]);
        assert!(super::strided_copy(&mem, &[2, 0, 3], &[12, 4, 1]).is_empty());
    }

    use burn::tensor::module::max_pool2d;
    use burn::tensor::{Distribution, Tensor};

    use crate::CpuAutodiff;

    /// The 2×2 pool with its own backward against burn's `max_pool2d` and its gradient, on odd
    /// sizes (trailing row and column dropped).
    #[test]
    fn max_pool_forward_and_gradient_match_burn() {
        let device = Default::default();
        for dims in [[2, 3, 6, 8], [3, 2, 7, 5]] {
            let x0 = Tensor::<CpuAutodiff, 4>::random(dims, Distribution::Uniform(-2.0, 2.0), &device);
            let [n, c, h, w] = dims;
            let r = Tensor::<CpuAutodiff, 4>::random([n, c, h / 2, w / 2], Distribution::Default, &device);
            let run = |ours: bool| {
                let x = x0.clone().require_grad();
                let y = if ours { super::max_pool2x2(x.clone()) } else { max_pool2d(x.clone(), [2, 2], [2, 2], [0, 0], [1, 1], false) };
                let grads = (y.clone() * r.clone()).sum().backward();
                let gx: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
                let y: Vec<f32> = y.into_data().to_vec().unwrap();
                (y, gx)
            };
            let (ours, theirs) = (run(true), run(false));
            assert_eq!(ours.0, theirs.0, "forward {dims:?}");
            assert_eq!(ours.1, theirs.1, "gradient {dims:?}");
            assert!(ours.1.iter().filter(|&&v| v != 0.0).count() == n * c * (h / 2) * (w / 2));
        }
    }

    #[test]
    fn max_pool_ties_go_to_the_first_maximum() {
        let (y, idx) = super::cpu::max_pool2x2_with_indices(&[1.0, 3.0, 3.0, 0.0], [1, 1, 2, 2]);
        assert_eq!((y, idx), (vec![3.0], vec![1]));
        let dx = super::cpu::max_pool2x2_backward(&[2.0], &[1], [1, 1, 2, 2]);
        assert_eq!(dx, vec![0.0, 2.0, 0.0, 0.0]);
    }
}
