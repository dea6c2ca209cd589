//! Compute accounting: analytic parameter counts and multiply-accumulates (`flops`).

pub mod flops;
