//! The model zoo: every named variant with its parameter count and MACs.
//!
//! Reference families (GFNet, GFNet-H, HorNet, DeiT, DynamicViT) are counted analytically from their
//! arguments at 224×224 and 1000 classes — nothing is allocated, so `hornet-l-gf` (196 M
//! parameters) costs microseconds — and match `official_models.json` exactly. The other
//! families list their zoo archs with a dataset shape (`Family::ZOO`: `small-cnn` at 28×28 with
//! one channel, `vgg16-cifar`, `resnet20-cifar` and `resnet56-cifar` at 32×32 and 10 classes,
//! `resnet18` at 224×224 and 1000 classes) and are counted by their `Family::cost` (convolutions
//! and linears; batch norm folds into the convolutions at inference).

use anyhow::{bail, Result};

use super::{cost, zoo_archs, BuildContext, ModelSpec};
use crate::metrics::flops::CostReport;


/// Zoo names in display order: every reference family's named variants (`ModelArgs::NAMES`),
/// then every other family's zoo archs (`Family::ZOO`), in registry order.
pub fn zoo_names() -> Vec<&'static str> {
    ModelSpec::names().into_iter().chain(zoo_archs().into_iter().map(|(n, _)| n)).collect()
}

/// What a zoo name stands for.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // a handful, built once
pub enum ZooSpec {
    /// A reference model, buildable from a model TOML.
    Model(ModelSpec),
    /// A CNN baseline of the backbone registry, built for a dataset shape.
    Cnn { arch: &'static str, ctx: BuildContext },
}

#[derive(Debug, Clone)]
pub struct ZooEntry {
    pub name: &'static str,
    pub spec: ZooSpec,
    /// Input side the numbers refer to.
    pub img_size: usize,
    pub params: u64,
    pub gmacs: f64,
    /// Per-stage breakdown.
    pub cost: CostReport,
}

/// The variant's name in `official_models.json`, where the references report it.
pub fn official_name(name: &str) -> Option<&'static str> {
    Some(match name {
        "gfnet-ti" => "gfnet-ti",
        "gfnet-xs" => "gfnet-xs",
        "gfnet-s" => "gfnet-s",
        "gfnet-b" => "gfnet-b",
        "gfnet-h-ti" => "gfnet-h-ti",
        "gfnet-h-s" => "gfnet-h-s",
        "gfnet-h-b" => "gfnet-h-b",
        "hornet-t-7x7" => "hornet_tiny_7x7",
        "hornet-t-gf" => "hornet_tiny_gf",
        "hornet-s-7x7" => "hornet_small_7x7",
        "hornet-s-gf" => "hornet_small_gf",
        "hornet-b-7x7" => "hornet_base_7x7",
        "hornet-b-gf" => "hornet_base_gf",
        "hornet-l-7x7" => "hornet_large_7x7",
        "hornet-l-gf" => "hornet_large_gf",
        "hornet-l-gf-384" => "hornet_large_gf_img384",
        "deit-s" => "deit-s (teacher/plain)",
        "deit-b" => "deit-b (plain)",
        "deit-256" => "deit-256 (plain)",
        "dynamicvit-deit-s-0.9" => "dynamicvit-deit-s rho=0.9",
        "dynamicvit-deit-s-0.8" => "dynamicvit-deit-s rho=0.8",
        "dynamicvit-deit-s-0.7" => "dynamicvit-deit-s rho=0.7",
        "dynamicvit-deit-s-0.6" => "dynamicvit-deit-s rho=0.6",
        "dynamicvit-deit-s-0.5" => "dynamicvit-deit-s rho=0.5",
        "dynamicvit-deit-b-0.7" => "dynamicvit-deit-b rho=0.7",
        "dynamicvit-deit-256-0.7" => "dynamicvit-deit-256 rho=0.7",
        _ => return None,
    })
}

