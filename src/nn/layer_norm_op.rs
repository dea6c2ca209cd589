//! LayerNorm over the last dimension as one backend op with an analytic backward.
//!
//! Composed from burn's ops, a LayerNorm is a variance-mean reduction, a subtraction, a square
//! root, a division and two broadcast affine ops, each a pass over the activation with its own
//! allocation, and autodiff records every one of them. DeiT and GFNet run two per block and one
//! at the end. [`LayerNormBackend::layer_norm_last_dim`] reads each row for its statistics and once more
//! to write it; the backward recomputes the row statistics and is two passes as well.
//!
//! The defaults compose burn's ops; NdArray has the CPU kernel; `Autodiff<B>` records one node
//! whose backward calls the inner backend's [`LayerNormBackend::layer_norm_last_dim_backward`].

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};

use super::conv::host_f32;

/// What the backward needs besides the output gradient.
#[derive(Debug, Clone)]
pub struct LayerNormSaved<B: Backend> {
    pub x: FloatTensor<B>,
    pub weight: FloatTensor<B>,
    pub eps: f64,
}

pub trait LayerNormBackend: Backend {
    /// `(x − μ)/√(σ² + ε)·weight + bias` over the last dimension of `x` (any rank), `σ²` biased,
    /// as `nn.LayerNorm`.
    fn layer_norm_last_dim(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let (shape, rows, d) = rows_of::<Self>(&x);
        let x = float::<Self, 2>(Self::float_reshape(x, Shape::new([rows, d])));
        let y = layer_norm_composed(x, float(weight), float(bias), eps);
        Self::float_reshape(y.into_primitive().tensor(), shape)
    }

    /// `(dx, dweight, dbias)` of [`layer_norm_last_dim`](Self::layer_norm_last_dim).
    fn layer_norm_last_dim_backward(grad: FloatTensor<Self>, saved: LayerNormSaved<Self>) -> [FloatTensor<Self>; 3] {
        layer_norm_backward_composed::<Self>(grad, saved)
    }

    /// LayerNorm over the channels of `[N, C, H, W]` at every pixel (ConvNeXt's and HorNet's
    /// `LayerNorm(data_format="channels_first")`): the same as permuting to channels-last,
    /// [`layer_norm_last_dim`](Self::layer_norm_last_dim), and permuting back.
    fn layer_norm_channels(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let x = Self::float_permute(x, &[0, 2, 3, 1]);
        Self::float_permute(Self::layer_norm_last_dim(x, weight, bias, eps), &[0, 3, 1, 2])
    }

    /// `(dx, dweight, dbias)` of [`layer_norm_channels`](Self::layer_norm_channels).
    fn layer_norm_channels_backward(grad: FloatTensor<Self>, saved: LayerNormSaved<Self>) -> [FloatTensor<Self>; 3] {
        let last = |t| Self::float_permute(t, &[0, 2, 3, 1]);
        let saved = LayerNormSaved { x: last(saved.x), ..saved };
        let [dx, dw, db] = Self::layer_norm_last_dim_backward(last(grad), saved);
        [Self::float_permute(dx, &[0, 3, 1, 2]), dw, db]
    }
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The shape, the number of rows and the row length (the last dimension).
fn rows_of<B: Backend>(x: &FloatTensor<B>) -> (Shape, usize, usize) {
    let shape = x.shape();
    let d = shape[shape.num_dims() - 1];
    let rows = shape.num_elements().checked_div(d).unwrap_or(0);
    (shape, rows, d)
}

fn layer_norm_composed<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 1>, bias: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    let (var, mean) = x.clone().var_mean_bias(1);
    let x = (x - mean).div((var + eps).sqrt());
    x * weight.unsqueeze::<2>() + bias.unsqueeze::<2>()
}

