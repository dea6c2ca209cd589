//! Reinforcement learning of controllers: `[rl]` configuration, rewards, REINFORCE, and the
//! parallel rollout workers (actor–learner).

pub mod reinforce;
pub mod reward;
pub mod rollout;
pub mod train;

use serde::{Deserialize, Serialize};

/// Algorithms this build implements.
pub const ALGORITHMS: &[&str] = &["reinforce"];

/// `[rl]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlConfig {
    /// `"reinforce"`.
    #[serde(default = "d_algorithm")]
    pub algorithm: String,
    /// Epochs of router training (alternating with backbone fine-tuning).
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Price p of compute: every decision adds `-p * a/k`.
    #[serde(default = "d_penalty")]
    pub compute_penalty: f64,
    /// `"neg-ce"` (`-alpha * cross_entropy`, the paper) or `"correct"` (`+1` / `-gamma_wrong`).
    #[serde(default = "d_acc")]
    pub accuracy_reward: String,
    #[serde(default = "d_one")]
    pub alpha: f64,
    #[serde(default = "d_one")]
    pub gamma_wrong: f64,
    /// Weight of the policy entropy bonus.
    #[serde(default = "d_entropy")]
    pub entropy_bonus: f64,
    /// `"value"` (learned, MSE) or `"self-critical"` (the greedy rollout's return).
    #[serde(default = "d_baseline")]
    pub baseline: String,
    /// Normalise advantages over the batch.
    #[serde(default = "d_true")]
    pub normalize_advantages: bool,
    /// Weight of the value loss.
    #[serde(default = "d_half")]
    pub value_coef: f64,
    /// Rollout worker threads.
    #[serde(default = "d_workers")]
    pub workers: usize,
    /// Router learning rate (Adam).
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Backbone fine-tuning learning rate (SGD, momentum 0.9).
    #[serde(default = "d_blr")]
    pub backbone_lr: f64,
    /// Fine-tune the backbone under sampled policies once every this many router updates
    /// (0 = never).
    #[serde(default = "d_alt")]
    pub alternate_every: usize,
}

fn d_algorithm() -> String {
    "reinforce".into()
}
fn d_epochs() -> usize {
    2
}
fn d_penalty() -> f64 {
    0.1
}
fn d_acc() -> String {
    "neg-ce".into()
}
fn d_one() -> f64 {
    1.0
}
fn d_entropy() -> f64 {
    0.01
}
fn d_baseline() -> String {
    "value".into()
}
fn d_true() -> bool {
    true
}
fn d_half() -> f64 {
    0.5
}
fn d_workers() -> usize {
    1
}
fn d_lr() -> f64 {
    1e-3
}
fn d_blr() -> f64 {
    1e-3
}
fn d_alt() -> usize {
    2
}

impl Default for RlConfig {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("all [rl] keys have defaults"))
    }
}

impl RlConfig {
    /// Problems as (key relative to `[rl]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if !ALGORITHMS.contains(&self.algorithm.as_str()) {
            v.push((
                "algorithm".into(),
                format!("'{}' is not available in this build (available: {})", self.algorithm, ALGORITHMS.join(", ")),
            ));
        }
        if self.epochs == 0 {
            v.push(("epochs".into(), "must be > 0, got 0".into()));
        }
        if !(self.compute_penalty >= 0.0 && self.compute_penalty.is_finite()) {
            v.push(("compute_penalty".into(), format!("must be >= 0, got {}", self.compute_penalty)));
        }
        if !["neg-ce", "correct"].contains(&self.accuracy_reward.as_str()) {
            v.push((
                "accuracy_reward".into(),
                format!("must be \"neg-ce\" or \"correct\", got \"{}\"", self.accuracy_reward),
            ));
        }
        for (k, x) in [
            ("alpha", self.alpha),
            ("gamma_wrong", self.gamma_wrong),
            ("entropy_bonus", self.entropy_bonus),
            ("value_coef", self.value_coef),
        ] {
            if !(x >= 0.0 && x.is_finite()) {
                v.push((k.into(), format!("must be >= 0, got {x}")));
            }
        }
        if !["value", "self-critical"].contains(&self.baseline.as_str()) {
            v.push(("baseline".into(), format!("must be \"value\" or \"self-critical\", got \"{}\"", self.baseline)));
        }
        if !(1..=64).contains(&self.workers) {
            v.push(("workers".into(), format!("must be in 1..=64, got {}", self.workers)));
        }
        for (k, x) in [("lr", self.lr), ("backbone_lr", self.backbone_lr)] {
            if !(x > 0.0 && x.is_finite()) {
                v.push((k.into(), format!("must be > 0, got {x}")));
            }
        }
        v
    }
}
