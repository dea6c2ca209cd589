//! Linear and convolution layers that store their parameters under PyTorch's names and layouts
//! (`weight` as `[out, in]` / `[out, in/groups, kh, kw]`, `bias`), so that a reference
//! `state_dict` maps one to one onto our parameter paths.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Distribution, Tensor};

/// PyTorch's default `reset_parameters` for Linear/Conv: kaiming_uniform(a=√5) for the weight,
/// which reduces to U(-1/√fan_in, 1/√fan_in), and the same bound for the bias.
pub fn torch_default_uniform<B: Backend, const D: usize>(
    shape: [usize; D],
    fan_in: usize,
    device: &B::Device,
) -> Tensor<B, D> {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Tensor::random(shape, Distribution::Uniform(-bound, bound), device)
}

/// Truncated normal in [-2σ, 2σ] (timm's `trunc_normal_(std=σ)`), by rejection on the host-free
/// inverse: draw uniform, map through a clipped normal. Good enough for initialisation.
pub fn trunc_normal<B: Backend, const D: usize>(
    shape: [usize; D],
    std: f64,
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::<B, D>::random(shape, Distribution::Normal(0.0, std), device).clamp(-2.0 * std, 2.0 * std)
}

#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out_features, in_features]`, as in PyTorch.
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    pub fn new(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(torch_default_uniform([d_out, d_in], d_in, device)),
            bias: bias.then(|| Param::from_tensor(torch_default_uniform([d_out], d_in, device))),
        }
    }

    /// timm's ViT/GFNet rule: trunc_normal(0.02) weights, zero bias.
    pub fn new_trunc_normal(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(trunc_normal([d_out, d_in], 0.02, device)),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Applies the layer to the last dimension of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let w = self.weight.val().transpose().unsqueeze::<D>();
        let y = x.matmul(w);
        match &self.bias {
            Some(b) => y + b.val().unsqueeze::<D>(),
            None => y,
        }
    }
}

#[derive(Module, Debug)]
pub struct Conv2d<B: Backend> {
    /// `[out, in/groups, kh, kw]`, as in PyTorch.
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl<B: Backend> Conv2d<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        bias: bool,
        device: &B::Device,
    ) -> Self {
        let fan_in = c_in / groups * kernel * kernel;
        Self {
            weight: Param::from_tensor(torch_default_uniform(
                [c_out, c_in / groups, kernel, kernel],
                fan_in,
                device,
            )),
            bias: bias.then(|| Param::from_tensor(torch_default_uniform([c_out], fan_in, device))),
            stride,
            padding,
            groups,
        }
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn in_channels(&self) -> usize {
        self.weight.dims()[1] * self.groups
    }

    pub fn kernel_size(&self) -> usize {
        self.weight.dims()[2]
    }

    fn options(&self) -> ConvOptions<2> {
        ConvOptions::new(
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            self.groups,
        )
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        conv2d(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()), self.options())
    }

    /// Runs only output channels `[0, c_out)` on input channels `[0, c_in)`: the sliced weight is
    /// what gets computed, so skipped channel groups cost nothing (RNP's runtime pruning).
    pub fn forward_sliced(&self, x: Tensor<B, 4>, c_out: usize) -> Tensor<B, 4> {
        let [o, i, kh, kw] = self.weight.dims();
        let c_in = x.dims()[1];
        assert_eq!(self.groups, 1, "channel slicing is defined for dense convolutions");
        let c_out = c_out.min(o);
        let w = if c_out == o && c_in == i {
            self.weight.val()
        } else {
            self.weight.val().slice([0..c_out, 0..c_in, 0..kh, 0..kw])
        };
        let b = self.bias.as_ref().map(|b| b.val().slice(0..c_out));
        conv2d(x, w, b, self.options())
    }
}
