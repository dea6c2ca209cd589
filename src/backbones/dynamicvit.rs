//! DynamicViT on DeiT (Rao et al., NeurIPS 2021), the reference's
//! `VisionTransformerDiffPruning`: the DeiT of [`super::vit`] (same blocks, same parameter
//! names) plus token predictors `score_predictor.{i}` ([`PredictorLG`]) before the blocks in
//! `pruning_loc`, keeping `token_ratio[i]` of the original patches at stage `i`.
//!
//! - Eval (inner backend, [`DynamicVit::forward_pruned`]): each predictor scores the current
//!   tokens, the top `int(P·ρ_i)` are gathered (the class token always stays) and the remaining
//!   blocks run on that subset — the compute saving is real.
//! - Differentiable training ([`DynamicVit::forward_train`]): all `P` tokens stay; hard
//!   Gumbel-softmax decisions multiply the previous decision and mask attention
//!   ([`crate::nn::attention::softmax_with_policy`]); [`distill_loss`] is the reference
//!   `DistillDiffPruningLoss_dynamic` with the unpruned backbone as teacher.
//!
//! The model is a one-variant enum around [`VisionTransformer`]: enum variants add no segment to
//! parameter paths, so the state dict keys are the reference ones (`blocks.0.attn.qkv.weight`,
//! `score_predictor.1.out_conv.4.bias`, ...), and the DeiT code is reused as is.

use anyhow::{ensure, Result};
use burn::module::Module;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor};
use serde::{Deserialize, Serialize};

use super::spec::{args_for_arch, ModelArgs};
use super::vit::{DeitArgs, VisionTransformer};
use super::{Backbone, BuildContext, Family};
use crate::nn::channel_op::{channel_slice, select_tokens};
use crate::backbones::token_predictor::{gumbel_keep, keep_count, top_k_keep, GumbelSource, PredictorLG};
use crate::metrics::flops::CostReport;
use crate::ModelBackend;

/// `VisionTransformerDiffPruning`'s constructor arguments: DeiT's plus the pruning schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DynamicVitArgs {
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub num_classes: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qk_scale: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub representation_size: Option<usize>,
    pub drop_rate: f64,
    pub attn_drop_rate: f64,
    pub drop_path_rate: f64,
    /// Blocks before which a predictor runs.
    pub pruning_loc: Vec<usize>,
    /// Keep ratio per pruning stage, of the original patch count (ρ, ρ², ρ³ in the paper).
    pub token_ratio: Vec<f64>,
    /// The reference's flag for also returning the final tokens in training (for token
    /// distillation); the computation does not depend on it.
    pub distill: bool,
}

impl Default for DynamicVitArgs {
    fn default() -> Self {
        Self::from_deit(&DeitArgs::default(), 0.7)
    }
}

/// The paper's schedule: predictors before blocks 3, 6, 9, keep ratios ρ, ρ², ρ³ (computed as
/// Python's `ρ ** i`, so that `int(P·ρ_i)` agrees with the reference).
fn ratios(rho: f64) -> Vec<f64> {
    vec![rho, rho.powf(2.0), rho.powf(3.0)]
}

impl DynamicVitArgs {
    pub fn from_deit(d: &DeitArgs, rho: f64) -> Self {
        Self {
            img_size: d.img_size,
            patch_size: d.patch_size,
            in_chans: d.in_chans,
            num_classes: d.num_classes,
            embed_dim: d.embed_dim,
            depth: d.depth,
            num_heads: d.num_heads,
            mlp_ratio: d.mlp_ratio,
            qkv_bias: d.qkv_bias,
            qk_scale: d.qk_scale,
            representation_size: d.representation_size,
            drop_rate: d.drop_rate,
            attn_drop_rate: d.attn_drop_rate,
            drop_path_rate: d.drop_path_rate,
            pruning_loc: vec![3, 6, 9],
            token_ratio: ratios(rho),
            distill: true,
        }
    }

    /// The DeiT backbone's arguments (the teacher's).
    pub fn deit(&self) -> DeitArgs {
        DeitArgs {
            img_size: self.img_size,
            patch_size: self.patch_size,
            in_chans: self.in_chans,
            num_classes: self.num_classes,
            embed_dim: self.embed_dim,
            depth: self.depth,
            num_heads: self.num_heads,
            mlp_ratio: self.mlp_ratio,
            qkv_bias: self.qkv_bias,
            qk_scale: self.qk_scale,
            representation_size: self.representation_size,
            drop_rate: self.drop_rate,
            attn_drop_rate: self.attn_drop_rate,
            drop_path_rate: self.drop_path_rate,
            tome: None,
            evit: None,
        }
    }

