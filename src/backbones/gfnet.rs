//! GFNet (Rao et al. 2021): global filter networks, following the official `gfnet.py`.
//!
//! - [`Gfnet`], the isotropic model: patch embedding (`patch_embed.proj`), `pos_embed`, blocks
//!   `x + drop_path(mlp(norm2(filter(norm1(x)))))` where `filter` is the learnable global
//!   filter over the token grid, final `norm`, mean over tokens, `head`.
//! - [`GfnetPyramid`], GFNet-H: a 4×4 patch embedding and three 2×2 down-sampling layers
//!   (`patch_embed.{0..3}.proj`), `pos_embed` at stage 0 only, blocks with layer scale `gamma`
//!   (`blocks.{stage}.{j}.gamma`), grids `[56, 28, 14, 7]·img_size/224`.
//!
//! LayerNorm eps 1e-6; linears trunc-normal(0.02) with zero bias; filters `randn·0.02`.

use anyhow::{ensure, Result};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::spec::{args_for_arch, ModelArgs};
use super::{Backbone, BuildContext, Family};
use crate::metrics::flops::CostReport;
use crate::nn::drop_path::{drop_path, dropout, linspace_rates};
use crate::ModelBackend;
use crate::nn::channel_op::residual;
use crate::nn::global_filter::GlobalFilter;
use crate::nn::resample::ResolutionParam;
use crate::nn::layers::trunc_normal;
use crate::nn::{LayerNorm, Linear, Mlp, PatchEmbed};

fn check_rate(name: &str, p: f64) -> Result<()> {
    ensure!((0.0..1.0).contains(&p), "{name} must be in [0, 1), got {p}");
    Ok(())
}

/// `GFNet(...)` constructor arguments with the reference defaults (`norm_layer` is always
/// LayerNorm eps 1e-6; `representation_size` is not accepted: the reference builds its head
/// for it but never applies `pre_logits`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GfnetArgs {
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub num_classes: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub mlp_ratio: f64,
    pub uniform_drop: bool,
    pub drop_rate: f64,
    pub drop_path_rate: f64,
    pub dropcls: f64,
}

impl Default for GfnetArgs {
    fn default() -> Self {
        Self {
            img_size: 224,
            patch_size: 16,
            in_chans: 3,
            num_classes: 1000,
            embed_dim: 768,
            depth: 12,
            mlp_ratio: 4.0,
            uniform_drop: false,
            drop_rate: 0.0,
            drop_path_rate: 0.0,
            dropcls: 0.0,
        }
    }
}

impl GfnetArgs {
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    fn hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    fn drop_path_rates(&self) -> Vec<f64> {
        if self.uniform_drop {
            vec![self.drop_path_rate; self.depth]
        } else {
            linspace_rates(self.drop_path_rate, self.depth)
        }
    }
}

impl ModelArgs for GfnetArgs {
    const FAMILY: &'static str = "gfnet";
    const NAMES: &'static [&'static str] = &["gfnet-ti", "gfnet-xs", "gfnet-s", "gfnet-b"];

    /// The constructor calls of the official `main_gfnet.py`.
    fn named(name: &str) -> Option<Self> {
        let (embed_dim, depth, drop_path_rate) = match name {
            "gfnet-ti" => (256, 12, 0.0),
            "gfnet-xs" => (384, 12, 0.0),
            "gfnet-s" => (384, 19, 0.15),
            "gfnet-b" => (512, 19, 0.25),
            _ => return None,
        };
        Some(Self { embed_dim, depth, drop_path_rate, ..Self::default() })
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.patch_size >= 1 && self.grid() >= 1, "patch_size {} does not fit img_size {}", self.patch_size, self.img_size);
        ensure!(self.embed_dim >= 1 && self.depth >= 1, "embed_dim and depth must be positive");
        ensure!(self.hidden() >= 1, "mlp_ratio {} gives no hidden units", self.mlp_ratio);
        ensure!(self.num_classes >= 1 && self.in_chans >= 1, "num_classes and in_chans must be positive");
        check_rate("drop_rate", self.drop_rate)?;
        check_rate("drop_path_rate", self.drop_path_rate)?;
        check_rate("dropcls", self.dropcls)
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

    fn cost(&self, img_size: usize) -> CostReport {
        let d = self.embed_dim;
        let g = img_size / self.patch_size;
        let mut c = CostReport::new(img_size);
        c.stage("patch_embed")
            .conv2d(self.in_chans, d, self.patch_size, 1, true, [g, g])
            .add_params(self.grid() * self.grid() * d);
        c.stage("blocks");
        let h = self.grid();
        for _ in 0..self.depth {
            block_cost(&mut c, d, self.hidden(), [h, h / 2 + 1], g, false);
        }
        c.stage("head").layer_norm(d, g * g).linear(d, self.num_classes, true, 1);
        c
    }
}

