//! RNP: controlled execution, channel reordering, router, REINFORCE, rollout reproducibility,
//! configuration errors.

use anyhow::Result;
use burn::tensor::activation::relu;
use burn::tensor::module::max_pool2d;
use burn::tensor::{Distribution, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlprune::backbones::cnn::{SmallCnn, SmallCnnOptions};
use rlprune::backbones::{Backbone, BuildContext};
use rlprune::controllers::{channels_for, Controller, Decision, DecisionPoint, Mode};
use rlprune::Cpu;

/// Replays fixed actions, uniform log-probs.
struct Fixed {
    actions: Vec<Vec<usize>>,
    k: usize,
}

impl Controller<Cpu> for Fixed {
    fn groups(&self) -> usize {
        self.k
    }
    fn reset(&mut self, _batch: usize) {}
    fn decide(&mut self, point: &DecisionPoint, obs: Tensor<Cpu, 2>, _mode: Mode, _rng: &mut ChaCha8Rng) -> Result<Decision<Cpu>> {
        let n = obs.dims()[0];
        let z = Tensor::zeros([n], &obs.device());
        Ok(Decision { actions: self.actions[point.index].clone(), log_prob: z.clone(), entropy: z })
    }
}

fn small_cnn() -> SmallCnn<Cpu> {
    let ctx = BuildContext { num_classes: 10, in_channels: 1, img_size: [16, 16] };
    let dev = Default::default();
    let mut m = SmallCnn::<Cpu>::new(&SmallCnnOptions { channels: [8, 12, 16, 8] }, &ctx, &dev);
    // Non-trivial BN statistics and affine parameters.
    for l in m.features.iter_mut() {
        let c = l.bn.num_features();
        l.bn.running_mean = burn::module::RunningState::new(Tensor::random([c], Distribution::Uniform(-0.2, 0.2), &dev));
        l.bn.running_var = burn::module::RunningState::new(Tensor::random([c], Distribution::Uniform(0.5, 1.5), &dev));
        l.bn.weight = burn::module::Param::from_tensor(Tensor::random([c], Distribution::Uniform(0.5, 1.5), &dev));
        l.bn.bias = burn::module::Param::from_tensor(Tensor::random([c], Distribution::Uniform(-0.1, 0.1), &dev));
    }
    m
}

/// The reference: full convolutions, skipped output channels zeroed per image.
fn masked_forward(m: &SmallCnn<Cpu>, mut x: Tensor<Cpu, 4>, actions: &[Vec<usize>], k: usize) -> Tensor<Cpu, 2> {
    let dev = x.device();
    for (i, layer) in m.features.iter().enumerate() {
        let y = relu(layer.bn.forward(layer.conv.forward(x)));
        let [n, c, _, _] = y.dims();
        let mut mask = vec![0f32; n * c];
        for (s, &a) in actions[i].iter().enumerate() {
            for ch in 0..channels_for(c, k, a) {
                mask[s * c + ch] = 1.0;
            }
        }
        let mask = Tensor::<Cpu, 2>::from_data(TensorData::new(mask, [n, c]), &dev).reshape([n, c, 1, 1]);
        x = y * mask;
        if SmallCnn::<Cpu>::pools_after(i) {
            x = max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], false);
        }
    }
    let [n, c, _, _] = x.dims();
    m.fc.forward(x.mean_dim(3).mean_dim(2).reshape([n, c]))
}

fn max_abs_diff(a: Tensor<Cpu, 2>, b: Tensor<Cpu, 2>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn sliced_grouped_execution_equals_masked_full_computation() {
    let m = small_cnn();
    let dev = Default::default();
    let n = 7;
    let x = Tensor::<Cpu, 4>::random([n, 1, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
    let k = 4;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let actions: Vec<Vec<usize>> = (0..4).map(|_| (0..n).map(|_| rand::Rng::random_range(&mut rng, 1..=k)).collect()).collect();
    let mut ctl = Fixed { actions: actions.clone(), k };
    let (logits, trace) = m.forward_controlled(x.clone(), &mut ctl, Mode::Greedy, &mut rng).unwrap();
    let reference = masked_forward(&m, x.clone(), &actions, k);
    let d = max_abs_diff(logits, reference);
    assert!(d < 1e-5, "grouped vs masked: max |diff| = {d}");
    // All-full actions equal the plain forward; MACs per image are counted from what ran.
    let mut full = Fixed { actions: vec![vec![k; n]; 4], k };
    let (lf, tf) = m.forward_controlled(x.clone(), &mut full, Mode::Greedy, &mut rng).unwrap();
    assert!(max_abs_diff(lf, m.forward(x)) < 1e-5);
    assert_eq!(tf.macs_per_image(), vec![tf.macs_full(); n]);
    let spent = trace.macs_per_image();
    for (i, s) in spent.iter().enumerate() {
        assert!(*s < tf.macs_full() || actions.iter().all(|a| a[i] == k));
    }
}

#[test]
fn reorder_by_filter_norm_preserves_logits() {
    let mut m = small_cnn();
    let dev = Default::default();
    let x = Tensor::<Cpu, 4>::random([5, 1, 16, 16], Distribution::Normal(0.0, 1.0), &dev);
    let before = m.forward(x.clone());
    rlprune::backbones::reorder_by_filter_norm(&mut m).unwrap();
    let after = m.forward(x);
    assert!(max_abs_diff(before, after) < 1e-5);
    // Norms are now non-increasing.
    for l in &m.features {
        let w = l.conv.weight.val();
        let o = w.dims()[0];
        let norms: Vec<f32> = w.powf_scalar(2.0).reshape([o as i32, -1]).sum_dim(1).into_data().to_vec().unwrap();
        assert!(norms.windows(2).all(|p| p[0] >= p[1]), "{norms:?}");
    }
}
