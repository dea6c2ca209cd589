//! PPO (Schulman et al., 2017) over the layer sequence: each image is an episode whose steps are
//! the decision layers, with the compute price as the reward of every step and the accuracy
//! term added at the last one. Advantages come from GAE(γ, λ) with the policy's value head as
//! the critic (V after the last layer is 0). Each rollout batch is used for `[rl.ppo] epochs` passes
//! of shuffled minibatches of whole episodes (the policy is recurrent), optimising the clipped
//! surrogate plus the value loss minus the entropy bonus.
//!
//! The rollout's log-probabilities and values are recomputed by the learner before the first
//! pass: the learner's policy is exactly the snapshot the workers sampled with (one update
//! per rollout batch is published), so nothing extra travels over the channel.

use anyhow::{Result, bail};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::RlConfig;
use super::reinforce::UpdateStats;
use super::rollout::Trajectory;
use crate::controllers::{SequencePolicy, StepEvaluation};
use crate::train::optim::Optimizer;

fn host(t: Tensor<impl burn::tensor::backend::Backend, 1>) -> Result<Vec<f32>> {
    t.into_data().convert::<f32>().to_vec().map_err(|e| anyhow::anyhow!("PPO readback: {e:?}"))
}

/// Generalised advantage estimates and value targets `[T][N]` from per-decision rewards and
/// values (`V_T = 0`): `δ_t = r_t + γ V_{t+1} − V_t`, `A_t = δ_t + γλ A_{t+1}`, `R_t = A_t + V_t`.
pub fn gae(rewards: &[Vec<f32>], values: &[Vec<f32>], gamma: f32, lambda: f32) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let t_len = rewards.len();
    let n = rewards.first().map(|r| r.len()).unwrap_or(0);
    let mut adv = vec![vec![0f32; n]; t_len];
    let mut ret = vec![vec![0f32; n]; t_len];
    for i in 0..n {
        let mut next_adv = 0f32;
        let mut next_value = 0f32;
        for t in (0..t_len).rev() {
            let delta = rewards[t][i] + gamma * next_value - values[t][i];
            next_adv = delta + gamma * lambda * next_adv;
            adv[t][i] = next_adv;
            ret[t][i] = next_adv + values[t][i];
            next_value = values[t][i];
        }
    }
    (adv, ret)
}

/// Advantages to zero mean and unit variance over all decisions of the batch.
pub fn normalize(adv: &mut [Vec<f32>]) {
    let count = adv.iter().map(|r| r.len()).sum::<usize>().max(1) as f32;
    let mean = adv.iter().flatten().sum::<f32>() / count;
    let var = adv.iter().flatten().map(|a| (a - mean).powi(2)).sum::<f32>() / count;
    let std = var.sqrt().max(1e-6);
    adv.iter_mut().flatten().for_each(|a| *a = (*a - mean) / std);
}

/// PPO's clipped surrogate per sample, `min(r·A, clip(r, 1−ε, 1+ε)·A)` with
/// `r = exp(log_prob − old_log_prob)`; returns it with `log r`.
pub fn clipped_surrogate<B: burn::tensor::backend::Backend>(
    log_prob: Tensor<B, 1>,
    old_log_prob: Tensor<B, 1>,
    advantage: Tensor<B, 1>,
    eps: f32,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let log_ratio = log_prob - old_log_prob;
    let ratio = log_ratio.clone().exp();
    let surrogate = (ratio.clone() * advantage.clone()).min_pair(ratio.clamp(1.0 - eps, 1.0 + eps) * advantage);
    (surrogate, log_ratio)
}