/// One GFNet block on a `g×g` grid with a stored `filter_hw` filter.
fn block_cost(c: &mut CostReport, d: usize, hidden: usize, filter_hw: [usize; 2], g: usize, gamma: bool) {
    let n = g * g;
    c.layer_norm(d, n)
        .add_params(filter_hw[0] * filter_hw[1] * d * 2)
        .fft([1, g, g, d])
        .fft([1, g, g / 2 + 1, d]);
    if filter_hw != [g, g / 2 + 1] {
        c.bilinear(2 * d * g * (g / 2 + 1));
    }
    c.layer_norm(d, n).linear(d, hidden, true, n).linear(hidden, d, true, n);
    if gamma {
        c.add_params(d);
    }
}

/// `GFNetPyramid(...)` constructor arguments with the reference defaults, plus `in_chans`
/// (the reference hard-codes 3; default 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GfnetPyramidArgs {
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub num_classes: usize,
    pub embed_dim: [usize; 4],
    pub depth: [usize; 4],
    pub mlp_ratio: [f64; 4],
    pub drop_rate: f64,
    pub drop_path_rate: f64,
    pub init_values: f64,
    pub no_layerscale: bool,
    pub dropcls: f64,
}

impl Default for GfnetPyramidArgs {
    fn default() -> Self {
        Self {
            img_size: 224,
            patch_size: 4,
            in_chans: 3,
            num_classes: 1000,
            embed_dim: [64, 128, 256, 512],
            depth: [2, 2, 10, 4],
            mlp_ratio: [4.0; 4],
            drop_rate: 0.0,
            drop_path_rate: 0.0,
            init_values: 0.001,
            no_layerscale: false,
            dropcls: 0.0,
        }
    }
}

impl GfnetPyramidArgs {
    /// The reference's grid sides: `[56, 28, 14, 7][i] · img_size / 224`.
    pub fn sizes(&self) -> [usize; 4] {
        [56, 28, 14, 7].map(|s| s * self.img_size / 224)
    }

    fn hidden(&self, i: usize) -> usize {
        (self.embed_dim[i] as f64 * self.mlp_ratio[i]) as usize
    }
}

