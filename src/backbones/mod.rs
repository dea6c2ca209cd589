//! Backbone families. Each family lives in one file (config, modules, named variants) and is
//! registered by one line in the `registry!` invocation below, which generates the
//! [`AnyBackbone`] enum that the trainers and the CLI work with.

// `AnyBackbone` and the record type its `Module` derive generates hold whole models by value;
// the variants' sizes differ by design (models are moved rarely).
#![allow(clippy::large_enum_variant)]

pub mod adahornet;
pub mod cnn;
pub mod controlled;
pub mod dynamicvit;
pub mod gfnet;
pub mod hornet;
pub mod resnet;
pub mod spec;
pub mod surgery;
pub mod token_predictor;
pub mod token_reduction;
#[cfg(test)]
pub mod toy;
pub mod vgg;
pub mod vit;
pub mod zoo;

pub use spec::{build_model, infer, model_from_toml, InnerPruning, ModelArgs};

use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use controlled::{Controller, Mode, Trace};
use crate::ModelBackend;
use crate::metrics::flops::CostReport;
use crate::nn::params::{param_shapes, StateDict};
use crate::nn::resample::ResolutionParam;
use rand_chacha::ChaCha8Rng;

/// What a backbone is built for: the dataset's classes and image shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildContext {
    pub num_classes: usize,
    pub in_channels: usize,
    pub img_size: [usize; 2],
}

/// Fashion-MNIST's shape: 10 classes, 1×28×28.
pub const FASHION_MNIST: BuildContext = BuildContext { num_classes: 10, in_channels: 1, img_size: [28, 28] };
/// CIFAR-10's shape: 10 classes, 3×32×32.
pub const CIFAR10: BuildContext = BuildContext { num_classes: 10, in_channels: 3, img_size: [32, 32] };
/// ImageNet's shape at 224: 1000 classes, 3×224×224.
pub const IMAGENET: BuildContext = BuildContext { num_classes: 1000, in_channels: 3, img_size: [224, 224] };

/// A convolution whose output channels a router may compute partially, in execution order.
/// Channels are addressed as `groups` equal groups (the last group takes the remainder).
#[derive(Debug, Clone, PartialEq)]
pub struct PrunableConv {
    pub name: String,
    /// Channels of the conv's input (what a router observes, pooled, at this decision).
    pub in_channels: usize,
    pub out_channels: usize,
    /// Multiply-accumulates for one image at the backbone's build resolution of every layer whose
    /// cost scales with this conv's output channels and is not another decision's: the conv
    /// itself, and for ResNet blocks also the block's second conv, which reads these channels.
    pub macs: u64,
}

/// What a token-reducing forward kept, as named integer tensors `[N, K]` (see
/// [`Backbone::forward_traced`]).
pub type TokenTrace<B> = Vec<(String, Tensor<B, 2, Int>)>;

pub trait Backbone<B: ModelBackend>: Module<B> {
    /// Logits `[N, classes]` for images `[N, C, H, W]`.
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2>;

    /// Logits and, for models that reduce their tokens, what they kept, as named integer
    /// tensors `[N, K]` (DynamicViT's and EViT's `keep_abs_s{i}`, ToMe's `source_idx`), which
    /// `rlprune infer` writes beside the logits.
    fn forward_traced(&self, x: Tensor<B, 4>) -> (Tensor<B, 2>, TokenTrace<B>) {
        (self.forward(x), Vec::new())
    }

    /// Called by the supervised trainer before every training step with the epochs done so far
    /// (fractional): models with a schedule of their own follow it (EViT's keep-rate warm-up).
    fn set_training_progress(&mut self, _epochs: f64) {}

