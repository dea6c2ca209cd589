//! rlprune: input-adaptive pruning of vision networks.
//!
//! A backbone (`backbones`) runs on a batch of images; a controller decides per image which
//! channels or tokens it may skip; the trainers in `train` fit backbones and controllers; `data`
//! reads real datasets; `logging` writes TensorBoard event files. See `DESIGN.md` and the README.

pub mod backbones;
pub mod metrics;
pub mod nn;

/// The default CPU backend and its autodiff wrapper.
pub type Cpu = burn::backend::NdArray<f32>;
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;
