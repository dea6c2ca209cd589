//! VGG-16 with batch norm, CIFAR variant (Simonyan & Zisserman 2015; the CIFAR form used by
//! the filter-pruning literature): 13 3×3 conv-BN-ReLU layers, five 2×2 max-pools, and one linear
//! classifier on the pooled 512-d feature. `width` scales every conv's channels.

use anyhow::Result;
use burn::module::Module;
use burn::tensor::backend::Backend;

use crate::nn::conv::{global_avg_pool, max_pool2x2};
use burn::tensor::Tensor;
use serde::Deserialize;

use super::cnn::ConvBn;
use super::{Backbone, BuildContext, Family, PrunableConv};
use crate::backbones::controlled::{controlled_stack, reorder_stack_by_filter_norm};
use crate::backbones::controlled::{Controller, Mode, Trace};
use crate::ModelBackend;
use rand_chacha::ChaCha8Rng;
use crate::nn::Linear;
use crate::metrics::flops::CostReport;

/// `0` marks a 2×2 max-pool.
const VGG16: [usize; 18] = [64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VggOptions {
    /// Channel width multiplier (1.0 = the paper's widths).
    #[serde(default = "one")]
    pub width: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Module, Debug)]
pub struct Vgg<B: Backend> {
    pub features: Vec<ConvBn<B>>,
    pub classifier: Linear<B>,
    /// Index into `features` after which a max-pool follows.
    pub pool_after: Vec<usize>,
    pub img_size: [usize; 2],
}

impl<B: ModelBackend> Vgg<B> {
    pub fn new(opts: &VggOptions, ctx: &BuildContext, device: &B::Device) -> Self {
        let mut features = Vec::new();
        let mut pool_after = Vec::new();
        let mut c_in = ctx.in_channels;
        for &c in VGG16.iter() {
            if c == 0 {
                pool_after.push(features.len() - 1);
                continue;
            }
            let c_out = ((c as f64 * opts.width).round() as usize).max(1);
            features.push(ConvBn::new(c_in, c_out, device));
            c_in = c_out;
        }
        Self { features, classifier: Linear::new(c_in, ctx.num_classes, true, device), pool_after, img_size: ctx.img_size }
    }
}

impl<B: ModelBackend> Backbone<B> for Vgg<B> {
    fn classifier(&self) -> &'static str {
        "classifier"
    }

    fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 2> {
        for (i, layer) in self.features.iter().enumerate() {
            x = layer.forward(x);
            if self.pool_after.contains(&i) && x.dims()[2] >= 2 && x.dims()[3] >= 2 {
                x = max_pool2x2(x);
            }
        }
        self.classifier.forward(global_avg_pool(x))
    }

    fn prunable_convs(&self) -> Vec<PrunableConv> {
        let [mut h, mut w] = self.img_size;
        let mut out = Vec::new();
        for (i, layer) in self.features.iter().enumerate() {
            let conv = &layer.conv;
            out.push(PrunableConv {
                name: format!("features.{i}.conv"),
                in_channels: conv.in_channels(),
                out_channels: conv.out_channels(),
                macs: (h * w * 9 * conv.in_channels() * conv.out_channels()) as u64,
            });
            if self.pool_after.contains(&i) && h >= 2 && w >= 2 {
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
        let pool_after = self.pool_after.clone();
        let pool = move |i: usize, x: Tensor<B, 4>| if pool_after.contains(&i) && x.dims()[2] >= 2 && x.dims()[3] >= 2 { max_pool2x2(x) } else { x };
        let (feats, trace) = controlled_stack(&self.features, &self.prunable_convs(), &pool, x, controller, mode, rng)?;
        Ok((self.classifier.forward(feats), trace))
    }

    fn reorder_by_filter_norm(&mut self) -> Result<()> {
        reorder_stack_by_filter_norm(&mut self.features, &mut self.classifier);
        Ok(())
    }

    fn prune_channels(&mut self, keep: &[usize]) -> Result<()> {
        crate::backbones::surgery::prune_stack(&mut self.features, &mut self.classifier, keep)
    }
}

impl<B: ModelBackend> Family<B> for Vgg<B> {
    const ARCHS: &'static [&'static str] = &["vgg16-cifar"];
    const ZOO: &'static [(&'static str, BuildContext)] = &[("vgg16-cifar", super::CIFAR10)];

    fn build(_arch: &str, options: &toml::Table, ctx: &BuildContext, device: &B::Device) -> Result<Self> {
        Ok(Self::new(&Self::options(options)?, ctx, device))
    }

    fn cost(_arch: &str, options: &toml::Table, ctx: &BuildContext) -> Result<CostReport> {
        let opts = Self::options(options)?;
        let [mut h, mut w] = ctx.img_size;
        let mut cost = CostReport::new(h);
        let mut c_in = ctx.in_channels;
        let mut block = 0;
        cost.stage("block0");
        for (i, &c) in VGG16.iter().enumerate() {
            if c == 0 {
                if h >= 2 && w >= 2 {
                    (h, w) = (h / 2, w / 2);
                    cost.add_output(c_in * h * w);
                }
                block += 1;
                if VGG16[i..].iter().any(|&c| c != 0) {
                    cost.stage(format!("block{block}"));
                }
                continue;
            }
            let c_out = ((c as f64 * opts.width).round() as usize).max(1);
            cost.conv2d(c_in, c_out, 3, 1, false, [h, w]).add_params(2 * c_out).add_output(c_out * h * w);
            c_in = c_out;
        }
        cost.stage("classifier").linear(c_in, ctx.num_classes, true, 1);
        Ok(cost)
    }
}

impl<B: ModelBackend> Vgg<B> {
    fn options(options: &toml::Table) -> Result<VggOptions> {
        let opts: VggOptions = super::parse_options(options)?;
        super::check_width(opts.width)?;
        Ok(opts)
    }
}