/// One PPO update of the policy from a rollout batch. `shuffle_seed` orders the minibatches.
pub fn ppo_update<B: AutodiffBackend, P: SequencePolicy<B> + AutodiffModule<B>>(
    mut policy_net: P,
    optim: &mut Optimizer<B>,
    traj: &Trajectory,
    cfg: &RlConfig,
    lr: f64,
    device: &B::Device,
    shuffle_seed: u64,
) -> Result<(P, UpdateStats)> {
    if !policy_net.has_value_head() {
        bail!("PPO needs a policy with a value head");
    }
    let n = traj.n;
    let t_len = traj.actions.len();
    if n == 0 || t_len == 0 {
        bail!("PPO: empty trajectory");
    }
    // The behaviour policy's log-probs and the critic's values, without a graph.
    let all: Vec<usize> = (0..n).collect();
    let mut old_lp = Vec::with_capacity(t_len);
    let mut values = Vec::with_capacity(t_len);
    for step in policy_net.evaluate(&traj.observation_rows::<B>(&all, device), &traj.actions)? {
        old_lp.push(host(step.log_prob.detach())?);
        values.push(host(step.value.ok_or_else(|| anyhow::anyhow!("the policy lost its value head"))?.detach())?);
    }
    let (mut adv, ret) = gae(&traj.rewards, &values, cfg.gamma as f32, cfg.ppo.gae_lambda as f32);
    if cfg.normalize_advantages {
        normalize(&mut adv);
    }

    let eps = cfg.ppo.clip as f32;
    let mut rng = ChaCha8Rng::seed_from_u64(shuffle_seed);
    let mut order = all;
    let (mut updates, mut clipped, mut pairs) = (0usize, 0usize, 0usize);
    let (mut sum_policy, mut sum_value, mut sum_entropy, mut sum_kl) = (0f64, 0f64, 0f64, 0f64);
    let scalar = |t: Tensor<B, 1>| t.into_scalar().elem::<f64>();
    for _ in 0..cfg.ppo.epochs {
        order.shuffle(&mut rng);
        for rows in order.chunks(cfg.minibatch) {
            let m = rows.len();
            let evals = policy_net.evaluate(&traj.observation_rows::<B>(rows, device), &traj.action_rows(rows))?;
            let pick = |src: &[Vec<f32>], t: usize| {
                let v: Vec<f32> = rows.iter().map(|&i| src[t][i]).collect();
                Tensor::<B, 1>::from_data(TensorData::new(v, [m]), device)
            };
            let mut policy = Tensor::<B, 1>::zeros([1], device);
            let mut value = Tensor::<B, 1>::zeros([1], device);
            let mut entropy = Tensor::<B, 1>::zeros([1], device);
            let mut kl = 0f64;
            for (t, StepEvaluation { log_prob: lp, entropy: ent, value: v }) in evals.into_iter().enumerate() {
                let (surrogate, log_ratio) = clipped_surrogate(lp, pick(&old_lp, t), pick(&adv, t), eps);
                let ratio = log_ratio.clone().exp();
                policy = policy - surrogate.mean();
                let v = v.ok_or_else(|| anyhow::anyhow!("the policy lost its value head"))?;
                value = value + (v - pick(&ret, t)).powf_scalar(2.0).mean();
                entropy = entropy + ent.mean();
                let r = host(ratio.detach())?;
                let lr_host = host(log_ratio.detach())?;
                clipped += r.iter().filter(|&&x| (x - 1.0).abs() > eps).count();
                pairs += m;
                // KL(old ‖ new) ≈ E[(ratio − 1) − log ratio] (non-negative, low variance).
                kl += r.iter().zip(&lr_host).map(|(&x, &l)| (x - 1.0 - l) as f64).sum::<f64>() / m as f64;
            }
            let tl = t_len as f64;
            let (policy, value, entropy) = (policy / tl, value / tl, entropy / tl);
            let loss = policy.clone() + value.clone() * cfg.value_coef - entropy.clone() * cfg.entropy_bonus;
            let grads = GradientsParams::from_grads(loss.backward(), &policy_net);
            policy_net = optim.step(policy_net, grads, lr, 1.0);
            sum_policy += scalar(policy.detach());
            sum_value += scalar(value.detach());
            sum_entropy += scalar(entropy.detach());
            sum_kl += kl / tl;
            updates += 1;
        }
    }
    let u = updates.max(1) as f64;
    let mut stats = traj.stats();
    stats.policy_loss = sum_policy / u;
    stats.value_loss = sum_value / u;
    stats.entropy = sum_entropy / u;
    stats.approx_kl = sum_kl / u;
    stats.clip_fraction = clipped as f64 / pairs.max(1) as f64;
    Ok((policy_net, stats))
}
