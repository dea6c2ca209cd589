//! Token reduction without a learned predictor, on the DeiT/ViT blocks of [`super::vit`]:
//! **ToMe** (Bolya et al., ICLR 2023) merges the `r` most similar token pairs in every block,
//! **EViT** (Liang et al., ICLR 2022) keeps, at a few blocks, the tokens the class token attends
//! to most and fuses the rest into one token. Every image of a batch keeps the same token count,
//! so batches stay dense tensors and the saving is real at any batch size.
//!
//! A model TOML turns them on with a sub-table of `[model]` (`family = "deit"`), under the names
//! of the official code: `[model.tome]` with `r`, `prop_attn`, `trace_source` (and `inflect`,
//! ToMe's schedule slope), `[model.evit]` with `base_keep_rate`, `drop_loc`, `fuse_token`.
//!
//! The decisions (ToMe's bipartite matching, EViT's top-k) are made on the host from small score
//! tensors; the tokens move through backend ops (a weighted merge of rows, row selection, a weighted sum), so
//! gradients reach the tokens when a model is fine-tuned with its reduction on.

use anyhow::{ensure, Result};
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::vit::VisionTransformer;
use super::TokenTrace;
use crate::nn::activation_op::softmax_last_dim;
use crate::nn::channel_op::{merge_tokens, residual, select_tokens};
use crate::nn::drop_path::drop_path;
use crate::ModelBackend;

/// ToMe's `r`: the tokens merged in every block, or one count per block (blocks past the list
/// merge none), as ToMe's `parse_r` reads `model.r`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MergeCount {
    Every(usize),
    PerBlock(Vec<usize>),
}

/// `[model.tome]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToMeArgs {
    /// Tokens merged per block (ToMe's `model.r`; 0 merges nothing, as ToMe's default).
    pub r: MergeCount,
    /// The slope of ToMe's schedule for one `r` (`model.r = (r, inflect)`): 0 merges `r` in every
    /// block, −0.5 merges 1.5·r in the first block down to 0.5·r in the last.
    pub inflect: f64,
    /// Proportional attention: `log(size)` of each key added to the attention logits.
    pub prop_attn: bool,
    /// Record which input tokens each final token holds (`rlprune infer` writes `source_idx`).
    pub trace_source: bool,
}

impl Default for ToMeArgs {
    fn default() -> Self {
        Self { r: MergeCount::Every(0), inflect: 0.0, prop_attn: true, trace_source: false }
    }
}

impl ToMeArgs {
    pub fn validate(&self, depth: usize) -> Result<()> {
        if let MergeCount::PerBlock(v) = &self.r {
            ensure!(v.len() <= depth, "model.tome.r lists {} blocks, the model has {depth}", v.len());
        }
        ensure!((-1.0..=1.0).contains(&self.inflect), "model.tome.inflect must be in [-1, 1], got {}", self.inflect);
        Ok(())
    }

    /// Tokens to merge in each of `depth` blocks (ToMe's `parse_r`), before the cap of
    /// `(tokens − 1) / 2` each block applies.
    pub fn schedule(&self, depth: usize) -> Vec<usize> {
        match &self.r {
            MergeCount::PerBlock(v) => (0..depth).map(|i| v.get(i).copied().unwrap_or(0)).collect(),
            MergeCount::Every(r) => {
                let r = *r as f64;
                let min = (r * (1.0 - self.inflect)).trunc();
                let max = 2.0 * r - min;
                let step = if depth > 1 { (max - min) / (depth - 1) as f64 } else { 0.0 };
                (0..depth).map(|i| (min + step * i as f64).trunc().max(0.0) as usize).collect()
            }
        }
    }
}

/// `[model.evit]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvitArgs {
    /// Fraction of the image tokens kept at each drop location (EViT's `--base_keep_rate`).
    pub base_keep_rate: f64,
    /// Blocks (0-based) whose attention decides which tokens the rest of the block keeps.
    pub drop_loc: Vec<usize>,
    /// Fuse the dropped tokens into one extra token, weighted by their class-token attention.
    pub fuse_token: bool,
    /// Training epochs with every token kept before the keep rate starts to shrink (EViT's
    /// `--shrink_start_epoch`; 10 in the paper's 300-epoch DeiT training).
    pub shrink_start_epoch: usize,
    /// Epochs over which the training keep rate falls from 1 to `base_keep_rate` on a cosine
    /// (EViT's `--shrink_epochs`; 100 in the paper). 0: the base rate from the first step.
    pub shrink_epochs: usize,
}

