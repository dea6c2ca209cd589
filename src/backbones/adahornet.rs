//! AdaHorNet: dynamic spatial sparsification of a HorNet (DynamicViT's CNN extension, Rao et al.,
//! TPAMI 2023, applied to the HorNet of [`super::hornet`]).
//!
//! The third stage (`stages.2`) gets `PredictorLG` score modules ([`PredictorLG`], as DynamicViT's)
//! before its blocks `pruning_loc`; predictor `s` keeps `int(P·token_ratio[s])` of the stage's
//! `P = H·W` positions (the zoo's ρ variants use `[ρ, ρ−0.2, ρ−0.4]`), choosing among the
//! positions the previous predictor kept. From the first predictor on, every block of the stage is
//! an *AdaBlock*: kept positions get the full HorNet block, dropped positions the cheap fast path
//! `x + γ_f · Linear(LayerNorm(x))` (`fast_path.{j}`). The feature map stays dense — dropped
//! positions carry their fast-path features on to the next block and to stage 4.
//!
//! **Where the saving comes from (inference, [`AdaHornet::forward_pruned`]).** A HorNet block is
//! `x + γ₁·gnconv(LN(x))`, then `x + γ₂·MLP(LN(x))`, with `gnconv` = `proj_in` (1×1, d → 2d),
//! a depthwise 7×7 conv on the `abc` part of `proj_in`'s output, the recursive gating through the
//! 1×1 `pws`, and `proj_out` (1×1). Only the depthwise conv looks at neighbours. As the TPAMI
//! paper does for ConvNeXt's depthwise conv, we run the spatial part densely and gather the kept
//! positions for everything pointwise:
//! - dense, on all `P` positions: `norm1`, the `abc` rows of `proj_in` (its input to the
//!   depthwise conv) and the depthwise conv itself (or HorNet-GF's global-local filter) — so every
//!   kept position sees exactly the neighbourhood the dense network would show it, including the
//!   current features of dropped neighbours;
//! - gathered, on the `k` kept positions: the `pwa` rows of `proj_in`, the gating products, the
//!   `pws`, `proj_out`, `norm2` and the MLP (`pwconv1`, `pwconv2`) — about 80 % of a block's
//!   multiply-adds (the MLP alone is 8·d² of ~11.5·d² per position);
//! - gathered, on the `P − k` dropped positions: the fast path (d² per position).
//!
//! The alternative — computing `proj_in` only at kept positions and letting dropped neighbours
//! contribute zeros to the depthwise conv — would save another ~2·d² per dropped position but
//! changes what kept positions see; we keep the dense neighbourhood.
//!
//! **Training** (autodiff backend, [`AdaHornet::forward_masked`]): all positions compute both
//! paths and are blended with a keep mask `m`: `m·block(x) + (1−m)·fast(x)`. The mask of stage `s`
//! keeps exactly `k_s` positions (Gumbel-top-k: the `k_s` largest `log p_keep + Gumbel noise`
//! among the previously kept positions, i.e. sampling without replacement from the predictor) and
//! is made differentiable with the straight-through estimator `m = hard − p.detach() + p`, as
//! DynamicViT's hard Gumbel-softmax. Because the keep count is fixed by construction — as at
//! inference — no ratio loss is needed, and the plain supervised trainer trains the backbone and
//! the predictors end to end with cross-entropy. Without noise on the inner backend the masked
//! computation equals the gathered one (tested).

use anyhow::{bail, ensure, Result};
use burn::module::{Module, Param};
use crate::nn::activation_op::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, IndexingUpdateOp, Int, Tensor};
use serde::{Deserialize, Serialize};

use super::hornet::{Block, Downsample, DwConv, GnconvArgs, Hornet, HornetArgs};
use super::spec::{args_for_arch, ModelArgs};
use super::{Backbone, BuildContext, Family, InnerPruning};
use crate::nn::channel_op::select_tokens;
use crate::backbones::token_predictor::{keep_count, top_k_keep, PredictorLG};
use crate::metrics::flops::CostReport;
use crate::nn::conv::conv2d_gemm;
use crate::nn::layers::trunc_normal;
use crate::nn::{Conv2d, LayerNorm, Linear};
use crate::ModelBackend;

