//! The real speed-up of the token- and position-pruning models against their dense
//! counterparts: `dynamicvit-deit-s-0.7` against `deit-s` (tokens gathered after each
//! predictor) and `adahornet-t-7x7-0.7` against `hornet-t-7x7` (stage 3's pointwise parts on the
//! kept positions). Eval-mode forward on the CPU at 224×224, batch 8 and batch 1.
//!
//! `cargo bench --bench pruned_vs_dense [-- NAME_FILTER]`. The two models of a pair alternate in
//! rounds, so that a change of machine load hits both; each round is a median of timed forwards,
//! and the best round counts. Prints ms per batch, images/s and the ratio, with the load average.
//! Weights are random: speed does not depend on them.

use anyhow::Result;
use rlprune::backbones::{AnyBackbone, ModelSpec};
use rlprune::bench::{bench_inference, Stats};
use rlprune::Cpu;

const PAIRS: &[(&str, &str)] = &[
    ("deit-s", "dynamicvit-deit-s-0.7"),
    ("hornet-t-7x7", "adahornet-t-7x7-0.7"),
];
const ROUNDS: usize = 3;
const REPEATS: usize = 5;

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn main() -> Result<()> {
    rlprune::keep_freed_memory();
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let dev = Default::default();
    let build = |name: &str| -> Result<AnyBackbone<Cpu>> {
        ModelSpec::named(name)
            .ok_or_else(|| anyhow::anyhow!("{name} is not in the zoo"))?
            .build(&dev)
    };
    println!("load average before: {}", loadavg());
    for &(dense_name, pruned_name) in PAIRS {
        if !filter.is_empty()
            && !filter
                .iter()
                .any(|f| dense_name.contains(f.as_str()) || pruned_name.contains(f.as_str()))
        {
            continue;
        }
        let (dense, pruned) = (build(dense_name)?, build(pruned_name)?);
        for batch in [8usize, 1] {
            let shape = [batch, 3, 224, 224];
            let (mut t_dense, mut t_pruned) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..ROUNDS {
                t_dense = t_dense
                    .min(Stats::of(&bench_inference(&dense, shape, 1, REPEATS, &dev)?).median);
                t_pruned = t_pruned
                    .min(Stats::of(&bench_inference(&pruned, shape, 1, REPEATS, &dev)?).median);
            }
            let ips = |s: f64| batch as f64 / s;
            println!(
                "batch {batch}: {dense_name} {:.1} ms ({:.1} img/s), {pruned_name} {:.1} ms ({:.1} img/s), speed-up {:.2}x",
                t_dense * 1e3,
                ips(t_dense),
                t_pruned * 1e3,
                ips(t_pruned),
                t_dense / t_pruned
            );
        }
    }
    println!("load average after: {}", loadavg());
    Ok(())
}
