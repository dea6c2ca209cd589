//! `rlprune sweep`: one controller experiment at several values of one key (typically
//! `rl.compute_penalty`), optionally a static baseline, evaluated alike and drawn on one
//! accuracy–compute plot.
//!
//! The backbone is trained once. The first value's run trains it (phase 1 into
//! `<run>/backbone/`) unless the experiment gives `[backbone] weights`; every later value, and
//! the static baseline, start from those same weights via `backbone.weights`. All points thus
//! share one backbone, and the sweep costs one backbone training plus the controller phases.
//!
//! Writes into the sweep directory: one run directory per value (`<key>=<value>/`), `static/`,
//! `sweep.csv`, `sweep.json` (the eval reports) and `sweep.png`.
//!
//! Given a trained run instead of an experiment, the sweep trains nothing: it evaluates the run
//! at each value ([`run_eval_sweep`]), for settings that need no training (ToMe's `r`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde_json::Value;

use crate::session::run::new_run_dir;
use crate::session::supervised::TrainOptions;

/// Width and height of `sweep.png`.
pub const PLOT_SIZE: (u32, u32) = (1200, 500);

/// What `rlprune sweep` was asked for.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    pub experiment: PathBuf,
    /// `--set` flags; exactly one has a comma-separated list of values.
    pub sets: Vec<String>,
    pub static_experiment: Option<PathBuf>,
    /// `--static-set` overrides for the static experiment only.
    pub static_sets: Vec<String>,
    /// Seeds (`seed = S`) each point is trained with; empty = the experiment's own seed. With
    /// several, the plot shows each point's mean with the seeds' spread as error bars.
    pub seeds: Vec<u64>,
    pub out: Option<PathBuf>,
    pub base_dir: PathBuf,
}

/// What a row of a sweep measured, resolved once when the row is made; the CSV files name it
/// by [`SweepMethod::name`] and the plot draws and labels each kind its own way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SweepMethod {
    /// The network as trained, every channel and token kept (the reference).
    Unpruned,
    /// The swept channel router.
    Rnp,
    /// Static L1 pruning, the baseline of an RNP sweep.
    StaticL1,
    /// A training-free reduction swept over one of its settings, named as its evaluation
    /// report names it (`tome`, `evit`, or the controller kind).
    Reduction(String),
}

impl SweepMethod {
    /// The name in `sweep.csv` and `sweep_summary.csv`.
    pub fn name(&self) -> &str {
        match self {
            Self::Unpruned => "unpruned",
            Self::Rnp => "rnp",
            Self::StaticL1 => "static",
            Self::Reduction(name) => name,
        }
    }

    /// The plot's legend entry for a curve over `key`.
    fn label(&self, key: &str) -> String {
        match self {
            Self::Unpruned => "unpruned".into(),
            Self::Rnp => format!("RNP ({key})"),
            Self::StaticL1 => "static L1".into(),
            Self::Reduction(name) => format!("{name} ({key})"),
        }
    }
}

impl std::fmt::Display for SweepMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One point of the trade-off.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRow {
    pub method: SweepMethod,
    /// The swept value (empty for the reference rows).
    pub value: String,
    pub top1: f64,
    pub flops_ratio: f64,
    pub latency_b1_ms: f64,
    pub latency_b64_ms: f64,
    pub throughput_b64: f64,
    /// The run's seed when the sweep has several.
    pub seed: Option<u64>,
}

