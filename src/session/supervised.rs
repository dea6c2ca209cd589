//! The supervised trainer: fits a backbone on a dataset with the experiment's optimizer,
//! schedule and loss, evaluates every epoch, logs to TensorBoard and `metrics.jsonl`, and
//! checkpoints with exact resume.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Result};
use burn::module::{AutodiffModule, Module};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use serde_json::json;

use crate::train::checkpoint::{self, RngState, TrainState};
use crate::train::data_parallel::{Replicas, StepFn, SyncGrads};
use crate::train::losses::{correct, cross_entropy};
use crate::train::optim::Optimizer;
use super::run::{Resume, RunLogs};
use crate::backbones::{self, AnyBackbone, Backbone, BuildContext};
use crate::data::{self, Dataset, Loader};
use crate::experiment::{Experiment, Layered};
use crate::logging::tensorboard::HParamValue;
use crate::nn::params::{load_strict, load_strict_except, state_dict};
use crate::session::run::{epoch_seed, SeedStream};
use crate::metrics::memory::{self, Workload};
use crate::ModelBackend;

/// Set by the Ctrl-C handler; trainers stop after the current step, flush and exit.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler (once per process).
pub fn install_interrupt_handler() {
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            // A second Ctrl-C: the user insists.
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: finishing the current step, flushing logs (Ctrl-C again to abort)");
    });
}

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Exact run directory (else `<log.dir>/<name>/<timestamp>`).
    pub out: Option<PathBuf>,
    pub resume: Option<Resume>,
    /// Stop after this many completed epochs, as if interrupted (for resume tests and time boxes).
    pub stop_after_epoch: Option<usize>,
    /// Directory that relative data paths resolve against.
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_top1: f64,
    pub test_loss: f64,
    pub test_top1: f64,
    pub lr: f64,
    pub seconds: f64,
}