    /// Patch tokens of the original grid.
    pub fn patches(&self) -> usize {
        let g = self.img_size / self.patch_size;
        g * g
    }

    /// Patch tokens kept at each pruning stage.
    pub fn keep_counts(&self) -> Vec<usize> {
        self.token_ratio.iter().map(|&r| keep_count(self.patches(), r)).collect()
    }
}

impl ModelArgs for DynamicVitArgs {
    const FAMILY: &'static str = "dynamicvit-deit";
    const NAMES: &'static [&'static str] = &[
        "dynamicvit-deit-s-0.9",
        "dynamicvit-deit-s-0.8",
        "dynamicvit-deit-s-0.7",
        "dynamicvit-deit-s-0.6",
        "dynamicvit-deit-s-0.5",
        "dynamicvit-deit-b-0.7",
        "dynamicvit-deit-256-0.7",
    ];

    fn named(name: &str) -> Option<Self> {
        if !Self::NAMES.contains(&name) {
            return None;
        }
        let rest = name.strip_prefix("dynamicvit-")?;
        let (deit, rho) = rest.rsplit_once('-')?;
        Some(Self::from_deit(&DeitArgs::named(deit)?, rho.parse().ok()?))
    }

    fn validate(&self) -> Result<()> {
        self.deit().validate()?;
        ensure!(self.embed_dim >= 4, "embed_dim {} is too small for the predictors (C/4 ≥ 1)", self.embed_dim);
        ensure!(
            self.pruning_loc.len() == self.token_ratio.len(),
            "pruning_loc has {} entries but token_ratio has {}",
            self.pruning_loc.len(),
            self.token_ratio.len()
        );
        ensure!(!self.pruning_loc.is_empty(), "pruning_loc is empty (use family = \"deit\" for an unpruned model)");
        ensure!(
            self.pruning_loc.windows(2).all(|w| w[0] < w[1]),
            "pruning_loc must be strictly increasing, got {:?}",
            self.pruning_loc
        );
        ensure!(
            self.pruning_loc.iter().all(|&l| l < self.depth),
            "pruning_loc {:?} must index blocks below depth {}",
            self.pruning_loc,
            self.depth
        );
        for (i, &r) in self.token_ratio.iter().enumerate() {
            ensure!(r > 0.0 && r <= 1.0, "token_ratio[{i}] must be in (0, 1], got {r}");
            ensure!(keep_count(self.patches(), r) >= 1, "token_ratio[{i}] = {r} keeps no token of {}", self.patches());
        }
        Ok(())
    }

    fn adapt(&mut self, ctx: &BuildContext) {
        self.num_classes = ctx.num_classes;
        self.in_chans = ctx.in_channels;
        self.img_size = ctx.img_size[0];
    }

    fn img_size(&self) -> Option<usize> {
        Some(self.img_size)
    }

    fn in_chans(&self) -> usize {
        self.in_chans
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// MACs with the tokens actually kept per stage (`int(P·ρ_i)` + the class token), plus
    /// each predictor on the tokens it scores — fvcore's count of the reference in eval mode.
    fn cost(&self, img_size: usize) -> CostReport {
        let g = img_size / self.patch_size;
        let patches = g * g;
        let kept: Vec<usize> = self.token_ratio.iter().map(|&r| keep_count(patches, r)).collect();
        self.cost_with_kept(img_size, &kept)
    }
}

impl DynamicVitArgs {
    /// The model's cost when pruning stage `i` keeps `kept[i]` patch tokens (e.g. the counts a
    /// pruned forward actually ran with), predictors included.
    pub fn cost_with_kept(&self, img_size: usize, kept_per_stage: &[usize]) -> CostReport {
        assert_eq!(kept_per_stage.len(), self.pruning_loc.len(), "one kept count per pruning stage");
        let g = img_size / self.patch_size;
        let patches = g * g;
        let mut kept = vec![patches; self.depth];
        let mut scored = Vec::new();
        for (s, (&loc, &k)) in self.pruning_loc.iter().zip(kept_per_stage).enumerate() {
            scored.push(if s == 0 { patches } else { kept[loc - 1] });
            kept[loc..].fill(k);
        }
        let tokens: Vec<usize> = kept.iter().map(|k| k + 1).collect();
        let d = self.embed_dim;
        let mut stage = 0;
        self.deit().cost_with(img_size, &tokens, &mut |c, i| {
            if i == 0 {
                c.stage(format!("blocks ({} tokens)", tokens[0]));
            }
            if self.pruning_loc.get(stage) == Some(&i) {
                c.stage(format!("score_predictor.{stage} + blocks ({} tokens)", tokens[i]))
                    .add_params(PredictorLG::<crate::Cpu>::num_params(d))
                    .add_macs(PredictorLG::<crate::Cpu>::macs(d, scored[stage]));
                stage += 1;
            }
        })
    }
}

