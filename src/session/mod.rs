//! The run session over an experiment: the run directory and its lock, resume, logs
//! (`metrics.jsonl`, TensorBoard, `config.toml`), the backbone built and loaded for the
//! experiment, and the supervised trainer. Methods run their phases on it.

pub mod run;
pub mod supervised;