/// The runs of one (method, value) over the seeds: means and sample standard deviations.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    pub method: SweepMethod,
    pub value: String,
    pub runs: usize,
    pub top1: f64,
    pub top1_std: f64,
    pub flops_ratio: f64,
    pub flops_ratio_std: f64,
    pub latency_b64_ms: f64,
    pub latency_b64_ms_std: f64,
    pub latency_b1_ms: f64,
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n.max(1.0);
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// Groups `rows` by (method, value) in their order of first appearance.
pub fn summarize(rows: &[SweepRow]) -> Vec<SweepPoint> {
    let mut keys: Vec<(&SweepMethod, &str)> = Vec::new();
    for r in rows {
        if !keys.contains(&(&r.method, r.value.as_str())) {
            keys.push((&r.method, &r.value));
        }
    }
    keys.into_iter()
        .map(|(m, v)| {
            let group: Vec<&SweepRow> = rows.iter().filter(|r| &r.method == m && r.value == v).collect();
            let col = |f: fn(&SweepRow) -> f64| group.iter().map(|r| f(r)).collect::<Vec<f64>>();
            let (top1, top1_std) = mean_std(&col(|r| r.top1));
            let (flops_ratio, flops_ratio_std) = mean_std(&col(|r| r.flops_ratio));
            let (latency_b64_ms, latency_b64_ms_std) = mean_std(&col(|r| r.latency_b64_ms));
            let (latency_b1_ms, _) = mean_std(&col(|r| r.latency_b1_ms));
            SweepPoint {
                method: m.clone(),
                value: v.into(),
                runs: group.len(),
                top1,
                top1_std,
                flops_ratio,
                flops_ratio_std,
                latency_b64_ms,
                latency_b64_ms_std,
                latency_b1_ms,
            }
        })
        .collect()
}

/// Splits the `--set` flags into the swept key with its values and the fixed overrides. A
/// value that is a TOML array, inline table or string (`[`, `{`, `"`) is never split.
pub fn split_sets(sets: &[String]) -> Result<(String, Vec<String>, Vec<String>)> {
    let mut swept: Option<(String, Vec<String>)> = None;
    let mut fixed = Vec::new();
    for s in sets {
        let (k, v) = s.split_once('=').ok_or_else(|| anyhow::anyhow!("--set {s}: expected key=value"))?;
        if !lists_values(v) {
            fixed.push(s.clone());
            continue;
        }
        if let Some((k0, _)) = &swept {
            bail!("sweep: only one --set may list several values ('{k0}' and '{}' both do)", k.trim());
        }
        let values: Vec<String> = v.split(',').map(|x| x.trim().to_string()).collect();
        if values.iter().any(|x| x.is_empty()) {
            bail!("--set {s}: empty value in the list");
        }
        swept = Some((k.trim().to_string(), values));
    }
    let (key, values) = swept.ok_or_else(|| {
        anyhow::anyhow!(
            "sweep needs one --set with several comma-separated values, e.g. --set rl.compute_penalty=0.02,0.05,0.1"
        )
    })?;
    Ok((key, values, fixed))
}

fn ms(report: &Value, b: usize, k: &str) -> f64 {
    report["latency"][format!("batch{b}")][k].as_f64().unwrap_or(f64::NAN)
}

fn row_of(method: SweepMethod, value: &str, seed: Option<u64>, report: &Value) -> SweepRow {
    SweepRow {
        seed,
        method,
        value: value.into(),
        top1: report["top1"].as_f64().unwrap_or(f64::NAN),
        flops_ratio: report["flops_ratio"].as_f64().unwrap_or(f64::NAN),
        latency_b1_ms: ms(report, 1, "pruned_ms"),
        latency_b64_ms: ms(report, 64, "pruned_ms"),
        throughput_b64: ms(report, 64, "pruned_images_per_s"),
    }
}

fn train_and_eval(exp_path: &Path, sets: &[String], run_dir: &Path, base: &Path) -> Result<Value> {
    let (exp, layered) = crate::methods::load(exp_path, sets)?;
    if exp.controller.is_none() {
        bail!("{}: sweep needs an experiment with a [controller] section", exp_path.display());
    }
    let opts =
        TrainOptions { out: Some(run_dir.to_path_buf()), resume: None, stop_after_epoch: None, base_dir: base.into() };
    let summary = crate::methods::train(&exp, &layered, &opts)?;
    if summary.interrupted {
        bail!("interrupted during {}", run_dir.display());
    }
    crate::methods::eval_target(run_dir, None, &[], base)
}

/// Whether a `--set` value lists several values: comma-separated, and not a TOML array, inline
/// table or string (`[`, `{`, `"`), which are never split.
fn lists_values(v: &str) -> bool {
    let v = v.trim();
    !v.starts_with(['[', '{', '"', '\'']) && v.contains(',')
}

/// A swept key with its values, and the fixed overrides.
type SweptSets = (String, Vec<String>, Vec<String>);

