//! Reinforcement learning of controllers: `[rl]` configuration, rewards, REINFORCE, PPO, DQN,
//! and the parallel rollout workers (actor–learner).

pub mod dqn;
pub mod ppo;
pub mod reinforce;
pub mod reward;
pub mod rollout;

pub mod workers;

use serde::{Deserialize, Serialize};

choice! {
    /// `[rl] algorithm`.
    #[derive(Default)]
    pub enum Algorithm { #[default] Reinforce = "reinforce", Ppo = "ppo", Dqn = "dqn" }
    invalid: |s| format!("'{s}' is not available in this build (available: {})", Algorithm::NAMES.join(", "))
}

choice! {
    /// `[rl] budget`.
    #[derive(Default)]
    pub enum Budget { #[default] PerImage = "per-image", Mean = "mean" }
    invalid: |s| format!("must be \"per-image\" or \"mean\", got \"{s}\"")
}

choice! {
    /// `[rl] accuracy_reward`.
    #[derive(Default)]
    pub enum AccuracyReward { #[default] NegCe = "neg-ce", Correct = "correct" }
    invalid: |s| format!("must be \"neg-ce\" or \"correct\", got \"{s}\"")
}

choice! {
    /// `[rl] baseline`.
    #[derive(Default)]
    pub enum Baseline { #[default] Value = "value", SelfCritical = "self-critical" }
    invalid: |s| format!("must be \"value\" or \"self-critical\", got \"{s}\"")
}

/// `[rl]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlConfig {
    pub algorithm: Algorithm,
    /// Epochs of router training (alternating with backbone fine-tuning).
    pub epochs: usize,
    /// Price p of compute: every decision adds `-p * a/k`.
    pub compute_penalty: f64,
    /// A FLOPs budget instead of a price per group: when set, the only compute term is
    /// `-p * max(0, r - flops_target)` at the last decision, r being the image's measured FLOPs
    /// ratio over the routed layers. A per-group price makes every layer's width equally dear,
    /// so the policy settles on one width everywhere and the reachable ratios are coarse
    /// ((3/4)^2 = 0.56, then 0.25); a budget lets it spend where accuracy needs it.
    pub flops_target: Option<f64>,
    /// How `flops_target` is enforced. `"per-image"`: the hinge above, on every image (each
    /// image is best off right at the target, so the policy tends to give all images the same
    /// widths). `"mean"`: a constraint on the mean FLOPs only, by a Lagrangian price λ: the last
    /// decision gets `-λ * (r - flops_target)`, every image faces the same marginal price and
    /// can spend more or less than the target, and after each rollout batch
    /// `λ ← max(0, λ + price_lr * (batch mean r - flops_target))` (dual ascent). λ starts at
    /// `compute_penalty`.
    pub budget: Budget,
    /// Step size of the price λ's dual ascent (`budget = "mean"`).
    pub price_lr: f64,
    /// Whose FLOPs the price λ holds to `flops_target` (`budget = "mean"`). `"sampled"`: the
    /// sampled policy's, which training sees. `"greedy"`: the greedy policy's, which eval and
    /// inference run; each rollout batch then also runs the greedy policy. The sampled and
    /// greedy ratios can differ by a factor of two at the same λ, so only `"greedy"` makes the
    /// evaluated network land at the target.
    pub budget_policy: BudgetPolicy,
    /// `"neg-ce"` (`-alpha * cross_entropy`, the paper) or `"correct"` (`+1` / `-gamma_wrong`).
    pub accuracy_reward: AccuracyReward,
    pub alpha: f64,
    pub gamma_wrong: f64,
    /// Weight of the policy entropy bonus.
    pub entropy_bonus: f64,
    /// `"value"` (learned, MSE) or `"self-critical"` (the greedy rollout's return).
    pub baseline: Baseline,
    /// Normalise advantages over the batch.
    pub normalize_advantages: bool,
    /// Weight of the value loss.
    pub value_coef: f64,
    /// Rollout worker threads.
    pub workers: usize,
    /// Router learning rate (Adam).
    pub lr: f64,
    /// Backbone fine-tuning learning rate (SGD, momentum 0.9).
    pub backbone_lr: f64,
    /// Fine-tune the backbone under sampled policies once every this many router updates
    /// (0 = never).
    pub alternate_every: usize,
    /// What widths the backbone is fine-tuned at during router training (every
    /// `alternate_every` updates). `"policy"`: the router's sampled widths. `"policy-and-random"`:
    /// those and, in a second loss on the same batch, widths drawn uniformly per image and
    /// layer, as slimmable networks are trained. Under its own samples alone the backbone
    /// becomes good at the widths the policy already prefers, which then win every comparison,
    /// and the policy collapses to one width per layer; with random widths as well the backbone
    /// stays usable at every width, so that a per-image choice can pay.
    pub backbone_widths: BackboneWidths,
    /// Epochs of backbone fine-tuning after router training, under the frozen router's greedy
    /// decisions (the policy the network is evaluated with), as the static baseline fine-tunes
    /// its pruned network. 0 = none.
    pub finetune_epochs: usize,
    /// Peak SGD learning rate of that fine-tuning (momentum 0.9, cosine to 0).
    pub finetune_lr: f64,
    /// Discount over the layer sequence (PPO's GAE, DQN's TD targets; REINFORCE uses 1).
    pub gamma: f64,
    /// Images (whole layer sequences) per minibatch: PPO's minibatches, DQN's replay samples.
    pub minibatch: usize,
    /// `[rl.ppo]`: PPO's own settings.
    pub ppo: PpoConfig,
    /// `[rl.dqn]`: DQN's own settings.
    pub dqn: DqnConfig,
}

/// `[rl.ppo]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoConfig {
    /// Clip range ε of the probability ratio.
    pub clip: f64,
    /// λ of generalised advantage estimation over the layers.
    pub gae_lambda: f64,
    /// Passes over each rollout batch.
    pub epochs: usize,
}

/// `[rl.dqn]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DqnConfig {
    /// ε of ε-greedy, linearly from `epsilon_start` to `epsilon_end` over
    /// `epsilon_decay_steps` router updates.
    pub epsilon_start: f64,
    pub epsilon_end: f64,
    pub epsilon_decay_steps: usize,
    /// Replay buffer size in episodes (images).
    pub replay_capacity: usize,
    /// Copy the online network into the target network every this many gradient updates.
    pub target_sync_every: usize,
    /// Gradient updates (replay minibatches) per rollout batch.
    pub updates_per_batch: usize,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self { clip: 0.2, gae_lambda: 0.95, epochs: 4 }
    }
}

