//! SGD with momentum and AdamW with PyTorch's exact semantics (SGD: dampening 0, coupled weight
//! decay, optional Nesterov; AdamW: decoupled weight decay, bias correction), a cosine schedule
//! with linear warm-up, and global-norm gradient clipping.
//!
//! State is keyed by parameter path rather than burn's random `ParamId`, so a checkpoint's
//! optimizer state restores into a freshly built model: that is what makes `--resume` exact.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use serde::{Deserialize, Serialize};

use crate::nn::params::{HostTensor, StateDict};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// `{ kind = "sgd", lr = 0.05, momentum = 0.9, weight_decay = 5e-4, nesterov = false }`
    Sgd {
        lr: f64,
        #[serde(default = "default_momentum")]
        momentum: f64,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default)]
        nesterov: bool,
    },
    /// `{ kind = "adamw", lr = 1e-3, betas = [0.9, 0.999], eps = 1e-8, weight_decay = 0.05 }`
    Adamw {
        lr: f64,
        #[serde(default = "default_betas")]
        betas: [f64; 2],
        #[serde(default = "default_eps")]
        eps: f64,
        #[serde(default = "default_adamw_wd")]
        weight_decay: f64,
    },
}

fn default_momentum() -> f64 {
    0.9
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_adamw_wd() -> f64 {
    0.05
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self::Sgd { lr: 0.05, momentum: 0.9, weight_decay: 5e-4, nesterov: false }
    }
}

impl OptimizerConfig {
    pub fn lr(&self) -> f64 {
        match self {
            Self::Sgd { lr, .. } | Self::Adamw { lr, .. } => *lr,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sgd { .. } => "sgd",
            Self::Adamw { .. } => "adamw",
        }
    }

    /// Problems as (key relative to the optimizer table, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        let lr = self.lr();
        if !(lr > 0.0 && lr.is_finite()) {
            v.push(("lr".into(), format!("must be > 0, got {lr}")));
        }
        match self {
            Self::Sgd { momentum, weight_decay, nesterov, .. } => {
                if !(0.0..1.0).contains(momentum) {
                    v.push(("momentum".into(), format!("must be in [0, 1), got {momentum}")));
                }
                if *weight_decay < 0.0 {
                    v.push(("weight_decay".into(), format!("must be >= 0, got {weight_decay}")));
                }
                if *nesterov && *momentum == 0.0 {
                    v.push(("nesterov".into(), "needs momentum > 0".into()));
                }
            }
            Self::Adamw { betas, eps, weight_decay, .. } => {
                if betas.iter().any(|b| !(0.0..1.0).contains(b)) {
                    v.push(("betas".into(), format!("must be in [0, 1), got {betas:?}")));
                }
                if *eps <= 0.0 {
                    v.push(("eps".into(), format!("must be > 0, got {eps}")));
                }
                if *weight_decay < 0.0 {
                    v.push(("weight_decay".into(), format!("must be >= 0, got {weight_decay}")));
                }
            }
        }
        v
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ScheduleConfig {
    /// Constant learning rate.
    Constant,
    /// Linear warm-up from 0 over `warmup_epochs`, then cosine decay to `min_lr` at the end.
    Cosine {
        #[serde(default)]
        warmup_epochs: f64,
        #[serde(default)]
        min_lr: f64,
    },
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self::Cosine { warmup_epochs: 0.0, min_lr: 0.0 }
    }
}

impl ScheduleConfig {
    /// Learning rate at optimizer step `step` (0-based) of `total` steps.
    pub fn lr_at(&self, base: f64, step: usize, total: usize, steps_per_epoch: usize) -> f64 {
        match self {
            Self::Constant => base,
            Self::Cosine { warmup_epochs, min_lr } => {
                let warm = (warmup_epochs * steps_per_epoch as f64).round() as usize;
                if step < warm {
                    return base * (step + 1) as f64 / warm as f64;
                }
                let span = total.saturating_sub(warm).max(1) as f64;
                let t = ((step - warm) as f64 / span).min(1.0);
                min_lr + 0.5 * (base - min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// Path-tracking helper shared by the visitor and the mapper below.
#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn get(&self) -> String {
        self.0.join(".")
    }
}

/// An optimizer over the parameters of one module, with per-parameter state keyed by path.
pub struct Optimizer<B: AutodiffBackend> {
    pub config: OptimizerConfig,
    /// Exclude 1-D parameters (norm scales, biases) from weight decay.
    pub decay_only_matrices: bool,
    /// Number of updates applied so far (AdamW's bias correction uses it).
    pub steps: u64,
    state: BTreeMap<String, Vec<Tensor<B::InnerBackend, 1>>>,
}

impl<B: AutodiffBackend> Optimizer<B> {
    pub fn new(config: OptimizerConfig) -> Self {
        Self { config, decay_only_matrices: false, steps: 0, state: BTreeMap::new() }
    }

    /// Global L2 norm of the gradients (one host sync).
    pub fn grad_norm<M: AutodiffModule<B>>(module: &M, grads: &GradientsParams) -> f64 {
        struct Norm<'a, B: AutodiffBackend> {
            grads: &'a GradientsParams,
            acc: Option<Tensor<B::InnerBackend, 1>>,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Norm<'_, B> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                    let s = g.powf_scalar(2.0).sum();
                    self.acc = Some(match self.acc.take() {
                        Some(a) => a + s,
                        None => s,
                    });
                }
            }
        }
        let mut v = Norm::<B> { grads, acc: None };
        module.visit(&mut v);
        v.acc.map(|a| a.into_scalar().elem::<f64>().sqrt()).unwrap_or(0.0)
    }

