//! AdaHorNet's real speed-up: `adahornet-t-7x7-0.7` (stage 3 sparsified: the pointwise parts of
//! each block on the kept positions, keep ratios 0.7/0.5/0.3) against the dense `hornet-t-7x7`,
//! eval-mode forward on the CPU at 224×224, batch 8 and batch 1, measured in the same run.
//! `cargo bench --bench adahornet`. Prints ms per batch (median), images/s and the images/s
//! ratio, plus the load average. Weights are random: speed does not depend on them.

use std::time::{Duration, Instant};

use burn::tensor::{Distribution, Tensor};
use rlprune::backbones::{AnyBackbone, Backbone, ModelSpec};
use rlprune::Cpu;

fn median_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed() < Duration::from_secs(8) && times.len() < 50) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string()
}

fn main() {
    let dev = Default::default();
    let build = |name: &str| -> AnyBackbone<Cpu> { ModelSpec::named(name).unwrap().build(&dev).unwrap() };
    let (dense, ada) = (build("hornet-t-7x7"), build("adahornet-t-7x7-0.7"));
    println!("load average before: {}", loadavg());
    for batch in [8usize, 1] {
        let x = Tensor::<Cpu, 4>::random([batch, 3, 224, 224], Distribution::Default, &dev);
        // Interleave the two so that a change of machine load hits both.
        let (mut t_dense, mut t_ada) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            t_dense.push(median_ms(|| {
                let _ = dense.forward(x.clone()).into_data();
            }));
            t_ada.push(median_ms(|| {
                let _ = ada.forward(x.clone()).into_data();
            }));
        }
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let (t_dense, t_ada) = (best(&t_dense), best(&t_ada));
        let ips = |ms: f64| batch as f64 * 1e3 / ms;
        println!(
            "batch {batch}: hornet-t-7x7 {t_dense:.1} ms ({:.1} img/s), adahornet-t-7x7-0.7 {t_ada:.1} ms ({:.1} img/s), speed-up {:.2}x",
            ips(t_dense),
            ips(t_ada),
            t_dense / t_ada
        );
    }
    println!("load average after: {}", loadavg());
}
