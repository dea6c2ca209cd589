//! Methods: the recipes that train and evaluate a pruned network, each on its controller
//! (`[controller] kind`). [`rnp`] trains RNP's channel router by reinforcement learning,
//! [`static_l1`] prunes filters by L1 norm once for all images and fine-tunes,
//! [`token_predictor`] trains DynamicViT's token predictors (teacher, then the student by the
//! Gumbel recipe or by policy gradient, [`token_predictor_pg`]); [`eval`] holds what their
//! evaluations share (latency against the unpruned network, example images).
//!
//! A method is one file plus one entry in [`METHODS`].

pub mod eval;
pub mod rnp;
pub mod rnp_channel_use;
pub mod static_l1;
pub mod token_predictor;
pub mod token_predictor_pg;
#[cfg(test)]
pub mod toy;

use std::path::Path;

use anyhow::{Result, bail};
use serde_json::json;

use crate::ModelBackend;
use crate::backbones::{AnyBackbone, Backbone, BuildContext, ModelSpec};
use crate::controllers::ControllerConfig;
use crate::device::DeviceSpec;
use crate::experiment::{Experiment, Layered};
use crate::nn::params::load_strict;
use crate::session::EvalData;
use crate::session::supervised::{TrainOptions, TrainSummary, build_backbone, evaluate, train_on_devices};
use crate::train::checkpoint;

/// A method: how its extra `[controller]` keys are checked, and what `rlprune train` and
/// `rlprune eval RUN_DIR` run for it.
pub struct Method {
    pub name: &'static str,
    /// Problems with the kind-specific keys in `options`, as (key relative to `[controller]`,
    /// message).
    pub check_options: fn(&ControllerConfig) -> Vec<(String, String)>,
    pub train: fn(&Experiment, &Layered, &TrainOptions) -> Result<TrainSummary>,
    /// `(experiment, layered, run_dir, base_dir)` → the JSON report of `rlprune eval`.
    pub eval: fn(&Experiment, &Layered, &Path, &Path) -> Result<serde_json::Value>,
    /// `rlprune visualize RUN_DIR` for a method with a picture of its own; `None`: the pictures
    /// of what the model kept per image.
    pub visualize: Option<VisualizeRun>,
}

/// `(experiment, layered, run_dir, base_dir, out)` → what was drawn into `out`.
pub type VisualizeRun = fn(&Experiment, &Layered, &Path, &Path, &Path) -> Result<Drawn>;

/// What `rlprune visualize` wrote, and how to name it in one line.
pub struct Drawn {
    pub files: Vec<std::path::PathBuf>,
    /// E.g. "3 image(s) and index.json".
    pub summary: String,
}

/// The method registry: one entry per `[controller] kind`, each defined in its method's file.
pub const METHODS: &[Method] = &[
    rnp::METHOD,
    static_l1::METHOD,
    token_predictor::METHOD,
    #[cfg(test)]
    toy::METHOD,
];

/// Loads an experiment ([`Experiment::load`]) and checks its method's `[controller]` keys.
pub fn load(path: &Path, overrides: &[String]) -> Result<(Experiment, Layered)> {
    let (exp, layered) = Experiment::load(path, overrides)?;
    check(&exp, &layered)?;
    Ok((exp, layered))
}

/// Checks the experiment's `[controller] kind` and that method's own keys; the first problem
/// becomes the error, at its file and line.
pub fn check(exp: &Experiment, layered: &Layered) -> Result<()> {
    let Some(c) = &exp.controller else { return Ok(()) };
    let method = kind(&c.kind).map_err(|e| layered.error_at("controller.kind", e))?;
    match (method.check_options)(c).into_iter().next() {
        Some((k, m)) => Err(layered.error_at(&format!("controller.{k}"), m)),
        None => Ok(()),
    }
}

/// The registered kind called `name`.
pub fn kind(name: &str) -> Result<&'static Method> {
    METHODS.iter().find(|k| k.name == name).ok_or_else(|| {
        anyhow::anyhow!("'{name}' is not a known controller (available: {})", kind_names().join(", "))
    })
}

pub fn kind_names() -> Vec<&'static str> {
    METHODS.iter().map(|k| k.name).collect()
}

/// For kinds without extra keys: every key in `options` is unknown.
pub fn no_extra_options(cfg: &ControllerConfig) -> Vec<(String, String)> {
    cfg.options
        .keys()
        .map(|k| (k.clone(), format!("is not a key of controller '{}' (unknown key)", cfg.kind)))
        .collect()
}

