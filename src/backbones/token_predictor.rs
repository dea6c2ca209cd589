//! DynamicViT's token controller (Rao et al., NeurIPS 2021): the `PredictorLG` score modules
//! and the keep decisions made from their scores.
//!
//! A predictor sits before each pruning block. It sees the current spatial tokens `[N, T, C]`
//! and the current keep policy `[N, T]` and answers log-probabilities `[N, T, 2]`, index 0 =
//! *keep*. How a decision is made from them depends on the mode:
//! - inference ([`top_k_keep`]): the `int(P·ρ_i)` tokens with the highest keep score survive
//!   (P = patch count of the original grid) and are gathered, so later blocks really run on
//!   fewer tokens;
//! - differentiable training ([`gumbel_keep`]): a hard Gumbel-softmax sample, straight-through,
//!   multiplied by the previous decision; the token count stays P and attention is masked
//!   with the policy instead ([`crate::nn::attention::softmax_with_policy`]).
//!
//! The Gumbel noise comes from a [`GumbelSource`] so that tests can inject the reference's
//! stored noise.
//!
//! The predictor weights belong to the model's state dict under the reference names
//! (`score_predictor.{i}.in_conv.{0,1}.*`, `score_predictor.{i}.out_conv.{0,2,4}.*`): the
//! tuple positions below are the reference `nn.Sequential` indices (GELUs hold no weights).

use burn::module::Module;
use burn::tensor::activation::{log_softmax, softmax};
use crate::nn::activation_op::gelu;
use crate::nn::channel_op::channel_slice;
use crate::nn::linear_op::linear;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};

use crate::nn::{LayerNorm, Linear};

/// `nn.LayerNorm`'s default eps, which the reference predictor uses (the ViT blocks use 1e-6).
pub const PREDICTOR_LN_EPS: f64 = 1e-5;

/// A weightless GELU standing at its `nn.Sequential` index.
#[derive(Module, Clone, Debug, Default)]
pub struct Gelu {
    /// Always false: the exact (erf) GELU, as `nn.GELU()`.
    pub approximate: bool,
}

/// The reference `PredictorLG(embed_dim)`.
#[derive(Module, Debug)]
pub struct PredictorLG<B: Backend> {
    /// `LayerNorm(C)`, `Linear(C, C)` (then GELU).
    pub in_conv: (LayerNorm<B>, Linear<B>),
    /// `Linear(C, C/2)`, GELU, `Linear(C/2, C/4)`, GELU, `Linear(C/4, 2)` (then LogSoftmax).
    pub out_conv: (Linear<B>, Gelu, Linear<B>, Gelu, Linear<B>),
}

impl<B: crate::ModelBackend> PredictorLG<B> {
    /// PyTorch's default initialisation (the reference does not re-initialise the predictors).
    pub fn new(dim: usize, device: &B::Device) -> Self {
        Self {
            in_conv: (LayerNorm::new(dim, PREDICTOR_LN_EPS, device), Linear::new(dim, dim, true, device)),
            out_conv: (
                Linear::new(dim, dim / 2, true, device),
                Gelu::default(),
                Linear::new(dim / 2, dim / 4, true, device),
                Gelu::default(),
                Linear::new(dim / 4, 2, true, device),
            ),
        }
    }

    /// Parameters of one predictor of width `dim` (for analytic counts).
    pub fn num_params(dim: usize) -> usize {
        let lin = |i: usize, o: usize| i * o + o;
        2 * dim + lin(dim, dim) + lin(dim, dim / 2) + lin(dim / 2, dim / 4) + lin(dim / 4, 2)
    }

    /// MACs (fvcore rules) for `tokens` tokens of width `dim`.
    pub fn macs(dim: usize, tokens: usize) -> u64 {
        (tokens * (5 * dim + dim * dim + dim * (dim / 2) + (dim / 2) * (dim / 4) + (dim / 4) * 2)) as u64
    }

