//! Measured throughput and latency (`rlprune bench`).
//!
//! A benchmark runs one *step* repeatedly on a fixed random batch: a forward pass without
//! autodiff (inference), or a full training step on the autodiff backend (forward,
//! cross-entropy, backward, and an update by the project's own [`Optimizer`]). `warmup` steps
//! run first and are not timed (first-use allocations, thread-pool start-up); then each of
//! `repeats` steps is timed on its own, and the report gives the median with min/max and
//! p10/p90 of the per-batch latency and of the images per second it implies.
//!
//! The timing loop ([`time_steps`]) takes any closure, so other models or devices reuse it:
//! [`bench_inference`] and [`bench_train_step`] are generic over the backend and the backbone.
//!
//! Threads: every CPU kernel splits its work over at most
//! [`compute_threads`](crate::nn::pool::compute_threads) threads, which [`limit_threads`] sets.
//! burn-ndarray is built without its `multi-threads` feature, so it has no thread pool of its own.
//!
//! Peak memory is the process's `VmHWM` from `/proc/self/status`: the high-water mark of the
//! resident set of the whole process (model construction included), not of the timed steps
//! alone; `None` where `/proc` is unavailable.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use serde::Serialize;

use crate::ModelBackend;
use crate::backbones::zoo::{ZooSpec, zoo_entry};
use crate::backbones::{AnyBackbone, Backbone, BuildContext, ModelSpec, build, model_from_toml};
use crate::device::DeviceSpec;
use crate::metrics::flops::CostReport;
use crate::metrics::memory::{self, Workload};
use crate::train::losses::cross_entropy;
use crate::train::optim::{Optimizer, OptimizerConfig};


/// What to measure and how.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    /// Images per step.
    pub batch: usize,
    /// Thread limit; `None` keeps the libraries' defaults (the number of cores).
    pub threads: Option<usize>,
    /// Time a full training step instead of an inference forward pass.
    pub train: bool,
    /// Untimed steps before the timed ones.
    pub warmup: usize,
    /// Timed steps.
    pub repeats: usize,
    /// Input side (default: the model's own size; 224 for fully convolutional models).
    pub img_size: Option<usize>,
    /// Classes of the head (default: the model's own).
    pub num_classes: Option<usize>,
    /// Input channels (default: the model's own).
    pub in_chans: Option<usize>,
    /// Where to run. Only the CPU is implemented.
    pub device: DeviceSpec,
    /// The optimizer of the training step.
    pub optimizer: OptimizerConfig,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            batch: 8,
            threads: None,
            train: false,
            warmup: 2,
            repeats: 10,
            img_size: None,
            num_classes: None,
            in_chans: None,
            device: DeviceSpec::Cpu,
            optimizer: OptimizerConfig::default(),
        }
    }
}

impl BenchOptions {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.batch >= 1, "--batch must be at least 1");
        ensure!(self.repeats >= 1, "--repeats must be at least 1");
        ensure!(self.threads != Some(0), "--threads must be at least 1");
        ensure!(self.img_size != Some(0), "--img-size must be at least 1");
        ensure!(self.num_classes != Some(0), "--num-classes must be at least 1");
        ensure!(self.in_chans != Some(0), "--in-chans must be at least 1");
        Ok(())
    }

    pub fn mode(&self) -> &'static str {
        if self.train { "train" } else { "infer" }
    }
}

/// Median, extremes and the 10th/90th percentiles of a sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p10: f64,
    pub p90: f64,
}

impl Stats {
    /// Percentiles by linear interpolation between order statistics (NumPy's default).
    pub fn of(samples: &[f64]) -> Self {
        assert!(!samples.is_empty(), "statistics of an empty sample");
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let q = |p: f64| {
            let pos = p * (s.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
        };
        Self {
            median: q(0.5),
            min: s[0],
            max: s[s.len() - 1],
            p10: q(0.1),
            p90: q(0.9),
        }
    }
}

/// Runs `step` `warmup` times untimed, then `repeats` times, and returns each timed step's
/// wall-clock seconds. `step` must finish its work before returning (read a result back or
/// sync the device), or the time of asynchronous backends would be missed.
pub fn time_steps(warmup: usize, repeats: usize, mut step: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        step()?;
    }
    let mut seconds = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        step()?;
        seconds.push(t.elapsed().as_secs_f64());
    }
    Ok(seconds)
}

