//! Controllers: agents that decide, at each decision point of a backbone, how much of the next
//! layer to compute. [`channel_router`] is RNP's recurrent channel-group router;
//! [`token_predictor`] is DynamicViT's token keep predictor (its decisions are token sets, so it
//! has its own interface there rather than the channel-group [`Controller`]).
//!
//! The backbone side lives in [`exec`]: a conv-BN-ReLU stack run under a controller with real
//! sliced execution (samples grouped by action, sliced weights per group).

pub mod channel_router;
pub mod exec;
pub mod token_predictor;

use anyhow::Result;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How a controller picks its actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sample from the policy (training rollouts).
    Sample,
    /// The most probable action (evaluation, self-critical baseline).
    Greedy,
}

/// One place in a backbone where a controller decides.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionPoint {
    /// 0-based position in execution order.
    pub index: usize,
    /// Name of the controlled layer (e.g. `features.2.conv`).
    pub name: String,
    /// Number of channel groups k: actions are `1..=k` groups computed.
    pub groups: usize,
    pub out_channels: usize,
    /// MACs of the full layer for one image.
    pub macs_full: u64,
}

impl DecisionPoint {
    /// Output channels computed when the first `action` of `groups` groups run (the last group
    /// takes the remainder).
    pub fn channels_for(&self, action: usize) -> usize {
        channels_for(self.out_channels, self.groups, action)
    }
}

/// Channels of the first `action` groups when `out` channels form `groups` groups.
pub fn channels_for(out: usize, groups: usize, action: usize) -> usize {
    let groups = groups.clamp(1, out.max(1));
    let action = action.clamp(1, groups);
    if action == groups { out } else { (out / groups) * action }
}

/// A controller's answer for a batch at one decision point.
#[derive(Debug, Clone)]
pub struct Decision<B: Backend> {
    /// Per image, the number of groups to compute, in `1..=k`.
    pub actions: Vec<usize>,
    /// Log-probability of each image's action, `[N]`.
    pub log_prob: Tensor<B, 1>,
    /// Policy entropy per image, `[N]`.
    pub entropy: Tensor<B, 1>,
}

/// An agent called at every decision point of a controlled forward pass.
pub trait Controller<B: Backend> {
    /// Number of channel groups per decision point (k).
    fn groups(&self) -> usize;
    /// Starts a new batch of `batch` images (clears recurrent state).
    fn reset(&mut self, batch: usize);
    /// Decides for every image of the batch. `observation` is the decision layer's input,
    /// global-average-pooled: `[N, C_in]` (channels that were skipped upstream are zero).
    fn decide(
        &mut self,
        point: &DecisionPoint,
        observation: Tensor<B, 2>,
        mode: Mode,
        rng: &mut ChaCha8Rng,
    ) -> Result<Decision<B>>;
}

/// One decision as it happened.
#[derive(Debug, Clone)]
pub struct TraceStep<B: Backend> {
    pub point: DecisionPoint,
    /// `[N, C_in]`, detached.
    pub observation: Tensor<B, 2>,
    pub actions: Vec<usize>,
    pub log_prob: Tensor<B, 1>,
    /// MACs actually spent by this layer, per image.
    pub macs: Vec<u64>,
}

/// Everything a controlled forward pass decided and spent.
#[derive(Debug, Clone)]
pub struct Trace<B: Backend> {
    pub steps: Vec<TraceStep<B>>,
}

impl<B: Backend> Trace<B> {
    /// MACs spent per image over all decision layers.
    pub fn macs_per_image(&self) -> Vec<u64> {
        let n = self.steps.first().map(|s| s.macs.len()).unwrap_or(0);
        let mut out = vec![0u64; n];
        for s in &self.steps {
            for (o, m) in out.iter_mut().zip(&s.macs) {
                *o += m;
            }
        }
        out
    }

    /// Full-model MACs of the decision layers for one image.
    pub fn macs_full(&self) -> u64 {
        self.steps.iter().map(|s| s.point.macs_full).sum()
    }
}

/// `[controller]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// `"channel-router"` (RNP).
    pub kind: String,
    /// Channel groups per decision layer (k).
    #[serde(default = "default_groups")]
    pub groups: usize,
    /// Encoder output and GRU hidden size.
    #[serde(default = "default_hidden")]
    pub hidden: usize,
    /// Recurrent cell: `"gru"`.
    #[serde(default = "default_rnn")]
    pub rnn: String,
}

fn default_groups() -> usize {
    4
}
fn default_hidden() -> usize {
    64
}
fn default_rnn() -> String {
    "gru".into()
}

pub const CONTROLLER_KINDS: &[&str] = &["channel-router"];

impl ControllerConfig {
    /// Problems as (key relative to `[controller]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if !CONTROLLER_KINDS.contains(&self.kind.as_str()) {
            v.push((
                "kind".into(),
                format!("'{}' is not a known controller (available: {})", self.kind, CONTROLLER_KINDS.join(", ")),
            ));
        }
        if !(1..=64).contains(&self.groups) {
            v.push(("groups".into(), format!("must be in 1..=64, got {}", self.groups)));
        }
        if !(1..=4096).contains(&self.hidden) {
            v.push(("hidden".into(), format!("must be in 1..=4096, got {}", self.hidden)));
        }
        if self.rnn != "gru" {
            v.push(("rnn".into(), format!("'{}' is not available (available: gru)", self.rnn)));
        }
        v
    }
}
