//! ResNets (He et al. 2016). CIFAR ResNet-20/56: a 3×3 16-channel stem and three stages of n
//! basic blocks (16, 32, 64 channels) with parameter-free zero-padding shortcuts (option A),
//! as in the paper's CIFAR experiments. ResNet-18: the ImageNet layout (7×7 stem, max-pool,
//! four stages of two blocks, 1×1 projection shortcuts); on inputs smaller than 64 px the stem
//! becomes a 3×3 stride-1 conv without max-pool, as CIFAR ports of ResNet-18 do.

use anyhow::Result;
use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;

use burn::tensor::module::max_pool2d;
use burn::tensor::{Int, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use super::{Backbone, BuildContext, Family, PrunableConv};
use crate::ModelBackend;
use crate::backbones::controlled::{Controller, DecisionPoint, Mode, Trace, TraceStep};
use crate::nn::activation_op::add_relu;
use crate::nn::conv::global_avg_pool;
use crate::nn::{BatchNorm2d, Conv2d, Linear};
use crate::metrics::flops::CostReport;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetOptions {
    /// Channel width multiplier.
    #[serde(default = "one")]
    pub width: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    pub conv: Conv2d<B>,
    pub bn: BatchNorm2d<B>,
}

#[derive(Module, Debug)]
pub struct BasicBlock<B: Backend> {
    pub conv1: Conv2d<B>,
    pub bn1: BatchNorm2d<B>,
    pub conv2: Conv2d<B>,
    pub bn2: BatchNorm2d<B>,
    /// 1×1 conv + BN shortcut (ImageNet style); `None` with `pad_shortcut` means option A.
    pub downsample: Option<Projection<B>>,
    pub stride: usize,
    pub pad_shortcut: usize,
}

impl<B: ModelBackend> BasicBlock<B> {
    fn new(c_in: usize, c_out: usize, stride: usize, projection: bool, device: &B::Device) -> Self {
        let needs = stride != 1 || c_in != c_out;
        let downsample = (needs && projection).then(|| Projection {
            conv: Conv2d::new(c_in, c_out, 1, stride, 0, 1, false, device),
            bn: BatchNorm2d::new(c_out, device),
        });
        Self {
            conv1: Conv2d::new(c_in, c_out, 3, stride, 1, 1, false, device),
            bn1: BatchNorm2d::new(c_out, device),
            conv2: Conv2d::new(c_out, c_out, 3, 1, 1, 1, false, device),
            bn2: BatchNorm2d::new(c_out, device),
            downsample,
            stride,
            pad_shortcut: if needs && !projection { c_out - c_in } else { 0 },
        }
    }

    /// The residual branch's input. `frozen`: BN with running statistics (controlled passes).
    pub fn shortcut(&self, x: Tensor<B, 4>, frozen: bool) -> Tensor<B, 4> {
        if let Some(p) = &self.downsample {
            let y = p.conv.forward(x);
            return if frozen { p.bn.forward_channels_frozen(y, p.bn.num_features()) } else { p.bn.forward(y) };
        }
        let x = if self.stride > 1 {
            let [n, c, h, w] = x.dims();
            // Option A: subsample by taking every `stride`-th pixel.
            x.reshape([n, c, h / self.stride, self.stride, w / self.stride, self.stride])
                .slice([0..n, 0..c, 0..h / self.stride, 0..1, 0..w / self.stride, 0..1])
                .reshape([n, c, h / self.stride, w / self.stride])
        } else {
            x
        };
        if self.pad_shortcut == 0 {
            return x;
        }
        let [n, c, h, w] = x.dims();
        let half = self.pad_shortcut / 2;
        let zeros_lo = Tensor::zeros([n, half, h, w], &x.device());
        let zeros_hi = Tensor::zeros([n, self.pad_shortcut - half, h, w], &x.device());
        let _ = c;
        Tensor::cat(vec![zeros_lo, x, zeros_hi], 1)
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let out = self.bn1.forward_relu(self.conv1.forward(x.clone()));
        let out = self.bn2.forward(self.conv2.forward(out));
        add_relu(out, self.shortcut(x, false))
    }

    /// The block on rows that all compute the first `c_mid` channels of the inner conv (the
    /// sliced weights only; BN with running statistics). Returns the output and its MACs per image.
    fn forward_sliced(&self, x: Tensor<B, 4>, c_mid: usize) -> (Tensor<B, 4>, u64) {
        let c_in = x.dims()[1];
        let h = relu(self.bn1.forward_channels_frozen(self.conv1.forward_sliced(x.clone(), c_mid), c_mid));
        let [_, _, oh, ow] = h.dims();
        let c_out = self.conv2.out_channels();
        let y = self.bn2.forward_channels_frozen(self.conv2.forward_sliced(h, c_out), c_out);
        let k1 = self.conv1.kernel_size() * self.conv1.kernel_size();
        let k2 = self.conv2.kernel_size() * self.conv2.kernel_size();
        let macs = (oh * ow * (k1 * c_in * c_mid + k2 * c_mid * c_out)) as u64;
        (add_relu(y, self.shortcut(x, true)), macs)
    }

    /// Keeps (and orders) the inner conv's output channels `idx`: conv1's filters, bn1, and
    /// conv2's input channels. The residual stream is untouched.
    fn select_inner(&mut self, idx: &[usize]) {
        crate::backbones::surgery::prune_conv_out(&mut self.conv1, &mut self.bn1, idx);
        crate::backbones::surgery::prune_conv_in(&mut self.conv2, idx);
    }
}

fn index_tensor<B: Backend>(idx: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(v, [idx.len()]), device)
}

