//! The static baseline RNP is compared against: L1-norm filter pruning (Li, Kadav, Durdanovic,
//! Samet, Graf, "Pruning Filters for Efficient ConvNets", ICLR 2017), then fine-tuning.
//!
//! Every prunable conv keeps its `keep[i]` filters of largest L1 norm. The others are removed
//! *physically*: the conv weight, its BN entries and the input channels of the layer that reads
//! them are sliced, so the result is an ordinary, smaller dense network whose plain `forward`
//! computes fewer channels (no controller, no masks, any channel count). Per-layer counts come
//! from one of two allocations that reach `target_flops` (decision-layer MACs, the same measure
//! as RNP's FLOPs ratio):
//! - `uniform`: one keep ratio for every layer, found by bisection;
//! - `sensitivity`: each layer is pruned alone to a few ratios and the top-1 drop measured on a
//!   class-balanced slice of the *training* split (the test split stays unseen); every layer then
//!   gets the smallest ratio whose interpolated drop stays under a common threshold, and the
//!   threshold is found by bisection.
//!
//! A run directory holds `pruning.json` (the plan), `checkpoints/{last,best}.safetensors` (the
//! pruned weights) and `checkpoints/unpruned.safetensors` (the backbone before pruning).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::ElementConversion;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::controllers::ControllerConfig;
use crate::backbones::{AnyBackbone, Backbone};
use crate::data::{self, Loader, Subset};
use crate::experiment::{Experiment, Layered};
use crate::logging::progress;
use crate::logging::tensorboard::HParamValue;
use crate::nn::params::{load_strict, state_dict};
use crate::train::checkpoint::{self, save_weights};
use crate::train::losses::{correct, cross_entropy};
use crate::train::optim::{Optimizer, OptimizerConfig};
use crate::session::run::RunLogs;
use crate::session::{Resumable, Session, epoch_batches, EvalData, skeleton};
use crate::session::supervised::{
    self, EpochMetrics, TrainOptions, TrainSummary,
};
use crate::{Cpu, CpuAutodiff};

type Ad = CpuAutodiff;

choice! {
    /// `[controller] allocation`: how static L1 spreads `target_flops` over the layers.
    #[derive(Default)]
    pub enum Allocation { #[default] Uniform = "uniform", Sensitivity = "sensitivity" }
    invalid: |s| format!("must be \"uniform\" or \"sensitivity\", got \"{s}\"")
}

/// `[controller] kind = "static-l1"` keys (besides `kind`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaticL1Options {
    /// Decision-layer MACs of the pruned network / the unpruned one.
    pub target_flops: f64,
    pub allocation: Allocation,
    /// Epochs of fine-tuning after pruning (0 = none).
    pub fine_tune_epochs: usize,
    /// Initial fine-tuning learning rate (SGD, momentum 0.9, weight decay 5e-4, cosine to 0).
    pub fine_tune_lr: f64,
    /// Images of the class-balanced training slice the sensitivity scan evaluates on.
    pub sensitivity_images: usize,
    /// Keep ratios each layer is scanned at (the smallest is also the floor of the allocation).
    pub sensitivity_ratios: Vec<f64>,
}

impl Default for StaticL1Options {
    fn default() -> Self {
        Self {
            target_flops: 0.5,
            allocation: Allocation::default(),
            fine_tune_epochs: 2,
            fine_tune_lr: 0.01,
            sensitivity_images: 1000,
            sensitivity_ratios: vec![0.125, 0.25, 0.5, 0.75],
        }
    }
}


impl StaticL1Options {
    /// Parses `[controller]`'s kind-specific keys; errors as (key, message).
    pub fn from_config(cfg: &ControllerConfig) -> std::result::Result<Self, (String, String)> {
        cfg.kind_options()
    }

