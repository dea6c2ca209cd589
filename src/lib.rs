//! rlprune: input-adaptive pruning of vision networks.
//!
//! A backbone (`backbones`) runs on a batch of images; a controller decides per image which
//! channels or tokens it may skip; the trainers in `train` fit backbones and controllers; `data`
//! reads real datasets; `logging` writes TensorBoard event files. See `DESIGN.md` and the README.

pub mod backbones;
pub mod cli;
pub mod controllers;
pub mod data;
pub mod device;
pub mod experiment;
pub mod fsutil;
pub mod import;
pub mod logging;
pub mod metrics;
pub mod nn;
pub mod rl;
pub mod sweep;
pub mod train;
pub mod visualize;

/// Backends that run every op the models need: burn's ops plus our custom ones (the CPU
/// convolution, the global filter). A backend implements each op trait in one line, getting the
/// generic tensor-op implementations.
pub trait ModelBackend: nn::conv::ConvBackend + nn::global_filter::SpectralBackend {}
impl<B: nn::conv::ConvBackend + nn::global_filter::SpectralBackend> ModelBackend for B {}

/// The default CPU backend and its autodiff wrapper.
pub type Cpu = burn::backend::NdArray<f32>;
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;
