//! Global filter: FFT path, DFT-by-matmul path and custom backward against an f64 reference
//! written here (naive DFTs following `torch.fft.rfft2` / `irfft2(s=(H, W))` step by step),
//! gradients against central finite differences of that reference.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{DType, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rlprune::nn::global_filter::{
    FilterLayout, GlobalFilter, global_filter, global_filter_dft, global_filter_grads_dft,
    global_filter_nchw, global_filter_nchw_dft, resize_complex_weight, resize_complex_weight_nchw,
};
use rustfft::num_complex::Complex64;
use std::f64::consts::PI;

type B = NdArray<f32>;
type B64 = NdArray<f64>;
type AD = Autodiff<NdArray<f32>>;

const GRIDS: [(usize, usize); 6] = [(4, 6), (5, 7), (7, 4), (8, 5), (3, 3), (1, 2)];

// ------------------------------------------------------------------------------------------
// f64 reference
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    layout: FilterLayout,
}

impl Dims {
    fn wf(&self) -> usize {
        self.w / 2 + 1
    }
    fn x_shape(&self) -> [usize; 4] {
        match self.layout {
            FilterLayout::Nhwc => [self.n, self.h, self.w, self.c],
            FilterLayout::Nchw => [self.n, self.c, self.h, self.w],
        }
    }
    fn w_shape(&self) -> [usize; 4] {
        self.layout.weight_shape(self.c, self.h, self.w)
    }
    fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    fn w_len(&self) -> usize {
        self.c * self.h * self.wf() * 2
    }
    fn xi(&self, n: usize, c: usize, h: usize, w: usize) -> usize {
        match self.layout {
            FilterLayout::Nhwc => ((n * self.h + h) * self.w + w) * self.c + c,
            FilterLayout::Nchw => ((n * self.c + c) * self.h + h) * self.w + w,
        }
    }
    /// Index of the real part; the imaginary part follows.
    fn wi(&self, k: usize, l: usize, c: usize) -> usize {
        2 * match self.layout {
            FilterLayout::Nhwc => (k * self.wf() + l) * self.c + c,
            FilterLayout::Nchw => (c * self.h + k) * self.wf() + l,
        }
    }
}

/// `exp(i * 2 pi * num / den)` with the index product reduced first.
fn cis(num: usize, den: usize, sign: f64) -> Complex64 {
    let a = 2.0 * PI * (num % den) as f64 / den as f64;
    Complex64::new(a.cos(), sign * a.sin())
}

/// `irfft2(rfft2(x, norm='ortho') * w, s=(H, W), norm='ortho')` by naive DFTs, step by step as
/// torch does it: full complex inverse DFT over H, then a complex-to-real inverse over W on the
/// Hermitian extension of the half spectrum (imaginary parts of the DC and, for even W, the
/// Nyquist bin dropped).
fn reference(x: &[f64], wt: &[f64], d: Dims) -> Vec<f64> {
    let (h, w, wf) = (d.h, d.w, d.wf());
    let sh = 1.0 / (h as f64).sqrt();
    let sw = 1.0 / (w as f64).sqrt();
    let mut y = vec![0.0; d.x_len()];
    for n in 0..d.n {
        for c in 0..d.c {
            // rfft2
            let mut spec = vec![Complex64::new(0.0, 0.0); h * wf];
            for k in 0..h {
                for l in 0..wf {
                    let mut acc = Complex64::new(0.0, 0.0);
                    for hh in 0..h {
                        for j in 0..w {
                            acc +=
                                x[d.xi(n, c, hh, j)] * cis(k * hh, h, -1.0) * cis(l * j, w, -1.0);
                        }
                    }
                    let i = d.wi(k, l, c);
                    spec[k * wf + l] = acc * sh * sw * Complex64::new(wt[i], wt[i + 1]);
                }
            }
            // ifft over H
            let mut z = vec![Complex64::new(0.0, 0.0); h * wf];
            for hh in 0..h {
                for l in 0..wf {
                    let mut acc = Complex64::new(0.0, 0.0);
                    for k in 0..h {
                        acc += spec[k * wf + l] * cis(k * hh, h, 1.0);
                    }
                    z[hh * wf + l] = acc * sh;
                }
            }
            // c2r over W
            for hh in 0..h {
                let full: Vec<Complex64> = (0..w)
                    .map(|l| {
                        if l < wf {
                            let mut v = z[hh * wf + l];
                            if l == 0 || (w % 2 == 0 && l == w / 2) {
                                v.im = 0.0;
                            }
                            v
                        } else {
                            z[hh * wf + (w - l)].conj()
                        }
                    })
                    .collect();
                for j in 0..w {
                    let mut acc = Complex64::new(0.0, 0.0);
                    for (l, v) in full.iter().enumerate() {
                        acc += v * cis(l * j, w, 1.0);
                    }
                    y[d.xi(n, c, hh, j)] = acc.re * sw;
                }
            }
        }
    }
    y
}