    fn problems(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if !(self.target_flops > 0.0 && self.target_flops <= 1.0) {
            v.push(("target_flops".into(), format!("must be in (0, 1], got {}", self.target_flops)));
        }
        if !(self.fine_tune_lr > 0.0 && self.fine_tune_lr.is_finite()) {
            v.push(("fine_tune_lr".into(), format!("must be > 0, got {}", self.fine_tune_lr)));
        }
        if self.sensitivity_images == 0 {
            v.push(("sensitivity_images".into(), "must be > 0, got 0".into()));
        }
        if self.sensitivity_ratios.is_empty() || self.sensitivity_ratios.iter().any(|&r| !(r > 0.0 && r < 1.0)) {
            v.push((
                "sensitivity_ratios".into(),
                format!("must be a non-empty list of ratios in (0, 1), got {:?}", self.sensitivity_ratios),
            ));
        }
        v
    }
}

/// The registry's option check for `static-l1`.
pub fn check_options(cfg: &ControllerConfig) -> Vec<(String, String)> {
    match StaticL1Options::from_config(cfg) {
        Ok(o) => o.problems(),
        Err(p) => vec![p],
    }
}

// ---------------------------------------------------------------------------------------------
// Allocation of per-layer channel counts
// ---------------------------------------------------------------------------------------------

/// Decision-layer MACs per image of `model` pruned to `keep`, per layer.
pub fn pruned_macs(model: &AnyBackbone<Cpu>, keep: &[usize]) -> Result<Vec<u64>> {
    let mut m = model.clone();
    m.prune_channels(keep)?;
    Ok(m.prunable_convs().iter().map(|c| c.macs).collect())
}

fn flops_ratio_of(model: &AnyBackbone<Cpu>, keep: &[usize], full: u64) -> Result<f64> {
    Ok(pruned_macs(model, keep)?.iter().sum::<u64>() as f64 / full.max(1) as f64)
}

fn keep_at(out: usize, ratio: f64) -> usize {
    ((out as f64 * ratio).round() as usize).clamp(1, out)
}

