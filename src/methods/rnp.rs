//! RNP training: the learner that alternates router updates (REINFORCE, PPO or DQN on parallel
//! rollouts)
//! with backbone fine-tuning under sampled policies, and the `rlprune train` pipeline for
//! experiments with `[controller] kind = "channel-router"`.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::ElementConversion;
use burn::tensor::backend::Backend;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::rl::{Algorithm, Budget, RlConfig};
use crate::rl::ppo::ppo_update;
use crate::rl::reinforce::{UpdateStats, learner_step};
use crate::rl::rollout::{RolloutPool, Trajectory, worker_seed};
use crate::backbones::{AnyBackbone, Backbone};
use crate::controllers::ActionRule;
use crate::controllers::channel_router::{ChannelRouter, RouterPolicy};
use crate::controllers::{ControllerConfig, Mode};
use crate::data::Batch;
use crate::data::Loader;
use crate::experiment::{Experiment, Layered};
use crate::logging::tensorboard::HParamValue;
use crate::nn::params::{device_of, load_strict, state_dict, StateDict};
use crate::train::checkpoint::{self, save_weights};
use crate::train::losses::correct;
use crate::train::losses::cross_entropy;
use crate::train::optim::{Optimizer, OptimizerConfig};
use crate::session::run::{RunLogs, SeedStream, epoch_seed};
use crate::session::{Resumable, Session, epoch_batches, EvalData, skeleton};
use crate::session::supervised::{
    self, EpochMetrics, TrainOptions, TrainSummary, build_backbone,
};
use crate::{Cpu, CpuAutodiff, ModelBackend, TrainBackend};

/// Backbone + router + their optimizers + the rollout pool, on the training backend `B` (the
/// rollouts run on its inner backend).
pub struct RnpLearner<B: TrainBackend> {
    pub backbone: AnyBackbone<B>,
    pub router: ChannelRouter<B>,
    pub cfg: RlConfig,
    pub seed: u64,
    /// Router updates done.
    pub step: u64,
    /// The reward's compute price: `compute_penalty`, or with `[rl] budget = "mean"` the
    /// Lagrangian price λ, updated after every rollout batch.
    pub price: f64,
    router_opt: Optimizer<B>,
    backbone_opt: Optimizer<B>,
    pool: RolloutPool<B::InnerBackend, ChannelRouter<B::InnerBackend>>,
    device: B::Device,
    /// Replay buffer and target network when `[rl] algorithm = "dqn"`.
    dqn: Option<crate::rl::dqn::DqnState<B, ChannelRouter<B>>>,
}

/// What one learner step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub stats: UpdateStats,
    pub trajectory: Trajectory,
    /// Cross-entropy of the backbone fine-tuning step, if one ran.
    pub backbone_loss: Option<f64>,
}

impl<B: TrainBackend> RnpLearner<B> {
    /// A fresh router for `backbone` (which should already be reordered by filter norm), on the
    /// backbone's device.
    pub fn new(
        backbone: AnyBackbone<B>,
        image_channels: usize,
        ctl: &ControllerConfig,
        cfg: &RlConfig,
        seed: u64,
    ) -> Self {
        let device = device_of(&backbone);
        let in_ch = ChannelRouter::<B>::input_channels(image_channels, &backbone.prunable_convs());
        let router = ChannelRouter::new(ctl, &in_ch, cfg.value_head(), &device);
        Self::with_router(backbone, router, cfg, seed)
    }

    pub fn with_router(backbone: AnyBackbone<B>, router: ChannelRouter<B>, cfg: &RlConfig, seed: u64) -> Self {
        let device = device_of(&backbone);
        let router_opt =
            Optimizer::new(OptimizerConfig::Adamw { lr: cfg.lr, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.0 });
        let backbone_opt = Optimizer::new(OptimizerConfig::Sgd {
            lr: cfg.backbone_lr,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: false,
        });
        let dqn = (cfg.algorithm == Algorithm::Dqn).then(|| crate::rl::dqn::DqnState::new(&router, cfg));
        Self {
            dqn,
            backbone,
            router,
            cfg: cfg.clone(),
            seed,
            step: 0,
            price: cfg.compute_penalty,
            router_opt,
            backbone_opt,
            pool: RolloutPool::new(cfg.workers),
            device,
        }
    }

    /// DQN's replay buffer and target network as tensors, and its update count (`None` for
    /// REINFORCE and PPO, which keep nothing between batches).
    pub fn dqn_checkpoint(&self) -> Option<(StateDict, StateDict, u64)> {
        self.dqn.as_ref().map(|d| (d.buffer.to_state_dict(), state_dict(&d.target), d.updates))
    }

    /// Restores what [`RnpLearner::dqn_checkpoint`] returned.
    pub fn restore_dqn(&mut self, replay: &StateDict, target: &StateDict, updates: u64, source: &str) -> Result<()> {
        let Some(dqn) = self.dqn.as_mut() else { anyhow::bail!("{source}: a replay buffer for a learner that is not DQN") };
        dqn.buffer = crate::rl::dqn::ReplayBuffer::from_state_dict(self.cfg.dqn.replay_capacity, replay).with_context(|| source.to_string())?;
        dqn.target = load_strict(dqn.target.clone(), target, source)?;
        dqn.updates = updates;
        Ok(())
    }

