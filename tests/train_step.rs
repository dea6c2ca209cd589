//! Autodiff through every reference backbone: a few optimiser steps on one random batch lower
//! the loss, the global filters receive gradients, and the registry builds small variants for
//! Fashion-MNIST-sized inputs. Also: drop path / dropout are the identity in eval mode.

use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use rlprune::backbones::{build, AnyBackbone, Backbone, BuildContext, ModelSpec};
use rlprune::{Cpu, CpuAutodiff};

mod common;
use common::rng_lock;

type AD = CpuAutodiff;

fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, labels: &[i64]) -> Tensor<B, 1> {
    let n = labels.len();
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(labels.to_vec(), [n, 1]), &logits.device());
    log_softmax(logits, 1).gather(1, idx).mean().neg()
}

/// Trains `model` for `steps` Adam steps on one batch; returns (first loss, last loss).
fn fit(mut model: AnyBackbone<AD>, x: Tensor<AD, 4>, labels: &[i64], steps: usize) -> (f32, f32, AnyBackbone<AD>) {
    let mut opt = AdamConfig::new().init();
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..steps {
        let loss = cross_entropy(model.forward(x.clone()), labels);
        last = loss.clone().into_scalar();
        first.get_or_insert(last);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = opt.step(3e-3, model, grads);
    }
    (first.unwrap(), last, model)
}

fn batch(n: usize, c: usize, s: usize, classes: i64) -> (Tensor<AD, 4>, Vec<i64>) {
    let x = Tensor::random([n, c, s, s], Distribution::Normal(0.0, 1.0), &Default::default());
    (x, (0..n as i64).map(|i| i % classes).collect())
}

/// The model, seeded, fits one seeded batch of 4 images: after 30 Adam steps the loss is at
/// most half the first (a broken gradient anywhere in the network stalls it well above that).
fn check_decreases(toml: &str, img: usize) {
    let _guard = rng_lock();
    AD::seed(&Default::default(), 11);
    let spec = ModelSpec::from_toml_str(toml).unwrap();
    let model: AnyBackbone<AD> = spec.build(&Default::default()).unwrap();
    let (x, y) = batch(4, 3, img, spec.num_classes() as i64);
    let (first, last, _) = fit(model, x, &y, 30);
    println!("{}: loss {first:.4} -> {last:.4}", spec.family());
    assert!(last.is_finite() && last <= 0.5 * first, "{toml}\nloss {first} -> {last}");
}

#[test]
fn gfnet_trains() {
    check_decreases("[model]\nfamily = \"gfnet\"\nimg_size = 16\npatch_size = 4\nembed_dim = 16\ndepth = 2\nnum_classes = 4\ndrop_path_rate = 0.1\n", 16);
}

#[test]
fn gfnet_pyramid_trains() {
    check_decreases("[model]\nfamily = \"gfnet-pyramid\"\nimg_size = 32\nembed_dim = [8, 16, 16, 16]\ndepth = [1, 1, 1, 1]\nnum_classes = 4\ninit_values = 0.1\n", 32);
}

#[test]
fn hornet_7x7_trains() {
    check_decreases("[model]\nfamily = \"hornet\"\nbase_dim = 16\ndepths = [1, 1, 1, 1]\nnum_classes = 4\nlayer_scale_init_value = 0.1\n", 32);
}

#[test]
fn hornet_gf_trains_with_resized_filters() {
    // 64×64 input: grids 16, 8, 4, 2; the 3×2 filters are resized to 4×3 and 2×2.
    check_decreases(
        "[model]\nfamily = \"hornet\"\nbase_dim = 16\ndepths = [1, 1, 1, 1]\nnum_classes = 4\nlayer_scale_init_value = 0.1\n\
         gnconv = [{order = 2}, {order = 3}, {order = 4, h = 3, w = 2, gflayer = \"GlobalLocalFilter\"}, {order = 5, h = 3, w = 2, gflayer = \"GlobalLocalFilter\"}]\n",
        64,
    );
}

#[test]
fn deit_trains() {
    check_decreases("[model]\nfamily = \"deit\"\nimg_size = 16\npatch_size = 4\nembed_dim = 24\ndepth = 2\nnum_heads = 3\nnum_classes = 4\n", 16);
}

