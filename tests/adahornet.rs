//! AdaHorNet (dynamic spatial sparsification of HorNet's stage 3): the gathered inference
//! equals the masked dense computation, keep sets have the scheduled sizes and are nested, the
//! straight-through masks train the predictors, and bad options are clear errors.

use std::collections::BTreeSet;

mod common;

use burn::module::Param;
use burn::tensor::{Distribution, Int, Tensor};
use rlprune::backbones::adahornet::{AdaHornet, AdaHornetArgs};
use rlprune::backbones::hornet::HornetArgs;
use rlprune::backbones::{build, AnyBackbone, Backbone, BuildContext, ModelArgs, ModelSpec};
use rlprune::{Cpu, CpuAutodiff};

fn small_args() -> AdaHornetArgs {
    let h = HornetArgs { base_dim: 8, depths: [1, 1, 4, 1], num_classes: 5, ..HornetArgs::named("hornet-t-7x7").unwrap() };
    let mut a = AdaHornetArgs::from_hornet(&h, 0.8);
    a.pruning_loc = vec![0, 1, 3];
    a
}

/// Layer scales of 1e-6 would make every path nearly the identity; give them weight so that
/// kept and dropped positions really differ.
fn with_visible_scales<B: rlprune::ModelBackend>(mut m: AdaHornet<B>) -> AdaHornet<B> {
    let dev = m.head.weight.val().device();
    for stage in m.stages.iter_mut() {
        for blk in stage.iter_mut() {
            let c = blk.norm2.weight.val().dims()[0];
            blk.gamma1 = Some(Param::from_tensor(Tensor::full([c], 0.7, &dev)));
            blk.gamma2 = Some(Param::from_tensor(Tensor::full([c], 0.4, &dev)));
        }
    }
    for f in m.fast_path.iter_mut() {
        let c = f.gamma.val().dims()[0];
        f.gamma = Param::from_tensor(Tensor::full([c], 0.9, &dev));
    }
    m
}

fn rows(t: &Tensor<Cpu, 2, Int>) -> Vec<Vec<i64>> {
    let [n, k] = t.dims();
    let v = t.to_data().convert::<i64>().to_vec::<i64>().unwrap();
    (0..n).map(|i| v[i * k..(i + 1) * k].to_vec()).collect()
}

#[test]
fn gathered_inference_equals_the_masked_dense_computation() {
    let dev = Default::default();
    let a = small_args();
    let m = with_visible_scales(AdaHornet::<Cpu>::from_args(&a, &dev).unwrap());
    let x = Tensor::<Cpu, 4>::random([3, 3, 64, 64], Distribution::Default, &dev);
    let (logits, kept, grid) = m.forward_pruned(x.clone());
    assert_eq!(grid, [4, 4]);
    assert_eq!(logits.dims(), [3, 5]);
    // ρ = 0.8: [0.8, 0.6, 0.4] of 16 positions.
    assert_eq!(kept.iter().map(|k| k.dims()).collect::<Vec<_>>(), vec![[3, 12], [3, 9], [3, 6]]);
    let (masked_logits, masks) = m.forward_masked(x.clone(), false);
    let err = (logits.clone() - masked_logits).abs().max().into_scalar();
    let scale = logits.clone().abs().max().into_scalar();
    println!("gathered vs masked: max abs {err:.3e} (logits up to {scale:.3})");
    assert!(err <= 1e-4 * scale.max(1.0), "max abs err {err}");
    // Same keep sets, nested from stage to stage.
    for (s, (k, mask)) in kept.iter().zip(&masks).enumerate() {
        let mask = mask.to_data().to_vec::<f32>().unwrap();
        for (n, row) in rows(k).iter().enumerate() {
            let set: BTreeSet<usize> = row.iter().map(|&i| i as usize).collect();
            let from_mask: BTreeSet<usize> = (0..16).filter(|&i| mask[n * 16 + i] > 0.5).collect();
            assert_eq!(set, from_mask, "stage {s}, image {n}");
            if s > 0 {
                let prev: BTreeSet<i64> = rows(&kept[s - 1])[n].iter().copied().collect();
                assert!(row.iter().all(|i| prev.contains(i)), "stage {s} keeps a position stage {} dropped", s - 1);
            }
        }
    }
    // The fast path matters: keeping everything gives other logits (so the check above can fail).
    let mut all = m;
    all.token_ratio = vec![1.0; 3];
    let (dense_logits, _, _) = all.forward_pruned(x);
    let diff = (logits - dense_logits).abs().max().into_scalar();
    assert!(diff > 1e-3, "keeping every position changed the logits by only {diff}");
}

#[test]
fn training_forward_sends_gradients_to_the_predictors() {
    let dev = Default::default();
    let a = small_args();
    <CpuAutodiff as burn::tensor::backend::Backend>::seed(&dev, 1);
    let m = with_visible_scales(AdaHornet::<CpuAutodiff>::from_args(&a, &dev).unwrap());
    let x = Tensor::<CpuAutodiff, 4>::random([2, 3, 64, 64], Distribution::Default, &dev);
    let (logits, masks) = m.forward_masked(x.clone(), true);
    // Exactly the scheduled number of positions per image, also with Gumbel noise.
    let counts: Vec<f32> = masks.iter().map(|mk| mk.clone().sum().into_scalar() / 2.0).collect();
    for (c, want) in counts.iter().zip([12.0f32, 9.0, 6.0]) {
        assert!((c - want).abs() < 1e-3, "{counts:?}");
    }
    let grads = logits.sum().backward();
    let g = m.score_predictor[1].out_conv.4.weight.val().grad(&grads).expect("predictor 1 gets a gradient");
    assert!(g.abs().sum().into_scalar() > 0.0);
    let g = m.fast_path[0].proj.weight.val().grad(&grads).expect("fast path gets a gradient");
    assert!(g.abs().sum().into_scalar() > 0.0);
    // Backbone::forward on the autodiff backend is this masked path.
    assert_eq!(m.forward(x).dims(), [2, 5]);
}

