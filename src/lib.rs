//! rlprune: input-adaptive pruning of vision networks.
//!
//! A backbone (`backbones`) runs on a batch of images; a controller (`controllers`) decides per
//! image which channels or tokens it may skip; the methods (`methods`) train and evaluate them
//! on a run session (`session`); `data` reads real datasets; `logging` writes TensorBoard event
//! files. docs/architecture.md draws the layers; see also the README and docs/.

/// A typed choice of a configuration key: one kebab-case name per variant, parsed once when the
/// configuration loads; any other name is refused with `invalid`'s message (which the loader
/// shows at the key's file and line).
macro_rules! choice {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? } invalid: |$s:ident| $msg:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        $vis enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from($s: String) -> Result<Self, String> {
                match $s.as_str() {
                    $($text => Ok(Self::$variant),)+
                    _ => Err($msg),
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::try_from(s.to_string())
            }
        }

        impl From<$name> for String {
            fn from(c: $name) -> String {
                c.as_str().to_string()
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

pub mod backbones;
pub mod bench;
pub mod cli;
pub mod controllers;
pub mod data;
pub mod device;
pub mod experiment;
pub mod fsutil;
pub mod import;
pub mod logging;
pub mod methods;
pub mod metrics;
pub mod nn;
pub mod rl;
pub mod session;
pub mod sweep;
pub mod train;
pub mod visualize;

/// Backends that run every op the models need: burn's ops plus our custom ones (the CPU
/// convolution, the global filter). A backend implements each op trait in one line, getting the
/// generic tensor-op implementations.
pub trait ModelBackend:
    nn::conv::ConvBackend
        + nn::global_filter::SpectralBackend
        + nn::batch_norm_op::NormBackend
        + nn::layer_norm_op::LayerNormBackend
        + nn::linear_op::LinearBackend
        + nn::activation_op::ActivationBackend
        + nn::attention_op::AttentionBackend
        + nn::channel_op::ChannelBackend
{
}
impl<B> ModelBackend for B where
    B: nn::conv::ConvBackend
        + nn::global_filter::SpectralBackend
        + nn::batch_norm_op::NormBackend
        + nn::layer_norm_op::LayerNormBackend
        + nn::linear_op::LinearBackend
        + nn::activation_op::ActivationBackend
        + nn::attention_op::AttentionBackend
        + nn::channel_op::ChannelBackend
{
}

/// A backend that trains: autodiff over a [`ModelBackend`], whose inner backend (what rollouts,
/// evaluation and snapshots run on) is a [`ModelBackend`] too.
pub trait TrainBackend: burn::tensor::backend::AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend {}
impl<B> TrainBackend for B where B: burn::tensor::backend::AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend {}

/// The default CPU backend and its autodiff wrapper.
pub type Cpu = burn::backend::NdArray<f32>;
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;

/// Whether this CPU has the instruction sets the binary was compiled for. The x86-64 build
/// targets x86-64-v3 (`.cargo/config.toml`); on an older CPU the first vectorised loop would
/// die of an illegal instruction, so the binary says so up front.
pub fn check_cpu_features() -> Result<(), String> {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    {
        // `is_x86_feature_detected!` answers `true` without asking the CPU when the feature is
        // enabled at compile time, so CPUID is read directly: leaf 1 ECX bit 12 is FMA, leaf 7
        // EBX bit 5 is AVX2.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is only read when leaf 0 says it exists.
        let (fma, avx2) = unsafe {
            use std::arch::x86_64::{__cpuid, __cpuid_count};
            let max_leaf = __cpuid(0).eax;
            (__cpuid(1).ecx & (1 << 12) != 0, max_leaf >= 7 && __cpuid_count(7, 0).ebx & (1 << 5) != 0)
        };
        if !(fma && avx2) {
            return Err("this build of rlprune needs a CPU with AVX2 and FMA (x86-64-v3); rebuild it for this CPU with \
                        RUSTFLAGS=\"-C target-cpu=x86-64\" cargo build --release"
                .into());
        }
    }
    Ok(())
}

/// Keeps freed memory in the process instead of handing it back to the kernel after each op.
///
/// glibc serves allocations above its mmap threshold with fresh pages and trims the heap after
/// large frees, so on the CPU backend every activation tensor (megabytes at batch 64) cost page
/// faults and kernel zeroing: about a tenth of `rlprune eval`'s CPU time in `perf`. Raising both
/// thresholds lets the allocator reuse that memory, the way deep-learning runtimes keep a
/// caching allocator. Called once at start-up by the binary and the benches; a no-op on other
/// platforms.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; it is called before any other
    // thread of ours exists, and both values are within glibc's documented ranges (the mmap
    // threshold's maximum is 32 MiB on 64-bit).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