fn loss(x: &[f64], wt: &[f64], r: &[f64], d: Dims) -> f64 {
    reference(x, wt, d).iter().zip(r).map(|(a, b)| a * b).sum()
}

/// Central finite differences of `loss` in f64: `(d/dx, d/dw)`.
fn fd_grads(x: &[f64], wt: &[f64], r: &[f64], d: Dims) -> (Vec<f64>, Vec<f64>) {
    let eps = 1e-4;
    let mut xp = x.to_vec();
    let mut gx = vec![0.0; x.len()];
    for i in 0..x.len() {
        xp[i] = x[i] + eps;
        let lp = loss(&xp, wt, r, d);
        xp[i] = x[i] - eps;
        let lm = loss(&xp, wt, r, d);
        xp[i] = x[i];
        gx[i] = (lp - lm) / (2.0 * eps);
    }
    let mut wp = wt.to_vec();
    let mut gw = vec![0.0; wt.len()];
    for i in 0..wt.len() {
        wp[i] = wt[i] + eps;
        let lp = loss(x, &wp, r, d);
        wp[i] = wt[i] - eps;
        let lm = loss(x, &wp, r, d);
        wp[i] = wt[i];
        gw[i] = (lp - lm) / (2.0 * eps);
    }
    (gx, gw)
}

// ------------------------------------------------------------------------------------------
// helpers
// ------------------------------------------------------------------------------------------

fn rand_vec(len: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn tensor<BK: burn::tensor::backend::Backend>(v: &[f64], shape: [usize; 4]) -> Tensor<BK, 4> {
    let data = TensorData::new(v.iter().map(|&a| a as f32).collect::<Vec<f32>>(), shape);
    Tensor::from_data(data, &Default::default())
}

/// Explicitly f64: burn's device settings (the default float dtype) are shared by `NdArray<f32>`
/// and `NdArray<f64>`, so without the dtype an f64 tensor would be created as f32 after an f32
/// tensor has been made on the same device.
fn tensor64(v: &[f64], shape: [usize; 4]) -> Tensor<B64, 4> {
    let device = Default::default();
    let t = Tensor::from_data(TensorData::new(v.to_vec(), shape), (&device, DType::F64));
    assert_eq!(t.dtype(), DType::F64);
    t
}

fn host<BK: burn::tensor::backend::Backend, const D: usize>(t: Tensor<BK, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec::<f64>().unwrap()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// `max |a - b| / max |b|`.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().map(|v| v.abs()).fold(0.0, f64::max).max(1e-12);
    max_abs_diff(a, b) / scale
}

fn dims(n: usize, c: usize, h: usize, w: usize, layout: FilterLayout) -> Dims {
    Dims { n, c, h, w, layout }
}

fn fft_fwd<BK: rlprune::nn::SpectralBackend>(
    x: Tensor<BK, 4>,
    w: Tensor<BK, 4>,
    l: FilterLayout,
) -> Tensor<BK, 4> {
    match l {
        FilterLayout::Nhwc => global_filter(x, w),
        FilterLayout::Nchw => global_filter_nchw(x, w),
    }
}

fn dft_fwd<BK: burn::tensor::backend::Backend>(
    x: Tensor<BK, 4>,
    w: Tensor<BK, 4>,
    l: FilterLayout,
) -> Tensor<BK, 4> {
    match l {
        FilterLayout::Nhwc => global_filter_dft(x, w),
        FilterLayout::Nchw => global_filter_nchw_dft(x, w),
    }
}

const LAYOUTS: [FilterLayout; 2] = [FilterLayout::Nhwc, FilterLayout::Nchw];

// ------------------------------------------------------------------------------------------
// 1. forward
// ------------------------------------------------------------------------------------------

#[test]
fn forward_matches_naive_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for layout in LAYOUTS {
        for (h, w) in GRIDS.into_iter().chain([(14, 14), (6, 1)]) {
            let d = dims(2, 3, h, w, layout);
            let x = rand_vec(d.x_len(), &mut rng);
            let wt = rand_vec(d.w_len(), &mut rng);
            let want = reference(&x, &wt, d);

            let fft = host(fft_fwd(
                tensor::<B>(&x, d.x_shape()),
                tensor::<B>(&wt, d.w_shape()),
                layout,
            ));
            let dft = host(dft_fwd(
                tensor::<B>(&x, d.x_shape()),
                tensor::<B>(&wt, d.w_shape()),
                layout,
            ));
            let fft64 = host(fft_fwd(
                tensor64(&x, d.x_shape()),
                tensor64(&wt, d.w_shape()),
                layout,
            ));
            let dft64 = host(dft_fwd(
                tensor64(&x, d.x_shape()),
                tensor64(&wt, d.w_shape()),
                layout,
            ));
            let (e_fft, e_dft) = (max_abs_diff(&fft, &want), max_abs_diff(&dft, &want));
            let (e_64, e_d64) = (max_abs_diff(&fft64, &want), max_abs_diff(&dft64, &want));
            println!(
                "{layout:?} {h}x{w}: fft {e_fft:.1e}  dft {e_dft:.1e}  fft(f64) {e_64:.1e}  dft(f64) {e_d64:.1e}"
            );
            assert!(
                e_d64 <= 1e-12,
                "{layout:?} {h}x{w}: f64 DFT path off by {e_d64}"
            );
            assert!(e_fft <= 1e-5, "{layout:?} {h}x{w}: FFT path off by {e_fft}");
            assert!(e_dft <= 1e-5, "{layout:?} {h}x{w}: DFT path off by {e_dft}");
            assert!(
                e_64 <= 1e-12,
                "{layout:?} {h}x{w}: f64 FFT path off by {e_64}"
            );
        }
    }
}

