//! Data-parallel training through burn-collective with 2 simulated peers on the CPU: the
//! gradients after the all-reduce (mean) equal the single-device gradients of the whole batch,
//! and the data-parallel trainer follows the single-device trainer step for step.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use rlprune::backbones::{AnyBackbone, Backbone, ModelSpec};
use rlprune::train::data_parallel::{run_peers, shard_range};
use rlprune::CpuAutodiff;

mod common;

type AD = CpuAutodiff;

/// Gradients as host vectors, keyed by parameter id (identical across replicas of a model).
type HostGrads = BTreeMap<ParamId, Vec<f32>>;

fn host_grads<B: AutodiffBackend, M: Module<B>>(model: &M, grads: &GradientsParams) -> HostGrads {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: HostGrads,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                self.out.insert(param.id, g.into_data().to_vec::<f32>().unwrap());
            }
        }
    }
    let mut c = Collect { grads, out: BTreeMap::new() };
    model.visit::<Collect<'_>>(&mut c);
    c.out
}

fn loss<B: Backend>(logits: Tensor<B, 2>, labels: &[i64]) -> Tensor<B, 1> {
    let n = labels.len();
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(labels.to_vec(), [n, 1]), &logits.device());
    log_softmax(logits, 1).gather(1, idx).mean().neg()
}

/// Gradients of the mean loss of rows `rows` of `(x, labels)` on one device.
fn single_device_grads(model: &AnyBackbone<AD>, x: &Tensor<AD, 4>, labels: &[i64], rows: std::ops::Range<usize>) -> HostGrads {
    let xs = x.clone().narrow(0, rows.start, rows.len());
    let l = loss(model.forward(xs), &labels[rows]);
    host_grads(model, &GradientsParams::from_grads(l.backward(), model))
}

/// 2 peers, each with its half of the batch: forward, backward, all-reduce (mean).
fn all_reduced_grads(model: &AnyBackbone<AD>, x: &Tensor<AD, 4>, labels: &[i64]) -> Vec<HostGrads> {
    let n = labels.len();
    let devices = vec![Default::default(); 2];
    run_peers::<AD, _, _>(&devices, |peer| {
        let replica = model.clone().fork(&peer.device);
        let rows = peer.shard(n);
        let xs = Tensor::<AD, 4>::from_data(x.clone().narrow(0, rows.start, rows.len()).into_data(), &peer.device);
        let l = loss(replica.forward(xs), &labels[rows]);
        let grads = peer.all_reduce_grads(GradientsParams::from_grads(l.backward(), &replica))?;
        Ok(host_grads(&replica, &grads))
    })
    .unwrap()
}

fn max_diff(a: &HostGrads, b: &HostGrads) -> (f32, f32) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "same parameters");
    let (mut diff, mut scale) = (0f32, 0f32);
    for (id, ga) in a {
        let gb = &b[id];
        assert_eq!(ga.len(), gb.len());
        for (u, v) in ga.iter().zip(gb) {
            diff = diff.max((u - v).abs());
            scale = scale.max(v.abs());
        }
    }
    (diff, scale)
}

fn batch(n: usize, c: usize, s: usize, classes: i64) -> (Tensor<AD, 4>, Vec<i64>) {
    AD::seed(&Default::default(), 3);
    let x = Tensor::random([n, c, s, s], Distribution::Normal(0.0, 1.0), &Default::default());
    (x, (0..n as i64).map(|i| (i * 7 + 1) % classes).collect())
}

/// GFNet (LayerNorm only, the global filter's custom autodiff op): every sample is processed
/// independently, so the all-reduced shard gradients equal the whole batch's gradients.
#[test]
fn two_peers_all_reduce_equals_single_device_gradients() {
    let _rng = common::rng_lock();
    let spec = ModelSpec::from_toml_str("[model]\nfamily = \"gfnet\"\nimg_size = 16\npatch_size = 4\nembed_dim = 16\ndepth = 2\nnum_classes = 5\n").unwrap();
    let model: AnyBackbone<AD> = spec.build(&Default::default()).unwrap();
    let (x, labels) = batch(8, 3, 16, 5);

    let reference = single_device_grads(&model, &x, &labels, 0..8);
    let peers = all_reduced_grads(&model, &x, &labels);
    assert_eq!(peers.len(), 2);
    assert!(!reference.is_empty());
    // Both peers hold the same averaged gradients...
    assert_eq!(peers[0], peers[1], "peers disagree after the all-reduce");
    // ... which are those of the concatenated batch on one device.
    let (diff, scale) = max_diff(&peers[0], &reference);
    println!("gfnet: max |all-reduced - single-device| = {diff:.3e} (max |grad| {scale:.3e}, {} tensors)", reference.len());
    assert!(scale > 1e-3, "gradients are not trivially zero");
    assert!(diff <= 1e-5, "max gradient difference {diff:.3e} > 1e-5");

    // Not trivially equal: one shard alone has different gradients.
    let (half_diff, _) = max_diff(&single_device_grads(&model, &x, &labels, 0..4), &reference);
    assert!(half_diff > 1e-4, "a half batch gives the same gradients ({half_diff:.3e}): the test cannot tell");
}

