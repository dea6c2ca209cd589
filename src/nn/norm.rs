//! Normalisation layers with PyTorch parameter names (`weight`, `bias`, `running_mean`,
//! `running_var`). Train/eval follows burn's convention: on an autodiff backend a module is in
//! training mode, on its inner backend (`model.valid()`) in eval mode.

use burn::module::{Module, Param, RunningState};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::batch_norm_op::{batch_norm_train, channel_affine, NormBackend};
use super::layer_norm_op::{layer_norm, layer_norm_channels, LayerNormBackend};

/// LayerNorm over the last dimension (`nn.LayerNorm`).
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(dim: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
            bias: Param::from_tensor(Tensor::zeros([dim], device)),
            eps,
        }
    }

    /// One op (see [`layer_norm`]).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D>
    where
        B: LayerNormBackend,
    {
        layer_norm(x, self.weight.val(), self.bias.val(), self.eps)
    }

    /// The same normalisation over dimension 1 of an NCHW tensor: equal to permuting to
    /// channels-last, [`forward`](Self::forward), and permuting back, without the two copies.
    pub fn forward_channels_first(&self, x: Tensor<B, 4>) -> Tensor<B, 4>
    where
        B: LayerNormBackend,
    {
        layer_norm_channels(x, self.weight.val(), self.bias.val(), self.eps)
    }
}

/// LayerNorm over the channel dimension of an NCHW tensor (HorNet's `channels_first` mode).
#[derive(Module, Debug)]
pub struct LayerNorm2d<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> LayerNorm2d<B> {
    pub fn new(dim: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
            bias: Param::from_tensor(Tensor::zeros([dim], device)),
            eps,
        }
    }

}

impl<B: LayerNormBackend> LayerNorm2d<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        layer_norm_channels(x, self.weight.val(), self.bias.val(), self.eps)
    }
}

/// BatchNorm2d with PyTorch semantics: biased batch variance to normalise, unbiased variance in
/// the running estimate, momentum 0.1.
#[derive(Module, Debug)]
pub struct BatchNorm2d<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub running_mean: RunningState<Tensor<B, 1>>,
    pub running_var: RunningState<Tensor<B, 1>>,
    pub momentum: f64,
    pub eps: f64,
}

impl<B: Backend> BatchNorm2d<B> {
    pub fn new(dim: usize, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
            bias: Param::from_tensor(Tensor::zeros([dim], device)),
            running_mean: RunningState::new(Tensor::zeros([dim], device)),
            running_var: RunningState::new(Tensor::ones([dim], device)),
            momentum: 0.1,
            eps: 1e-5,
        }
    }

    pub fn num_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4>
    where
        B: NormBackend,
    {
        self.forward_channels(x, self.num_features())
    }

    /// Like [`forward_channels`](Self::forward_channels) but always with the running
    /// statistics (eval-mode normalisation; under autodiff the affine parameters still train).
    pub fn forward_channels_frozen(&self, x: Tensor<B, 4>, c: usize) -> Tensor<B, 4> {
        let (scale, shift) = self.frozen_affine(c, &x.device());
        x * scale.reshape([1, c, 1, 1]) + shift.reshape([1, c, 1, 1])
    }

    /// `(scale, shift)` of the first `c` channels with the running statistics:
    /// `bn(x) = x·scale + shift`, which is what lets a conv before it absorb the BatchNorm.
    pub fn frozen_affine(&self, c: usize, device: &B::Device) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let full = self.num_features();
        let pick = |t: Tensor<B, 1>| if c == full { t } else { t.slice(0..c) };
        let mean = pick(self.running_mean.value().to_device(device));
        let var = pick(self.running_var.value().to_device(device));
        let scale = pick(self.weight.val()) / (var + self.eps).sqrt();
        let shift = pick(self.bias.val()) - mean * scale.clone();
        (scale, shift)
    }

    /// Normalises the first `c` channels only: with RNP's sliced convolutions the skipped
    /// channels were never computed.
    pub fn forward_channels(&self, x: Tensor<B, 4>, c: usize) -> Tensor<B, 4>
    where
        B: NormBackend,
    {
        self.forward_channels_act(x, c, false)
    }

    /// `relu(bn(x))`, in training one fused op (see [`batch_norm_train`]).
    pub fn forward_relu(&self, x: Tensor<B, 4>) -> Tensor<B, 4>
    where
        B: NormBackend,
    {
        self.forward_channels_act(x, self.num_features(), true)
    }

    fn forward_channels_act(&self, x: Tensor<B, 4>, c: usize, relu: bool) -> Tensor<B, 4>
    where
        B: NormBackend,
    {
        let device = x.device();
        let full = self.num_features();
        let pick = |t: Tensor<B, 1>| if c == full { t } else { t.slice(0..c) };
        if B::ad_enabled(&device) {
            let [n, _, h, w] = x.dims();
            let (y, mean, var) = batch_norm_train(x, pick(self.weight.val()), pick(self.bias.val()), self.eps, relu);
            let count = (n * h * w) as f64;
            let unbiased = var.detach() * (count / (count - 1.0).max(1.0));
            let m = self.momentum;
            // Skipped channels keep their running statistics untouched.
            let rm = self.running_mean.value_sync().to_device(&device);
            let rv = self.running_var.value_sync().to_device(&device);
            let new_m = rm.clone().slice(0..c) * (1.0 - m) + mean.detach() * m;
            let new_v = rv.clone().slice(0..c) * (1.0 - m) + unbiased * m;
            self.running_mean.update(rm.slice_assign(0..c, new_m));
            self.running_var.update(rv.slice_assign(0..c, new_v));
            return y;
        }
        let (scale, shift) = self.frozen_affine(c, &device);
        channel_affine(x, scale, shift, relu)
    }
}
