//! HorNet (Rao et al. 2022): recursive gated convolutions (`gnConv`) in a ConvNeXt-style
//! four-stage network, following the official `hornet.py`: parameter names
//! (`downsample_layers.{i}.{0,1}`, `stages.{i}.{j}.{norm1, gnconv.{proj_in, dwconv, pws.k,
//! proj_out}, norm2, pwconv1, pwconv2, gamma1, gamma2}`, `norm`, `head`), LayerNorm eps 1e-6,
//! trunc-normal(0.02) initialisation of every conv and linear.
//!
//! `gnconv(dim, order, s)`: `proj_in` (1×1, dim → 2·dim) splits into `pwa` (`dims[0]`) and
//! `abc` (`Σ dims`); a depthwise 7×7 conv with bias — or a `GlobalLocalFilter` — filters `abc`,
//! scaled by `s`, and is split into `dims`; then `x = pwa·dw₀` and `x = pws[i](x)·dw_{i+1}`,
//! `dims = [dim/2^{order-1}, …, dim/2, dim]`; `proj_out` (1×1) closes. The `GlobalLocalFilter`
//! (HorNet-GF) normalises channels-first, runs a bias-free 3×3 depthwise conv on the first half
//! of the channels and the global filter on the second half, interleaves the two outputs
//! channel by channel (`[x1₀, x2₀, x1₁, x2₁, …]`) and normalises again.

use anyhow::{bail, ensure, Result};
use burn::module::{Module, Param};
use crate::nn::activation_op::gelu;
use crate::nn::channel_op::{channel_slice, gated_product, residual};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use serde::{Deserialize, Serialize};

use super::spec::{args_for_arch, ModelArgs};
use super::{Backbone, BuildContext, Family};
use crate::metrics::flops::CostReport;
use crate::nn::drop_path::{drop_path, linspace_rates};
use crate::ModelBackend;
use crate::nn::global_filter::{global_filter_nchw, resize_complex_weight_nchw};
use crate::nn::layers::trunc_normal;
use crate::nn::{Conv2d, LayerNorm, LayerNorm2d, Linear};

/// The only `gflayer` the reference defines.
pub const GLOBAL_LOCAL_FILTER: &str = "GlobalLocalFilter";

/// One stage's `partial(gnconv, order=…, s=…, h=…, w=…, gflayer=…)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GnconvArgs {
    pub order: usize,
    pub s: f64,
    /// Filter height of the `GlobalLocalFilter` (reference default 14).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h: Option<usize>,
    /// Filter width (half spectrum, reference default 8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub w: Option<usize>,
    /// `"GlobalLocalFilter"`, or absent for the depthwise 7×7 conv.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflayer: Option<String>,
}

impl Default for GnconvArgs {
    /// `gnconv`'s own defaults: order 5, s = 1, depthwise 7×7.
    fn default() -> Self {
        Self { order: 5, s: 1.0, h: None, w: None, gflayer: None }
    }
}

impl GnconvArgs {
    fn new(order: usize, gf: Option<(usize, usize)>) -> Self {
        Self {
            order,
            s: 1.0 / 3.0,
            h: gf.map(|g| g.0),
            w: gf.map(|g| g.1),
            gflayer: gf.map(|_| GLOBAL_LOCAL_FILTER.to_string()),
        }
    }

    pub fn global(&self) -> bool {
        self.gflayer.is_some()
    }

    /// The filter's stored size `(h, w)`.
    pub fn filter_hw(&self) -> (usize, usize) {
        (self.h.unwrap_or(14), self.w.unwrap_or(8))
    }

    /// `[dim / 2^{order-1}, …, dim / 2, dim]`.
    pub fn dims(&self, dim: usize) -> Vec<usize> {
        (0..self.order).rev().map(|i| dim >> i).collect()
    }
}

/// `HorNet(...)` constructor arguments, with the reference defaults (`block` is always the
/// reference `Block`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HornetArgs {
    pub in_chans: usize,
    pub num_classes: usize,
    pub depths: [usize; 4],
    pub base_dim: usize,
    pub drop_path_rate: f64,
    pub layer_scale_init_value: f64,
    pub head_init_scale: f64,
    pub gnconv: [GnconvArgs; 4],
    pub uniform_init: bool,
}