fn layer_norm_backward_composed<B: Backend>(grad: FloatTensor<B>, s: LayerNormSaved<B>) -> [FloatTensor<B>; 3] {
    let (shape, rows, d) = rows_of::<B>(&s.x);
    let x = float::<B, 2>(B::float_reshape(s.x, Shape::new([rows, d])));
    let g = float::<B, 2>(B::float_reshape(grad, Shape::new([rows, d])));
    let (var, mean) = x.clone().var_mean_bias(1);
    let rstd = (var + s.eps).sqrt().recip();
    let xhat = (x - mean) * rstd.clone();
    let dbias = g.clone().sum_dim(0).reshape([d]);
    let dweight = (g.clone() * xhat.clone()).sum_dim(0).reshape([d]);
    let gw = g * float::<B, 1>(s.weight).unsqueeze::<2>();
    let c1 = gw.clone().mean_dim(1);
    let c2 = (gw.clone() * xhat.clone()).mean_dim(1);
    let dx = (gw - c1 - xhat * c2) * rstd;
    [B::float_reshape(dx.into_primitive().tensor(), shape), dweight.into_primitive().tensor(), dbias.into_primitive().tensor()]
}

/// See [`LayerNormBackend::layer_norm_last_dim`].
pub fn layer_norm<B: LayerNormBackend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 1>, bias: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    float(B::layer_norm_last_dim(x.into_primitive().tensor(), weight.into_primitive().tensor(), bias.into_primitive().tensor(), eps))
}

/// See [`LayerNormBackend::layer_norm_channels`].
pub fn layer_norm_channels<B: LayerNormBackend>(x: Tensor<B, 4>, weight: Tensor<B, 1>, bias: Tensor<B, 1>, eps: f64) -> Tensor<B, 4> {
    float(B::layer_norm_channels(x.into_primitive().tensor(), weight.into_primitive().tensor(), bias.into_primitive().tensor(), eps))
}

// ---------------------------------------------------------------------------------------------
// Autodiff
// ---------------------------------------------------------------------------------------------


/// Which dimension a LayerNorm node normalised.
#[derive(Debug, Clone, Copy)]
enum Normalised {
    LastDim,
    Channels,
}

#[derive(Debug)]
struct LayerNormBackward(Normalised);

