//! `rlprune train` and `rlprune eval RUN_DIR` for `[controller] kind = "token-predictor"`:
//! DynamicViT's recipe (Rao et al., NeurIPS 2021) on a `dynamicvit-deit` backbone.
//!
//! 1. **Teacher**: the unpruned DeiT with the backbone's arguments (no predictors). It is trained
//!    by the supervised trainer into `<run>/teacher/` with `[train]`, unless `[backbone] weights`
//!    names DeiT weights (e.g. a previous run's `checkpoints/teacher.safetensors`).
//! 2. **Student**: the teacher's weights plus fresh predictors (`score_predictor.{i}`), trained for
//!    `controller.epochs` with the backbone's learning rate scaled by `lr_scale` and the
//!    predictors' at the full rate (two optimizers over one model, each stepping its own
//!    gradients). `training` picks how the keep decisions are learned:
//!    - `"gumbel"` (the paper): hard Gumbel-softmax decisions, straight-through, with
//!      policy-masked attention; loss = CE + ratio + KL(teacher ‖ student) + token distillation
//!      ([`distill_loss`]).
//!    - `"policy-gradient"`: each live token is kept with the predictor's keep probability
//!      (Bernoulli; the class token always stays, a dropped token stays dropped), sampled on the
//!      rollout workers (`[rl] workers`, see [`super::token_predictor_pg`]); the predictors
//!      are trained by the framework's REINFORCE ([`policy_gradient_loss`], `[rl]` baseline,
//!      entropy bonus, advantage normalisation) or PPO (`[rl] algorithm = "ppo"`: clipped
//!      surrogate, `[rl.ppo] epochs` passes of `minibatch` images) on the reward `−CE − λ·Σ_i |keep_i − ρ_i|`
//!      (per stage `−λ·|keep_i − ρ_i|`, `−CE` at the last); the backbone learns from the same
//!      distillation loss, without the ratio term, under the top-k decisions of inference (a
//!      second forward, whose return is also the self-critical baseline).
//!
//!    Both are evaluated the same way: top-`int(P·ρ_i)` pruning with gathered tokens
//!    ([`DynamicVit::forward_pruned`]), so the FLOPs saving is real.
//!
//! The run directory holds `checkpoints/{last,best}.safetensors` (the student, reference names),
//! `checkpoints/teacher.safetensors`, `model.toml` (the student as a model TOML, for
//! `rlprune infer --model`), `dynamicvit.json` (teacher vs student summary), `metrics.jsonl` and
//! TensorBoard events.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::controllers::ControllerConfig;
use crate::backbones::token_predictor::SampledGumbel;
use super::token_predictor_pg::{KeepRule, TokenRolloutPool, decided_forward, per_image_ce, pg_rewards, ppo_predictors, stage_evals};
use crate::backbones::dynamicvit::{DistillLossWeights, DynamicVit, DynamicVitArgs, distill_loss};
use crate::backbones::spec::{ModelArgs, args_for_arch};
use crate::backbones::vit::VisionTransformer;
use crate::backbones::{AnyBackbone, Backbone, BuildContext, ModelSpec};
use crate::data::Loader;
use crate::experiment::{Experiment, Layered};
use crate::logging::tensorboard::HParamValue;
use crate::nn::params::{load_state_dict, load_strict, state_dict};
use crate::rl::RlConfig;
use crate::rl::reinforce::policy_gradient_loss;
use crate::train::checkpoint;
use crate::train::losses::correct;
use crate::train::optim::{Optimizer, OptimizerConfig, ScheduleConfig};
use crate::session::run::{epoch_seed, RunLogs, SeedStream};
use crate::session::{Resumable, Session, epoch_batches, EvalData};
use crate::session::supervised::{self, EpochMetrics, TrainOptions, TrainSummary};
use crate::{Cpu, CpuAutodiff};

type Ad = CpuAutodiff;

choice! {
    /// `[controller] training`: the paper's differentiable recipe or policy gradient.
    #[derive(Default)]
    pub enum Training { #[default] Gumbel = "gumbel", PolicyGradient = "policy-gradient" }
    invalid: |s| format!("must be \"gumbel\" or \"policy-gradient\", got \"{s}\"")
}

/// The run summary file.
pub const SUMMARY_FILE: &str = "dynamicvit.json";

/// `[controller] kind = "token-predictor"` keys (besides `kind`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenPredictorOptions {
    pub training: Training,
    /// Epochs of student training (the teacher uses `[train] epochs`).
    pub epochs: usize,
    /// The predictors' learning rate; default `[train] optimizer.lr`. The student uses
    /// `[train]`'s optimizer kind and schedule with this rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// The backbone's learning rate is `lr · lr_scale` (the paper: 0.01).
    pub lr_scale: f64,
    /// Loss weights of `DistillDiffPruningLoss_dynamic` (the paper's 1, 2, 0.5).
    pub clf_weight: f64,
    pub ratio_weight: f64,
    pub distill_weight: f64,
    /// Policy-gradient only: λ, the price of each stage's keep-ratio gap in the reward.
    pub keep_penalty: f64,
}

