//! Rollout throughput: sampled controlled forward passes of the RNP router on the small CNN
//! (Fashion-MNIST shape, 28×28×1, batch 64), including building and sending the trajectories
//! back to the learner, with 1 worker against 2 workers in the same run.
//! `cargo bench --bench rollout` (set `ROLLOUT_BENCH_ROUNDS` for longer runs).
//!
//! Arms (taking turns batch by batch, so load drift hits all of them alike):
//! - 1 worker, convolutions on all cores (image-parallel conv): the best single-worker setup;
//! - 1 worker, convolutions on 1 thread;
//! - N workers (N = cores, at least 2), convolutions on 1 thread each (what `workers = N` uses).
//!
//! The ratios printed are N workers against the *better* of the two single-worker arms: over the
//! whole run, and per round (median and quartiles, since a shared machine's speed drifts). It also
//! times what the learner does serially around the rollouts: publishing snapshots
//! (`valid()` of the autodiff backbone and router) and one REINFORCE update.
//!
//! The machine's own ceiling, measured in the same rounds: the plain (unrouted) forward pass of
//! the same backbone on the workers' shares, run by N threads at once against one thread running
//! the shares one after the other, with no channels, router or trajectories. Rollouts are mostly
//! this forward pass, so no rollout scheme can scale better than the cores do on it; on a VM whose
//! vCPUs share physical cores or FMA units with neighbours, that is well under N.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rlprune::backbones::cnn::{SmallCnn, SmallCnnOptions};
use rlprune::backbones::{AnyBackbone, Backbone, BuildContext};
use rlprune::controllers::ControllerConfig;
use rlprune::controllers::ActionRule;
use rlprune::controllers::channel_router::ChannelRouter;
use rlprune::rl::RlConfig;
use rlprune::rl::rollout::RolloutPool;
use rlprune::train::optim::{Optimizer, OptimizerConfig};
use rlprune::{Cpu, CpuAutodiff};

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

struct Arm {
    name: String,
    pool: RolloutPool<Cpu, ChannelRouter<Cpu>>,
    images: usize,
    seconds: f64,
}

