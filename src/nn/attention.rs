//! Multi-head self-attention with timm's parameter names (`qkv`, `proj`), plus DynamicViT's
//! keep-policy masking.
//!
//! With a policy `[N, T]` (1 = token kept, 0 = dropped, soft values allowed in training), every
//! query attends only to kept keys and to itself: dropped tokens are removed from the other
//! tokens' softmax but still produce an output of their own, so the token count stays `T` and
//! the Gumbel-softmax decisions remain differentiable (`softmax_with_policy`). At inference,
//! pruning gathers the kept tokens instead and runs this module on the subset with no policy.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::activation_op::softmax_last_dim;
use super::attention_op::attention_with_key_bias;
use super::drop_path::dropout;
use super::layers::Linear;

/// DynamicViT's `eps` in `softmax_with_policy`.
pub const POLICY_EPS: f64 = 1e-6;

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    pub num_heads: usize,
    /// `qk_scale` or `head_dim ** -0.5`.
    pub scale: f64,
    pub attn_drop: f64,
    pub proj_drop: f64,
}

impl<B: crate::ModelBackend> Attention<B> {
    /// timm's `Attention(dim, num_heads, qkv_bias, qk_scale)`, initialised as timm's ViT does
    /// (trunc-normal 0.02 weights, zero biases).
    pub fn new(dim: usize, num_heads: usize, qkv_bias: bool, qk_scale: Option<f64>, device: &B::Device) -> Self {
        assert!(num_heads > 0 && dim.is_multiple_of(num_heads), "dim {dim} is not divisible by {num_heads} heads");
        let head_dim = dim / num_heads;
        Self {
            qkv: Linear::new_trunc_normal(dim, 3 * dim, qkv_bias, device),
            proj: Linear::new_trunc_normal(dim, dim, true, device),
            num_heads,
            scale: qk_scale.unwrap_or((head_dim as f64).powf(-0.5)),
            attn_drop: 0.0,
            proj_drop: 0.0,
        }
    }

    /// `x`: `[N, T, C]` (any token count, e.g. a gathered subset); `policy`: optional `[N, T]`
    /// keep mask. Returns `[N, T, C]`.
    pub fn forward(&self, x: Tensor<B, 3>, policy: Option<Tensor<B, 2>>) -> Tensor<B, 3> {
        self.forward_parts(x, policy, None).0
    }

    /// [`Self::forward`] that also returns the `qkv` projection `[N, T, 3C]` (token methods read
    /// their scores from it: ToMe the keys, EViT the class token's attention), with an optional
    /// `key_bias` `[N, T]` added to every query's logit for each key (ToMe's `log(size)`).
    pub fn forward_parts(
        &self,
        x: Tensor<B, 3>,
        policy: Option<Tensor<B, 2>>,
        key_bias: Option<Tensor<B, 2>>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [n, t, c] = x.dims();
        let h = self.num_heads;
        let d = c / h;
        let qkv = self.qkv.forward(x);
        let attn_dropout = self.attn_drop > 0.0 && B::ad_enabled(&qkv.device());
        if policy.is_none() && !attn_dropout && self.scale > 0.0 {
            let out = attention_with_key_bias(qkv.clone(), key_bias, h, self.scale);
            return (dropout(self.proj.forward(out), self.proj_drop), qkv);
        }
        // [N, T, 3C] -> [3, N, H, T, d]
        let heads = qkv.clone().reshape([n, t, 3, h, d]).permute([2, 0, 3, 1, 4]);
        let q = heads.clone().narrow(0, 0, 1).reshape([n, h, t, d]);
        let k = heads.clone().narrow(0, 1, 1).reshape([n, h, t, d]);
        let v = heads.narrow(0, 2, 1).reshape([n, h, t, d]);
        let mut attn = q.matmul(k.swap_dims(2, 3)).mul_scalar(self.scale);
        if let Some(b) = key_bias {
            attn = attn + b.detach().reshape([n, 1, 1, t]);
        }
        let attn = match policy {
            None => softmax_last_dim(attn),
            Some(p) => softmax_with_policy(attn, p, POLICY_EPS),
        };
        let attn = dropout(attn, self.attn_drop);
        let out = attn.matmul(v).swap_dims(1, 2).reshape([n, t, c]);
        (dropout(self.proj.forward(out), self.proj_drop), qkv)
    }
}

