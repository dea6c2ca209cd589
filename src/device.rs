//! Device selection: `"cpu"` (the default build), `"cuda"` / `"cuda:N"` (builds with
//! `--features cuda`).

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<Self> {
        let spec = match s.trim() {
            "cpu" => DeviceSpec::Cpu,
            "cuda" => DeviceSpec::Cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => DeviceSpec::Cuda(n),
                _ => bail!("must be \"cpu\", \"cuda\" or \"cuda:N\", got \"{s}\""),
            },
        };
        if let DeviceSpec::Cuda(_) = spec
            && !cfg!(feature = "cuda")
        {
            bail!("\"{s}\" needs CUDA, but this rlprune was built without it (rebuild with `cargo build --release --features cuda`)");
        }
        Ok(spec)
    }
}

/// The error for a CUDA request this build or machine cannot serve.
pub fn cuda_unavailable<T>() -> Result<T> {
    bail!("CUDA was requested, but this rlprune was built without it (rebuild with `cargo build --release --features cuda`)")
}
