//! DynamicViT's real speed-up: `dynamicvit-deit-s-0.7` (tokens gathered after each predictor)
//! against `deit-s`, eval-mode forward on the CPU at 224×224, batch 8 and batch 1, measured in
//! the same run. `cargo bench --bench dynamicvit`. Prints ms per batch (median), images/s and
//! the images/s ratio, plus the load average. Weights are random: speed does not depend on them.

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
    let (deit, dyn07) = (build("deit-s"), build("dynamicvit-deit-s-0.7"));
    println!("load average before: {}", loadavg());
    for batch in [8usize, 1] {
        let x = Tensor::<Cpu, 4>::random([batch, 3, 224, 224], Distribution::Default, &dev);
        let t_deit = median_ms(|| {
            let _ = deit.forward(x.clone()).into_data();
        });
        let t_dyn = median_ms(|| {
            let _ = dyn07.forward(x.clone()).into_data();
        });
        let ips = |ms: f64| batch as f64 * 1e3 / ms;
        println!(
            "batch {batch}: deit-s {t_deit:.1} ms ({:.1} img/s), dynamicvit-deit-s-0.7 {t_dyn:.1} ms ({:.1} img/s), speed-up {:.2}x",
            ips(t_deit),
            ips(t_dyn),
            t_deit / t_dyn
        );
    }
    println!("load average after: {}", loadavg());
}