    /// One router update on `batch` (rollouts on the workers), then, every
    /// `alternate_every` updates, one backbone fine-tuning step under sampled policies.
    pub fn step(&mut self, batch: &Batch, router_lr: f64, backbone_lr: f64) -> Result<StepReport> {
        let backbone_snap = self.backbone.valid();
        let router_snap = self.router.valid();
        let epsilon = self.cfg.epsilon(self.step);
        let rule = if self.dqn.is_some() { ActionRule::EpsilonGreedy(epsilon) } else { ActionRule::Softmax };
        let traj = self.pool.run(
            &backbone_snap,
            &router_snap,
            &batch.images,
            batch.shape,
            &batch.labels,
            &self.cfg,
            self.price,
            rule,
            self.seed,
            self.step,
        )?;
        if let (Some(target), Budget::Mean) = (self.cfg.flops_target, self.cfg.budget) {
            let held = match self.cfg.budget_policy {
                crate::rl::BudgetPolicy::Sampled => traj.stats().flops_ratio,
                crate::rl::BudgetPolicy::Greedy => traj.greedy_flops_ratio().unwrap_or(traj.stats().flops_ratio),
            };
            self.price = crate::rl::reward::next_price(self.price, self.cfg.price_lr, held, target);
        }
        // The learner's own draws (minibatch order, replay samples) use a stream apart from
        // every worker's.
        let learner_seed = worker_seed(self.seed, self.step, usize::MAX >> 2);
        let router = self.router.clone();
        let (router, stats) = match (self.cfg.algorithm, self.dqn.as_mut()) {
            (Algorithm::Dqn, Some(dqn)) => dqn.update(
                router,
                &mut self.router_opt,
                &traj,
                &self.cfg,
                router_lr,
                epsilon,
                &self.device,
                learner_seed,
            )?,
            (Algorithm::Dqn, None) => anyhow::bail!("a DQN learner without its replay state"),
            (Algorithm::Ppo, _) => {
                ppo_update(router, &mut self.router_opt, &traj, &self.cfg, router_lr, &self.device, learner_seed)?
            }
            (Algorithm::Reinforce, _) => learner_step(router, &mut self.router_opt, &traj, &self.cfg, router_lr, &self.device)?,
        };
        self.router = router;
        self.step += 1;
        let mut backbone_loss = None;
        if self.cfg.alternate_every > 0 && self.step.is_multiple_of(self.cfg.alternate_every as u64) {
            let (x, y) = batch.to_tensors::<B>(&self.device);
            let mut policy = RouterPolicy::with_rule(self.router.valid(), rule);
            // The policy runs on the inner backend through a thin adapter: sample actions
            // first, then replay them on the autodiff backbone.
            let mut rng = ChaCha8Rng::seed_from_u64(worker_seed(self.seed, self.step, usize::MAX >> 1));
            let (_, trace) =
                backbone_snap.forward_controlled(x.clone().inner(), &mut policy, Mode::Sample, &mut rng)?;
            let actions: Vec<Vec<usize>> = trace.steps.iter().map(|s| s.actions.clone()).collect();
            let k = self.router.groups();
            let random: Option<Vec<Vec<usize>>> = (self.cfg.backbone_widths == crate::rl::BackboneWidths::PolicyAndRandom)
                .then(|| actions.iter().map(|a| a.iter().map(|_| rng.random_range(1..=k)).collect()).collect());
            let mut replay = Replay { actions, k };
            let (logits, _) = self.backbone.forward_controlled(x.clone(), &mut replay, Mode::Sample, &mut rng)?;
            let mut loss = cross_entropy(logits, y.clone(), 0.0);
            if let Some(random) = random {
                let mut replay = Replay { actions: random, k };
                let (logits, _) = self.backbone.forward_controlled(x, &mut replay, Mode::Sample, &mut rng)?;
                loss = loss + cross_entropy(logits, y, 0.0);
            }
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

/// One SGD step of the backbone on `batch` under `router`'s greedy decisions (taken on the
/// inner backend, then replayed on the autodiff backbone). Returns (cross-entropy, hits).
fn finetune_step<B: TrainBackend>(
    backbone: &mut AnyBackbone<B>,
    router: &ChannelRouter<B::InnerBackend>,
    opt: &mut Optimizer<B>,
    batch: &Batch,
    lr: f64,
    device: &B::Device,
) -> Result<(f64, usize)> {
    let (x, y) = batch.to_tensors::<B>(device);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut policy = RouterPolicy::new(router.clone());
    let (_, trace) = backbone.valid().forward_controlled(x.clone().inner(), &mut policy, Mode::Greedy, &mut rng)?;
    let actions: Vec<Vec<usize>> = trace.steps.iter().map(|s| s.actions.clone()).collect();
    let mut replay = Replay { actions, k: router.groups() };
    let (logits, _) = backbone.forward_controlled(x, &mut replay, Mode::Greedy, &mut rng)?;
    let hits = correct(logits.clone(), y.clone());
    let loss = cross_entropy(logits, y, 0.0);
    let value = loss.clone().into_scalar().elem::<f64>();
    let grads = GradientsParams::from_grads(loss.backward(), &*backbone);
    *backbone = opt.step(backbone.clone(), grads, lr, 1.0);
    Ok((value, hits))
}

/// Greedy evaluation of a routed backbone on a loader's split.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControlledEval {
    pub images: usize,
    pub top1: f64,
    pub loss: f64,
    /// Decision-layer MACs spent / full, over the split.
    pub flops_ratio: f64,
    pub layers: Vec<String>,
    pub layer_flops_ratio: Vec<f64>,
    /// Per layer, the fraction of images choosing 1..=k groups.
    pub action_distribution: Vec<Vec<f64>>,
    /// Per layer, every image's action (for histograms).
    #[serde(skip)]
    pub actions: Vec<Vec<f64>>,
    /// Every image's label, in split order.
    #[serde(skip)]
    pub labels: Vec<usize>,
    /// Every distinct sequence of widths the images took, most taken first.
    pub width_paths: Vec<WidthPath>,
    /// Where the policy spends, class by class (the split's class names).
    pub per_class: Vec<ClassSpend>,
}

/// One sequence of per-layer widths (groups computed in each routed layer) and the images that
/// took it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WidthPath {
    pub groups: Vec<usize>,
    /// Share of the split's images.
    pub share: f64,
    pub top1: f64,
    pub flops_ratio: f64,
}

/// The images of one class: how many, how often right, and the compute they got.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassSpend {
    /// The class's label and name.
    pub label: usize,
    pub class: String,
    pub images: usize,
    pub top1: f64,
    pub flops_ratio: f64,
}

