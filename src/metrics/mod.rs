//! Compute accounting: analytic parameter counts and multiply-accumulates (`flops`), and
//! measured throughput and latency (`bench`).

pub mod bench;
pub mod flops;
pub mod memory;