/// The stage that carries the predictors (HorNet's third, 0-based 2).
pub const ADAPTIVE_STAGE: usize = 2;

/// `HorNet(...)`'s arguments plus the spatial pruning schedule of stage 3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaHornetArgs {
    pub in_chans: usize,
    pub num_classes: usize,
    pub depths: [usize; 4],
    pub base_dim: usize,
    pub drop_path_rate: f64,
    pub layer_scale_init_value: f64,
    pub head_init_scale: f64,
    pub gnconv: [GnconvArgs; 4],
    pub uniform_init: bool,
    /// Blocks of stage 3 (0-based, within the stage) before which a predictor runs.
    pub pruning_loc: Vec<usize>,
    /// Fraction of stage 3's positions kept from each predictor on (non-increasing).
    pub token_ratio: Vec<f64>,
}

impl Default for AdaHornetArgs {
    fn default() -> Self {
        Self::from_hornet(&HornetArgs::default(), 0.7)
    }
}

impl AdaHornetArgs {
    /// `hornet`'s network with predictors at the start and the thirds of stage 3, keeping
    /// `[ρ, ρ−0.2, ρ−0.4]`.
    pub fn from_hornet(h: &HornetArgs, rho: f64) -> Self {
        let d = h.depths[ADAPTIVE_STAGE];
        let mut loc = vec![0, d / 3, 2 * d / 3];
        loc.dedup();
        let token_ratio = [rho, rho - 0.2, rho - 0.4].into_iter().take(loc.len()).map(|r| (r * 1e6).round() / 1e6).collect();
        Self {
            in_chans: h.in_chans,
            num_classes: h.num_classes,
            depths: h.depths,
            base_dim: h.base_dim,
            drop_path_rate: h.drop_path_rate,
            layer_scale_init_value: h.layer_scale_init_value,
            head_init_scale: h.head_init_scale,
            gnconv: h.gnconv.clone(),
            uniform_init: h.uniform_init,
            pruning_loc: loc,
            token_ratio,
        }
    }

    /// The dense HorNet underneath.
    pub fn hornet(&self) -> HornetArgs {
        HornetArgs {
            in_chans: self.in_chans,
            num_classes: self.num_classes,
            depths: self.depths,
            base_dim: self.base_dim,
            drop_path_rate: self.drop_path_rate,
            layer_scale_init_value: self.layer_scale_init_value,
            head_init_scale: self.head_init_scale,
            gnconv: self.gnconv.clone(),
            uniform_init: self.uniform_init,
        }
    }

    /// Width of stage 3.
    pub fn dim(&self) -> usize {
        self.hornet().dims()[ADAPTIVE_STAGE]
    }

    /// Blocks of stage 3 from the first predictor on (each has a fast path).
    pub fn adaptive_blocks(&self) -> usize {
        self.depths[ADAPTIVE_STAGE] - self.pruning_loc.first().copied().unwrap_or(0)
    }

    /// Positions kept per predictor on a stage-3 map of `positions` positions (at least one).
    pub fn keep_counts(&self, positions: usize) -> Vec<usize> {
        self.token_ratio.iter().map(|&r| keep_count(positions, r).max(1)).collect()
    }
}

const NAMES: &[&str] = &["adahornet-t-7x7-0.7", "adahornet-t-7x7-0.5", "adahornet-t-gf-0.7", "adahornet-s-7x7-0.7"];