impl Default for DqnConfig {
    fn default() -> Self {
        Self {
            epsilon_start: 1.0,
            epsilon_end: 0.05,
            epsilon_decay_steps: 500,
            replay_capacity: 10_000,
            target_sync_every: 50,
            updates_per_batch: 1,
        }
    }
}

/// `[rl]` keys of PPO and DQN that now live in their algorithm's table, as (old key, table,
/// new key). Configurations written before the move (experiments, and the `config.toml` of
/// earlier run directories, which resume reads) are read with a warning, see [`migrate_keys`].
pub const MOVED_KEYS: [(&str, &str, &str); 9] = [
    ("clip", "ppo", "clip"),
    ("gae_lambda", "ppo", "gae_lambda"),
    ("ppo_epochs", "ppo", "epochs"),
    ("epsilon_start", "dqn", "epsilon_start"),
    ("epsilon_end", "dqn", "epsilon_end"),
    ("epsilon_decay_steps", "dqn", "epsilon_decay_steps"),
    ("replay_capacity", "dqn", "replay_capacity"),
    ("target_sync_every", "dqn", "target_sync_every"),
    ("updates_per_batch", "dqn", "updates_per_batch"),
];

/// Moves the old flat spellings of [`MOVED_KEYS`] in an `[rl]` table into `[rl.ppo]` /
/// `[rl.dqn]`. Returns (old key, new key) per key moved, or an error naming both spellings
/// when a key is given twice.
pub fn migrate_keys(rl: &mut toml::Table) -> Result<Vec<(String, String)>, String> {
    let mut moved = Vec::new();
    for (old, table, new) in MOVED_KEYS {
        let Some(value) = rl.remove(old) else { continue };
        let sub = rl.entry(table.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(sub) = sub else {
            return Err(format!("rl.{table} must be a table ([rl.{table}])"));
        };
        if sub.contains_key(new) {
            return Err(format!("rl.{old} and rl.{table}.{new} are the same setting; keep rl.{table}.{new}"));
        }
        sub.insert(new.to_string(), value);
        moved.push((format!("rl.{old}"), format!("rl.{table}.{new}")));
    }
    Ok(moved)
}

choice! {
    /// `[rl] budget_policy`.
    #[derive(Default)]
    pub enum BudgetPolicy { #[default] Sampled = "sampled", Greedy = "greedy" }
    invalid: |s| format!("must be \"sampled\" or \"greedy\", got \"{s}\"")
}

choice! {
    /// `[rl] backbone_widths`.
    #[derive(Default)]
    pub enum BackboneWidths { #[default] Policy = "policy", PolicyAndRandom = "policy-and-random" }
    invalid: |s| format!("must be \"policy\" or \"policy-and-random\", got \"{s}\"")
}



/// Every `[rl]` key left out of an experiment takes its value here.
impl Default for RlConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::default(),
            epochs: 2,
            compute_penalty: 0.1,
            flops_target: None,
            budget: Budget::default(),
            price_lr: 1.0,
            budget_policy: BudgetPolicy::default(),
            accuracy_reward: AccuracyReward::default(),
            alpha: 1.0,
            gamma_wrong: 1.0,
            entropy_bonus: 0.01,
            baseline: Baseline::default(),
            normalize_advantages: true,
            value_coef: 0.5,
            workers: 1,
            lr: 1e-3,
            backbone_lr: 1e-3,
            alternate_every: 2,
            backbone_widths: BackboneWidths::default(),
            finetune_epochs: 0,
            finetune_lr: 0.01,
            gamma: 1.0,
            minibatch: 32,
            ppo: PpoConfig::default(),
            dqn: DqnConfig::default(),
        }
    }
}