/// The imaginary parts that `irfft2` drops really are dropped: changing the imaginary part of
/// the weight at the DC bin (k = 0, l = 0) or, for even W, at (0, W/2) changes nothing.
#[test]
fn dropped_imaginary_parts_have_no_effect() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let d = dims(1, 2, 4, 6, FilterLayout::Nhwc);
    let x = rand_vec(d.x_len(), &mut rng);
    let wt = rand_vec(d.w_len(), &mut rng);
    let base = host(global_filter(
        tensor::<B>(&x, d.x_shape()),
        tensor::<B>(&wt, d.w_shape()),
    ));
    for l in [0, 3] {
        let mut w2 = wt.clone();
        w2[d.wi(0, l, 1) + 1] += 5.0;
        let y = host(global_filter(
            tensor::<B>(&x, d.x_shape()),
            tensor::<B>(&w2, d.w_shape()),
        ));
        assert!(
            max_abs_diff(&y, &base) < 1e-5,
            "imag at (0, {l}) should be ignored"
        );
    }
    // ... but at (k != 0, 0) it matters.
    let mut w2 = wt.clone();
    w2[d.wi(1, 0, 1) + 1] += 5.0;
    let y = host(global_filter(
        tensor::<B>(&x, d.x_shape()),
        tensor::<B>(&w2, d.w_shape()),
    ));
    assert!(max_abs_diff(&y, &base) > 1e-2);
}

/// Non-contiguous inputs (a permuted view) and a batch large enough to be split over threads.
#[test]
fn strided_input_and_threaded_batch() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let d = dims(4, 64, 16, 16, FilterLayout::Nhwc);
    let x = rand_vec(d.x_len(), &mut rng);
    let wt = rand_vec(d.w_len(), &mut rng);
    let xt = tensor::<B>(&x, d.x_shape());
    let wtt = tensor::<B>(&wt, d.w_shape());
    let fft = global_filter(xt.clone(), wtt.clone());
    let dft = global_filter_dft(xt.clone(), wtt.clone());
    let e = max_abs_diff(&host(fft.clone()), &host(dft));
    assert!(e <= 1e-5, "threaded FFT vs DFT: {e}");
    // The same data seen through a permutation: NCHW view of the NHWC buffer.
    let x_nchw = xt.permute([0, 3, 1, 2]);
    let w_nchw = wtt.permute([2, 0, 1, 3]);
    let y = global_filter_nchw(x_nchw, w_nchw).permute([0, 2, 3, 1]);
    let e = max_abs_diff(&host(y), &host(fft));
    assert!(e <= 1e-5, "strided NCHW vs NHWC: {e}");
}

// ------------------------------------------------------------------------------------------
// 2. gradients
// ------------------------------------------------------------------------------------------