impl ModelArgs for AdaHornetArgs {
    const FAMILY: &'static str = "adahornet";
    const NAMES: &'static [&'static str] = NAMES;

    fn named(name: &str) -> Option<Self> {
        if !NAMES.contains(&name) {
            return None;
        }
        let (hornet, rho) = name.strip_prefix("ada")?.rsplit_once('-')?;
        Some(Self::from_hornet(&HornetArgs::named(hornet)?, rho.parse().ok()?))
    }

    fn validate(&self) -> Result<()> {
        self.hornet().validate()?;
        let depth = self.depths[ADAPTIVE_STAGE];
        ensure!(!self.pruning_loc.is_empty(), "pruning_loc is empty (use family = \"hornet\" for the dense model)");
        ensure!(
            self.pruning_loc.len() == self.token_ratio.len(),
            "pruning_loc has {} entries but token_ratio has {}",
            self.pruning_loc.len(),
            self.token_ratio.len()
        );
        ensure!(self.pruning_loc.windows(2).all(|w| w[0] < w[1]), "pruning_loc must be strictly increasing, got {:?}", self.pruning_loc);
        ensure!(
            self.pruning_loc.iter().all(|&l| l < depth),
            "pruning_loc {:?} must index blocks of stage 3 (depth {depth})",
            self.pruning_loc
        );
        for (i, &r) in self.token_ratio.iter().enumerate() {
            ensure!(r > 0.0 && r <= 1.0, "token_ratio[{i}] must be in (0, 1], got {r}");
        }
        ensure!(
            self.token_ratio.windows(2).all(|w| w[1] <= w[0]),
            "token_ratio must be non-increasing (each predictor chooses among the positions the previous one kept), got {:?}",
            self.token_ratio
        );
        ensure!(self.dim() >= 4, "stage 3 is {} wide, too narrow for the predictors (C/4 ≥ 1)", self.dim());
        Ok(())
    }

    fn adapt(&mut self, ctx: &BuildContext) {
        self.num_classes = ctx.num_classes;
        self.in_chans = ctx.in_channels;
    }

    fn img_size(&self) -> Option<usize> {
        None
    }

    fn in_chans(&self) -> usize {
        self.in_chans
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Against the dense HorNet of the same weights ([`AdaHornet::forward_dense`]).
    fn inner_pruning(&self, img_size: usize) -> Option<InnerPruning> {
        let flops_ratio = self.cost(img_size).macs() as f64 / self.hornet().cost(img_size).macs() as f64;
        Some(InnerPruning { name: "adahornet", flops_ratio })
    }

    /// HorNet's count with stage 3's adaptive blocks at their kept positions (see the module
    /// docs for what runs where), plus the predictors and the fast paths.
    fn cost(&self, img_size: usize) -> CostReport {
        let mut c = self.hornet().cost(img_size);
        let d = self.dim();
        let g = img_size / 4 / 2 / 2;
        let p = g * g;
        let gn = &self.gnconv[ADAPTIVE_STAGE];
        let gd = gn.dims(d);
        // Per position: the pointwise work that only kept positions do.
        let gathered = d * gd[0] + gd.windows(2).map(|w| w[0] * w[1]).sum::<usize>() + d * d + 5 * d + 8 * d * d;
        let fast = 5 * d + d * d;
        let keep = self.keep_counts(p);
        let first = self.pruning_loc[0];
        let stage = &mut c.stages[ADAPTIVE_STAGE];
        let mut scored = p;
        for j in first..self.depths[ADAPTIVE_STAGE] {
            let s = self.pruning_loc.iter().rposition(|&l| l <= j).expect("j is past the first predictor");
            if self.pruning_loc[s] == j {
                stage.params += PredictorLG::<crate::Cpu>::num_params(d) as u64;
                stage.macs += PredictorLG::<crate::Cpu>::macs(d, scored);
                scored = keep[s];
            }
            let dropped = p - keep[s];
            stage.macs -= (dropped * gathered) as u64;
            stage.macs += (dropped * fast) as u64;
            stage.params += (2 * d + d * d + d + d) as u64;
        }
        stage.name = format!("stage2 (adaptive, kept {keep:?} of {p})");
        c
    }
}

/// The dropped positions' path: `x + γ_f · Linear(LayerNorm(x))`, channels-last.
#[derive(Module, Debug)]
pub struct FastPath<B: Backend> {
    pub norm: LayerNorm<B>,
    pub proj: Linear<B>,
    pub gamma: Param<Tensor<B, 1>>,
}