impl Default for TokenPredictorOptions {
    fn default() -> Self {
        Self {
            training: Training::default(),
            epochs: 30,
            lr: None,
            lr_scale: 0.01,
            clf_weight: 1.0,
            ratio_weight: 2.0,
            distill_weight: 0.5,
            keep_penalty: 2.0,
        }
    }
}


impl TokenPredictorOptions {
    /// Parses `[controller]`'s kind-specific keys; errors as (key, message).
    pub fn from_config(cfg: &ControllerConfig) -> std::result::Result<Self, (String, String)> {
        cfg.kind_options()
    }

    fn problems(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        if self.epochs == 0 {
            v.push(("epochs".into(), "must be > 0, got 0".into()));
        }
        if let Some(lr) = self.lr
            && !(lr > 0.0 && lr.is_finite())
        {
            v.push(("lr".into(), format!("must be > 0, got {lr}")));
        }
        if !(0.0..=1.0).contains(&self.lr_scale) {
            v.push(("lr_scale".into(), format!("must be in [0, 1], got {}", self.lr_scale)));
        }
        for (k, x) in [
            ("clf_weight", self.clf_weight),
            ("ratio_weight", self.ratio_weight),
            ("distill_weight", self.distill_weight),
            ("keep_penalty", self.keep_penalty),
        ] {
            if !(x >= 0.0 && x.is_finite()) {
                v.push((k.into(), format!("must be >= 0, got {x}")));
            }
        }
        v
    }

    fn loss_weights(&self) -> DistillLossWeights {
        DistillLossWeights { clf_weight: self.clf_weight, ratio_weight: self.ratio_weight, distill_weight: self.distill_weight }
    }
}

/// The registry's option check for `token-predictor`.
pub fn check_options(cfg: &ControllerConfig) -> Vec<(String, String)> {
    match TokenPredictorOptions::from_config(cfg) {
        Ok(o) => o.problems(),
        Err(p) => vec![p],
    }
}

// ---------------------------------------------------------------------------------------------
// Teacher and student construction
// ---------------------------------------------------------------------------------------------

/// The DeiT zoo name under a `dynamicvit-<deit>-<ρ>` name (`dynamicvit-deit-s-0.7` → `deit-s`).
pub fn teacher_arch(student_arch: &str) -> Option<String> {
    let rest = student_arch.strip_prefix("dynamicvit-")?;
    let (deit, _) = rest.rsplit_once('-')?;
    Some(deit.to_string())
}

/// The student's arguments for the dataset, with errors pointing at `[backbone]`.
fn student_args(exp: &Experiment, layered: &Layered, ctx: &BuildContext) -> Result<DynamicVitArgs> {
    if !DynamicVitArgs::NAMES.contains(&exp.backbone.arch.as_str()) {
        return Err(layered.error_at(
            "backbone.arch",
            format!(
                "'{}' is not a DynamicViT backbone: controller 'token-predictor' needs one of {}",
                exp.backbone.arch,
                DynamicVitArgs::NAMES.join(", ")
            ),
        ));
    }
    args_for_arch::<DynamicVitArgs>(&exp.backbone.arch, &exp.backbone.options, ctx).map_err(|e| {
        let msg = format!("{e:#}");
        let key = msg
            .split_once("backbone.")
            .and_then(|(_, rest)| rest.split([' ', ':']).next())
            .map(|k| format!("backbone.{k}"))
            .unwrap_or_else(|| "backbone.arch".into());
        anyhow::anyhow!("{}: {msg}", layered.origin_of(&key))
    })
}

/// The teacher's experiment: the same file with `[backbone]` the plain DeiT of the student's
/// arguments, and no controller.
fn teacher_experiment(exp: &Experiment, args: &DynamicVitArgs) -> Result<Experiment> {
    let arch = teacher_arch(&exp.backbone.arch)
        .with_context(|| format!("'{}' names no DeiT teacher", exp.backbone.arch))?;
    let mut t = exp.clone();
    t.backbone.arch = arch;
    t.backbone.options = toml::Table::try_from(args.deit()).context("serialising the teacher's arguments")?;
    t.controller = None;
    t.rl = None;
    Ok(t)
}

fn deit_of(model: AnyBackbone<Cpu>) -> Result<VisionTransformer<Cpu>> {
    match model {
        AnyBackbone::Deit(v) => Ok(v),
        _ => bail!("the teacher is not a DeiT"),
    }
}