    /// `x`: spatial tokens `[N, T, C]`; `policy`: keep mask `[N, T]`, or `None` when every token
    /// is kept. Returns log-probabilities `[N, T, 2]` (index 0 = keep). The first C/2 features are
    /// per token ("local"); the other C/2 are replaced by their policy-weighted mean over the kept
    /// tokens ("global").
    pub fn forward(&self, x: Tensor<B, 3>, policy: Option<Tensor<B, 2>>) -> Tensor<B, 3> {
        let (norm, lin) = &self.in_conv;
        let x = gelu(lin.forward(norm.forward(x)));
        let [n, t, c] = x.dims();
        let half = c / 2;
        // Each token's channels as a contiguous range: the two halves are block copies
        // (burn's `narrow` of the last dimension copies value by value, on one thread).
        let rows = x.reshape([n * t, c, 1]);
        let local = channel_slice(rows.clone(), 0, half).reshape([n, t, half]);
        let tail = channel_slice(rows, half, c - half).reshape([n, t, c - half]);
        let global = match policy {
            None => tail.mean_dim(1),
            Some(policy) => {
                let p = policy.reshape([n, t, 1]);
                (tail * p.clone()).sum_dim(1) / p.sum_dim(1)
            }
        };
        let (l0, _, l2, _, l4) = &self.out_conv;
        // `l0(cat(local, global))` without the concatenation: the global half's product is one
        // row per image, added to every token's product of the local half (a serial copy of the
        // whole `[N, T, C]` map before, and half the multiply-adds of `l0` spent on copies of one
        // row).
        let w = l0.weight.val();
        let out = w.dims()[0];
        let w = w.reshape([out, c, 1]);
        let w_local = channel_slice(w.clone(), 0, half).reshape([out, half]);
        let w_global = channel_slice(w, half, c - half).reshape([out, c - half]);
        let per_image = linear(global, w_global, l0.bias.as_ref().map(|b| b.val()));
        let x = linear(local, w_local, None) + per_image;
        let x = gelu(l2.forward(gelu(x)));
        log_softmax(l4.forward(x), 2)
    }
}

/// Number of patch tokens kept at ratio `ratio` of `patches`: Python's `int(patches * ratio)`.
pub fn keep_count(patches: usize, ratio: f64) -> usize {
    (patches as f64 * ratio) as usize
}

/// Inference decision: indices `[N, k]` of the `k` tokens with the highest keep score
/// (`log_probs[..., 0]`), best first — the reference's `argsort(score, descending)[:, :k]`.
pub fn top_k_keep<B: Backend>(log_probs: Tensor<B, 3>, k: usize) -> Tensor<B, 2, Int> {
    let [n, t, _] = log_probs.dims();
    assert!((1..=t).contains(&k), "cannot keep {k} of {t} tokens");
    let score = log_probs.narrow(2, 0, 1).reshape([n, t]);
    score.argsort_descending(1).narrow(1, 0, k)
}

/// Where the Gumbel noise of the differentiable recipe comes from.
pub trait GumbelSource<B: Backend> {
    /// Standard Gumbel noise of `shape` for pruning stage `stage`.
    fn noise(&mut self, stage: usize, shape: [usize; 3], device: &B::Device) -> Tensor<B, 3>;
}

/// Fresh noise, `-log(Exp(1))` as `F.gumbel_softmax` draws it, from burn's backend RNG
/// (seed it with `B::seed`).
#[derive(Debug, Default, Clone, Copy)]
pub struct SampledGumbel;

impl<B: Backend> GumbelSource<B> for SampledGumbel {
    fn noise(&mut self, _stage: usize, shape: [usize; 3], device: &B::Device) -> Tensor<B, 3> {
        // U in (0, 1]: -log(-log U) with U bounded away from 0 and 1 to stay finite.
        let u = Tensor::<B, 3>::random(shape, Distribution::Uniform(1e-10, 1.0 - 1e-7), device);
        u.log().neg().log().neg()
    }
}

/// Fixed noise per stage (e.g. a parity fixture's `gumbel_s{i}`).
#[derive(Debug, Clone)]
pub struct FixedGumbel<B: Backend> {
    pub per_stage: Vec<Tensor<B, 3>>,
}

impl<B: Backend> GumbelSource<B> for FixedGumbel<B> {
    fn noise(&mut self, stage: usize, shape: [usize; 3], _device: &B::Device) -> Tensor<B, 3> {
        let t = self.per_stage.get(stage).unwrap_or_else(|| panic!("no Gumbel noise for stage {stage}")).clone();
        assert_eq!(t.dims(), shape, "Gumbel noise of stage {stage} has the wrong shape");
        t
    }
}

