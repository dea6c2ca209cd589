//! Linear and convolution layers that store their parameters under PyTorch's names and layouts
//! (`weight` as `[out, in]` / `[out, in/groups, kh, kw]`, `bias`), so that a reference
//! `state_dict` maps one to one onto our parameter paths.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;

use super::activation_op::{gelu, ActivationBackend};
use super::conv::conv2d_gemm;
use super::linear_op::{linear, LinearBackend};
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

/// timm's `trunc_normal_(std=σ)`: a normal truncated to `[a, b] = [-2, 2]`. Note that timm's
/// bounds are absolute, not multiples of σ, so for the σ = 0.02 the references use this is a
/// plain normal in practice; values beyond the bounds (never drawn at σ ≪ 1) are clamped.
pub fn trunc_normal<B: Backend, const D: usize>(
    shape: [usize; D],
    std: f64,
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::<B, D>::random(shape, Distribution::Normal(0.0, std), device).clamp(-2.0, 2.0)
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
}

impl<B: LinearBackend> Linear<B> {
    /// Applies the layer to the last dimension of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()))
    }
}

impl<B: crate::nn::conv::ConvBackend> Linear<B> {
    /// Applies the layer to dimension 1 of an NCHW tensor, as a 1×1 convolution: equal to
    /// permuting to channels-last, [`forward`](Self::forward), and permuting back, without the
    /// two copies.
    pub fn forward_channels_first(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [o, c] = self.weight.dims();
        conv2d_gemm(x, self.weight.val().reshape([o, c, 1, 1]), self.bias.as_ref().map(|b| b.val()), 1, 0, 1)
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

    /// timm / ConvNeXt / HorNet rule: trunc-normal weights, zero bias.
    #[allow(clippy::too_many_arguments)]
    pub fn new_trunc_normal(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        bias: bool,
        std: f64,
        device: &B::Device,
    ) -> Self {
        Self {
            weight: Param::from_tensor(trunc_normal([c_out, c_in / groups, kernel, kernel], std, device)),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([c_out], device))),
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

}

impl<B: crate::nn::conv::ConvBackend> Conv2d<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        conv2d_gemm(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()), self.stride, self.padding, self.groups)
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
        conv2d_gemm(x, w, b, self.stride, self.padding, self.groups)
    }
}

/// timm's `Mlp`: `fc2(drop(gelu(fc1(x))))` followed by dropout (exact, erf-based GELU).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    pub drop: f64,
}

impl<B: Backend> Mlp<B> {
    /// Trunc-normal(0.02) weights and zero biases (timm's ViT / GFNet rule).
    pub fn new(dim: usize, hidden: usize, drop: f64, device: &B::Device) -> Self {
        Self {
            fc1: Linear::new_trunc_normal(dim, hidden, true, device),
            fc2: Linear::new_trunc_normal(hidden, dim, true, device),
            drop,
        }
    }
}

impl<B: LinearBackend + ActivationBackend> Mlp<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = gelu(self.fc1.forward(x));
        let x = super::drop_path::dropout(x, self.drop);
        super::drop_path::dropout(self.fc2.forward(x), self.drop)
    }
}

/// ViT / GFNet `PatchEmbed`: a `patch×patch` stride-`patch` convolution, flattened to tokens.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    pub proj: Conv2d<B>,
}

impl<B: Backend> PatchEmbed<B> {
    /// PyTorch's default conv initialisation (neither timm nor GFNet re-initialise it).
    pub fn new(in_chans: usize, dim: usize, patch: usize, device: &B::Device) -> Self {
        Self { proj: Conv2d::new(in_chans, dim, patch, patch, 0, 1, true, device) }
    }

}