impl Default for HornetArgs {
    fn default() -> Self {
        Self {
            in_chans: 3,
            num_classes: 1000,
            depths: [3, 3, 9, 3],
            base_dim: 96,
            drop_path_rate: 0.0,
            layer_scale_init_value: 1e-6,
            head_init_scale: 1.0,
            gnconv: Default::default(),
            uniform_init: false,
        }
    }
}

impl HornetArgs {
    pub fn dims(&self) -> [usize; 4] {
        [self.base_dim, self.base_dim * 2, self.base_dim * 4, self.base_dim * 8]
    }

    /// The official `hornet_{tiny,small,base,large}_{7x7,gf}` recipe: depths 2-3-18-2,
    /// orders 2..5, s = 1/3, global filters 14×8 and 7×4 in stages 3 and 4 (`gf`).
    fn official(base_dim: usize, gf: Option<[(usize, usize); 2]>) -> Self {
        Self {
            depths: [2, 3, 18, 2],
            base_dim,
            gnconv: [
                GnconvArgs::new(2, None),
                GnconvArgs::new(3, None),
                GnconvArgs::new(4, gf.map(|g| g[0])),
                GnconvArgs::new(5, gf.map(|g| g[1])),
            ],
            ..Self::default()
        }
    }
}

impl ModelArgs for HornetArgs {
    const FAMILY: &'static str = "hornet";
    const NAMES: &'static [&'static str] = &[
        "hornet-t-7x7",
        "hornet-t-gf",
        "hornet-s-7x7",
        "hornet-s-gf",
        "hornet-b-7x7",
        "hornet-b-gf",
        "hornet-l-7x7",
        "hornet-l-gf",
        "hornet-l-gf-384",
    ];

    fn named(name: &str) -> Option<Self> {
        const GF224: [(usize, usize); 2] = [(14, 8), (7, 4)];
        const GF384: [(usize, usize); 2] = [(24, 13), (12, 7)];
        let (size, kind) = name.strip_prefix("hornet-")?.split_once('-')?;
        let base = match size {
            "t" => 64,
            "s" => 96,
            "b" => 128,
            "l" => 192,
            _ => return None,
        };
        match kind {
            "7x7" => Some(Self::official(base, None)),
            "gf" => Some(Self::official(base, Some(GF224))),
            "gf-384" if size == "l" => Some(Self::official(base, Some(GF384))),
            _ => None,
        }
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.in_chans >= 1 && self.num_classes >= 1, "in_chans and num_classes must be positive");
        ensure!(self.base_dim >= 1, "base_dim must be positive");
        ensure!((0.0..1.0).contains(&self.drop_path_rate), "drop_path_rate must be in [0, 1)");
        for (i, (g, dim)) in self.gnconv.iter().zip(self.dims()).enumerate() {
            ensure!(g.order >= 1, "gnconv[{i}].order must be at least 1");
            ensure!(
                dim >> (g.order - 1) >= 1,
                "gnconv[{i}]: order {} halves the stage width {dim} below one channel",
                g.order
            );
            if let Some(l) = &g.gflayer {
                if l != GLOBAL_LOCAL_FILTER {
                    bail!("gnconv[{i}].gflayer must be \"{GLOBAL_LOCAL_FILTER}\", got \"{l}\"");
                }
                let sum: usize = g.dims(dim).iter().sum();
                ensure!(sum.is_multiple_of(2), "gnconv[{i}]: the global-local filter splits {sum} channels in halves");
                let (h, w) = g.filter_hw();
                ensure!(h >= 1 && w >= 1, "gnconv[{i}]: h and w must be positive");
            } else {
                ensure!(g.h.is_none() && g.w.is_none(), "gnconv[{i}]: h and w only apply with gflayer");
            }
        }
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

    fn cost(&self, img_size: usize) -> CostReport {
        let dims = self.dims();
        let mut c = CostReport::new(img_size);
        let mut g = img_size / 4;
        for i in 0..4 {
            let d = dims[i];
            c.stage(format!("stage{i}"));
            if i == 0 {
                c.conv2d(self.in_chans, d, 4, 1, true, [g, g]).layer_norm_elementwise(d);
            } else {
                g /= 2;
                c.layer_norm_elementwise(dims[i - 1]).conv2d(dims[i - 1], d, 2, 1, true, [g, g]);
            }
            let gn = &self.gnconv[i];
            let gd = gn.dims(d);
            let sum: usize = gd.iter().sum();
            for _ in 0..self.depths[i] {
                c.layer_norm_elementwise(d).conv2d(d, 2 * d, 1, 1, true, [g, g]);
                if gn.global() {
                    let half = sum / 2;
                    let (h, w) = gn.filter_hw();
                    let wf = g / 2 + 1;
                    c.layer_norm_elementwise(sum)
                        .conv2d(half, half, 3, half, false, [g, g])
                        .add_params(half * h * w * 2)
                        .fft([1, half, g, g])
                        .fft([1, half, g, wf])
                        .layer_norm_elementwise(sum);
                    if (h, w) != (g, wf) {
                        c.bilinear(2 * half * g * wf);
                    }
                } else {
                    c.conv2d(sum, sum, 7, sum, true, [g, g]);
                }
                for k in 0..gn.order - 1 {
                    c.conv2d(gd[k], gd[k + 1], 1, 1, true, [g, g]);
                }
                c.conv2d(d, d, 1, 1, true, [g, g])
                    .layer_norm(d, g * g)
                    .linear(d, 4 * d, true, g * g)
                    .linear(4 * d, d, true, g * g);
                if self.layer_scale_init_value > 0.0 {
                    c.add_params(2 * d);
                }
            }
        }
        c.stage("head").layer_norm(dims[3], 1).linear(dims[3], self.num_classes, true, 1);
        c
    }
}

