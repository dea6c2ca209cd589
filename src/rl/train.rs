//! RNP training: the learner that alternates router updates (REINFORCE on parallel rollouts)
//! with backbone fine-tuning under sampled policies, and the `rlprune train` pipeline for
//! experiments with `[controller] kind = "channel-router"`.

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::ElementConversion;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::reinforce::{learner_step, UpdateStats};
use super::rollout::{worker_seed, RolloutPool, Trajectory};
use super::RlConfig;
use crate::backbones::{AnyBackbone, Backbone};
use crate::controllers::channel_router::{ChannelRouter, RouterPolicy};
use crate::controllers::{ControllerConfig, Mode};
use crate::data::Batch;
use crate::train::losses::cross_entropy;
use crate::train::optim::{Optimizer, OptimizerConfig};
use crate::CpuAutodiff;

type Ad = CpuAutodiff;

/// Backbone + router + their optimizers + the rollout pool.
pub struct RnpLearner {
    pub backbone: AnyBackbone<Ad>,
    pub router: ChannelRouter<Ad>,
    pub cfg: RlConfig,
    pub seed: u64,
    /// Router updates done.
    pub step: u64,
    router_opt: Optimizer<Ad>,
    backbone_opt: Optimizer<Ad>,
    pool: RolloutPool,
    device: burn::tensor::Device<Ad>,
}

/// What one learner step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub stats: UpdateStats,
    pub trajectory: Trajectory,
    /// Cross-entropy of the backbone fine-tuning step, if one ran.
    pub backbone_loss: Option<f64>,
}

impl RnpLearner {
    /// A fresh router for `backbone` (which should already be reordered by filter norm).
    pub fn new(backbone: AnyBackbone<Ad>, image_channels: usize, ctl: &ControllerConfig, cfg: &RlConfig, seed: u64) -> Self {
        let device = Default::default();
        let in_ch = ChannelRouter::<Ad>::input_channels(image_channels, &backbone.prunable_convs());
        let router = ChannelRouter::new(ctl, &in_ch, cfg.baseline == "value", &device);
        Self::with_router(backbone, router, cfg, seed)
    }

    pub fn with_router(backbone: AnyBackbone<Ad>, router: ChannelRouter<Ad>, cfg: &RlConfig, seed: u64) -> Self {
        let router_opt = Optimizer::new(OptimizerConfig::Adamw { lr: cfg.lr, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.0 });
        let backbone_opt = Optimizer::new(OptimizerConfig::Sgd { lr: cfg.backbone_lr, momentum: 0.9, weight_decay: 5e-4, nesterov: false });
        Self { backbone, router, cfg: cfg.clone(), seed, step: 0, router_opt, backbone_opt, pool: RolloutPool::new(cfg.workers), device: Default::default() }
    }

    /// One router update on `batch` (rollouts on the workers), then, every
    /// `alternate_every` updates, one backbone fine-tuning step under sampled policies.
    pub fn step(&mut self, batch: &Batch, router_lr: f64, backbone_lr: f64) -> Result<StepReport> {
        let backbone_snap = self.backbone.valid();
        let router_snap = self.router.valid();
        let traj = self.pool.run(&backbone_snap, &router_snap, &batch.images, batch.shape, &batch.labels, &self.cfg, self.seed, self.step)?;
        let (router, stats) = learner_step(self.router.clone(), &mut self.router_opt, &traj, &self.cfg, router_lr, &self.device)?;
        self.router = router;
        self.step += 1;
        let mut backbone_loss = None;
        if self.cfg.alternate_every > 0 && self.step % self.cfg.alternate_every as u64 == 0 {
            let (x, y) = batch.to_tensors::<Ad>(&self.device);
            let mut policy = RouterPolicy::new(self.router.valid());
            // The policy runs on the inner backend through a thin adapter: sample actions
            // first, then replay them on the autodiff backbone.
            let mut rng = ChaCha8Rng::seed_from_u64(worker_seed(self.seed, self.step, usize::MAX >> 1));
            let (_, trace) = backbone_snap.forward_controlled(x.clone().inner(), &mut policy, Mode::Sample, &mut rng)?;
            let actions: Vec<Vec<usize>> = trace.steps.iter().map(|s| s.actions.clone()).collect();
            let mut replay = Replay { actions, k: self.router.groups() };
            let (logits, _) = self.backbone.forward_controlled(x, &mut replay, Mode::Sample, &mut rng)?;
            let loss = cross_entropy(logits, y, 0.0);
            backbone_loss = Some(loss.clone().into_scalar().elem::<f64>());
            let grads = GradientsParams::from_grads(loss.backward(), &self.backbone);
            self.backbone = self.backbone_opt.step(self.backbone.clone(), grads, backbone_lr, 1.0);
        }
        Ok(StepReport { stats, trajectory: traj, backbone_loss })
    }
}

/// Replays given actions (used to fine-tune the backbone under actions sampled elsewhere).
pub struct Replay {
    pub actions: Vec<Vec<usize>>,
    pub k: usize,
}

impl<B: burn::tensor::backend::Backend> crate::controllers::Controller<B> for Replay {
    fn groups(&self) -> usize {
        self.k
    }
    fn reset(&mut self, _batch: usize) {}
    fn decide(
        &mut self,
        point: &crate::controllers::DecisionPoint,
        observation: burn::tensor::Tensor<B, 2>,
        _mode: Mode,
        _rng: &mut ChaCha8Rng,
    ) -> Result<crate::controllers::Decision<B>> {
        let n = observation.dims()[0];
        let actions = self
            .actions
            .get(point.index)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("replay has no actions for decision {}", point.index))?;
        let z = burn::tensor::Tensor::zeros([n], &observation.device());
        Ok(crate::controllers::Decision { actions, log_prob: z.clone(), entropy: z })
    }
}