impl Default for EvitArgs {
    fn default() -> Self {
        Self { base_keep_rate: 0.7, drop_loc: vec![3, 6, 9], fuse_token: false, shrink_start_epoch: 0, shrink_epochs: 0 }
    }
}

impl EvitArgs {
    pub fn validate(&self, depth: usize) -> Result<()> {
        ensure!(
            self.base_keep_rate > 0.0 && self.base_keep_rate <= 1.0,
            "model.evit.base_keep_rate must be in (0, 1], got {}",
            self.base_keep_rate
        );
        ensure!(
            self.drop_loc.windows(2).all(|w| w[0] < w[1]) && self.drop_loc.iter().all(|&b| b < depth),
            "model.evit.drop_loc must be increasing block indices below the depth {depth}, got {:?}",
            self.drop_loc
        );
        Ok(())
    }

    /// Keep rate of each of `depth` blocks at `keep_rate` (1 = no drop), as EViT's `keep_rate`.
    pub fn keep_rates(&self, depth: usize, keep_rate: f64) -> Vec<f64> {
        (0..depth).map(|i| if self.drop_loc.contains(&i) { keep_rate } else { 1.0 }).collect()
    }
}

/// EViT's `adjust_keep_rate`: 1 for `start` epochs, then a cosine from 1 down to `base` over
/// `epochs` epochs, `base` after; `progress` counts training epochs (fractions within one).
pub fn warmup_keep_rate(progress: f64, start: usize, epochs: usize, base: f64) -> f64 {
    let (start, epochs) = (start as f64, epochs as f64);
    if progress < start {
        return 1.0;
    }
    if progress >= start + epochs {
        return base;
    }
    base + (1.0 - base) * (((progress - start) / epochs * std::f64::consts::PI).cos() + 1.0) / 2.0
}

/// Image tokens EViT keeps of `others` (every token but the class token): `⌈rate·others⌉`.
pub fn evit_keep_count(rate: f64, others: usize) -> usize {
    ((rate * others as f64).ceil() as usize).clamp(1, others.max(1))
}

/// The token reduction a ViT runs, resolved from its arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenReduction {
    ToMe { r: Vec<usize>, prop_attn: bool, trace_source: bool },
    /// `keep_rate` per block at evaluation; training follows `training_keep_rate`, which
    /// [`Self::set_training_progress`] moves along EViT's warm-up.
    Evit { keep_rate: Vec<f64>, fuse_token: bool, training_keep_rate: Vec<f64>, warmup: EvitArgs },
}

impl TokenReduction {
    pub fn from_args(depth: usize, tome: Option<&ToMeArgs>, evit: Option<&EvitArgs>) -> Option<Self> {
        if let Some(t) = tome {
            return Some(Self::ToMe { r: t.schedule(depth), prop_attn: t.prop_attn, trace_source: t.trace_source });
        }
        evit.map(|e| {
            let keep_rate = e.keep_rates(depth, e.base_keep_rate);
            let start = warmup_keep_rate(0.0, e.shrink_start_epoch, e.shrink_epochs, e.base_keep_rate);
            Self::Evit { keep_rate, fuse_token: e.fuse_token, training_keep_rate: e.keep_rates(depth, start), warmup: e.clone() }
        })
    }

    /// Moves EViT's training keep rate to where its warm-up is after `progress` epochs.
    pub fn set_training_progress(&mut self, progress: f64) {
        if let Self::Evit { keep_rate, training_keep_rate, warmup, .. } = self {
            let rate = warmup_keep_rate(progress, warmup.shrink_start_epoch, warmup.shrink_epochs, warmup.base_keep_rate);
            *training_keep_rate = warmup.keep_rates(keep_rate.len(), rate);
        }
    }

    /// Tokens (class token included) each block's attention and MLP run on, from `t0` tokens in.
    pub fn tokens(&self, t0: usize) -> Vec<(usize, usize)> {
        let mut t = t0;
        let steps: Vec<(usize, usize)> = match self {
            Self::ToMe { r, .. } => r
                .iter()
                .map(|&r| {
                    let attn = t;
                    t -= r.min(t.saturating_sub(1) / 2);
                    (attn, t)
                })
                .collect(),
            Self::Evit { keep_rate, fuse_token, .. } => keep_rate
                .iter()
                .map(|&rate| {
                    let attn = t;
                    let others = t - 1;
                    let left = evit_keep_count(rate, others);
                    if rate < 1.0 && left < others {
                        t = 1 + left + usize::from(*fuse_token);
                    }
                    (attn, t)
                })
                .collect(),
        };
        steps
    }
}

fn int_tensor<B: ModelBackend>(v: Vec<i64>, shape: [usize; 2], device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn host<B: ModelBackend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data")
}