#[test]
fn global_filters_receive_gradients() {
    let spec = ModelSpec::from_toml_str(
        "[model]\nfamily = \"hornet\"\nbase_dim = 16\ndepths = [1, 1, 1, 1]\nnum_classes = 3\nlayer_scale_init_value = 1.0\n\
         gnconv = [{order = 2}, {order = 2}, {order = 2, h = 4, w = 3, gflayer = \"GlobalLocalFilter\"}, {order = 2, h = 2, w = 2, gflayer = \"GlobalLocalFilter\"}]\n",
    )
    .unwrap();
    let model: AnyBackbone<AD> = spec.build(&Default::default()).unwrap();
    let (x, y) = batch(2, 3, 32, 3);
    let grads = cross_entropy(model.forward(x), &y).backward();
    let AnyBackbone::Hornet(m) = &model else { panic!() };
    for stage in [2, 3] {
        let rlprune::backbones::hornet::DwConv::GlobalLocal(f) = &m.stages[stage][0].gnconv.dwconv else { panic!() };
        let g = f.complex_weight.val().grad(&grads).expect("filter gradient");
        assert!(g.abs().sum().into_scalar() > 0.0, "stage {stage}");
    }

    let spec = ModelSpec::from_toml_str("[model]\nfamily = \"gfnet\"\nimg_size = 16\npatch_size = 4\nembed_dim = 8\ndepth = 1\nnum_classes = 3\n").unwrap();
    let model: AnyBackbone<AD> = spec.build(&Default::default()).unwrap();
    let (x, y) = batch(2, 3, 16, 3);
    let grads = cross_entropy(model.forward(x), &y).backward();
    let AnyBackbone::Gfnet(m) = &model else { panic!() };
    let g = m.blocks[0].filter.complex_weight.val().grad(&grads).expect("filter gradient");
    assert!(g.abs().sum().into_scalar() > 0.0);
}

/// `[backbone] arch = "gfnet-ti"` with overrides, on 28×28 grey images (Fashion-MNIST).
#[test]
fn registry_builds_small_variants_for_fashion_mnist() {
    let fashion = BuildContext { num_classes: 10, in_channels: 1, img_size: [28, 28] };
    let opts: toml::Table = toml::from_str("patch_size = 4\nembed_dim = 32\ndepth = 2\ndrop_path_rate = 0.5").unwrap();
    let model: AnyBackbone<AD> = build("gfnet-ti", &opts, &fashion, &Default::default()).unwrap();
    let AnyBackbone::Gfnet(m) = &model else { panic!() };
    assert_eq!(m.grid, 7);
    assert_eq!(m.blocks[0].filter.complex_weight.dims(), [7, 4, 32, 2]);
    let x = Tensor::<AD, 4>::random([2, 1, 28, 28], Distribution::Default, &Default::default());
    assert_eq!(model.forward(x.clone()).dims(), [2, 10]);

    // Eval mode (inner backend): drop path is the identity, so the model equals the same weights
    // built without drop path; in training mode the two differ (the control).
    let eval: AnyBackbone<Cpu> = model.valid();
    let no_drop: toml::Table = toml::from_str("patch_size = 4\nembed_dim = 32\ndepth = 2\ndrop_path_rate = 0.0").unwrap();
    let plain: AnyBackbone<AD> = build("gfnet-ti", &no_drop, &fashion, &Default::default()).unwrap();
    let plain = plain.load_record(model.clone().into_record());
    let xi = x.clone().inner();
    assert_eq!(eval.forward(xi.clone()).into_data(), plain.valid().forward(xi).into_data());
    let gap = (model.forward(x.clone()) - plain.forward(x.clone())).abs().max().into_scalar();
    assert!(gap > 1e-4, "drop path 0.5 changed nothing in training mode");

    let opts: toml::Table = toml::from_str("embed_dim = 48\ndepth = 2\nnum_heads = 3\npatch_size = 4").unwrap();
    let deit: AnyBackbone<AD> = build("deit-s", &opts, &fashion, &Default::default()).unwrap();
    assert_eq!(deit.forward(x).dims(), [2, 10]);

    let cifar = BuildContext { num_classes: 10, in_channels: 3, img_size: [32, 32] };
    let opts: toml::Table = toml::from_str("base_dim = 16\ndepths = [1, 1, 1, 1]").unwrap();
    let hornet: AnyBackbone<AD> = build("hornet-t-gf", &opts, &cifar, &Default::default()).unwrap();
    let x = Tensor::<AD, 4>::random([2, 3, 32, 32], Distribution::Default, &Default::default());
    assert_eq!(hornet.forward(x).dims(), [2, 10]);
    let opts: toml::Table = toml::from_str("embed_dim = [8, 16, 16, 16]\ndepth = [1, 1, 1, 1]").unwrap();
    let gfh: AnyBackbone<AD> = build("gfnet-h-ti", &opts, &cifar, &Default::default()).unwrap();
    let x = Tensor::<AD, 4>::random([2, 3, 32, 32], Distribution::Default, &Default::default());
    assert_eq!(gfh.forward(x).dims(), [2, 10]);

    // Errors name the problem.
    let err = build::<AD>("hornet-t-7x7", &toml::Table::new(), &fashion, &Default::default()).unwrap_err();
    assert!(format!("{err:#}").contains("too small"), "{err:#}");
    let bad: toml::Table = toml::from_str("patch = 4").unwrap();
    let err = build::<AD>("gfnet-ti", &bad, &fashion, &Default::default()).unwrap_err();
    assert!(format!("{err:#}").contains("backbone.patch"), "{err:#}");
}