/// Per-image decisions summed up: `paths[i]` image i's widths, `spent[i]` its decision-layer
/// MACs, `full` the MACs of one image at full width, `labels` and `right` its class and whether
/// it was classified right.
fn decision_summary(
    paths: &[Vec<usize>],
    spent: &[u64],
    full: u64,
    labels: &[usize],
    right: &[bool],
    class_names: &[String],
) -> (Vec<WidthPath>, Vec<ClassSpend>) {
    let n = paths.len().max(1) as f64;
    let full = full.max(1) as f64;
    let mut by_path: std::collections::BTreeMap<&[usize], (usize, usize, u64)> = Default::default();
    for i in 0..paths.len() {
        let e = by_path.entry(&paths[i]).or_default();
        *e = (e.0 + 1, e.1 + right[i] as usize, e.2 + spent[i]);
    }
    let mut width_paths: Vec<WidthPath> = by_path
        .into_iter()
        .map(|(groups, (count, hits, macs))| WidthPath {
            groups: groups.to_vec(),
            share: count as f64 / n,
            top1: hits as f64 / count as f64,
            flops_ratio: macs as f64 / (count as f64 * full),
        })
        .collect();
    width_paths.sort_by(|a, b| b.share.total_cmp(&a.share).then_with(|| a.groups.cmp(&b.groups)));
    let per_class = class_names
        .iter()
        .enumerate()
        .filter_map(|(c, name)| {
            let members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
            (!members.is_empty()).then(|| ClassSpend {
                label: c,
                class: name.clone(),
                images: members.len(),
                top1: members.iter().filter(|&&i| right[i]).count() as f64 / members.len() as f64,
                flops_ratio: members.iter().map(|&i| spent[i]).sum::<u64>() as f64 / (members.len() as f64 * full),
            })
        })
        .collect();
    (width_paths, per_class)
}

/// Runs the router greedily on every batch of `loader`.
pub fn evaluate_controlled<B: ModelBackend>(
    backbone: &AnyBackbone<B>,
    router: &ChannelRouter<B>,
    loader: &Loader,
) -> Result<ControlledEval> {
    let device = device_of(backbone);
    let k = router.groups();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (mut n_seen, mut n_correct, mut loss_sum) = (0usize, 0usize, 0.0f64);
    let mut spent: Vec<u64> = Vec::new();
    let mut full: Vec<u64> = Vec::new();
    let mut layers = Vec::new();
    let mut actions: Vec<Vec<f64>> = Vec::new();
    let (mut paths, mut image_macs, mut labels, mut right) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut image_full = 0u64;
    for batch in loader.epoch(0) {
        let batch = batch?;
        let (x, y) = batch.to_tensors::<B>(&device);
        let n = batch.len();
        let mut policy = RouterPolicy::new(router.clone());
        let (logits, trace) = backbone.forward_controlled(x, &mut policy, Mode::Greedy, &mut rng)?;
        loss_sum += cross_entropy(logits.clone(), y.clone(), 0.0).into_scalar().elem::<f64>() * n as f64;
        let pred: Vec<i64> =
            logits.argmax(1).reshape([n]).into_data().convert::<i64>().to_vec().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        right.extend(pred.iter().zip(&batch.labels).map(|(p, l)| p == l));
        labels.extend(batch.labels.iter().map(|&l| l as usize));
        n_correct += pred.iter().zip(&batch.labels).filter(|(p, l)| p == l).count();
        n_seen += n;
        image_full = trace.steps.iter().map(|s| s.point.macs_full).sum();
        paths.extend((0..n).map(|i| trace.steps.iter().map(|s| s.actions[i]).collect::<Vec<_>>()));
        image_macs.extend((0..n).map(|i| trace.steps.iter().map(|s| s.macs[i]).sum::<u64>()));
        if spent.is_empty() {
            spent = vec![0; trace.steps.len()];
            full = vec![0; trace.steps.len()];
            actions = vec![Vec::new(); trace.steps.len()];
            layers = trace.steps.iter().map(|s| s.point.name.clone()).collect();
        }
        for (t, s) in trace.steps.iter().enumerate() {
            spent[t] += s.macs.iter().sum::<u64>();
            full[t] += s.point.macs_full * n as u64;
            actions[t].extend(s.actions.iter().map(|&a| a as f64));
        }
    }
    if n_seen == 0 {
        bail!("the evaluation split is empty");
    }
    let (width_paths, per_class) =
        decision_summary(&paths, &image_macs, image_full, &labels, &right, &loader.dataset().class_names());
    let action_distribution = actions
        .iter()
        .map(|acts| {
            (1..=k)
                .map(|a| acts.iter().filter(|&&x| x as usize == a).count() as f64 / acts.len().max(1) as f64)
                .collect()
        })
        .collect();
    Ok(ControlledEval {
        images: n_seen,
        top1: n_correct as f64 / n_seen as f64,
        loss: loss_sum / n_seen as f64,
        flops_ratio: spent.iter().sum::<u64>() as f64 / full.iter().sum::<u64>().max(1) as f64,
        layers,
        layer_flops_ratio: spent.iter().zip(&full).map(|(&s, &f)| s as f64 / f.max(1) as f64).collect(),
        action_distribution,
        actions,
        labels,
        width_paths,
        per_class,
    })
}


