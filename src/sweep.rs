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

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde_json::Value;

use crate::experiment::Experiment;
use crate::train::run::new_run_dir;
use crate::train::supervised::{self, TrainOptions};

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
    pub out: Option<PathBuf>,
    pub base_dir: PathBuf,
}

/// One point of the trade-off.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRow {
    /// `unpruned`, `rnp` (the swept controller) or `static`.
    pub method: String,
    /// The swept value (empty for the reference rows).
    pub value: String,
    pub top1: f64,
    pub flops_ratio: f64,
    pub latency_b1_ms: f64,
    pub latency_b64_ms: f64,
    pub throughput_b64: f64,
}

/// Splits the `--set` flags into the swept key with its values and the fixed overrides. A
/// value that is a TOML array, inline table or string (`[`, `{`, `"`) is never split.
pub fn split_sets(sets: &[String]) -> Result<(String, Vec<String>, Vec<String>)> {
    let mut swept: Option<(String, Vec<String>)> = None;
    let mut fixed = Vec::new();
    for s in sets {
        let (k, v) = s.split_once('=').ok_or_else(|| anyhow::anyhow!("--set {s}: expected key=value"))?;
        let v = v.trim();
        let splittable = !v.starts_with(['[', '{', '"', '\'']) && v.contains(',');
        if !splittable {
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

fn row_of(method: &str, value: &str, report: &Value) -> SweepRow {
    SweepRow {
        method: method.into(),
        value: value.into(),
        top1: report["top1"].as_f64().unwrap_or(f64::NAN),
        flops_ratio: report["flops_ratio"].as_f64().unwrap_or(f64::NAN),
        latency_b1_ms: ms(report, 1, "pruned_ms"),
        latency_b64_ms: ms(report, 64, "pruned_ms"),
        throughput_b64: ms(report, 64, "pruned_images_per_s"),
    }
}

fn train_and_eval(exp_path: &Path, sets: &[String], run_dir: &Path, base: &Path) -> Result<Value> {
    let (exp, layered) = Experiment::load(exp_path, sets)?;
    if exp.controller.is_none() {
        bail!("{}: sweep needs an experiment with a [controller] section", exp_path.display());
    }
    let opts =
        TrainOptions { out: Some(run_dir.to_path_buf()), resume: None, stop_after_epoch: None, base_dir: base.into() };
    let summary = supervised::train(&exp, &layered, &opts)?;
    if summary.interrupted {
        bail!("interrupted during {}", run_dir.display());
    }
    supervised::eval_target(run_dir, None, &[], base)
}

/// Runs the sweep; returns its directory.
pub fn run_sweep(opts: &SweepOptions) -> Result<PathBuf> {
    let base = &opts.base_dir;
    let (key, values, fixed) = split_sets(&opts.sets)?;
    // Check every value's configuration before the long runs start.
    let mut first = None;
    for v in &values {
        let mut sets = fixed.clone();
        sets.push(format!("{key}={v}"));
        let (exp, _) = Experiment::load(&opts.experiment, &sets)?;
        first.get_or_insert(exp);
    }
    let first = first.ok_or_else(|| anyhow::anyhow!("sweep: no values"))?;
    let out = match &opts.out {
        Some(d) => {
            let d = base.join(d);
            std::fs::create_dir_all(&d).with_context(|| format!("{}: cannot create sweep directory", d.display()))?;
            d
        }
        None => new_run_dir(&base.join(&first.log.dir), &format!("{}-sweep", first.name))?,
    };
    let mut shared_weights: Option<PathBuf> = first.backbone.weights.as_ref().map(|w| base.join(w));
    let mut reports = Vec::new();
    let mut rows = Vec::new();
    for v in &values {
        let mut sets = fixed.clone();
        sets.push(format!("{key}={v}"));
        if let Some(w) = &shared_weights {
            sets.push(format!("backbone.weights={}", toml_string(w)));
        }
        let run_dir = out.join(format!("{key}={v}"));
        tracing::info!("sweep: {key} = {v} → {}", run_dir.display());
        let report = train_and_eval(&opts.experiment, &sets, &run_dir, base)?;
        if shared_weights.is_none() {
            let w = run_dir.join("backbone").join("checkpoints").join("last.safetensors");
            if w.is_file() {
                shared_weights = Some(w);
            }
        }
        rows.push(row_of("rnp", v, &report));
        reports.push(report);
    }
    // The unpruned reference: the shared backbone, timed in the first value's evaluation.
    let r0 = &reports[0];
    let unpruned_top1 = r0["backbone_top1"].as_f64().or_else(|| r0["full_compute_top1"].as_f64()).unwrap_or(f64::NAN);
    rows.insert(
        0,
        SweepRow {
            method: "unpruned".into(),
            value: String::new(),
            top1: unpruned_top1,
            flops_ratio: 1.0,
            latency_b1_ms: ms(r0, 1, "unpruned_ms"),
            latency_b64_ms: ms(r0, 64, "unpruned_ms"),
            throughput_b64: ms(r0, 64, "unpruned_images_per_s"),
        },
    );
    if let Some(sp) = &opts.static_experiment {
        let mut sets = Vec::new();
        if let Some(w) = &shared_weights {
            let (sexp, _) = Experiment::load(sp, &[])?;
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
        sets.extend(opts.static_sets.iter().cloned());
        let run_dir = out.join("static");
        tracing::info!("sweep: static baseline {} → {}", sp.display(), run_dir.display());
        let report = train_and_eval(sp, &sets, &run_dir, base)?;
        rows.push(row_of("static", "", &report));
        reports.push(report);
    }
    write_csv(&out.join("sweep.csv"), &key, &rows)?;
    crate::fsutil::atomic_write(&out.join("sweep.json"), serde_json::to_string_pretty(&reports)?.as_bytes())?;
    plot(&out.join("sweep.png"), &key, &rows)?;
    Ok(out)
}

fn toml_string(p: &Path) -> String {
    format!("\"{}\"", p.display().to_string().replace('\\', "\\\\").replace('"', "\\\""))
}

/// `sweep.csv`: `method,<key>,top1,flops_ratio,latency_b1_ms,latency_b64_ms,throughput_b64`.
pub fn write_csv(path: &Path, key: &str, rows: &[SweepRow]) -> Result<()> {
    let mut s = format!("method,{key},top1,flops_ratio,latency_b1_ms,latency_b64_ms,throughput_b64\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{:.6},{:.6},{:.4},{:.4},{:.2}\n",
            r.method, r.value, r.top1, r.flops_ratio, r.latency_b1_ms, r.latency_b64_ms, r.throughput_b64
        ));
    }
    crate::fsutil::atomic_write(path, s.as_bytes())
}

/// Registers a system sans-serif font for the plot's text (plotters' `ab_glyph` backend needs
/// font bytes; none is bundled). `RLPRUNE_FONT` names a TTF/OTF file to use instead. Without
/// any, the plot is drawn without text.
pub(crate) fn register_font() -> bool {
    use std::sync::OnceLock;
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let candidates = std::env::var("RLPRUNE_FONT").ok().into_iter().map(PathBuf::from).chain(
            [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                "/System/Library/Fonts/Supplemental/Arial.ttf",
                "C:\\Windows\\Fonts\\arial.ttf",
            ]
            .iter()
            .map(PathBuf::from),
        );
        for p in candidates {
            if let Ok(bytes) = std::fs::read(&p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!("no font found for the sweep plot (set RLPRUNE_FONT to a .ttf); drawing it without text");
        false
    })
}

/// `sweep.png`: top-1 against the FLOPs ratio (left) and against measured batch-64 latency
/// (right), the swept controller as a line, the static baseline and the unpruned model as
/// single markers.
pub fn plot(path: &Path, key: &str, rows: &[SweepRow]) -> Result<()> {
    let text = register_font();
    let (w, h) = PLOT_SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let panels = root.split_evenly((1, 2));
        let e = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing the sweep plot: {e:?}");
        let finite: Vec<&SweepRow> = rows.iter().filter(|r| r.top1.is_finite()).collect();
        let (mut ylo, mut yhi) =
            finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), r| (a.min(r.top1), b.max(r.top1)));
        if !ylo.is_finite() {
            (ylo, yhi) = (0.0, 1.0);
        }
        let pad = ((yhi - ylo) * 0.1).max(0.005);
        let (ylo, yhi) = ((ylo - pad) * 100.0, (yhi + pad) * 100.0);
        let lat_max =
            rows.iter().map(|r| r.latency_b64_ms).filter(|x| x.is_finite()).fold(0.0f64, f64::max).max(1e-3) * 1.1;
        for (panel, (xlabel, xmax, xof)) in panels.iter().zip([
            (
                "decision-layer FLOPs ratio",
                1.05,
                Box::new(|r: &SweepRow| r.flops_ratio) as Box<dyn Fn(&SweepRow) -> f64>,
            ),
            ("latency at batch 64 (ms, measured)", lat_max, Box::new(|r: &SweepRow| r.latency_b64_ms)),
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
            let pts = |m: &str| -> Vec<(f64, f64)> {
                rows.iter()
                    .filter(|r| r.method == m)
                    .map(|r| (xof(r), r.top1 * 100.0))
                    .filter(|p| p.0.is_finite() && p.1.is_finite())
                    .collect()
            };
            let rnp = pts("rnp");
            let mut sorted = rnp.clone();
            sorted.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
            let s = chart.draw_series(LineSeries::new(sorted, BLUE.stroke_width(2))).map_err(e)?;
            if text {
                s.label(format!("RNP ({key})")).legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
            }
            chart.draw_series(rnp.iter().map(|&p| Circle::new(p, 5, BLUE.filled()))).map_err(e)?;
            let s = chart
                .draw_series(pts("static").into_iter().map(|p| TriangleMarker::new(p, 8, RED.filled())))
                .map_err(e)?;
            if text {
                s.label("static L1").legend(|(x, y)| TriangleMarker::new((x + 10, y), 6, RED.filled()));
            }
            let s = chart
                .draw_series(pts("unpruned").into_iter().map(|p| Cross::new(p, 8, BLACK.stroke_width(3))))
                .map_err(e)?;
            if text {
                s.label("unpruned").legend(|(x, y)| Cross::new((x + 10, y), 6, BLACK.stroke_width(2)));
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