/// The student: `teacher`'s weights under the same names, plus fresh predictors.
pub fn student_from_teacher<B: crate::ModelBackend>(
    args: &DynamicVitArgs,
    teacher: &VisionTransformer<Cpu>,
    device: &B::Device,
) -> Result<DynamicVit<B>> {
    let student = DynamicVit::<B>::from_args(args, device)?;
    let (student, report) = load_state_dict(student, &state_dict(teacher));
    ensure!(
        report.unexpected.is_empty()
            && report.mis_shaped.is_empty()
            && report.missing.iter().all(|k| k.starts_with("score_predictor.")),
        "the teacher's weights do not fit the student: {report}"
    );
    Ok(student)
}

/// The teacher's logits and final tokens (after its norm, class token removed) `[N, P, C]`,
/// what token distillation compares the student's tokens with.
pub fn teacher_outputs(vit: &VisionTransformer<Cpu>, x: Tensor<Cpu, 4>) -> (Tensor<Cpu, 2>, Tensor<Cpu, 3>) {
    let mut h = vit.embed(x);
    for b in &vit.blocks {
        h = b.forward(h, None);
    }
    let h = vit.norm.forward(h);
    let t = h.dims()[1];
    (vit.head_from_normed(h.clone()), h.narrow(1, 1, t - 1))
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

/// The student evaluated with top-k pruning over a split.
#[derive(Debug, Clone, Serialize)]
pub struct PrunedEval {
    pub images: usize,
    pub top1: f64,
    pub loss: f64,
    /// Patch tokens the pruned forward actually ran with after each stage.
    pub kept_tokens: Vec<usize>,
    /// `kept_tokens[i] / P`.
    pub keep_ratios: Vec<f64>,
    /// MACs of the pruned forward (from the token counts that ran, predictors included) over the
    /// unpruned DeiT's.
    pub flops_ratio: f64,
    pub student_gmacs: f64,
    pub teacher_gmacs: f64,
}

/// Top-1 and cost of `model`'s pruned forward on `loader`.
pub fn evaluate_pruned(model: &DynamicVit<Cpu>, args: &DynamicVitArgs, loader: &Loader) -> Result<PrunedEval> {
    let device = Default::default();
    let (mut n_seen, mut n_correct, mut loss_sum) = (0usize, 0usize, 0.0f64);
    let mut kept_tokens: Vec<usize> = Vec::new();
    for batch in loader.epoch(0) {
        let batch = batch?;
        let (x, y) = batch.to_tensors::<Cpu>(&device);
        let n = batch.len();
        let (logits, kept) = model.forward_pruned(x);
        let counts: Vec<usize> = kept.iter().map(|k| k.dims()[1]).collect();
        if kept_tokens.is_empty() {
            kept_tokens = counts;
        } else if kept_tokens != counts {
            bail!("the pruned forward kept {counts:?} tokens on one batch and {kept_tokens:?} on another");
        }
        loss_sum += crate::train::losses::cross_entropy(logits.clone(), y.clone(), 0.0).into_scalar().elem::<f64>() * n as f64;
        n_correct += correct(logits, y);
        n_seen += n;
    }
    if n_seen == 0 {
        bail!("the evaluation split is empty");
    }
    let patches = args.patches();
    let student = args.cost_with_kept(args.img_size, &kept_tokens).macs();
    let teacher = args.deit().cost(args.img_size).macs();
    Ok(PrunedEval {
        images: n_seen,
        top1: n_correct as f64 / n_seen as f64,
        loss: loss_sum / n_seen as f64,
        keep_ratios: kept_tokens.iter().map(|&k| k as f64 / patches as f64).collect(),
        kept_tokens,
        flops_ratio: student as f64 / teacher.max(1) as f64,
        student_gmacs: student as f64 / 1e9,
        teacher_gmacs: teacher as f64 / 1e9,
    })
}

// ---------------------------------------------------------------------------------------------
// The policy-gradient variant
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// `rlprune train`
// ---------------------------------------------------------------------------------------------

fn with_lr(cfg: &OptimizerConfig, lr: f64) -> OptimizerConfig {
    let mut c = cfg.clone();
    match &mut c {
        OptimizerConfig::Sgd { lr: l, .. } | OptimizerConfig::Adamw { lr: l, .. } => *l = lr,
    }
    c
}

/// DynamicViT's token predictors: `[controller] kind = "token-predictor"`.
pub const METHOD: super::Method = super::Method {
    name: "token-predictor",
    check_options,
    train: train_token_predictor,
    eval: eval_token_predictor_run,
    visualize: None,
};

/// Where a token-predictor run stands after its last completed student epoch:
/// `checkpoints/token_predictor_state.json`, written last (atomically), after the student and
/// both optimizers' files of the same epoch. Data order, Gumbel noise and rollouts are
/// functions of (seed, epoch, step), so with these `--resume` continues bit for bit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenPredictorState {
    pub format: String,
    pub arch: String,
    pub student_epochs: usize,
    pub step: usize,
    /// Best test top-1 of the student epochs (none before the first).
    pub best: Option<f64>,
    pub predictor_optimizer_steps: u64,
    pub backbone_optimizer_steps: u64,
}