/// DynamicViT's `softmax_with_policy`: `attn` `[N, H, T, T]` (pre-softmax scores), `policy`
/// `[N, T]`. Key `j` counts for query `i` with weight `policy[j]`, except that a token always
/// sees its own key: `w_ij = policy_j + (1 - policy_j)·[i == j]`. Then
/// `softmax_ij = (w_ij·exp(a_ij - max_i) + eps/T) / (Σ_j w_ij·exp(a_ij - max_i) + eps)`.
pub fn softmax_with_policy<B: Backend>(attn: Tensor<B, 4>, policy: Tensor<B, 2>, eps: f64) -> Tensor<B, 4> {
    let [n, _, t, t2] = attn.dims();
    assert_eq!(t, t2, "attention must be square");
    assert_eq!(policy.dims(), [n, t], "policy must be [N, T] = [{n}, {t}]");
    let device = attn.device();
    let p = policy.reshape([n, 1, 1, t]);
    let eye = Tensor::<B, 2>::eye(t, &device).reshape([1, 1, t, t]);
    let w = p.clone() + (p.neg() + 1.0) * eye;
    let max = attn.clone().max_dim(3);
    let e = (attn - max).exp() * w;
    let sum = e.clone().sum_dim(3);
    (e + eps / t as f64) / (sum + eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;
    use burn::tensor::TensorData;

    fn t4(v: Vec<f32>, s: [usize; 4]) -> Tensor<Cpu, 4> {
        Tensor::from_data(TensorData::new(v, s), &Default::default())
    }

    #[test]
    fn policy_softmax_hand_case() {
        // One image, one head, three tokens; token 1 is dropped.
        let a = t4(vec![0.0, 1.0, 2.0, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0], [1, 1, 3, 3]);
        let p = Tensor::<Cpu, 2>::from_data(TensorData::new(vec![1.0f32, 0.0, 1.0], [1, 3]), &Default::default());
        let out = softmax_with_policy(a, p, 0.0).into_data().to_vec::<f32>().unwrap();
        let e = |x: f32| x.exp();
        // Row 0 sees keys 0 and 2.
        let r0 = [e(0.0) / (e(0.0) + e(2.0)), 0.0, e(2.0) / (e(0.0) + e(2.0))];
        // Row 1 (dropped) sees keys 0, 2 and itself: all 0.5 -> uniform.
        let r1 = [1.0 / 3.0; 3];
        // Row 2 sees keys 0 and 2.
        let r2 = [e(2.0) / (e(2.0) + e(1.0)), 0.0, e(1.0) / (e(2.0) + e(1.0))];
        let want: Vec<f32> = [r0, r1, r2].concat();
        for (g, w) in out.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{out:?} vs {want:?}");
        }
    }

    #[test]
    fn policy_eps_matches_reference_formula() {
        let a = t4(vec![0.0, 1.0, 1.0, 0.0], [1, 1, 2, 2]);
        let p = Tensor::<Cpu, 2>::from_data(TensorData::new(vec![1.0f32, 0.0], [1, 2]), &Default::default());
        let out = softmax_with_policy(a, p, 1e-6).into_data().to_vec::<f32>().unwrap();
        // Row 0: key 1 masked; max is 1 -> exp(-1) for key 0, 0 for key 1.
        let s = (-1.0f64).exp();
        let r00 = (s + 0.5e-6) / (s + 1e-6);
        let r01 = 0.5e-6 / (s + 1e-6);
        assert!((out[0] as f64 - r00).abs() < 1e-7 && (out[1] as f64 - r01).abs() < 1e-7);
    }

    #[test]
    fn all_ones_policy_equals_plain_attention() {
        let dev = Default::default();
        let attn = Attention::<Cpu>::new(8, 2, true, None, &dev);
        let x = Tensor::<Cpu, 3>::random([2, 5, 8], burn::tensor::Distribution::Default, &dev);
        let plain = attn.forward(x.clone(), None);
        let masked = attn.forward(x, Some(Tensor::ones([2, 5], &dev)));
        let diff = (plain - masked).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn dropped_tokens_do_not_influence_kept_ones() {
        let dev = Default::default();
        let attn = Attention::<Cpu>::new(8, 2, true, None, &dev);
        let x = Tensor::<Cpu, 3>::random([1, 4, 8], burn::tensor::Distribution::Default, &dev);
        let p = Tensor::<Cpu, 2>::from_data(TensorData::new(vec![1.0f32, 1.0, 0.0, 1.0], [1, 4]), &dev);
        let full = attn.forward(x.clone(), Some(p));
        // Running on the gathered subset {0, 1, 3} gives the same outputs for the kept tokens
        // (up to the eps smoothing, ~1e-6).
        let idx = Tensor::<Cpu, 1, burn::tensor::Int>::from_data(TensorData::new(vec![0i64, 1, 3], [3]), &dev);
        let sub = attn.forward(x.select(1, idx.clone()), None);
        let diff = (full.select(1, idx) - sub).abs().max().into_scalar();
        assert!(diff < 1e-4, "{diff}");
    }
}
