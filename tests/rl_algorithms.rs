//! PPO and DQN on toy decision problems, the LSTM router cell, and reproducibility of the RNP
//! learner for every algorithm and cell.

use burn::module::AutodiffModule;
use burn::tensor::{Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlprune::controllers::ActionRule;
use rlprune::controllers::channel_router::{ChannelRouter, RouterPolicy};
use rlprune::controllers::{Controller, ControllerConfig, DecisionPoint, Mode};
use rlprune::rl::{DqnConfig, PpoConfig, RlConfig};
use rlprune::rl::rollout::Trajectory;
use rlprune::train::optim::{Optimizer, OptimizerConfig};
use rlprune::{Cpu, CpuAutodiff as Ad};

mod common;
use common::rng_lock as lock;

fn ctl(groups: usize, hidden: usize, rnn: &str) -> ControllerConfig {
    ControllerConfig { kind: "channel-router".into(), groups, hidden, rnn: rnn.parse().unwrap(), options: Default::default() }
}

fn adam(lr: f64) -> Optimizer<Ad> {
    Optimizer::new(OptimizerConfig::Adamw { lr, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.0 })
}

fn point(index: usize) -> DecisionPoint {
    DecisionPoint { index, name: format!("toy{index}"), groups: 3, out_channels: 3, macs_full: 0 }
}

/// Compute price per group in the toy problem.
const PRICE: f32 = 0.3;

/// A two-decision episode like RNP's: decision 0 sees a constant, pays `PRICE * a0` and its
/// action determines decision 1's observation (one-hot of a0); decision 1 earns 1 when it
/// repeats a0. Optimal: a0 = 1 (cheapest), a1 = a0, return 0.7 (0.4 for a0 = 2, 0.1 for 3).
fn toy_episodes(router: &ChannelRouter<Cpu>, rule: ActionRule, mode: Mode, n: usize, rng: &mut ChaCha8Rng) -> Trajectory {
    let dev = Default::default();
    let mut policy = RouterPolicy::with_rule(router.clone(), rule);
    policy.reset(n);
    let d0 = policy.decide(&point(0), Tensor::ones([n, 1], &dev), mode, rng).unwrap();
    let onehot: Vec<f32> = d0.actions.iter().flat_map(|&a| (1..=3).map(move |j| if j == a { 1.0 } else { 0.0 })).collect();
    let obs1 = Tensor::<Cpu, 2>::from_data(TensorData::new(onehot.clone(), [n, 3]), &dev);
    let d1 = policy.decide(&point(1), obs1, mode, rng).unwrap();
    let r0: Vec<f32> = d0.actions.iter().map(|&a| -PRICE * a as f32).collect();
    let r1: Vec<f32> = d0.actions.iter().zip(&d1.actions).map(|(a, b)| if a == b { 1.0 } else { 0.0 }).collect();
    Trajectory {
        n,
        observations: vec![(vec![1.0; n], 1), (onehot, 3)],
        actions: vec![d0.actions.clone(), d1.actions.clone()],
        correct: r1.iter().map(|&r| r > 0.5).collect(),
        accuracy_term: r1.clone(),
        rewards: vec![r0, r1],
        macs: vec![vec![0; n]; 2],
        macs_full: vec![0, 0],
        greedy_returns: None,
        greedy_macs: None,
        groups: 3,
    }
}

fn assert_solved(router: &ChannelRouter<Ad>, rule: ActionRule, what: &str) {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let t = toy_episodes(&router.valid(), rule, Mode::Greedy, 6, &mut rng);
    assert_eq!(t.actions, vec![vec![1; 6], vec![1; 6]], "{what}: greedy actions after training");
}

#[test]
fn ppo_learns_the_optimal_two_step_policy() {
    let _guard = lock();
    for seed in [3, 4] {
        let dev = Default::default();
        <Ad as burn::tensor::backend::Backend>::seed(&dev, seed);
        let cfg =
            RlConfig {
            algorithm: "ppo".parse().unwrap(),
            entropy_bonus: 0.01,
            ppo: PpoConfig { epochs: 4, ..Default::default() },
            minibatch: 16,
            ..Default::default()
        };
        let mut router = ChannelRouter::<Ad>::new(&ctl(3, 16, "gru"), &[1, 3], cfg.value_head(), &dev);
        let mut opt = adam(0.01);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut clipped_any = false;
        for step in 0..80u64 {
            let traj = toy_episodes(&router.valid(), ActionRule::Softmax, Mode::Sample, 32, &mut rng);
            let (r, stats) = rlprune::rl::ppo::ppo_update(router, &mut opt, &traj, &cfg, 0.01, &dev, step).unwrap();
            router = r;
            assert!((0.0..=1.0).contains(&stats.clip_fraction) && stats.approx_kl >= -1e-6, "{stats:?}");
            clipped_any |= stats.clip_fraction > 0.0;
        }
        assert!(clipped_any, "several epochs per batch move the ratio past the clip range at some point");
        assert_solved(&router, ActionRule::Softmax, &format!("PPO, seed {seed}"));
        // The critic learned the optimal return from the first state.
        let out = router.valid().unroll(&[Tensor::ones([1, 1], &dev)]).unwrap();
        let v: f32 = out[0].value.clone().unwrap().into_scalar();
        assert!((v - (1.0 - PRICE)).abs() < 0.15, "seed {seed}: V(s0) = {v}");
    }
}

#[test]
fn dqn_learns_the_optimal_two_step_policy() {
    let _guard = lock();
    let dev = Default::default();
    <Ad as burn::tensor::backend::Backend>::seed(&dev, 5);
    let cfg = RlConfig {
        algorithm: "dqn".parse().unwrap(),
        dqn: DqnConfig {
            epsilon_start: 1.0,
            epsilon_end: 0.1,
            epsilon_decay_steps: 40,
            updates_per_batch: 4,
            target_sync_every: 10,
            replay_capacity: 2000,
        },
        minibatch: 64,
        ..Default::default()
    };
    let mut router = ChannelRouter::<Ad>::new(&ctl(3, 16, "gru"), &[1, 3], cfg.value_head(), &dev);
    assert!(router.value.is_none());
    let mut dqn = rlprune::rl::dqn::DqnState::new(&router, &cfg);
    let mut opt = adam(0.01);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for step in 0..80u64 {
        let eps = cfg.epsilon(step);
        let traj = toy_episodes(&router.valid(), ActionRule::EpsilonGreedy(eps), Mode::Sample, 32, &mut rng);
        let (r, stats) = dqn.update(router, &mut opt, &traj, &cfg, 0.01, eps, &dev, step).unwrap();
        router = r;
        assert!(stats.td_loss.is_finite() && stats.epsilon == eps);
    }
    assert_eq!(dqn.buffer.len(), 2000, "FIFO buffer keeps the newest `replay_capacity` episodes");
    assert_solved(&router, ActionRule::EpsilonGreedy(0.0), "DQN");
    // Q(s0, a) ≈ 1 - PRICE·a: the TD targets carried the final reward back one layer.
    let out = router.valid().unroll(&[Tensor::ones([1, 1], &dev)]).unwrap();
    let q: Vec<f32> = out[0].scores.clone().into_data().to_vec().unwrap();
    for (a, qa) in q.iter().enumerate() {
        let want = 1.0 - PRICE * (a + 1) as f32;
        assert!((qa - want).abs() < 0.2, "Q(s0, {}) = {qa}, want about {want} (all: {q:?})", a + 1);
    }
}

#[test]
fn epsilon_greedy_explores_at_the_configured_rate() {
    let _guard = lock();
    let dev = Default::default();
    let router = ChannelRouter::<Cpu>::new(&ctl(4, 8, "gru"), &[1], false, &dev);
    let n = 4000;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let greedy = RouterPolicy::new(router.clone())
        .decide(&point(0), Tensor::ones([1, 1], &dev), Mode::Greedy, &mut rng)
        .unwrap()
        .actions[0];
    let mut p = RouterPolicy::with_rule(router, ActionRule::EpsilonGreedy(0.4));
    let d = p.decide(&point(0), Tensor::ones([n, 1], &dev), Mode::Sample, &mut rng).unwrap();
    let off = d.actions.iter().filter(|&&a| a != greedy).count() as f64 / n as f64;
    // A random action differs from the greedy one with probability ε (k-1)/k = 0.3.
    assert!((off - 0.3).abs() < 0.03, "non-greedy fraction {off}");
    let schedule = RlConfig { dqn: DqnConfig { epsilon_decay_steps: 10, ..Default::default() }, ..Default::default() };
    assert!((schedule.epsilon(5) - 0.525).abs() < 1e-12 && (schedule.epsilon(50) - 0.05).abs() < 1e-12);
}

#[test]
fn lstm_cell_matches_the_pytorch_equations() {
    let _guard = lock();
    use rlprune::controllers::channel_router::LstmCell;
    let dev = Default::default();
    let mut cell = LstmCell::<Cpu>::new(1, 1, &dev);
    let p = |v: Vec<f32>, s: [usize; 2]| burn::module::Param::from_tensor(Tensor::<Cpu, 2>::from_data(TensorData::new(v, s), &dev));
    let p1 = |v: Vec<f32>| burn::module::Param::from_tensor(Tensor::<Cpu, 1>::from_data(TensorData::new(v, [4]), &dev));
    // Gates i, f, g, o.
    cell.weight_ih = p(vec![0.5, -0.3, 0.8, 0.1], [4, 1]);
    cell.weight_hh = p(vec![0.2, 0.4, -0.6, 0.7], [4, 1]);
    cell.bias_ih = p1(vec![0.1, 0.0, -0.1, 0.2]);
    cell.bias_hh = p1(vec![0.0, 0.3, 0.05, -0.1]);
    let (x, h, c) = (0.7f32, -0.4f32, 0.25f32);
    let sig = |z: f32| 1.0 / (1.0 + (-z).exp());
    let i = sig(0.5 * x + 0.2 * h + 0.1);
    let f = sig(-0.3 * x + 0.4 * h + 0.3);
    let g = (0.8 * x - 0.6 * h - 0.05).tanh();
    let o = sig(0.1 * x + 0.7 * h + 0.1);
    let c2 = f * c + i * g;
    let h2 = o * c2.tanh();
    let t = |v: f32| Tensor::<Cpu, 2>::from_data(TensorData::new(vec![v], [1, 1]), &dev);
    let (hh, cc) = cell.forward(t(x), t(h), t(c));
    let (hh, cc): (f32, f32) = (hh.into_scalar(), cc.into_scalar());
    assert!((hh - h2).abs() < 1e-6 && (cc - c2).abs() < 1e-6, "({hh}, {cc}) vs ({h2}, {c2})");
    // Parameter names follow PyTorch (lstm.weight_ih ...), and the GRU is absent.
    let router = ChannelRouter::<Cpu>::new(&ctl(4, 8, "lstm"), &[3, 5], false, &dev);
    let names: Vec<String> = rlprune::nn::params::state_dict(&router).keys().cloned().collect();
    assert!(names.iter().any(|n| n == "lstm.weight_ih") && !names.iter().any(|n| n.starts_with("gru")), "{names:?}");
}

fn synthetic_batch(n: usize, seed: u64) -> rlprune::data::Batch {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let images: Vec<f32> = (0..n * 16 * 16).map(|_| rng.random_range(-1.0..1.0)).collect();
    let labels: Vec<i64> = (0..n).map(|i| (i % 10) as i64).collect();
    rlprune::data::Batch { images, labels, shape: [n, 1, 16, 16], indices: (0..n).collect() }
}

/// (reward mean, reward std, the algorithm's scalars) of the first updates.
fn learner_trace(algorithm: &str, rnn: &str, workers: usize, seed: u64) -> Vec<(f64, f64, Vec<f64>)> {
    use rlprune::backbones::cnn::{SmallCnn, SmallCnnOptions};
    use rlprune::backbones::{AnyBackbone, BuildContext};
    use rlprune::methods::rnp::RnpLearner;
    let dev = Default::default();
    <Ad as burn::tensor::backend::Backend>::seed(&dev, seed);
    let ctx = BuildContext { num_classes: 10, in_channels: 1, img_size: [16, 16] };
    let bb = SmallCnn::new(&SmallCnnOptions { channels: [8, 8, 16, 16] }, &ctx, &dev);
    let cfg = RlConfig {
        algorithm: algorithm.parse().unwrap(),
        workers,
        alternate_every: 2,
        minibatch: 8,
        ppo: PpoConfig { epochs: 2, ..Default::default() },
        dqn: DqnConfig { epsilon_decay_steps: 4, target_sync_every: 2, ..Default::default() },
        ..Default::default()
    };
    let mut l = RnpLearner::<rlprune::CpuAutodiff>::new(AnyBackbone::SmallCnn(bb), 1, &ctl(4, 16, rnn), &cfg, seed);
    (0..4)
        .map(|s| {
            let r = l.step(&synthetic_batch(16, s), 1e-2, 1e-2).unwrap();
            assert!(r.stats.flops_ratio > 0.0 && r.stats.flops_ratio <= 1.0);
            let extra = r.stats.algorithm_scalars(algorithm.parse().unwrap()).into_iter().map(|(_, v)| v).collect();
            (r.stats.reward_mean, r.stats.reward_std, extra)
        })
        .collect()
}

#[test]
fn every_algorithm_is_reproducible_for_a_seed_and_worker_count() {
    let _guard = lock();
    for (algorithm, rnn) in [("ppo", "gru"), ("dqn", "gru"), ("reinforce", "lstm")] {
        let a = learner_trace(algorithm, rnn, 2, 11);
        let b = learner_trace(algorithm, rnn, 2, 11);
        assert_eq!(a, b, "{algorithm}/{rnn}: same seed and workers");
        let c = learner_trace(algorithm, rnn, 2, 12);
        assert_ne!(a, c, "{algorithm}/{rnn}: another seed gives other rollouts");
    }
    // workers = 1 runs the same algorithm, reproducibly.
    assert_eq!(learner_trace("ppo", "gru", 1, 11), learner_trace("ppo", "gru", 1, 11));
}