    /// Applies one update with learning rate `lr`; gradients are scaled by `grad_scale` first
    /// (gradient clipping passes `min(1, max_norm / norm)`).
    pub fn step<M: AutodiffModule<B>>(&mut self, module: M, grads: GradientsParams, lr: f64, grad_scale: f64) -> M {
        self.steps += 1;
        let mut mapper = Updater { opt: self, grads, lr, grad_scale, path: Path::default() };
        module.map(&mut mapper)
    }

    /// Optimizer state as host tensors, keyed `<param path>.<buffer>`.
    pub fn state_dict(&self) -> StateDict {
        let names = self.buffer_names();
        let mut out = StateDict::new();
        for (path, bufs) in &self.state {
            for (name, t) in names.iter().zip(bufs) {
                out.insert(format!("{path}.{name}"), HostTensor::from_tensor(t));
            }
        }
        out
    }

    /// Restores state saved by [`state_dict`](Self::state_dict); shapes are checked when used.
    pub fn load_state_dict(&mut self, dict: &StateDict, device: &burn::tensor::Device<B::InnerBackend>) -> Result<()> {
        let names = self.buffer_names();
        let mut state: BTreeMap<String, Vec<Tensor<B::InnerBackend, 1>>> = BTreeMap::new();
        for (key, t) in dict {
            let Some((path, buf)) = key.rsplit_once('.') else { bail!("optimizer state key '{key}' has no buffer name") };
            let Some(pos) = names.iter().position(|n| *n == buf) else {
                bail!("optimizer state key '{key}': buffer '{buf}' does not belong to a {} optimizer", self.config.kind())
            };
            let entry = state.entry(path.to_string()).or_default();
            if entry.len() <= pos {
                entry.resize(pos + 1, Tensor::zeros([0], device));
            }
            entry[pos] = HostTensor::new(vec![t.data.len()], t.data.clone()).to_tensor(device);
        }
        self.state = state;
        Ok(())
    }

    fn buffer_names(&self) -> &'static [&'static str] {
        match self.config {
            OptimizerConfig::Sgd { .. } => &["momentum_buffer"],
            OptimizerConfig::Adamw { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }
}

struct Updater<'a, B: AutodiffBackend> {
    opt: &'a mut Optimizer<B>,
    grads: GradientsParams,
    lr: f64,
    grad_scale: f64,
    path: Path,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Updater<'_, B> {
    fn enter_module(&mut self, name: &str, _c: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _n: &str, _c: &str) {
        self.path.0.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
            return param;
        };
        let key = self.path.get();
        let (id, value, mapper) = param.consume();
        let shape = value.shape();
        let p = value.inner().reshape([-1]);
        let mut g = grad.reshape([-1]);
        if self.grad_scale != 1.0 {
            g = g * self.grad_scale;
        }
        let decay = !(self.opt.decay_only_matrices && D == 1);
        let lr = self.lr;
        let steps = self.opt.steps;
        let state = self.opt.state.entry(key).or_default();
        let fresh = state.is_empty() || state[0].dims()[0] != p.dims()[0];
        let new = match self.opt.config {
            OptimizerConfig::Sgd { momentum, weight_decay, nesterov, .. } => {
                if weight_decay > 0.0 && decay {
                    g = g + p.clone() * weight_decay;
                }
                let update = if momentum > 0.0 {
                    // PyTorch: buf = g on the first step, then buf = momentum * buf + g (dampening 0).
                    // The old buffer is moved out, not cloned, so that the scaling runs in place.
                    let buf = if fresh { g.clone() } else { std::mem::take(state).swap_remove(0) * momentum + g.clone() };
                    *state = vec![buf.clone()];
                    if nesterov { g + buf * momentum } else { buf }
                } else {
                    g
                };
                p - update * lr
            }
            OptimizerConfig::Adamw { betas: [b1, b2], eps, weight_decay, .. } => {
                let p = if weight_decay > 0.0 && decay { p.clone() * (1.0 - lr * weight_decay) } else { p };
                let (m, v) = if fresh {
                    (g.clone() * (1.0 - b1), g.clone().powf_scalar(2.0) * (1.0 - b2))
                } else {
                    let mut old = std::mem::take(state);
                    let (v, m) = (old.pop().expect("second moment"), old.pop().expect("first moment"));
                    (m * b1 + g.clone() * (1.0 - b1), v * b2 + g.powf_scalar(2.0) * (1.0 - b2))
                };
                *state = vec![m.clone(), v.clone()];
                let bc1 = 1.0 - b1.powi(steps as i32);
                let bc2 = 1.0 - b2.powi(steps as i32);
                let denom = (v / bc2).sqrt() + eps;
                p - (m / denom) * (lr / bc1)
            }
        };
        let new = Tensor::<B, D>::from_inner(new.reshape(shape)).require_grad();
        Param::from_mapped_value(id, new, mapper)
    }
}