/// The static baseline's overrides: at most one `--static-set` may list several values (a
/// curve of static points), else the baseline is one point.
fn split_static_sets(sets: &[String]) -> Result<Option<SweptSets>> {
    if !sets.iter().any(|s| s.split_once('=').is_some_and(|(_, v)| lists_values(v))) {
        return Ok(None);
    }
    split_sets(sets).map(Some)
}

/// `seed=S` for each of `seeds` (one `None` when the sweep has none: the experiment's seed),
/// and the run directory below `dir` for it.
fn seeded(dir: PathBuf, seeds: &[u64]) -> Vec<(Option<u64>, Vec<String>, PathBuf)> {
    match seeds {
        [] => vec![(None, Vec::new(), dir)],
        [s] => vec![(Some(*s), vec![format!("seed={s}")], dir)],
        _ => seeds.iter().map(|s| (Some(*s), vec![format!("seed={s}")], dir.join(format!("seed={s}")))).collect(),
    }
}

/// Runs the sweep; returns its directory.
pub fn run_sweep(opts: &SweepOptions) -> Result<PathBuf> {
    let base = &opts.base_dir;
    if base.join(&opts.experiment).is_dir() {
        return run_eval_sweep(opts);
    }
    let (key, values, fixed) = split_sets(&opts.sets)?;
    if let Some(s) = opts.seeds.iter().enumerate().find(|(i, s)| opts.seeds[..*i].contains(s)) {
        bail!("sweep: seed {} is listed twice", s.1);
    }
    let static_sweep = split_static_sets(&opts.static_sets)?;
    // Check every value's configuration before the long runs start.
    let mut first = None;
    for v in &values {
        let mut sets = fixed.clone();
        sets.push(format!("{key}={v}"));
        let (exp, _) = crate::methods::load(&opts.experiment, &sets)?;
        first.get_or_insert(exp);
    }
    let first = first.ok_or_else(|| anyhow::anyhow!("sweep: no values"))?;
    let out = sweep_dir(opts, &first)?;
    let mut shared_weights: Option<PathBuf> = first.backbone.weights.as_ref().map(|w| base.join(w));
    let mut reports = Vec::new();
    let mut rows = Vec::new();
    for v in &values {
        for (seed, seed_set, run_dir) in seeded(out.join(format!("{key}={v}")), &opts.seeds) {
            let mut sets = fixed.clone();
            sets.push(format!("{key}={v}"));
            sets.extend(seed_set);
            if let Some(w) = &shared_weights {
                sets.push(format!("backbone.weights={}", toml_string(w)));
            }
            tracing::info!("sweep: {key} = {v} → {}", run_dir.display());
            let report = train_and_eval(&opts.experiment, &sets, &run_dir, base)?;
            if shared_weights.is_none() {
                let w = run_dir.join("backbone").join("checkpoints").join("last.safetensors");
                if w.is_file() {
                    shared_weights = Some(w);
                }
            }
            rows.push(row_of(SweepMethod::Rnp, v, seed, &report));
            reports.push(report);
        }
    }
    // The unpruned reference: the shared backbone, timed in the first value's evaluation.
    let r0 = &reports[0];
    let unpruned_top1 = r0["backbone_top1"].as_f64().or_else(|| r0["full_compute_top1"].as_f64()).unwrap_or(f64::NAN);
    rows.insert(
        0,
        SweepRow {
            method: SweepMethod::Unpruned,
            value: String::new(),
            top1: unpruned_top1,
            flops_ratio: 1.0,
            latency_b1_ms: ms(r0, 1, "unpruned_ms"),
            latency_b64_ms: ms(r0, 64, "unpruned_ms"),
            throughput_b64: ms(r0, 64, "unpruned_images_per_s"),
            seed: None,
        },
    );
    if let Some(sp) = &opts.static_experiment {
        let mut sets = Vec::new();
        if let Some(w) = &shared_weights {
            let (sexp, _) = crate::methods::load(sp, &[])?;
            if sexp.backbone.arch == first.backbone.arch && sexp.backbone.weights.is_none() {
                sets.push(format!("backbone.weights={}", toml_string(w)));
            }
        }
        // The data keys of the swept experiment win, so both see the same dataset.
        for s in &fixed {
            if s.starts_with("data.") {
                sets.push(s.clone());
            }
        }
        let points: Vec<(String, Vec<String>, PathBuf)> = match &static_sweep {
            None => {
                sets.extend(opts.static_sets.iter().cloned());
                vec![(String::new(), sets, out.join("static"))]
            }
            Some((skey, svalues, sfixed)) => svalues
                .iter()
                .map(|v| {
                    let mut s = sets.clone();
                    s.extend(sfixed.iter().cloned());
                    s.push(format!("{skey}={v}"));
                    (v.clone(), s, out.join("static").join(format!("{skey}={v}")))
                })
                .collect(),
        };
        for (value, sets, dir) in points {
            for (seed, seed_set, run_dir) in seeded(dir, &opts.seeds) {
                let mut sets = sets.clone();
                sets.extend(seed_set);
                tracing::info!("sweep: static baseline {} → {}", sp.display(), run_dir.display());
                let report = train_and_eval(sp, &sets, &run_dir, base)?;
                rows.push(row_of(SweepMethod::StaticL1, &value, seed, &report));
                reports.push(report);
            }
        }
    }
    write_outputs(&out, &key, &rows, &reports)?;
    Ok(out)
}

