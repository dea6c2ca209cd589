//! DeiT / ViT (Dosovitskiy et al. 2021; Touvron et al. 2021) as in timm's
//! `VisionTransformer`, with timm's parameter names (`patch_embed.proj`, `cls_token`,
//! `pos_embed`, `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`,
//! `head`) and LayerNorm eps 1e-6. The blocks take an optional keep policy (see
//! [`crate::nn::attention`]) so that DynamicViT can reuse them; the model also exposes its
//! token embedding and head separately for the same reason.

use anyhow::{ensure, Result};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;

use crate::ModelBackend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::spec::{args_for_arch, ModelArgs};
use super::{Backbone, BuildContext, Family};
use crate::metrics::flops::CostReport;
use crate::nn::attention::Attention;
use crate::nn::channel_op::residual;
use crate::nn::drop_path::{drop_path, dropout, linspace_rates};
use crate::nn::layers::trunc_normal;
use crate::backbones::token_predictor::PredictorLG;
use super::token_reduction::{evit_forward, tome_forward, EvitArgs, ToMeArgs, TokenReduction};
use super::{InnerPruning, TokenTrace};
use crate::nn::resample::ResolutionParam;
use crate::nn::{LayerNorm, Linear, Mlp, PatchEmbed};

/// timm's `VisionTransformer` constructor arguments (DeiT uses `qkv_bias = true` and
/// LayerNorm eps 1e-6), with timm's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeitArgs {
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
    /// ToMe: merge similar tokens in every block (`[model.tome]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tome: Option<ToMeArgs>,
    /// EViT: keep the tokens the class token attends to most (`[model.evit]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evit: Option<EvitArgs>,
}

impl Default for DeitArgs {
    fn default() -> Self {
        Self {
            img_size: 224,
            patch_size: 16,
            in_chans: 3,
            num_classes: 1000,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_ratio: 4.0,
            qkv_bias: true,
            qk_scale: None,
            representation_size: None,
            drop_rate: 0.0,
            attn_drop_rate: 0.0,
            drop_path_rate: 0.0,
            tome: None,
            evit: None,
        }
    }
}

impl DeitArgs {
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// The token reduction `[model.tome]` or `[model.evit]` asks for.
    pub fn token_reduction(&self) -> Option<TokenReduction> {
        TokenReduction::from_args(self.depth, self.tome.as_ref(), self.evit.as_ref())
    }

    /// MACs per image at `img_size` with the token reduction over those of the same model
    /// keeping every token (1 without a reduction).
    pub fn reduction_flops_ratio(&self, img_size: usize) -> f64 {
        let full = Self { tome: None, evit: None, ..self.clone() };
        self.cost(img_size).macs() as f64 / full.cost(img_size).macs() as f64
    }
}