impl RlConfig {
    /// Whether the router carries a value head: REINFORCE's learned baseline, PPO's critic.
    pub fn value_head(&self) -> bool {
        match self.algorithm {
            Algorithm::Ppo => true,
            Algorithm::Dqn => false,
            Algorithm::Reinforce => self.baseline == Baseline::Value,
        }
    }

    /// DQN's exploration rate after `step` router updates (linear schedule).
    pub fn epsilon(&self, step: u64) -> f64 {
        let d = &self.dqn;
        if d.epsilon_decay_steps == 0 {
            return d.epsilon_end;
        }
        let f = (step as f64 / d.epsilon_decay_steps as f64).min(1.0);
        d.epsilon_start + f * (d.epsilon_end - d.epsilon_start)
    }

    /// Problems as (key relative to `[rl]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if self.epochs == 0 {
            v.push(("epochs".into(), "must be > 0, got 0".into()));
        }
        if !(self.compute_penalty >= 0.0 && self.compute_penalty.is_finite()) {
            v.push(("compute_penalty".into(), format!("must be >= 0, got {}", self.compute_penalty)));
        }
        if let Some(t) = self.flops_target.filter(|t| !(*t > 0.0 && *t <= 1.0)) {
            v.push(("flops_target".into(), format!("must be in (0, 1], got {t}")));
        }
        if self.budget == Budget::Mean && self.flops_target.is_none() {
            v.push(("budget".into(), "\"mean\" needs a flops_target to hold the mean FLOPs ratio to".into()));
        }
        if self.budget_policy == BudgetPolicy::Greedy && self.budget != Budget::Mean {
            v.push(("budget_policy".into(), "\"greedy\" holds the price of budget = \"mean\"; set that too".into()));
        }
        if !(self.price_lr >= 0.0 && self.price_lr.is_finite()) {
            v.push(("price_lr".into(), format!("must be >= 0, got {}", self.price_lr)));
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
        if !(1..=64).contains(&self.workers) {
            v.push(("workers".into(), format!("must be in 1..=64, got {}", self.workers)));
        }
        for (k, x) in [("lr", self.lr), ("backbone_lr", self.backbone_lr), ("finetune_lr", self.finetune_lr)] {
            if !(x > 0.0 && x.is_finite()) {
                v.push((k.into(), format!("must be > 0, got {x}")));
            }
        }
        if self.baseline == Baseline::SelfCritical && self.algorithm != Algorithm::Reinforce {
            v.push((
                "baseline".into(),
                format!("\"self-critical\" applies to algorithm = \"reinforce\" only, not \"{}\"", self.algorithm),
            ));
        }
        if !(self.ppo.clip > 0.0 && self.ppo.clip < 1.0) {
            v.push(("ppo.clip".into(), format!("must be in (0, 1), got {}", self.ppo.clip)));
        }
        for (k, x) in [
            ("gamma", self.gamma),
            ("ppo.gae_lambda", self.ppo.gae_lambda),
            ("dqn.epsilon_start", self.dqn.epsilon_start),
            ("dqn.epsilon_end", self.dqn.epsilon_end),
        ] {
            if !(0.0..=1.0).contains(&x) {
                v.push((k.into(), format!("must be in [0, 1], got {x}")));
            }
        }
        for (k, x) in [
            ("ppo.epochs", self.ppo.epochs),
            ("minibatch", self.minibatch),
            ("dqn.replay_capacity", self.dqn.replay_capacity),
            ("dqn.target_sync_every", self.dqn.target_sync_every),
            ("dqn.updates_per_batch", self.dqn.updates_per_batch),
        ] {
            if x == 0 {
                v.push((k.into(), "must be > 0, got 0".into()));
            }
        }
        v
    }
}
