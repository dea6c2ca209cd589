//! What reinforcement learning needs from a policy. The algorithms in `rl` (REINFORCE, PPO,
//! DQN) and the rollout workers are generic over [`SequencePolicy`]: a recurrent policy over a
//! backbone's decision points that re-evaluates stored episodes (under autodiff, for the
//! learner) and acts as a [`Controller`] in a controlled forward pass (for the rollouts). RNP's
//! channel router is one; a new policy implements this trait and trains with every algorithm.

use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::Controller;

/// What a policy computes at one decision, for the learner.
pub struct StepOutput<B: Backend> {
    /// The head's raw output `[N, k]`: policy logits, or Q-values under DQN.
    pub scores: Tensor<B, 2>,
    pub log_probs: Tensor<B, 2>,
    /// The value head's estimate `[N]`, for policies that have one.
    pub value: Option<Tensor<B, 1>>,
}

/// One decision of a stored episode batch as the current policy sees it: the log-probability of
/// the stored actions `[N]`, the policy's entropy `[N]` and the value `[N]` if it has a value head.
pub struct StepEvaluation<B: Backend> {
    pub log_prob: Tensor<B, 1>,
    pub entropy: Tensor<B, 1>,
    pub value: Option<Tensor<B, 1>>,
}

/// How [`Mode::Sample`](super::Mode::Sample) picks actions from the head's output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActionRule {
    /// Sample from softmax(head) (policy-gradient algorithms).
    Softmax,
    /// A uniformly random action with probability ε, else argmax of the head (DQN).
    EpsilonGreedy(f64),
}

/// A recurrent policy over the decision points of a controlled forward pass.
pub trait SequencePolicy<B: Backend>: Module<B> + 'static {
    /// Actions per decision: `1..=groups()`.
    fn groups(&self) -> usize;

    /// Whether [`StepOutput::value`] is present (the learned baseline, PPO's critic).
    fn has_value_head(&self) -> bool;

    /// Runs the policy over a stored observation sequence (`[N, C_t]` per decision) from its
    /// initial state and returns every step's output.
    fn unroll(&self, observations: &[Tensor<B, 2>]) -> Result<Vec<StepOutput<B>>>;

    /// The controller that acts with this policy in a forward pass, picking actions by `rule`.
    fn actor(&self, rule: ActionRule) -> Box<dyn Controller<B>>;

    /// Re-evaluates a stored episode batch: per decision, the stored `actions` (1-based, per
    /// image) under the current policy.
    fn evaluate(&self, observations: &[Tensor<B, 2>], actions: &[Vec<usize>]) -> Result<Vec<StepEvaluation<B>>> {
        if actions.len() != observations.len() {
            bail!("{} observation steps for {} action steps", observations.len(), actions.len());
        }
        Ok(self
            .unroll(observations)?
            .into_iter()
            .zip(actions)
            .map(|(s, acts)| {
                let (log_prob, entropy) = pick(s.log_probs, acts, &s.scores.device());
                StepEvaluation { log_prob, entropy, value: s.value }
            })
            .collect())
    }
}

/// Log-probs of `actions` (1-based) and the entropy, both `[N]`.
pub fn pick<B: Backend>(log_probs: Tensor<B, 2>, actions: &[usize], device: &B::Device) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let n = actions.len();
    let idx: Vec<i64> = actions.iter().map(|&a| a as i64 - 1).collect();
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(idx, [n, 1]), device);
    let lp = log_probs.clone().gather(1, idx).reshape([n]);
    let ent = (log_probs.clone().exp() * log_probs).sum_dim(1).reshape([n]).neg();
    (lp, ent)
}