/// DynamicViT-DeiT; see the module docs for why this is a one-variant enum.
#[derive(Module, Debug)]
pub enum DynamicVit<B: Backend> {
    Deit(VisionTransformer<B>),
}

/// A stage's keep decision: `(stage, tokens [N, P, C], log_probs [N, P, 2], prev [N, P]) ->
/// keep [N, P]` (see [`DynamicVit::forward_with_decisions`]).
pub type StageDecision<'a, B> = dyn FnMut(usize, &Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 2>) -> Tensor<B, 2> + 'a;

/// What a differentiable training pass returns (the reference's `x, features, prev_decision,
/// out_pred_prob`).
pub struct TrainOutput<B: Backend> {
    pub logits: Tensor<B, 2>,
    /// The final tokens after the last norm, without the class token: `[N, P, C]`.
    pub features: Tensor<B, 3>,
    /// The last stage's keep decision `[N, P]` (detached).
    pub final_decision: Tensor<B, 2>,
    /// Each stage's keep decision `[N, P]`, differentiable (straight-through).
    pub decisions: Vec<Tensor<B, 2>>,
}

impl<B: ModelBackend> DynamicVit<B> {
    pub fn from_args(args: &DynamicVitArgs, device: &B::Device) -> Result<Self> {
        args.validate()?;
        let mut vit = VisionTransformer::from_args(&args.deit(), device)?;
        vit.score_predictor = args.pruning_loc.iter().map(|_| PredictorLG::new(args.embed_dim, device)).collect();
        vit.pruning_loc = args.pruning_loc.clone();
        vit.token_ratio = args.token_ratio.clone();
        Ok(Self::Deit(vit))
    }

    pub fn vit(&self) -> &VisionTransformer<B> {
        match self {
            Self::Deit(v) => v,
        }
    }

    /// Eval-mode forward with real token pruning. Returns the logits and, per pruning stage,
    /// the kept patch indices `[N, k_i]` in the original grid's numbering (best score first).
    pub fn forward_pruned(&self, x: Tensor<B, 4>) -> (Tensor<B, 2>, Vec<Tensor<B, 2, Int>>) {
        let vit = self.vit();
        let mut x = vit.embed(x);
        let [n, t, _] = x.dims();
        let patches = t - 1;
        let device = x.device();
        // Original-grid index of each current patch token.
        let mut abs = Tensor::<B, 1, Int>::arange(0..patches as i64, &device).reshape([1, patches]).expand([n, patches]);
        let mut kept = Vec::with_capacity(vit.pruning_loc.len());
        let mut stage = 0;
        for (i, block) in vit.blocks.iter().enumerate() {
            if vit.pruning_loc.get(stage) == Some(&i) {
                let [_, t, _] = x.dims();
                let spatial = channel_slice(x.clone(), 1, t - 1);
                let log_probs = vit.score_predictor[stage].forward(spatial, None);
                let keep = top_k_keep(log_probs, keep_count(patches, vit.token_ratio[stage]));
                // The class token, then the kept patch tokens (indices past the class token).
                let rows = Tensor::cat(vec![Tensor::<B, 2, Int>::zeros([n, 1], &device), keep.clone() + 1], 1);
                x = select_tokens(x, rows);
                abs = abs.gather(1, keep);
                kept.push(abs.clone());
                stage += 1;
            }
            x = block.forward(x, None);
        }
        (vit.head_from_tokens(x), kept)
    }

    /// Differentiable (Gumbel-softmax) training forward on all tokens with policy-masked
    /// attention, as the reference in training mode. Noise per stage comes from `noise`.
    pub fn forward_train(&self, x: Tensor<B, 4>, noise: &mut dyn GumbelSource<B>) -> TrainOutput<B> {
        self.forward_with_decisions(x, &mut |stage, _, log_probs, prev| {
            let [n, p, _] = log_probs.dims();
            let g = noise.noise(stage, [n, p, 2], &log_probs.device());
            gumbel_keep(log_probs, g, prev)
        })
    }