fn main() -> anyhow::Result<()> {
    rlprune::keep_freed_memory();
    let rounds: usize = std::env::var("ROLLOUT_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
    let batches_per_round = 4;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let n_workers = cores.max(2);
    let batch = 64;
    let dev = Default::default();
    <CpuAutodiff as burn::tensor::backend::Backend>::seed(&dev, 0);
    let ctx = BuildContext { num_classes: 10, in_channels: 1, img_size: [28, 28] };
    let backbone_ad = AnyBackbone::SmallCnn(SmallCnn::<CpuAutodiff>::new(&SmallCnnOptions { channels: [32, 32, 64, 64] }, &ctx, &dev));
    let ctl = ControllerConfig { kind: "channel-router".into(), groups: 4, hidden: 64, rnn: Default::default(), options: Default::default() };
    let in_ch = ChannelRouter::<CpuAutodiff>::input_channels(1, &backbone_ad.prunable_convs());
    let router_ad = ChannelRouter::<CpuAutodiff>::new(&ctl, &in_ch, true, &dev);
    let backbone: AnyBackbone<Cpu> = backbone_ad.valid();
    let router: ChannelRouter<Cpu> = router_ad.valid();
    let cfg = RlConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let images: Vec<f32> = (0..batch * 28 * 28).map(|_| rng.random_range(0.0..1.0)).collect();
    let labels: Vec<i64> = (0..batch).map(|i| (i % 10) as i64).collect();
    let shape = [batch, 1, 28, 28];

    println!("rollout throughput: small-cnn 28x28x1, batch {batch}, router gru hidden 64, k = 4");
    println!("cores {cores}, load average at start {}", loadavg());
    let mut arms = vec![
        Arm {
            name: format!("1 worker,  conv threads {cores} (image-parallel)"),
            pool: RolloutPool::with_compute_threads(1, cores),
            images: 0,
            seconds: 0.0,
        },
        Arm { name: "1 worker,  conv threads 1".into(), pool: RolloutPool::with_compute_threads(1, 1), images: 0, seconds: 0.0 },
        Arm {
            name: format!("{n_workers} workers, conv threads 1 each"),
            pool: RolloutPool::with_compute_threads(n_workers, 1),
            images: 0,
            seconds: 0.0,
        },
    ];
    // Arms take turns batch by batch, so load drift on this shared machine (which moves
    // single-arm rates by ±15 % between runs) hits all of them alike; each round's ratio is
    // kept, and the median is reported with the spread.
    let mut step = 0u64;
    let mut round_ratios = Vec::new();
    // The ceiling arms: one thread over all shares in turn, and N threads with one share each.
    let shares: Vec<Tensor<Cpu, 4>> = (0..n_workers)
        .map(|w| {
            let (a, b) = (w * batch / n_workers, (w + 1) * batch / n_workers);
            let part = images[a * 28 * 28..b * 28 * 28].to_vec();
            Tensor::from_data(TensorData::new(part, [b - a, 1, 28, 28]), &dev)
        })
        .collect();
    let forward_shares = |xs: &[Tensor<Cpu, 4>]| {
        rlprune::nn::pool::set_thread_compute_threads(1);
        for x in xs {
            std::hint::black_box(backbone.forward(x.clone()).into_data());
        }
    };
    let (mut ceil_serial, mut ceil_parallel) = (0.0f64, 0.0f64);
    let mut ceil_ratios = Vec::new();
    for round in 0..=rounds {
        let mut round_secs = vec![0.0f64; arms.len()];
        for _ in 0..batches_per_round {
            for (arm, secs) in arms.iter_mut().zip(round_secs.iter_mut()) {
                let t = Instant::now();
                let traj =
                    arm.pool.run(&backbone, &router, &images, shape, &labels, &cfg, cfg.compute_penalty, ActionRule::Softmax, 0, step)?;
                *secs += t.elapsed().as_secs_f64();
                step += 1;
                assert_eq!(traj.n, batch);
            }
        }
        let (mut serial, mut parallel) = (0.0f64, 0.0f64);
        for _ in 0..batches_per_round {
            let t = Instant::now();
            std::thread::scope(|s| {
                s.spawn(|| forward_shares(&shares));
            });
            serial += t.elapsed().as_secs_f64();
            let t = Instant::now();
            std::thread::scope(|s| {
                for x in &shares {
                    s.spawn(|| forward_shares(std::slice::from_ref(x)));
                }
            });
            parallel += t.elapsed().as_secs_f64();
        }
        // Round 0 warms caches and threads up; it is not counted.
        if round > 0 {
            ceil_serial += serial;
            ceil_parallel += parallel;
            ceil_ratios.push(serial / parallel);
            for (arm, secs) in arms.iter_mut().zip(&round_secs) {
                arm.seconds += secs;
                arm.images += batches_per_round * batch;
            }
            round_ratios.push((round_secs[0].min(round_secs[1]) / round_secs[2], round_secs[1] / round_secs[2]));
        }
    }
    let rate = |a: &Arm| a.images as f64 / a.seconds.max(1e-9);
    for a in &arms {
        println!("  {:<44} {:>8.1} img/s  ({} images in {:.2} s)", a.name, rate(a), a.images, a.seconds);
    }
    let best_single = rate(&arms[0]).max(rate(&arms[1]));
    let multi = rate(&arms[2]);
    println!(
        "ratio {n_workers} workers / best single worker: {:.2}x   ({n_workers} workers / 1 worker at 1 thread: {:.2}x)",
        multi / best_single,
        multi / rate(&arms[1])
    );
    let quartiles = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let q = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
        (q(0.25), q(0.5), q(0.75))
    };
    let (lo, med, hi) = quartiles(round_ratios.iter().map(|r| r.0).collect());
    let (lo1, med1, hi1) = quartiles(round_ratios.iter().map(|r| r.1).collect());
    println!(
        "per-round ratio over {} rounds of {batches_per_round} batches, median (quartiles): {n_workers} workers / faster single worker of the round {med:.2}x ({lo:.2}-{hi:.2}); / 1 worker at 1 thread {med1:.2}x ({lo1:.2}-{hi1:.2})",
        round_ratios.len()
    );
    let (clo, cmed, chi) = quartiles(ceil_ratios);
    println!(
        "machine ceiling: plain forward of the same shares, {n_workers} threads at once / 1 thread in turn: {:.2}x over the run, per-round median {cmed:.2}x ({clo:.2}-{chi:.2}); rollout ratio / ceiling {:.2}",
        ceil_serial / ceil_parallel,
        (multi / best_single) / (ceil_serial / ceil_parallel)
    );

    // The learner's serial share: snapshot publishing and one REINFORCE update per batch.
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        let b: AnyBackbone<Cpu> = backbone_ad.valid();
        let r: ChannelRouter<Cpu> = router_ad.valid();
        std::hint::black_box((b, r));
    }
    let publish_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let traj = arms[2].pool.run(&backbone, &router, &images, shape, &labels, &cfg, cfg.compute_penalty, ActionRule::Softmax, 0, 0)?;
    let mut opt = Optimizer::<CpuAutodiff>::new(OptimizerConfig::Adamw {
        lr: 1e-3,
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.0,
    });
    let mut r = router_ad.clone();
    let t = Instant::now();
    for _ in 0..reps {
        let (r2, _) = rlprune::rl::reinforce::learner_step(r, &mut opt, &traj, &cfg, 1e-3, &dev)?;
        r = r2;
    }
    let update_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let rollout_ms = batch as f64 / multi * 1e3;
    println!(
        "learner per batch: snapshot publish {publish_ms:.2} ms, REINFORCE update {update_ms:.2} ms; rollout ({n_workers} workers) {rollout_ms:.1} ms"
    );
    println!("load average at end {}", loadavg());
    Ok(())
}