/// Conv with HorNet's initialisation (trunc-normal 0.02, or Xavier-uniform with `uniform_init`).
#[allow(clippy::too_many_arguments)]
fn conv<B: Backend>(
    args: &HornetArgs,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    groups: usize,
    bias: bool,
    device: &B::Device,
) -> Conv2d<B> {
    let mut c = Conv2d::new_trunc_normal(c_in, c_out, k, stride, (k - 1) / 2, groups, bias, 0.02, device);
    if args.uniform_init {
        let bound = (6.0 / ((c_in / groups + c_out) * k * k) as f64).sqrt();
        c.weight = Param::from_tensor(Tensor::random(c.weight.dims(), Distribution::Uniform(-bound, bound), device));
    }
    c
}

fn linear<B: Backend>(args: &HornetArgs, d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    let mut l = Linear::new_trunc_normal(d_in, d_out, true, device);
    if args.uniform_init {
        let bound = (6.0 / (d_in + d_out) as f64).sqrt();
        l.weight = Param::from_tensor(Tensor::random([d_out, d_in], Distribution::Uniform(-bound, bound), device));
    }
    l
}

/// HorNet-GF's `GlobalLocalFilter(dim, h, w)`.
#[derive(Module, Debug)]
pub struct GlobalLocalFilter<B: Backend> {
    /// 3×3 depthwise conv, no bias, on the first `dim/2` channels.
    pub dw: Conv2d<B>,
    /// `[dim/2, h, w, 2]`: HorNet's channels-first complex weight.
    pub complex_weight: Param<Tensor<B, 4>>,
    pub pre_norm: LayerNorm2d<B>,
    pub post_norm: LayerNorm2d<B>,
}

impl<B: ModelBackend> GlobalLocalFilter<B> {
    pub fn new(args: &HornetArgs, dim: usize, h: usize, w: usize, device: &B::Device) -> Self {
        let half = dim / 2;
        Self {
            dw: conv(args, half, half, 3, 1, half, false, device),
            complex_weight: Param::from_tensor(trunc_normal([half, h, w, 2], 0.02, device)),
            pre_norm: LayerNorm2d::new(dim, 1e-6, device),
            post_norm: LayerNorm2d::new(dim, 1e-6, device),
        }
    }
}

impl<B: ModelBackend> GlobalLocalFilter<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.pre_norm.forward(x);
        let [n, c, h, w] = x.dims();
        let half = c / 2;
        let x1 = self.dw.forward(channel_slice(x.clone(), 0, half));
        let weight = resize_complex_weight_nchw(self.complex_weight.val(), h, w / 2 + 1);
        let x2 = global_filter_nchw(channel_slice(x, half, c - half), weight);
        // torch.cat([x1.unsqueeze(2), x2.unsqueeze(2)], dim=2).reshape(B, 2C, a, b)
        let x = Tensor::stack::<5>(vec![x1, x2], 2).reshape([n, c, h, w]);
        self.post_norm.forward(x)
    }
}