/// One keep ratio for every layer: the largest (to 1e-4) whose FLOPs ratio is ≤ `target`.
pub fn uniform_allocation(model: &AnyBackbone<Cpu>, target: f64) -> Result<Vec<usize>> {
    let outs: Vec<usize> = model.prunable_convs().iter().map(|c| c.out_channels).collect();
    if outs.is_empty() {
        bail!("this backbone has no prunable convs");
    }
    let full: u64 = model.prunable_convs().iter().map(|c| c.macs).sum();
    let plan = |r: f64| outs.iter().map(|&o| keep_at(o, r)).collect::<Vec<_>>();
    if flops_ratio_of(model, &plan(1.0), full)? <= target {
        return Ok(plan(1.0));
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while hi - lo > 1e-4 {
        let mid = 0.5 * (lo + hi);
        if flops_ratio_of(model, &plan(mid), full)? <= target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let keep = plan(lo);
    let achieved = flops_ratio_of(model, &keep, full)?;
    if achieved > target + 1e-9 {
        bail!("target_flops {target} is not reachable: keeping one channel per layer still costs {achieved:.4}");
    }
    Ok(keep)
}

/// The sensitivity scan: per layer, `(keep ratio, top-1 drop)` when that layer alone is pruned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sensitivity {
    pub base_top1: f64,
    pub images: usize,
    /// Per layer, `(ratio, drop)` sorted by ratio, with `(1.0, 0.0)` appended.
    pub curves: Vec<Vec<(f64, f64)>>,
}

/// Runs the scan on `slice` (evaluation transform, no augmentation).
pub fn sensitivity_scan(model: &AnyBackbone<Cpu>, slice: &Loader, ratios: &[f64]) -> Result<Sensitivity> {
    let device = Default::default();
    let (_, base) = supervised::evaluate(model, slice, &device)?;
    let outs: Vec<usize> = model.prunable_convs().iter().map(|c| c.out_channels).collect();
    let mut ratios = ratios.to_vec();
    ratios.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let bar = progress::bar((outs.len() * ratios.len()) as u64, "sensitivity scan");
    let mut curves = Vec::with_capacity(outs.len());
    for i in 0..outs.len() {
        let mut curve = Vec::new();
        for &r in &ratios {
            let mut keep = outs.clone();
            keep[i] = keep_at(outs[i], r);
            let mut m = model.clone();
            m.prune_channels(&keep)?;
            let (_, top1) = supervised::evaluate(&m, slice, &device)?;
            curve.push((keep[i] as f64 / outs[i] as f64, base - top1));
            bar.inc(1);
        }
        curve.push((1.0, 0.0));
        curves.push(curve);
    }
    bar.finish_and_clear();
    Ok(Sensitivity { base_top1: base, images: slice.dataset().len(), curves })
}

/// Top-1 drop of a layer at keep ratio `r`: linear between scanned points, made non-increasing
/// in `r` (a measured drop at a larger ratio bounds the drop at smaller ones from below).
fn interpolated_drop(curve: &[(f64, f64)], r: f64) -> f64 {
    let mut mono: Vec<(f64, f64)> = curve.to_vec();
    for j in (0..mono.len().saturating_sub(1)).rev() {
        mono[j].1 = mono[j].1.max(mono[j + 1].1);
    }
    if r <= mono[0].0 {
        return mono[0].1;
    }
    for w in mono.windows(2) {
        let ((r0, d0), (r1, d1)) = (w[0], w[1]);
        if r <= r1 {
            let t = if r1 > r0 { (r - r0) / (r1 - r0) } else { 1.0 };
            return d0 + t * (d1 - d0);
        }
    }
    0.0
}

/// Every layer keeps the fewest channels (not below the smallest scanned ratio) whose
/// interpolated drop is ≤ a common threshold; the smallest threshold that meets `target` wins.
pub fn sensitivity_allocation(model: &AnyBackbone<Cpu>, sens: &Sensitivity, target: f64) -> Result<Vec<usize>> {
    let outs: Vec<usize> = model.prunable_convs().iter().map(|c| c.out_channels).collect();
    let full: u64 = model.prunable_convs().iter().map(|c| c.macs).sum();
    let plan = |tau: f64| -> Vec<usize> {
        outs.iter()
            .zip(&sens.curves)
            .map(|(&o, curve)| {
                let floor = keep_at(o, curve[0].0);
                (floor..=o).find(|&c| interpolated_drop(curve, c as f64 / o as f64) <= tau).unwrap_or(o)
            })
            .collect()
    };
    let max_drop = sens.curves.iter().flatten().map(|&(_, d)| d).fold(0.0f64, f64::max);
    let min_drop = sens.curves.iter().flatten().map(|&(_, d)| d).fold(0.0f64, f64::min);
    let (mut lo, mut hi) = (min_drop - 1e-6, max_drop + 1e-6);
    let floor_ratio = flops_ratio_of(model, &plan(hi), full)?;
    if floor_ratio > target {
        bail!(
            "target_flops {target} is not reachable with the sensitivity allocation: every layer at its smallest scanned ratio costs {floor_ratio:.4} (add a smaller controller.sensitivity_ratios entry)"
        );
    }
    for _ in 0..50 {
        let mid = 0.5 * (lo + hi);
        if flops_ratio_of(model, &plan(mid), full)? <= target {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(plan(hi))
}

// ---------------------------------------------------------------------------------------------
// The `rlprune train` pipeline
// ---------------------------------------------------------------------------------------------

/// The pruning plan written to `<run>/pruning.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruningPlan {
    pub arch: String,
    pub allocation: String,
    pub target_flops: f64,
    pub layers: Vec<String>,
    pub out_channels: Vec<usize>,
    pub keep: Vec<usize>,
    /// Decision-layer MACs pruned / unpruned, overall and per layer.
    pub flops_ratio: f64,
    pub layer_flops_ratio: Vec<f64>,
    pub unpruned_top1: f64,
    /// Test top-1 right after pruning, before fine-tuning.
    pub pruned_top1_before_fine_tune: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<Sensitivity>,
}

pub const PLAN_FILE: &str = "pruning.json";


/// Where a static-l1 run stands after its last completed fine-tuning epoch:
/// `checkpoints/static_state.json`, written last (atomically), after `last.safetensors`,
/// `best.safetensors` and `fine_tune.optim.safetensors`, which carry the same epoch tag. With
/// `pruning.json` (the kept channels) this is everything `--resume` needs: the data order is a
/// pure function of (seed, epoch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StaticState {
    pub format: String,
    pub arch: String,
    /// Fine-tuning epochs completed.
    pub epochs: usize,
    /// Fine-tuning steps done (the cosine schedule's position).
    pub step: usize,
    pub optimizer_steps: u64,
    /// Best test top-1 so far (the pruned network before fine-tuning included).
    pub best: f64,
}

const STATIC_STATE: &str = "static_state.json";

/// Static L1 filter pruning: `[controller] kind = "static-l1"`.
pub const METHOD: super::Method =
    super::Method { name: "static-l1", check_options, train: train_static, eval: eval_static_run, visualize: None };

/// `rlprune train` for `[controller] kind = "static-l1"`: the backbone (trained into
/// `<run>/backbone/` unless `[backbone] weights` is given), the allocation, physical L1 pruning,
/// then `fine_tune_epochs` of fine-tuning. `--resume` continues phase 1, or the fine-tuning
/// from its last completed epoch (the pruned network is rebuilt from `pruning.json`).
pub fn train_static(exp: &Experiment, layered: &Layered, opts: &TrainOptions) -> Result<TrainSummary> {
    let ctl = exp.controller.clone().ok_or_else(|| anyhow::anyhow!("train_static needs a [controller] section"))?;
    let so = StaticL1Options::from_config(&ctl).map_err(|(k, m)| layered.error_at(&format!("controller.{k}"), m))?;
    let session = Session::open(exp, layered, opts, Resumable::Yes)?;
    let (run_dir, splits, train_loader, test_loader) = (&session.run_dir, &session.splits, &session.train_loader, &session.test_loader);
    let resumed = session.resumed_state(STATIC_STATE, |st: &StaticState| &st.format)?;
    if let Some(st) = &resumed {
        session.check_arch(&st.arch)?;
    }
    let device: burn::tensor::Device<Ad> = Default::default();

    // 1. The backbone (a resumed run's phase 1 is continued, or only loaded when complete).
    let mut model: AnyBackbone<Ad> = match session.pretrained_backbone("backbone", &device)? {
        Ok(m) => m,
        Err(interrupted) => return Ok(interrupted),
    };
    let RunLogs { mut metrics, mut tb } = session.logs()?;
    let ck = session.checkpoint_dir()?;

    // 2. Allocation and physical pruning, or, resuming, the pruned network of the last epoch.
    let plan = match &resumed {
        Some(st) => {
            let plan = read_plan(run_dir)?;
            if plan.allocation != so.allocation.as_str() || plan.target_flops != so.target_flops {
                bail!(
                    "{}: run was pruned with allocation '{}' at target_flops {}, the experiment says '{}' at {}",
                    run_dir.display(),
                    plan.allocation,
                    plan.target_flops,
                    so.allocation,
                    so.target_flops
                );
            }
            model.prune_channels(&plan.keep)?;
            let file = ck.join("last.safetensors");
            model = load_strict(model, &checkpoint::read_model(&file, &exp.backbone.arch, Some(st.epochs))?, &file.display().to_string())?;
            tracing::info!("resuming {} after {} fine-tuning epochs", run_dir.display(), st.epochs);
            plan
        }
        None => prune_by_plan(&mut model, exp, &so, splits, test_loader, &ck, run_dir, tb.as_mut())?,
    };
    let (unpruned_top1, pruned_top1, flops_ratio) = (plan.unpruned_top1, plan.pruned_top1_before_fine_tune, plan.flops_ratio);

    // 3. Fine-tuning (BN in training mode: the pruned network is an ordinary dense one).
    let mut optim = Optimizer::<Ad>::new(OptimizerConfig::Sgd {
        lr: so.fine_tune_lr,
        momentum: 0.9,
        weight_decay: 5e-4,
        nesterov: false,
    });
    let schedule = crate::train::optim::ScheduleConfig::Cosine { warmup_epochs: 0.0, min_lr: 0.0 };
    let steps_per_epoch = train_loader.num_batches();
    let total = steps_per_epoch * so.fine_tune_epochs;
    let mut step = 0usize;
    let mut history = Vec::new();
    let mut best = pruned_top1;
    let mut interrupted = false;
    let first_epoch = match &resumed {
        Some(st) => {
            let file = ck.join("fine_tune.optim.safetensors");
            optim.load_state_dict(&checkpoint::read_model(&file, &exp.backbone.arch, Some(st.epochs))?, &Default::default())?;
            optim.steps = st.optimizer_steps;
            (step, best) = (st.step, st.best);
            st.epochs
        }
        None => {
            save_weights(&ck.join("best.safetensors"), &state_dict(&model.valid()), &exp.backbone.arch, 0, "model")?;
            0
        }
    };
    for epoch in first_epoch..so.fine_tune_epochs {
        let t0 = Instant::now();
        let mut batches = epoch_batches(train_loader.epoch(exp.train.epochs + epoch), steps_per_epoch, &format!("fine-tune {}/{}", epoch + 1, so.fine_tune_epochs));
        let (mut loss_sum, mut n_seen, mut n_correct) = (0.0f64, 0usize, 0usize);
        let mut lr = so.fine_tune_lr;
        for batch in &mut batches {
            let batch = batch?;
            let (x, y) = batch.to_tensors::<Ad>(&device);
            let logits = model.forward(x);
            let loss = cross_entropy(logits.clone(), y.clone(), exp.train.label_smoothing);
            let lv = loss.clone().into_scalar().elem::<f64>();
            if !lv.is_finite() {
                bail!("fine-tuning epoch {}: the loss became {lv}; lower controller.fine_tune_lr", epoch + 1);
            }
            n_correct += correct(logits.detach(), y);
            n_seen += batch.len();
            loss_sum += lv * batch.len() as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            lr = schedule.lr_at(so.fine_tune_lr, step, total, steps_per_epoch);
            model = optim.step(model, grads, lr, 1.0);
            step += 1;
            if step.is_multiple_of(exp.log.every_steps)
                && let Some(tb) = tb.as_mut()
            {
                tb.scalar("fine_tune/loss", step as i64, lv)?;
                tb.scalar("fine_tune/lr", step as i64, lr)?;
            }
        }
        if batches.finish() {
            interrupted = true;
            break;
        }
        let (test_loss, test_top1) = supervised::evaluate(&model.valid(), test_loader, &Default::default())?;
        let m = EpochMetrics::from_sums(epoch + 1, loss_sum, n_correct, n_seen, (test_loss, test_top1), lr, t0);
        tracing::info!(
            "fine-tune {}/{}: train loss {:.4} top1 {:.2}% | test top-1 {:.2}% at flops ratio {:.3} | {:.1}s",
            m.epoch,
            so.fine_tune_epochs,
            m.train_loss,
            100.0 * m.train_top1,
            100.0 * m.test_top1,
            flops_ratio,
            m.seconds
        );
        metrics.write(&json!({
            "fine_tune_epoch": m.epoch, "step": step, "train_loss": m.train_loss, "train_top1": m.train_top1,
            "test_loss": m.test_loss, "test_top1": m.test_top1, "test_flops_ratio": flops_ratio, "lr": m.lr,
            "seconds": m.seconds,
        }))?;
        if let Some(tb) = tb.as_mut() {
            tb.scalar("test/top1", step as i64, test_top1)?;
            tb.scalar("test/loss", step as i64, test_loss)?;
            tb.scalar("test/flops_ratio", step as i64, flops_ratio)?;
            tb.flush()?;
        }
        let dict = state_dict(&model.valid());
        save_weights(&ck.join("last.safetensors"), &dict, &exp.backbone.arch, epoch + 1, "model")?;
        save_weights(&ck.join("fine_tune.optim.safetensors"), &optim.state_dict(), &exp.backbone.arch, epoch + 1, "optimizer")?;
        if test_top1 > best {
            best = test_top1;
            save_weights(&ck.join("best.safetensors"), &dict, &exp.backbone.arch, epoch + 1, "model")?;
        }
        let state = StaticState {
            format: checkpoint::FORMAT.into(),
            arch: exp.backbone.arch.clone(),
            epochs: epoch + 1,
            step,
            optimizer_steps: optim.steps,
            best,
        };
        crate::fsutil::atomic_write(&ck.join(STATIC_STATE), &serde_json::to_vec_pretty(&state)?)?;
        history.push(m);
        if opts.stop_after_epoch == Some(epoch + 1) {
            interrupted = true;
            break;
        }
    }
    if history.is_empty() && resumed.is_none() && !interrupted {
        save_weights(&ck.join("last.safetensors"), &state_dict(&model.valid()), &exp.backbone.arch, 0, "model")?;
    }
    if let (Some(tb), false) = (tb.as_mut(), interrupted) {
        let hp = vec![
            ("arch".to_string(), HParamValue::Text(exp.backbone.arch.clone())),
            ("controller".to_string(), HParamValue::Text(ctl.kind.clone())),
            ("allocation".to_string(), HParamValue::Text(so.allocation.to_string())),
            ("target_flops".to_string(), HParamValue::Number(so.target_flops)),
            ("fine_tune_epochs".to_string(), HParamValue::Number(so.fine_tune_epochs as f64)),
            ("fine_tune_lr".to_string(), HParamValue::Number(so.fine_tune_lr)),
            ("seed".to_string(), HParamValue::Number(exp.seed as f64)),
        ];
        let last = history.last().map(|m| m.test_top1).unwrap_or(pruned_top1);
        let finals = vec![
            ("hparams/test_top1".to_string(), last),
            ("hparams/flops_ratio".to_string(), flops_ratio),
            ("hparams/unpruned_top1".to_string(), unpruned_top1),
        ];
        tb.hparams(&hp, &finals, step as i64)?;
        tb.flush()?;
    }
    tracing::info!("done in {:.1}s", session.seconds());
    Ok(TrainSummary { run_dir: run_dir.clone(), epochs_done: history.len(), history, best_top1: best, interrupted, outcome: None, peers: Vec::new() })
}

/// Phase 2 of a fresh static-l1 run: the allocation (uniform or from a sensitivity scan) and
/// physical L1 pruning of `model`, written to `pruning.json`; `unpruned.safetensors` keeps the
/// network it started from.
#[allow(clippy::too_many_arguments)]
fn prune_by_plan(
    model: &mut AnyBackbone<Ad>,
    exp: &Experiment,
    so: &StaticL1Options,
    splits: &data::DataSplits,
    test_loader: &Loader,
    ck: &Path,
    run_dir: &Path,
    tb: Option<&mut crate::logging::tensorboard::EventWriter>,
) -> Result<PruningPlan> {
    let full = model.valid();
    let (_, unpruned_top1) = supervised::evaluate(&full, test_loader, &Default::default())?;
    save_weights(&ck.join("unpruned.safetensors"), &state_dict(&full), &exp.backbone.arch, 0, "model")?;
    let convs = full.prunable_convs();
    let (keep, sensitivity) = match so.allocation {
        Allocation::Sensitivity => {
            let slice = Subset::balanced(splits.train.clone(), so.sensitivity_images)?;
            let slice_loader = Loader::new(Arc::new(slice), &exp.data, false, exp.seed);
            let sens = sensitivity_scan(&full, &slice_loader, &so.sensitivity_ratios)?;
            (sensitivity_allocation(&full, &sens, so.target_flops)?, Some(sens))
        }
        Allocation::Uniform => (uniform_allocation(&full, so.target_flops)?, None),
    };
    model.prune_channels(&keep)?;
    let pruned_convs = model.prunable_convs();
    let full_macs: u64 = convs.iter().map(|c| c.macs).sum();
    let flops_ratio = pruned_convs.iter().map(|c| c.macs).sum::<u64>() as f64 / full_macs.max(1) as f64;
    let layer_flops_ratio: Vec<f64> =
        pruned_convs.iter().zip(&convs).map(|(p, f)| p.macs as f64 / f.macs.max(1) as f64).collect();
    let (_, pruned_top1) = supervised::evaluate(&model.valid(), test_loader, &Default::default())?;
    tracing::info!(
        "phase 2: {} allocation, kept channels {:?} of {:?}: flops ratio {:.3} (target {}); test top-1 {:.2}% → {:.2}% before fine-tuning",
        so.allocation,
        keep,
        convs.iter().map(|c| c.out_channels).collect::<Vec<_>>(),
        flops_ratio,
        so.target_flops,
        100.0 * unpruned_top1,
        100.0 * pruned_top1
    );
    let plan = PruningPlan {
        arch: exp.backbone.arch.clone(),
        allocation: so.allocation.to_string(),
        target_flops: so.target_flops,
        layers: convs.iter().map(|c| c.name.clone()).collect(),
        out_channels: convs.iter().map(|c| c.out_channels).collect(),
        keep: keep.clone(),
        flops_ratio,
        layer_flops_ratio: layer_flops_ratio.clone(),
        unpruned_top1,
        pruned_top1_before_fine_tune: pruned_top1,
        sensitivity,
    };
    crate::fsutil::atomic_write(&run_dir.join(PLAN_FILE), serde_json::to_string_pretty(&plan)?.as_bytes())?;
    if let Some(tb) = tb {
        tb.scalar("prune/flops_ratio", 0, flops_ratio)?;
        tb.scalar("prune/unpruned_top1", 0, unpruned_top1)?;
        tb.scalar("test/top1", 0, pruned_top1)?;
        for (t, r) in layer_flops_ratio.iter().enumerate() {
            tb.scalar(&format!("prune/flops_ratio/layer{t}"), 0, *r)?;
            tb.scalar(&format!("prune/kept_channels/layer{t}"), 0, keep[t] as f64)?;
        }
    }
    Ok(plan)
}

/// Reads a run's `pruning.json`.
pub fn read_plan(run_dir: &Path) -> Result<PruningPlan> {
    let path = run_dir.join(PLAN_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read the pruning plan", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid pruning plan", path.display()))
}