    /// The module path of the classifier (the layer whose outputs are the classes): what
    /// `[backbone] reset_head` starts fresh when pretrained weights have other classes.
    fn classifier(&self) -> &'static str {
        "head"
    }

    /// For models that prune inside their forward (ToMe, EViT, AdaHorNet): the same weights
    /// with nothing pruned (every token, every position), what `eval` and `bench --unreduced`
    /// time the pruned forward against. `None` for every other model.
    fn forward_unpruned(&self, _x: Tensor<B, 4>) -> Option<Tensor<B, 2>> {
        None
    }

    /// Parameters whose shape follows the input resolution (position embeddings, global
    /// filters): pretrained weights of another resolution are resampled to this model's before
    /// they load ([`adapt_pretrained`]).
    fn resolution_params(&self) -> Vec<(String, ResolutionParam)> {
        Vec::new()
    }

    /// Convolutions whose output channels can be sliced at run time (RNP's decision points).
    fn prunable_convs(&self) -> Vec<PrunableConv> {
        Vec::new()
    }

    /// Runs the backbone under `controller`, which decides at every decision point how many
    /// channel groups the layer computes. Families without decision points answer an error.
    fn forward_controlled(
        &self,
        _x: Tensor<B, 4>,
        _controller: &mut dyn Controller<B>,
        _mode: Mode,
        _rng: &mut ChaCha8Rng,
    ) -> Result<(Tensor<B, 2>, Trace<B>)> {
        anyhow::bail!("this backbone has no runtime decision points (controlled execution is implemented for small-cnn, vgg16-cifar and the ResNets)")
    }

    /// Permutes every prunable conv's output channels by filter L2 norm, largest first, without
    /// changing the function the network computes. Families without support answer an error.
    fn reorder_by_filter_norm(&mut self) -> Result<()> {
        anyhow::bail!("channel reordering is not implemented for this backbone")
    }

    /// Static pruning: physically removes output channels of every prunable conv, keeping the
    /// `keep[i]` filters of largest L1 norm of conv `i` (and the matching BN entries and input
    /// channels of the layer that reads them). The result is a smaller dense network.
    fn prune_channels(&mut self, _keep: &[usize]) -> Result<()> {
        anyhow::bail!("static channel pruning is implemented for small-cnn, vgg16-cifar and the ResNets")
    }
}

/// A backbone file's entry point: the architecture names it answers to and how to build them.
pub trait Family<B: ModelBackend>: Backbone<B> + Sized {
    /// Names accepted by `[backbone] arch = ...`.
    const ARCHS: &'static [&'static str];

    /// Builds `arch` with the family's options (the `[backbone]` table minus the generic keys).
    /// Options are parsed by the family with `deny_unknown_fields`.
    fn build(arch: &str, options: &toml::Table, ctx: &BuildContext, device: &B::Device) -> Result<Self>;

    /// Parameters, MACs and layer outputs per image of what [`Family::build`] would build,
    /// from the options alone: nothing is allocated, so a model too large for the machine is
    /// refused before it is built (see [`crate::metrics::memory`]).
    fn cost(arch: &str, options: &toml::Table, ctx: &BuildContext) -> Result<CostReport>;

    /// Archs that `rlprune zoo` lists, each with the dataset shape its numbers refer to. The
    /// reference families' named variants are listed from their `ModelArgs` instead.
    const ZOO: &'static [(&'static str, BuildContext)] = &[];
}

