//! The experiment TOML: schema, `include` presets, `--set` overrides, and validation whose
//! errors name the file, the line and the key (`experiments/x.toml:12: data.batch_size must be
//! > 0, got 0`).
//!
//! Loading keeps, for every key, where its value came from (file and line, or the `--set`
//! flag), so any error found later — by serde or by validation — can point at its source.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::train::TrainConfig;

/// A whole experiment, as resolved from its file, its includes and the `--set` overrides.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Run name: runs go to `<log.dir>/<name>/<timestamp>/`.
    pub name: String,
    /// Seed for initialisation, data order, augmentation and sampling.
    #[serde(default)]
    pub seed: u64,
    /// `"cpu"`, `"cuda"` or `"cuda:N"` (the latter need a build with `--features cuda`).
    #[serde(default = "default_device")]
    pub device: String,
    /// Data-parallel training: one peer per entry (`["cuda:0", "cuda:1"]`, or `["cpu", "cpu"]`
    /// to simulate peers on the CPU); each gets an equal shard of every batch and the gradients
    /// are averaged with burn-collective. Empty (the default): one device, `device`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    pub data: DataConfig,
    pub backbone: BackboneConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// `[controller]`: the pruning agent (RNP's `"channel-router"`); absent = plain training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<crate::controllers::ControllerConfig>,
    /// `[rl]`: how the controller is trained (defaults apply when `[controller]` is present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rl: Option<crate::rl::RlConfig>,
}

fn default_device() -> String {
    "cpu".into()
}

/// `[backbone]`: `arch` names a registered family's variant; every other key except `weights`
/// is an option of that family (checked by the family itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackboneConfig {
    pub arch: String,
    /// Initial weights (safetensors or PyTorch .pth) loaded by parameter name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<PathBuf>,
    /// Start the classifier fresh instead of loading it from `weights` (fine-tuning weights
    /// trained on other classes; DeiT's `main.py` and timm's `num_classes=` do the same).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset_head: bool,
    #[serde(flatten)]
    pub options: toml::Table,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Where run directories go.
    pub dir: PathBuf,
    /// Write TensorBoard event files.
    pub tensorboard: bool,
    /// Log training scalars every this many steps.
    pub every_steps: usize,
    /// Write weight histograms at the end of every epoch.
    pub histograms: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { dir: PathBuf::from("runs"), tensorboard: true, every_steps: 20, histograms: true }
    }
}

/// Where a key's value came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    File { path: PathBuf, line: usize },
    Override(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::Override(s) => write!(f, "--set {s}"),
        }
    }
}

/// A merged TOML table plus the origin of every key path (dotted).
#[derive(Debug, Clone)]
pub struct Layered {
    pub table: toml::Table,
    pub origins: BTreeMap<String, Origin>,
    pub file: PathBuf,
}

impl Layered {
    /// Best origin for `key`: the key itself, else its nearest ancestor, else the main file.
    pub fn origin_of(&self, key: &str) -> Origin {
        let mut k = key.to_string();
        loop {
            if let Some(o) = self.origins.get(&k) {
                return o.clone();
            }
            match k.rfind('.') {
                Some(i) => k.truncate(i),
                None => return Origin::File { path: self.file.clone(), line: 1 },
            }
        }
    }

    /// `file:line: key message`
    pub fn error_at(&self, key: &str, message: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: {key} {message}", self.origin_of(key))
    }
}

const MAX_INCLUDE_DEPTH: usize = 8;

/// Reads `path`, resolving `include = "preset.toml"` at any table level (relative to the
/// including file; keys of the including table win).
pub fn load_layered(path: &Path) -> Result<Layered> {
    let mut origins = BTreeMap::new();
    let table = load_file(path, "", &mut origins, 0)?;
    Ok(Layered { table, origins, file: path.to_path_buf() })
}