/// `rlprune eval RUN_DIR` for a static-l1 run: the pruned network (a plain forward of the
/// smaller dense model) against the unpruned backbone, measured in the same process.
pub fn eval_static_run(exp: &Experiment, layered: &Layered, run_dir: &Path, base: &Path) -> Result<serde_json::Value> {
    let plan = read_plan(run_dir)?;
    let ck = checkpoint::dir(run_dir);
    let wfile =
        if ck.join("best.safetensors").is_file() { ck.join("best.safetensors") } else { ck.join("last.safetensors") };
    let ufile = ck.join("unpruned.safetensors");
    let EvalData { splits, test_loader, ctx } = EvalData::open(exp, base)?;
    let device = Default::default();
    let skeleton: AnyBackbone<Cpu> = skeleton(exp, layered, &ctx, base, &device)?;
    let unpruned = load_strict(
        skeleton.clone(),
        &checkpoint::read_model(&ufile, &exp.backbone.arch, None)?,
        &ufile.display().to_string(),
    )?;
    let mut pruned = skeleton;
    pruned.prune_channels(&plan.keep)?;
    let pruned =
        load_strict(pruned, &checkpoint::read_model(&wfile, &exp.backbone.arch, None)?, &wfile.display().to_string())?;
    let (loss, top1) = supervised::evaluate(&pruned, &test_loader, &device)?;
    let (_, unpruned_top1) = supervised::evaluate(&unpruned, &test_loader, &device)?;
    let full = unpruned.prunable_convs();
    let part = pruned.prunable_convs();
    let full_macs: u64 = full.iter().map(|c| c.macs).sum();
    let flops_ratio = part.iter().map(|c| c.macs).sum::<u64>() as f64 / full_macs.max(1) as f64;
    let layer_flops_ratio: Vec<f64> =
        part.iter().zip(&full).map(|(p, f)| p.macs as f64 / f.macs.max(1) as f64).collect();
    let sample = super::eval::example_images(&test_loader)?;
    let latency = super::eval::latency_against_unpruned(
        &sample,
        flops_ratio,
        |x| {
            let _ = unpruned.forward(x).into_data();
            Ok(())
        },
        |x| {
            let _ = pruned.forward(x).into_data();
            Ok(())
        },
    )?;
    Ok(json!({
        "source": run_dir.display().to_string(),
        "arch": exp.backbone.arch,
        "controller": "static-l1",
        "allocation": plan.allocation,
        "weights": wfile.display().to_string(),
        "images": splits.test.len(),
        "top1": top1,
        "loss": loss,
        "full_compute_top1": unpruned_top1,
        "backbone_top1": unpruned_top1,
        "flops_ratio": flops_ratio,
        "flops_reduction": 1.0 / flops_ratio.max(1e-12),
        "layers": plan.layers,
        "layer_flops_ratio": layer_flops_ratio,
        "out_channels": plan.out_channels,
        "kept_channels": plan.keep,
        "latency": latency,
    }))
}