impl EpochMetrics {
    /// An epoch's metrics from its running sums (`loss_sum` weighted by images), its test loss
    /// and top-1, and when it started.
    pub fn from_sums(epoch: usize, loss_sum: f64, n_correct: usize, n_seen: usize, test: (f64, f64), lr: f64, started: Instant) -> Self {
        Self {
            epoch,
            train_loss: loss_sum / n_seen.max(1) as f64,
            train_top1: n_correct as f64 / n_seen.max(1) as f64,
            test_loss: test.0,
            test_top1: test.1,
            lr,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub epochs_done: usize,
    pub history: Vec<EpochMetrics>,
    pub best_top1: f64,
    pub interrupted: bool,
    /// For a run that prunes: what its best checkpoint gives against the backbone it started from.
    pub outcome: Option<PruningOutcome>,
    /// For a data-parallel run: what each peer computed (steps and images), in rank order.
    pub peers: Vec<crate::train::data_parallel::PeerWork>,
}

/// A pruned network's best checkpoint against its unpruned backbone, on the test split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PruningOutcome {
    pub backbone_top1: f64,
    pub top1: f64,
    /// MACs of the pruned layers over their unpruned MACs.
    pub flops_ratio: f64,
}

/// Builds the experiment's backbone for `ctx`, loading `[backbone] weights` if given; errors
/// about backbone options point at their line.
pub fn build_backbone<B: ModelBackend>(exp: &Experiment, layered: &Layered, ctx: &BuildContext, base_dir: &Path, device: &B::Device) -> Result<AnyBackbone<B>> {
    let model = backbones::build::<B>(&exp.backbone.arch, &exp.backbone.options, ctx, device)
        .map_err(|e| backbone_error(layered, e))?;
    match &exp.backbone.weights {
        Some(w) => {
            let path = base_dir.join(w);
            let mut dict = crate::import::read_model_weights(&path)?;
            for note in backbones::adapt_pretrained(&model, &mut dict)? {
                tracing::info!("{}: resampled to this model's resolution: {note}", path.display());
            }
            let head = model.classifier();
            if exp.backbone.reset_head {
                return load_strict_except(model, &dict, &path.display().to_string(), Some(head));
            }
            if let Some(t) = dict.get(&format!("{head}.weight"))
                && t.shape.first() != Some(&ctx.num_classes)
            {
                bail!(
                    "{}: the weights' classifier ({head}.weight) has {} classes and this experiment's data has {}; \
                     set [backbone] reset_head = true to start the classifier fresh",
                    path.display(),
                    t.shape.first().copied().unwrap_or(0),
                    ctx.num_classes
                );
            }
            load_strict(model, &dict, &path.display().to_string())
        }
        None => Ok(model),
    }
}

/// A backbone option's error, prefixed with the file and line of the key it names (else of
/// `backbone.arch`).
pub(crate) fn backbone_error(layered: &Layered, e: anyhow::Error) -> anyhow::Error {
    let msg = format!("{e:#}");
    match msg.split_once("backbone.").and_then(|(_, rest)| rest.split([' ', ':']).next()) {
        Some(key) => anyhow::anyhow!("{}: {msg}", layered.origin_of(&format!("backbone.{key}"))),
        None => anyhow::anyhow!("{}: {msg}", layered.origin_of("backbone.arch")),
    }
}

/// Refuses an experiment whose backbone and training batch cannot fit in the memory available,
/// before anything is allocated (see [`crate::metrics::memory`]).
pub fn check_training_memory(exp: &Experiment, layered: &Layered, ctx: &BuildContext) -> Result<()> {
    let cost = backbones::cost(&exp.backbone.arch, &exp.backbone.options, ctx).map_err(|e| backbone_error(layered, e))?;
    let input = (ctx.in_channels * ctx.img_size[0] * ctx.img_size[1]) as u64;
    let batch = exp.data.batch_size as u64;
    memory::ensure_fits(
        &format!("training {} at batch {batch}", exp.backbone.arch),
        &cost,
        input,
        batch,
        Workload::Training,
        memory::available_bytes(),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", layered.origin_of("backbone.arch")))
}

pub fn build_context(train: &dyn Dataset, loader: &Loader) -> BuildContext {
    let [c, h, w] = loader.output_shape();
    BuildContext { num_classes: train.num_classes(), in_channels: c, img_size: [h, w] }
}

/// Phase 1 of a controller run: the backbone from `[backbone] weights` (seeded, so any layer
/// the weights leave out starts the same), or trained here by this trainer into
/// `<run_dir>/<sub>` and loaded back. With `resume`, a phase 1 that has a checkpoint there is
/// continued (or, when complete, only loaded). `Ok(Err(summary))` when that training was
/// interrupted.
#[allow(clippy::too_many_arguments)]
pub fn pretrained_backbone<B: AutodiffBackend + ModelBackend>(
    exp: &Experiment,
    layered: &Layered,
    ctx: &BuildContext,
    base_dir: &Path,
    run_dir: &Path,
    sub: &str,
    resume: bool,
    device: &B::Device,
) -> Result<std::result::Result<AnyBackbone<B>, TrainSummary>>
where
    B::InnerBackend: ModelBackend,
{
    if exp.backbone.weights.is_some() {
        check_training_memory(exp, layered, ctx)?;
        B::seed(device, exp.seed);
        return Ok(Ok(build_backbone(exp, layered, ctx, base_dir, device)?));
    }
    let sub = run_dir.join(sub);
    let done = if resume && checkpoint::dir(&sub).join("state.json").is_file() {
        Some(checkpoint::read_state(&sub)?.epoch)
    } else {
        None
    };
    if done.is_none_or(|epochs| epochs < exp.train.epochs) {
        tracing::info!("phase 1: supervised training of {} for {} epochs into {}", exp.backbone.arch, exp.train.epochs, sub.display());
        let opts = TrainOptions {
            out: Some(sub.clone()),
            resume: done.map(|_| Resume::Dir(sub.clone())),
            stop_after_epoch: None,
            base_dir: base_dir.to_path_buf(),
        };
        let s = train_on::<B>(exp, layered, &opts, device)?;
        if s.interrupted {
            return Ok(Err(TrainSummary { run_dir: run_dir.to_path_buf(), epochs_done: 0, ..s }));
        }
    }
    let model = build_backbone::<B>(exp, layered, ctx, base_dir, device)?;
    let file = checkpoint::dir(&sub).join("last.safetensors");
    Ok(Ok(load_strict(model, &checkpoint::read_model(&file, &exp.backbone.arch, None)?, &file.display().to_string())?))
}

pub fn train_on<B: AutodiffBackend + ModelBackend>(exp: &Experiment, layered: &Layered, opts: &TrainOptions, device: &B::Device) -> Result<TrainSummary>
where
    B::InnerBackend: ModelBackend,
{
    train_on_devices::<B>(exp, layered, opts, std::slice::from_ref(device))
}

/// One supervised step (see [`StepFn`]): cross-entropy on the batch, gradients through `sync`,
/// optional clipping of the global norm, update.
fn supervised_step<B: AutodiffBackend + ModelBackend>(label_smoothing: f64, grad_clip: f64) -> impl StepFn<B, AnyBackbone<B>>
where
    B::InnerBackend: ModelBackend,
{
    move |model: AnyBackbone<B>, optim: &mut Optimizer<B>, batch: &data::Batch, lr: f64, device: &B::Device, sync: SyncGrads<'_>| {
        let (x, y) = batch.to_tensors::<B>(device);
        let logits = model.forward(x);
        let loss = cross_entropy(logits.clone(), y.clone(), label_smoothing);
        let loss_value = loss.clone().into_scalar().elem::<f64>();
        let n_correct = correct(logits.detach(), y);
        let grads = sync(GradientsParams::from_grads(loss.backward(), &model))?;
        let scale = if grad_clip > 0.0 {
            let norm = Optimizer::<B>::grad_norm(&model, &grads);
            (grad_clip / norm.max(1e-12)).min(1.0)
        } else {
            1.0
        };
        Ok((optim.step(model, grads, lr, scale), loss_value, n_correct))
    }
}

/// [`train_on`] with one peer per device: more than one device trains data-parallel through
/// burn-collective ([`Replicas`]); the first device is peer 0, which logs, evaluates and
/// checkpoints.
pub fn train_on_devices<B: AutodiffBackend + ModelBackend>(exp: &Experiment, layered: &Layered, opts: &TrainOptions, devices: &[B::Device]) -> Result<TrainSummary>
where
    B::InnerBackend: ModelBackend,
{
    let device = &devices[0];
    let (session, mut model) = super::Session::open_with(exp, layered, opts, super::Resumable::Yes, |ctx| {
        check_training_memory(exp, layered, ctx)?;
        B::seed(device, exp.seed);
        build_backbone::<B>(exp, layered, ctx, &opts.base_dir, device)
    })?;
    let (run_dir, splits, train_loader, test_loader) = (session.run_dir.clone(), &session.splits, &session.train_loader, &session.test_loader);
    let mut optim = Optimizer::<B>::new(exp.train.optimizer.clone());
    optim.decay_only_matrices = exp.train.decay_only_matrices;

    // A resumed run continues from its last checkpoint.
    let resumed = if session.resumed {
        let st = checkpoint::read_state(&run_dir)?;
        session.check_arch(&st.arch)?;
        let ck = checkpoint::dir(&run_dir);
        let dict = checkpoint::read_model(&ck.join("last.safetensors"), &st.arch, Some(st.epoch))?;
        model = load_strict(model, &dict, &ck.join("last.safetensors").display().to_string())?;
        let odict = checkpoint::read_model(&ck.join("last.optim.safetensors"), &st.arch, Some(st.epoch))?;
        optim.load_state_dict(&odict, &Default::default())?;
        optim.steps = st.optimizer_steps;
        tracing::info!("resuming {} after epoch {}", run_dir.display(), st.epoch);
        Some(st)
    } else {
        None
    };
    let RunLogs { mut metrics, mut tb } = session.logs()?;
    tracing::info!(
        "run {}: {} on {} ({} params), {} train / {} test images",
        run_dir.display(),
        arch_description(&exp.backbone),
        splits.train.describe(),
        model.num_params(),
        splits.train.len(),
        splits.test.len()
    );

    let steps_per_epoch = train_loader.num_batches();
    let total_steps = steps_per_epoch * exp.train.epochs;
    let mut state = resumed.clone().unwrap_or(TrainState {
        format: checkpoint::FORMAT.into(),
        epoch: 0,
        step: 0,
        best_metric: f64::NEG_INFINITY,
        best_epoch: 0,
        arch: exp.backbone.arch.clone(),
        optimizer: exp.train.optimizer.kind().into(),
        optimizer_steps: 0,
        rng: RngState { seed: exp.seed, scheme: "per-epoch streams: data order/augmentation from (seed, epoch); backend RNG reseeded with f(seed, epoch)".into() },
    });
    let mut history = Vec::new();
    let mut interrupted = false;
    let step = supervised_step::<B>(exp.train.label_smoothing, exp.train.grad_clip);
    let mut replicas = if devices.len() > 1 {
        tracing::info!("data-parallel training on {} devices (burn-collective all-reduce)", devices.len());
        Some(Replicas::start(devices, &model, &optim, step.clone())?)
    } else {
        None
    };

    for epoch in state.epoch..exp.train.epochs {
        let t0 = Instant::now();
        B::seed(device, epoch_seed(exp.seed, SeedStream::Supervised, epoch));
        let mut batches = super::epoch_batches(train_loader.epoch(epoch), steps_per_epoch, &format!("epoch {}/{}", epoch + 1, exp.train.epochs));
        let (mut loss_sum, mut n_seen, mut n_correct) = (0.0f64, 0usize, 0usize);
        let mut lr = exp.train.optimizer.lr();
        for batch in &mut batches {
            let batch = batch?;
            let n = batch.len();
            lr = exp.train.schedule.lr_at(exp.train.optimizer.lr(), state.step as usize, total_steps, steps_per_epoch);
            let progress = state.step as f64 / steps_per_epoch.max(1) as f64;
            model.set_training_progress(progress);
            let (next, loss_value, batch_correct) = match replicas.as_mut() {
                Some(r) => r.step(model, &mut optim, &batch, lr, progress, &step)?,
                None => step(model, &mut optim, &batch, lr, device, &Ok)?,
            };
            model = next;
            if !loss_value.is_finite() {
                bail!("epoch {}, step {}: the loss became {loss_value}; lower train.optimizer.lr or set train.grad_clip", epoch + 1, state.step);
            }
            n_correct += batch_correct;
            loss_sum += loss_value * n as f64;
            n_seen += n;
            state.step += 1;
            if state.step.is_multiple_of(exp.log.every_steps as u64)
                && let Some(tb) = tb.as_mut()
            {
                tb.scalar("train/loss", state.step as i64, loss_value)?;
                tb.scalar("train/lr", state.step as i64, lr)?;
            }
        }
        if batches.finish() {
            interrupted = true;
            tracing::warn!("interrupted during epoch {}: keeping the checkpoint of epoch {}", epoch + 1, state.epoch);
            break;
        }
        let last = epoch + 1 == exp.train.epochs;
        let (test_loss, test_top1) = if (epoch + 1) % exp.train.eval_every == 0 || last {
            let (loss, top1) = evaluate(&model.valid(), test_loader, &device.clone())?;
            if !loss.is_finite() {
                bail!(
                    "epoch {}, step {}: the test loss became {loss}: the weights diverged; the checkpoint of epoch {} is kept; \
                     lower train.optimizer.lr or set train.grad_clip",
                    epoch + 1,
                    state.step,
                    state.epoch
                );
            }
            (loss, top1)
        } else {
            (f64::NAN, f64::NAN)
        };
        // Checked before anything of this epoch is recorded: metrics and checkpoints stay those
        // of the last finite epoch.
        let weights = state_dict(&model.valid());
        if let Some((key, n)) = checkpoint::non_finite(&weights) {
            bail!(
                "epoch {}, step {}: {n} weights became NaN or infinite (first in {key}): the training diverged; \
                 the checkpoint of epoch {} is kept; lower train.optimizer.lr or set train.grad_clip",
                epoch + 1,
                state.step,
                state.epoch
            );
        }
        let m = EpochMetrics::from_sums(epoch + 1, loss_sum, n_correct, n_seen, (test_loss, test_top1), lr, t0);
        tracing::info!(
            "epoch {}/{}: train loss {:.4} top1 {:.2}% | test loss {:.4} top1 {:.2}% | {:.1}s",
            m.epoch, exp.train.epochs, m.train_loss, 100.0 * m.train_top1, m.test_loss, 100.0 * m.test_top1, m.seconds
        );
        metrics.write(&json!({
            "epoch": m.epoch, "step": state.step, "train_loss": m.train_loss, "train_top1": m.train_top1,
            "test_loss": finite_or_null(m.test_loss), "test_top1": finite_or_null(m.test_top1), "lr": m.lr, "seconds": m.seconds,
        }))?;
        if let Some(tb) = tb.as_mut() {
            let s = state.step as i64;
            tb.scalar("epoch/train_loss", s, m.train_loss)?;
            tb.scalar("epoch/train_top1", s, m.train_top1)?;
            if m.test_top1.is_finite() {
                tb.scalar("test/loss", s, m.test_loss)?;
                tb.scalar("test/top1", s, m.test_top1)?;
            }
            if exp.log.histograms {
                for (name, t) in &weights {
                    let values: Vec<f64> = t.data.iter().map(|&v| v as f64).collect();
                    tb.histogram(&format!("weights/{name}"), s, &values)?;
                }
            }
            tb.flush()?;
        }
        state.epoch = epoch + 1;
        state.optimizer_steps = optim.steps;
        let is_best = m.test_top1.is_finite() && m.test_top1 > state.best_metric;
        if is_best {
            state.best_metric = m.test_top1;
            state.best_epoch = m.epoch;
        }
        checkpoint::save(&run_dir, &weights, &optim.state_dict(), &state, is_best)?;
        history.push(m);
        if opts.stop_after_epoch == Some(state.epoch) && state.epoch < exp.train.epochs {
            interrupted = true;
            break;
        }
    }

    let peers = match replicas {
        Some(r) => r.finish()?,
        None => Vec::new(),
    };
    for p in &peers {
        tracing::info!("data-parallel peer {}: {} steps, {} images", p.rank, p.steps, p.images);
    }
    if let Some(tb) = tb.as_mut() {
        if state.epoch == exp.train.epochs {
            let last = history.last();
            let hp = vec![
                ("arch".to_string(), HParamValue::Text(exp.backbone.arch.clone())),
                ("optimizer".to_string(), HParamValue::Text(exp.train.optimizer.kind().into())),
                ("lr".to_string(), HParamValue::Number(exp.train.optimizer.lr())),
                ("epochs".to_string(), HParamValue::Number(exp.train.epochs as f64)),
                ("batch_size".to_string(), HParamValue::Number(exp.data.batch_size as f64)),
                ("seed".to_string(), HParamValue::Number(exp.seed as f64)),
            ];
            let mut finals = vec![("hparams/best_top1".to_string(), state.best_metric)];
            if let Some(m) = last {
                finals.push(("hparams/test_top1".to_string(), m.test_top1));
            }
            tb.hparams(&hp, &finals, state.step as i64)?;
        }
        tb.flush()?;
    }
    Ok(TrainSummary { run_dir, epochs_done: state.epoch, history, best_top1: state.best_metric, interrupted, outcome: None, peers })
}

fn finite_or_null(v: f64) -> serde_json::Value {
    if v.is_finite() { json!(v) } else { serde_json::Value::Null }
}

/// Mean loss and top-1 accuracy of `model` (in eval mode) over the loader's split.
pub fn evaluate<B: ModelBackend>(model: &AnyBackbone<B>, loader: &Loader, device: &B::Device) -> Result<(f64, f64)> {
    let (mut loss_sum, mut n_seen, mut n_correct) = (0.0, 0usize, 0usize);
    for batch in loader.epoch(0) {
        let batch = batch?;
        let (x, y) = batch.to_tensors::<B>(device);
        let logits = model.forward(x);
        let n = y.dims()[0];
        loss_sum += cross_entropy(logits.clone(), y.clone(), 0.0).into_scalar().elem::<f64>() * n as f64;
        n_correct += correct(logits, y);
        n_seen += n;
    }
    if n_seen == 0 {
        bail!("the evaluation split is empty");
    }
    Ok((loss_sum / n_seen as f64, n_correct as f64 / n_seen as f64))
}

/// The arch as a log line names it: with the `[backbone]` keys that change its named recipe,
/// so that a shrunken `deit-s` is not reported as DeiT-S.
pub fn arch_description(b: &crate::experiment::BackboneConfig) -> String {
    if b.options.is_empty() {
        return b.arch.clone();
    }
    let keys: Vec<String> = b.options.iter().map(|(k, v)| format!("{k} = {v}")).collect();
    format!("{} with {}", b.arch, keys.join(", "))
}