impl<B: ModelBackend> FastPath<B> {
    pub fn new(dim: usize, gamma: f64, device: &B::Device) -> Self {
        Self {
            norm: LayerNorm::new(dim, 1e-6, device),
            proj: Linear { weight: Param::from_tensor(trunc_normal([dim, dim], 0.02, device)), bias: Some(Param::from_tensor(Tensor::zeros([dim], device))) },
            gamma: Param::from_tensor(Tensor::full([dim], gamma, device)),
        }
    }

    /// `x` `[..., C]` → the fast path's output (residual included).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let y = self.proj.forward(self.norm.forward(x.clone()));
        x + y * self.gamma.val().unsqueeze::<D>()
    }
}

#[derive(Module, Debug)]
pub struct AdaHornet<B: Backend> {
    pub downsample_layers: Vec<Downsample<B>>,
    pub stages: Vec<Vec<Block<B>>>,
    pub norm: LayerNorm<B>,
    pub head: Linear<B>,
    /// One per entry of `pruning_loc`.
    pub score_predictor: Vec<PredictorLG<B>>,
    /// One per block of stage 3 from the first predictor on.
    pub fast_path: Vec<FastPath<B>>,
    pub pruning_loc: Vec<usize>,
    pub token_ratio: Vec<f64>,
}

/// Channels-last tokens `[N, H·W, C]` of an NCHW map.
fn to_tokens<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [n, c, h, w] = x.dims();
    x.permute([0, 2, 3, 1]).reshape([n, h * w, c])
}

fn from_tokens<B: Backend>(x: Tensor<B, 3>, [h, w]: [usize; 2]) -> Tensor<B, 4> {
    let [n, _, c] = x.dims();
    x.reshape([n, h, w, c]).permute([0, 3, 1, 2])
}

/// Output channels `[from, from + len)` of a 1×1 conv applied to channels-last rows `[N, k, C]`.
fn pointwise_rows<B: Backend>(conv: &Conv2d<B>, from: usize, len: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [n, k, c] = x.dims();
    let w = conv.weight.val().narrow(0, from, len).reshape([len, c]).transpose();
    let y = x.reshape([n * k, c]).matmul(w);
    let y = match &conv.bias {
        Some(b) => y + b.val().narrow(0, from, len).reshape([1, len]),
        None => y,
    };
    y.reshape([n, k, len])
}

fn pointwise<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let out = conv.out_channels();
    pointwise_rows(conv, 0, out, x)
}

/// The kept and dropped positions of one pruning stage, and how to put them back in place.
struct Selection<B: Backend> {
    kept: Tensor<B, 2, Int>,
    /// `None` when every position is kept.
    dropped: Option<Tensor<B, 2, Int>>,
    /// `inverse[n, i]`: where position `i` sits in `cat([kept, dropped])`.
    inverse: Tensor<B, 2, Int>,
}

impl<B: Backend> Selection<B> {
    fn new(kept: Tensor<B, 2, Int>, positions: usize) -> Self {
        let [n, k] = kept.dims();
        let device = kept.device();
        // 1 at kept positions; an ascending sort lists the dropped ones first.
        let mask = Tensor::<B, 2, Int>::zeros([n, positions], &device).scatter(1, kept.clone(), Tensor::ones([n, k], &device), IndexingUpdateOp::Add);
        let dropped = (k < positions).then(|| mask.argsort(1).narrow(1, 0, positions - k));
        let order = match &dropped {
            Some(d) => Tensor::cat(vec![kept.clone(), d.clone()], 1),
            None => kept.clone(),
        };
        let inverse = order.argsort(1);
        Self { kept, dropped, inverse }
    }
}