#[derive(Module, Debug)]
pub struct ResNet<B: Backend> {
    pub conv1: Conv2d<B>,
    pub bn1: BatchNorm2d<B>,
    pub stem_pool: bool,
    pub layers: Vec<Vec<BasicBlock<B>>>,
    pub fc: Linear<B>,
    pub img_size: [usize; 2],
}

impl<B: ModelBackend> ResNet<B> {
    pub fn cifar(depth: usize, opts: &ResNetOptions, ctx: &BuildContext, device: &B::Device) -> Self {
        Self::assemble(ctx, &Layout::cifar(depth, opts), device)
    }

    pub fn resnet18(opts: &ResNetOptions, ctx: &BuildContext, device: &B::Device) -> Self {
        Self::assemble(ctx, &Layout::resnet18(opts, ctx), device)
    }

    fn assemble(ctx: &BuildContext, l: &Layout, device: &B::Device) -> Self {
        let mut c_in = l.stem;
        let mut layers = Vec::new();
        for (stage, (&c, &n)) in l.widths.iter().zip(&l.blocks).enumerate() {
            let mut stage_blocks = Vec::new();
            for b in 0..n {
                stage_blocks.push(BasicBlock::new(c_in, c, Layout::block_stride(stage, b), l.projection, device));
                c_in = c;
            }
            layers.push(stage_blocks);
        }
        Self {
            conv1: Conv2d::new(ctx.in_channels, l.stem, l.kernel, l.stride, l.kernel / 2, 1, false, device),
            bn1: BatchNorm2d::new(l.stem, device),
            stem_pool: l.stem_pool,
            layers,
            fc: Linear::new(c_in, ctx.num_classes, true, device),
            img_size: ctx.img_size,
        }
    }
}

/// A ResNet's shape: what [`ResNet::assemble`] builds and [`Family::cost`] counts.
struct Layout {
    stem: usize,
    kernel: usize,
    stride: usize,
    stem_pool: bool,
    widths: Vec<usize>,
    blocks: Vec<usize>,
    projection: bool,
}

impl Layout {
    fn of(arch: &str, opts: &ResNetOptions, ctx: &BuildContext) -> Self {
        match arch {
            "resnet20-cifar" => Self::cifar(20, opts),
            "resnet56-cifar" => Self::cifar(56, opts),
            _ => Self::resnet18(opts, ctx),
        }
    }

    fn cifar(depth: usize, opts: &ResNetOptions) -> Self {
        let n = (depth - 2) / 6;
        let widths: Vec<usize> = [16, 32, 64].iter().map(|&c| scale(c, opts.width)).collect();
        Self { stem: widths[0], kernel: 3, stride: 1, stem_pool: false, widths, blocks: vec![n; 3], projection: false }
    }

    fn resnet18(opts: &ResNetOptions, ctx: &BuildContext) -> Self {
        let widths: Vec<usize> = [64, 128, 256, 512].iter().map(|&c| scale(c, opts.width)).collect();
        let small = ctx.img_size[0] < 64;
        let (kernel, stride) = if small { (3, 1) } else { (7, 2) };
        Self { stem: widths[0], kernel, stride, stem_pool: !small, widths, blocks: vec![2; 4], projection: true }
    }

