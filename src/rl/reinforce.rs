//! REINFORCE with a learned value baseline or a self-critical (greedy rollout) baseline,
//! advantage normalisation and an entropy bonus.
//!
//! The learner never runs the backbone: it re-evaluates the policy (with autodiff) on the
//! stored per-decision observations to get the log-probabilities of the stored actions.

use anyhow::{Result, bail};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor, TensorData};

use super::RlConfig;
use super::rollout::Trajectory;
use crate::controllers::{SequencePolicy, StepEvaluation};
use crate::train::optim::Optimizer;

/// What one update saw and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpdateStats {
    /// Mean and std over images of the episode return.
    pub reward_mean: f64,
    pub reward_std: f64,
    pub accuracy_term: f64,
    pub top1: f64,
    /// Decision-layer MACs spent / full.
    pub flops_ratio: f64,
    pub entropy: f64,
    pub value_loss: f64,
    pub policy_loss: f64,
    /// PPO: fraction of (image, decision) pairs whose ratio left [1-ε, 1+ε], and the
    /// approximate KL(old ‖ new), both averaged over the minibatch updates.
    pub clip_fraction: f64,
    pub approx_kl: f64,
    /// DQN: exploration rate of the rollout, TD loss (Huber) and mean Q of the taken actions.
    pub epsilon: f64,
    pub td_loss: f64,
    pub q_mean: f64,
}

impl UpdateStats {
    /// The algorithm-specific scalars for TensorBoard (`rl/<name>`).
    pub fn algorithm_scalars(&self, algorithm: super::Algorithm) -> Vec<(&'static str, f64)> {
        match algorithm {
            super::Algorithm::Ppo => vec![
                ("value_loss", self.value_loss),
                ("policy_loss", self.policy_loss),
                ("clip_fraction", self.clip_fraction),
                ("approx_kl", self.approx_kl),
            ],
            super::Algorithm::Dqn => vec![("epsilon", self.epsilon), ("td_loss", self.td_loss), ("q_mean", self.q_mean)],
            super::Algorithm::Reinforce => vec![("value_loss", self.value_loss), ("policy_loss", self.policy_loss)],
        }
    }
}

/// The REINFORCE loss from per-decision `(log_prob [N], entropy [N], value [N]?)` and returns
/// `[T][N]`. `baseline`: explicit per-decision baselines (self-critical); else the value
/// predictions (detached) when present; else none. Returns the loss and (entropy, value loss,
/// policy loss).
pub fn policy_gradient_loss<B: AutodiffBackend>(
    evals: Vec<StepEvaluation<B>>,
    returns: &[Vec<f32>],
    baseline: Option<&[Vec<f32>]>,
    cfg: &RlConfig,
) -> Result<(Tensor<B, 1>, f64, f64, f64)> {
    if evals.len() != returns.len() || evals.is_empty() {
        bail!("REINFORCE: {} evaluated decisions for {} return rows", evals.len(), returns.len());
    }
    let device = evals[0].log_prob.device();
    let n = returns[0].len();
    // Advantages on the host.
    let mut adv: Vec<Vec<f32>> = Vec::with_capacity(returns.len());
    for (t, StepEvaluation { value, .. }) in evals.iter().enumerate() {
        let b: Vec<f32> = match (baseline, value) {
            (Some(b), _) => b[t].clone(),
            (None, Some(v)) => {
                v.clone().detach().into_data().convert::<f32>().to_vec().unwrap_or_else(|_| vec![0.0; n])
            }
            (None, None) => vec![0.0; n],
        };
        adv.push(returns[t].iter().zip(&b).map(|(r, b)| r - b).collect());
    }
    if cfg.normalize_advantages {
        let all: Vec<f32> = adv.iter().flatten().copied().collect();
        let mean = all.iter().sum::<f32>() / all.len() as f32;
        let var = all.iter().map(|a| (a - mean).powi(2)).sum::<f32>() / all.len() as f32;
        let std = var.sqrt().max(1e-6);
        for row in adv.iter_mut() {
            for a in row.iter_mut() {
                *a = (*a - mean) / std;
            }
        }
    }
    let t_len = evals.len() as f64;
    let mut policy = Tensor::<B, 1>::zeros([1], &device);
    let mut entropy = Tensor::<B, 1>::zeros([1], &device);
    let mut value_loss = Tensor::<B, 1>::zeros([1], &device);
    let mut has_value = false;
    for (t, StepEvaluation { log_prob: lp, entropy: ent, value }) in evals.into_iter().enumerate() {
        let a = Tensor::<B, 1>::from_data(TensorData::new(adv[t].clone(), [n]), &device);
        policy = policy - (lp * a).mean();
        entropy = entropy + ent.mean() / t_len;
        if let Some(v) = value {
            let r = Tensor::<B, 1>::from_data(TensorData::new(returns[t].clone(), [n]), &device);
            value_loss = value_loss + (v - r).powf_scalar(2.0).mean() / t_len;
            has_value = true;
        }
    }
    let mut loss = policy.clone() - entropy.clone() * cfg.entropy_bonus;
    if has_value && baseline.is_none() {
        loss = loss + value_loss.clone() * cfg.value_coef;
    }
    let scalar = |t: Tensor<B, 1>| t.into_scalar().elem::<f64>();
    Ok((loss, scalar(entropy.detach()), scalar(value_loss.detach()), scalar(policy.detach())))
}

/// One learner update of the policy from a (merged) trajectory batch.
pub fn learner_step<B: AutodiffBackend, P: SequencePolicy<B> + AutodiffModule<B>>(
    policy: P,
    optim: &mut Optimizer<B>,
    traj: &Trajectory,
    cfg: &RlConfig,
    lr: f64,
    device: &B::Device,
) -> Result<(P, UpdateStats)> {
    let obs: Vec<Tensor<B, 2>> = traj
        .observations
        .iter()
        .map(|(data, c)| Tensor::from_data(TensorData::new(data.clone(), [traj.n, *c]), device))
        .collect();
    let evals = policy.evaluate(&obs, &traj.actions)?;
    let returns = super::reward::returns_to_go(&traj.rewards);
    let self_critical = cfg.baseline == super::Baseline::SelfCritical;
    let sc = if self_critical { traj.greedy_returns.as_deref() } else { None };
    if self_critical && sc.is_none() {
        bail!("rl.baseline = \"self-critical\" needs greedy rollouts in the trajectory");
    }
    let (loss, entropy, value_loss, policy_loss) = policy_gradient_loss(evals, &returns, sc, cfg)?;
    let grads = GradientsParams::from_grads(loss.backward(), &policy);
    let policy = optim.step(policy, grads, lr, 1.0);
    let mut stats = traj.stats();
    stats.entropy = entropy;
    stats.value_loss = value_loss;
    stats.policy_loss = policy_loss;
    Ok((policy, stats))
}