impl<B: ModelBackend> AdaHornet<B> {
    pub fn from_args(args: &AdaHornetArgs, device: &B::Device) -> Result<Self> {
        args.validate()?;
        let Hornet { downsample_layers, stages, norm, head } = Hornet::from_args(&args.hornet(), device)?;
        let d = args.dim();
        let gamma = if args.layer_scale_init_value > 0.0 { args.layer_scale_init_value } else { 1.0 };
        Ok(Self {
            downsample_layers,
            stages,
            norm,
            head,
            score_predictor: args.pruning_loc.iter().map(|_| PredictorLG::new(d, device)).collect(),
            fast_path: (0..args.adaptive_blocks()).map(|_| FastPath::new(d, gamma, device)).collect(),
            pruning_loc: args.pruning_loc.clone(),
            token_ratio: args.token_ratio.clone(),
        })
    }

    fn keep_counts(&self, positions: usize) -> Vec<usize> {
        self.token_ratio.iter().map(|&r| keep_count(positions, r).max(1).min(positions)).collect()
    }

    /// Stages 1–2 (index 0, 1) and the down-sampling into stage 3.
    fn before_adaptive(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for (down, stage) in self.downsample_layers.iter().zip(&self.stages).take(ADAPTIVE_STAGE) {
            x = down.forward(x);
            for blk in stage {
                x = blk.forward(x);
            }
        }
        let x = self.downsample_layers[ADAPTIVE_STAGE].forward(x);
        let [_, _, h, w] = x.dims();
        assert!(h >= 1 && w >= 1, "the input is too small for HorNet's 32× down-sampling");
        x
    }

    /// Stage 4 and the head.
    fn after_adaptive(&self, mut x: Tensor<B, 4>) -> Tensor<B, 2> {
        for (down, stage) in self.downsample_layers.iter().zip(&self.stages).skip(ADAPTIVE_STAGE + 1) {
            x = down.forward(x);
            for blk in stage {
                x = blk.forward(x);
            }
        }
        let [n, c, _, _] = x.dims();
        self.head.forward(self.norm.forward(x.mean_dim(3).mean_dim(2).reshape([n, c])))
    }

    /// The dense HorNet forward of the same weights: every block on every position, no
    /// predictor run.
    pub fn forward_dense(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut x = self.before_adaptive(x);
        for blk in &self.stages[ADAPTIVE_STAGE] {
            x = blk.forward(x);
        }
        self.after_adaptive(x)
    }

    /// Eval-mode forward with real spatial sparsification. Returns the logits, per predictor
    /// the kept positions `[N, k_s]` of stage 3's map (row-major, best score first), and that
    /// map's `[H, W]`.
    pub fn forward_pruned(&self, x: Tensor<B, 4>) -> (Tensor<B, 2>, Vec<Tensor<B, 2, Int>>, [usize; 2]) {
        let mut x = self.before_adaptive(x);
        let [n, _, h, w] = x.dims();
        let p = h * w;
        let device = x.device();
        let counts = self.keep_counts(p);
        let mut sel: Option<Selection<B>> = None;
        let mut kept = Vec::with_capacity(self.pruning_loc.len());
        let mut stage = 0;
        let first = self.pruning_loc[0];
        for (j, blk) in self.stages[ADAPTIVE_STAGE].iter().enumerate() {
            if self.pruning_loc.get(stage) == Some(&j) {
                let tokens = to_tokens(x.clone());
                let (cur, abs) = match &sel {
                    None => (tokens, Tensor::<B, 1, Int>::arange(0..p as i64, &device).reshape([1, p]).expand([n, p])),
                    Some(s) => (select_tokens(tokens, s.kept.clone()), s.kept.clone()),
                };
                let t = cur.dims()[1];
                let log_probs = self.score_predictor[stage].forward(cur, None);
                let top = top_k_keep(log_probs, counts[stage].min(t));
                let abs = abs.gather(1, top);
                kept.push(abs.clone());
                sel = Some(Selection::new(abs, p));
                stage += 1;
            }
            x = match &sel {
                None => blk.forward(x),
                Some(s) => ada_block_gathered(blk, &self.fast_path[j - first], x, s),
            };
        }
        (self.after_adaptive(x), kept, [h, w])
    }