    /// The training-mode forward (all tokens, policy-masked attention) with the keep decision of
    /// each stage made by `decide(stage, tokens [N, P, C], log_probs [N, P, 2], prev [N, P]) ->
    /// keep [N, P]`, `tokens` being the predictor's input: the Gumbel recipe
    /// ([`Self::forward_train`]) or sampled Bernoulli decisions (the policy-gradient variant).
    /// `keep` must already include `prev` (dropped stays dropped).
    pub fn forward_with_decisions(
        &self,
        x: Tensor<B, 4>,
        decide: &mut StageDecision<'_, B>,
    ) -> TrainOutput<B> {
        let vit = self.vit();
        let mut x = vit.embed(x);
        let [n, t, _] = x.dims();
        let patches = t - 1;
        let device = x.device();
        let mut prev = Tensor::<B, 2>::ones([n, patches], &device);
        let mut policy = Tensor::<B, 2>::ones([n, t], &device);
        let mut decisions = Vec::with_capacity(vit.pruning_loc.len());
        let mut stage = 0;
        for (i, block) in vit.blocks.iter().enumerate() {
            if vit.pruning_loc.get(stage) == Some(&i) {
                let spatial = x.clone().narrow(1, 1, patches);
                let log_probs = vit.score_predictor[stage].forward(spatial.clone(), Some(prev.clone()));
                let keep = decide(stage, &spatial, log_probs, prev);
                decisions.push(keep.clone());
                policy = Tensor::cat(vec![Tensor::ones([n, 1], &device), keep.clone()], 1);
                prev = keep;
                stage += 1;
            }
            // Every block sees the policy in training, also the all-ones one before the first
            // predictor (as the reference; it changes the softmax by its eps only).
            x = block.forward(x, Some(policy.clone()));
        }
        let x = vit.norm.forward(x);
        let features = x.clone().narrow(1, 1, patches);
        TrainOutput { logits: vit.head_from_normed(x), features, final_decision: prev.detach(), decisions }
    }
}

impl<B: ModelBackend> Backbone<B> for DynamicVit<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.forward_pruned(x).0
    }

    fn forward_traced(&self, x: Tensor<B, 4>) -> (Tensor<B, 2>, super::TokenTrace<B>) {
        let (logits, kept) = self.forward_pruned(x);
        (logits, kept.into_iter().enumerate().map(|(i, k)| (format!("keep_abs_s{i}"), k)).collect())
    }

    fn resolution_params(&self) -> Vec<(String, crate::nn::resample::ResolutionParam)> {
        let Self::Deit(vit) = self;
        vit.resolution_params()
    }
}

impl<B: ModelBackend> Family<B> for DynamicVit<B> {
    const ARCHS: &'static [&'static str] = DynamicVitArgs::NAMES;

    fn build(arch: &str, options: &toml::Table, ctx: &BuildContext, device: &B::Device) -> Result<Self> {
        Self::from_args(&args_for_arch::<DynamicVitArgs>(arch, options, ctx)?, device)
    }

    fn cost(arch: &str, options: &toml::Table, ctx: &BuildContext) -> Result<CostReport> {
        let args = args_for_arch::<DynamicVitArgs>(arch, options, ctx)?;
        Ok(args.cost(args.img_size().unwrap_or(ctx.img_size[0])))
    }
}

/// Weights of the reference `DistillDiffPruningLoss_dynamic`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillLossWeights {
    pub clf_weight: f64,
    pub ratio_weight: f64,
    pub distill_weight: f64,
}

impl Default for DistillLossWeights {
    fn default() -> Self {
        Self { clf_weight: 1.0, ratio_weight: 2.0, distill_weight: 0.5 }
    }
}

/// The parts of the DynamicViT training loss (scalars `[1]`).
pub struct DistillLoss<B: Backend> {
    pub total: Tensor<B, 1>,
    pub cls: Tensor<B, 1>,
    /// Mean over stages of the per-image squared gap between the keep fraction and ρ_i.
    pub ratio: Tensor<B, 1>,
    pub kl: Tensor<B, 1>,
    pub token_mse: Tensor<B, 1>,
}