/// A sweep without training: the trained run `opts.experiment` evaluated at each value of the
/// swept key (a training-free method's setting, e.g. ToMe's `backbone.tome.r`), plus once as
/// trained (the `unpruned` row). Each evaluation times the pruned forward against the unpruned
/// one as `rlprune eval` does.
fn run_eval_sweep(opts: &SweepOptions) -> Result<PathBuf> {
    let base = &opts.base_dir;
    let run = base.join(&opts.experiment);
    if !opts.seeds.is_empty() || opts.static_experiment.is_some() || !opts.static_sets.is_empty() {
        bail!("{}: a sweep over a trained run evaluates it without training: --seeds and --static do not apply", run.display());
    }
    let (key, values, fixed) = split_sets(&opts.sets)?;
    let (exp, _) = crate::methods::load(&crate::experiment::experiment_of(&run)?, &fixed)?;
    // Check every value's configuration before the evaluations start.
    for v in &values {
        let mut sets = fixed.clone();
        sets.push(format!("{key}={v}"));
        crate::methods::load(&crate::experiment::experiment_of(&run)?, &sets)?;
    }
    let out = sweep_dir(opts, &exp)?;
    let trained = crate::methods::eval_target(&run, None, &fixed, base)?;
    let mut rows = Vec::new();
    let mut reports = vec![trained.clone()];
    for v in &values {
        let mut sets = fixed.clone();
        sets.push(format!("{key}={v}"));
        tracing::info!("sweep: {} with {key} = {v}", run.display());
        let report = crate::methods::eval_target(&run, None, &sets, base)?;
        let method = report["reduction"].as_str().or(report["controller"].as_str()).unwrap_or("pruned").to_string();
        rows.push(row_of(SweepMethod::Reduction(method), v, None, &report));
        reports.push(report);
    }
    // The run as trained, timed where the pruned evaluations time the same weights unpruned.
    let timed = reports.iter().skip(1).find(|r| r.get("latency").is_some());
    rows.insert(
        0,
        SweepRow {
            method: SweepMethod::Unpruned,
            value: String::new(),
            top1: trained["top1"].as_f64().unwrap_or(f64::NAN),
            flops_ratio: trained["flops_ratio"].as_f64().unwrap_or(1.0),
            latency_b1_ms: timed.map_or(f64::NAN, |r| ms(r, 1, "unpruned_ms")),
            latency_b64_ms: timed.map_or(f64::NAN, |r| ms(r, 64, "unpruned_ms")),
            throughput_b64: timed.map_or(f64::NAN, |r| ms(r, 64, "unpruned_images_per_s")),
            seed: None,
        },
    );
    write_outputs(&out, &key, &rows, &reports)?;
    Ok(out)
}

/// `--out` (created), else a fresh `<log.dir>/<name>-sweep/<timestamp>` of `exp`.
fn sweep_dir(opts: &SweepOptions, exp: &crate::experiment::Experiment) -> Result<PathBuf> {
    let base = &opts.base_dir;
    match &opts.out {
        Some(d) => {
            let d = base.join(d);
            std::fs::create_dir_all(&d).with_context(|| format!("{}: cannot create sweep directory", d.display()))?;
            Ok(d)
        }
        None => new_run_dir(&base.join(&exp.log.dir), &format!("{}-sweep", exp.name)),
    }
}

