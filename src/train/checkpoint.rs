//! Checkpoints: `checkpoints/{last,best}.safetensors` (model parameters under their reference
//! names), `last.optim.safetensors` (optimizer buffers), and `state.json` (epoch, step, RNG
//! derivation, best metric, optimizer step count). Every file is written atomically; `state.json`
//! is written last and names the epoch the tensor files must carry, so a crash between writes is
//! detected on resume instead of silently mixing epochs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::import::{read_safetensors, read_safetensors_metadata, write_safetensors};
use crate::nn::params::StateDict;

pub const FORMAT: &str = "rlprune-checkpoint-v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format: String,
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    pub best_metric: f64,
    pub best_epoch: usize,
    pub arch: String,
    pub optimizer: String,
    pub optimizer_steps: u64,
    pub rng: RngState,
}

/// Every random stream is a pure function of the experiment seed and the epoch, so the state
/// to restore is the seed and the epoch reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    /// How the per-epoch streams derive from the seed.
    pub scheme: String,
}

pub fn dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn meta(arch: &str, epoch: usize, kind: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("arch".to_string(), arch.to_string()),
        ("epoch".to_string(), epoch.to_string()),
        ("content".to_string(), kind.to_string()),
    ])
}

/// The first tensor holding a NaN or an infinity, with how many values in `dict` are not finite.
pub fn non_finite(dict: &StateDict) -> Option<(&str, usize)> {
    let mut first = None;
    let mut count = 0;
    for (k, t) in dict {
        let n = t.data.iter().filter(|v| !v.is_finite()).count();
        if n > 0 {
            first.get_or_insert(k.as_str());
            count += n;
        }
    }
    first.map(|k| (k, count))
}

/// Refuses tensors that are not all finite: a diverged run must never be saved as a result.
fn ensure_finite(dict: &StateDict, path: &Path) -> Result<()> {
    if let Some((key, n)) = non_finite(dict) {
        bail!(
            "{}: not written: {n} values are NaN or infinite (first in {key}); the training diverged, \
             the previous checkpoint is kept; lower the learning rate or set train.grad_clip",
            path.display()
        );
    }
    Ok(())
}

/// Writes one tensor file of a run (`content`: model, optimizer, router, ...) with the metadata
/// [`read_model`] checks, refusing non-finite values.
pub fn save_weights(path: &Path, dict: &StateDict, arch: &str, epoch: usize, content: &str) -> Result<()> {
    ensure_finite(dict, path)?;
    write_safetensors(path, dict, &meta(arch, epoch, content))
}

/// Writes `last` (model + optimizer + state.json), and `best` when `is_best`. Nothing is written
/// unless both model and optimizer state are finite.
pub fn save(run_dir: &Path, model: &StateDict, optim: &StateDict, state: &TrainState, is_best: bool) -> Result<()> {
    let d = dir(run_dir);
    ensure_finite(model, &d.join("last.safetensors"))?;
    ensure_finite(optim, &d.join("last.optim.safetensors"))?;
    std::fs::create_dir_all(&d).with_context(|| format!("{}: cannot create checkpoint directory", d.display()))?;
    save_weights(&d.join("last.safetensors"), model, &state.arch, state.epoch, "model")?;
    save_weights(&d.join("last.optim.safetensors"), optim, &state.arch, state.epoch, "optimizer")?;
    if is_best {
        save_weights(&d.join("best.safetensors"), model, &state.arch, state.epoch, "model")?;
    }
    let json = serde_json::to_vec_pretty(state)?;
    crate::fsutil::atomic_write(&d.join("state.json"), &json)
}

pub fn read_state(run_dir: &Path) -> Result<TrainState> {
    read_json(&dir(run_dir).join("state.json"), |st: &TrainState| &st.format)
}

/// A run-state JSON file (`state.json`, or a controller's own), refusing another format.
pub fn read_json<T: serde::de::DeserializeOwned>(p: &Path, format: impl Fn(&T) -> &str) -> Result<T> {
    let text = std::fs::read_to_string(p).with_context(|| format!("{}: cannot read checkpoint state", p.display()))?;
    let st: T = serde_json::from_str(&text).with_context(|| format!("{}: not a valid checkpoint state", p.display()))?;
    if format(&st) != FORMAT {
        bail!("{}: unsupported checkpoint format '{}' (expected '{FORMAT}')", p.display(), format(&st));
    }
    Ok(st)
}

/// Reads model weights written by [`save`], refusing a checkpoint of another architecture.
/// Plain safetensors without our metadata (e.g. converted reference weights) are accepted.
pub fn read_model(path: &Path, arch: &str, epoch: Option<usize>) -> Result<StateDict> {
    let meta = read_safetensors_metadata(path)?;
    if let Some(a) = meta.get("arch")
        && a != arch
    {
        bail!("{}: checkpoint is for architecture '{a}', but the experiment builds '{arch}'", path.display());
    }
    if let (Some(want), Some(got)) = (epoch, meta.get("epoch"))
        && got != &want.to_string()
    {
        bail!("{}: written at epoch {got} but state.json says epoch {want}: the run was interrupted while checkpointing; resume from the previous run or remove the checkpoint", path.display());
    }
    let dict = read_safetensors(path)?;
    if let Some((key, n)) = non_finite(&dict) {
        bail!("{}: {n} values are NaN or infinite (first in {key}): these weights diverged", path.display());
    }
    Ok(dict)
}