/// `DistillDiffPruningLoss_dynamic` (non-`dynamic` ratio term, `mse_token = true`):
/// `clf·CE + ratio·Σ_i mean_n (keep_n,i − ρ_i)² / stages + distill·KL(teacher ‖ student logits,
/// batchmean) + distill·MSE(student, teacher tokens over the kept tokens)`.
/// `teacher_logits` / `teacher_tokens` (`[N, P, C]`, after the teacher's final norm) carry no
/// gradient.
pub fn distill_loss<B: Backend>(
    out: &TrainOutput<B>,
    labels: Tensor<B, 1, Int>,
    teacher_logits: Tensor<B, 2>,
    teacher_tokens: Tensor<B, 3>,
    token_ratio: &[f64],
    w: DistillLossWeights,
) -> DistillLoss<B> {
    let [n, _] = out.logits.dims();
    let device = out.logits.device();
    // Cross entropy, mean over the batch.
    let log_p = log_softmax(out.logits.clone(), 1);
    let picked = log_p.clone().gather(1, labels.reshape([n, 1]));
    let cls = picked.mean().neg();
    // Keep-ratio term.
    let mut ratio = Tensor::<B, 1>::zeros([1], &device);
    for (d, &r) in out.decisions.iter().zip(token_ratio) {
        let gap = d.clone().mean_dim(1).sub_scalar(r);
        ratio = ratio + (gap.clone() * gap).mean();
    }
    let stages = out.decisions.len().max(1) as f64;
    // KL(teacher ‖ student) with batchmean: Σ p_t (log p_t − log p_s) / N.
    let log_t = log_softmax(teacher_logits.detach(), 1);
    let kl = (softmax(log_t.clone(), 1) * (log_t - log_p)).sum().div_scalar(n as f64);
    // Token MSE over the tokens kept at the end.
    let [_, p, c] = out.features.dims();
    let mask = out.final_decision.clone().greater_elem(0.5).float();
    let kept = mask.clone().sum().into_scalar().elem::<f64>();
    let token_mse = if kept < 0.1 {
        Tensor::zeros([1], &device)
    } else {
        let diff = out.features.clone() - teacher_tokens.detach();
        (diff.clone() * diff * mask.reshape([n, p, 1])).sum().div_scalar(kept * c as f64)
    };
    let total = cls.clone().mul_scalar(w.clf_weight)
        + ratio.clone().mul_scalar(w.ratio_weight / stages)
        + kl.clone().mul_scalar(w.distill_weight)
        + token_mse.clone().mul_scalar(w.distill_weight);
    DistillLoss { total, cls, ratio, kl, token_mse }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    #[test]
    fn named_variants_follow_the_paper() {
        let a = DynamicVitArgs::named("dynamicvit-deit-s-0.7").unwrap();
        assert_eq!((a.embed_dim, a.num_heads, a.pruning_loc.clone()), (384, 6, vec![3, 6, 9]));
        assert_eq!(a.keep_counts(), vec![137, 96, 67]);
        assert_eq!(DynamicVitArgs::named("dynamicvit-deit-s-0.9").unwrap().keep_counts(), vec![176, 158, 142]);
        assert!(DynamicVitArgs::named("dynamicvit-deit-s-0.75").is_none());
    }

    #[test]
    fn validation_names_the_argument() {
        let mut a = DynamicVitArgs::named("dynamicvit-deit-s-0.7").unwrap();
        a.pruning_loc = vec![3, 12, 9];
        assert!(format!("{:#}", a.validate().unwrap_err()).contains("pruning_loc"));
        a.pruning_loc = vec![3, 6];
        assert!(format!("{:#}", a.validate().unwrap_err()).contains("token_ratio"));
    }

    #[test]
    fn pruned_forward_keeps_the_scheduled_tokens_and_matches_built_params() {
        let args = DynamicVitArgs {
            img_size: 32,
            patch_size: 8,
            embed_dim: 16,
            depth: 4,
            num_heads: 2,
            num_classes: 5,
            pruning_loc: vec![1, 3],
            token_ratio: vec![0.5, 0.25],
            ..Default::default()
        };
        let dev = Default::default();
        let m = DynamicVit::<Cpu>::from_args(&args, &dev).unwrap();
        assert_eq!(m.num_params() as u64, args.cost(32).params());
        let x = Tensor::<Cpu, 4>::random([3, 3, 32, 32], burn::tensor::Distribution::Default, &dev);
        let (logits, kept) = m.forward_pruned(x);
        assert_eq!(logits.dims(), [3, 5]);
        assert_eq!(kept.iter().map(|k| k.dims()).collect::<Vec<_>>(), vec![[3, 8], [3, 4]]);
        // Stage 1 keeps a subset of stage 0, in original-grid numbering.
        let s0 = kept[0].to_data().to_vec::<i64>().unwrap();
        let s1 = kept[1].to_data().to_vec::<i64>().unwrap();
        for b in 0..3 {
            let row0 = &s0[b * 8..(b + 1) * 8];
            assert!(s1[b * 4..(b + 1) * 4].iter().all(|i| row0.contains(i) && (0..16).contains(i)));
        }
    }
}
