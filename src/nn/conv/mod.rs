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

use burn::backend::ndarray::NdArrayTensor;
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

mod autodiff;
mod cpu;
mod ndarray;

// ---------------------------------------------------------------------------------------------
// CUDA: burn's own conv kernels (forward and both backward ops stay on the device)
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "cuda")]
impl ConvBackend for crate::device::Cuda {}

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
