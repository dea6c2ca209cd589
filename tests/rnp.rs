//! RNP: controlled execution, channel reordering, router, REINFORCE, rollout reproducibility,
//! configuration errors.

use std::path::Path;

use anyhow::Result;
use burn::tensor::activation::relu;
use burn::tensor::module::max_pool2d;
use burn::tensor::{Distribution, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlprune::Cpu;
use rlprune::backbones::cnn::{SmallCnn, SmallCnnOptions};
use rlprune::backbones::{Backbone, BuildContext};
use rlprune::controllers::{Controller, Decision, DecisionPoint, Mode, SequencePolicy, channels_for};

mod common;
use common::rng_lock as lock;

/// Replays fixed actions, uniform log-probs.
struct Fixed {
    actions: Vec<Vec<usize>>,
    k: usize,
}

impl Controller<Cpu> for Fixed {
    fn groups(&self) -> usize {
        self.k
    }
    fn reset(&mut self, _batch: usize) {}
    fn decide(
        &mut self,
        point: &DecisionPoint,
        obs: Tensor<Cpu, 2>,
        _mode: Mode,
        _rng: &mut ChaCha8Rng,
    ) -> Result<Decision<Cpu>> {
        let n = obs.dims()[0];
        let z = Tensor::zeros([n], &obs.device());
        Ok(Decision { actions: self.actions[point.index].clone(), log_prob: z.clone(), entropy: z })
    }
}

fn small_cnn() -> SmallCnn<Cpu> {
    let ctx = BuildContext { num_classes: 10, in_channels: 1, img_size: [16, 16] };
    let dev = Default::default();
    let mut m = SmallCnn::<Cpu>::new(&SmallCnnOptions { channels: [8, 12, 16, 8] }, &ctx, &dev);
    // Non-trivial BN statistics and affine parameters.
    for l in m.features.iter_mut() {
        let c = l.bn.num_features();
        l.bn.running_mean =
            burn::module::RunningState::new(Tensor::random([c], Distribution::Uniform(-0.2, 0.2), &dev));
        l.bn.running_var = burn::module::RunningState::new(Tensor::random([c], Distribution::Uniform(0.5, 1.5), &dev));
        l.bn.weight = burn::module::Param::from_tensor(Tensor::random([c], Distribution::Uniform(0.5, 1.5), &dev));
        l.bn.bias = burn::module::Param::from_tensor(Tensor::random([c], Distribution::Uniform(-0.1, 0.1), &dev));
    }
    m
}

/// The reference: full convolutions, skipped output channels zeroed per image.
fn masked_forward(m: &SmallCnn<Cpu>, mut x: Tensor<Cpu, 4>, actions: &[Vec<usize>], k: usize) -> Tensor<Cpu, 2> {
    let dev = x.device();
    for (i, layer) in m.features.iter().enumerate() {
        let y = relu(layer.bn.forward(layer.conv.forward(x)));
        let [n, c, _, _] = y.dims();
        let mut mask = vec![0f32; n * c];
        for (s, &a) in actions[i].iter().enumerate() {
            for ch in 0..channels_for(c, k, a) {
                mask[s * c + ch] = 1.0;
            }
        }
        let mask = Tensor::<Cpu, 2>::from_data(TensorData::new(mask, [n, c]), &dev).reshape([n, c, 1, 1]);
        x = y * mask;
        if SmallCnn::<Cpu>::pools_after(i) {
            x = max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], false);
        }
    }
    let [n, c, _, _] = x.dims();
    m.fc.forward(x.mean_dim(3).mean_dim(2).reshape([n, c]))
}