/// Where an RNP run stands after its last completed epoch: `checkpoints/rnp_state.json`, written
/// last (atomically), after the tensor files that carry the same epoch tag. Rollouts, minibatch
/// order and data order are pure functions of (seed, step, epoch), so with the weights and the
/// optimizer buffers this is everything `--resume` needs for REINFORCE and PPO.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RnpState {
    pub format: String,
    pub arch: String,
    pub algorithm: String,
    /// Router epochs completed.
    pub rl_epochs: usize,
    /// Fine-tuning epochs completed (after all router epochs).
    pub finetune_epochs: usize,
    /// Router updates done.
    pub step: u64,
    pub router_optimizer_steps: u64,
    pub backbone_optimizer_steps: u64,
    pub finetune_optimizer_steps: u64,
    /// Best test top-1 of the router epochs, and of the fine-tuning epochs (none before the first).
    pub best: Option<f64>,
    pub finetune_best: Option<f64>,
    pub unpruned_top1: f64,
    /// The compute price after the last router update (`[rl] budget = "mean"` moves it);
    /// absent in states written before it was kept, which then restart from `compute_penalty`.
    #[serde(default)]
    pub price: Option<f64>,
    /// Test FLOPs ratio of what `checkpoints/best.safetensors` holds (absent in older states).
    #[serde(default)]
    pub best_flops: Option<f64>,
    /// DQN's gradient updates (its target-sync clock); its replay buffer and target network
    /// are `checkpoints/dqn_replay.safetensors` and `dqn_target.safetensors`.
    #[serde(default)]
    pub dqn_updates: Option<u64>,
}

impl RnpState {
    /// The epoch tag that `last.safetensors` carries.
    fn tag(&self) -> usize {
        self.rl_epochs + self.finetune_epochs
    }
}

const RNP_STATE: &str = "rnp_state.json";
const DQN_REPLAY: &str = "dqn_replay.safetensors";
const DQN_TARGET: &str = "dqn_target.safetensors";

fn save_rnp_state(run_dir: &Path, st: &RnpState) -> Result<()> {
    let json = serde_json::to_vec_pretty(st)?;
    crate::fsutil::atomic_write(&checkpoint::dir(run_dir).join(RNP_STATE), &json)
}

/// RNP: `[controller] kind = "channel-router"`.
pub const METHOD: super::Method =
    super::Method {
        name: "channel-router",
        check_options: super::no_extra_options,
        train: train_rnp,
        eval: eval_rnp_run,
        visualize: Some(super::rnp_channel_use::visualize_run),
    };

/// `rlprune train` for an experiment with `[controller] kind = "channel-router"`: supervised
/// backbone training (unless `[backbone] weights` is given) into `<run>/backbone/`, channel
/// reordering by filter norm, then `rl.epochs` of router training alternating with backbone
/// fine-tuning. Writes `checkpoints/{last,best}.safetensors` (backbone),
/// `checkpoints/router{,_best}.safetensors`, `metrics.jsonl` and TensorBoard events.
pub fn train_rnp(exp: &Experiment, layered: &Layered, opts: &TrainOptions) -> Result<TrainSummary> {
    train_rnp_on::<CpuAutodiff>(exp, layered, opts, &Default::default())
}