/// One zoo entry by name.
pub fn zoo_entry(name: &str) -> Result<ZooEntry> {
    let Some(name) = zoo_names().into_iter().find(|&n| n == name) else {
        bail!("unknown zoo name '{name}' (known: {})", zoo_names().join(", "));
    };
    if let Some(spec) = ModelSpec::named(name) {
        // HorNet's 384 variant is evaluated at 384; everything else at its own size or 224.
        let img = if name.ends_with("-384") { 384 } else { spec.img_size().unwrap_or(224) };
        let cost = spec.cost(img);
        return Ok(ZooEntry { name, img_size: img, params: cost.params(), gmacs: cost.gmacs(), cost, spec: ZooSpec::Model(spec) });
    }
    let (_, ctx) = zoo_archs().into_iter().find(|(n, _)| *n == name).ok_or_else(|| anyhow::anyhow!("zoo name '{name}' has no shape"))?;
    let cost = cost(name, &toml::Table::new(), &ctx)?;
    Ok(ZooEntry {
        name,
        img_size: ctx.img_size[0],
        params: cost.params(),
        gmacs: cost.gmacs(),
        cost,
        spec: ZooSpec::Cnn { arch: name, ctx },
    })
}

/// Every zoo entry, in [`zoo_names`] order.
pub fn zoo() -> Vec<ZooEntry> {
    zoo_names().into_iter().map(|n| zoo_entry(n).expect("every zoo name resolves")).collect()
}

/// Parameters and MACs of `[backbone] arch = NAME` with `options`, as built for `ctx`
/// (analytic for the reference families, from a built model for the CNN baselines).
pub fn arch_cost(arch: &str, options: &toml::Table, ctx: &BuildContext) -> Result<CostReport> {
    if let Some(spec) = ModelSpec::for_arch(arch, options, ctx) {
        return Ok(spec?.cost(ctx.img_size[0]));
    }
    cost(arch, options, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;
    use crate::backbones::{AnyBackbone, build};

    #[test]
    fn cnn_baselines_count_every_parameter() {
        for name in ["small-cnn", "vgg16-cifar", "resnet20-cifar", "resnet56-cifar"] {
            let e = zoo_entry(name).unwrap();
            let ZooSpec::Cnn { arch, ctx } = &e.spec else { panic!() };
            let m: AnyBackbone<Cpu> = build(arch, &toml::Table::new(), ctx, &Default::default()).unwrap();
            let trainable = crate::nn::params::trainable_param_count::<Cpu, _>(&m);
            assert_eq!(e.params, trainable as u64, "{name}");
        }
        // `sum(p.numel() for p in model.parameters())` of benchmarks/pytorch_bench.py's models.
        for (name, torch) in [("small-cnn", 65_834), ("vgg16-cifar", 14_724_042), ("resnet20-cifar", 269_722)] {
            assert_eq!(zoo_entry(name).unwrap().params, torch, "{name}");
        }
    }

    #[test]
    fn arch_cost_follows_options() {
        let fashion = BuildContext { num_classes: 10, in_channels: 1, img_size: [28, 28] };
        let opts: toml::Table = toml::from_str("patch_size = 4\nembed_dim = 32\ndepth = 2").unwrap();
        let c = arch_cost("gfnet-ti", &opts, &fashion).unwrap();
        let m: AnyBackbone<Cpu> = build("gfnet-ti", &opts, &fashion, &Default::default()).unwrap();
        assert_eq!(c.params(), burn::module::Module::num_params(&m) as u64);
        assert_eq!(c.img_size, 28);
        let small = arch_cost("small-cnn", &toml::Table::new(), &fashion).unwrap();
        assert!(small.macs() > 0 && small.stages.len() == 5);
        assert!(arch_cost("gfnet-ti", &toml::from_str("depth = 0").unwrap(), &fashion).is_err());
    }

    #[test]
    fn every_model_name_is_in_the_zoo() {
        let names = zoo_names();
        for n in ModelSpec::names() {
            assert!(names.contains(&n), "{n} missing from the zoo");
        }
    }
}
