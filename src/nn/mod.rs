//! Reusable layers. Parameter names and layouts follow PyTorch so that reference weights load
//! by name (see [`params`]).

pub mod activation_op;
pub mod batch_norm_op;
pub mod channel_op;
pub mod conv;
pub mod depthwise;
pub mod attention;
pub mod attention_op;
pub mod drop_path;
pub mod global_filter;
pub mod layer_norm_op;
pub mod linear_op;
pub mod layers;
pub mod norm;
pub mod params;
pub mod resample;
pub mod pool;

pub use global_filter::{GlobalFilter, SpectralBackend};
pub use layers::{Conv2d, Linear, Mlp, PatchEmbed};
pub use norm::{BatchNorm2d, LayerNorm, LayerNorm2d};

/// Helpers of the kernels' tests: host copies and the largest difference relative to the
/// reference's largest magnitude.
#[cfg(test)]
pub(crate) mod test_util {
    use burn::tensor::backend::Backend;
    use burn::tensor::Tensor;

    pub fn host<const D: usize, B: Backend>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    pub fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }
}