/// [`train_rnp`] on the backend `B`: the backbone and router train on `device`, the rollouts
/// and evaluations run on `B`'s inner backend.
pub fn train_rnp_on<B: TrainBackend>(exp: &Experiment, layered: &Layered, opts: &TrainOptions, device: &B::Device) -> Result<TrainSummary> {
    let ctl = exp.controller.clone().ok_or_else(|| anyhow::anyhow!("train_rnp needs a [controller] section"))?;
    let rl = exp.rl.clone().unwrap_or_default();
    let session = Session::open(exp, layered, opts, Resumable::Yes)?;
    let (run_dir, train_loader, test_loader) = (&session.run_dir, &session.train_loader, &session.test_loader);
    let resumed = session.resumed_state(RNP_STATE, |st: &RnpState| &st.format)?;
    if let Some(st) = &resumed {
        session.check_arch(&st.arch)?;
        if st.algorithm != rl.algorithm.as_str() {
            bail!("{}: run was trained with [rl] algorithm '{}', the experiment says '{}'", run_dir.display(), st.algorithm, rl.algorithm);
        }
    }
    let ctx = &session.ctx;
    let device = device.clone();

    // 1. The backbone (a resumed run's phase 1 is continued, or only loaded when complete).
    let mut backbone: AnyBackbone<B> = match session.pretrained_backbone("backbone", &device)? {
        Ok(m) => m,
        Err(interrupted) => return Ok(interrupted),
    };
    let backbone_seconds = session.seconds();
    let RunLogs { mut metrics, mut tb } = session.logs()?;

    // 2. Reorder channels by filter norm (function-preserving); a resumed run's weights are.
    let ck = checkpoint::dir(run_dir);
    let mut state = match resumed {
        Some(st) => {
            let file = ck.join("last.safetensors");
            backbone = load_strict(backbone, &checkpoint::read_model(&file, &exp.backbone.arch, Some(st.tag()))?, &file.display().to_string())?;
            tracing::info!(
                "resuming {} after {} router and {} fine-tuning epochs (step {})",
                run_dir.display(),
                st.rl_epochs,
                st.finetune_epochs,
                st.step
            );
            st
        }
        None => {
            let inner = backbone.valid();
            let (_, unpruned_top1) = supervised::evaluate(&inner, test_loader, &device_of(&inner))?;
            backbone.reorder_by_filter_norm()?;
            tracing::info!("phase 2: channels reordered by filter norm; unpruned test top-1 {:.2}%", 100.0 * unpruned_top1);
            RnpState {
                format: checkpoint::FORMAT.into(),
                arch: exp.backbone.arch.clone(),
                algorithm: rl.algorithm.to_string(),
                rl_epochs: 0,
                finetune_epochs: 0,
                step: 0,
                router_optimizer_steps: 0,
                backbone_optimizer_steps: 0,
                finetune_optimizer_steps: 0,
                best: None,
                finetune_best: None,
                best_flops: None,
                unpruned_top1,
                price: None,
                dqn_updates: None,
            }
        }
    };
    let unpruned_top1 = state.unpruned_top1;

    // 3. Router training, alternating with backbone fine-tuning. The router's initialisation
    // must not depend on whether phase 1 ran in this process.
    <B as Backend>::seed(&device, epoch_seed(exp.seed, SeedStream::Router, usize::MAX));
    let mut learner = RnpLearner::new(backbone, ctx.in_channels, &ctl, &rl, exp.seed);
    if state.tag() > 0 {
        let file = ck.join("router.safetensors");
        let router = learner.router.clone();
        learner.router = load_strict(router, &checkpoint::read_model(&file, "channel-router", Some(state.rl_epochs))?, &file.display().to_string())?;
        learner.step = state.step;
        learner.price = state.price.unwrap_or(rl.compute_penalty);
        for (opt, name, steps) in [
            (&mut learner.router_opt, "router.optim.safetensors", state.router_optimizer_steps),
            (&mut learner.backbone_opt, "backbone.optim.safetensors", state.backbone_optimizer_steps),
        ] {
            let file = ck.join(name);
            opt.load_state_dict(&checkpoint::read_model(&file, "channel-router", Some(state.rl_epochs))?, &device)?;
            opt.steps = steps;
        }
        if rl.algorithm == Algorithm::Dqn && state.rl_epochs < rl.epochs {
            let updates = state.dqn_updates.with_context(|| format!("{}: a DQN run's state without its update count", run_dir.display()))?;
            let (replay, target) = (ck.join(DQN_REPLAY), ck.join(DQN_TARGET));
            learner.restore_dqn(
                &checkpoint::read_model(&replay, "channel-router", Some(state.rl_epochs))?,
                &checkpoint::read_model(&target, "channel-router", Some(state.rl_epochs))?,
                updates,
                &replay.display().to_string(),
            )?;
        }
    }
    let steps_per_epoch = train_loader.num_batches();
    let mut history = Vec::new();
    let mut best = state.best.unwrap_or(f64::NEG_INFINITY);
    let mut last_eval = None;
    let stop_here = |st: &RnpState| opts.stop_after_epoch == Some(st.tag());
    // `--stop-after-epoch 0`: stop once the backbone (phase 1) is done.
    let mut interrupted = stop_here(&state);
    let router_epochs = if interrupted { rl.epochs..rl.epochs } else { state.rl_epochs..rl.epochs };
    for epoch in router_epochs {
        <B as Backend>::seed(&device, epoch_seed(exp.seed, SeedStream::Router, epoch));
        let t0 = Instant::now();
        let mut batches = epoch_batches(train_loader.epoch(exp.train.epochs + epoch), steps_per_epoch, &format!("rl epoch {}/{}", epoch + 1, rl.epochs));
        let (mut sum, mut count) = (UpdateStats::default(), 0usize);
        let mut rollout_images = 0usize;
        let mut rollout_secs = 0.0;
        for batch in &mut batches {
            let batch = batch?;
            let ts = Instant::now();
            let rep = learner.step(&batch, rl.lr, rl.backbone_lr)?;
            rollout_secs += ts.elapsed().as_secs_f64();
            rollout_images += batch.len();
            let s = &rep.stats;
            for (a, b) in [
                (&mut sum.reward_mean, s.reward_mean),
                (&mut sum.reward_std, s.reward_std),
                (&mut sum.accuracy_term, s.accuracy_term),
                (&mut sum.top1, s.top1),
                (&mut sum.flops_ratio, s.flops_ratio),
                (&mut sum.entropy, s.entropy),
                (&mut sum.value_loss, s.value_loss),
                (&mut sum.clip_fraction, s.clip_fraction),
                (&mut sum.approx_kl, s.approx_kl),
                (&mut sum.epsilon, s.epsilon),
                (&mut sum.td_loss, s.td_loss),
                (&mut sum.q_mean, s.q_mean),
            ] {
                *a += b;
            }
            count += 1;
            let step = learner.step as i64;
            if learner.step.is_multiple_of(exp.log.every_steps as u64)
                && let Some(tb) = tb.as_mut()
            {
                {
                    tb.scalar("rl/reward_mean", step, s.reward_mean)?;
                    tb.scalar("rl/reward_std", step, s.reward_std)?;
                    tb.scalar("rl/accuracy_term", step, s.accuracy_term)?;
                    tb.scalar("rl/flops_ratio", step, s.flops_ratio)?;
                    tb.scalar("rl/entropy", step, s.entropy)?;
                    for (name, v) in s.algorithm_scalars(rl.algorithm) {
                        tb.scalar(&format!("rl/{name}"), step, v)?;
                    }
                    tb.scalar("rl/train_top1", step, s.top1)?;
                    tb.scalar("rl/lr", step, rl.lr)?;
                    tb.scalar("rl/price", step, learner.price)?;
                    tb.scalar("rl/backbone_lr", step, rl.backbone_lr)?;
                    if let Some(l) = rep.backbone_loss {
                        tb.scalar("rl/backbone_loss", step, l)?;
                    }
                }
            }
        }
        if batches.finish() {
            interrupted = true;
            break;
        }
        let c = count.max(1) as f64;
        let ev = evaluate_controlled(&learner.backbone.valid(), &learner.router.valid(), test_loader)?;
        let secs = t0.elapsed().as_secs_f64();
        tracing::info!(
            "rl epoch {}/{}: reward {:.4} ± {:.4}, train flops {:.3}, entropy {:.3} | test top-1 {:.2}% at flops ratio {:.3} | {:.1}s ({:.0} img/s rollout+update)",
            epoch + 1,
            rl.epochs,
            sum.reward_mean / c,
            sum.reward_std / c,
            sum.flops_ratio / c,
            sum.entropy / c,
            100.0 * ev.top1,
            ev.flops_ratio,
            secs,
            rollout_images as f64 / rollout_secs.max(1e-9)
        );
        metrics.write(&json!({
            "rl_epoch": epoch + 1, "step": learner.step, "reward_mean": sum.reward_mean / c, "reward_std": sum.reward_std / c,
            "accuracy_term": sum.accuracy_term / c, "train_flops_ratio": sum.flops_ratio / c, "entropy": sum.entropy / c,
            "algorithm": rl.algorithm, "algorithm_stats": sum.algorithm_scalars(rl.algorithm).into_iter()
                .map(|(k, v)| (k.to_string(), json!(v / c))).collect::<serde_json::Map<_, _>>(),
            "value_loss": sum.value_loss / c, "train_top1": sum.top1 / c, "test_top1": ev.top1, "test_loss": ev.loss,
            "test_flops_ratio": ev.flops_ratio, "layer_flops_ratio": ev.layer_flops_ratio,
            "action_distribution": ev.action_distribution, "seconds": secs,
            "rollout_images_per_s": rollout_images as f64 / rollout_secs.max(1e-9), "workers": rl.workers,
            "price": learner.price,
        }))?;
        if let Some(tb) = tb.as_mut() {
            let step = learner.step as i64;
            tb.scalar("test/top1", step, ev.top1)?;
            tb.scalar("test/loss", step, ev.loss)?;
            tb.scalar("test/flops_ratio", step, ev.flops_ratio)?;
            for (t, acts) in ev.actions.iter().enumerate() {
                tb.histogram(&format!("rl/actions/layer{t}"), step, acts)?;
                tb.scalar(&format!("test/flops_ratio/layer{t}"), step, ev.layer_flops_ratio[t])?;
            }
            tb.flush()?;
        }
        std::fs::create_dir_all(&ck)
            .with_context(|| format!("{}: cannot create checkpoint directory", ck.display()))?;
        let bb = state_dict(&learner.backbone.valid());
        let rt = state_dict(&learner.router.valid());
        save_weights(&ck.join("last.safetensors"), &bb, &exp.backbone.arch, epoch + 1, "model")?;
        save_weights(&ck.join("router.safetensors"), &rt, "channel-router", epoch + 1, "router")?;
        save_weights(&ck.join("router.optim.safetensors"), &learner.router_opt.state_dict(), "channel-router", epoch + 1, "optimizer")?;
        save_weights(&ck.join("backbone.optim.safetensors"), &learner.backbone_opt.state_dict(), "channel-router", epoch + 1, "optimizer")?;
        if let Some((replay, target, updates)) = learner.dqn_checkpoint() {
            save_weights(&ck.join(DQN_REPLAY), &replay, "channel-router", epoch + 1, "replay")?;
            save_weights(&ck.join(DQN_TARGET), &target, "channel-router", epoch + 1, "router")?;
            state.dqn_updates = Some(updates);
        }
        if ev.top1 > best {
            best = ev.top1;
            save_weights(&ck.join("best.safetensors"), &bb, &exp.backbone.arch, epoch + 1, "model")?;
            save_weights(&ck.join("router_best.safetensors"), &rt, "channel-router", epoch + 1, "router")?;
            state.best_flops = Some(ev.flops_ratio);
        }
        state.rl_epochs = epoch + 1;
        state.step = learner.step;
        state.price = Some(learner.price);
        state.router_optimizer_steps = learner.router_opt.steps;
        state.backbone_optimizer_steps = learner.backbone_opt.steps;
        state.best = Some(best);
        save_rnp_state(run_dir, &state)?;
        history.push(EpochMetrics {
            epoch: epoch + 1,
            train_loss: -sum.reward_mean / c,
            train_top1: sum.top1 / c,
            test_loss: ev.loss,
            test_top1: ev.top1,
            lr: rl.lr,
            seconds: secs,
        });
        last_eval = Some(ev);
        if stop_here(&state) {
            interrupted = true;
            break;
        }
    }
    // 4. Fine-tuning of the backbone under the frozen router's greedy decisions.
    if rl.finetune_epochs > 0 && !interrupted {
        let mut opt = Optimizer::<B>::new(OptimizerConfig::Sgd {
            lr: rl.finetune_lr,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: false,
        });
        if state.finetune_epochs > 0 {
            let file = ck.join("finetune.optim.safetensors");
            opt.load_state_dict(&checkpoint::read_model(&file, &exp.backbone.arch, Some(state.tag()))?, &device)?;
            opt.steps = state.finetune_optimizer_steps;
        }
        let total = (rl.finetune_epochs * steps_per_epoch) as f64;
        let mut ft_best = state.finetune_best.unwrap_or(f64::NEG_INFINITY);
        let mut done = state.finetune_epochs * steps_per_epoch;
        for epoch in state.finetune_epochs..rl.finetune_epochs {
            <B as Backend>::seed(&device, epoch_seed(exp.seed, SeedStream::RouterFineTune, epoch));
            let t0 = Instant::now();
            let mut batches = epoch_batches(train_loader.epoch(exp.train.epochs + rl.epochs + epoch), steps_per_epoch, &format!("fine-tune epoch {}/{}", epoch + 1, rl.finetune_epochs));
            let router = learner.router.valid();
            let (mut loss_sum, mut n_correct, mut n_seen) = (0.0f64, 0usize, 0usize);
            for batch in &mut batches {
                let batch = batch?;
                let lr = 0.5 * rl.finetune_lr * (1.0 + (std::f64::consts::PI * done as f64 / total).cos());
                let (loss, hits) = finetune_step(&mut learner.backbone, &router, &mut opt, &batch, lr, &device)?;
                loss_sum += loss * batch.len() as f64;
                n_correct += hits;
                n_seen += batch.len();
                done += 1;
                if done.is_multiple_of(exp.log.every_steps)
                    && let Some(tb) = tb.as_mut()
                {
                    tb.scalar("finetune/loss", (learner.step + done as u64) as i64, loss)?;
                    tb.scalar("finetune/lr", (learner.step + done as u64) as i64, lr)?;
                }
            }
            if batches.finish() {
                interrupted = true;
                break;
            }
            let ev = evaluate_controlled(&learner.backbone.valid(), &router, test_loader)?;
            let secs = t0.elapsed().as_secs_f64();
            let step = (learner.step + done as u64) as i64;
            let train_loss = loss_sum / n_seen.max(1) as f64;
            let train_top1 = n_correct as f64 / n_seen.max(1) as f64;
            tracing::info!(
                "fine-tune epoch {}/{}: train loss {:.4}, train top-1 {:.2}% | test top-1 {:.2}% at flops ratio {:.3} | {:.1}s",
                epoch + 1,
                rl.finetune_epochs,
                train_loss,
                100.0 * train_top1,
                100.0 * ev.top1,
                ev.flops_ratio,
                secs
            );
            metrics.write(&json!({
                "finetune_epoch": epoch + 1, "step": step, "train_loss": train_loss, "train_top1": train_top1,
                "test_top1": ev.top1, "test_loss": ev.loss, "test_flops_ratio": ev.flops_ratio,
                "layer_flops_ratio": ev.layer_flops_ratio, "action_distribution": ev.action_distribution, "seconds": secs,
            }))?;
            if let Some(tb) = tb.as_mut() {
                tb.scalar("test/top1", step, ev.top1)?;
                tb.scalar("test/loss", step, ev.loss)?;
                tb.scalar("test/flops_ratio", step, ev.flops_ratio)?;
                tb.flush()?;
            }
            // From here on the router is fixed, so `best` is the best fine-tuned backbone with it.
            let bb = state_dict(&learner.backbone.valid());
            let rt = state_dict(&router);
            let tag = rl.epochs + epoch + 1;
            save_weights(&ck.join("last.safetensors"), &bb, &exp.backbone.arch, tag, "model")?;
            save_weights(&ck.join("finetune.optim.safetensors"), &opt.state_dict(), &exp.backbone.arch, tag, "optimizer")?;
            if ev.top1 > ft_best {
                ft_best = ev.top1;
                save_weights(&ck.join("best.safetensors"), &bb, &exp.backbone.arch, tag, "model")?;
                save_weights(&ck.join("router_best.safetensors"), &rt, "channel-router", tag, "router")?;
                state.best_flops = Some(ev.flops_ratio);
            }
            state.finetune_epochs = epoch + 1;
            state.finetune_optimizer_steps = opt.steps;
            state.finetune_best = Some(ft_best);
            save_rnp_state(run_dir, &state)?;
            history.push(EpochMetrics {
                epoch: tag,
                train_loss,
                train_top1,
                test_loss: ev.loss,
                test_top1: ev.top1,
                lr: rl.finetune_lr,
                seconds: secs,
            });
            last_eval = Some(ev);
            if stop_here(&state) {
                interrupted = true;
                break;
            }
        }
        if ft_best.is_finite() {
            best = ft_best;
        }
    }
    if let (Some(tb), Some(ev), false) = (tb.as_mut(), &last_eval, interrupted) {
        let hp = vec![
            ("arch".to_string(), HParamValue::Text(exp.backbone.arch.clone())),
            ("controller".to_string(), HParamValue::Text(ctl.kind.clone())),
            ("groups".to_string(), HParamValue::Number(ctl.groups as f64)),
            ("hidden".to_string(), HParamValue::Number(ctl.hidden as f64)),
            ("compute_penalty".to_string(), HParamValue::Number(rl.compute_penalty)),
            ("flops_target".to_string(), HParamValue::Number(rl.flops_target.unwrap_or(1.0))),
            ("accuracy_reward".to_string(), HParamValue::Text(rl.accuracy_reward.to_string())),
            ("algorithm".to_string(), HParamValue::Text(rl.algorithm.to_string())),
            ("rnn".to_string(), HParamValue::Text(ctl.rnn.to_string())),
            ("baseline".to_string(), HParamValue::Text(rl.baseline.to_string())),
            ("budget".to_string(), HParamValue::Text(rl.budget.to_string())),
            ("lr".to_string(), HParamValue::Number(rl.lr)),
            ("workers".to_string(), HParamValue::Number(rl.workers as f64)),
            ("finetune_epochs".to_string(), HParamValue::Number(rl.finetune_epochs as f64)),
            ("seed".to_string(), HParamValue::Number(exp.seed as f64)),
        ];
        let finals = vec![
            ("hparams/test_top1".to_string(), ev.top1),
            ("hparams/flops_ratio".to_string(), ev.flops_ratio),
            ("hparams/unpruned_top1".to_string(), unpruned_top1),
        ];
        tb.hparams(&hp, &finals, learner.step as i64)?;
        tb.flush()?;
    }
    tracing::info!("done in {:.1}s (backbone phase {:.1}s)", session.seconds(), backbone_seconds);
    let outcome = state.best_flops.map(|flops_ratio| crate::session::supervised::PruningOutcome {
        backbone_top1: unpruned_top1,
        top1: best,
        flops_ratio,
    });
    Ok(TrainSummary { run_dir: run_dir.clone(), epochs_done: history.len(), history, best_top1: best, interrupted, outcome, peers: Vec::new() })
}