impl<B: crate::nn::conv::ConvBackend> PatchEmbed<B> {
    /// `[N, C, H, W]` → tokens `[N, (H/p)·(W/p), dim]` in row-major grid order.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let y = self.proj.forward(x);
        let [n, c, h, w] = y.dims();
        y.reshape([n, c, h * w]).swap_dims(1, 2)
    }
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;
    use crate::Cpu;

    fn reference(c: &Conv2d<Cpu>, x: Tensor<Cpu, 4>) -> Tensor<Cpu, 4> {
        burn::tensor::module::conv2d(x, c.weight.val(), c.bias.as_ref().map(|b| b.val()), burn::tensor::ops::ConvOptions::new([c.stride; 2], [c.padding; 2], [1, 1], c.groups))
    }

    #[test]
    fn pointwise_and_patch_convs_equal_conv2d() {
        let d = Default::default();
        // (c_in, c_out, kernel, stride, bias, input side): 1×1, patch embeddings (also with a
        // remainder that fits no patch), down-sampling.
        for (ci, co, k, s, bias, side) in
            [(6, 10, 1, 1, true, 5), (6, 10, 1, 1, false, 4), (3, 8, 4, 4, true, 18), (5, 7, 2, 2, false, 9)]
        {
            let c = Conv2d::<Cpu>::new(ci, co, k, s, 0, 1, bias, &d);
            let x = Tensor::<Cpu, 4>::random([2, ci, side, side], Distribution::Default, &d);
            let (a, b) = (c.forward(x.clone()), reference(&c, x));
            assert_eq!(a.dims(), b.dims());
            assert!((a - b).abs().max().into_scalar() < 1e-5);
        }
    }

    /// Stride-1 convolutions on small maps run as im2col over several images per GEMM; with
    /// more images than fit one column batch, outputs and both gradients still equal burn's
    /// conv2d.
    #[test]
    fn small_map_convs_split_into_several_im2col_batches_equal_conv2d() {
        use crate::CpuAutodiff;
        let d = Default::default();
        // 512 channels on a 3×4 map (padded layout 4×5: 1.67× the kept pixels, so the batched
        // im2col path): 4608·12 floats of columns per image, 4 images per column batch of 2^18
        // floats, so 22 images run as five batches of 4 and one of 2.
        let c = Conv2d::<CpuAutodiff>::new(512, 6, 3, 1, 1, 1, true, &d);
        let x = Tensor::<CpuAutodiff, 4>::random([22, 512, 3, 4], Distribution::Default, &d).require_grad();
        let ours = c.forward(x.clone());
        let theirs = burn::tensor::module::conv2d(
            x.clone(),
            c.weight.val(),
            c.bias.as_ref().map(|b| b.val()),
            burn::tensor::ops::ConvOptions::new([1; 2], [1; 2], [1, 1], 1),
        );
        let rel = |a: Tensor<crate::Cpu, 4>, b: Tensor<crate::Cpu, 4>| {
            let scale = b.clone().abs().max().into_scalar().max(1.0);
            (a - b).abs().max().into_scalar() / scale
        };
        assert!(rel(ours.clone().inner(), theirs.clone().inner()) < 1e-5, "forward");
        let r = Tensor::<CpuAutodiff, 4>::random(ours.dims(), Distribution::Default, &d);
        let ga = (ours * r.clone()).sum().backward();
        let gb = (theirs * r).sum().backward();
        assert!(rel(x.grad(&ga).unwrap(), x.grad(&gb).unwrap()) < 1e-5, "dx");
        let (dwa, dwb) = (c.weight.val().grad(&ga).unwrap(), c.weight.val().grad(&gb).unwrap());
        assert!(rel(dwa, dwb) < 1e-5, "dW");
    }

    /// Padded and strided kernels, where im2col and col2im skip the columns that fall off the
    /// image (stride 1 and 2, padding below and above the kernel's reach, kernel wider than the
    /// image, grouped): outputs and both gradients equal burn's own conv2d.
    #[test]
    fn padded_strided_convs_and_their_gradients_equal_conv2d() {
        use crate::CpuAutodiff;
        let d = Default::default();
        // (c_in, c_out, kernel, stride, padding, groups, input side)
        for (ci, co, k, s, p, g, side) in [
            (3, 4, 3, 1, 1, 1, 7),
            (4, 6, 3, 2, 1, 2, 8),
            (2, 3, 7, 1, 3, 1, 5),
            (3, 3, 7, 1, 3, 3, 9),
            (2, 5, 5, 3, 4, 1, 6),
            (2, 2, 3, 2, 0, 1, 7),
            // ≥ 8 input channels at stride 1: the shifted-GEMM forward (no im2col).
            (8, 5, 3, 1, 1, 1, 7),
            (9, 4, 5, 1, 0, 1, 8),
            (8, 3, 3, 1, 2, 1, 6),
            (10, 6, 1, 1, 0, 1, 5),
            // 1×1 on at least 64 pixels: one GEMM per image on the input as it lies.
            (12, 6, 1, 1, 0, 1, 9),
            (8, 4, 7, 1, 3, 1, 5),
            (16, 8, 3, 1, 1, 1, 12),
            // One image per shifted batch (64 channels of a 65×67 padded plane fill it), so
            // the second batch reuses the first one's buffers.
            (64, 4, 3, 1, 1, 1, 64),
            // Many output channels on a small map: batched im2col through the gather table,
            // with the kernel's reach of 1 and 2 beyond the border.
            (8, 128, 3, 1, 1, 1, 8),
            (8, 160, 5, 1, 2, 1, 4),
            // Depthwise at stride 1: the direct kernel (rows of 7, 11 and 42 columns use
            // blocks of 8, 16 and 32), with padding below the kernel's half.
            (5, 5, 3, 1, 1, 5, 9),
            (4, 4, 5, 1, 0, 4, 9),
            (2, 2, 7, 1, 3, 2, 40),
            (3, 3, 7, 1, 2, 3, 5),
        ] {
            let c = Conv2d::<CpuAutodiff>::new(ci, co, k, s, p, g, true, &d);
            // Non-square, so that rows and columns cannot be confused.
            let x = Tensor::<CpuAutodiff, 4>::random([2, ci, side, side + 2], Distribution::Default, &d).require_grad();
            let ours = c.forward(x.clone());
            let theirs = burn::tensor::module::conv2d(
                x.clone(),
                c.weight.val(),
                c.bias.as_ref().map(|b| b.val()),
                burn::tensor::ops::ConvOptions::new([s; 2], [p; 2], [1, 1], g),
            );
            assert_eq!(ours.dims(), theirs.dims(), "{ci} {co} k{k} s{s} p{p} g{g}");
            let r = Tensor::<CpuAutodiff, 4>::random(ours.dims(), Distribution::Default, &d);
            let diff = |a: Tensor<CpuAutodiff, 4>, b: Tensor<CpuAutodiff, 4>| {
                (a.inner() - b.inner()).abs().max().into_scalar()
            };
            assert!(diff(ours.clone(), theirs.clone()) < 1e-5, "forward k{k} s{s} p{p} g{g}");
            let ga = (ours * r.clone()).sum().backward();
            let gb = (theirs * r).sum().backward();
            let (dxa, dxb) = (x.grad(&ga).unwrap(), x.grad(&gb).unwrap());
            let (dwa, dwb) = (c.weight.val().grad(&ga).unwrap(), c.weight.val().grad(&gb).unwrap());
            assert!((dxa - dxb).abs().max().into_scalar() < 1e-4, "dx k{k} s{s} p{p} g{g}");
            // dW sums `2·H·W` products (hundreds in magnitude on the larger planes): relative.
            let scale = dwb.clone().abs().max().into_scalar().max(1.0);
            let err = (dwa - dwb).abs().max().into_scalar() / scale;
            assert!(err < 1e-5, "dW k{k} s{s} p{p} g{g}: {err}");
        }
    }

    /// The inference ops: conv with the bias and ReLU fused into its output pass, on
    /// non-square images, through both CPU forwards (im2col and shifted GEMM); and the 2×2
    /// max-pool on odd sizes. Both equal burn's unfused ops.
    #[test]
    fn fused_conv_bias_relu_and_max_pool_equal_burns_ops() {
        use crate::nn::conv::{conv2d_bias_act, max_pool2x2};
        let d = Default::default();
        // (c_in, c_out, kernel, stride, padding, h, w)
        for (ci, co, k, s, p, h, w) in [(3, 4, 3, 1, 1, 6, 9), (12, 5, 3, 1, 1, 9, 6), (8, 6, 5, 1, 2, 7, 5), (9, 3, 3, 2, 1, 8, 11)] {
            let x = Tensor::<Cpu, 4>::random([3, ci, h, w], Distribution::Normal(0.0, 1.0), &d);
            // Whole weights, and channel slices of larger ones (read in place by the CPU op).
            for (extra_out, extra_in) in [(0, 0), (3, 0), (2, 5)] {
                let wt = Tensor::<Cpu, 4>::random([co + extra_out, ci + extra_in, k, k], Distribution::Normal(0.0, 0.3), &d);
                let b = Tensor::<Cpu, 1>::random([co + extra_out], Distribution::Normal(0.0, 0.5), &d);
                let opts = burn::tensor::ops::ConvOptions::new([s; 2], [p; 2], [1, 1], 1);
                let block = wt.clone().slice([0..co, 0..ci, 0..k, 0..k]);
                let plain = burn::tensor::module::conv2d(x.clone(), block, Some(b.clone().slice(0..co)), opts);
                for relu in [false, true] {
                    let ours = conv2d_bias_act(x.clone(), wt.clone(), b.clone(), co, relu, s, p, 1);
                    let theirs = if relu { burn::tensor::activation::relu(plain.clone()) } else { plain.clone() };
                    assert_eq!(ours.dims(), theirs.dims());
                    let diff = (ours - theirs).abs().max().into_scalar();
                    assert!(diff < 1e-4, "c{ci}→{co} (+{extra_in}, +{extra_out}) k{k} s{s} p{p} {h}×{w} relu={relu}: {diff}");
                }
            }
        }
        for [n, c, h, w] in [[2, 3, 6, 8], [1, 2, 7, 5], [2, 1, 3, 4], [3, 70, 9, 9]] {
            let x = Tensor::<Cpu, 4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &d);
            let ours = max_pool2x2(x.clone());
            let theirs = burn::tensor::module::max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], false);
            assert_eq!(ours.dims(), theirs.dims());
            assert_eq!(ours.into_data().to_vec::<f32>().unwrap(), theirs.into_data().to_vec::<f32>().unwrap());
        }
    }
}
