//! A small 4-conv CNN for MNIST-sized inputs: the quickstart's backbone and RNP's smallest
//! test bed. conv-BN-ReLU ×4 with two 2×2 max-pools, global average pool, linear head.

use anyhow::Result;

use crate::metrics::flops::CostReport;
use burn::module::Module;
use burn::tensor::backend::Backend;

use burn::tensor::Tensor;
use serde::Deserialize;

use super::{Backbone, BuildContext, Family, PrunableConv};
use crate::backbones::controlled::{controlled_stack, reorder_stack_by_filter_norm};
use crate::backbones::controlled::{Controller, Mode, Trace};
use crate::ModelBackend;
use rand_chacha::ChaCha8Rng;
use crate::nn::conv::{conv2d_bias_act, conv2d_bias_act_ragged, global_avg_pool, max_pool2x2};
use crate::nn::{BatchNorm2d, Conv2d, Linear};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmallCnnOptions {
    /// Output channels of the four convolutions.
    pub channels: [usize; 4],
}

impl Default for SmallCnnOptions {
    fn default() -> Self {
        Self { channels: [32, 32, 64, 64] }
    }
}

#[derive(Module, Debug)]
pub struct ConvBn<B: Backend> {
    pub conv: Conv2d<B>,
    pub bn: BatchNorm2d<B>,
}

impl<B: ModelBackend> ConvBn<B> {
    pub fn new(c_in: usize, c_out: usize, device: &B::Device) -> Self {
        Self { conv: Conv2d::new(c_in, c_out, 3, 1, 1, 1, false, device), bn: BatchNorm2d::new(c_out, device) }
    }
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        if B::ad_enabled(&x.device()) {
            // Training: BatchNorm normalises with the batch statistics.
            self.bn.forward_relu(self.conv.forward(x))
        } else {
            self.folded(&x.device()).forward(x, self.conv.out_channels())
        }
    }

    /// conv → BatchNorm with its running statistics → ReLU as one convolution: the BatchNorm is
    /// folded into the conv's weight and bias, and the conv's output pass adds the bias and
    /// applies the ReLU. Under autodiff the fold is differentiable (the conv weight and BN's
    /// affine parameters train, the statistics stay frozen). RNP's routed forward folds once per
    /// layer and runs every group of images on a channel slice of the result.
    pub fn folded(&self, device: &B::Device) -> FoldedConvBn<B> {
        let o = self.conv.out_channels();
        let (scale, shift) = self.bn.frozen_affine(o, device);
        // Each filter scaled in one pass over the weight (a broadcasting multiply cost as much
        // as the layer's convolution at batch 1).
        let weight = crate::nn::channel_op::channel_scale(self.conv.weight.val(), scale.clone(), 0);
        let bias = match &self.conv.bias {
            Some(b) => shift + b.val() * scale,
            None => shift,
        };
        FoldedConvBn { weight, bias, stride: self.conv.stride, padding: self.conv.padding, groups: self.conv.groups }
    }
}

/// conv → frozen BatchNorm → ReLU as one convolution with a bias (see [`ConvBn::folded`]).
pub struct FoldedConvBn<B: Backend> {
    pub weight: Tensor<B, 4>,
    pub bias: Tensor<B, 1>,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl<B: ModelBackend> FoldedConvBn<B> {
    /// Output channels `[0, c_out)` from the input's channels (the first ones of the layer).
    pub fn forward(&self, x: Tensor<B, 4>, c_out: usize) -> Tensor<B, 4> {
        let c_out = c_out.min(self.weight.dims()[0]);
        conv2d_bias_act(x, self.weight.clone(), self.bias.clone(), c_out, true, self.stride, self.padding, self.groups)
    }

    /// Image `i` computes output channels `[0, c_out[i])` from its first `c_in[i]` input
    /// channels, the rest of its output is zero (see [`conv2d_bias_act_ragged`]).
    pub fn forward_ragged(&self, x: Tensor<B, 4>, c_in: &[usize], c_out: &[usize]) -> Tensor<B, 4> {
        debug_assert_eq!(self.groups, 1, "ConvBn's convolutions are dense");
        conv2d_bias_act_ragged(x, self.weight.clone(), self.bias.clone(), c_in, c_out, true, self.stride, self.padding)
    }
}

#[derive(Module, Debug)]
pub struct SmallCnn<B: Backend> {
    pub features: Vec<ConvBn<B>>,
    pub fc: Linear<B>,
    pub img_size: [usize; 2],
}

impl<B: ModelBackend> SmallCnn<B> {
    pub fn new(opts: &SmallCnnOptions, ctx: &BuildContext, device: &B::Device) -> Self {
        let c = opts.channels;
        let features = vec![
            ConvBn::new(ctx.in_channels, c[0], device),
            ConvBn::new(c[0], c[1], device),
            ConvBn::new(c[1], c[2], device),
            ConvBn::new(c[2], c[3], device),
        ];
        Self { features, fc: Linear::new(c[3], ctx.num_classes, true, device), img_size: ctx.img_size }
    }

