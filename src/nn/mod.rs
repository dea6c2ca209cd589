//! Reusable layers. Parameter names and layouts follow PyTorch so that reference weights load
//! by name (see [`params`]).

pub mod activation_op;
pub mod batch_norm_op;
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

pub use global_filter::{GlobalFilter, SpectralBackend};
pub use layers::{Conv2d, Linear, Mlp, PatchEmbed};
pub use norm::{BatchNorm2d, LayerNorm, LayerNorm2d};