/// `rlprune eval RUN_DIR` for an RNP run: greedy top-1, mean and per-layer FLOPs ratio, the
/// action distribution per layer, and measured latency / throughput at batch 1 and 64 of the
/// routed backbone against the same backbone unpruned.
/// An RNP run's routed network as evaluated: the backbone and router weights (best, else last),
/// the test split's loader and the experiment's build context.
pub struct RoutedRun {
    pub backbone: AnyBackbone<Cpu>,
    pub router: ChannelRouter<Cpu>,
    pub test_loader: Loader,
    pub backbone_file: std::path::PathBuf,
    pub router_file: std::path::PathBuf,
    pub ctx: crate::backbones::BuildContext,
}

/// Loads what [`eval_rnp_run`] evaluates.
pub fn load_routed_run(exp: &Experiment, layered: &Layered, run_dir: &Path, base: &Path) -> Result<RoutedRun> {
    let ctl = exp.controller.clone().ok_or_else(|| anyhow::anyhow!("an RNP run needs a [controller] section"))?;
    let rl = exp.rl.clone().unwrap_or_default();
    let ck = checkpoint::dir(run_dir);
    let (bfile, rfile) = if ck.join("best.safetensors").is_file() && ck.join("router_best.safetensors").is_file() {
        (ck.join("best.safetensors"), ck.join("router_best.safetensors"))
    } else {
        (ck.join("last.safetensors"), ck.join("router.safetensors"))
    };
    let EvalData { test_loader, ctx, .. } = EvalData::open(exp, base)?;
    let device = Default::default();
    let model: AnyBackbone<Cpu> = skeleton(exp, layered, &ctx, base, &device)?;
    let backbone =
        load_strict(model, &checkpoint::read_model(&bfile, &exp.backbone.arch, None)?, &bfile.display().to_string())?;
    let in_ch = ChannelRouter::<Cpu>::input_channels(ctx.in_channels, &backbone.prunable_convs());
    let router = ChannelRouter::<Cpu>::new(&ctl, &in_ch, rl.value_head(), &device);
    let router = load_strict(router, &crate::import::read_safetensors(&rfile)?, &rfile.display().to_string())?;
    Ok(RoutedRun { backbone, router, test_loader, backbone_file: bfile, router_file: rfile, ctx })
}