    /// Pool after the second and fourth conv.
    pub fn pools_after(i: usize) -> bool {
        i == 1 || i == 3
    }
}

impl<B: ModelBackend> Backbone<B> for SmallCnn<B> {
    fn classifier(&self) -> &'static str {
        "fc"
    }

    fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 2> {
        for (i, layer) in self.features.iter().enumerate() {
            x = layer.forward(x);
            if Self::pools_after(i) {
                x = max_pool2x2(x);
            }
        }
        self.fc.forward(global_avg_pool(x))
    }

    fn prunable_convs(&self) -> Vec<PrunableConv> {
        let [mut h, mut w] = self.img_size;
        let mut out = Vec::new();
        for (i, layer) in self.features.iter().enumerate() {
            let conv = &layer.conv;
            let k = conv.kernel_size() as u64;
            out.push(PrunableConv {
                name: format!("features.{i}.conv"),
                in_channels: conv.in_channels(),
                out_channels: conv.out_channels(),
                macs: (h * w) as u64 * k * k * (conv.in_channels() * conv.out_channels()) as u64,
            });
            if Self::pools_after(i) {
                h /= 2;
                w /= 2;
            }
        }
        out
    }

    fn forward_controlled(
        &self,
        x: Tensor<B, 4>,
        controller: &mut dyn Controller<B>,
        mode: Mode,
        rng: &mut ChaCha8Rng,
    ) -> Result<(Tensor<B, 2>, Trace<B>)> {
        let pool = move |i: usize, x: Tensor<B, 4>| if Self::pools_after(i) { max_pool2x2(x) } else { x };
        let (feats, trace) = controlled_stack(&self.features, &self.prunable_convs(), &pool, x, controller, mode, rng)?;
        Ok((self.fc.forward(feats), trace))
    }

    fn reorder_by_filter_norm(&mut self) -> Result<()> {
        reorder_stack_by_filter_norm(&mut self.features, &mut self.fc);
        Ok(())
    }

    fn prune_channels(&mut self, keep: &[usize]) -> Result<()> {
        crate::backbones::surgery::prune_stack(&mut self.features, &mut self.fc, keep)
    }
}

impl<B: ModelBackend> Family<B> for SmallCnn<B> {
    const ARCHS: &'static [&'static str] = &["small-cnn"];
    // The quickstart's backbone, at its dataset's shape.
    const ZOO: &'static [(&'static str, BuildContext)] = &[("small-cnn", super::FASHION_MNIST)];

    fn build(_arch: &str, options: &toml::Table, ctx: &BuildContext, device: &B::Device) -> Result<Self> {
        Ok(Self::new(&Self::options(options)?, ctx, device))
    }

    fn cost(_arch: &str, options: &toml::Table, ctx: &BuildContext) -> Result<CostReport> {
        let opts = Self::options(options)?;
        let [mut h, mut w] = ctx.img_size;
        let mut cost = CostReport::new(h);
        let mut c_in = ctx.in_channels;
        for (i, &c) in opts.channels.iter().enumerate() {
            cost.stage(format!("features.{i}"));
            cost.conv2d(c_in, c, 3, 1, false, [h, w]).add_params(2 * c).add_output(c * h * w);
            if Self::pools_after(i) {
                (h, w) = (h / 2, w / 2);
                cost.add_output(c * h * w);
            }
            c_in = c;
        }
        cost.stage("fc").linear(c_in, ctx.num_classes, true, 1);
        Ok(cost)
    }
}

impl<B: ModelBackend> SmallCnn<B> {
    fn options(options: &toml::Table) -> Result<SmallCnnOptions> {
        let opts: SmallCnnOptions = super::parse_options(options)?;
        if opts.channels.iter().any(|&c| c == 0 || c > MAX_CHANNELS) {
            anyhow::bail!("backbone.channels: every entry must be in 1..={MAX_CHANNELS}, got {:?}", opts.channels);
        }
        Ok(opts)
    }
}

/// A bound that keeps every size computed from the channels far from overflowing.
const MAX_CHANNELS: usize = 1 << 20;
