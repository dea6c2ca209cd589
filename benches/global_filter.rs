//! Global filter timings: the real-FFT path against the DFT-by-matmul path, forward and
//! forward+backward, on GFNet/HorNet grids. `cargo bench --bench global_filter`.
//! Prints milliseconds per call (median of repeated runs) and the DFT/FFT ratio of each case,
//! all measured in the same run, plus the load average.

use std::time::{Duration, Instant};

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Distribution, Tensor};
use rlprune::nn::global_filter::{
    global_filter, global_filter_dft, global_filter_nchw, global_filter_nchw_dft,
};

type B = NdArray<f32>;
type AD = Autodiff<B>;

fn median_ms(mut f: impl FnMut()) -> f64 {
    f();
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed() < Duration::from_millis(1500) && times.len() < 200) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[derive(Clone, Copy)]
enum Layout {
    Nhwc,
    Nchw,
}

fn shapes(l: Layout, n: usize, c: usize, h: usize, w: usize) -> ([usize; 4], [usize; 4]) {
    match l {
        Layout::Nhwc => ([n, h, w, c], [h, w / 2 + 1, c, 2]),
        Layout::Nchw => ([n, c, h, w], [c, h, w / 2 + 1, 2]),
    }
}

fn run_fwd<BK: rlprune::nn::SpectralBackend>(
    l: Layout,
    fft: bool,
    x: Tensor<BK, 4>,
    w: Tensor<BK, 4>,
) -> Tensor<BK, 4> {
    match (l, fft) {
        (Layout::Nhwc, true) => global_filter(x, w),
        (Layout::Nhwc, false) => global_filter_dft(x, w),
        (Layout::Nchw, true) => global_filter_nchw(x, w),
        (Layout::Nchw, false) => global_filter_nchw_dft(x, w),
    }
}

fn case(name: &str, l: Layout, n: usize, c: usize, h: usize, w: usize) {
    let device = Default::default();
    let (xs, ws) = shapes(l, n, c, h, w);
    let x = Tensor::<B, 4>::random(xs, Distribution::Normal(0.0, 1.0), &device);
    let wt = Tensor::<B, 4>::random(ws, Distribution::Normal(0.0, 0.02), &device);
    let fwd = |fft: bool| {
        median_ms(|| {
            let y = run_fwd(l, fft, x.clone(), wt.clone());
            std::hint::black_box(y.into_data());
        })
    };
    let xa = Tensor::<AD, 4>::from_inner(x.clone()).require_grad();
    let wa = Tensor::<AD, 4>::from_inner(wt.clone()).require_grad();
    let fwd_bwd = |fft: bool| {
        median_ms(|| {
            let y = run_fwd(l, fft, xa.clone(), wa.clone());
            let mut grads = y.sum().backward();
            // `grad_remove` hands over the gradient itself; `grad` would return a shared clone,
            // which burn-ndarray's `into_data` copies element by element (slow).
            std::hint::black_box(xa.grad_remove(&mut grads).map(|g| g.into_data()));
            std::hint::black_box(wa.grad_remove(&mut grads).map(|g| g.into_data()));
        })
    };
    let (f_fft, f_dft) = (fwd(true), fwd(false));
    let (b_fft, b_dft) = (fwd_bwd(true), fwd_bwd(false));
    println!(
        "{name:<28} fwd: fft {f_fft:8.3} ms  dft {f_dft:8.3} ms  dft/fft {:5.2}   \
         fwd+bwd: fft {b_fft:8.3} ms  dft {b_dft:8.3} ms  dft/fft {:5.2}",
        f_dft / f_fft,
        b_dft / b_fft
    );
}

fn main() {
    rlprune::keep_freed_memory();
    // `cargo bench` passes `--bench`; a positional argument filters the cases by name.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    println!("load average before: {}", loadavg());
    let cases: [(&str, Layout, usize, usize, usize, usize); 7] = [
        ("gfnet-ti 14x14 C256 N8", Layout::Nhwc, 8, 256, 14, 14),
        ("gfnet 7x7 C256 N8", Layout::Nhwc, 8, 256, 7, 7),
        ("gfnet 7x7 C512 N8", Layout::Nhwc, 8, 512, 7, 7),
        ("gfnet-h 28x28 C128 N8", Layout::Nhwc, 8, 128, 28, 28),
        ("gfnet-h 56x56 C64 N8", Layout::Nhwc, 8, 64, 56, 56),
        ("hornet-gf 14x14 C128 N8", Layout::Nchw, 8, 128, 14, 14),
        ("hornet-gf 7x7 C256 N8", Layout::Nchw, 8, 256, 7, 7),
    ];
    for (name, l, n, c, h, w) in cases {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        case(name, l, n, c, h, w);
    }
    println!("load average after: {}", loadavg());
}