/// Waits until `device` has finished queued work (a no-op on the CPU backend, which is eager).
fn sync<B: Backend>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))
}

/// A random normal batch `[n, c, h, w]` and labels `0, 1, ..` modulo `classes`.
fn random_batch<B: Backend>(
    shape: [usize; 4],
    classes: usize,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let x = Tensor::random(shape, Distribution::Normal(0.0, 1.0), device);
    let labels: Vec<i64> = (0..shape[0]).map(|i| (i % classes) as i64).collect();
    let y = Tensor::from_data(TensorData::new(labels, [shape[0]]), device);
    (x, y)
}

/// Per-step seconds of `model.forward` on a random `shape` batch, without autodiff.
pub fn bench_inference<B: ModelBackend, M: Backbone<B>>(
    model: &M,
    shape: [usize; 4],
    warmup: usize,
    repeats: usize,
    device: &B::Device,
) -> Result<Vec<f64>> {
    let (x, _) = random_batch::<B>(shape, 1, device);
    time_steps(warmup, repeats, || {
        let logits = model.forward(x.clone());
        ensure!(
            logits.dims()[0] == shape[0],
            "the model returned {:?} logits for a batch of {}",
            logits.dims(),
            shape[0]
        );
        sync::<B>(device)
    })
}

/// Per-step seconds of a training step (forward, cross-entropy against fixed labels,
/// backward, one `optimizer` update at its configured learning rate) on a random `shape`
/// batch. Returns the trained model too, so callers can check it changed.
pub fn bench_train_step<B, M>(
    model: M,
    shape: [usize; 4],
    classes: usize,
    optimizer: &OptimizerConfig,
    warmup: usize,
    repeats: usize,
    device: &B::Device,
) -> Result<(Vec<f64>, M)>
where
    B: AutodiffBackend + ModelBackend,
    M: Backbone<B> + AutodiffModule<B>,
{
    let (x, y) = random_batch::<B>(shape, classes, device);
    let mut optim = Optimizer::<B>::new(optimizer.clone());
    let lr = optimizer.lr();
    let mut slot = Some(model);
    let seconds = time_steps(warmup, repeats, || {
        let model = slot.take().expect("the model is put back after every step");
        let loss = cross_entropy(model.forward(x.clone()), y.clone(), 0.0);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        slot = Some(optim.step(model, grads, lr, 1.0));
        sync::<B>(device)
    })?;
    Ok((seconds, slot.expect("the model is put back after every step")))
}

/// A model to benchmark: a zoo name or a model TOML, with the input it is built for.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchModel {
    /// The zoo name or the file's path, as given.
    pub name: String,
    pub kind: BenchModelKind,
    /// Classes, input channels and image size of the benchmark batch.
    pub ctx: BuildContext,
}

#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // built once
pub enum BenchModelKind {
    /// A reference model (GFNet, HorNet, DeiT, ...) from its constructor arguments.
    Reference(ModelSpec),
    /// A registry backbone built for a dataset shape (the CNN baselines).
    Registry { arch: String },
}