/// ToMe's forward: in every block, between the attention residual and the MLP, bipartite soft
/// matching on the keys (averaged over heads) merges `r` token pairs by a size-weighted average.
pub fn tome_forward<B: ModelBackend>(
    vit: &VisionTransformer<B>,
    x: Tensor<B, 4>,
    r: &[usize],
    prop_attn: bool,
    trace_source: bool,
) -> (Tensor<B, 2>, TokenTrace<B>) {
    let mut x = vit.embed(x);
    let [n, t0, _] = x.dims();
    let device = x.device();
    // Host state per image: each token's size, and the current position of every input token.
    let mut size = vec![1.0f32; n * t0];
    let mut source: Vec<usize> = (0..n).flat_map(|_| 0..t0).collect();
    let mut t = t0;
    for (block, &r) in vit.blocks.iter().zip(r) {
        let bias = (prop_attn && t < t0)
            .then(|| Tensor::<B, 2>::from_data(TensorData::new(size.iter().map(|s| s.ln()).collect::<Vec<_>>(), [n, t]), &device));
        let (a, qkv) = block.attn.forward_parts(block.norm1.forward(x.clone()), None, bias);
        x = residual(x, drop_path(a, block.drop_path), None, 2);
        let r = r.min((t - 1) / 2);
        if r > 0 {
            let plan = MergePlan::new(host(similarity(qkv, block.attn.num_heads)), n, t, r);
            let moved = plan.new_positions();
            let mut new_size = vec![0.0f32; n * (t - r)];
            for img in 0..n {
                for p in 0..t {
                    new_size[img * (t - r) + moved[img * t + p]] += size[img * t + p];
                }
                if trace_source {
                    for s in &mut source[img * t0..(img + 1) * t0] {
                        *s = moved[img * t + *s];
                    }
                }
            }
            // ToMe's `merge_wavg`: Σ size·x / Σ size over the tokens each merged token holds.
            let weight: Vec<f32> = (0..n * t).map(|i| size[i] / new_size[(i / t) * (t - r) + moved[i]]).collect();
            let target = int_tensor(moved.iter().map(|&p| p as i64).collect(), [n, t], &device);
            let weight = Tensor::<B, 2>::from_data(TensorData::new(weight, [n, t]), &device);
            x = merge_tokens(x, target, weight, t - r);
            size = new_size;
            t -= r;
        }
        x = residual(x.clone(), drop_path(block.mlp.forward(block.norm2.forward(x)), block.drop_path), None, 2);
    }
    let trace = if trace_source {
        vec![("source_idx".to_string(), int_tensor(source.into_iter().map(|s| s as i64).collect(), [n, t0], &device))]
    } else {
        Vec::new()
    };
    (vit.head_from_tokens(x), trace)
}

/// Cosine similarity `[N, ⌈T/2⌉, ⌊T/2⌋]` between the even (set A) and odd (set B) tokens' keys,
/// averaged over heads (ToMe's metric).
fn similarity<B: ModelBackend>(qkv: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
    let [n, t, c3] = qkv.dims();
    let c = c3 / 3;
    let keys = qkv.detach().narrow(2, c, c).reshape([n, t, heads, c / heads]).mean_dim(2).reshape([n, t, c / heads]);
    let norm = keys.clone().powi_scalar(2).sum_dim(2).sqrt();
    let keys = keys / norm;
    let device = keys.device();
    let pick = |start: usize| {
        let idx: Vec<i64> = (start..t).step_by(2).map(|i| i as i64).collect();
        let len = idx.len();
        keys.clone().select(1, Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [len]), &device))
    };
    let (a, b) = (pick(0), pick(1));
    a.matmul(b.swap_dims(1, 2))
}

/// One block's bipartite matching, per image: which A tokens merge into which B tokens.
struct MergePlan {
    n: usize,
    t: usize,
    r: usize,
    /// Per image, the unmerged A tokens (indices into A), ascending.
    unmerged: Vec<Vec<usize>>,
    /// Per image, `(A index, B index)` of the `r` merged pairs.
    pairs: Vec<Vec<(usize, usize)>>,
}