macro_rules! registry {
    ($($(#[$attr:meta])* $variant:ident => $ty:ident :: $name:ident $([$args:ty])?),+ $(,)?) => {
        // Whole models in an enum: the variants differ in size, which is fine for a value that
        // is built once (the allow must cover the record type `derive(Module)` generates).
        #[allow(clippy::large_enum_variant)]
        mod any_backbone {
            use super::*;

            /// Every registered backbone family.
            #[derive(Module, Debug)]
            pub enum AnyBackbone<B: Backend> {
                $($(#[$attr])* $variant($ty::$name<B>),)+
            }
        }
        pub use any_backbone::{AnyBackbone, AnyBackboneRecord};

        impl<B: ModelBackend> Backbone<B> for AnyBackbone<B> {
            fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
                match self { $($(#[$attr])* Self::$variant(m) => m.forward(x),)+ }
            }
            fn forward_traced(&self, x: Tensor<B, 4>) -> (Tensor<B, 2>, TokenTrace<B>) {
                match self { $($(#[$attr])* Self::$variant(m) => m.forward_traced(x),)+ }
            }
            fn set_training_progress(&mut self, epochs: f64) {
                match self { $($(#[$attr])* Self::$variant(m) => m.set_training_progress(epochs),)+ }
            }
            fn classifier(&self) -> &'static str {
                match self { $($(#[$attr])* Self::$variant(m) => m.classifier(),)+ }
            }
            fn forward_unpruned(&self, x: Tensor<B, 4>) -> Option<Tensor<B, 2>> {
                match self { $($(#[$attr])* Self::$variant(m) => m.forward_unpruned(x),)+ }
            }
            fn resolution_params(&self) -> Vec<(String, ResolutionParam)> {
                match self { $($(#[$attr])* Self::$variant(m) => m.resolution_params(),)+ }
            }
            fn prunable_convs(&self) -> Vec<PrunableConv> {
                match self { $($(#[$attr])* Self::$variant(m) => m.prunable_convs(),)+ }
            }
            fn forward_controlled(
                &self,
                x: Tensor<B, 4>,
                controller: &mut dyn Controller<B>,
                mode: Mode,
                rng: &mut ChaCha8Rng,
            ) -> Result<(Tensor<B, 2>, Trace<B>)> {
                match self { $($(#[$attr])* Self::$variant(m) => m.forward_controlled(x, controller, mode, rng),)+ }
            }
            fn reorder_by_filter_norm(&mut self) -> Result<()> {
                match self { $($(#[$attr])* Self::$variant(m) => m.reorder_by_filter_norm(),)+ }
            }
            fn prune_channels(&mut self, keep: &[usize]) -> Result<()> {
                match self { $($(#[$attr])* Self::$variant(m) => m.prune_channels(keep),)+ }
            }
        }

        /// All architecture names, for help texts and errors.
        pub fn arch_names() -> Vec<&'static str> {
            let mut v = Vec::new();
            $($(#[$attr])* v.extend_from_slice(<$ty::$name<burn::backend::NdArray<f32>> as Family<_>>::ARCHS);)+
            v
        }

        /// Every family's [`Family::ZOO`] archs, in registry order.
        pub fn zoo_archs() -> Vec<(&'static str, BuildContext)> {
            let mut v = Vec::new();
            $($(#[$attr])* v.extend_from_slice(<$ty::$name<crate::Cpu> as Family<crate::Cpu>>::ZOO);)+
            v
        }

        /// Builds the backbone named `arch`.
        pub fn build<B: ModelBackend>(
            arch: &str,
            options: &toml::Table,
            ctx: &BuildContext,
            device: &B::Device,
        ) -> Result<AnyBackbone<B>> {
            $(
                $(#[$attr])*
                if <$ty::$name<B> as Family<B>>::ARCHS.contains(&arch) {
                    return <$ty::$name<B> as Family<B>>::build(arch, options, ctx, device)
                        .map(AnyBackbone::$variant)
                        .with_context(|| format!("building backbone '{arch}'"));
                }
            )+
            anyhow::bail!("unknown backbone arch '{arch}' (known: {})", arch_names().join(", "))
        }

        /// [`Family::cost`] of `arch` with `options` (nothing is allocated).
        pub fn cost(arch: &str, options: &toml::Table, ctx: &BuildContext) -> Result<CostReport> {
            $(
                $(#[$attr])*
                if <$ty::$name<crate::Cpu> as Family<crate::Cpu>>::ARCHS.contains(&arch) {
                    return <$ty::$name<crate::Cpu> as Family<crate::Cpu>>::cost(arch, options, ctx)
                        .with_context(|| format!("backbone '{arch}'"));
                }
            )+
            anyhow::bail!("unknown backbone arch '{arch}' (known: {})", arch_names().join(", "))
        }

        /// A model TOML's `[model]` table, typed: one variant per family that declares its
        /// reference constructor arguments (`[ArgsType]` in the registry line).
        #[derive(Debug, Clone, PartialEq)]
        #[allow(clippy::large_enum_variant)] // configuration, built once
        pub enum ModelSpec {
            $($($variant($args),)?)+
        }

        impl ModelSpec {
            /// The model-TOML family names.
            pub fn families() -> Vec<&'static str> {
                vec![$($(<$args as ModelArgs>::FAMILY,)?)+]
            }

            /// Every named variant of every family.
            pub fn names() -> Vec<&'static str> {
                let mut v: Vec<&'static str> = Vec::new();
                $($(v.extend_from_slice(<$args as ModelArgs>::NAMES);)?)+
                v
            }

            pub fn family(&self) -> &'static str {
                match self { $($(Self::$variant(_) => <$args as ModelArgs>::FAMILY,)?)+ }
            }

            /// Parses and validates `family`'s arguments from any serde source (a TOML table,
            /// a parity fixture's `config.json` `args`).
            pub fn from_args<'de, D>(family: &str, args: D) -> Result<Self>
            where
                D: serde::Deserializer<'de>,
                D::Error: std::fmt::Display,
            {
                $($(
                    if family == <$args as ModelArgs>::FAMILY {
                        let a: $args = serde_path_to_error::deserialize(args).map_err(|e| {
                            let path = e.path().to_string();
                            anyhow::anyhow!("model.{path}: {}", e.into_inner())
                        })?;
                        a.validate().with_context(|| format!("invalid {family} model"))?;
                        return Ok(Self::$variant(a));
                    }
                )?)+
                anyhow::bail!("unknown model family '{family}' (known: {})", Self::families().join(", "))
            }

            /// The paper's variant called `name` (`gfnet-ti`, `hornet-t-gf`, `deit-s`, ...).
            pub fn named(name: &str) -> Option<Self> {
                $($(
                    if let Some(a) = <$args as ModelArgs>::named(name) {
                        return Some(Self::$variant(a));
                    }
                )?)+
                None
            }

            /// The arguments `[backbone] arch = NAME` plus options builds for a dataset, or
            /// `None` when `arch` is not a named variant of a reference family.
            pub fn for_arch(arch: &str, options: &toml::Table, ctx: &BuildContext) -> Option<Result<Self>> {
                $($(
                    if <$args as ModelArgs>::NAMES.contains(&arch) {
                        return Some(spec::args_for_arch::<$args>(arch, options, ctx).map(Self::$variant));
                    }
                )?)+
                None
            }

            /// The arguments as a TOML table (without `family`).
            pub fn args_table(&self) -> toml::Table {
                match self {
                    $($(Self::$variant(a) => toml::Table::try_from::<&$args>(a).expect("arguments serialise"),)?)+
                }
            }

            pub fn img_size(&self) -> Option<usize> {
                match self { $($(Self::$variant(a) => <$args as ModelArgs>::img_size(a),)?)+ }
            }

            pub fn in_chans(&self) -> usize {
                match self { $($(Self::$variant(a) => <$args as ModelArgs>::in_chans(a),)?)+ }
            }

            pub fn num_classes(&self) -> usize {
                match self { $($(Self::$variant(a) => <$args as ModelArgs>::num_classes(a),)?)+ }
            }

            /// Parameters and MACs per stage at `img_size`×`img_size`.
            pub fn cost(&self, img_size: usize) -> CostReport {
                match self { $($(Self::$variant(a) => <$args as ModelArgs>::cost(a, img_size),)?)+ }
            }

            /// [`ModelArgs::inner_pruning`] of the family's arguments.
            pub fn inner_pruning(&self, img_size: usize) -> Option<InnerPruning> {
                match self { $($(Self::$variant(a) => <$args as ModelArgs>::inner_pruning(a, img_size),)?)+ }
            }

            /// Builds the model, initialised as the reference does.
            pub fn build<B: ModelBackend>(&self, device: &B::Device) -> Result<AnyBackbone<B>> {
                match self {
                    $($(Self::$variant(a) => {
                        let _: &$args = a;
                        <$ty::$name<B>>::from_args(a, device).map(AnyBackbone::$variant)
                    })?)+
                }
            }
        }
    };
}

/// Resamples the entries of pretrained `weights` that follow the input resolution
/// ([`Backbone::resolution_params`]) to `model`'s shapes, as the reference fine-tuning scripts
/// do; returns one line per resized entry. Everything else is left to the strict load.
pub fn adapt_pretrained<B: ModelBackend, M: Backbone<B>>(model: &M, weights: &mut StateDict) -> Result<Vec<String>> {
    crate::nn::resample::adapt_to_resolution(weights, &param_shapes::<B, M>(model), &model.resolution_params())
}

/// Permutes the output channels of every prunable conv by filter norm (see
/// [`Backbone::reorder_by_filter_norm`]).
pub fn reorder_by_filter_norm<B: ModelBackend, M: Backbone<B>>(model: &mut M) -> Result<()> {
    model.reorder_by_filter_norm()
}

registry! {
    SmallCnn => cnn::SmallCnn,
    Vgg => vgg::Vgg,
    ResNet => resnet::ResNet,
    Gfnet => gfnet::Gfnet [gfnet::GfnetArgs],
    GfnetPyramid => gfnet::GfnetPyramid [gfnet::GfnetPyramidArgs],
    Hornet => hornet::Hornet [hornet::HornetArgs],
    Deit => vit::VisionTransformer [vit::DeitArgs],
    DynamicVit => dynamicvit::DynamicVit [dynamicvit::DynamicVitArgs],
    AdaHornet => adahornet::AdaHornet [adahornet::AdaHornetArgs],
    #[cfg(test)] ToyLinear => toy::ToyLinear,
}

/// Checks a CNN baseline's channel-width multiplier (`backbone.width`).
pub fn check_width(width: f64) -> Result<()> {
    if !(width > 0.0 && width <= 8.0) {
        anyhow::bail!("backbone.width must be in (0, 8], got {width}");
    }
    Ok(())
}

/// Parses a family's options table into its typed options, naming the offending key.
pub fn parse_options<T: serde::de::DeserializeOwned>(options: &toml::Table) -> Result<T> {
    let value = toml::Value::Table(options.clone());
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        anyhow::anyhow!("backbone.{path}: {}", e.into_inner())
    })
}