impl ModelArgs for DeitArgs {
    const FAMILY: &'static str = "deit";
    const NAMES: &'static [&'static str] = &["deit-ti", "deit-s", "deit-b", "deit-256"];

    fn named(name: &str) -> Option<Self> {
        let (embed_dim, num_heads) = match name {
            "deit-ti" => (192, 3),
            "deit-s" => (384, 6),
            "deit-b" => (768, 12),
            // DynamicViT's narrow DeiT.
            "deit-256" => (256, 4),
            _ => return None,
        };
        Some(Self { embed_dim, num_heads, ..Self::default() })
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.patch_size >= 1 && self.grid() >= 1, "patch_size {} does not fit img_size {}", self.patch_size, self.img_size);
        ensure!(self.embed_dim >= 1 && self.depth >= 1, "embed_dim and depth must be positive");
        ensure!(
            self.num_heads >= 1 && self.embed_dim.is_multiple_of(self.num_heads),
            "embed_dim {} is not divisible by num_heads {}",
            self.embed_dim,
            self.num_heads
        );
        ensure!(self.mlp_hidden() >= 1, "mlp_ratio {} gives no hidden units", self.mlp_ratio);
        ensure!(self.num_classes >= 1 && self.in_chans >= 1, "num_classes and in_chans must be positive");
        ensure!(self.tome.is_none() || self.evit.is_none(), "[model.tome] and [model.evit] cannot both be set");
        if let Some(t) = &self.tome {
            t.validate(self.depth)?;
        }
        if let Some(e) = &self.evit {
            e.validate(self.depth)?;
        }
        for (n, p) in [("drop_rate", self.drop_rate), ("attn_drop_rate", self.attn_drop_rate), ("drop_path_rate", self.drop_path_rate)] {
            ensure!((0.0..1.0).contains(&p), "{n} must be in [0, 1), got {p}");
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

    fn inner_pruning(&self, img_size: usize) -> Option<InnerPruning> {
        let name = match self.token_reduction()? {
            TokenReduction::ToMe { .. } => "tome",
            TokenReduction::Evit { .. } => "evit",
        };
        Some(InnerPruning { name, flops_ratio: self.reduction_flops_ratio(img_size) })
    }

    fn cost(&self, img_size: usize) -> CostReport {
        let g = img_size / self.patch_size;
        let t0 = g * g + 1;
        let Some(reduction) = self.token_reduction() else {
            return self.cost_with(img_size, &vec![t0; self.depth], &mut |c, i| {
                if i == 0 {
                    c.stage("blocks");
                }
            });
        };
        let tokens = reduction.tokens(t0);
        let heads = self.num_heads;
        let hd = self.embed_dim / heads;
        self.cost_split(img_size, &tokens, &mut |c, i, (attn, mlp)| {
            if i == 0 {
                c.stage("blocks");
            }
            // The scores each method decides from: ToMe's key similarities between its two
            // token sets, EViT's fused token (its class-token attention is part of the block's).
            match &reduction {
                TokenReduction::ToMe { .. } if mlp < attn => {
                    c.matmul(1, attn.div_ceil(2), hd, attn / 2);
                }
                TokenReduction::Evit { fuse_token: true, .. } if mlp < attn => {
                    c.matmul(1, 1, attn - 1, self.embed_dim);
                }
                _ => {}
            }
        })
    }
}

impl DeitArgs {
    /// The model's cost when block `i` runs on `tokens[i]` tokens (class token included) and
    /// `before_block(c, i)` counts whatever runs before block `i` (it may start a stage; DynamicViT
    /// adds its predictors there). The final norm runs on the last block's tokens.
    pub fn cost_with(
        &self,
        img_size: usize,
        tokens: &[usize],
        before_block: &mut dyn FnMut(&mut CostReport, usize),
    ) -> CostReport {
        let split: Vec<(usize, usize)> = tokens.iter().map(|&t| (t, t)).collect();
        self.cost_split(img_size, &split, &mut |c, i, _| before_block(c, i))
    }

    /// [`Self::cost_with`] for blocks whose MLP runs on fewer tokens than their attention
    /// (`tokens[i] = (attention, MLP)`; ToMe and EViT reduce the tokens in between);
    /// `before_block(c, i, tokens[i])` counts what runs before block `i`'s MLP.
    pub fn cost_split(
        &self,
        img_size: usize,
        tokens: &[(usize, usize)],
        before_block: &mut BeforeBlock<'_>,
    ) -> CostReport {
        assert_eq!(tokens.len(), self.depth, "one token count per block");
        let d = self.embed_dim;
        let g = img_size / self.patch_size;
        let mut c = CostReport::new(img_size);
        c.stage("patch_embed")
            .conv2d(self.in_chans, d, self.patch_size, 1, true, [g, g])
            .add_params(d + (self.grid() * self.grid() + 1) * d);
        for (i, &t) in tokens.iter().enumerate() {
            before_block(&mut c, i, t);
            block_cost_split(&mut c, d, self.num_heads, self.mlp_hidden(), self.qkv_bias, t);
        }
        c.stage("head").layer_norm(d, tokens.last().map_or(g * g + 1, |t| t.1));
        let mut feat = d;
        if let Some(r) = self.representation_size {
            c.linear(d, r, true, 1);
            feat = r;
        }
        c.linear(feat, self.num_classes, true, 1);
        c
    }
}

/// What [`DeitArgs::cost_split`] counts before block `i`'s MLP: `(report, i, (attention tokens,
/// MLP tokens))`.
pub type BeforeBlock<'a> = dyn FnMut(&mut CostReport, usize, (usize, usize)) + 'a;