pub fn eval_rnp_run(exp: &Experiment, layered: &Layered, run_dir: &Path, base: &Path) -> Result<serde_json::Value> {
    let ctl = exp.controller.clone().ok_or_else(|| anyhow::anyhow!("eval_rnp_run needs a [controller] section"))?;
    let RoutedRun { backbone, router, test_loader, backbone_file: bfile, router_file: rfile, ctx } =
        load_routed_run(exp, layered, run_dir, base)?;
    let device = Default::default();
    let mut nobase = exp.clone();
    nobase.backbone.weights = None;
    let ev = evaluate_controlled(&backbone, &router, &test_loader)?;
    // The same (fine-tuned) weights with every channel computed.
    let (_, unpruned_top1) = supervised::evaluate(&backbone, &test_loader, &device)?;

    // The backbone as trained before routing (phase 1, or `[backbone] weights`).
    let original = [run_dir.join("backbone/checkpoints/last.safetensors")]
        .into_iter()
        .chain(exp.backbone.weights.as_ref().map(|w| base.join(w)))
        .find(|p| p.is_file());
    let backbone_top1 = match original {
        Some(p) => {
            let dict = crate::import::read_model_weights(&p)?;
            let m = load_strict(build_backbone::<Cpu>(&nobase, layered, &ctx, base, &device)?, &dict, &p.display().to_string())?;
            Some(supervised::evaluate(&m, &test_loader, &device)?.1)
        }
        None => None,
    };
    // Latency and throughput, same weights, routed vs unpruned.
    let sample = crate::methods::eval::example_images(&test_loader)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // One policy for every call, as a deployed router would be held.
    let mut policy = RouterPolicy::new(router.clone());
    let bench = crate::methods::eval::latency_against_unpruned(
        &sample,
        ev.flops_ratio,
        |x| {
            let _ = backbone.forward(x).into_data();
            Ok(())
        },
        |x| {
            let (l, _) = backbone.forward_controlled(x, &mut policy, Mode::Greedy, &mut rng)?;
            let _ = l.into_data();
            Ok(())
        },
    )?;
    Ok(json!({
        "source": run_dir.display().to_string(),
        "arch": exp.backbone.arch,
        "controller": ctl.kind,
        "weights": bfile.display().to_string(),
        "router": rfile.display().to_string(),
        "images": ev.images,
        "top1": ev.top1,
        "loss": ev.loss,
        "full_compute_top1": unpruned_top1,
        "backbone_top1": backbone_top1,
        "flops_ratio": ev.flops_ratio,
        "flops_reduction": 1.0 / ev.flops_ratio.max(1e-12),
        "layers": ev.layers,
        "layer_flops_ratio": ev.layer_flops_ratio,
        "action_distribution": ev.action_distribution,
        "width_paths": ev.width_paths,
        "per_class": ev.per_class,
        "latency": bench,
    }))
}