    /// Masked dense forward: every position computes both the block and the fast path, blended
    /// by the keep masks. With `gumbel`, Gumbel noise perturbs the keep scores (training
    /// exploration); on an autodiff backend the masks carry straight-through gradients to the
    /// predictors. Returns the logits and the per-predictor keep masks `[N, P]` (values 0/1).
    pub fn forward_masked(&self, x: Tensor<B, 4>, gumbel: bool) -> (Tensor<B, 2>, Vec<Tensor<B, 2>>) {
        let mut x = self.before_adaptive(x);
        let [n, _, h, w] = x.dims();
        let p = h * w;
        let device = x.device();
        let counts = self.keep_counts(p);
        let straight_through = B::ad_enabled(&device);
        let mut prev: Option<Tensor<B, 2>> = None;
        let mut masks = Vec::with_capacity(self.pruning_loc.len());
        let mut stage = 0;
        let first = self.pruning_loc[0];
        for (j, blk) in self.stages[ADAPTIVE_STAGE].iter().enumerate() {
            if self.pruning_loc.get(stage) == Some(&j) {
                let policy = prev.clone().unwrap_or_else(|| Tensor::ones([n, p], &device));
                let log_probs = self.score_predictor[stage].forward(to_tokens(x.clone()), Some(policy.clone()));
                let log_keep = log_probs.narrow(2, 0, 1).reshape([n, p]);
                let mut score = log_keep.clone().detach();
                if gumbel {
                    let u = Tensor::<B, 2>::random([n, p], Distribution::Uniform(1e-10, 1.0 - 1e-7), &device);
                    score = score + u.log().neg().log().neg();
                }
                // Only previously kept positions can be kept again.
                let score = score.mask_fill(policy.clone().detach().lower_elem(0.5), f32::NEG_INFINITY);
                let idx = score.argsort_descending(1).narrow(1, 0, counts[stage]);
                let hard = Tensor::<B, 2>::zeros([n, p], &device).scatter(1, idx, Tensor::ones([n, counts[stage]], &device), IndexingUpdateOp::Add);
                let m = if straight_through {
                    let prob = log_keep.exp();
                    (hard - prob.clone().detach() + prob) * policy
                } else {
                    hard
                };
                masks.push(m.clone());
                prev = Some(m);
                stage += 1;
            }
            let full = blk.forward(x.clone());
            x = match &prev {
                None => full,
                Some(m) => {
                    let fast = from_tokens(self.fast_path[j - first].forward(to_tokens(x)), [h, w]);
                    let m = m.clone().reshape([n, 1, h, w]);
                    full * m.clone() + fast * m.neg().add_scalar(1.0)
                }
            };
        }
        (self.after_adaptive(x), masks)
    }
}

/// One AdaBlock at inference: the dense spatial part on all positions, the rest of the HorNet
/// block on the kept ones, the fast path on the dropped ones (see the module docs).
fn ada_block_gathered<B: ModelBackend>(blk: &Block<B>, fast: &FastPath<B>, x: Tensor<B, 4>, sel: &Selection<B>) -> Tensor<B, 4> {
    let [_, c, h, w] = x.dims();
    let g = &blk.gnconv;
    let d0 = g.dims[0];
    let sum: usize = g.dims.iter().sum();
    // Dense: norm1, proj_in's `abc` rows, the depthwise conv.
    let y = blk.norm1.forward(x.clone());
    let w_abc = g.proj_in.weight.val().narrow(0, d0, sum);
    let b_abc = g.proj_in.bias.as_ref().map(|b| b.val().narrow(0, d0, sum));
    let abc = conv2d_gemm(y.clone(), w_abc, b_abc, 1, 0, 1);
    let dw = match &g.dwconv {
        DwConv::Conv(conv) => conv.forward(abc),
        DwConv::GlobalLocal(f) => f.forward(abc),
    }
    .mul_scalar(g.scale);
    // Gathered: everything pointwise.
    let dw = select_tokens(to_tokens(dw), sel.kept.clone());
    let y = select_tokens(to_tokens(y), sel.kept.clone());
    let mut parts = dw.split_with_sizes(g.dims.clone(), 2).into_iter();
    let mut z = pointwise_rows(&g.proj_in, 0, d0, y) * parts.next().expect("order >= 1");
    for (pw, part) in g.pws.iter().zip(parts) {
        z = pointwise(pw, z) * part;
    }
    let mut out = pointwise(&g.proj_out, z);
    if let Some(gamma) = &blk.gamma1 {
        out = out * gamma.val().reshape([1, 1, c]);
    }
    let tokens = to_tokens(x);
    let xk = select_tokens(tokens.clone(), sel.kept.clone()) + out;
    let mut mlp = blk.pwconv2.forward(gelu(blk.pwconv1.forward(blk.norm2.forward(xk.clone()))));
    if let Some(gamma) = &blk.gamma2 {
        mlp = mlp * gamma.val().reshape([1, 1, c]);
    }
    let xk = xk + mlp;
    let all = match &sel.dropped {
        Some(dropped) => Tensor::cat(vec![xk, fast.forward(select_tokens(tokens, dropped.clone()))], 1),
        None => xk,
    };
    let [n, p] = sel.inverse.dims();
    let all = all.gather(1, sel.inverse.clone().reshape([n, p, 1]).expand([n, p, c]));
    from_tokens(all, [h, w])
}