/// Training decision: `gumbel_softmax(log_probs, hard = true)[..., 0] · prev` `[N, T]`, with
/// the straight-through estimator (forward value: the one-hot of `argmax(log_probs + g)`;
/// gradient: that of `softmax(log_probs + g)`). Written in the reference's order of operations
/// (`y_hard - y_soft.detach() + y_soft`) so that the values agree to the last bit.
pub fn gumbel_keep<B: Backend>(log_probs: Tensor<B, 3>, noise: Tensor<B, 3>, prev: Tensor<B, 2>) -> Tensor<B, 2> {
    let [n, t, two] = log_probs.dims();
    let z = log_probs + noise;
    let soft = softmax(z.clone(), 2);
    let hard: Tensor<B, 3> = z.argmax(2).reshape([n, t]).one_hot::<3>(two).float();
    let st = hard - soft.clone().detach() + soft;
    st.narrow(2, 0, 1).reshape([n, t]) * prev
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;
    use burn::tensor::TensorData;

    #[test]
    fn predictor_is_a_distribution_and_global_half_follows_the_policy() {
        let dev = Default::default();
        let p = PredictorLG::<Cpu>::new(8, &dev);
        let x = Tensor::<Cpu, 3>::random([2, 5, 8], Distribution::Default, &dev);
        let all = Tensor::<Cpu, 2>::ones([2, 5], &dev);
        let lp = p.forward(x.clone(), Some(all));
        // No policy is the full policy.
        assert!((p.forward(x.clone(), None) - lp.clone()).abs().max().into_scalar() < 1e-6);
        let sum = lp.clone().exp().sum_dim(2).reshape([10]).into_data().to_vec::<f32>().unwrap();
        assert!(sum.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sum:?}");
        // Dropping token 4 from the policy changes the others' scores (global half), and
        // equals running on the subset {0..3} with a full policy.
        let mask = Tensor::<Cpu, 2>::from_data(
            TensorData::new(vec![1.0f32, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], [2, 5]),
            &dev,
        );
        let masked = p.forward(x.clone(), Some(mask)).narrow(1, 0, 4);
        let sub = p.forward(x.narrow(1, 0, 4), None);
        assert!((masked.clone() - sub).abs().max().into_scalar() < 1e-5);
        assert!((masked - lp.narrow(1, 0, 4)).abs().max().into_scalar() > 1e-6);
        assert_eq!(PredictorLG::<Cpu>::num_params(8), p.num_params());
    }

    #[test]
    fn top_k_keeps_the_best_scores() {
        let dev = Default::default();
        // keep scores 0.1, 0.9, 0.5, 0.7 (as log-probabilities; index 1 unused here).
        let v: Vec<f32> = [0.1f32, 0.9, 0.5, 0.7].iter().flat_map(|&s| [s.ln(), (1.0 - s).ln()]).collect();
        let lp = Tensor::<Cpu, 3>::from_data(TensorData::new(v, [1, 4, 2]), &dev);
        let idx = top_k_keep(lp, 2).into_data().to_vec::<i64>().unwrap();
        assert_eq!(idx, vec![1, 3]);
        assert_eq!(keep_count(196, 0.48999999999999994), 96);
        assert_eq!(keep_count(196, 0.3429999999999999), 67);
    }

    #[test]
    fn gumbel_keep_is_hard_and_respects_the_previous_decision() {
        let dev = Default::default();
        let lp = log_softmax(Tensor::<Cpu, 3>::random([2, 6, 2], Distribution::Default, &dev), 2);
        let prev =
            Tensor::<Cpu, 2>::from_data(TensorData::new(vec![1.0f32; 6].into_iter().chain([0.0f32; 6]).collect::<Vec<_>>(), [2, 6]), &dev);
        let g = SampledGumbel.noise(0, [2, 6, 2], &dev);
        let keep = gumbel_keep(lp.clone(), g.clone(), prev).into_data().to_vec::<f32>().unwrap();
        let z = (lp + g).into_data().to_vec::<f32>().unwrap();
        for i in 0..6 {
            let want = if z[2 * i] >= z[2 * i + 1] { 1.0 } else { 0.0 };
            assert!((keep[i] - want).abs() < 1e-6, "{keep:?}");
            assert_eq!(keep[6 + i], 0.0);
        }
    }
}