/// The state file's name under `checkpoints/`.
pub const STATE_FILE: &str = "token_predictor_state.json";
const PREDICTOR_OPTIM: &str = "predictors.optim.safetensors";
const BACKBONE_OPTIM: &str = "student.optim.safetensors";

fn save_state(ck: &Path, st: &TokenPredictorState) -> Result<()> {
    crate::fsutil::atomic_write(&ck.join(STATE_FILE), &serde_json::to_vec_pretty(st)?)
}

/// `rlprune train` for `[controller] kind = "token-predictor"` (see the module docs).
pub fn train_token_predictor(exp: &Experiment, layered: &Layered, opts: &TrainOptions) -> Result<TrainSummary> {
    let ctl = exp.controller.clone().ok_or_else(|| anyhow::anyhow!("train_token_predictor needs a [controller] section"))?;
    let to = TokenPredictorOptions::from_config(&ctl).map_err(|(k, m)| layered.error_at(&format!("controller.{k}"), m))?;
    let rl: RlConfig = exp.rl.clone().unwrap_or_default();
    let pg = to.training == Training::PolicyGradient;
    if pg && rl.algorithm == crate::rl::Algorithm::Dqn {
        return Err(layered.error_at(
            "rl.algorithm",
            format!(
                "must be \"reinforce\" or \"ppo\" for controller.training = \"policy-gradient\", got \"{}\"",
                rl.algorithm
            ),
        ));
    }
    let (session, args) = Session::open_with(exp, layered, opts, Resumable::Yes, |ctx| student_args(exp, layered, ctx))?;
    let teacher_exp = teacher_experiment(exp, &args)?;
    let (base, run_dir, train_loader, test_loader, ctx) = (&session.base, session.run_dir.clone(), &session.train_loader, &session.test_loader, &session.ctx);
    let device: burn::tensor::Device<Ad> = Default::default();
    let resumed = session.resumed_state(STATE_FILE, |st: &TokenPredictorState| &st.format)?;
    if let Some(st) = &resumed {
        session.check_arch(&st.arch)?;
    }

    // 1. The teacher: `[backbone] weights`, or trained into `<run>/teacher/` (continued when
    // the run is resumed, only loaded once complete).
    let teacher: VisionTransformer<Cpu> =
        match supervised::pretrained_backbone::<Ad>(&teacher_exp, layered, ctx, base, &run_dir, "teacher", session.resumed, &device)? {
            Ok(m) => deit_of(m.valid())?,
            Err(interrupted) => return Ok(interrupted),
        };

    // 2. Run directory, logs, the teacher's numbers.
    let RunLogs { mut metrics, mut tb } = session.logs()?;
    let mut model_table = toml::Table::new();
    model_table.insert("model".into(), toml::Value::Table(ModelSpec::DynamicVit(args.clone()).to_table()));
    crate::fsutil::atomic_write(&run_dir.join("model.toml"), toml::to_string_pretty(&model_table)?.as_bytes())?;
    let ck = session.checkpoint_dir()?;
    checkpoint::save_weights(&ck.join("teacher.safetensors"), &state_dict(&teacher), &teacher_exp.backbone.arch, exp.train.epochs, "model")?;
    let mut state = match resumed {
        Some(st) => st,
        None => {
            let st = TokenPredictorState {
                format: checkpoint::FORMAT.into(),
                arch: exp.backbone.arch.clone(),
                student_epochs: 0,
                step: 0,
                best: None,
                predictor_optimizer_steps: 0,
                backbone_optimizer_steps: 0,
            };
            save_state(&ck, &st)?;
            st
        }
    };
    let (teacher_loss, teacher_top1) = supervised::evaluate(&AnyBackbone::Deit(teacher.clone()), test_loader, &Default::default())?;
    tracing::info!("teacher {}: test top-1 {:.2}% (loss {teacher_loss:.4})", teacher_exp.backbone.arch, 100.0 * teacher_top1);

    // 3. The student.
    <Ad as Backend>::seed(&device, epoch_seed(exp.seed, SeedStream::TokenPredictor, usize::MAX));
    let mut student = student_from_teacher::<Ad>(&args, &teacher, &device)?;
    let before = evaluate_pruned(&student.valid(), &args, test_loader)?;
    tracing::info!(
        "phase 2: student ({} training, {} epochs), keeping {:?} of {} patches (FLOPs ratio {:.3}); top-1 with untrained predictors {:.2}%",
        to.training,
        to.epochs,
        before.kept_tokens,
        args.patches(),
        before.flops_ratio,
        100.0 * before.top1
    );
    if let (Some(tb), 0) = (tb.as_mut(), state.student_epochs) {
        tb.scalar("teacher/top1", 0, teacher_top1)?;
        tb.scalar("test/top1", 0, before.top1)?;
        tb.scalar("test/flops_ratio", 0, before.flops_ratio)?;
    }
    let lr = to.lr.unwrap_or(exp.train.optimizer.lr());
    let mut opt_predictors = Optimizer::<Ad>::new(with_lr(&exp.train.optimizer, lr));
    let mut opt_backbone = Optimizer::<Ad>::new(with_lr(&exp.train.optimizer, lr));
    opt_predictors.decay_only_matrices = exp.train.decay_only_matrices;
    opt_backbone.decay_only_matrices = exp.train.decay_only_matrices;
    let schedule = match exp.train.schedule.clone() {
        ScheduleConfig::Cosine { warmup_epochs, min_lr } => {
            ScheduleConfig::Cosine { warmup_epochs: warmup_epochs.min(to.epochs as f64 / 2.0), min_lr: min_lr.min(lr) }
        }
        other => other,
    };
    let pool = pg.then(|| TokenRolloutPool::new(rl.workers));
    let weights = to.loss_weights();
    let pg_weights = DistillLossWeights { ratio_weight: 0.0, ..weights };
    let steps_per_epoch = train_loader.num_batches();
    let total = steps_per_epoch * to.epochs;
    let patches = args.patches();
    let keep_counts = args.keep_counts();
    let stages = args.pruning_loc.len();
    let mut step = 0usize;
    let mut history = Vec::new();
    let mut best = f64::NEG_INFINITY;
    let mut last_eval = before.clone();
    if state.student_epochs > 0 {
        let tag = Some(state.student_epochs);
        let file = ck.join("last.safetensors");
        student = load_strict(student, &checkpoint::read_model(&file, &exp.backbone.arch, tag)?, &file.display().to_string())?;
        for (opt, name, steps) in [
            (&mut opt_predictors, PREDICTOR_OPTIM, state.predictor_optimizer_steps),
            (&mut opt_backbone, BACKBONE_OPTIM, state.backbone_optimizer_steps),
        ] {
            let file = ck.join(name);
            opt.load_state_dict(&checkpoint::read_model(&file, &exp.backbone.arch, tag)?, &device)?;
            opt.steps = steps;
        }
        step = state.step;
        best = state.best.unwrap_or(f64::NEG_INFINITY);
        last_eval = evaluate_pruned(&student.valid(), &args, test_loader)?;
        tracing::info!("resuming {} after {} student epochs (step {step})", run_dir.display(), state.student_epochs);
    }
    // `--stop-after-epoch N` counts student epochs; 0 stops once the teacher is done.
    let mut interrupted = opts.stop_after_epoch == Some(state.student_epochs);
    let epochs = if interrupted { to.epochs..to.epochs } else { state.student_epochs..to.epochs };
    for epoch in epochs {
        let t0 = Instant::now();
        <Ad as Backend>::seed(&device, epoch_seed(exp.seed, SeedStream::TokenPredictor, exp.train.epochs + epoch));
        let mut batches = epoch_batches(train_loader.epoch(exp.train.epochs + epoch), steps_per_epoch, &format!("student {}/{}", epoch + 1, to.epochs));
        let (mut loss_sum, mut n_seen, mut n_correct) = (0.0f64, 0usize, 0usize);
        let mut keep_sum = vec![0.0f64; stages];
        let mut cur_lr = lr;
        for batch in &mut batches {
            let batch = batch?;
            let n = batch.len();
            let (x, y) = batch.to_tensors::<Ad>(&device);
            let (t_logits, t_tokens) = teacher_outputs(&teacher, x.clone().inner());
            let (t_logits, t_tokens) = (Tensor::<Ad, 2>::from_inner(t_logits), Tensor::<Ad, 3>::from_inner(t_tokens));
            let mut scalars: Vec<(&str, f64)> = Vec::new();
            let mut ppo_batch = None;
            let (total_loss, logits, keeps) = if let Some(pool) = pool.as_ref() {
                // The predictors learn from Bernoulli samples drawn on the rollout workers; the
                // backbone learns under the top-k decisions it will be evaluated with (trained
                // under samples instead, it tested 3 points below its sampled training accuracy).
                let traj = pool.run(&student.valid(), &batch.images, batch.shape, &batch.labels, exp.seed ^ 0x7067, step as u64)?;
                let (top, top_stages) = decided_forward(&student, x.clone(), KeepRule::TopK(&keep_counts));
                let l = distill_loss(&top, y.clone(), t_logits, t_tokens, &args.token_ratio, pg_weights);
                let (rewards, keep_means) = pg_rewards(&traj.stages, &traj.cross_entropy, patches, &args.token_ratio, to.keep_penalty);
                let returns = crate::rl::reward::returns_to_go(&rewards);
                let baseline: Vec<Vec<f32>> = if rl.baseline == crate::rl::Baseline::SelfCritical {
                    // The return of inference's own decisions.
                    let g_ce = per_image_ce(top.logits.clone().detach(), y.clone());
                    crate::rl::reward::returns_to_go(&pg_rewards(&top_stages, &g_ce, patches, &args.token_ratio, to.keep_penalty).0)
                } else {
                    // No value head on the predictor: the batch-mean return per stage.
                    returns.iter().map(|r| vec![r.iter().sum::<f32>() / r.len().max(1) as f32; r.len()]).collect()
                };
                let episode: Vec<f32> = (0..n).map(|i| rewards.iter().map(|r| r[i]).sum()).collect();
                scalars.push(("pg/reward_mean", episode.iter().map(|&r| r as f64).sum::<f64>() / n.max(1) as f64));
                scalars.push(("student/kl", l.kl.clone().into_scalar().elem::<f64>()));
                scalars.push(("student/token_mse", l.token_mse.clone().into_scalar().elem::<f64>()));
                if rl.algorithm == crate::rl::Algorithm::Ppo {
                    // PPO's passes update the predictors after this step's backbone update.
                    ppo_batch = Some((traj, returns, baseline));
                    (l.total, top.logits, keep_means)
                } else {
                    let (policy_loss, entropy, _, policy_value) =
                        policy_gradient_loss(stage_evals(&student, &traj), &returns, Some(&baseline), &rl)?;
                    scalars.push(("pg/entropy", entropy));
                    scalars.push(("pg/policy_loss", policy_value));
                    (l.total + policy_loss, top.logits, keep_means)
                }
            } else {
                let out = student.forward_train(x.clone(), &mut SampledGumbel);
                let l = distill_loss(&out, y.clone(), t_logits, t_tokens, &args.token_ratio, weights);
                let keep_means: Vec<f64> =
                    out.decisions.iter().map(|d| d.clone().detach().mean().into_scalar().elem::<f64>()).collect();
                scalars.push(("student/ratio", l.ratio.clone().into_scalar().elem::<f64>()));
                scalars.push(("student/kl", l.kl.clone().into_scalar().elem::<f64>()));
                scalars.push(("student/token_mse", l.token_mse.clone().into_scalar().elem::<f64>()));
                (l.total, out.logits, keep_means)
            };
            let lv = total_loss.clone().into_scalar().elem::<f64>();
            if !lv.is_finite() {
                bail!("student epoch {}, step {step}: the loss became {lv}; lower controller.lr", epoch + 1);
            }
            n_correct += correct(logits.detach(), y);
            n_seen += n;
            loss_sum += lv * n as f64;
            for (s, k) in keep_sum.iter_mut().zip(&keeps) {
                *s += k * n as f64;
            }
            let mut raw = total_loss.backward();
            let predictor_grads = GradientsParams::from_module(&mut raw, &student.vit().score_predictor);
            let backbone_grads = GradientsParams::from_grads(raw, &student);
            cur_lr = schedule.lr_at(lr, step, total, steps_per_epoch);
            student = opt_predictors.step(student, predictor_grads, cur_lr, 1.0);
            student = opt_backbone.step(student, backbone_grads, cur_lr * to.lr_scale, 1.0);
            if let Some((traj, returns, baseline)) = ppo_batch {
                let seed = crate::rl::rollout::worker_seed(exp.seed ^ 0x7067, step as u64, usize::MAX >> 2);
                let (s, entropy, policy) =
                    ppo_predictors(student, &mut opt_predictors, &traj, &returns, &baseline, &rl, cur_lr, seed)?;
                student = s;
                scalars.push(("pg/entropy", entropy));
                scalars.push(("pg/policy_loss", policy));
            }
            step += 1;
            if step.is_multiple_of(exp.log.every_steps)
                && let Some(tb) = tb.as_mut()
            {
                tb.scalar("student/loss", step as i64, lv)?;
                tb.scalar("student/lr", step as i64, cur_lr)?;
                for (k, v) in &scalars {
                    tb.scalar(k, step as i64, *v)?;
                }
                for (i, k) in keeps.iter().enumerate() {
                    tb.scalar(&format!("student/train_keep/stage{i}"), step as i64, *k)?;
                }
            }
        }
        if batches.finish() {
            interrupted = true;
            break;
        }
        let ev = evaluate_pruned(&student.valid(), &args, test_loader)?;
        let m = EpochMetrics {
            epoch: epoch + 1,
            train_loss: loss_sum / n_seen.max(1) as f64,
            train_top1: n_correct as f64 / n_seen.max(1) as f64,
            test_loss: ev.loss,
            test_top1: ev.top1,
            lr: cur_lr,
            seconds: t0.elapsed().as_secs_f64(),
        };
        let train_keep: Vec<f64> = keep_sum.iter().map(|s| s / n_seen.max(1) as f64).collect();
        tracing::info!(
            "student {}/{}: {} {:.4} top1 {:.2}% keep {:?} | test top-1 {:.2}% pruned (teacher {:.2}%) at FLOPs ratio {:.3} | {:.1}s",
            m.epoch,
            to.epochs,
            // Under policy gradients the minimised quantity is the surrogate (distillation plus
            // the policy term, often negative), not a loss on the labels.
            if pg { "train surrogate" } else { "train loss" },
            m.train_loss,
            100.0 * m.train_top1,
            train_keep.iter().map(|k| (k * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
            100.0 * ev.top1,
            100.0 * teacher_top1,
            ev.flops_ratio,
            m.seconds
        );
        metrics.write(&json!({
            "student_epoch": m.epoch, "step": step, "train_loss": m.train_loss, "train_top1": m.train_top1,
            "train_keep_ratios": train_keep, "test_loss": ev.loss, "test_top1": ev.top1, "teacher_top1": teacher_top1,
            "keep_ratios": ev.keep_ratios, "test_flops_ratio": ev.flops_ratio, "lr": m.lr, "seconds": m.seconds,
        }))?;
        if let Some(tb) = tb.as_mut() {
            let s = step as i64;
            tb.scalar("test/top1", s, ev.top1)?;
            tb.scalar("test/loss", s, ev.loss)?;
            tb.scalar("test/flops_ratio", s, ev.flops_ratio)?;
            tb.scalar("teacher/top1", s, teacher_top1)?;
            for (i, k) in ev.keep_ratios.iter().enumerate() {
                tb.scalar(&format!("test/keep_ratio/stage{i}"), s, *k)?;
            }
            tb.flush()?;
        }
        let dict = state_dict(&student.valid());
        checkpoint::save_weights(&ck.join("last.safetensors"), &dict, &exp.backbone.arch, epoch + 1, "model")?;
        checkpoint::save_weights(&ck.join(PREDICTOR_OPTIM), &opt_predictors.state_dict(), &exp.backbone.arch, epoch + 1, "optimizer")?;
        checkpoint::save_weights(&ck.join(BACKBONE_OPTIM), &opt_backbone.state_dict(), &exp.backbone.arch, epoch + 1, "optimizer")?;
        if ev.top1 > best {
            best = ev.top1;
            checkpoint::save_weights(&ck.join("best.safetensors"), &dict, &exp.backbone.arch, epoch + 1, "model")?;
        }
        state = TokenPredictorState {
            student_epochs: epoch + 1,
            step,
            best: Some(best),
            predictor_optimizer_steps: opt_predictors.steps,
            backbone_optimizer_steps: opt_backbone.steps,
            ..state
        };
        save_state(&ck, &state)?;
        last_eval = ev;
        history.push(m);
        if opts.stop_after_epoch == Some(epoch + 1) && epoch + 1 < to.epochs {
            interrupted = true;
            break;
        }
    }
    if state.student_epochs == 0 && !ck.join("last.safetensors").is_file() {
        checkpoint::save_weights(&ck.join("last.safetensors"), &state_dict(&student.valid()), &exp.backbone.arch, 0, "model")?;
    }
    let seconds = session.seconds();
    let summary = json!({
        "training": to.training,
        "arch": exp.backbone.arch,
        "teacher_arch": teacher_exp.backbone.arch,
        "teacher_top1": teacher_top1,
        "student_top1": last_eval.top1,
        "student_best_top1": best.max(last_eval.top1),
        "top1_drop_points": 100.0 * (teacher_top1 - last_eval.top1),
        "student_top1_untrained_predictors": before.top1,
        "patches": patches,
        "kept_tokens": last_eval.kept_tokens,
        "keep_ratios": last_eval.keep_ratios,
        "token_ratio": args.token_ratio,
        "flops_ratio": last_eval.flops_ratio,
        "student_gmacs": last_eval.student_gmacs,
        "teacher_gmacs": last_eval.teacher_gmacs,
        "student_epochs": state.student_epochs,
        "teacher_epochs": if teacher_exp.backbone.weights.is_some() { 0 } else { exp.train.epochs },
        "test_images": last_eval.images,
        "seconds": seconds,
        "interrupted": interrupted,
    });
    crate::fsutil::atomic_write(&run_dir.join(SUMMARY_FILE), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    if let (Some(tb), false) = (tb.as_mut(), interrupted) {
        let hp = vec![
            ("arch".to_string(), HParamValue::Text(exp.backbone.arch.clone())),
            ("controller".to_string(), HParamValue::Text(ctl.kind.clone())),
            ("training".to_string(), HParamValue::Text(to.training.to_string())),
            ("lr".to_string(), HParamValue::Number(lr)),
            ("lr_scale".to_string(), HParamValue::Number(to.lr_scale)),
            ("epochs".to_string(), HParamValue::Number(to.epochs as f64)),
            ("seed".to_string(), HParamValue::Number(exp.seed as f64)),
        ];
        let finals = vec![
            ("hparams/test_top1".to_string(), last_eval.top1),
            ("hparams/teacher_top1".to_string(), teacher_top1),
            ("hparams/flops_ratio".to_string(), last_eval.flops_ratio),
        ];
        tb.hparams(&hp, &finals, step as i64)?;
        tb.flush()?;
    }
    tracing::info!(
        "done in {seconds:.1}s: teacher {:.2}%, student {:.2}% ({} training) at FLOPs ratio {:.3}, keep ratios {:?}",
        100.0 * teacher_top1,
        100.0 * last_eval.top1,
        to.training,
        last_eval.flops_ratio,
        last_eval.keep_ratios
    );
    Ok(TrainSummary { run_dir, epochs_done: history.len(), history, best_top1: best, interrupted, outcome: None, peers: Vec::new() })
}

/// Reads a run's `dynamicvit.json`.
pub fn read_summary(run_dir: &Path) -> Result<serde_json::Value> {
    let p = run_dir.join(SUMMARY_FILE);
    let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read the run summary", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid run summary", p.display()))
}

/// `rlprune eval RUN_DIR` for a token-predictor run: the student with top-k pruning against
/// the run's teacher, accuracy and measured latency in the same process.
pub fn eval_token_predictor_run(exp: &Experiment, layered: &Layered, run_dir: &Path, base: &Path) -> Result<serde_json::Value> {
    let ck = checkpoint::dir(run_dir);
    let wfile = if ck.join("best.safetensors").is_file() { ck.join("best.safetensors") } else { ck.join("last.safetensors") };
    let tfile = ck.join("teacher.safetensors");
    let EvalData { test_loader, ctx, .. } = EvalData::open(exp, base)?;
    let args = student_args(exp, layered, &ctx)?;
    let device = Default::default();
    let teacher_arch = teacher_arch(&exp.backbone.arch).unwrap_or_default();
    let teacher = load_strict(
        VisionTransformer::<Cpu>::from_args(&args.deit(), &device)?,
        &checkpoint::read_model(&tfile, &teacher_arch, None)?,
        &tfile.display().to_string(),
    )?;
    let student = load_strict(
        DynamicVit::<Cpu>::from_args(&args, &device)?,
        &checkpoint::read_model(&wfile, &exp.backbone.arch, None)?,
        &wfile.display().to_string(),
    )?;
    let ev = evaluate_pruned(&student, &args, &test_loader)?;
    let (_, teacher_top1) = supervised::evaluate(&AnyBackbone::Deit(teacher.clone()), &test_loader, &device)?;
    let sample = super::eval::example_images(&test_loader)?;
    let latency = super::eval::latency_against_unpruned(
        &sample,
        ev.flops_ratio,
        |x| {
            let _ = teacher.forward(x).into_data();
            Ok(())
        },
        |x| {
            let _ = student.forward_pruned(x).0.into_data();
            Ok(())
        },
    )?;
    let training = exp
        .controller
        .as_ref()
        .and_then(|c| TokenPredictorOptions::from_config(c).ok())
        .map(|o| o.training)
        .unwrap_or_default();
    Ok(json!({
        "source": run_dir.display().to_string(),
        "arch": exp.backbone.arch,
        "controller": "token-predictor",
        "training": training,
        "weights": wfile.display().to_string(),
        "images": ev.images,
        "top1": ev.top1,
        "loss": ev.loss,
        "full_compute_top1": teacher_top1,
        "backbone_top1": teacher_top1,
        "flops_ratio": ev.flops_ratio,
        "flops_reduction": 1.0 / ev.flops_ratio.max(1e-12),
        "kept_tokens": ev.kept_tokens,
        "keep_ratios": ev.keep_ratios,
        "patches": args.patches(),
        "latency": latency,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teacher_arch_strips_the_ratio() {
        assert_eq!(teacher_arch("dynamicvit-deit-s-0.7").as_deref(), Some("deit-s"));
        assert_eq!(teacher_arch("dynamicvit-deit-256-0.7").as_deref(), Some("deit-256"));
        assert_eq!(teacher_arch("deit-s"), None);
    }
}