/// Autodiff gradients of `sum(f(x, w) * r)`.
fn ad_grads(
    x: &[f64],
    wt: &[f64],
    r: &[f64],
    d: Dims,
    f: impl Fn(Tensor<AD, 4>, Tensor<AD, 4>) -> Tensor<AD, 4>,
) -> (Vec<f64>, Vec<f64>) {
    let xt = tensor::<AD>(x, d.x_shape()).require_grad();
    let wtt = tensor::<AD>(wt, d.w_shape()).require_grad();
    let rt = tensor::<AD>(r, d.x_shape());
    let grads = (f(xt.clone(), wtt.clone()) * rt).sum().backward();
    (
        host(xt.grad(&grads).unwrap()),
        host(wtt.grad(&grads).unwrap()),
    )
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for layout in LAYOUTS {
        for (h, w) in GRIDS {
            let d = dims(2, 3, h, w, layout);
            let x = rand_vec(d.x_len(), &mut rng);
            let wt = rand_vec(d.w_len(), &mut rng);
            let r = rand_vec(d.x_len(), &mut rng);
            let (fx, fw) = fd_grads(&x, &wt, &r, d);

            let (cx, cw) = ad_grads(&x, &wt, &r, d, |a, b| fft_fwd(a, b, layout));
            let (dx, dw) = ad_grads(&x, &wt, &r, d, |a, b| dft_fwd(a, b, layout));
            // The default (tensor-op) backward that backends without an FFT use, e.g. CUDA.
            let (gx, gw) = global_filter_grads_dft(
                tensor::<B>(&r, d.x_shape()),
                Some(tensor::<B>(&x, d.x_shape())),
                Some(tensor::<B>(&wt, d.w_shape())),
                layout,
            );
            let (gx, gw) = (host(gx.unwrap()), host(gw.unwrap()));

            let errs = [
                ("custom op dx", rel_err(&cx, &fx)),
                ("custom op dw", rel_err(&cw, &fw)),
                ("dft autodiff dx", rel_err(&dx, &fx)),
                ("dft autodiff dw", rel_err(&dw, &fw)),
                ("dft analytic dx", rel_err(&gx, &fx)),
                ("dft analytic dw", rel_err(&gw, &fw)),
            ];
            let line: Vec<String> = errs.iter().map(|(k, e)| format!("{k} {e:.1e}")).collect();
            println!("{layout:?} {h}x{w}: {}", line.join(", "));
            for (what, e) in errs {
                assert!(e <= 1e-3, "{layout:?} {h}x{w}: {what} relative error {e}");
            }
        }
    }
}

/// Only the tracked operand gets a gradient, and each alone is still right.
#[test]
fn gradient_of_one_operand_only() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let d = dims(2, 2, 5, 4, FilterLayout::Nhwc);
    let x = rand_vec(d.x_len(), &mut rng);
    let wt = rand_vec(d.w_len(), &mut rng);
    let r = rand_vec(d.x_len(), &mut rng);
    let (fx, fw) = fd_grads(&x, &wt, &r, d);

    let xt = tensor::<AD>(&x, d.x_shape()).require_grad();
    let wtt = tensor::<AD>(&wt, d.w_shape());
    let grads = (global_filter(xt.clone(), wtt.clone()) * tensor::<AD>(&r, d.x_shape()))
        .sum()
        .backward();
    assert!(wtt.grad(&grads).is_none());
    assert!(rel_err(&host(xt.grad(&grads).unwrap()), &fx) <= 1e-3);

    let xt = tensor::<AD>(&x, d.x_shape());
    let wtt = tensor::<AD>(&wt, d.w_shape()).require_grad();
    let grads = (global_filter(xt.clone(), wtt.clone()) * tensor::<AD>(&r, d.x_shape()))
        .sum()
        .backward();
    assert!(xt.grad(&grads).is_none());
    assert!(rel_err(&host(wtt.grad(&grads).unwrap()), &fw) <= 1e-3);
}

// ------------------------------------------------------------------------------------------
// 3. resize
// ------------------------------------------------------------------------------------------