impl<B: ModelBackend> Backbone<B> for AdaHornet<B> {
    /// Training (autodiff backend): the masked forward with Gumbel-top-k masks; inference: the
    /// gathered forward.
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        if B::ad_enabled(&x.device()) {
            self.forward_masked(x, true).0
        } else {
            self.forward_pruned(x).0
        }
    }

    fn forward_unpruned(&self, x: Tensor<B, 4>) -> Option<Tensor<B, 2>> {
        Some(self.forward_dense(x))
    }
}

impl<B: ModelBackend> Family<B> for AdaHornet<B> {
    const ARCHS: &'static [&'static str] = NAMES;

    fn build(arch: &str, options: &toml::Table, ctx: &BuildContext, device: &B::Device) -> Result<Self> {
        if ctx.img_size.iter().any(|&s| s < 32) {
            bail!("AdaHorNet down-samples 32× like HorNet; {:?} images are too small (pad or resize to 32×32)", ctx.img_size);
        }
        Self::from_args(&args_for_arch::<AdaHornetArgs>(arch, options, ctx)?, device)
    }

    fn cost(arch: &str, options: &toml::Table, ctx: &BuildContext) -> Result<CostReport> {
        let args = args_for_arch::<AdaHornetArgs>(arch, options, ctx)?;
        Ok(args.cost(args.img_size().unwrap_or(ctx.img_size[0])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    #[test]
    fn named_variant_follows_the_schedule() {
        let a = AdaHornetArgs::named("adahornet-t-7x7-0.7").unwrap();
        assert_eq!(a.pruning_loc, vec![0, 6, 12]);
        assert_eq!(a.token_ratio, vec![0.7, 0.5, 0.3]);
        assert_eq!(a.keep_counts(196), vec![137, 98, 58]);
        assert!(AdaHornetArgs::named("adahornet-t-7x7-0.65").is_none());
        // Fewer MACs than the dense network, a few more parameters.
        let dense = HornetArgs::named("hornet-t-7x7").unwrap().cost(224);
        let ada = a.cost(224);
        assert!(ada.macs() < dense.macs() * 85 / 100, "{} vs {}", ada.macs(), dense.macs());
        assert!(ada.params() > dense.params());
    }

    #[test]
    fn cost_counts_the_built_parameters() {
        let mut a = AdaHornetArgs::from_hornet(&HornetArgs { base_dim: 8, depths: [1, 1, 3, 1], ..HornetArgs::named("hornet-t-7x7").unwrap() }, 0.7);
        a.num_classes = 10;
        let m = AdaHornet::<Cpu>::from_args(&a, &Default::default()).unwrap();
        assert_eq!(m.num_params() as u64, a.cost(64).params());
    }
}