    fn block_stride(stage: usize, block: usize) -> usize {
        if stage > 0 && block == 0 { 2 } else { 1 }
    }

    fn cost(&self, ctx: &BuildContext) -> CostReport {
        let [mut h, mut w] = ctx.img_size;
        let mut cost = CostReport::new(h);
        cost.stage("stem");
        (h, w) = (h.div_ceil(self.stride), w.div_ceil(self.stride));
        cost.conv2d(ctx.in_channels, self.stem, self.kernel, 1, false, [h, w]).add_params(2 * self.stem);
        cost.add_output(self.stem * h * w);
        if self.stem_pool {
            (h, w) = (h.div_ceil(2), w.div_ceil(2));
            cost.add_output(self.stem * h * w);
        }
        let mut c_in = self.stem;
        for (stage, (&c, &n)) in self.widths.iter().zip(&self.blocks).enumerate() {
            cost.stage(format!("layer{}", stage + 1));
            for b in 0..n {
                let s = Self::block_stride(stage, b);
                (h, w) = (h.div_ceil(s), w.div_ceil(s));
                cost.conv2d(c_in, c, 3, 1, false, [h, w]).add_params(2 * c).add_output(c * h * w);
                cost.conv2d(c, c, 3, 1, false, [h, w]).add_params(2 * c).add_output(c * h * w);
                if self.projection && (s != 1 || c_in != c) {
                    cost.conv2d(c_in, c, 1, 1, false, [h, w]).add_params(2 * c).add_output(c * h * w);
                }
                cost.add_output(c * h * w);
                c_in = c;
            }
        }
        cost.stage("fc").linear(c_in, ctx.num_classes, true, 1);
        cost
    }
}

fn scale(c: usize, width: f64) -> usize {
    ((c as f64 * width).round() as usize).max(1)
}

impl<B: ModelBackend> Backbone<B> for ResNet<B> {
    fn classifier(&self) -> &'static str {
        "fc"
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut x = self.bn1.forward_relu(self.conv1.forward(x));
        if self.stem_pool {
            x = max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for block in self.layers.iter().flatten() {
            x = block.forward(x);
        }
        self.fc.forward(global_avg_pool(x))
    }

    /// The first conv of each basic block: its output feeds only the block's second conv, so
    /// slicing it never breaks the residual sum. Its MACs include the second conv's, whose input
    /// channels are the ones this decision computes.
    fn prunable_convs(&self) -> Vec<PrunableConv> {
        let [mut h, mut w] = self.img_size;
        h = h.div_ceil(self.conv1.stride);
        w = w.div_ceil(self.conv1.stride);
        if self.stem_pool {
            h = h.div_ceil(2);
            w = w.div_ceil(2);
        }
        let mut out = Vec::new();
        for (s, stage) in self.layers.iter().enumerate() {
            for (b, block) in stage.iter().enumerate() {
                h = h.div_ceil(block.stride);
                w = w.div_ceil(block.stride);
                let (c1, c2) = (&block.conv1, &block.conv2);
                let (k1, k2) = (c1.kernel_size().pow(2), c2.kernel_size().pow(2));
                out.push(PrunableConv {
                    name: format!("layers.{s}.{b}.conv1"),
                    in_channels: c1.in_channels(),
                    out_channels: c1.out_channels(),
                    macs: (h * w * (k1 * c1.in_channels() * c1.out_channels() + k2 * c2.in_channels() * c2.out_channels()))
                        as u64,
                });
            }
        }
        out
    }