impl BenchModel {
    /// Resolves `target` (a model TOML file, else a zoo name) and applies the size overrides.
    pub fn resolve(target: &str, img_size: Option<usize>, num_classes: Option<usize>, in_chans: Option<usize>) -> Result<Self> {
        let path = Path::new(target);
        let (spec, default_img) = if path.is_file() {
            let spec = model_from_toml(path)?;
            let img = spec.img_size().unwrap_or(224);
            (ZooSpec::Model(spec), img)
        } else if target.ends_with(".toml") {
            bail!("{target}: no such model file");
        } else {
            let entry = zoo_entry(target)?;
            (entry.spec, entry.img_size)
        };
        let img = img_size.unwrap_or(default_img);
        match spec {
            ZooSpec::Model(spec) => {
                let mut table = spec.to_table();
                if let Some(c) = num_classes {
                    table.insert("num_classes".into(), toml::Value::Integer(c as i64));
                }
                if let Some(c) = in_chans {
                    table.insert("in_chans".into(), toml::Value::Integer(c as i64));
                }
                // Models built for one input size (GFNet, DeiT) carry it as an argument.
                if spec.img_size().is_some() {
                    table.insert("img_size".into(), toml::Value::Integer(img as i64));
                }
                let spec = ModelSpec::from_table(&table).with_context(|| format!("{target} at {img}×{img}"))?;
                let in_channels = match table.get("in_chans") {
                    Some(toml::Value::Integer(c)) => *c as usize,
                    _ => 3,
                };
                let ctx = BuildContext {
                    num_classes: spec.num_classes(),
                    in_channels,
                    img_size: [img, img],
                };
                Ok(Self {
                    name: target.to_string(),
                    kind: BenchModelKind::Reference(spec),
                    ctx,
                })
            }
            ZooSpec::Cnn { arch, ctx } => {
                let ctx = BuildContext {
                    num_classes: num_classes.unwrap_or(ctx.num_classes),
                    in_channels: in_chans.unwrap_or(ctx.in_channels),
                    img_size: [img, img],
                };
                Ok(Self {
                    name: target.to_string(),
                    kind: BenchModelKind::Registry { arch: arch.to_string() },
                    ctx,
                })
            }
        }
    }

    /// The model's analytic cost per image (nothing is allocated).
    pub fn cost(&self) -> Result<CostReport> {
        match &self.kind {
            BenchModelKind::Reference(spec) => Ok(spec.cost(self.ctx.img_size[0])),
            BenchModelKind::Registry { arch } => crate::backbones::cost(arch, &toml::Table::new(), &self.ctx),
        }
    }

    /// Builds the model, freshly initialised, on `device`.
    pub fn build<B: ModelBackend>(&self, device: &B::Device) -> Result<AnyBackbone<B>> {
        match &self.kind {
            BenchModelKind::Reference(spec) => spec.build(device),
            BenchModelKind::Registry { arch } => build(arch, &toml::Table::new(), &self.ctx, device),
        }
    }

    /// The batch shape `[batch, C, H, W]`.
    pub fn input_shape(&self, batch: usize) -> [usize; 4] {
        [batch, self.ctx.in_channels, self.ctx.img_size[0], self.ctx.img_size[1]]
    }
}

/// One benchmark's result; `--json` prints it as one flat JSON object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    pub model: String,
    /// `"rlprune"`; the PyTorch script writes `"pytorch"`, so the two lines can be told apart.
    pub framework: &'static str,
    pub device: String,
    /// `"infer"` or `"train"`.
    pub mode: &'static str,
    pub batch: usize,
    /// The thread limit in force: `--threads`, else the number of cores the libraries use.
    pub threads: usize,
    pub img_size: usize,
    pub in_chans: usize,
    pub num_classes: usize,
    /// Learnable parameters (BatchNorm's running statistics not counted, as in PyTorch).
    pub params: usize,
    pub warmup: usize,
    pub repeats: usize,
    /// Median images per second, and its spread.
    pub images_per_s: f64,
    pub images_per_s_min: f64,
    pub images_per_s_max: f64,
    pub images_per_s_p10: f64,
    pub images_per_s_p90: f64,
    /// Median milliseconds per batch, and its spread.
    pub latency_ms: f64,
    pub latency_ms_min: f64,
    pub latency_ms_max: f64,
    pub latency_ms_p10: f64,
    pub latency_ms_p90: f64,
    /// Peak resident set of the whole process (VmHWM), MiB.
    pub peak_rss_mb: Option<f64>,
}