/// The spatial mixer inside `gnconv`: the reference stores either a plain conv or a
/// `GlobalLocalFilter` under the name `dwconv` (enum variants add no path segment).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one per block, built once
pub enum DwConv<B: Backend> {
    Conv(Conv2d<B>),
    GlobalLocal(GlobalLocalFilter<B>),
}

#[derive(Module, Debug)]
pub struct Gnconv<B: Backend> {
    pub proj_in: Conv2d<B>,
    pub dwconv: DwConv<B>,
    pub proj_out: Conv2d<B>,
    pub pws: Vec<Conv2d<B>>,
    pub dims: Vec<usize>,
    pub scale: f64,
}

impl<B: ModelBackend> Gnconv<B> {
    pub fn new(args: &HornetArgs, dim: usize, g: &GnconvArgs, device: &B::Device) -> Self {
        let dims = g.dims(dim);
        let sum: usize = dims.iter().sum();
        let dwconv = if g.global() {
            let (h, w) = g.filter_hw();
            DwConv::GlobalLocal(GlobalLocalFilter::new(args, sum, h, w, device))
        } else {
            DwConv::Conv(conv(args, sum, sum, 7, 1, sum, true, device))
        };
        Self {
            proj_in: conv(args, dim, 2 * dim, 1, 1, 1, true, device),
            dwconv,
            proj_out: conv(args, dim, dim, 1, 1, 1, true, device),
            pws: dims.windows(2).map(|p| conv(args, p[0], p[1], 1, 1, 1, true, device)).collect(),
            scale: g.s,
            dims,
        }
    }
}

impl<B: ModelBackend> Gnconv<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let fused = self.proj_in.forward(x);
        let d0 = self.dims[0];
        let sum: usize = self.dims.iter().sum();
        let pwa = channel_slice(fused.clone(), 0, d0);
        let abc = channel_slice(fused, d0, sum);
        // The reference scales `dwconv(abc)` by `s`, splits it by `dims` and multiplies:
        // `gated_product` reads each part of the unscaled map in place.
        let dw_abc = match &self.dwconv {
            DwConv::Conv(c) => c.forward(abc),
            DwConv::GlobalLocal(f) => f.forward(abc),
        };
        let mut x = gated_product(pwa, dw_abc.clone(), 0, self.scale);
        let mut start = d0;
        for (pw, &d) in self.pws.iter().zip(&self.dims[1..]) {
            x = gated_product(pw.forward(x), dw_abc.clone(), start, self.scale);
            start += d;
        }
        self.proj_out.forward(x)
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm1: LayerNorm2d<B>,
    pub gnconv: Gnconv<B>,
    pub norm2: LayerNorm<B>,
    pub pwconv1: Linear<B>,
    pub pwconv2: Linear<B>,
    pub gamma1: Option<Param<Tensor<B, 1>>>,
    pub gamma2: Option<Param<Tensor<B, 1>>>,
    pub drop_path: f64,
}

impl<B: ModelBackend> Block<B> {
    pub fn new(args: &HornetArgs, dim: usize, g: &GnconvArgs, drop_path: f64, device: &B::Device) -> Self {
        let ls = args.layer_scale_init_value;
        let gamma = || (ls > 0.0).then(|| Param::from_tensor(Tensor::full([dim], ls, device)));
        Self {
            norm1: LayerNorm2d::new(dim, 1e-6, device),
            gnconv: Gnconv::new(args, dim, g, device),
            norm2: LayerNorm::new(dim, 1e-6, device),
            pwconv1: linear(args, dim, 4 * dim, device),
            pwconv2: linear(args, 4 * dim, dim, device),
            gamma1: gamma(),
            gamma2: gamma(),
            drop_path,
        }
    }
}

impl<B: ModelBackend> Block<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let y = self.gnconv.forward(self.norm1.forward(x.clone()));
        let x = residual(x, drop_path(y, self.drop_path), self.gamma1.as_ref().map(|g| g.val()), 1);
        // The reference's channels-last MLP (permute, LayerNorm, Linear, GELU, Linear, permute
        // back), computed on NCHW: the same per-pixel maps without the two transposing copies.
        let y = self.norm2.forward_channels_first(x.clone());
        let y = self.pwconv2.forward_channels_first(gelu(self.pwconv1.forward_channels_first(y)));
        residual(x, drop_path(y, self.drop_path), self.gamma2.as_ref().map(|g| g.val()), 1)
    }
}