impl MergePlan {
    /// From the similarity `scores` `[N, TA, TB]` of `t` tokens: each A token's best B token,
    /// the `r` A tokens with the highest best score merge (the class token, A's first, never).
    fn new(scores: Vec<f32>, n: usize, t: usize, r: usize) -> Self {
        let (ta, tb) = (t.div_ceil(2), t / 2);
        let mut unmerged = Vec::with_capacity(n);
        let mut pairs = Vec::with_capacity(n);
        for img in 0..n {
            let best: Vec<(f32, usize)> = (0..ta)
                .map(|i| {
                    if i == 0 {
                        return (f32::NEG_INFINITY, 0);
                    }
                    let row = &scores[(img * ta + i) * tb..][..tb];
                    row.iter().enumerate().fold((f32::NEG_INFINITY, 0), |(m, at), (j, &v)| if v > m { (v, j) } else { (m, at) })
                })
                .collect();
            let mut order: Vec<usize> = (0..ta).collect();
            order.sort_by(|&i, &j| best[j].0.total_cmp(&best[i].0));
            let mut rest = order[r..].to_vec();
            rest.sort_unstable();
            pairs.push(order[..r].iter().map(|&i| (i, best[i].1)).collect());
            unmerged.push(rest);
        }
        Self { n, t, r, unmerged, pairs }
    }

    /// `[N, T]`: the position in the merged sequence of each token before the merge.
    fn new_positions(&self) -> Vec<usize> {
        let unm = self.t.div_ceil(2) - self.r;
        let mut out = vec![0usize; self.n * self.t];
        for img in 0..self.n {
            let o = &mut out[img * self.t..(img + 1) * self.t];
            for (rank, &i) in self.unmerged[img].iter().enumerate() {
                o[2 * i] = rank;
            }
            for &(i, j) in &self.pairs[img] {
                o[2 * i] = unm + j;
            }
            for j in 0..self.t / 2 {
                o[2 * j + 1] = unm + j;
            }
        }
        out
    }
}

/// The class token's attention to every other token, averaged over heads, `[N, T − 1]` (EViT's
/// score), from the block's `qkv` `[N, T, 3C]`.
fn class_attention<B: ModelBackend>(qkv: Tensor<B, 3>, heads: usize, scale: f64) -> Tensor<B, 2> {
    let [n, t, c3] = qkv.dims();
    let (c, d) = (c3 / 3, c3 / 3 / heads);
    let q = qkv.clone().narrow(1, 0, 1).narrow(2, 0, c).reshape([n, heads, 1, d]);
    let k = qkv.narrow(2, c, c).reshape([n, t, heads, d]).swap_dims(1, 2);
    let probs = softmax_last_dim(q.matmul(k.swap_dims(2, 3)).mul_scalar(scale));
    probs.mean_dim(1).reshape([n, t]).narrow(1, 1, t - 1)
}