#[test]
fn resize_bilinear_align_corners_by_hand() {
    // [2, 2, C=1, 2]: real part [[1, 2], [3, 4]], imaginary part ten times that.
    let w = Tensor::<B, 4>::from_data(
        TensorData::new(
            vec![1.0f32, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0],
            [2, 2, 1, 2],
        ),
        &Default::default(),
    );
    let out = resize_complex_weight(w.clone(), 3, 3);
    assert_eq!(out.dims(), [3, 3, 1, 2]);
    let v = host(out);
    // Align corners: the corners stay, the centre lines are averages.
    let re = [1.0, 1.5, 2.0, 2.0, 2.5, 3.0, 3.0, 3.5, 4.0];
    for (i, want) in re.iter().enumerate() {
        assert!(
            (v[2 * i] - want).abs() < 1e-6,
            "re[{i}] = {} != {want}",
            v[2 * i]
        );
        assert!((v[2 * i + 1] - 10.0 * want).abs() < 1e-5, "im[{i}]");
    }

    // 3 x 2 → 2 x 3 (shrink rows, grow columns), two channels: rows 0 and 2 are kept, columns
    // [a, b] become [a, (a+b)/2, b]. Channel 1 is channel 0 negated.
    let rows = [[1.0f32, 5.0], [2.0, 6.0], [3.0, 9.0]];
    let mut data = Vec::new();
    for row in rows {
        for v in row {
            data.extend([v, 0.5 * v, -v, -0.5 * v]); // (c0 re, c0 im, c1 re, c1 im)
        }
    }
    let w = Tensor::<B, 4>::from_data(TensorData::new(data, [3, 2, 2, 2]), &Default::default());
    let v = host(resize_complex_weight(w.clone(), 2, 3));
    let want_re = [[1.0, 3.0, 5.0], [3.0, 6.0, 9.0]];
    for (i, row) in want_re.iter().enumerate() {
        for (j, &wv) in row.iter().enumerate() {
            let base = ((i * 3 + j) * 2) * 2;
            let got = [v[base], v[base + 1], v[base + 2], v[base + 3]];
            let want = [wv, 0.5 * wv, -wv, -0.5 * wv];
            assert!(
                max_abs_diff(&got, &want) < 1e-6,
                "({i},{j}): {got:?} != {want:?}"
            );
        }
    }
    // The HorNet-layout resize agrees.
    let v2 = host(
        resize_complex_weight_nchw(w.clone().permute([2, 0, 1, 3]), 2, 3).permute([1, 2, 0, 3]),
    );
    assert!(max_abs_diff(&v, &v2) < 1e-6);

    // A single output row takes row 0 (PyTorch's scale is 0 then).
    let v = host(resize_complex_weight(w.clone(), 1, 2));
    assert!(max_abs_diff(&v, &[1.0, 0.5, -1.0, -0.5, 5.0, 2.5, -5.0, -2.5]) < 1e-6);
}

#[test]
fn resize_identity_when_sizes_agree() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let v = rand_vec(4 * 3 * 5 * 2, &mut rng);
    let w = tensor::<B>(&v, [4, 3, 5, 2]);
    assert_eq!(
        host(resize_complex_weight(w.clone(), 4, 3)),
        host(w.clone())
    );
    let w = tensor::<B>(&v, [5, 4, 3, 2]);
    assert_eq!(host(resize_complex_weight_nchw(w.clone(), 4, 3)), host(w));
}

// ------------------------------------------------------------------------------------------
// 4. module
// ------------------------------------------------------------------------------------------

#[test]
fn module_resizes_weight_to_runtime_grid() {
    let device = Default::default();
    // Stored for a 4x4 grid (4 x 3 half spectrum), run on 6x8 (6 x 5 half spectrum).
    let gf = GlobalFilter::<AD>::new(3, 4, 3, &device);
    assert_eq!(gf.complex_weight.dims(), [4, 3, 3, 2]);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x = rand_vec(2 * 6 * 8 * 3, &mut rng);
    let xt = tensor::<AD>(&x, [2, 6, 8, 3]);
    let y = gf.forward(xt.clone());
    assert_eq!(y.dims(), [2, 6, 8, 3]);
    let resized = resize_complex_weight(gf.complex_weight.val(), 6, 5);
    assert_eq!(resized.dims(), [6, 5, 3, 2]);
    let want = global_filter(xt.clone(), resized);
    assert!(max_abs_diff(&host(y.clone()), &host(want)) < 1e-6);
    // The gradient reaches the stored weight through the resize.
    let grads = y.sum().backward();
    let g = gf.complex_weight.grad(&grads).expect("weight gradient");
    assert_eq!(g.dims(), [4, 3, 3, 2]);
    assert!(host(g).iter().any(|v| v.abs() > 0.0));

    // On the stored grid there is no resize.
    let x4 = tensor::<AD>(&rand_vec(2 * 4 * 4 * 3, &mut rng), [2, 4, 4, 3]);
    let a = host(gf.forward(x4.clone()));
    let b = host(global_filter(x4, gf.complex_weight.val()));
    assert_eq!(a, b);
}

/// GFNet's init: randn * 0.02.
#[test]
fn module_init_scale() {
    let gf = GlobalFilter::<B>::new(64, 14, 8, &Default::default());
    let v = host(gf.complex_weight.val());
    let std = (v.iter().map(|a| a * a).sum::<f64>() / v.len() as f64).sqrt();
    assert!((std - 0.02).abs() < 0.002, "std {std}");
}
