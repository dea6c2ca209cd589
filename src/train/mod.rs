//! Training building blocks: `[train]`, optimizers and schedules, losses, checkpoints with exact
//! resume, and data-parallel gradient averaging. The trainers that use them run on the run
//! session, above this layer.

pub mod checkpoint;
pub mod data_parallel;
pub mod losses;
pub mod optim;

use serde::{Deserialize, Serialize};

pub use optim::{OptimizerConfig, ScheduleConfig};

/// `[train]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Number of epochs.
    pub epochs: usize,
    /// `{ kind = "sgd", lr, momentum = 0.9, weight_decay = 0, nesterov = false }` or
    /// `{ kind = "adamw", lr, betas = [0.9, 0.999], eps = 1e-8, weight_decay = 0.05 }`.
    pub optimizer: OptimizerConfig,
    /// `{ kind = "cosine", warmup_epochs = 0, min_lr = 0 }` or `{ kind = "constant" }`.
    pub schedule: ScheduleConfig,
    /// Label smoothing ε of the cross-entropy.
    pub label_smoothing: f64,
    /// Clip the global gradient norm to this value (0 = off).
    pub grad_clip: f64,
    /// Apply weight decay to matrices and conv kernels only, not to biases and norm scales.
    pub decay_only_matrices: bool,
    /// Evaluate on the test split every this many epochs (and always after the last).
    pub eval_every: usize,
}


impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            optimizer: OptimizerConfig::default(),
            schedule: ScheduleConfig::default(),
            label_smoothing: 0.0,
            grad_clip: 0.0,
            decay_only_matrices: false,
            eval_every: 1,
        }
    }
}

impl TrainConfig {
    /// Problems as (key relative to `[train]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if self.epochs == 0 {
            v.push(("epochs".into(), "must be > 0, got 0".into()));
        }
        for (k, m) in self.optimizer.validate() {
            v.push((format!("optimizer.{k}"), m));
        }
        if let ScheduleConfig::Cosine { warmup_epochs, min_lr } = self.schedule {
            if warmup_epochs < 0.0 || warmup_epochs >= self.epochs as f64 {
                v.push(("schedule.warmup_epochs".into(), format!("must be in [0, epochs), got {warmup_epochs}")));
            }
            if min_lr < 0.0 || min_lr > self.optimizer.lr() {
                v.push(("schedule.min_lr".into(), format!("must be in [0, lr], got {min_lr}")));
            }
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            v.push(("label_smoothing".into(), format!("must be in [0, 1), got {}", self.label_smoothing)));
        }
        if self.grad_clip < 0.0 {
            v.push(("grad_clip".into(), format!("must be >= 0, got {}", self.grad_clip)));
        }
        if self.eval_every == 0 {
            v.push(("eval_every".into(), "must be > 0, got 0".into()));
        }
        v
    }
}