    /// Decisions at every block's inner conv. The residual stream always has all its channels,
    /// so per block the rows are grouped by action, each group runs the block with the sliced
    /// inner conv (and conv2 on the matching input channels), and the rows are put back in
    /// batch order. BN uses running statistics throughout, as in the stack version.
    fn forward_controlled(
        &self,
        x: Tensor<B, 4>,
        controller: &mut dyn Controller<B>,
        mode: Mode,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<(Tensor<B, 2>, Trace<B>)> {
        let device = x.device();
        let n = x.dims()[0];
        let k = controller.groups();
        controller.reset(n);
        let points = self.prunable_convs();
        let mut x = relu(self.bn1.forward_channels_frozen(self.conv1.forward(x), self.bn1.num_features()));
        if self.stem_pool {
            x = max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        let mut steps = Vec::with_capacity(points.len());
        for (t, (block, pc)) in self.layers.iter().flatten().zip(&points).enumerate() {
            let point =
                DecisionPoint { index: t, name: pc.name.clone(), groups: k, out_channels: pc.out_channels, macs_full: pc.macs };
            let observation = global_avg_pool(x.clone().detach());
            let decision = controller.decide(&point, observation.clone(), mode, rng)?;
            if decision.actions.len() != n || decision.actions.iter().any(|&a| a == 0 || a > k) {
                anyhow::bail!("controller returned invalid actions at {} (need {n} actions in 1..={k})", point.name);
            }
            let mut macs = vec![0u64; n];
            let mut outs = Vec::new();
            let mut order = Vec::with_capacity(n);
            for a in 1..=k {
                let rows: Vec<usize> = (0..n).filter(|&i| decision.actions[i] == a).collect();
                if rows.is_empty() {
                    continue;
                }
                let xs = if rows.len() == n { x.clone() } else { x.clone().select(0, index_tensor::<B>(&rows, &device)) };
                let (y, cost) = block.forward_sliced(xs, point.channels_for(a));
                for &r in &rows {
                    macs[r] = cost;
                }
                order.extend(rows);
                outs.push(y);
            }
            let stacked = if outs.len() == 1 { outs.pop().unwrap_or_else(|| unreachable!()) } else { Tensor::cat(outs, 0) };
            let mut inverse = vec![0usize; n];
            for (pos, &row) in order.iter().enumerate() {
                inverse[row] = pos;
            }
            x = if inverse.iter().enumerate().all(|(i, &p)| i == p) {
                stacked
            } else {
                stacked.select(0, index_tensor::<B>(&inverse, &device))
            };
            steps.push(TraceStep { point, observation, actions: decision.actions, log_prob: decision.log_prob, macs });
        }
        Ok((self.fc.forward(global_avg_pool(x)), Trace { steps }))
    }

    /// Orders every block's inner channels by the L2 norm of conv1's filters (largest first);
    /// conv2's input channels follow, so the function is unchanged.
    fn reorder_by_filter_norm(&mut self) -> anyhow::Result<()> {
        for block in self.layers.iter_mut().flatten() {
            let w = block.conv1.weight.val();
            let o = w.dims()[0];
            let norms: Vec<f32> =
                w.powf_scalar(2.0).reshape([o as i32, -1]).sum_dim(1).into_data().convert::<f32>().to_vec().unwrap_or_default();
            let mut perm: Vec<usize> = (0..o).collect();
            perm.sort_by(|&a, &b| norms[b].partial_cmp(&norms[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
            block.select_inner(&perm);
        }
        Ok(())
    }

    fn prune_channels(&mut self, keep: &[usize]) -> anyhow::Result<()> {
        let outs: Vec<usize> = self.layers.iter().flatten().map(|b| b.conv1.out_channels()).collect();
        crate::backbones::surgery::check_keep(keep, &outs)?;
        for (block, &k) in self.layers.iter_mut().flatten().zip(keep) {
            let idx = crate::backbones::surgery::top_l1_filters(&block.conv1.weight.val(), k);
            block.select_inner(&idx);
        }
        Ok(())
    }
}

impl<B: ModelBackend> Family<B> for ResNet<B> {
    const ARCHS: &'static [&'static str] = &["resnet20-cifar", "resnet56-cifar", "resnet18"];
    const ZOO: &'static [(&'static str, BuildContext)] = &[
        ("resnet20-cifar", super::CIFAR10),
        ("resnet56-cifar", super::CIFAR10),
        ("resnet18", super::IMAGENET),
    ];

    fn build(arch: &str, options: &toml::Table, ctx: &BuildContext, device: &B::Device) -> Result<Self> {
        Ok(Self::assemble(ctx, &Layout::of(arch, &Self::options(options)?, ctx), device))
    }

    fn cost(arch: &str, options: &toml::Table, ctx: &BuildContext) -> Result<CostReport> {
        Ok(Layout::of(arch, &Self::options(options)?, ctx).cost(ctx))
    }
}

impl<B: ModelBackend> ResNet<B> {
    fn options(options: &toml::Table) -> Result<ResNetOptions> {
        let opts: ResNetOptions = super::parse_options(options)?;
        super::check_width(opts.width)?;
        Ok(opts)
    }
}