#[test]
fn registry_zoo_and_bad_options() {
    let ctx = BuildContext { num_classes: 10, in_channels: 1, img_size: [32, 32] };
    let mut opts = toml::Table::new();
    opts.insert("base_dim".into(), toml::Value::Integer(8));
    opts.insert("depths".into(), toml::Value::try_from([1, 1, 3, 1]).unwrap());
    // The named variant's predictors sit at blocks 0, 6, 12 of 18; this stage 3 has 3 blocks.
    opts.insert("pruning_loc".into(), toml::Value::try_from([0, 1, 2]).unwrap());
    let m: AnyBackbone<Cpu> = build("adahornet-t-7x7-0.7", &opts, &ctx, &Default::default()).unwrap();
    assert!(matches!(m, AnyBackbone::AdaHornet(_)));
    let x = Tensor::<Cpu, 4>::random([2, 1, 32, 32], Distribution::Default, &Default::default());
    assert_eq!(m.forward(x).dims(), [2, 10]);
    let spec = ModelSpec::named("adahornet-t-7x7-0.7").unwrap();
    assert_eq!(spec.family(), "adahornet");
    let dense = ModelSpec::named("hornet-t-7x7").unwrap();
    assert!(spec.cost(224).macs() < dense.cost(224).macs());

    let small = BuildContext { img_size: [28, 28], ..ctx };
    let err = format!("{:#}", build::<Cpu>("adahornet-t-7x7-0.7", &opts, &small, &Default::default()).unwrap_err());
    assert!(err.contains("too small"), "{err}");
    let bad = |extra: &str| -> String {
        let text = format!("[model]\nfamily = \"adahornet\"\nbase_dim = 16\ndepths = [1, 1, 3, 1]\n{extra}\n");
        format!("{:#}", ModelSpec::from_toml_str(&text).unwrap_err())
    };
    assert!(bad("pruning_loc = [0, 1, 2]\ntoken_ratio = [0.5, 0.7, 0.3]").contains("non-increasing"));
    assert!(bad("pruning_loc = [0, 3]\ntoken_ratio = [0.5, 0.3]").contains("stage 3"));
    assert!(bad("pruning_loc = [0, 1]\ntoken_ratio = [0.5]").contains("token_ratio"));
    assert!(bad("pruning_loc = [0]\ntoken_ratio = [1.5]").contains("(0, 1]"));
    assert!(bad("keep = 0.5").contains("keep"));
    let a = AdaHornetArgs::named("adahornet-t-7x7-0.5").unwrap();
    assert_eq!(a.token_ratio, vec![0.5, 0.3, 0.1]);
}

/// `rlprune eval` of an AdaHorNet run reports, beside top-1, its MACs ratio against the dense
/// HorNet of the same weights and the measured latency of both at batch 1 and 64, as it does
/// for RNP, static pruning, DynamicViT, ToMe and EViT; the dense forward is HorNet's.
#[test]
fn eval_of_an_adahornet_run_reports_flops_ratio_and_latency() {
    let dir = tempfile::tempdir().unwrap();
    common::train_on_synthetic(dir.path(), "adahornet_fashion_mnist.toml", &["backbone.base_dim=8"]);
    let text = common::ok(&common::rlprune(&["eval", "run", "--json"], dir.path()));
    let r: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(r["reduction"], "adahornet", "{r}");
    // Stage 3 at 64×64 inputs is a 4×4 map keeping 11, 8 and 4 positions.
    let ratio = r["flops_ratio"].as_f64().unwrap();
    assert!(ratio > 0.4 && ratio < 0.95, "FLOPs ratio {ratio}");
    for b in ["batch1", "batch64"] {
        assert!(r["latency"][b]["speedup"].as_f64().unwrap() > 0.0, "{b}: {r}");
    }
    let table = common::ok(&common::rlprune(&["eval", "run"], dir.path()));
    assert!(table.contains("adahornet") && table.contains("speedup") && table.contains("FLOPs ratio"), "{table}");

    // The dense forward is HorNet's: the AdaHorNet's weights without predictors and fast paths
    // give the same logits in a HorNet.
    let args = small_args();
    let ada = with_visible_scales(AdaHornet::<Cpu>::from_args(&args, &Default::default()).unwrap());
    let mut dict = rlprune::nn::params::state_dict(&ada);
    dict.retain(|k, _| !k.starts_with("score_predictor") && !k.starts_with("fast_path"));
    let hornet = ModelSpec::Hornet(args.hornet()).build::<Cpu>(&Default::default()).unwrap();
    let hornet = rlprune::nn::params::load_strict(hornet, &dict, "adahornet").unwrap();
    let x = Tensor::<Cpu, 4>::random([2, 3, 64, 64], Distribution::Normal(0.0, 1.0), &Default::default());
    let dense: Vec<f32> = ada.forward_unpruned(x.clone()).unwrap().into_data().to_vec().unwrap();
    let want: Vec<f32> = hornet.forward(x.clone()).into_data().to_vec().unwrap();
    assert_eq!(dense, want);
    let pruned: Vec<f32> = ada.forward(x).into_data().to_vec().unwrap();
    assert_ne!(pruned, want, "pruning changes the logits, so the comparison can fail");
}