/// small-cnn has BatchNorm, which normalises each shard with its own batch statistics (as
/// PyTorch DDP without SyncBatchNorm): the all-reduced gradients are the mean of the shards'
/// single-device gradients, not the whole batch's.
#[test]
fn batchnorm_peers_average_per_shard_gradients() {
    let _rng = common::rng_lock();
    let opts: toml::Table = toml::from_str("channels = [4, 4, 8, 8]").unwrap();
    let ctx = rlprune::backbones::BuildContext { num_classes: 4, in_channels: 1, img_size: [12, 12] };
    let model: AnyBackbone<AD> = rlprune::backbones::build("small-cnn", &opts, &ctx, &Default::default()).unwrap();
    let (x, labels) = batch(8, 1, 12, 4);
    let peers = all_reduced_grads(&model, &x, &labels);
    assert_eq!(peers[0], peers[1]);

    let a = single_device_grads(&model, &x, &labels, shard_range(0, 2, 8));
    let b = single_device_grads(&model, &x, &labels, shard_range(1, 2, 8));
    let mean: HostGrads = a.iter().map(|(id, ga)| (*id, ga.iter().zip(&b[id]).map(|(u, v)| (u + v) / 2.0).collect())).collect();
    let (diff, _) = max_diff(&peers[0], &mean);
    let (bn_effect, _) = max_diff(&peers[0], &single_device_grads(&model, &x, &labels, 0..8));
    println!("small-cnn: |all-reduced - mean of shards| = {diff:.3e}; |all-reduced - whole batch| = {bn_effect:.3e} (BatchNorm statistics per shard)");
    assert!(diff <= 1e-5, "{diff:.3e}");
    assert!(bn_effect > 1e-5, "BatchNorm shards should differ from the whole batch");
}

const GFNET_SYNTH: &str = r#"name = "dp"
seed = 5

[data]
dataset = "synthetic"
batch_size = 16
classes = 4
size = 12
train_size = 128
test_size = 32

[backbone]
arch = "gfnet-ti"
patch_size = 4
embed_dim = 16
depth = 2
drop_path_rate = 0.0

[train]
epochs = 1
optimizer = { kind = "sgd", lr = 0.1, momentum = 0.9 }
schedule = { kind = "constant" }

[log]
tensorboard = false
"#;

fn train_weights(dir: &std::path::Path, tag: &str, toml: &str) -> (rlprune::session::supervised::TrainSummary, rlprune::nn::params::StateDict) {
    let exp_path = dir.join(format!("{tag}.toml"));
    std::fs::write(&exp_path, toml).unwrap();
    let (exp, layered) = rlprune::methods::load(&exp_path, &[]).unwrap();
    let out = dir.join(tag);
    let opts = rlprune::session::supervised::TrainOptions { out: Some(out.clone()), base_dir: dir.to_path_buf(), ..Default::default() };
    let summary = rlprune::methods::train(&exp, &layered, &opts).unwrap();
    let weights = rlprune::import::read_safetensors(&out.join("checkpoints").join("last.safetensors")).unwrap();
    (summary, weights)
}

fn max_weight_diff(a: &rlprune::nn::params::StateDict, b: &rlprune::nn::params::StateDict) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut diff = 0f32;
    for (k, t) in a {
        for (u, v) in t.data.iter().zip(&b[k].data) {
            diff = diff.max((u - v).abs());
        }
    }
    diff
}

const TWO_PEERS: &str = "devices = [\"cpu\", \"cpu\"]";

/// The trainer with `devices = ["cpu", "cpu"]` (8 steps of SGD with momentum, 2 peers with 8
/// images each) ends with the same weights and loss as the single-device trainer.
#[test]
fn data_parallel_trainer_matches_single_device() {
    use rlprune::train::data_parallel::PeerWork;
    let _rng = common::rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let (single, w1) = train_weights(tmp.path(), "single", GFNET_SYNTH);
    let (dp, w2) = train_weights(tmp.path(), "two", &format!("{TWO_PEERS}\n{GFNET_SYNTH}"));
    // Both peers ran every step on their half of each batch of 16 (128 images, 8 steps).
    assert_eq!(single.peers, vec![]);
    assert_eq!(dp.peers, vec![PeerWork { rank: 0, steps: 8, images: 64 }, PeerWork { rank: 1, steps: 8, images: 64 }]);
    let diff = max_weight_diff(&w1, &w2);
    let (l1, l2) = (single.history[0].train_loss, dp.history[0].train_loss);
    println!("trainer: max weight difference {diff:.3e}; train loss {l1:.6} vs {l2:.6}");
    assert!(diff <= 1e-4, "weights differ by {diff:.3e}");
    assert!((l1 - l2).abs() <= 1e-4, "train loss {l1} vs {l2}");
    assert_eq!(single.history[0].train_top1, dp.history[0].train_top1);
}

/// Control for the test above: with BatchNorm, each peer normalises its own shard, so two peers
/// must not reproduce one device. If they did, the "two peers" run would be one device in
/// disguise.
#[test]
fn data_parallel_trainer_differs_from_single_device_with_batchnorm() {
    let _rng = common::rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let cnn = GFNET_SYNTH.replace(
        "arch = \"gfnet-ti\"\npatch_size = 4\nembed_dim = 16\ndepth = 2\ndrop_path_rate = 0.0",
        "arch = \"small-cnn\"\nchannels = [4, 4, 8, 8]",
    );
    assert_ne!(cnn, GFNET_SYNTH);
    let (_, w1) = train_weights(tmp.path(), "single", &cnn);
    let (dp, w2) = train_weights(tmp.path(), "two", &format!("{TWO_PEERS}\n{cnn}"));
    assert_eq!(dp.peers.len(), 2);
    let diff = max_weight_diff(&w1, &w2);
    println!("small-cnn trainer: max weight difference {diff:.3e} (BatchNorm statistics per shard)");
    assert!(diff > 1e-3, "a BatchNorm backbone on two peers should differ from one device, max diff {diff:.3e}");
}
