//! TEMPORARY stand-in for `crate::nn::global_filter` (branch wip-fft) until it is merged:
//! the same API on the generic DFT-by-matmul semantics. Delete on merge.
#![allow(dead_code)]

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};

pub trait SpectralBackend: Backend {}
impl<B: Backend> SpectralBackend for B {}

fn mat<B: Backend>(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f64, d: &B::Device) -> Tensor<B, 2> {
    let v: Vec<f32> = (0..rows * cols).map(|i| f(i / cols, i % cols) as f32).collect();
    Tensor::from_data(TensorData::new(v, [rows, cols]), d)
}

/// planes `[M, H, W]`, weight `[M', H, K, 2]` broadcast over M = N·M'.
fn filter_planes<B: Backend>(x: Tensor<B, 4>, w: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, wd] = x.dims();
    let k = wd / 2 + 1;
    let d = x.device();
    let tau = std::f64::consts::TAU;
    let cw = mat::<B>(wd, k, |a, b| (tau * (a * b) as f64 / wd as f64).cos(), &d).unsqueeze::<4>();
    let sw = mat::<B>(wd, k, |a, b| -(tau * (a * b) as f64 / wd as f64).sin(), &d).unsqueeze::<4>();
    let ch = mat::<B>(h, h, |a, b| (tau * (a * b) as f64 / h as f64).cos(), &d).unsqueeze::<4>();
    let sh = mat::<B>(h, h, |a, b| -(tau * (a * b) as f64 / h as f64).sin(), &d).unsqueeze::<4>();
    let coef = |kk: usize| if kk == 0 || (wd % 2 == 0 && kk == wd / 2) { 1.0 } else { 2.0 };
    let acw = mat::<B>(k, wd, |a, b| coef(a) * (tau * (a * b) as f64 / wd as f64).cos(), &d).unsqueeze::<4>();
    let asw = mat::<B>(k, wd, |a, b| -coef(a) * (tau * (a * b) as f64 / wd as f64).sin(), &d).unsqueeze::<4>();
    let scale = 1.0 / ((h * wd) as f64).sqrt();
    let xr = x.clone().matmul(cw);
    let xi = x.matmul(sw);
    let yr = (ch.clone().matmul(xr.clone()) - sh.clone().matmul(xi.clone())).mul_scalar(scale);
    let yi = (ch.clone().matmul(xi) + sh.clone().matmul(xr)).mul_scalar(scale);
    let wr = w.clone().narrow(3, 0, 1).reshape([1, c, h, k]);
    let wi = w.narrow(3, 1, 1).reshape([1, c, h, k]);
    let zr = yr.clone() * wr.clone() - yi.clone() * wi.clone();
    let zi = yr * wi + yi * wr;
    let ur = ch.clone().matmul(zr.clone()) + sh.clone().matmul(zi.clone());
    let ui = ch.matmul(zi) - sh.matmul(zr);
    let _ = n;
    (ur.matmul(acw) + ui.matmul(asw)).mul_scalar(scale)
}

pub fn global_filter<B: SpectralBackend>(x: Tensor<B, 4>, weight: Tensor<B, 4>) -> Tensor<B, 4> {
    let w = weight.permute([2, 0, 1, 3]);
    filter_planes(x.permute([0, 3, 1, 2]), w).permute([0, 2, 3, 1])
}

pub fn global_filter_nchw<B: SpectralBackend>(x: Tensor<B, 4>, weight: Tensor<B, 4>) -> Tensor<B, 4> {
    filter_planes(x, weight)
}

fn interp<B: Backend>(n_in: usize, n_out: usize, d: &B::Device) -> Tensor<B, 2> {
    let s = if n_out > 1 { (n_in as f64 - 1.0) / (n_out as f64 - 1.0) } else { 0.0 };
    mat::<B>(n_out, n_in, |i, j| {
        let src = s * i as f64;
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let f = src - i0 as f64;
        (if j == i0 { 1.0 - f } else { 0.0 }) + (if j == i1 { f } else { 0.0 })
    }, d)
}

pub fn resize_complex_weight_nchw<B: Backend>(w: Tensor<B, 4>, h2: usize, w2: usize) -> Tensor<B, 4> {
    let [c, h, wd, _] = w.dims();
    if (h, wd) == (h2, w2) {
        return w;
    }
    let d = w.device();
    let t = interp::<B>(h, h2, &d).unsqueeze::<3>().matmul(w.reshape([c, h, wd * 2]));
    let t = interp::<B>(wd, w2, &d).unsqueeze::<3>().matmul(t.reshape([c * h2, wd, 2]));
    t.reshape([c, h2, w2, 2])
}

#[derive(Module, Debug)]
pub struct GlobalFilter<B: Backend> {
    pub complex_weight: Param<Tensor<B, 4>>,
}

impl<B: Backend> GlobalFilter<B> {
    pub fn new(dim: usize, h: usize, w: usize, device: &B::Device) -> Self {
        Self { complex_weight: Param::from_tensor(Tensor::random([h, w, dim, 2], Distribution::Normal(0.0, 0.02), device)) }
    }
}

impl<B: SpectralBackend> GlobalFilter<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        global_filter(x, self.complex_weight.val())
    }
}