impl ModelArgs for GfnetPyramidArgs {
    const FAMILY: &'static str = "gfnet-pyramid";
    const NAMES: &'static [&'static str] = &["gfnet-h-ti", "gfnet-h-s", "gfnet-h-b"];

    /// The constructor calls of the official `main_gfnet.py`.
    fn named(name: &str) -> Option<Self> {
        let (embed_dim, depth, drop_path_rate, init_values) = match name {
            "gfnet-h-ti" => ([64, 128, 256, 512], [3, 3, 10, 3], 0.1, 0.001),
            "gfnet-h-s" => ([96, 192, 384, 768], [3, 3, 10, 3], 0.2, 1e-5),
            "gfnet-h-b" => ([96, 192, 384, 768], [3, 3, 27, 3], 0.4, 1e-6),
            _ => return None,
        };
        Some(Self { embed_dim, depth, drop_path_rate, init_values, ..Self::default() })
    }

    fn validate(&self) -> Result<()> {
        let s = self.sizes();
        ensure!(self.patch_size >= 1, "patch_size must be positive");
        ensure!(
            s[0] >= 1 && s[0] == self.img_size / self.patch_size,
            "img_size {} with patch_size {} gives a {}×{} grid, but GFNet-H's stage grids \
             [56, 28, 14, 7]·img_size/224 start at {}: use patch_size 4",
            self.img_size,
            self.patch_size,
            self.img_size / self.patch_size,
            self.img_size / self.patch_size,
            s[0]
        );
        for i in 0..3 {
            ensure!(
                s[i + 1] >= 1 && s[i + 1] == s[i] / 2,
                "img_size {} gives stage grids {s:?}, which 2×2 down-sampling cannot produce \
                 (img_size must be a multiple of 32)",
                self.img_size
            );
        }
        ensure!(self.embed_dim.iter().all(|&d| d >= 1), "embed_dim must be positive");
        ensure!((0..4).all(|i| self.hidden(i) >= 1), "mlp_ratio gives no hidden units");
        ensure!(self.num_classes >= 1 && self.in_chans >= 1, "num_classes and in_chans must be positive");
        check_rate("drop_rate", self.drop_rate)?;
        check_rate("drop_path_rate", self.drop_path_rate)?;
        check_rate("dropcls", self.dropcls)
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

    fn cost(&self, img_size: usize) -> CostReport {
        let d = self.embed_dim;
        let sizes = self.sizes();
        let mut c = CostReport::new(img_size);
        let mut g = img_size / self.patch_size;
        for i in 0..4 {
            c.stage(format!("stage{i}"));
            if i == 0 {
                c.conv2d(self.in_chans, d[0], self.patch_size, 1, true, [g, g])
                    .add_params(sizes[0] * sizes[0] * d[0]);
            } else {
                g /= 2;
                c.conv2d(d[i - 1], d[i], 2, 1, true, [g, g]);
            }
            for _ in 0..self.depth[i] {
                let h = sizes[i];
                block_cost(&mut c, d[i], self.hidden(i), [h, h / 2 + 1], g, !self.no_layerscale);
            }
        }
        c.stage("head").layer_norm(d[3], g * g).linear(d[3], self.num_classes, true, 1);
        c
    }
}

/// A GFNet block; `gamma` is GFNet-H's layer scale (`BlockLayerScale`).
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub filter: GlobalFilter<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: Mlp<B>,
    pub gamma: Option<Param<Tensor<B, 1>>>,
    pub drop_path: f64,
}

impl<B: ModelBackend> Block<B> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        dim: usize,
        hidden: usize,
        drop: f64,
        drop_path: f64,
        h: usize,
        w: usize,
        gamma: Option<f64>,
        device: &B::Device,
    ) -> Self {
        Self {
            norm1: LayerNorm::new(dim, 1e-6, device),
            filter: GlobalFilter::new(dim, h, w, device),
            norm2: LayerNorm::new(dim, 1e-6, device),
            mlp: Mlp::new(dim, hidden, drop, device),
            gamma: gamma.map(|v| Param::from_tensor(Tensor::full([dim], v, device))),
            drop_path,
        }
    }
}

impl<B: ModelBackend> Block<B> {
    /// `x`: tokens `[N, side², C]` of a `side×side` grid (row-major).
    pub fn forward(&self, x: Tensor<B, 3>, side: usize) -> Tensor<B, 3> {
        let y = self.filter.forward_tokens(self.norm1.forward(x.clone()), (side, side));
        let y = self.mlp.forward(self.norm2.forward(y));
        residual(x, drop_path(y, self.drop_path), self.gamma.as_ref().map(|g| g.val()), 2)
    }
}