impl BenchReport {
    /// A report from per-step seconds.
    pub fn from_seconds(model: &BenchModel, opts: &BenchOptions, params: usize, seconds: &[f64]) -> Self {
        let latency = Stats::of(&seconds.iter().map(|s| 1e3 * s).collect::<Vec<_>>());
        let throughput = Stats::of(&seconds.iter().map(|s| opts.batch as f64 / s).collect::<Vec<_>>());
        Self {
            model: model.name.clone(),
            framework: "rlprune",
            device: device_name(opts.device),
            mode: opts.mode(),
            batch: opts.batch,
            threads: opts.threads.unwrap_or_else(default_threads),
            img_size: model.ctx.img_size[0],
            in_chans: model.ctx.in_channels,
            num_classes: model.ctx.num_classes,
            params,
            warmup: opts.warmup,
            repeats: opts.repeats,
            images_per_s: throughput.median,
            images_per_s_min: throughput.min,
            images_per_s_max: throughput.max,
            images_per_s_p10: throughput.p10,
            images_per_s_p90: throughput.p90,
            latency_ms: latency.median,
            latency_ms_min: latency.min,
            latency_ms_max: latency.max,
            latency_ms_p10: latency.p10,
            latency_ms_p90: latency.p90,
            peak_rss_mb: peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        }
    }

    /// A short table for people.
    pub fn table(&self) -> String {
        let rss = self
            .peak_rss_mb
            .map_or("n/a".to_string(), |m| format!("{m:.0} MiB (process peak, VmHWM)"));
        format!(
            "{model} ({params} params), {mode} on {device}, batch {batch} at {img}×{img}, {threads} threads, \
             {warmup} warm-up + {repeats} timed steps\n\
             {:<12} {:>10} {:>10} {:>10} {:>10} {:>10}\n\
             {:<12} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}\n\
             {:<12} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}\n\
             peak RSS     {rss}\n",
            "",
            "median",
            "min",
            "p10",
            "p90",
            "max",
            "images/s",
            self.images_per_s,
            self.images_per_s_min,
            self.images_per_s_p10,
            self.images_per_s_p90,
            self.images_per_s_max,
            "ms/batch",
            self.latency_ms,
            self.latency_ms_min,
            self.latency_ms_p10,
            self.latency_ms_p90,
            self.latency_ms_max,
            model = self.model,
            params = self.params,
            mode = self.mode,
            device = self.device,
            batch = self.batch,
            img = self.img_size,
            threads = self.threads,
            warmup = self.warmup,
            repeats = self.repeats,
        )
    }
}

fn device_name(d: DeviceSpec) -> String {
    match d {
        DeviceSpec::Cpu => "cpu".into(),
        DeviceSpec::Cuda(n) => format!("cuda:{n}"),
    }
}

/// The cores the thread pools use when no limit is set.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Benchmarks `target` (a model TOML or a zoo name) as `opts` says, on `opts.device`.
/// Call [`limit_threads`] first (before any computation in the process) to limit CPU threads.
pub fn bench(target: &str, opts: &BenchOptions) -> Result<BenchReport> {
    opts.validate()?;
    let model = BenchModel::resolve(target, opts.img_size, opts.num_classes, opts.in_chans)?;
    let shape = model.input_shape(opts.batch);
    let workload = if opts.train { Workload::Training } else { Workload::Inference };
    let input: u64 = shape[1..].iter().map(|&d| d as u64).product();
    memory::ensure_fits(
        &format!("{} of {target} at batch {}", if opts.train { "training" } else { "inference" }, opts.batch),
        &model.cost()?,
        input,
        opts.batch as u64,
        workload,
        memory::available_bytes(),
    )?;
    let (seconds, params) = if opts.train {
        crate::with_autodiff_backend!(opts.device, |B, device| {
            let m: AnyBackbone<B> = model.build(&device)?;
            let params = crate::nn::params::trainable_param_count(&m);
            let (s, _) = bench_train_step(
                m,
                shape,
                model.ctx.num_classes,
                &opts.optimizer,
                opts.warmup,
                opts.repeats,
                &device,
            )?;
            Ok::<_, anyhow::Error>((s, params))
        })?
    } else {
        crate::with_backend!(opts.device, |B, device| {
            let m: AnyBackbone<B> = model.build(&device)?;
            let params = crate::nn::params::trainable_param_count(&m);
            Ok::<_, anyhow::Error>((bench_inference(&m, shape, opts.warmup, opts.repeats, &device)?, params))
        })?
    };
    Ok(BenchReport::from_seconds(&model, opts, params, &seconds))
}