/// `sweep.csv`, `sweep_summary.csv`, `sweep.json` (the eval reports) and `sweep.png`.
fn write_outputs(out: &Path, key: &str, rows: &[SweepRow], reports: &[Value]) -> Result<()> {
    write_csv(&out.join("sweep.csv"), key, rows)?;
    write_summary_csv(&out.join("sweep_summary.csv"), key, &summarize(rows))?;
    crate::fsutil::atomic_write(&out.join("sweep.json"), serde_json::to_string_pretty(reports)?.as_bytes())?;
    plot(&out.join("sweep.png"), key, rows)
}

fn toml_string(p: &Path) -> String {
    format!("\"{}\"", p.display().to_string().replace('\\', "\\\\").replace('"', "\\\""))
}

/// `sweep.csv`, one line per run:
/// `method,<key>,top1,flops_ratio,latency_b1_ms,latency_b64_ms,throughput_b64,seed`.
pub fn write_csv(path: &Path, key: &str, rows: &[SweepRow]) -> Result<()> {
    let mut s = format!("method,{key},top1,flops_ratio,latency_b1_ms,latency_b64_ms,throughput_b64,seed\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{:.6},{:.6},{:.4},{:.4},{:.2},{}\n",
            r.method,
            r.value,
            r.top1,
            r.flops_ratio,
            r.latency_b1_ms,
            r.latency_b64_ms,
            r.throughput_b64,
            r.seed.map(|s| s.to_string()).unwrap_or_default()
        ));
    }
    crate::fsutil::atomic_write(path, s.as_bytes())
}

/// `sweep_summary.csv`, one line per point: the means over its seeds and their standard
/// deviations.
pub fn write_summary_csv(path: &Path, key: &str, points: &[SweepPoint]) -> Result<()> {
    let mut s = format!(
        "method,{key},runs,top1,top1_std,flops_ratio,flops_ratio_std,latency_b1_ms,latency_b64_ms,latency_b64_ms_std\n"
    );
    for p in points {
        s.push_str(&format!(
            "{},{},{},{:.6},{:.6},{:.6},{:.6},{:.4},{:.4},{:.4}\n",
            p.method,
            p.value,
            p.runs,
            p.top1,
            p.top1_std,
            p.flops_ratio,
            p.flops_ratio_std,
            p.latency_b1_ms,
            p.latency_b64_ms,
            p.latency_b64_ms_std
        ));
    }
    crate::fsutil::atomic_write(path, s.as_bytes())
}

