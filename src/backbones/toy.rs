//! A one-layer family (flatten, then a linear classifier) built only for tests: it shows that a
//! backbone family is one file plus one registry line, and then trains, resumes, and appears
//! in the zoo like the others.

use anyhow::Result;
use burn::module::Module;
use burn::tensor::Tensor;

use super::{Backbone, BuildContext, Family};
use crate::ModelBackend;
use crate::metrics::flops::CostReport;
use crate::nn::Linear;

#[derive(Module, Debug)]
pub struct ToyLinear<B: burn::tensor::backend::Backend> {
    pub fc: Linear<B>,
}

fn features(ctx: &BuildContext) -> usize {
    ctx.in_channels * ctx.img_size[0] * ctx.img_size[1]
}

impl<B: ModelBackend> Backbone<B> for ToyLinear<B> {
    fn classifier(&self) -> &'static str {
        "fc"
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.fc.forward(x.flatten(1, 3))
    }
}

impl<B: ModelBackend> Family<B> for ToyLinear<B> {
    const ARCHS: &'static [&'static str] = &["toy-linear"];
    const ZOO: &'static [(&'static str, BuildContext)] = &[("toy-linear", super::FASHION_MNIST)];

    fn build(_arch: &str, options: &toml::Table, ctx: &BuildContext, device: &B::Device) -> Result<Self> {
        if let Some(k) = options.keys().next() {
            anyhow::bail!("backbone.{k}: toy-linear has no options");
        }
        Ok(Self { fc: Linear::new(features(ctx), ctx.num_classes, true, device) })
    }

    fn cost(_arch: &str, _options: &toml::Table, ctx: &BuildContext) -> Result<CostReport> {
        let mut c = CostReport::new(ctx.img_size[0]);
        c.stage("fc").linear(features(ctx), ctx.num_classes, true, 1);
        Ok(c)
    }
}