/// EViT's forward: at blocks with a keep rate below 1, after the attention residual, the image
/// tokens with the highest class-token attention follow the class token (highest first) and, with
/// `fuse_token`, one token `Σ attention·x` over the dropped ones; the MLP runs on that set. A
/// fused token counts as an image token at later stages.
pub fn evit_forward<B: ModelBackend>(
    vit: &VisionTransformer<B>,
    x: Tensor<B, 4>,
    keep_rate: &[f64],
    fuse_token: bool,
) -> (Tensor<B, 2>, TokenTrace<B>) {
    let mut x = vit.embed(x);
    let [n, t0, _] = x.dims();
    let device = x.device();
    // Original patch index of each current image token, per image (−1: a fused token).
    let mut abs: Vec<i64> = (0..n).flat_map(|_| 0..(t0 - 1) as i64).collect();
    let mut trace = Vec::new();
    for (block, &rate) in vit.blocks.iter().zip(keep_rate) {
        let (a, qkv) = block.attn.forward_parts(block.norm1.forward(x.clone()), None, None);
        x = residual(x, drop_path(a, block.drop_path), None, 2);
        let [_, t, _] = x.dims();
        let others = t - 1;
        let left = evit_keep_count(rate, others);
        if rate < 1.0 && left < others {
            let scores = class_attention(qkv, block.attn.num_heads, block.attn.scale);
            let host_scores = host(scores.clone());
            let mut rows = Vec::with_capacity(n * (left + 1));
            let mut kept_abs = Vec::with_capacity(n * left);
            let mut dropped = vec![0.0f32; n * others];
            for img in 0..n {
                let s = &host_scores[img * others..(img + 1) * others];
                let mut order: Vec<usize> = (0..others).collect();
                order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
                rows.push(0);
                for &i in &order[..left] {
                    rows.push(i as i64 + 1);
                    kept_abs.push(abs[img * others + i]);
                }
                for &i in &order[left..] {
                    dropped[img * others + i] = 1.0;
                }
            }
            let kept = select_tokens(x.clone(), int_tensor(rows, [n, left + 1], &device));
            abs = if fuse_token {
                let mask = Tensor::<B, 2>::from_data(TensorData::new(dropped, [n, others]), &device);
                let weights = (scores * mask).reshape([n, 1, others]);
                let fused = weights.matmul(x.narrow(1, 1, others));
                x = Tensor::cat(vec![kept, fused], 1);
                kept_abs.chunks_exact(left).flat_map(|k| k.iter().copied().chain([-1])).collect()
            } else {
                x = kept;
                kept_abs.clone()
            };
            trace.push((format!("keep_abs_s{}", trace.len()), int_tensor(kept_abs, [n, left], &device)));
        }
        x = residual(x.clone(), drop_path(block.mlp.forward(block.norm2.forward(x)), block.drop_path), None, 2);
    }
    (vit.head_from_tokens(x), trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tome_schedules_follow_parse_r() {
        let every = |r, inflect| ToMeArgs { r: MergeCount::Every(r), inflect, ..ToMeArgs::default() };
        assert_eq!(every(8, 0.0).schedule(4), vec![8; 4]);
        // parse_r(12, (8, -0.5)): min int(12.0) = 12, max 4, step -8/11.
        let dec = every(8, -0.5).schedule(12);
        assert_eq!(dec, vec![12, 11, 10, 9, 9, 8, 7, 6, 6, 5, 4, 4]);
        let list = ToMeArgs { r: MergeCount::PerBlock(vec![3, 2]), ..ToMeArgs::default() };
        assert_eq!(list.schedule(4), vec![3, 2, 0, 0]);
        assert!(list.validate(1).is_err());
        assert!(every(8, 1.5).validate(12).is_err());
    }

    #[test]
    fn evit_keep_rate_warms_up_as_adjust_keep_rate() {
        assert_eq!(warmup_keep_rate(0.5, 1, 2, 0.5), 1.0);
        assert_eq!(warmup_keep_rate(1.0, 1, 2, 0.5), 1.0);
        assert!((warmup_keep_rate(2.0, 1, 2, 0.5) - 0.75).abs() < 1e-12);
        assert_eq!(warmup_keep_rate(3.0, 1, 2, 0.5), 0.5);
        assert_eq!(warmup_keep_rate(0.0, 0, 0, 0.7), 0.7);
        let e = EvitArgs { base_keep_rate: 0.5, drop_loc: vec![1], shrink_start_epoch: 1, shrink_epochs: 2, ..EvitArgs::default() };
        let mut r = TokenReduction::from_args(3, None, Some(&e)).unwrap();
        let rates = |r: &TokenReduction| match r {
            TokenReduction::Evit { keep_rate, training_keep_rate, .. } => (keep_rate.clone(), training_keep_rate.clone()),
            _ => unreachable!(),
        };
        assert_eq!(rates(&r), (vec![1.0, 0.5, 1.0], vec![1.0, 1.0, 1.0]));
        r.set_training_progress(2.0);
        assert_eq!(rates(&r).1, vec![1.0, 0.75, 1.0]);
        r.set_training_progress(7.0);
        assert_eq!(rates(&r), (vec![1.0, 0.5, 1.0], vec![1.0, 0.5, 1.0]));
    }

    #[test]
    fn token_counts_match_the_official_models() {
        let tome = TokenReduction::from_args(6, Some(&ToMeArgs { r: MergeCount::Every(8), ..ToMeArgs::default() }), None).unwrap();
        let after: Vec<usize> = tome.tokens(197).iter().map(|t| t.1).collect();
        assert_eq!(after, vec![189, 181, 173, 165, 157, 149]);
        let evit = EvitArgs { fuse_token: true, ..EvitArgs::default() };
        let evit = TokenReduction::from_args(12, None, Some(&evit)).unwrap();
        let after: Vec<usize> = evit.tokens(197).iter().map(|t| t.1).collect();
        assert_eq!(after, vec![197, 197, 197, 140, 140, 140, 100, 100, 100, 72, 72, 72]);
    }

    #[test]
    fn merge_plan_orders_unmerged_a_then_b() {
        // One image, 5 tokens: A = {0, 2, 4}, B = {1, 3}. Scores of A rows 1 and 2 (tokens 2, 4):
        // token 2 is closest to B0 (0.9), token 4 to B1 (0.5); r = 1 merges token 2 into token 1.
        let scores = vec![0.0, 0.0, 0.9, 0.1, 0.2, 0.5];
        let plan = MergePlan::new(scores, 1, 5, 1);
        assert_eq!(plan.pairs, vec![vec![(1, 0)]]);
        assert_eq!(plan.unmerged, vec![vec![0, 2]]);
        // Merged order: token 0, token 4, then B = {1 (+ 2), 3}.
        assert_eq!(plan.new_positions(), vec![0, 2, 2, 3, 1]);
    }
}