fn load_file(path: &Path, prefix: &str, origins: &mut BTreeMap<String, Origin>, depth: usize) -> Result<toml::Table> {
    if depth > MAX_INCLUDE_DEPTH {
        bail!("{}: includes nested deeper than {MAX_INCLUDE_DEPTH} (a cycle?)", path.display());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read experiment file", path.display()))?;
    let doc = toml_edit::Document::parse(text.as_str()).map_err(|e| {
        let line = e.span().map(|s| line_of(&text, s.start)).unwrap_or(1);
        anyhow!("{}:{line}: invalid TOML: {}", path.display(), e.message())
    })?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow!("{}: invalid TOML: {}", path.display(), e.message()))?;
    record_origins(doc.as_table(), &text, path, prefix, origins);
    resolve_includes(&mut table, path, prefix, origins, depth)?;
    Ok(table)
}

fn resolve_includes(
    table: &mut toml::Table,
    file: &Path,
    prefix: &str,
    origins: &mut BTreeMap<String, Origin>,
    depth: usize,
) -> Result<()> {
    for (k, v) in table.iter_mut() {
        if let toml::Value::Table(t) = v {
            resolve_includes(t, file, &join(prefix, k), origins, depth)?;
        }
    }
    if let Some(inc) = table.remove("include") {
        let key = join(prefix, "include");
        let Some(rel) = inc.as_str() else {
            let at = origins.get(&key).cloned().unwrap_or(Origin::File { path: file.into(), line: 1 });
            bail!("{at}: {key} must be a path string");
        };
        let inc_path = file.parent().unwrap_or(Path::new(".")).join(rel);
        if !inc_path.exists() {
            let at = origins.get(&key).cloned().unwrap_or(Origin::File { path: file.into(), line: 1 });
            bail!("{at}: {key}: included file {} does not exist", inc_path.display());
        }
        // The included keys lose to the including file's: record theirs only where absent.
        let mut inc_origins = BTreeMap::new();
        let base = load_file(&inc_path, prefix, &mut inc_origins, depth + 1)?;
        for (k, o) in inc_origins {
            origins.entry(k).or_insert(o);
        }
        let mine = std::mem::take(table);
        *table = base;
        merge(table, mine);
    }
    Ok(())
}

/// Deep-merges `top` over `base`.
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

fn record_origins(table: &toml_edit::Table, text: &str, file: &Path, prefix: &str, out: &mut BTreeMap<String, Origin>) {
    for (k, item) in table.iter() {
        let key = join(prefix, k);
        let span = table.key(k).and_then(|kk| kk.span()).or_else(|| item.span());
        if let Some(s) = span {
            out.insert(key.clone(), Origin::File { path: file.to_path_buf(), line: line_of(text, s.start) });
        }
        match item {
            toml_edit::Item::Table(t) => record_origins(t, text, file, &key, out),
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => record_inline(t, text, file, &key, out),
            _ => {}
        }
    }
}

fn record_inline(t: &toml_edit::InlineTable, text: &str, file: &Path, prefix: &str, out: &mut BTreeMap<String, Origin>) {
    for (k, v) in t.iter() {
        let key = join(prefix, k);
        if let Some(s) = t.key(k).and_then(|kk| kk.span()).or_else(|| v.span()) {
            out.insert(key.clone(), Origin::File { path: file.to_path_buf(), line: line_of(text, s.start) });
        }
        if let toml_edit::Value::InlineTable(inner) = v {
            record_inline(inner, text, file, &key, out);
        }
    }
}

/// Applies `a.b.c=value`: the value is parsed as TOML (`0.1`, `true`, `[1, 2]`, `"x"`), and
/// taken as a plain string if it does not parse.
pub fn apply_override(layered: &mut Layered, spec: &str) -> Result<()> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("--set {spec}: expected key=value, e.g. --set data.batch_size=64"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        bail!("--set {spec}: '{key}' is not a dotted key path");
    }
    let value = crate::backbones::spec::parse_override_value(raw.trim());
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = &mut layered.table;
    for (i, p) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = table.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("--set {spec}: '{}' is not a table", parts[..=i].join(".")),
        };
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    layered.origins.insert(key.to_string(), Origin::Override(spec.to_string()));
    Ok(())
}


