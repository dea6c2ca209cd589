//! What a model and a batch need in memory at least, from the model's analytic cost (nothing is
//! allocated), against what the machine has: a model or batch that cannot fit is refused with
//! one line instead of aborting inside an allocation.
//!
//! The estimate is a lower bound in f32:
//! - inference: the weights, plus per image the input and twice the largest layer output (a
//!   layer's input and output are alive together);
//! - training: the weights, their gradients and two optimizer moments, plus per image the input
//!   and every counted layer output (kept for the backward pass).
//!
//! Elementwise intermediates, workspaces and the allocator's slack come on top, so a refusal
//! is certain and an acceptance is not a promise.

use std::path::Path;

use anyhow::{bail, Result};

use super::flops::CostReport;

const F32: u64 = 4;

/// Inference or a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Inference,
    Training,
}

/// Bytes that `cost`'s model needs at least for `batch` images of `input_elems` values each.
pub fn needed_bytes(cost: &CostReport, input_elems: u64, batch: u64, workload: Workload) -> u64 {
    let weights = match workload {
        Workload::Inference => cost.params(),
        Workload::Training => cost.params().saturating_mul(4),
    };
    weights.saturating_mul(F32).saturating_add(batch.saturating_mul(per_image_bytes(cost, input_elems, workload)))
}

/// The part of [`needed_bytes`] that grows with each image of the batch.
fn per_image_bytes(cost: &CostReport, input_elems: u64, workload: Workload) -> u64 {
    let elems = match workload {
        Workload::Inference => input_elems.saturating_add(cost.largest_activation.saturating_mul(2)),
        Workload::Training => input_elems.saturating_add(cost.activations),
    };
    elems.saturating_mul(F32)
}

/// Memory this process may still use: `MemAvailable`, and the cgroup's limit when one is set
/// (containers). `None` where neither can be read.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib.saturating_mul(1024))
    });
    let cgroup = cgroup_headroom(Path::new("/sys/fs/cgroup"));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// cgroup v2: `memory.max - memory.current` when a limit is set.
fn cgroup_headroom(dir: &Path) -> Option<u64> {
    let max = std::fs::read_to_string(dir.join("memory.max")).ok()?.trim().parse::<u64>().ok()?;
    let current = std::fs::read_to_string(dir.join("memory.current")).ok()?.trim().parse::<u64>().ok()?;
    Some(max.saturating_sub(current))
}

/// Refuses `what` (e.g. "training small-cnn at batch 64") when it needs more than `available`.
pub fn ensure_fits(what: &str, cost: &CostReport, input_elems: u64, batch: u64, workload: Workload, available: Option<u64>) -> Result<()> {
    let Some(available) = available else { return Ok(()) };
    let needed = needed_bytes(cost, input_elems, batch, workload);
    if needed > available {
        bail!(
            "{what} needs at least {} ({} parameters, {} per image), more than the {} of memory available; use a smaller model or batch",
            human(needed),
            cost.params(),
            human(per_image_bytes(cost, input_elems, workload)),
            human(available)
        );
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv_net() -> CostReport {
        let mut c = CostReport::new(28);
        c.conv2d(1, 32, 3, 1, false, [28, 28]).conv2d(32, 64, 3, 1, false, [28, 28]).linear(64, 10, true, 1);
        c
    }

    #[test]
    fn training_counts_optimizer_state_and_every_output() {
        let c = conv_net();
        let params = (32 * 9 + 32 * 64 * 9 + 64 * 10 + 10) as u64;
        assert_eq!(c.params(), params);
        let per_image = 784 + (32 + 64) * 784 + 10;
        assert_eq!(needed_bytes(&c, 784, 3, Workload::Training), 4 * (4 * params + 3 * per_image));
        assert_eq!(needed_bytes(&c, 784, 3, Workload::Inference), 4 * (params + 3 * (784 + 2 * 64 * 784)));
    }

    #[test]
    fn a_batch_beyond_the_machine_is_refused_with_one_line() {
        let c = conv_net();
        assert!(ensure_fits("training", &c, 784, 64, Workload::Training, Some(1 << 30)).is_ok());
        let e = ensure_fits("training small-cnn at batch 1000000000", &c, 784, 1_000_000_000, Workload::Training, Some(1 << 30))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("training small-cnn at batch 1000000000 needs at least ") && e.contains("TiB") && e.contains("1.0 GiB"), "{e}");
        assert!(!e.contains('\n'));
        // Saturates instead of overflowing.
        assert_eq!(needed_bytes(&c, u64::MAX, u64::MAX, Workload::Training), u64::MAX);
        assert!(ensure_fits("x", &c, 784, u64::MAX, Workload::Inference, None).is_ok(), "nothing known, nothing refused");
    }
}
