//! The static L1 baseline: physical pruning equals the masked full network, the allocations
//! meet their FLOPs target, the train → eval pipeline on the synthetic dataset, config errors.

use std::path::Path;

use burn::tensor::activation::relu;
use burn::tensor::module::max_pool2d;
use burn::tensor::{Distribution, Tensor, TensorData};
use rlprune::Cpu;
use rlprune::backbones::cnn::{SmallCnn, SmallCnnOptions};
use rlprune::backbones::resnet::{ResNet, ResNetOptions};
use rlprune::backbones::{AnyBackbone, Backbone, BuildContext};
use rlprune::backbones::surgery::top_l1_filters;
use rlprune::methods::static_l1::uniform_allocation;
use rlprune::nn::BatchNorm2d;

mod common;
use common::write;
use common::rng_lock as lock;

fn randomize_bn(bn: &mut BatchNorm2d<Cpu>) {
    let dev = Default::default();
    let c = bn.num_features();
    bn.running_mean = burn::module::RunningState::new(Tensor::random([c], Distribution::Uniform(-0.2, 0.2), &dev));
    bn.running_var = burn::module::RunningState::new(Tensor::random([c], Distribution::Uniform(0.5, 1.5), &dev));
    bn.weight = burn::module::Param::from_tensor(Tensor::random([c], Distribution::Uniform(0.5, 1.5), &dev));
    bn.bias = burn::module::Param::from_tensor(Tensor::random([c], Distribution::Uniform(-0.1, 0.1), &dev));
}

/// `[1, C, 1, 1]` mask with ones at `kept`.
fn mask(c: usize, kept: &[usize]) -> Tensor<Cpu, 4> {
    let mut m = vec![0f32; c];
    for &i in kept {
        m[i] = 1.0;
    }
    Tensor::from_data(TensorData::new(m, [1, c, 1, 1]), &Default::default())
}

/// The `keep` filters of largest Σ|w| (ties to the lower index), ascending: computed here from
/// the raw weights, independently of `top_l1_filters`.
fn by_hand_top_l1(weight: &Tensor<Cpu, 4>, keep: usize) -> Vec<usize> {
    let [o, i, kh, kw] = weight.dims();
    let w: Vec<f32> = weight.clone().into_data().to_vec().unwrap();
    let per = i * kh * kw;
    let l1: Vec<f64> = (0..o).map(|f| w[f * per..(f + 1) * per].iter().map(|v| v.abs() as f64).sum()).collect();
    let mut kept: Vec<usize> = Vec::new();
    for _ in 0..keep.min(o) {
        let best = (0..o).filter(|f| !kept.contains(f)).fold(None, |b: Option<usize>, f| match b {
            Some(b) if l1[b] >= l1[f] => Some(b),
            _ => Some(f),
        });
        kept.extend(best);
    }
    kept.sort_unstable();
    kept
}

#[test]
fn top_l1_filters_ranks_by_the_l1_norm() {
    let dev = Default::default();
    // Filter 0: Σ|w| = 4, ‖w‖₂ = 2; filter 1: Σ|w| = 3, ‖w‖₂ = 3; filter 2: Σ|w| = 3.5 with a
    // negative weight, ‖w‖₂ ≈ 2.69. By L1 the order is 0, 2, 1; by L2 it is 1, 2, 0.
    let w = Tensor::<Cpu, 4>::from_data(
        TensorData::new(vec![1.0f32, 1.0, 1.0, 1.0, 3.0, 0.0, 0.0, 0.0, -2.5, 1.0, 0.0, 0.0], [3, 1, 2, 2]),
        &dev,
    );
    assert_eq!(top_l1_filters(&w, 1), vec![0]);
    assert_eq!(top_l1_filters(&w, 2), vec![0, 2]);
    assert_eq!(top_l1_filters(&w, 3), vec![0, 1, 2]);
    // Random filters of several shapes against the count by hand.
    for (shape, keep) in [([8, 3, 3, 3], 3), ([16, 8, 1, 1], 9), ([5, 2, 3, 3], 5)] {
        let w = Tensor::<Cpu, 4>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        assert_eq!(top_l1_filters(&w, keep), by_hand_top_l1(&w, keep), "{shape:?}, keep {keep}");
    }
}