/// Turns a merged table into a typed value, pointing errors at the key's origin.
pub fn deserialize<T: serde::de::DeserializeOwned>(layered: &Layered, table: toml::Table, prefix: &str) -> Result<T> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let mut path = join(prefix, &e.path().to_string());
        if path.ends_with(".?") || path == "?" {
            path = path.trim_end_matches(".?").trim_end_matches('?').to_string();
        }
        let msg = e.inner().message().to_string();
        // serde reports an unknown key at its parent: point at the key itself.
        if let Some(rest) = msg.strip_prefix("unknown field `")
            && let Some(name) = rest.split('`').next()
        {
                // Through an `Option` the path already ends with the unknown key itself.
                let key = if path.is_empty() || path == "." {
                    name.to_string()
                } else if path == name || path.ends_with(&format!(".{name}")) {
                    path.clone()
                } else {
                    join(&path, name)
                };
            return anyhow!("{}: unknown key '{key}' ({msg})", layered.origin_of(&key));
        }
        let shown = if path.is_empty() || path == "." { "(top level)".to_string() } else { path.clone() };
        // A typed choice's message is a predicate ("must be ..."), worded as validation's are.
        if msg.starts_with("must be ") {
            return anyhow!("{}: {shown} {msg}", layered.origin_of(&path));
        }
        anyhow!("{}: {shown}: {msg}", layered.origin_of(&path))
    })
}

/// Reads the `[rl]` keys that moved into `[rl.ppo]` / `[rl.dqn]` ([`crate::rl::MOVED_KEYS`])
/// at their new place, with a warning that gives the new spelling; errors keep pointing at the
/// line the value came from.
fn migrate_moved_keys(layered: &mut Layered) -> Result<()> {
    let Some(toml::Value::Table(rl)) = layered.table.get_mut("rl") else { return Ok(()) };
    let moved = crate::rl::migrate_keys(rl);
    let moved = moved.map_err(|m| anyhow!("{}: {m}", layered.origin_of("rl")))?;
    for (old, new) in moved {
        let origin = layered.origin_of(&old);
        tracing::warn!("{origin}: {old} is now {new}; read as such");
        layered.origins.insert(new, origin);
    }
    Ok(())
}

impl Experiment {
    /// Loads, merges includes, applies overrides, type-checks and validates every section. The
    /// `[controller]` keys of one method (its kind and its own options) are the method's to
    /// check, in the method registry above this layer, which loads and checks both.
    pub fn load(path: &Path, overrides: &[String]) -> Result<(Self, Layered)> {
        let mut layered = load_layered(path)?;
        for o in overrides {
            apply_override(&mut layered, o)?;
        }
        migrate_moved_keys(&mut layered)?;
        let exp: Experiment = deserialize(&layered, layered.table.clone(), "")?;
        exp.validate(&layered)?;
        Ok((exp, layered))
    }