fn max_abs_diff(a: Tensor<Cpu, 2>, b: Tensor<Cpu, 2>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn sliced_grouped_execution_equals_masked_full_computation() {
    let _guard = lock();
    let m = small_cnn();
    let dev = Default::default();
    let n = 7;
    let x = Tensor::<Cpu, 4>::random([n, 1, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
    let k = 4;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let actions: Vec<Vec<usize>> =
        (0..4).map(|_| (0..n).map(|_| rand::Rng::random_range(&mut rng, 1..=k)).collect()).collect();
    let mut ctl = Fixed { actions: actions.clone(), k };
    let (logits, trace) = m.forward_controlled(x.clone(), &mut ctl, Mode::Greedy, &mut rng).unwrap();
    let reference = masked_forward(&m, x.clone(), &actions, k);
    let d = max_abs_diff(logits, reference);
    assert!(d < 1e-5, "grouped vs masked: max |diff| = {d}");
    // All-full actions equal the plain forward; MACs per image are counted from what ran.
    let mut full = Fixed { actions: vec![vec![k; n]; 4], k };
    let (lf, tf) = m.forward_controlled(x.clone(), &mut full, Mode::Greedy, &mut rng).unwrap();
    assert!(max_abs_diff(lf, m.forward(x)) < 1e-5);
    assert_eq!(tf.macs_per_image(), vec![tf.macs_full(); n]);
    let spent = trace.macs_per_image();
    for (i, s) in spent.iter().enumerate() {
        assert!(*s < tf.macs_full() || actions.iter().all(|a| a[i] == k));
    }
}

/// The inference path (one ragged convolution per layer over the whole batch) gives bit for bit
/// what the grouped execution gives: features, observations and MACs, at the widths where the
/// convolution runs as one GEMM per tap (≥ 8 input channels) and below them (im2col).
#[test]
fn ragged_execution_equals_grouped_execution_exactly() {
    use rlprune::backbones::controlled::{controlled_stack_grouped, controlled_stack_ragged};
    use rlprune::nn::conv::max_pool2x2;
    let _guard = lock();
    let ctx = BuildContext { num_classes: 10, in_channels: 1, img_size: [28, 28] };
    let dev = Default::default();
    let m = SmallCnn::<Cpu>::new(&SmallCnnOptions { channels: [32, 32, 64, 64] }, &ctx, &dev);
    let n = 11;
    let x = Tensor::<Cpu, 4>::random([n, 1, 28, 28], Distribution::Normal(0.0, 1.0), &dev);
    let k = 8;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let actions: Vec<Vec<usize>> =
        (0..4).map(|_| (0..n).map(|_| rand::Rng::random_range(&mut rng, 1..=k)).collect()).collect();
    let pool = |i: usize, x: Tensor<Cpu, 4>| if SmallCnn::<Cpu>::pools_after(i) { max_pool2x2(x) } else { x };
    let points = m.prunable_convs();
    let run = |ragged: bool| {
        let mut ctl = Fixed { actions: actions.clone(), k };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let f = if ragged { controlled_stack_ragged } else { controlled_stack_grouped };
        f(&m.features, &points, &pool, x.clone(), &mut ctl, Mode::Greedy, &mut rng).unwrap()
    };
    let ((fr, tr), (fg, tg)) = (run(true), run(false));
    let bits = |t: Tensor<Cpu, 2>| t.into_data().to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(fr), bits(fg), "final features differ");
    assert_eq!(tr.macs_per_image(), tg.macs_per_image());
    for (a, b) in tr.steps.into_iter().zip(tg.steps) {
        assert_eq!(bits(a.observation), bits(b.observation), "observation at {} differs", a.point.name);
    }
}

/// The ragged convolution's default (dense block, masked; what a backend without the kernel,
/// here the autodiff one, computes) and the CPU kernel agree, and both ignore input channels
/// beyond each image's width.
#[test]
fn ragged_kernel_equals_the_masked_default() {
    use burn::backend::Autodiff;
    use rlprune::nn::conv::conv2d_bias_act_ragged;
    let _guard = lock();
    let dev = Default::default();
    let (n, c, o) = (5, 12, 16);
    let x = Tensor::<Cpu, 4>::random([n, c, 9, 9], Distribution::Normal(0.0, 1.0), &dev);
    let w = Tensor::<Cpu, 4>::random([o, c, 3, 3], Distribution::Normal(0.0, 0.3), &dev);
    let b = Tensor::<Cpu, 1>::random([o], Distribution::Normal(0.0, 0.3), &dev);
    let (c_in, c_out) = ([12, 3, 9, 12, 6], [16, 4, 8, 12, 4]);
    let kernel = conv2d_bias_act_ragged(x.clone(), w.clone(), b.clone(), &c_in, &c_out, true, 1, 1);
    let default = conv2d_bias_act_ragged::<Autodiff<Cpu>>(
        Tensor::from_inner(x.clone()),
        Tensor::from_inner(w.clone()),
        Tensor::from_inner(b.clone()),
        &c_in,
        &c_out,
        true,
        1,
        1,
    )
    .inner();
    assert_eq!(kernel.dims(), [n, 16, 9, 9]);
    let d: f32 = (kernel.clone() - default).abs().max().into_scalar();
    assert!(d < 1e-5, "kernel vs masked default: max |diff| = {d}");
    // Image 1 reads 3 input channels: the others may hold anything.
    let mut garbage = x.clone().into_data().to_vec::<f32>().unwrap();
    for v in &mut garbage[c * 81 + 3 * 81..2 * c * 81] {
        *v = 1e3;
    }
    let x2 = Tensor::<Cpu, 4>::from_data(TensorData::new(garbage, [n, c, 9, 9]), &dev);
    let again = conv2d_bias_act_ragged(x2, w, b, &c_in, &c_out, true, 1, 1);
    assert_eq!(again.into_data().to_vec::<f32>().unwrap(), kernel.into_data().to_vec::<f32>().unwrap());
}

/// A ResNet with random BN statistics everywhere (eval-mode BN on the plain backend).
fn resnet(arch: &str) -> rlprune::backbones::resnet::ResNet<Cpu> {
    use rlprune::backbones::resnet::{ResNet, ResNetOptions};
    let dev = Default::default();
    let ctx = BuildContext { num_classes: 10, in_channels: 3, img_size: [8, 8] };
    let opts = ResNetOptions { width: 0.25 };
    let mut m = if arch == "resnet18" { ResNet::<Cpu>::resnet18(&opts, &ctx, &dev) } else { ResNet::<Cpu>::cifar(20, &opts, &ctx, &dev) };
    let mut bns = vec![&mut m.bn1];
    for b in m.layers.iter_mut().flatten() {
        bns.push(&mut b.bn1);
        bns.push(&mut b.bn2);
        if let Some(p) = b.downsample.as_mut() {
            bns.push(&mut p.bn);
        }
    }
    for bn in bns {
        let c = bn.num_features();
        bn.running_mean = burn::module::RunningState::new(Tensor::random([c], Distribution::Uniform(-0.2, 0.2), &dev));
        bn.running_var = burn::module::RunningState::new(Tensor::random([c], Distribution::Uniform(0.5, 1.5), &dev));
        bn.weight = burn::module::Param::from_tensor(Tensor::random([c], Distribution::Uniform(0.5, 1.5), &dev));
        bn.bias = burn::module::Param::from_tensor(Tensor::random([c], Distribution::Uniform(-0.1, 0.1), &dev));
    }
    m
}

/// ResNet reference: full blocks, each image's skipped inner channels zeroed after ReLU.
fn masked_resnet(m: &rlprune::backbones::resnet::ResNet<Cpu>, x: Tensor<Cpu, 4>, actions: &[Vec<usize>], k: usize) -> Tensor<Cpu, 2> {
    let dev = x.device();
    let mut h = relu(m.bn1.forward(m.conv1.forward(x)));
    if m.stem_pool {
        h = max_pool2d(h, [3, 3], [2, 2], [1, 1], [1, 1], false);
    }
    for (b, acts) in m.layers.iter().flatten().zip(actions) {
        let inner = relu(b.bn1.forward(b.conv1.forward(h.clone())));
        let [n, c, _, _] = inner.dims();
        let mut mask = vec![0f32; n * c];
        for (s, &a) in acts.iter().enumerate() {
            for ch in 0..channels_for(c, k, a) {
                mask[s * c + ch] = 1.0;
            }
        }
        let mask = Tensor::<Cpu, 2>::from_data(TensorData::new(mask, [n, c]), &dev).reshape([n, c, 1, 1]);
        h = relu(b.bn2.forward(b.conv2.forward(inner * mask)) + b.shortcut(h, false));
    }
    let [n, c, _, _] = h.dims();
    m.fc.forward(h.mean_dim(3).mean_dim(2).reshape([n, c]))
}

#[test]
fn resnet_routing_equals_masked_full_computation() {
    let _guard = lock();
    let dev = Default::default();
    for arch in ["resnet20-cifar", "resnet18"] {
        let mut m = resnet(arch);
        let n = 6;
        let x = Tensor::<Cpu, 4>::random([n, 3, 8, 8], Distribution::Normal(0.0, 1.0), &dev);
        let before = m.forward(x.clone());
        m.reorder_by_filter_norm().unwrap();
        assert!(max_abs_diff(before, m.forward(x.clone())) < 1e-4, "{arch}: reorder changed the logits");
        let points = m.prunable_convs();
        assert_eq!(points.len(), if arch == "resnet18" { 8 } else { 9 });
        // Decisions observe the block input: the residual stream's full width.
        let in_ch = rlprune::controllers::channel_router::ChannelRouter::<Cpu>::input_channels(3, &points);
        assert_eq!(in_ch, points.iter().map(|p| p.in_channels).collect::<Vec<_>>());
        let k = 4;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let actions: Vec<Vec<usize>> =
            points.iter().map(|_| (0..n).map(|_| rand::Rng::random_range(&mut rng, 1..=k)).collect()).collect();
        let mut ctl = Fixed { actions: actions.clone(), k };
        let (logits, trace) = m.forward_controlled(x.clone(), &mut ctl, Mode::Greedy, &mut rng).unwrap();
        let d = max_abs_diff(logits, masked_resnet(&m, x.clone(), &actions, k));
        assert!(d < 1e-4, "{arch}: routed vs masked: max |diff| = {d}");
        let mut full = Fixed { actions: vec![vec![k; n]; points.len()], k };
        let (lf, tf) = m.forward_controlled(x.clone(), &mut full, Mode::Greedy, &mut rng).unwrap();
        assert!(max_abs_diff(lf, m.forward(x)) < 1e-4, "{arch}: all-groups routing != forward");
        assert_eq!(tf.macs_per_image(), vec![tf.macs_full(); n]);
        assert_eq!(tf.macs_full(), points.iter().map(|p| p.macs).sum::<u64>());
        for (i, s) in trace.macs_per_image().iter().enumerate() {
            assert!(*s < tf.macs_full() || actions.iter().all(|a| a[i] == k));
        }
    }
}

#[test]
fn reorder_by_filter_norm_preserves_logits() {
    let _guard = lock();
    let mut m = small_cnn();
    let dev = Default::default();
    let x = Tensor::<Cpu, 4>::random([5, 1, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
    let before = m.forward(x.clone());
    rlprune::backbones::reorder_by_filter_norm(&mut m).unwrap();
    let after = m.forward(x);
    assert!(max_abs_diff(before, after) < 1e-5);
    // Norms are now non-increasing.
    for l in &m.features {
        let w = l.conv.weight.val();
        let o = w.dims()[0];
        let norms: Vec<f32> = w.powf_scalar(2.0).reshape([o as i32, -1]).sum_dim(1).into_data().to_vec().unwrap();
        assert!(norms.windows(2).all(|p| p[0] >= p[1]), "{norms:?}");
    }
}

#[test]
fn reinforce_solves_a_three_armed_bandit() {
    let _guard = lock();
    use burn::module::AutodiffModule;
    use burn::optim::GradientsParams;
    use rlprune::CpuAutodiff as Ad;
    use rlprune::controllers::ControllerConfig;
    use rlprune::controllers::channel_router::{ChannelRouter, RouterPolicy};
    use rlprune::rl::RlConfig;
    use rlprune::rl::reinforce::policy_gradient_loss;
    use rlprune::train::optim::{Optimizer, OptimizerConfig};

    let dev = Default::default();
    <Ad as burn::tensor::backend::Backend>::seed(&dev, 1);
    let ctl = ControllerConfig { groups: 3, hidden: 8, ..Default::default() };
    let cfg = RlConfig { baseline: "value".parse().unwrap(), entropy_bonus: 0.0, ..Default::default() };
    let mut router = ChannelRouter::<Ad>::new(&ctl, &[1], true, &dev);
    let mut opt =
        Optimizer::<Ad>::new(OptimizerConfig::Adamw { lr: 0.05, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.0 });
    let arm_reward = [0.2f32, 1.0, 0.5];
    let point = DecisionPoint { index: 0, name: "bandit".into(), groups: 3, out_channels: 3, macs_full: 0 };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let n = 32;
    for _ in 0..60 {
        let obs = Tensor::<rlprune::Cpu, 2>::ones([n, 1], &dev);
        let mut policy = RouterPolicy::new(router.valid());
        let d = policy.decide(&point, obs.clone(), Mode::Sample, &mut rng).unwrap();
        let returns = vec![d.actions.iter().map(|&a| arm_reward[a - 1]).collect::<Vec<f32>>()];
        let obs_ad = Tensor::<Ad, 2>::ones([n, 1], &dev);
        let evals = router.evaluate(&[obs_ad], std::slice::from_ref(&d.actions)).unwrap();
        let (loss, ..) = policy_gradient_loss(evals, &returns, None, &cfg).unwrap();
        let grads = GradientsParams::from_grads(loss.backward(), &router);
        router = opt.step(router, grads, 0.05, 1.0);
    }
    let mut policy = RouterPolicy::new(router.valid());
    let d = policy.decide(&point, Tensor::ones([4, 1], &dev), Mode::Greedy, &mut rng).unwrap();
    assert_eq!(d.actions, vec![2; 4], "greedy arm after training");
    let p_best: f32 = d.log_prob.exp().mean().into_scalar();
    assert!(p_best > 0.9, "probability of the best arm {p_best}");
}

fn synthetic_batch(n: usize, seed: u64) -> rlprune::data::Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let images: Vec<f32> = (0..n * 16 * 16).map(|_| rand::Rng::random_range(&mut rng, -1.0..1.0)).collect();
    let labels: Vec<i64> = (0..n).map(|i| (i % 10) as i64).collect();
    rlprune::data::Batch { images, labels, shape: [n, 1, 16, 16], indices: (0..n).collect() }
}

/// Per step of five: the sampled actions and the rewards, per decision and image.
#[allow(clippy::type_complexity)]
fn learner_rollouts(workers: usize, seed: u64) -> Vec<(Vec<Vec<usize>>, Vec<Vec<f32>>)> {
    use rlprune::backbones::AnyBackbone;
    use rlprune::controllers::ControllerConfig;
    use rlprune::rl::RlConfig;
    use rlprune::methods::rnp::RnpLearner;
    let dev = Default::default();
    <rlprune::CpuAutodiff as burn::tensor::backend::Backend>::seed(&dev, seed);
    let ctx = BuildContext { num_classes: 10, in_channels: 1, img_size: [16, 16] };
    let bb = SmallCnn::new(&SmallCnnOptions { channels: [8, 8, 16, 16] }, &ctx, &dev);
    let ctl = ControllerConfig { groups: 4, hidden: 16, ..Default::default() };
    let cfg = RlConfig { workers, alternate_every: 2, ..Default::default() };
    let mut l = RnpLearner::<rlprune::CpuAutodiff>::new(AnyBackbone::SmallCnn(bb), 1, &ctl, &cfg, seed);
    (0..5)
        .map(|s| {
            let r = l.step(&synthetic_batch(16, s), 1e-2, 1e-2).unwrap();
            assert!(r.stats.flops_ratio > 0.0 && r.stats.flops_ratio <= 1.0);
            (r.trajectory.actions, r.trajectory.rewards)
        })
        .collect()
}

#[test]
fn same_seed_and_workers_give_identical_rewards() {
    let _guard = lock();
    // Every image's sampled action at every layer, and every reward, of five steps.
    let a = learner_rollouts(2, 7);
    let b = learner_rollouts(2, 7);
    assert_eq!(a, b);
    let c = learner_rollouts(1, 7);
    let d = learner_rollouts(1, 7);
    assert_eq!(c, d);
    // The control: another seed samples other actions, so the equalities above are not
    // those of a policy that ignores its random stream.
    let other = learner_rollouts(2, 8);
    assert_ne!(a.iter().map(|(acts, _)| acts).collect::<Vec<_>>(), other.iter().map(|(acts, _)| acts).collect::<Vec<_>>());
}

/// A small RNP experiment on synthetic data (phase 1 trains a tiny CNN for one epoch); `rl` is
/// the body of its `[rl]` table.
fn rnp_experiment(name: &str, seed: u64, train_size: usize, rl: &str) -> String {
    format!(
        r#"name = "{name}"
seed = {seed}
[data]
dataset = "synthetic"
size = 16
train_size = {train_size}
test_size = 64
batch_size = 32
eval_batch_size = 64
[backbone]
arch = "small-cnn"
channels = [8, 8, 16, 16]
[train]
epochs = 1
optimizer = {{ kind = "sgd", lr = 0.05, momentum = 0.9 }}
[controller]
kind = "channel-router"
hidden = 8
[rl]
{rl}
[log]
every_steps = 2
histograms = false
"#
    )
}

/// `rl.finetune_epochs`: after router training, the backbone is fine-tuned under the frozen
/// router. The router phase is deterministic (seed, one worker), so a run with three fine-tuning
/// epochs repeats the run without them, then lowers the training loss and changes the backbone's
/// weights while the router stays bit for bit what the router phase left.
#[test]
fn finetune_phase_trains_the_backbone_after_the_router() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("rnp.toml");
    std::fs::write(
        &exp,
        // Four classes and 8 steps per epoch: enough for the fine-tuning loss to fall clearly.
        rnp_experiment("rnp-ft", 5, 256, "epochs = 1\nworkers = 1\nfinetune_lr = 0.05"),
    )
    .unwrap();
    let run = |ft: usize, out: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_rlprune"))
            .args(["train", "rnp.toml", "--out", out, "--set", "data.classes=4", "--set", &format!("rl.finetune_epochs={ft}")])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let metrics = std::fs::read_to_string(dir.path().join(out).join("metrics.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let weights = rlprune::import::read_safetensors(&dir.path().join(out).join("checkpoints/last.safetensors")).unwrap();
        (lines, weights)
    };
    let (plain, w_plain) = run(0, "plain");
    let (ft, w_ft) = run(3, "ft");
    let rl_line = |v: &[serde_json::Value]| v.iter().find(|l| l.get("rl_epoch").is_some()).cloned().unwrap();
    assert_eq!(rl_line(&plain)["reward_mean"], rl_line(&ft)["reward_mean"], "the router phase must be the same");
    assert!(plain.iter().all(|l| l.get("finetune_epoch").is_none()));
    let lines: Vec<&serde_json::Value> = ft.iter().filter(|l| l.get("finetune_epoch").is_some()).collect();
    assert_eq!(lines.len(), 3, "three fine-tuning epochs in metrics.jsonl");
    let losses: Vec<f64> = lines.iter().map(|l| l["train_loss"].as_f64().unwrap()).collect();
    println!("fine-tuning losses {losses:?}");
    assert!(losses[2] < 0.7 * losses[0], "fine-tuning did not lower the loss: {losses:?}");
    assert!((0.0..=1.0).contains(&lines[2]["test_flops_ratio"].as_f64().unwrap()));
    // The router after the router phase (the run without fine-tuning) is the router the
    // fine-tuned run keeps and pairs with its best backbone.
    let ck = |run: &str, file: &str| rlprune::import::read_safetensors(&dir.path().join(run).join("checkpoints").join(file)).unwrap();
    let router = ck("plain", "router.safetensors");
    for file in ["router.safetensors", "router_best.safetensors"] {
        let after = ck("ft", file);
        assert_eq!(router.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
        for (k, t) in &router {
            let same = t.data.iter().zip(&after[k].data).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "ft/{file} {k}: the router changed during fine-tuning");
        }
    }
    let changed = w_plain
        .iter()
        .filter(|(k, a)| a.data.iter().zip(&w_ft[k.as_str()].data).any(|(x, y)| (x - y).abs() > 1e-6))
        .count();
    assert!(changed > 0, "fine-tuning left every backbone tensor unchanged");
    assert!(dir.path().join("ft/checkpoints/router_best.safetensors").is_file());
}

/// An RNP run stopped after its first router epoch, resumed, stopped again in its fine-tuning
/// phase and resumed to the end, and one stopped between phase 1 and its first router epoch,
/// end with the same router, backbone and metrics as the run that
/// never stopped: the state is the weights, both learners' optimizer buffers and step counts,
/// the step (from which every rollout seed derives) and the mean budget's price λ.
#[test]
fn interrupted_rnp_run_resumes_exactly() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rnp.toml"),
        rnp_experiment(
            "rnp-resume",
            11,
            96,
            "epochs = 2\nworkers = 1\nfinetune_epochs = 2\nfinetune_lr = 0.05\nbudget = \"mean\"\nflops_target = 0.6\nprice_lr = 5.0",
        ),
    )
    .unwrap();
    let train = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rlprune")).arg("train").arg("rnp.toml").args(args).current_dir(dir.path()).output().unwrap()
    };
    let o = train(&["--out", "full"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let o = train(&["--out", "cut", "--stop-after-epoch", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("as asked") && err.contains("--resume"), "a stopped run says how to continue: {err}");
    assert!(!dir.path().join("cut/checkpoints/finetune.optim.safetensors").exists(), "stopped after the first router epoch");
    let o = train(&["--resume", "cut", "--set", "rl.algorithm=\"ppo\""]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("algorithm 'reinforce'"), "resuming with another algorithm: {err}");
    let o = train(&["--resume", "cut", "--stop-after-epoch", "3"]);
    assert!(o.status.success(), "stops again after router epoch 2 and fine-tuning epoch 1");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cut/checkpoints/rnp_state.json")).unwrap()).unwrap();
    assert_eq!((state["rl_epochs"].as_u64(), state["finetune_epochs"].as_u64()), (Some(2), Some(1)));
    let price = state["price"].as_f64().unwrap();
    assert!(price != 0.1, "the price moved away from compute_penalty: {price}");
    let o = train(&["--resume", "cut"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Stopped at the phase boundary: the backbone is trained, no router exists yet.
    let o = train(&["--out", "boundary", "--stop-after-epoch", "0"]);
    assert!(o.status.success(), "stops after phase 1");
    assert!(dir.path().join("boundary/backbone/checkpoints/last.safetensors").is_file());
    assert!(!dir.path().join("boundary/checkpoints/router.safetensors").exists(), "no router epoch ran");
    let o = train(&["--resume", "boundary"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let full = dir.path().join("full/checkpoints");
    for run in ["cut", "boundary"] {
        let files = ["last.safetensors", "router.safetensors", "best.safetensors", "router_best.safetensors"];
        common::assert_same_tensors(&full, &dir.path().join(run).join("checkpoints"), &files);
    }
    let results = |run: &str| epoch_results(&dir.path().join(run), &["test_top1", "reward_mean", "price"]);
    assert_eq!(results("full"), results("cut"));
    assert_eq!(results("full"), results("boundary"));
    // Phase 1 (the supervised backbone) ran once, not again on each resume.
    let phase1_epochs = |run: &str| std::fs::read_to_string(dir.path().join(run).join("backbone/metrics.jsonl")).unwrap().lines().count();
    assert_eq!(phase1_epochs("cut"), phase1_epochs("full"));
    assert_eq!(results("full").len(), 4);
}

/// A DQN run stopped inside its router epochs resumes bit for bit: its replay buffer, target
/// network and update count are checkpointed with the router, so the resumed run ends where the
/// uninterrupted one does (router, backbone, metrics); stopping in the fine-tuning epochs too.
#[test]
fn dqn_runs_resume_inside_and_after_their_router_epochs() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rnp.toml"),
        rnp_experiment("rnp-dqn", 3, 64, "algorithm = \"dqn\"\nepochs = 3\nworkers = 1\nfinetune_epochs = 2\nfinetune_lr = 0.05\n[rl.dqn]\ntarget_sync_every = 3"),
    )
    .unwrap();
    let train = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rlprune")).arg("train").arg("rnp.toml").args(args).current_dir(dir.path()).output().unwrap()
    };
    let o = train(&["--out", "full"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = train(&["--out", "inside", "--stop-after-epoch", "1"]);
    assert!(o.status.success(), "stopped after router epoch 1 of 3");
    assert!(dir.path().join("inside/checkpoints/dqn_replay.safetensors").is_file());
    let o = train(&["--resume", "inside", "--stop-after-epoch", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = train(&["--resume", "inside", "--stop-after-epoch", "4"]);
    assert!(o.status.success(), "stopped after the router epochs and fine-tuning epoch 1");
    let o = train(&["--resume", "inside"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("inside/checkpoints/rnp_state.json")).unwrap()).unwrap();
    assert_eq!((state["rl_epochs"].as_u64(), state["finetune_epochs"].as_u64()), (Some(3), Some(2)));
    let files = ["last.safetensors", "router.safetensors", "best.safetensors", "router_best.safetensors", "dqn_target.safetensors"];
    common::assert_same_tensors(&dir.path().join("full/checkpoints"), &dir.path().join("inside/checkpoints"), &files);
    let results = |run: &str| epoch_results(&dir.path().join(run), &["test_top1", "reward_mean", "algorithm_stats.td_loss"]);
    assert_eq!(results("full").len(), 5);
    assert_eq!(results("full"), results("inside"));
}

/// `rlprune eval` of an RNP run reports every image's widths (the distinct width paths with
/// their shares) and the compute per class, and `rlprune visualize` of the run draws the channel
/// use per layer and class as a PNG, with the numbers in `channel_use.json`.
#[test]
fn eval_and_visualize_show_per_image_decisions() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rnp.toml"),
        rnp_experiment("rnp-vis", 3, 128, "epochs = 1\nworkers = 1\nentropy_bonus = 0.5\nbackbone_widths = \"policy-and-random\""),
    )
    .unwrap();
    let rlprune = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_rlprune")).args(args).current_dir(dir.path()).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    rlprune(&["train", "rnp.toml", "--out", "run", "--set", "data.classes=4"]);
    let report: serde_json::Value = serde_json::from_str(&rlprune(&["eval", "run", "--json"])).unwrap();
    let paths = report["width_paths"].as_array().unwrap();
    let shares: Vec<f64> = paths.iter().map(|p| p["share"].as_f64().unwrap()).collect();
    assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9, "shares {shares:?}");
    assert!(shares.windows(2).all(|w| w[0] >= w[1]), "most taken first: {shares:?}");
    assert!(paths.iter().all(|p| p["groups"].as_array().unwrap().len() == 4));
    // The paths' FLOPs, weighted by their shares, are the split's FLOPs ratio.
    let mean: f64 = paths.iter().map(|p| p["share"].as_f64().unwrap() * p["flops_ratio"].as_f64().unwrap()).sum();
    assert!((mean - report["flops_ratio"].as_f64().unwrap()).abs() < 1e-9);
    let classes = report["per_class"].as_array().unwrap();
    assert_eq!(classes.iter().map(|c| c["images"].as_u64().unwrap()).sum::<u64>(), 64);
    let top1: f64 = classes.iter().map(|c| c["top1"].as_f64().unwrap() * c["images"].as_f64().unwrap()).sum::<f64>() / 64.0;
    assert!((top1 - report["top1"].as_f64().unwrap()).abs() < 1e-9);
    let table = rlprune(&["eval", "run"]);
    assert!(table.contains("width paths (groups per routed layer)") && table.contains("class "), "{table}");

    let out = rlprune(&["visualize", "run", "--out", "vis"]);
    assert!(out.contains("channel_use.png"), "{out}");
    let png = image::open(dir.path().join("vis/channel_use.png")).unwrap();
    assert!(png.width() > 200 && png.height() > 4 * 20, "{}×{}", png.width(), png.height());
    let uses: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("vis/channel_use.json")).unwrap()).unwrap();
    let share = uses["share"].as_array().unwrap();
    assert_eq!(share.len(), 4, "one table per routed layer");
    for layer in share {
        for row in layer.as_array().unwrap() {
            let row: Vec<f64> = row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(row.len(), 4, "one share per width");
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{row:?}");
        }
    }
    let class_flops: Vec<f64> = uses["class_flops_ratio"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    for (c, f) in classes.iter().zip(&class_flops) {
        assert!((c["flops_ratio"].as_f64().unwrap() - f).abs() < 1e-9);
    }
}

/// Per router or fine-tuning epoch of a run's `metrics.jsonl`, the values at `keys` (dotted
/// paths into the line's JSON).
fn epoch_results(run: &Path, keys: &[&str]) -> Vec<Vec<Option<f64>>> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l.get("rl_epoch").is_some() || l.get("finetune_epoch").is_some())
        .map(|l| keys.iter().map(|k| k.split('.').try_fold(&l, |v, part| v.get(part)).and_then(|v| v.as_f64())).collect())
        .collect()
}