impl<B: LayerNormBackend> Backward<B, 3> for LayerNormBackward {
    type State = LayerNormSaved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [dx, dw, db] = match self.0 {
            Normalised::LastDim => B::layer_norm_last_dim_backward(grad, ops.state),
            Normalised::Channels => B::layer_norm_channels_backward(grad, ops.state),
        };
        for (node, g) in ops.parents.into_iter().zip([dx, dw, db]) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

impl<B: LayerNormBackend, C: CheckpointStrategy> LayerNormBackend for Autodiff<B, C> {
    fn layer_norm_last_dim(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let nodes = [x.node.clone(), weight.node.clone(), bias.node.clone()];
        let (xp, wp) = (x.primitive, weight.primitive);
        let y = B::layer_norm_last_dim(xp.clone(), wp.clone(), bias.primitive, eps);
        // Compute-bound: the saved tensors are held, never recomputed.
        match LayerNormBackward(Normalised::LastDim).prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(LayerNormSaved { x: xp, weight: wp, eps }, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn layer_norm_channels(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let nodes = [x.node.clone(), weight.node.clone(), bias.node.clone()];
        let (xp, wp) = (x.primitive, weight.primitive);
        let y = B::layer_norm_channels(xp.clone(), wp.clone(), bias.primitive, eps);
        match LayerNormBackward(Normalised::Channels).prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(LayerNormSaved { x: xp, weight: wp, eps }, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

#[cfg(feature = "cuda")]
impl LayerNormBackend for crate::device::Cuda {}

// ---------------------------------------------------------------------------------------------
// NdArray: the CPU kernel
// ---------------------------------------------------------------------------------------------

impl LayerNormBackend for NdArray<f32> {
    fn layer_norm_last_dim(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let (shape, _, d) = rows_of::<Self>(&x);
        let (Some(xs), Some(ws), Some(bs)) = (host_f32(&x), host_f32(&weight), host_f32(&bias)) else {
            let (_, rows, d) = rows_of::<Self>(&x);
            let x2 = float::<Self, 2>(Self::float_reshape(x, Shape::new([rows, d])));
            let y = layer_norm_composed(x2, float(weight), float(bias), eps);
            return Self::float_reshape(y.into_primitive().tensor(), shape);
        };
        NdArrayTensor::from_data(TensorData::new(cpu::forward(&xs, d, &ws, &bs, eps), shape))
    }

    fn layer_norm_last_dim_backward(grad: FloatTensor<Self>, saved: LayerNormSaved<Self>) -> [FloatTensor<Self>; 3] {
        let (shape, _, d) = rows_of::<Self>(&saved.x);
        let (Some(g), Some(x), Some(w)) = (host_f32(&grad), host_f32(&saved.x), host_f32(&saved.weight)) else {
            return layer_norm_backward_composed::<Self>(grad, saved);
        };
        let (dx, dw, db) = cpu::backward(&g, &x, d, &w, saved.eps);
        [
            NdArrayTensor::from_data(TensorData::new(dx, shape)),
            NdArrayTensor::from_data(TensorData::new(dw, [d])),
            NdArrayTensor::from_data(TensorData::new(db, [d])),
        ]
    }

    fn layer_norm_channels(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let shape = x.shape();
        let (Some(xs), Some(ws), Some(bs)) = (host_f32(&x), host_f32(&weight), host_f32(&bias)) else {
            let x = Self::float_permute(x, &[0, 2, 3, 1]);
            return Self::float_permute(Self::layer_norm_last_dim(x, weight, bias, eps), &[0, 3, 1, 2]);
        };
        let (c, pixels) = (shape[1], shape.num_elements().checked_div(shape[0] * shape[1]).unwrap_or(0));
        NdArrayTensor::from_data(TensorData::new(channels::forward(&xs, c, pixels, &ws, &bs, eps), shape))
    }

    fn layer_norm_channels_backward(grad: FloatTensor<Self>, saved: LayerNormSaved<Self>) -> [FloatTensor<Self>; 3] {
        let shape = saved.x.shape();
        let (Some(g), Some(x), Some(w)) = (host_f32(&grad), host_f32(&saved.x), host_f32(&saved.weight)) else {
            let last = |t| Self::float_permute(t, &[0, 2, 3, 1]);
            let saved = LayerNormSaved { x: last(saved.x), ..saved };
            let [dx, dw, db] = layer_norm_backward_composed::<Self>(last(grad), saved);
            return [Self::float_permute(dx, &[0, 3, 1, 2]), dw, db];
        };
        let (c, pixels) = (shape[1], shape.num_elements().checked_div(shape[0] * shape[1]).unwrap_or(0));
        let (dx, dw, db) = channels::backward(&g, &x, c, pixels, &w, saved.eps);
        [
            NdArrayTensor::from_data(TensorData::new(dx, shape)),
            NdArrayTensor::from_data(TensorData::new(dw, [c])),
            NdArrayTensor::from_data(TensorData::new(db, [c])),
        ]
    }
}

mod channels {
    //! Channels-first: image by image, the per-pixel statistics are running sums over the `C`
    //! channel planes, each a contiguous row of `H·W` values, so every loop is over pixels and
    //! vectorises. Images are split over threads.

    use crate::nn::conv::{elementwise_threads, zeroed_by_image_chunks};

    /// Per-pixel mean and `1/√(var + eps)` of one image `[c, p]` (two passes, biased variance).
    fn stats(x: &[f32], c: usize, p: usize, eps: f64, mean: &mut [f32], rstd: &mut [f32]) {
        mean.fill(0.0);
        for plane in x.chunks_exact(p).take(c) {
            mean.iter_mut().zip(plane).for_each(|(m, &v)| *m += v);
        }
        let inv_c = 1.0 / c as f32;
        mean.iter_mut().for_each(|m| *m *= inv_c);
        rstd.fill(0.0);
        for plane in x.chunks_exact(p).take(c) {
            rstd.iter_mut().zip(plane).zip(mean.iter()).for_each(|((s, &v), &m)| *s += (v - m) * (v - m));
        }
        let eps = eps as f32;
        rstd.iter_mut().for_each(|s| *s = 1.0 / (*s * inv_c + eps).sqrt());
    }

    pub fn forward(x: &[f32], c: usize, p: usize, weight: &[f32], bias: &[f32], eps: f64) -> Vec<f32> {
        let slab = c * p;
        let n = x.len().checked_div(slab).unwrap_or(0);
        if n == 0 {
            return vec![0.0f32; x.len()];
        }
        zeroed_by_image_chunks(x.len(), n, elementwise_threads(x.len()), |first, out| {
            let (mut mean, mut rstd) = (vec![0.0f32; p], vec![0.0f32; p]);
            for (i, yi) in out.chunks_exact_mut(slab).enumerate() {
                let xi = &x[(first + i) * slab..][..slab];
                stats(xi, c, p, eps, &mut mean, &mut rstd);
                for (ch, (yp, xp)) in yi.chunks_exact_mut(p).zip(xi.chunks_exact(p)).enumerate() {
                    let (w, b) = (weight[ch], bias[ch]);
                    for (((o, &v), &m), &r) in yp.iter_mut().zip(xp).zip(&mean).zip(&rstd) {
                        *o = (v - m) * r * w + b;
                    }
                }
            }
        })
    }

    /// `(dx, dweight, dbias)`.
    pub fn backward(grad: &[f32], x: &[f32], c: usize, p: usize, weight: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let slab = c * p;
        let n = x.len().checked_div(slab).unwrap_or(0);
        let (mut dw, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
        if n == 0 {
            return (vec![0.0f32; x.len()], vec![0.0; c], vec![0.0; c]);
        }
        // Each thread's per-channel sums for dweight and dbias, added in image order after.
        let partials = std::sync::Mutex::new(Vec::new());
        let dx = zeroed_by_image_chunks(x.len(), n, elementwise_threads(x.len()), |first, out| {
            let (mut mean, mut rstd) = (vec![0.0f32; p], vec![0.0f32; p]);
            let (mut c1, mut c2) = (vec![0.0f32; p], vec![0.0f32; p]);
            let (mut pw, mut pb) = (vec![0.0f64; c], vec![0.0f64; c]);
            let inv_c = 1.0 / c as f32;
            for (i, dxi) in out.chunks_exact_mut(slab).enumerate() {
                let at = (first + i) * slab;
                let (xi, gi) = (&x[at..][..slab], &grad[at..][..slab]);
                stats(xi, c, p, eps, &mut mean, &mut rstd);
                c1.fill(0.0);
                c2.fill(0.0);
                for (ch, (xp, gp)) in xi.chunks_exact(p).zip(gi.chunks_exact(p)).enumerate() {
                    let w = weight[ch];
                    let (mut sw, mut sb) = (0.0f32, 0.0f32);
                    for ((((a1, a2), &v), &g), (&m, &r)) in c1.iter_mut().zip(c2.iter_mut()).zip(xp).zip(gp).zip(mean.iter().zip(&rstd)) {
                        let xhat = (v - m) * r;
                        *a1 += g * w;
                        *a2 += g * w * xhat;
                        sw += g * xhat;
                        sb += g;
                    }
                    pw[ch] += sw as f64;
                    pb[ch] += sb as f64;
                }
                for (ch, (dp, (xp, gp))) in dxi.chunks_exact_mut(p).zip(xi.chunks_exact(p).zip(gi.chunks_exact(p))).enumerate() {
                    let w = weight[ch];
                    for (((o, &v), &g), ((&m, &r), (&a1, &a2))) in dp.iter_mut().zip(xp).zip(gp).zip(mean.iter().zip(&rstd).zip(c1.iter().zip(&c2))) {
                        let xhat = (v - m) * r;
                        *o = r * (g * w - a1 * inv_c - xhat * a2 * inv_c);
                    }
                }
            }
            partials.lock().unwrap_or_else(|e| e.into_inner()).push((first, pw, pb));
        });
        let mut partials = partials.into_inner().unwrap_or_else(|e| e.into_inner());
        partials.sort_by_key(|(first, _, _)| *first);
        for (_, pw, pb) in partials {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        (dx, dw.into_iter().map(|v| v as f32).collect(), db.into_iter().map(|v| v as f32).collect())
    }
}

mod cpu {
    //! Row by row, each row in cache for both of its passes; rows split over threads.

    use crate::nn::conv::{elementwise_threads, for_image_chunks};

    /// `Σ f(v)` in f64 over eight running lanes: a single accumulator would fix the order of
    /// the additions and keep the loop scalar.
    #[inline(always)]
    fn sum64(row: &[f32], f: impl Fn(f32) -> f64) -> f64 {
        let mut acc = [0.0f64; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f(v);
            }
        }
        let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
        acc.iter().sum::<f64>() + tail
    }

    /// `(mean, 1/√(var + eps))` of a row, two passes in f64 (rows are a few hundred values).
    #[inline(always)]
    fn stats(row: &[f32], eps: f64) -> (f32, f32) {
        let d = row.len().max(1) as f64;
        let mean = sum64(row, |v| v as f64) / d;
        let m32 = mean as f32;
        let var = sum64(row, |v| ((v - m32) as f64).powi(2)) / d;
        (m32, (1.0 / (var + eps).sqrt()) as f32)
    }

    /// Runs `f(first_row, rows_out)` over contiguous row ranges of `out` on up to
    /// [`elementwise_threads`] threads, results in order.
    fn for_rows<R: Send>(out: &mut [f32], d: usize, f: impl Fn(usize, &mut [f32]) -> R + Sync) -> Vec<R> {
        let rows = out.len().checked_div(d).unwrap_or(0);
        for_image_chunks(out, rows, elementwise_threads(out.len()), f)
    }

    pub fn forward(x: &[f32], d: usize, weight: &[f32], bias: &[f32], eps: f64) -> Vec<f32> {
        let mut y = vec![0.0f32; x.len()];
        if d == 0 {
            return y;
        }
        for_rows(&mut y, d, |first, out| {
            for (r, yr) in out.chunks_exact_mut(d).enumerate() {
                let xr = &x[(first + r) * d..][..d];
                let (mean, rstd) = stats(xr, eps);
                for (((o, &v), &w), &b) in yr.iter_mut().zip(xr).zip(weight).zip(bias) {
                    *o = (v - mean) * rstd * w + b;
                }
            }
        });
        y
    }

    /// `(dx, dweight, dbias)`.
    pub fn backward(grad: &[f32], x: &[f32], d: usize, weight: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut dx = vec![0.0f32; x.len()];
        if d == 0 {
            return (dx, Vec::new(), Vec::new());
        }
        // Each thread sums its rows' dweight and dbias in f64; the partial sums are added after.
        let parts = for_rows(&mut dx, d, |first, out| {
            let (mut dw, mut db) = (vec![0.0f64; d], vec![0.0f64; d]);
            let mut gw = vec![0.0f32; d];
            for (r, dxr) in out.chunks_exact_mut(d).enumerate() {
                let at = (first + r) * d;
                let (xr, gr) = (&x[at..][..d], &grad[at..][..d]);
                let (mean, rstd) = stats(xr, eps);
                let (mut c1, mut c2) = (0.0f64, 0.0f64);
                for ((((g, &gv), &xv), &w), (dwj, dbj)) in gw.iter_mut().zip(gr).zip(xr).zip(weight).zip(dw.iter_mut().zip(db.iter_mut())) {
                    let xhat = (xv - mean) * rstd;
                    *g = gv * w;
                    c1 += *g as f64;
                    c2 += (*g * xhat) as f64;
                    *dwj += (gv * xhat) as f64;
                    *dbj += gv as f64;
                }
                let (c1, c2) = ((c1 / d as f64) as f32, (c2 / d as f64) as f32);
                for ((o, &g), &xv) in dxr.iter_mut().zip(&gw).zip(xr) {
                    *o = rstd * (g - c1 - (xv - mean) * rstd * c2);
                }
            }
            (dw, db)
        });
        let mut dw = vec![0.0f64; d];
        let mut db = vec![0.0f64; d];
        for (pw, pb) in parts {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        (dx, dw.into_iter().map(|v| v as f32).collect(), db.into_iter().map(|v| v as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cpu, CpuAutodiff};
    use burn::tensor::Distribution;

    fn host<const D: usize>(t: Tensor<CpuAutodiff, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// The op and burn's composed ops agree on the output and all three gradients, on 3-D
    /// inputs with rows long enough for two threads and with a short odd row length.
    #[test]
    fn fused_layer_norm_matches_composed_ops() {
        let device = Default::default();
        for dims in [[2, 5, 7], [4, 197, 384]] {
            let d = dims[2];
            let x0 = Tensor::<CpuAutodiff, 3>::random(dims, Distribution::Normal(0.3, 1.5), &device);
            let w0 = Tensor::<CpuAutodiff, 1>::random([d], Distribution::Uniform(0.5, 1.5), &device);
            let b0 = Tensor::<CpuAutodiff, 1>::random([d], Distribution::Uniform(-0.5, 0.5), &device);
            let r = Tensor::<CpuAutodiff, 3>::random(dims, Distribution::Default, &device);
            let run = |fused: bool| {
                let (x, w, b) = (x0.clone().require_grad(), w0.clone().require_grad(), b0.clone().require_grad());
                let y = if fused {
                    layer_norm(x.clone(), w.clone(), b.clone(), 1e-6)
                } else {
                    let x2 = x.clone().reshape([dims[0] * dims[1], d]);
                    layer_norm_composed(x2, w.clone(), b.clone(), 1e-6).reshape(dims)
                };
                let grads = (y.clone() * r.clone()).sum().backward();
                let g1 = |t: &Tensor<CpuAutodiff, 1>| t.grad(&grads).unwrap().into_data().convert::<f32>().to_vec::<f32>().unwrap();
                let gx = x.grad(&grads).unwrap().into_data().convert::<f32>().to_vec::<f32>().unwrap();
                (host(y), gx, g1(&w), g1(&b))
            };
            let (a, b) = (run(true), run(false));
            assert!(max_rel(&a.0, &b.0) < 1e-5, "output {dims:?}");
            assert!(max_rel(&a.1, &b.1) < 1e-4, "dx {dims:?}");
            assert!(max_rel(&a.2, &b.2) < 1e-4, "dweight {dims:?}");
            assert!(max_rel(&a.3, &b.3) < 1e-4, "dbias {dims:?}");
        }
    }

    /// The channels-first op against burn's composed LayerNorm on the permuted tensor: output
    /// and all three gradients, on sizes that run on one thread and on several.
    #[test]
    fn channels_first_layer_norm_matches_permuted_composed_ops() {
        let device = Default::default();
        for dims in [[2, 5, 3, 4], [8, 96, 28, 28]] {
            let c = dims[1];
            let x0 = Tensor::<CpuAutodiff, 4>::random(dims, Distribution::Normal(0.3, 1.5), &device);
            let w0 = Tensor::<CpuAutodiff, 1>::random([c], Distribution::Uniform(0.5, 1.5), &device);
            let b0 = Tensor::<CpuAutodiff, 1>::random([c], Distribution::Uniform(-0.5, 0.5), &device);
            let r = Tensor::<CpuAutodiff, 4>::random(dims, Distribution::Default, &device);
            let run = |fused: bool| {
                let (x, w, b) = (x0.clone().require_grad(), w0.clone().require_grad(), b0.clone().require_grad());
                let y = if fused {
                    layer_norm_channels(x.clone(), w.clone(), b.clone(), 1e-6)
                } else {
                    let xl = x.clone().permute([0, 2, 3, 1]);
                    let rows = dims[0] * dims[2] * dims[3];
                    layer_norm_composed(xl.reshape([rows, c]), w.clone(), b.clone(), 1e-6)
                        .reshape([dims[0], dims[2], dims[3], c])
                        .permute([0, 3, 1, 2])
                };
                let grads = (y.clone() * r.clone()).sum().backward();
                let g1 = |t: &Tensor<CpuAutodiff, 1>| t.grad(&grads).unwrap().into_data().convert::<f32>().to_vec::<f32>().unwrap();
                let gx = x.grad(&grads).unwrap().into_data().convert::<f32>().to_vec::<f32>().unwrap();
                (host(y), gx, g1(&w), g1(&b))
            };
            let (a, b) = (run(true), run(false));
            assert!(max_rel(&a.0, &b.0) < 1e-5, "output {dims:?}");
            assert!(max_rel(&a.1, &b.1) < 1e-4, "dx {dims:?}");
            assert!(max_rel(&a.2, &b.2) < 1e-4, "dweight {dims:?}");
            assert!(max_rel(&a.3, &b.3) < 1e-4, "dbias {dims:?}");
        }
    }

    /// The analytic backward against f64 central differences of `Σ r·layer_norm(x)`.
    #[test]
    fn fused_layer_norm_gradient_matches_finite_differences() {
        let (rows, d) = (3, 5);
        let device = Default::default();
        let x = Tensor::<Cpu, 2>::random([rows, d], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Cpu, 1>::random([d], Distribution::Uniform(0.5, 1.5), &device);
        let r: Vec<f64> = Tensor::<Cpu, 2>::random([rows, d], Distribution::Default, &device).into_data().convert::<f64>().to_vec().unwrap();
        let xs: Vec<f64> = x.clone().into_data().convert::<f64>().to_vec().unwrap();
        let ws: Vec<f64> = w.clone().into_data().convert::<f64>().to_vec().unwrap();
        let loss = |xs: &[f64], ws: &[f64]| {
            let mut total = 0.0;
            for row in 0..rows {
                let v = &xs[row * d..][..d];
                let mu = v.iter().sum::<f64>() / d as f64;
                let var = v.iter().map(|a| (a - mu).powi(2)).sum::<f64>() / d as f64;
                for j in 0..d {
                    total += r[row * d + j] * ((v[j] - mu) / (var + 1e-6).sqrt() * ws[j] + 0.1);
                }
            }
            total
        };
        let xa = Tensor::<CpuAutodiff, 2>::from_inner(x).require_grad();
        let wa = Tensor::<CpuAutodiff, 1>::from_inner(w).require_grad();
        let ba = Tensor::<CpuAutodiff, 1>::full([d], 0.1, &device).require_grad();
        let rt = Tensor::<CpuAutodiff, 2>::from_data(TensorData::new(r.iter().map(|&v| v as f32).collect::<Vec<_>>(), [rows, d]), &device);
        let grads = (layer_norm(xa.clone(), wa.clone(), ba.clone(), 1e-6) * rt).sum().backward();
        let gx: Vec<f32> = xa.grad(&grads).unwrap().into_data().convert::<f32>().to_vec().unwrap();
        let gw: Vec<f32> = wa.grad(&grads).unwrap().into_data().convert::<f32>().to_vec().unwrap();
        let gb: Vec<f32> = ba.grad(&grads).unwrap().into_data().convert::<f32>().to_vec().unwrap();
        let h = 1e-6;
        for k in 0..xs.len() {
            let (mut p, mut m) = (xs.clone(), xs.clone());
            p[k] += h;
            m[k] -= h;
            let num = (loss(&p, &ws) - loss(&m, &ws)) / (2.0 * h);
            assert!((num - gx[k] as f64).abs() < 1e-3 * (1.0 + num.abs()), "dx[{k}]: {num} vs {}", gx[k]);
        }
        for j in 0..d {
            let (mut p, mut m) = (ws.clone(), ws.clone());
            p[j] += h;
            m[j] -= h;
            let num = (loss(&xs, &p) - loss(&xs, &m)) / (2.0 * h);
            assert!((num - gw[j] as f64).abs() < 1e-3 * (1.0 + num.abs()), "dweight[{j}]: {num} vs {}", gw[j]);
            let db: f64 = (0..rows).map(|row| r[row * d + j]).sum();
            assert!((db - gb[j] as f64).abs() < 1e-4 * (1.0 + db.abs()), "dbias[{j}]");
        }
    }
}
