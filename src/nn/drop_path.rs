//! Stochastic depth (`DropPath`) and dropout, active only in training mode. As everywhere in
//! this crate, training mode means an autodiff backend (`B::ad_enabled`); the inner backend
//! (`model.valid()`, inference, `infer`) is eval mode and both are the identity there.

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

fn training<B: Backend>(device: &B::Device) -> bool {
    B::ad_enabled(device)
}

/// timm's `drop_path`: in training, zeroes whole samples (dimension 0) with probability `p`
/// and scales the survivors by `1 / (1 - p)`; the identity in eval mode or when `p == 0`.
pub fn drop_path<B: Backend, const D: usize>(x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
    let device = x.device();
    if p <= 0.0 || !training::<B>(&device) {
        return x;
    }
    let keep = 1.0 - p;
    let mut shape = [1usize; D];
    shape[0] = x.dims()[0];
    let mask = Tensor::<B, D>::random(shape, Distribution::Bernoulli(keep), &device);
    x * mask.div_scalar(keep)
}

/// Inverted dropout (`nn.Dropout`): elementwise, training mode only.
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
    let device = x.device();
    if p <= 0.0 || !training::<B>(&device) {
        return x;
    }
    let keep = 1.0 - p;
    let mask = Tensor::<B, D>::random(x.shape(), Distribution::Bernoulli(keep), &device);
    x * mask.div_scalar(keep)
}

/// timm's stochastic depth decay rule: `torch.linspace(0, rate, n)`.
pub fn linspace_rates(rate: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![0.0],
        _ => (0..n).map(|i| rate * i as f64 / (n - 1) as f64).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cpu, CpuAutodiff};

    #[test]
    fn identity_in_eval_mode() {
        let dev = Default::default();
        let x = Tensor::<Cpu, 3>::random([4, 5, 6], Distribution::Default, &dev);
        let y = drop_path(x.clone(), 0.5);
        let z = dropout(x.clone(), 0.5);
        assert_eq!(x.to_data(), y.to_data());
        assert_eq!(x.to_data(), z.to_data());
    }

    #[test]
    fn drops_whole_samples_in_training() {
        let dev = Default::default();
        let x = Tensor::<CpuAutodiff, 3>::ones([64, 3, 4], &dev);
        let y = drop_path(x, 0.5).into_data().to_vec::<f32>().unwrap();
        let mut kept = 0;
        for s in y.chunks(12) {
            // Every sample is either all zero or all 2.
            assert!(s.iter().all(|&v| v == 0.0) || s.iter().all(|&v| (v - 2.0).abs() < 1e-6));
            kept += (s[0] != 0.0) as usize;
        }
        assert!(kept > 10 && kept < 54, "kept {kept} of 64");
    }

    #[test]
    fn linspace_matches_torch() {
        assert_eq!(linspace_rates(0.2, 3), vec![0.0, 0.1, 0.2]);
        assert_eq!(linspace_rates(0.3, 1), vec![0.0]);
    }
}