/// `downsample_layers[i]`: the stem (`Conv2d` 4×4/4, then LayerNorm) or a down-sampling layer
/// (LayerNorm, then `Conv2d` 2×2/2); the tuple positions are the reference's `Sequential`
/// indices `0` and `1`.
#[derive(Module, Debug)]
pub enum Downsample<B: Backend> {
    Stem((Conv2d<B>, LayerNorm2d<B>)),
    Down((LayerNorm2d<B>, Conv2d<B>)),
}

impl<B: ModelBackend> Downsample<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Self::Stem((conv, norm)) => norm.forward(conv.forward(x)),
            Self::Down((norm, conv)) => conv.forward(norm.forward(x)),
        }
    }
}

#[derive(Module, Debug)]
pub struct Hornet<B: Backend> {
    pub downsample_layers: Vec<Downsample<B>>,
    pub stages: Vec<Vec<Block<B>>>,
    pub norm: LayerNorm<B>,
    pub head: Linear<B>,
}

impl<B: ModelBackend> Hornet<B> {
    pub fn from_args(args: &HornetArgs, device: &B::Device) -> Result<Self> {
        args.validate()?;
        let dims = args.dims();
        let mut downsample_layers = vec![Downsample::Stem((
            // The stem conv has stride 4 and no padding.
            {
                let mut c = conv(args, args.in_chans, dims[0], 4, 4, 1, true, device);
                c.padding = 0;
                c
            },
            LayerNorm2d::new(dims[0], 1e-6, device),
        ))];
        for i in 0..3 {
            let mut c = conv(args, dims[i], dims[i + 1], 2, 2, 1, true, device);
            c.padding = 0;
            downsample_layers.push(Downsample::Down((LayerNorm2d::new(dims[i], 1e-6, device), c)));
        }
        let rates = linspace_rates(args.drop_path_rate, args.depths.iter().sum());
        let mut cur = 0;
        let mut stages = Vec::new();
        for ((&dim, &depth), g) in dims.iter().zip(&args.depths).zip(&args.gnconv) {
            stages.push((0..depth).map(|j| Block::new(args, dim, g, rates[cur + j], device)).collect());
            cur += depth;
        }
        let mut head = linear(args, dims[3], args.num_classes, device);
        if args.head_init_scale != 1.0 {
            head.weight = head.weight.map(|w| w.mul_scalar(args.head_init_scale));
            head.bias = head.bias.map(|b| b.map(|b| b.mul_scalar(args.head_init_scale)));
        }
        Ok(Self { downsample_layers, stages, norm: LayerNorm::new(dims[3], 1e-6, device), head })
    }
}

impl<B: ModelBackend> Hornet<B> {
    /// The pooled, normalised features `[N, 8·base_dim]`.
    pub fn forward_features(&self, mut x: Tensor<B, 4>) -> Tensor<B, 2> {
        for (down, stage) in self.downsample_layers.iter().zip(&self.stages) {
            x = down.forward(x);
            let [_, _, h, w] = x.dims();
            assert!(h >= 1 && w >= 1, "the input is too small for HorNet's 32× down-sampling");
            for blk in stage {
                x = blk.forward(x);
            }
        }
        let [n, c, _, _] = x.dims();
        self.norm.forward(x.mean_dim(3).mean_dim(2).reshape([n, c]))
    }
}

impl<B: ModelBackend> Backbone<B> for Hornet<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.head.forward(self.forward_features(x))
    }
}

impl<B: ModelBackend> Family<B> for Hornet<B> {
    const ARCHS: &'static [&'static str] = HornetArgs::NAMES;

    fn build(arch: &str, options: &toml::Table, ctx: &BuildContext, device: &B::Device) -> Result<Self> {
        ensure!(
            ctx.img_size.iter().all(|&s| s >= 32),
            "HorNet down-samples 32×; {:?} images are too small (pad or resize to 32×32)",
            ctx.img_size
        );
        Self::from_args(&args_for_arch::<HornetArgs>(arch, options, ctx)?, device)
    }

    fn cost(arch: &str, options: &toml::Table, ctx: &BuildContext) -> Result<CostReport> {
        let args = args_for_arch::<HornetArgs>(arch, options, ctx)?;
        Ok(args.cost(args.img_size().unwrap_or(ctx.img_size[0])))
    }
}