fn max_abs_diff(a: Tensor<Cpu, 2>, b: Tensor<Cpu, 2>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn pruned_small_cnn_equals_masked_full_network() {
    let _g = lock();
    let dev = Default::default();
    let ctx = BuildContext { num_classes: 10, in_channels: 1, img_size: [16, 16] };
    let mut m = SmallCnn::<Cpu>::new(&SmallCnnOptions { channels: [8, 12, 16, 8] }, &ctx, &dev);
    m.features.iter_mut().for_each(|l| randomize_bn(&mut l.bn));
    let keep = [5, 7, 9, 3];
    let kept: Vec<Vec<usize>> =
        m.features.iter().zip(keep).map(|(l, k)| by_hand_top_l1(&l.conv.weight.val(), k)).collect();
    let x = Tensor::<Cpu, 4>::random([6, 1, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
    // Reference: the full network with the pruned channels zeroed after ReLU.
    let mut h = x.clone();
    for (i, l) in m.features.iter().enumerate() {
        h = l.forward(h) * mask(l.bn.num_features(), &kept[i]);
        if SmallCnn::<Cpu>::pools_after(i) {
            h = max_pool2d(h, [2, 2], [2, 2], [0, 0], [1, 1], false);
        }
    }
    let [n, c, _, _] = h.dims();
    let reference = m.fc.forward(h.mean_dim(3).mean_dim(2).reshape([n, c]));
    let full_macs: u64 = m.prunable_convs().iter().map(|c| c.macs).sum();
    let mut p = m.clone();
    p.prune_channels(&keep).unwrap();
    // Physically smaller weights, and fewer MACs counted from them.
    let outs: Vec<usize> = p.features.iter().map(|l| l.conv.out_channels()).collect();
    assert_eq!(outs, keep);
    assert_eq!(p.features[1].conv.in_channels(), 5);
    assert_eq!(p.fc.in_features(), 3);
    let pruned_macs: u64 = p.prunable_convs().iter().map(|c| c.macs).sum();
    assert!(pruned_macs < full_macs / 2, "{pruned_macs} vs {full_macs}");
    let d = max_abs_diff(p.forward(x), reference);
    assert!(d < 1e-5, "pruned vs masked: max |diff| = {d}");
}

/// A ResNet with random BN statistics everywhere.
fn resnet(arch: &str, width: f64, img: usize) -> ResNet<Cpu> {
    let dev = Default::default();
    let ctx = BuildContext { num_classes: 10, in_channels: 3, img_size: [img, img] };
    let opts = ResNetOptions { width };
    let mut m = if arch == "resnet18" {
        ResNet::<Cpu>::resnet18(&opts, &ctx, &dev)
    } else {
        ResNet::<Cpu>::cifar(20, &opts, &ctx, &dev)
    };
    randomize_bn(&mut m.bn1);
    for b in m.layers.iter_mut().flatten() {
        randomize_bn(&mut b.bn1);
        randomize_bn(&mut b.bn2);
        if let Some(p) = b.downsample.as_mut() {
            randomize_bn(&mut p.bn);
        }
    }
    m
}

#[test]
fn pruned_resnets_equal_masked_full_networks() {
    let _g = lock();
    let dev = Default::default();
    for arch in ["resnet20-cifar", "resnet18"] {
        let m = resnet(arch, 0.25, 8);
        let x = Tensor::<Cpu, 4>::random([4, 3, 8, 8], Distribution::Normal(0.0, 1.0), &dev);
        let keep: Vec<usize> =
            m.prunable_convs().iter().enumerate().map(|(i, c)| (c.out_channels / 2 + i % 2).max(1)).collect();
        // Reference: every block's inner channels outside the kept set zeroed after ReLU.
        let mut h = relu(m.bn1.forward(m.conv1.forward(x.clone())));
        if m.stem_pool {
            h = max_pool2d(h, [3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for (b, &k) in m.layers.iter().flatten().zip(&keep) {
            let kept = by_hand_top_l1(&b.conv1.weight.val(), k);
            let inner = relu(b.bn1.forward(b.conv1.forward(h.clone()))) * mask(b.conv1.out_channels(), &kept);
            h = relu(b.bn2.forward(b.conv2.forward(inner)) + b.shortcut(h, false));
        }
        let [n, c, _, _] = h.dims();
        let reference = m.fc.forward(h.mean_dim(3).mean_dim(2).reshape([n, c]));
        let mut p = m.clone();
        p.prune_channels(&keep).unwrap();
        let inner: Vec<usize> = p.layers.iter().flatten().map(|b| b.conv1.out_channels()).collect();
        assert_eq!(inner, keep, "{arch}");
        let d = max_abs_diff(p.forward(x), reference);
        assert!(d < 1e-4, "{arch}: pruned vs masked: max |diff| = {d}");
    }
}

#[test]
fn uniform_allocation_meets_the_flops_target() {
    let _g = lock();
    let dev = Default::default();
    let ctx = BuildContext { num_classes: 10, in_channels: 1, img_size: [28, 28] };
    let m = AnyBackbone::SmallCnn(SmallCnn::<Cpu>::new(&SmallCnnOptions { channels: [32, 32, 64, 64] }, &ctx, &dev));
    let full: u64 = m.prunable_convs().iter().map(|c| c.macs).sum();
    for target in [0.3, 0.5, 0.8] {
        let keep = uniform_allocation(&m, target).unwrap();
        let mut p = m.clone();
        p.prune_channels(&keep).unwrap();
        let ratio = p.prunable_convs().iter().map(|c| c.macs).sum::<u64>() as f64 / full as f64;
        assert!(ratio <= target && ratio > target - 0.05, "target {target}: ratio {ratio}, keep {keep:?}");
    }
    let keep = uniform_allocation(&m, 1.0).unwrap();
    assert_eq!(keep, vec![32, 32, 64, 64]);
}

const SYNTHETIC: &str = r#"
name = "static-synthetic"
seed = 1
[data]
dataset = "synthetic"
size = 16
train_size = 256
test_size = 64
batch_size = 32
eval_batch_size = 64
[backbone]
arch = "small-cnn"
channels = [8, 8, 16, 16]
[train]
epochs = 2
optimizer = { kind = "sgd", lr = 0.05, momentum = 0.9 }
[log]
every_steps = 4
histograms = false
"#;

#[test]
fn static_l1_trains_prunes_fine_tunes_and_evaluates() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let exp = write(
        dir.path(),
        "s.toml",
        &format!(
            "{SYNTHETIC}[controller]\nkind = \"static-l1\"\ntarget_flops = 0.4\nallocation = \"sensitivity\"\nfine_tune_epochs = 1\nsensitivity_images = 64\n"
        ),
    );
    let (e, layered) = rlprune::methods::load(&exp, &[]).unwrap();
    let run = dir.path().join("run");
    let opts = rlprune::session::supervised::TrainOptions {
        out: Some(run.clone()),
        resume: None,
        stop_after_epoch: None,
        base_dir: dir.path().into(),
    };
    let summary = rlprune::methods::train(&e, &layered, &opts).unwrap();
    assert_eq!(summary.epochs_done, 1);
    let plan = rlprune::methods::static_l1::read_plan(&run).unwrap();
    assert!(plan.flops_ratio <= 0.4, "{plan:?}");
    assert!(plan.keep.iter().zip(&plan.out_channels).all(|(k, o)| k <= o) && plan.keep != plan.out_channels);
    let sens = plan.sensitivity.as_ref().expect("sensitivity scan recorded");
    assert_eq!(sens.curves.len(), 4);
    let report = rlprune::methods::eval_target(&run, None, &[], dir.path()).unwrap();
    assert!(run.join("eval.json").is_file());
    assert_eq!(report["controller"], "static-l1");
    assert!((report["flops_ratio"].as_f64().unwrap() - plan.flops_ratio).abs() < 1e-9);
    assert_eq!(report["kept_channels"].as_array().unwrap().len(), 4);
    for b in ["batch1", "batch64"] {
        let l = &report["latency"][b];
        for k in ["unpruned_ms", "pruned_ms", "speedup", "speedup_over_flops_reduction", "pruned_images_per_s"] {
            assert!(l[k].as_f64().is_some_and(|v| v.is_finite() && v > 0.0), "{b}.{k}: {l}");
        }
    }
    let top1 = report["top1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&top1));
    let table = rlprune::methods::eval::table(&report);
    assert!(table.contains("FLOPs ratio") && table.contains("features.3.conv") && table.contains("speedup"), "{table}");
}

/// A static-l1 run stopped after its first fine-tuning epoch, resumed, stopped again and
/// resumed to the end ends with the same weights and metrics as the run that never stopped.
#[test]
fn interrupted_static_run_resumes_exactly() {
    use rlprune::session::run::Resume;
    use rlprune::methods::train;
    use rlprune::session::supervised::TrainOptions;
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let text = |target: f64| {
        format!(
            "{SYNTHETIC}[controller]\nkind = \"static-l1\"\ntarget_flops = {target}\nallocation = \"sensitivity\"\nfine_tune_epochs = 3\nsensitivity_images = 64\n"
        )
    };
    let exp = write(dir.path(), "s.toml", &text(0.5));
    let (e, layered) = rlprune::methods::load(&exp, &[]).unwrap();
    let opts = |out: Option<&str>, resume: Option<Resume>, stop: Option<usize>| TrainOptions {
        out: out.map(|o| dir.path().join(o)),
        resume,
        stop_after_epoch: stop,
        base_dir: dir.path().into(),
    };
    let full = train(&e, &layered, &opts(Some("full"), None, None)).unwrap();
    assert_eq!(full.epochs_done, 3);
    let cut = dir.path().join("cut");
    let s = train(&e, &layered, &opts(Some("cut"), None, Some(1))).unwrap();
    assert!(s.interrupted && s.epochs_done == 1);
    let other = write(dir.path(), "other.toml", &text(0.3));
    let (e_other, l_other) = rlprune::methods::load(&other, &[]).unwrap();
    let err = format!("{:#}", train(&e_other, &l_other, &opts(None, Some(Resume::Dir(cut.clone())), None)).unwrap_err());
    assert!(err.contains("target_flops 0.5") && err.contains("0.3"), "resuming with another target: {err}");
    let s = train(&e, &layered, &opts(None, Some(Resume::Dir(cut.clone())), Some(2))).unwrap();
    assert!(s.interrupted && s.epochs_done == 1, "epoch 2 only");
    let s = train(&e, &layered, &opts(None, Some(Resume::Dir(cut.clone())), None)).unwrap();
    assert!(!s.interrupted && s.epochs_done == 1, "epoch 3 only");

    for file in ["last.safetensors", "best.safetensors"] {
        let a = rlprune::import::read_safetensors(&dir.path().join("full/checkpoints").join(file)).unwrap();
        let b = rlprune::import::read_safetensors(&cut.join("checkpoints").join(file)).unwrap();
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{file}");
        for (k, t) in &a {
            assert_eq!(t.data, b[k.as_str()].data, "{file}: {k} differs after resuming");
        }
    }
    let results = |run: &str| -> Vec<(Option<f64>, Option<f64>)> {
        std::fs::read_to_string(dir.path().join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l.get("fine_tune_epoch").is_some())
            .map(|l| (l["test_top1"].as_f64(), l["train_loss"].as_f64()))
            .collect()
    };
    assert_eq!(results("full").len(), 3);
    assert_eq!(results("full"), results("cut"));
    let phase1_epochs = |run: &str| std::fs::read_to_string(dir.path().join(run).join("backbone/metrics.jsonl")).unwrap().lines().count();
    assert_eq!(phase1_epochs("cut"), phase1_epochs("full"));
}

#[test]
fn bad_static_l1_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = |extra: &str| {
        let p = write(dir.path(), "e.toml", &format!("{SYNTHETIC}[controller]\n{extra}"));
        format!("{:#}", rlprune::methods::load(&p, &[]).unwrap_err())
    };
    let e = err("kind = \"static-l1\"\ntarget_flops = 1.5\n");
    assert!(e.contains("controller.target_flops must be in (0, 1]"), "{e}");
    let e = err("kind = \"static-l1\"\nallocation = \"random\"\n");
    assert!(e.contains("controller.allocation"), "{e}");
    let e = err("kind = \"static-l1\"\ntarget_flop = 0.5\n");
    assert!(e.contains("controller.target_flop") && e.contains("unknown key"), "{e}");
    let e = err("kind = \"channel-router\"\ntarget_flops = 0.5\n");
    assert!(e.contains("controller.target_flops") && e.contains("unknown key"), "{e}");
    let e = err("kind = \"static-l2\"\n");
    assert!(e.contains("controller.kind") && e.contains("static-l1"), "{e}");
}

#[test]
fn the_shipped_static_experiment_loads() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/static_fashion_mnist.toml");
    let (e, _) = rlprune::methods::load(&p, &[]).unwrap();
    let ctl = e.controller.unwrap();
    assert_eq!(ctl.kind, "static-l1");
    let o = rlprune::methods::static_l1::StaticL1Options::from_config(&ctl).unwrap();
    assert_eq!(o.target_flops, 0.5);
    assert_eq!(o.allocation, "sensitivity");
}