/// `sweep.png`: top-1 against the FLOPs ratio (left) and against measured batch-64 latency
/// (right). The swept controller and a static baseline with several points are lines; each point
/// is the mean over its seeds, with the seeds' standard deviation as error bars in both
/// directions; the unpruned model is a cross.
pub fn plot(path: &Path, key: &str, rows: &[SweepRow]) -> Result<()> {
    let points = summarize(rows);
    let text = crate::logging::plot::register_font();
    let (w, h) = PLOT_SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let panels = root.split_evenly((1, 2));
        let e = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing the sweep plot: {e:?}");
        let finite: Vec<&SweepPoint> = points.iter().filter(|p| p.top1.is_finite()).collect();
        let (mut ylo, mut yhi) = finite
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.top1 - p.top1_std), b.max(p.top1 + p.top1_std)));
        if !ylo.is_finite() {
            (ylo, yhi) = (0.0, 1.0);
        }
        let pad = ((yhi - ylo) * 0.1).max(0.005);
        let (ylo, yhi) = ((ylo - pad) * 100.0, (yhi + pad) * 100.0);
        let lat_max = points
            .iter()
            .map(|p| p.latency_b64_ms + p.latency_b64_ms_std)
            .filter(|x| x.is_finite())
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.1;
        type Axis = Box<dyn Fn(&SweepPoint) -> (f64, f64)>;
        // RNP and static L1 count the MACs of their decision layers; reductions inside a model
        // (ToMe, EViT, AdaHorNet) count the whole model's.
        let decision_layers = points.iter().any(|p| matches!(p.method, SweepMethod::Rnp | SweepMethod::StaticL1));
        let flops_label = if decision_layers { "decision-layer FLOPs ratio" } else { "FLOPs ratio (MACs of the whole model)" };
        for (panel, (xlabel, xmax, xof)) in panels.iter().zip([
            (flops_label, 1.05, Box::new(|p: &SweepPoint| (p.flops_ratio, p.flops_ratio_std)) as Axis),
            (
                "latency at batch 64 (ms, measured)",
                lat_max,
                Box::new(|p: &SweepPoint| (p.latency_b64_ms, p.latency_b64_ms_std)) as Axis,
            ),
        ]) {
            let mut builder = ChartBuilder::on(panel);
            builder.margin(15);
            if text {
                builder
                    .caption(format!("top-1 vs {xlabel}"), ("sans-serif", 18))
                    .x_label_area_size(40)
                    .y_label_area_size(50);
            }
            let mut chart = builder.build_cartesian_2d(0.0..xmax, ylo..yhi).map_err(e)?;
            let mut mesh = chart.configure_mesh();
            if text {
                mesh.x_desc(xlabel).y_desc("test top-1 (%)");
            } else {
                mesh.disable_x_mesh().disable_y_mesh().x_labels(0).y_labels(0);
            }
            mesh.draw().map_err(e)?;
            // (x, x spread, top-1 %, top-1 spread %) of every finite point of a method.
            let pts = |m: &SweepMethod| -> Vec<(f64, f64, f64, f64)> {
                let mut v: Vec<_> = points
                    .iter()
                    .filter(|p| &p.method == m)
                    .map(|p| {
                        let (x, dx) = xof(p);
                        (x, dx, p.top1 * 100.0, p.top1_std * 100.0)
                    })
                    .filter(|p| p.0.is_finite() && p.2.is_finite())
                    .collect();
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
                v
            };
            // Every method of the rows but the unpruned reference, in order of appearance: the
            // swept controller (RNP, or a training-free reduction) first, a static baseline after.
            let mut methods: Vec<&SweepMethod> = Vec::new();
            for p in &points {
                if p.method != SweepMethod::Unpruned && !methods.contains(&&p.method) {
                    methods.push(&p.method);
                }
            }
            let curves = methods.iter().zip([BLUE, RED, GREEN, MAGENTA]).map(|(&m, color)| (m, color, m.label(key)));
            for (method, color, label) in curves {
                let p = pts(method);
                if p.is_empty() {
                    continue;
                }
                let bars = p.iter().flat_map(|&(x, dx, y, dy)| {
                    [
                        PathElement::new(vec![(x, y - dy), (x, y + dy)], color.stroke_width(1)),
                        PathElement::new(vec![(x - dx, y), (x + dx, y)], color.stroke_width(1)),
                    ]
                });
                chart.draw_series(bars).map_err(e)?;
                let s = if p.len() > 1 {
                    chart.draw_series(LineSeries::new(p.iter().map(|q| (q.0, q.2)), color.stroke_width(2))).map_err(e)?
                } else {
                    chart.draw_series(std::iter::empty::<PathElement<(f64, f64)>>()).map_err(e)?
                };
                if text {
                    s.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
                }
                if *method == SweepMethod::StaticL1 {
                    chart.draw_series(p.iter().map(|q| TriangleMarker::new((q.0, q.2), 8, color.filled()))).map_err(e)?;
                } else {
                    chart.draw_series(p.iter().map(|q| Circle::new((q.0, q.2), 5, color.filled()))).map_err(e)?;
                }
            }
            let s = chart
                .draw_series(pts(&SweepMethod::Unpruned).into_iter().map(|p| Cross::new((p.0, p.2), 8, BLACK.stroke_width(3))))
                .map_err(e)?;
            if text {
                s.label(SweepMethod::Unpruned.label(key)).legend(|(x, y)| Cross::new((x + 10, y), 6, BLACK.stroke_width(2)));
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::LowerRight)
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()
                    .map_err(e)?;
            }
        }
        root.present().map_err(e)?;
    }
    let img =
        image::RgbImage::from_raw(w, h, buf).ok_or_else(|| anyhow::anyhow!("sweep plot buffer has the wrong size"))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("encoding the sweep plot as PNG")?;
    crate::fsutil::atomic_write(path, &png)
}