    /// Checks values that types cannot express; the first problem becomes the error.
    pub fn validate(&self, layered: &Layered) -> Result<()> {
        let mut problems: Vec<(String, String)> = Vec::new();
        if self.name.trim().is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            problems.push(("name".into(), format!("must be a plain non-empty name, got '{}'", self.name)));
        }
        if let Err(e) = crate::device::DeviceSpec::parse(&self.device) {
            problems.push(("device".into(), e.to_string()));
        }
        match self.device_specs() {
            Err(e) if !self.devices.is_empty() => problems.push(("devices".into(), e.to_string())),
            Ok(specs) if specs.len() > 1 && !self.data.batch_size.is_multiple_of(specs.len()) => problems.push((
                "data.batch_size".into(),
                format!("must be a multiple of the number of devices ({}) for equal shards, got {}", specs.len(), self.data.batch_size),
            )),
            _ => {}
        }
        for (k, m) in self.data.validate() {
            problems.push((join("data", &k), m));
        }
        for (k, m) in self.train.validate() {
            problems.push((join("train", &k), m));
        }
        if let Some(c) = &self.controller {
            for (k, m) in c.validate() {
                problems.push((join("controller", &k), m));
            }
        }
        if let Some(rl) = &self.rl {
            if self.controller.is_none() {
                problems.push(("rl".into(), "needs a [controller] section (e.g. kind = \"channel-router\")".into()));
            }
            for (k, m) in rl.validate() {
                problems.push((join("rl", &k), m));
            }
        }
        if self.backbone.reset_head && self.backbone.weights.is_none() {
            problems.push(("backbone.reset_head".into(), "needs [backbone] weights (it starts their classifier fresh)".into()));
        }
        if self.log.every_steps == 0 {
            problems.push(("log.every_steps".into(), "must be > 0, got 0".into()));
        }
        if !crate::backbones::arch_names().contains(&self.backbone.arch.as_str()) {
            problems.push((
                "backbone.arch".into(),
                format!("'{}' is not a known backbone (known: {})", self.backbone.arch, crate::backbones::arch_names().join(", ")),
            ));
        }
        match problems.into_iter().next() {
            Some((k, m)) => Err(layered.error_at(&k, m)),
            None => Ok(()),
        }
    }

    /// The devices to train on: `devices` when given, else `[device]`. All entries must be of
    /// one kind (CPU or CUDA), CUDA indices distinct.
    pub fn device_specs(&self) -> Result<Vec<crate::device::DeviceSpec>> {
        use crate::device::DeviceSpec;
        if self.devices.is_empty() {
            return Ok(vec![DeviceSpec::parse(&self.device)?]);
        }
        let specs = self.devices.iter().map(|d| DeviceSpec::parse(d)).collect::<Result<Vec<_>>>()?;
        if specs.iter().any(|s| s.is_cuda() != specs[0].is_cuda()) {
            bail!("cannot mix CPU and CUDA peers, got {:?}", self.devices);
        }
        for (i, s) in specs.iter().enumerate() {
            if s.is_cuda() && specs[..i].contains(s) {
                bail!("{s} is listed twice");
            }
        }
        Ok(specs)
    }

    /// The experiment with `data.root` and `backbone.weights` resolved against `base`.
    pub fn with_absolute_paths(&self, base: &Path) -> Experiment {
        let mut e = self.clone();
        let absolute = |p: &mut std::path::PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = e.data.root.as_mut() {
            absolute(p);
        }
        if let Some(p) = e.backbone.weights.as_mut() {
            absolute(p);
        }
        e
    }

    /// The resolved configuration as TOML (written into every run directory). The `[data]`
    /// keys of other kinds of dataset (an image folder's split folders, the synthetic dataset's
    /// shape) are left out: they do not apply to this run.
    pub fn to_toml(&self) -> Result<String> {
        let mut table = toml::Table::try_from(self).context("serialising the resolved experiment")?;
        if let Some(data) = table.get_mut("data").and_then(|d| d.as_table_mut()) {
            for (kind, keys) in crate::data::config::KIND_ONLY_KEYS {
                if *kind != self.data.dataset {
                    keys.iter().for_each(|k| {
                        data.remove(*k);
                    });
                }
            }
        }
        toml::to_string_pretty(&table).context("serialising the resolved experiment")
    }
}

/// Resolves `eval`'s target: a run directory (its `config.toml`) or an experiment file.
pub fn experiment_of(target: &Path) -> anyhow::Result<std::path::PathBuf> {
    if target.is_dir() {
        let cfg = target.join("config.toml");
        if !cfg.is_file() {
            anyhow::bail!("{}: not a run directory (no config.toml)", target.display());
        }
        Ok(cfg)
    } else {
        Ok(target.to_path_buf())
    }
}