/// One transformer block on `t` tokens: MACs of the linears, `q·kᵀ`, `attn·v` and the two norms.
pub fn block_cost(c: &mut CostReport, d: usize, heads: usize, hidden: usize, qkv_bias: bool, t: usize) {
    block_cost_split(c, d, heads, hidden, qkv_bias, (t, t));
}

/// [`block_cost`] with the attention on `attn` tokens and the norm and MLP after it on `mlp`.
fn block_cost_split(c: &mut CostReport, d: usize, heads: usize, hidden: usize, qkv_bias: bool, (attn, mlp): (usize, usize)) {
    c.layer_norm(d, attn)
        .linear(d, 3 * d, qkv_bias, attn)
        .matmul(heads, attn, d / heads, attn)
        .matmul(heads, attn, attn, d / heads)
        .linear(d, d, true, attn)
        .layer_norm(d, mlp)
        .linear(d, hidden, true, mlp)
        .linear(hidden, d, true, mlp);
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    pub drop_path: f64,
}

impl<B: ModelBackend> Block<B> {
    pub fn new(args: &DeitArgs, drop_path: f64, device: &B::Device) -> Self {
        let d = args.embed_dim;
        let mut attn = Attention::new(d, args.num_heads, args.qkv_bias, args.qk_scale, device);
        attn.attn_drop = args.attn_drop_rate;
        attn.proj_drop = args.drop_rate;
        Self {
            norm1: LayerNorm::new(d, 1e-6, device),
            attn,
            norm2: LayerNorm::new(d, 1e-6, device),
            mlp: Mlp::new(d, args.mlp_hidden(), args.drop_rate, device),
            drop_path,
        }
    }

    /// `x`: `[N, T, C]`; `policy`: optional keep mask `[N, T]` (DynamicViT training).
    pub fn forward(&self, x: Tensor<B, 3>, policy: Option<Tensor<B, 2>>) -> Tensor<B, 3> {
        let x = residual(x.clone(), drop_path(self.attn.forward(self.norm1.forward(x), policy), self.drop_path), None, 2);
        residual(x.clone(), drop_path(self.mlp.forward(self.norm2.forward(x)), self.drop_path), None, 2)
    }
}

/// timm's `pre_logits` (`representation_size`): `fc` then tanh.
#[derive(Module, Debug)]
pub struct PreLogits<B: Backend> {
    pub fc: Linear<B>,
}

#[derive(Module, Debug)]
pub struct VisionTransformer<B: Backend> {
    pub patch_embed: PatchEmbed<B>,
    pub cls_token: Param<Tensor<B, 3>>,
    pub pos_embed: Param<Tensor<B, 3>>,
    pub blocks: Vec<Block<B>>,
    pub norm: LayerNorm<B>,
    pub pre_logits: Option<PreLogits<B>>,
    pub head: Linear<B>,
    /// DynamicViT's token predictors (`score_predictor.{i}`), one per entry of `pruning_loc`;
    /// empty for plain DeiT. They live here, not in a wrapper, so that their parameter names
    /// sit next to `blocks` as in the reference state dict (see `backbones::dynamicvit`).
    pub score_predictor: Vec<PredictorLG<B>>,
    /// Blocks before which a predictor runs.
    pub pruning_loc: Vec<usize>,
    /// Keep ratio of each pruning stage, relative to the original patch count.
    pub token_ratio: Vec<f64>,
    pub img_size: usize,
    pub drop_rate: f64,
    /// ToMe or EViT, when the arguments ask for one.
    #[module(skip)]
    pub reduction: Option<TokenReduction>,
}

impl<B: ModelBackend> VisionTransformer<B> {
    pub fn from_args(args: &DeitArgs, device: &B::Device) -> Result<Self> {
        args.validate()?;
        let d = args.embed_dim;
        let t = args.grid() * args.grid() + 1;
        let rates = linspace_rates(args.drop_path_rate, args.depth);
        let pre_logits = args
            .representation_size
            .map(|r| PreLogits { fc: Linear::new_trunc_normal(d, r, true, device) });
        let feat = args.representation_size.unwrap_or(d);
        Ok(Self {
            patch_embed: PatchEmbed::new(args.in_chans, d, args.patch_size, device),
            cls_token: Param::from_tensor(trunc_normal([1, 1, d], 0.02, device)),
            pos_embed: Param::from_tensor(trunc_normal([1, t, d], 0.02, device)),
            blocks: rates.iter().map(|&r| Block::new(args, r, device)).collect(),
            norm: LayerNorm::new(d, 1e-6, device),
            pre_logits,
            head: Linear::new_trunc_normal(feat, args.num_classes, true, device),
            score_predictor: Vec::new(),
            pruning_loc: Vec::new(),
            token_ratio: Vec::new(),
            img_size: args.img_size,
            drop_rate: args.drop_rate,
            reduction: args.token_reduction(),
        })
    }