/// Isotropic GFNet.
#[derive(Module, Debug)]
pub struct Gfnet<B: Backend> {
    pub patch_embed: PatchEmbed<B>,
    pub pos_embed: Param<Tensor<B, 3>>,
    pub blocks: Vec<Block<B>>,
    pub norm: LayerNorm<B>,
    pub head: Linear<B>,
    pub img_size: usize,
    pub grid: usize,
    pub drop_rate: f64,
    pub dropcls: f64,
}

impl<B: ModelBackend> Gfnet<B> {
    pub fn from_args(args: &GfnetArgs, device: &B::Device) -> Result<Self> {
        args.validate()?;
        let d = args.embed_dim;
        let g = args.grid();
        let blocks = args
            .drop_path_rates()
            .into_iter()
            .map(|r| Block::new(d, args.hidden(), args.drop_rate, r, g, g / 2 + 1, None, device))
            .collect();
        Ok(Self {
            patch_embed: PatchEmbed::new(args.in_chans, d, args.patch_size, device),
            pos_embed: Param::from_tensor(trunc_normal([1, g * g, d], 0.02, device)),
            blocks,
            norm: LayerNorm::new(d, 1e-6, device),
            head: Linear::new_trunc_normal(d, args.num_classes, true, device),
            img_size: args.img_size,
            grid: g,
            drop_rate: args.drop_rate,
            dropcls: args.dropcls,
        })
    }
}

impl<B: ModelBackend> Gfnet<B> {
    /// Tokens after the patch embedding and position embedding: `[N, grid², C]`.
    pub fn embed(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let [_, _, h, w] = x.dims();
        assert!(
            h == self.img_size && w == self.img_size,
            "input {h}×{w} does not match the model's img_size {}",
            self.img_size
        );
        dropout(self.patch_embed.forward(x) + self.pos_embed.val(), self.drop_rate)
    }

    /// Final norm, token mean, dropout, head.
    pub fn head_from_tokens(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [n, _, c] = x.dims();
        let f = self.norm.forward(x).mean_dim(1).reshape([n, c]);
        self.head.forward(dropout(f, self.dropcls))
    }
}

impl<B: ModelBackend> Backbone<B> for Gfnet<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut x = self.embed(x);
        for blk in &self.blocks {
            x = blk.forward(x, self.grid);
        }
        self.head_from_tokens(x)
    }

    fn resolution_params(&self) -> Vec<(String, ResolutionParam)> {
        let filters = (0..self.blocks.len()).map(|i| (format!("blocks.{i}.filter.complex_weight"), ResolutionParam::GlobalFilter));
        std::iter::once(("pos_embed".to_string(), ResolutionParam::PosEmbed { extra_tokens: 0 })).chain(filters).collect()
    }
}

impl<B: ModelBackend> Family<B> for Gfnet<B> {
    const ARCHS: &'static [&'static str] = GfnetArgs::NAMES;

    fn build(arch: &str, options: &toml::Table, ctx: &BuildContext, device: &B::Device) -> Result<Self> {
        Self::from_args(&args_for_arch::<GfnetArgs>(arch, options, ctx)?, device)
    }

    fn cost(arch: &str, options: &toml::Table, ctx: &BuildContext) -> Result<CostReport> {
        let args = args_for_arch::<GfnetArgs>(arch, options, ctx)?;
        Ok(args.cost(args.img_size().unwrap_or(ctx.img_size[0])))
    }
}

/// GFNet-H: the hierarchical GFNet.
#[derive(Module, Debug)]
pub struct GfnetPyramid<B: Backend> {
    /// `[0]` the patch embedding, `[1..4]` the 2×2 down-sampling layers (`DownLayer`).
    pub patch_embed: Vec<PatchEmbed<B>>,
    pub pos_embed: Param<Tensor<B, 3>>,
    pub blocks: Vec<Vec<Block<B>>>,
    pub norm: LayerNorm<B>,
    pub head: Linear<B>,
    pub img_size: usize,
    pub sizes: Vec<usize>,
    pub dropcls: f64,
}