/// `rlprune train`: the experiment's method on its `[controller] kind`, or supervised training
/// of the backbone alone.
pub fn train(exp: &Experiment, layered: &Layered, opts: &TrainOptions) -> Result<TrainSummary> {
    check(exp, layered)?;
    let (opts, _lock) = crate::session::run::claim_run_dir(exp, opts)?;
    let opts = &opts;
    let specs = exp.device_specs().map_err(|e| layered.error_at(if exp.devices.is_empty() { "device" } else { "devices" }, e))?;
    if let Some(ctl) = &exp.controller {
        let kind = kind(&ctl.kind).map_err(|e| layered.error_at("controller.kind", e))?;
        return match specs.as_slice() {
            [DeviceSpec::Cpu] => (kind.train)(exp, layered, opts),
            [DeviceSpec::Cpu, ..] => bail!("{}: data-parallel training of controllers is not wired yet (the supervised trainer is); use one device", layered.origin_of("devices")),
            _ => bail!("{}: controller training runs on the CPU only for now (the supervised trainer runs on CUDA)", layered.origin_of("device")),
        };
    }
    match specs[0] {
        DeviceSpec::Cpu => train_on_devices::<crate::CpuAutodiff>(exp, layered, opts, &vec![Default::default(); specs.len()]),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(_) => train_on_devices::<crate::device::CudaAutodiff>(exp, layered, opts, &crate::device::cuda_devices(&specs)?),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => crate::device::cuda_unavailable(),
    }
}

/// `rlprune eval`: loads the run's (or experiment's) configuration, builds the model, loads
/// the checkpoint and evaluates it on the test split. Returns a JSON report.
pub fn eval_target(target: &Path, checkpoint_file: Option<&Path>, overrides: &[String], base: &Path) -> Result<serde_json::Value> {
    let cfg = crate::experiment::experiment_of(target)?;
    let (exp, layered) = load(&cfg, overrides)?;
    let weights = match checkpoint_file {
        Some(f) => f.to_path_buf(),
        None if target.is_dir() => {
            let ck = checkpoint::dir(target);
            let best = ck.join("best.safetensors");
            if best.is_file() { best } else { ck.join("last.safetensors") }
        }
        None => bail!("{}: an experiment file needs --checkpoint FILE (or pass a run directory)", target.display()),
    };
    if let Some(ctl) = &exp.controller
        && target.is_dir()
        && checkpoint_file.is_none()
    {
        let kind = kind(&ctl.kind).map_err(|e| layered.error_at("controller.kind", e))?;
        let report = (kind.eval)(&exp, &layered, target, base)?;
        crate::fsutil::atomic_write(&target.join("eval.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
        return Ok(report);
    }
    let spec = DeviceSpec::parse(&exp.device).map_err(|e| layered.error_at("device", e))?;
    crate::with_backend!(spec, |B, device| eval_on::<B>(&exp, &layered, &weights, base, &device, target))
}

fn eval_on<B: ModelBackend>(exp: &Experiment, layered: &Layered, weights: &Path, base: &Path, device: &B::Device, target: &Path) -> Result<serde_json::Value> {
    let EvalData { splits, test_loader, ctx } = EvalData::open(exp, base)?;
    let model: AnyBackbone<B> = build_backbone(exp, layered, &ctx, base, device)?;
    let dict = checkpoint::read_model(weights, &exp.backbone.arch, None)?;
    let model = load_strict(model, &dict, &weights.display().to_string())?;
    let (loss, top1) = evaluate(&model, &test_loader, device)?;
    if !loss.is_finite() {
        bail!("{}: the test loss is {loss}: these weights do not give a usable model", weights.display());
    }
    let mut report = json!({
        "source": target.display().to_string(),
        "arch": exp.backbone.arch,
        "weights": weights.display().to_string(),
        "images": splits.test.len(),
        "top1": top1,
        "loss": loss,
    });
    inner_pruning_report(&mut report, exp, &ctx)?;
    Ok(report)
}

/// For a model that prunes inside its forward (ToMe, EViT, AdaHorNet): which pruning, its MACs
/// ratio against the same weights with nothing pruned, and both forwards timed in alternation
/// at batch 1 and 64 (CPU). Other models add nothing.
fn inner_pruning_report(report: &mut serde_json::Value, exp: &Experiment, ctx: &BuildContext) -> Result<()> {
    let (arch, options) = (&exp.backbone.arch, &exp.backbone.options);
    let Some(Ok(spec)) = ModelSpec::for_arch(arch, options, ctx) else { return Ok(()) };
    let Some(pruning) = spec.inner_pruning(ctx.img_size[0]) else { return Ok(()) };
    report["reduction"] = json!(pruning.name);
    report["flops_ratio"] = json!(pruning.flops_ratio);
    // Timing needs no trained weights: a CPU copy of the same architecture.
    let cpu = crate::backbones::build::<crate::Cpu>(arch, options, ctx, &Default::default())?;
    let [h, w] = ctx.img_size;
    let sample = burn::tensor::Tensor::<crate::Cpu, 4>::random([8, ctx.in_channels, h, w], burn::tensor::Distribution::Normal(0.0, 1.0), &Default::default());
    report["latency"] = eval::latency_against_unpruned(
        &sample,
        pruning.flops_ratio,
        |x| {
            let out = cpu.forward_unpruned(x).ok_or_else(|| anyhow::anyhow!("{arch}: no unpruned forward to compare with"))?;
            let _ = out.into_data();
            Ok(())
        },
        |x| {
            let _ = cpu.forward(x).into_data();
            Ok(())
        },
    )?;
    Ok(())
}
