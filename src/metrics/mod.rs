//! Compute accounting before anything runs: analytic parameter counts and multiply-accumulates
//! (`flops`) and memory estimates (`memory`). Measured throughput and latency of a built model
//! are the `bench` module's, above the backbones.

pub mod flops;
pub mod memory;
