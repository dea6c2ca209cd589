//! A method built only for tests (`[controller] kind = "toy"`): the backbone from the session's
//! supervised phase, then `epochs` of plain SGD fine-tuning, with metrics, TensorBoard,
//! checkpoints and resume from the session. It shows that a method is one file plus one
//! registry entry; `cli`'s unit test runs it through `rlprune train`.

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::ElementConversion;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Method;
use crate::backbones::{AnyBackbone, Backbone};
use crate::controllers::ControllerConfig;
use crate::experiment::{Experiment, Layered};
use crate::nn::params::{load_strict, state_dict};
use crate::session::run::RunLogs;
use crate::session::supervised::{self, EpochMetrics, TrainOptions, TrainSummary};
use crate::session::{EvalData, Resumable, Session, epoch_batches, skeleton};
use crate::train::checkpoint;
use crate::train::losses::cross_entropy;
use crate::train::optim::{Optimizer, OptimizerConfig};

type Ad = crate::CpuAutodiff;

pub const METHOD: Method = Method { name: "toy", check_options, train, eval, visualize: None };

const STATE: &str = "toy_state.json";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToyOptions {
    epochs: usize,
    lr: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct ToyState {
    format: String,
    arch: String,
    epochs: usize,
}

fn options(cfg: &ControllerConfig) -> std::result::Result<ToyOptions, (String, String)> {
    cfg.kind_options::<ToyOptions>()
}

fn check_options(cfg: &ControllerConfig) -> Vec<(String, String)> {
    options(cfg).err().into_iter().collect()
}

fn train(exp: &Experiment, layered: &Layered, opts: &TrainOptions) -> Result<TrainSummary> {
    let ctl = exp.controller.as_ref().ok_or_else(|| anyhow::anyhow!("the toy method needs [controller]"))?;
    let o = options(ctl).map_err(|(k, m)| layered.error_at(&format!("controller.{k}"), m))?;
    let session = Session::open(exp, layered, opts, Resumable::Yes)?;
    let resumed = session.resumed_state(STATE, |st: &ToyState| &st.format)?;
    if let Some(st) = &resumed {
        session.check_arch(&st.arch)?;
    }
    let device = Default::default();
    let mut model: AnyBackbone<Ad> = match session.pretrained_backbone("backbone", &device)? {
        Ok(m) => m,
        Err(interrupted) => return Ok(interrupted),
    };
    let RunLogs { mut metrics, mut tb } = session.logs()?;
    let ck = session.checkpoint_dir()?;
    let first = resumed.map_or(0, |st| st.epochs);
    if first > 0 {
        let file = ck.join("last.safetensors");
        model = load_strict(model, &checkpoint::read_model(&file, &exp.backbone.arch, Some(first))?, &file.display().to_string())?;
    }
    let mut optim = Optimizer::<Ad>::new(OptimizerConfig::Sgd { lr: o.lr, momentum: 0.0, weight_decay: 0.0, nesterov: false });
    let steps = session.train_loader.num_batches();
    let (mut history, mut interrupted) = (Vec::new(), false);
    for epoch in first..o.epochs {
        let t0 = std::time::Instant::now();
        let (mut loss_sum, mut n_seen, mut n_correct) = (0.0, 0, 0);
        let mut batches = epoch_batches(session.train_loader.epoch(exp.train.epochs + epoch), steps, "toy");
        for batch in &mut batches {
            let batch = batch?;
            let (x, y) = batch.to_tensors::<Ad>(&device);
            let logits = model.forward(x);
            let loss = cross_entropy(logits.clone(), y.clone(), 0.0);
            let lv = loss.clone().into_scalar().elem::<f64>();
            n_correct += crate::train::losses::correct(logits.detach(), y);
            n_seen += batch.len();
            loss_sum += lv * batch.len() as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(model, grads, o.lr, 1.0);
            if let Some(tb) = tb.as_mut() {
                tb.scalar("toy/loss", (epoch * steps + n_seen) as i64, lv)?;
            }
        }
        if batches.finish() {
            interrupted = true;
            break;
        }
        let test = supervised::evaluate(&model.valid(), &session.test_loader, &Default::default())?;
        let m = EpochMetrics::from_sums(epoch + 1, loss_sum, n_correct, n_seen, test, o.lr, t0);
        metrics.write(&json!({"toy_epoch": m.epoch, "train_loss": m.train_loss, "test_top1": m.test_top1}))?;
        checkpoint::save_weights(&ck.join("last.safetensors"), &state_dict(&model.valid()), &exp.backbone.arch, epoch + 1, "model")?;
        let st = ToyState { format: checkpoint::FORMAT.into(), arch: exp.backbone.arch.clone(), epochs: epoch + 1 };
        crate::fsutil::atomic_write(&ck.join(STATE), &serde_json::to_vec_pretty(&st)?)?;
        history.push(m);
        if opts.stop_after_epoch == Some(epoch + 1) {
            interrupted = true;
            break;
        }
    }
    let best_top1 = history.iter().map(|m| m.test_top1).fold(f64::NEG_INFINITY, f64::max);
    let run_dir = session.run_dir.clone();
    Ok(TrainSummary { run_dir, epochs_done: history.len(), history, best_top1, interrupted, outcome: None, peers: Vec::new() })
}

fn eval(exp: &Experiment, layered: &Layered, run_dir: &std::path::Path, base: &std::path::Path) -> Result<serde_json::Value> {
    let EvalData { test_loader, ctx, .. } = EvalData::open(exp, base)?;
    let device = Default::default();
    let file = checkpoint::dir(run_dir).join("last.safetensors");
    let model: AnyBackbone<crate::Cpu> = skeleton(exp, layered, &ctx, base, &device)?;
    let model = load_strict(model, &checkpoint::read_model(&file, &exp.backbone.arch, None)?, &file.display().to_string())?;
    let (loss, top1) = supervised::evaluate(&model, &test_loader, &device)?;
    Ok(json!({"controller": "toy", "top1": top1, "loss": loss}))
}