/// Limits the CPU backend to `threads` threads ([`crate::nn::pool::limit_compute_threads`]); it
/// must run before the process computes anything (the CLI calls it first thing).
pub fn limit_threads(threads: usize) -> Result<()> {
    ensure!(threads >= 1, "the thread limit must be at least 1");
    crate::nn::pool::limit_compute_threads(threads);
    Ok(())
}

/// The process's peak resident set (`VmHWM` in `/proc/self/status`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut parts = line["VmHWM:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_interpolate_like_numpy() {
        // numpy.percentile([4, 1, 3, 2, 10], [10, 50, 90]) = [1.4, 3.0, 7.6]
        let s = Stats::of(&[4.0, 1.0, 3.0, 2.0, 10.0]);
        assert_eq!((s.min, s.max, s.median), (1.0, 10.0, 3.0));
        assert!((s.p10 - 1.4).abs() < 1e-12 && (s.p90 - 7.6).abs() < 1e-12, "{s:?}");
        let one = Stats::of(&[2.5]);
        assert_eq!((one.median, one.p10, one.p90), (2.5, 2.5, 2.5));
    }

    #[test]
    fn vm_hwm_is_read_in_bytes() {
        let status = "Name:\trlprune\nVmPeak:\t  900 kB\nVmHWM:\t   1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(1234 * 1024));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
        assert!(peak_rss_bytes().is_none_or(|b| b > 0));
    }

    #[test]
    fn time_steps_runs_warmup_untimed() {
        let mut calls = 0;
        let s = time_steps(3, 4, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((calls, s.len()), (7, 4));
        assert!(time_steps(0, 2, || bail!("boom")).is_err());
    }

    #[test]
    fn overrides_reach_the_model() {
        let m = BenchModel::resolve("gfnet-ti", Some(64), Some(7), None).unwrap();
        assert_eq!(
            m.ctx,
            BuildContext {
                num_classes: 7,
                in_channels: 3,
                img_size: [64, 64]
            }
        );
        let BenchModelKind::Reference(spec) = &m.kind else {
            panic!("gfnet-ti is a reference model")
        };
        assert_eq!((spec.img_size(), spec.num_classes()), (Some(64), 7));
        let cnn = BenchModel::resolve("vgg16-cifar", None, None, None).unwrap();
        assert_eq!(cnn.input_shape(5), [5, 3, 32, 32]);
        let small = BenchModel::resolve("small-cnn", None, None, None).unwrap();
        assert_eq!(small.input_shape(64), [64, 1, 28, 28]);
        let rgb = BenchModel::resolve("small-cnn", Some(32), Some(100), Some(3)).unwrap();
        assert_eq!((rgb.input_shape(2), rgb.ctx.num_classes), ([2, 3, 32, 32], 100));
        let resnet = BenchModel::resolve("resnet20-cifar", None, None, None).unwrap();
        assert_eq!(resnet.input_shape(1), [1, 3, 32, 32]);
        assert!(BenchModel::resolve("no-such-model", None, None, None).is_err());
        assert!(BenchModel::resolve("missing.toml", None, None, None).is_err());
    }

    #[test]
    fn a_train_step_changes_the_weights() {
        let spec = ModelSpec::from_toml_str(
            "[model]\nfamily = \"gfnet\"\nimg_size = 8\npatch_size = 4\nembed_dim = 8\ndepth = 1\nnum_classes = 3\n",
        )
        .unwrap();
        let device = Default::default();
        let m: AnyBackbone<crate::CpuAutodiff> = spec.build(&device).unwrap();
        let before = crate::nn::params::state_dict(&m.valid());
        let opt = OptimizerConfig::Sgd {
            lr: 0.1,
            momentum: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        };
        let (s, m) = bench_train_step(m, [2, 3, 8, 8], 3, &opt, 1, 2, &device).unwrap();
        assert_eq!(s.len(), 2);
        let after = crate::nn::params::state_dict(&m.valid());
        assert!(
            before.iter().any(|(k, v)| after[k].data != v.data),
            "three SGD steps left every weight unchanged"
        );
    }
}