impl<B: ModelBackend> GfnetPyramid<B> {
    pub fn from_args(args: &GfnetPyramidArgs, device: &B::Device) -> Result<Self> {
        args.validate()?;
        let d = args.embed_dim;
        let sizes = args.sizes();
        let mut patch_embed = vec![PatchEmbed::new(args.in_chans, d[0], args.patch_size, device)];
        for i in 0..3 {
            patch_embed.push(PatchEmbed::new(d[i], d[i + 1], 2, device));
        }
        let rates = linspace_rates(args.drop_path_rate, args.depth.iter().sum());
        let gamma = (!args.no_layerscale).then_some(args.init_values);
        let mut cur = 0;
        let mut blocks = Vec::new();
        for i in 0..4 {
            let h = sizes[i];
            blocks.push(
                (0..args.depth[i])
                    .map(|j| Block::new(d[i], args.hidden(i), args.drop_rate, rates[cur + j], h, h / 2 + 1, gamma, device))
                    .collect(),
            );
            cur += args.depth[i];
        }
        Ok(Self {
            patch_embed,
            pos_embed: Param::from_tensor(trunc_normal([1, sizes[0] * sizes[0], d[0]], 0.02, device)),
            blocks,
            norm: LayerNorm::new(d[3], 1e-6, device),
            head: Linear::new_trunc_normal(d[3], args.num_classes, true, device),
            img_size: args.img_size,
            sizes: sizes.to_vec(),
            dropcls: args.dropcls,
        })
    }
}

impl<B: ModelBackend> Backbone<B> for GfnetPyramid<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let [_, _, h, w] = x.dims();
        assert!(
            h == self.img_size && w == self.img_size,
            "input {h}×{w} does not match the model's img_size {}",
            self.img_size
        );
        // The reference defines `pos_drop` but never applies it in GFNet-H.
        let mut x = self.patch_embed[0].forward(x) + self.pos_embed.val();
        for i in 0..4 {
            if i > 0 {
                let [n, _, c] = x.dims();
                let s = self.sizes[i - 1];
                let img = x.reshape([n, s, s, c]).permute([0, 3, 1, 2]);
                x = self.patch_embed[i].forward(img);
            }
            for blk in &self.blocks[i] {
                x = blk.forward(x, self.sizes[i]);
            }
        }
        let [n, _, c] = x.dims();
        let f = self.norm.forward(x).mean_dim(1).reshape([n, c]);
        self.head.forward(dropout(f, self.dropcls))
    }

    fn resolution_params(&self) -> Vec<(String, ResolutionParam)> {
        let filters = self.blocks.iter().enumerate().flat_map(|(s, stage)| {
            (0..stage.len()).map(move |j| (format!("blocks.{s}.{j}.filter.complex_weight"), ResolutionParam::GlobalFilter))
        });
        std::iter::once(("pos_embed".to_string(), ResolutionParam::PosEmbed { extra_tokens: 0 })).chain(filters).collect()
    }
}

impl<B: ModelBackend> Family<B> for GfnetPyramid<B> {
    const ARCHS: &'static [&'static str] = GfnetPyramidArgs::NAMES;

    fn build(arch: &str, options: &toml::Table, ctx: &BuildContext, device: &B::Device) -> Result<Self> {
        Self::from_args(&args_for_arch::<GfnetPyramidArgs>(arch, options, ctx)?, device)
    }

    fn cost(arch: &str, options: &toml::Table, ctx: &BuildContext) -> Result<CostReport> {
        let args = args_for_arch::<GfnetPyramidArgs>(arch, options, ctx)?;
        Ok(args.cost(args.img_size().unwrap_or(ctx.img_size[0])))
    }
}