#[cfg(test)]
mod tests {
    use super::decision_summary;

    #[test]
    fn width_paths_and_class_spend_follow_the_images() {
        // Four images over two routed layers of 100 + 300 MACs at full width.
        let paths = vec![vec![1, 2], vec![2, 2], vec![1, 2], vec![2, 4]];
        let spent = vec![100, 200, 100, 400];
        let labels = vec![0, 1, 0, 1];
        let right = vec![true, false, true, true];
        let names: Vec<String> = ["bag", "shirt", "coat"].iter().map(|s| s.to_string()).collect();
        let (paths, classes) = decision_summary(&paths, &spent, 400, &labels, &right, &names);
        assert_eq!(paths.len(), 3);
        assert_eq!(paths[0].groups, vec![1, 2]);
        assert_eq!((paths[0].share, paths[0].top1, paths[0].flops_ratio), (0.5, 1.0, 0.25));
        assert_eq!(paths[1].groups, vec![2, 2], "ties are listed in path order");
        assert_eq!((paths[1].top1, paths[1].flops_ratio), (0.0, 0.5));
        assert_eq!(classes.len(), 2, "a class with no image is left out");
        assert_eq!((classes[0].class.as_str(), classes[0].images, classes[0].flops_ratio), ("bag", 2, 0.25));
        assert_eq!((classes[1].class.as_str(), classes[1].top1, classes[1].flops_ratio), ("shirt", 0.5, 0.75));
    }
}
