//! rlprune: input-adaptive pruning of vision networks.

pub mod backbones;
pub mod data;
pub mod import;
pub mod logging;
pub mod metrics;
pub mod nn;

/// The default CPU backend and its autodiff wrapper.
pub type Cpu = burn::backend::NdArray<f32>;
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;