    pub fn embed_dim(&self) -> usize {
        self.cls_token.dims()[2]
    }

    /// Images → tokens `[N, 1 + P, C]`: patch embedding, class token, position embedding.
    pub fn embed(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let [_, _, h, w] = x.dims();
        assert!(
            h == self.img_size && w == self.img_size,
            "input {h}×{w} does not match the model's img_size {}",
            self.img_size
        );
        let x = self.patch_embed.forward(x);
        let [n, _, d] = x.dims();
        let cls = self.cls_token.val().expand([n, 1, d]);
        let x = Tensor::cat(vec![cls, x], 1) + self.pos_embed.val();
        dropout(x, self.drop_rate)
    }

    /// Final norm, class token, (pre-logits) and head: `[N, T, C]` → logits.
    pub fn head_from_tokens(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        self.head_from_normed(self.norm.forward(x))
    }

    /// Class token (pre-logits) and head of tokens that went through the final norm.
    pub fn head_from_normed(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [n, _, d] = x.dims();
        let mut f = x.narrow(1, 0, 1).reshape([n, d]);
        if let Some(p) = &self.pre_logits {
            f = p.fc.forward(f).tanh();
        }
        self.head.forward(f)
    }
}

impl<B: ModelBackend> VisionTransformer<B> {
    /// The forward without token reduction, whatever the arguments asked for.
    pub fn forward_all_tokens(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut x = self.embed(x);
        for b in &self.blocks {
            x = b.forward(x, None);
        }
        self.head_from_tokens(x)
    }
}

impl<B: ModelBackend> Backbone<B> for VisionTransformer<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        match &self.reduction {
            None => self.forward_all_tokens(x),
            Some(_) => self.forward_traced(x).0,
        }
    }

    fn set_training_progress(&mut self, epochs: f64) {
        if let Some(r) = &mut self.reduction {
            r.set_training_progress(epochs);
        }
    }

    fn forward_unpruned(&self, x: Tensor<B, 4>) -> Option<Tensor<B, 2>> {
        self.reduction.is_some().then(|| self.forward_all_tokens(x))
    }

    fn resolution_params(&self) -> Vec<(String, ResolutionParam)> {
        vec![("pos_embed".into(), ResolutionParam::PosEmbed { extra_tokens: 1 })]
    }

    fn forward_traced(&self, x: Tensor<B, 4>) -> (Tensor<B, 2>, TokenTrace<B>) {
        match &self.reduction {
            None => (self.forward_all_tokens(x), Vec::new()),
            Some(TokenReduction::ToMe { r, prop_attn, trace_source }) => tome_forward(self, x, r, *prop_attn, *trace_source),
            Some(TokenReduction::Evit { keep_rate, fuse_token, training_keep_rate, .. }) => {
                // Training follows EViT's keep-rate warm-up; evaluation keeps the base rate.
                let rates = if B::ad_enabled(&x.device()) { training_keep_rate } else { keep_rate };
                evit_forward(self, x, rates, *fuse_token)
            }
        }
    }
}

impl<B: ModelBackend> Family<B> for VisionTransformer<B> {
    const ARCHS: &'static [&'static str] = DeitArgs::NAMES;

    fn build(arch: &str, options: &toml::Table, ctx: &BuildContext, device: &B::Device) -> Result<Self> {
        Self::from_args(&args_for_arch::<DeitArgs>(arch, options, ctx)?, device)
    }

    fn cost(arch: &str, options: &toml::Table, ctx: &BuildContext) -> Result<CostReport> {
        let args = args_for_arch::<DeitArgs>(arch, options, ctx)?;
        Ok(args.cost(args.img_size().unwrap_or(ctx.img_size[0])))
    }
}
