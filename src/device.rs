//! Device selection: `"cpu"` (the default build), `"cuda"` / `"cuda:N"` (builds with
//! `--features cuda`).
//!
//! Commands take the device from the experiment's `device` key or from `--device`
//! ([`DeviceSpec::select`]) and run their generic code on the matching backend through
//! [`with_backend!`](crate::with_backend) (inference) or
//! [`with_autodiff_backend!`](crate::with_autodiff_backend) (training). A CUDA device is opened
//! with [`cuda_device`], which turns a missing driver or GPU into one error line instead of a
//! panic inside the CUDA runtime.

use std::fmt;
use std::str::FromStr;

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

    /// The device a command runs on: `flag` (`--device`) when given, else `configured` (the
    /// experiment's `device`). Errors name where the bad value came from.
    pub fn select(flag: Option<&str>, configured: &str) -> Result<Self> {
        match flag {
            Some(f) => Self::parse(f).map_err(|e| anyhow::anyhow!("--device: {e}")),
            None => Self::parse(configured).map_err(|e| anyhow::anyhow!("device: {e}")),
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The error for a CUDA request this build cannot serve.
pub fn cuda_unavailable<T>() -> Result<T> {
    bail!("CUDA was requested, but this rlprune was built without it (rebuild with `cargo build --release --features cuda`)")
}

/// burn's CUDA backend (f32, i32 indices) and its autodiff wrapper.
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda<f32, i32>;
#[cfg(feature = "cuda")]
pub type CudaAutodiff = burn::backend::Autodiff<Cuda>;

/// Opens CUDA device `index` and runs one tiny op on it. burn's CUDA runtime loads the driver at
/// run time and panics when it is missing (or when there is no such GPU); the panic is caught
/// here, silently, and returned as one error line.
#[cfg(feature = "cuda")]
pub fn cuda_device(index: usize) -> Result<burn::backend::cuda::CudaDevice> {
    use burn::tensor::Tensor;
    use std::panic::{catch_unwind, set_hook, take_hook, AssertUnwindSafe};

    let device = burn::backend::cuda::CudaDevice { index };
    let probe = || Tensor::<Cuda, 1>::from_floats([1.0, 2.0], &device).sum().into_scalar();
    let hook = take_hook();
    set_hook(Box::new(|_| {}));
    let result = catch_unwind(AssertUnwindSafe(probe));
    set_hook(hook);
    match result {
        Ok(v) if v == 3.0 => Ok(device),
        Ok(v) => bail!("cuda:{index}: the device answered 1 + 2 = {v}; the CUDA setup is broken"),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown failure");
            let first = msg.lines().find(|l| !l.trim().is_empty()).unwrap_or(msg).trim();
            bail!("cuda:{index} is not usable (no NVIDIA driver or no such GPU?): {first}")
        }
    }
}

/// Opens every CUDA device of `specs` (all must be CUDA).
#[cfg(feature = "cuda")]
pub fn cuda_devices(specs: &[DeviceSpec]) -> Result<Vec<burn::backend::cuda::CudaDevice>> {
    specs
        .iter()
        .map(|s| match s {
            DeviceSpec::Cuda(i) => cuda_device(*i),
            DeviceSpec::Cpu => bail!("cannot mix CPU and CUDA peers"),
        })
        .collect()
}

/// Runs `$body` with the type `$B` bound to the inference backend of `$spec` and `$device` to
/// its device; evaluates to the body's `anyhow::Result`. Without the `cuda` feature a CUDA spec
/// is an error (the body is not compiled for CUDA at all).
#[macro_export]
macro_rules! with_backend {
    ($spec:expr, |$B:ident, $device:ident| $body:expr) => {
        match $spec {
            $crate::device::DeviceSpec::Cpu => {
                #[allow(clippy::upper_case_acronyms, dead_code)]
                type $B = $crate::Cpu;
                let $device: burn::tensor::Device<$B> = Default::default();
                $body
            }
            $crate::device::DeviceSpec::Cuda(_index) => {
                #[cfg(feature = "cuda")]
                {
                    #[allow(clippy::upper_case_acronyms, dead_code)]
                    type $B = $crate::device::Cuda;
                    match $crate::device::cuda_device(_index) {
                        Ok($device) => $body,
                        Err(e) => Err(e),
                    }
                }
                #[cfg(not(feature = "cuda"))]
                {
                    $crate::device::cuda_unavailable()
                }
            }
        }
    };
}

/// Like [`with_backend!`](crate::with_backend), with `$B` the autodiff (training) backend.
#[macro_export]
macro_rules! with_autodiff_backend {
    ($spec:expr, |$B:ident, $device:ident| $body:expr) => {
        match $spec {
            $crate::device::DeviceSpec::Cpu => {
                #[allow(clippy::upper_case_acronyms, dead_code)]
                type $B = $crate::CpuAutodiff;
                let $device: burn::tensor::Device<$B> = Default::default();
                $body
            }
            $crate::device::DeviceSpec::Cuda(_index) => {
                #[cfg(feature = "cuda")]
                {
                    #[allow(clippy::upper_case_acronyms, dead_code)]
                    type $B = $crate::device::CudaAutodiff;
                    match $crate::device::cuda_device(_index) {
                        Ok($device) => $body,
                        Err(e) => Err(e),
                    }
                }
                #[cfg(not(feature = "cuda"))]
                {
                    $crate::device::cuda_unavailable()
                }
            }
        }
    };
}
