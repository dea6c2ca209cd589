//! What `rlprune eval RUN_DIR` shares between controller kinds: measured latency and throughput
//! of a pruned network against the unpruned backbone in the same process, and the table view of
//! the JSON report.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Tensor, TensorData};
use serde_json::{Value, json};

use crate::Cpu;
use crate::data::Loader;

/// Batch sizes the latency report measures.
pub const LATENCY_BATCHES: [usize; 2] = [1, 64];

/// `n` test images (the first batch, repeated if it is smaller), `[n, C, H, W]`.
pub fn images(loader: &Loader, n: usize) -> Result<Tensor<Cpu, 4>> {
    let first = loader.batch(0, 0)?;
    let [_, c, h, w] = first.shape;
    let per = c * h * w;
    let m = first.len().max(1);
    let data: Vec<f32> = (0..n).flat_map(|i| first.images[(i % m) * per..(i % m + 1) * per].iter().copied()).collect();
    Ok(Tensor::from_data(TensorData::new(data, [n, c, h, w]), &Default::default()))
}

/// The first test batch, for [`latency_against_unpruned`].
pub fn example_images(loader: &Loader) -> Result<Tensor<Cpu, 4>> {
    images(loader, LATENCY_BATCHES[LATENCY_BATCHES.len() - 1])
}

/// `warmup` untimed pairs, then `repeats` pairs of `a` then `b`, each call timed: the two sides
/// alternate call by call, so a load change on a shared machine hits both alike. Seconds per call.
fn time_alternately(
    warmup: usize,
    repeats: usize,
    mut a: impl FnMut() -> Result<()>,
    mut b: impl FnMut() -> Result<()>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut ta, mut tb) = (Vec::with_capacity(repeats), Vec::with_capacity(repeats));
    for i in 0..warmup + repeats {
        let t = Instant::now();
        a()?;
        let da = t.elapsed().as_secs_f64();
        let t = Instant::now();
        b()?;
        let db = t.elapsed().as_secs_f64();
        if i >= warmup {
            ta.push(da);
            tb.push(db);
        }
    }
    Ok((ta, tb))
}

/// `a` and `b` timed in alternation ([`time_alternately`]), in ms: `(a, b, a/b from the medians,
/// a/b per pair)`.
fn paired_ms(
    warmup: usize,
    repeats: usize,
    a: impl FnMut() -> Result<()>,
    b: impl FnMut() -> Result<()>,
) -> Result<(crate::bench::Stats, crate::bench::Stats, f64, crate::bench::Stats)> {
    use crate::bench::Stats;
    let (ta, tb) = time_alternately(warmup, repeats, a, b)?;
    let (ta, tb): (Vec<f64>, Vec<f64>) = (ta.iter().map(|s| s * 1e3).collect(), tb.iter().map(|s| s * 1e3).collect());
    let pairs: Vec<f64> = ta.iter().zip(&tb).map(|(x, y)| x / y).collect();
    let (a_ms, b_ms) = (Stats::of(&ta), Stats::of(&tb));
    Ok((a_ms, b_ms, a_ms.median / b_ms.median, Stats::of(&pairs)))
}

/// The ms/batch header and one row per side, for the tables of paired timings.
fn paired_rows(a: (&str, &crate::bench::Stats), b: (&str, &crate::bench::Stats)) -> String {
    let row = |(name, s): (&str, &crate::bench::Stats)| {
        format!("{name:<12} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}\n", s.median, s.min, s.p10, s.p90, s.max)
    };
    format!("{:<12} {:>10} {:>10} {:>10} {:>10} {:>10}\n{}{}", "ms/batch", "median", "min", "p10", "p90", "max", row(a), row(b))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Times `unpruned` and `pruned` (each a full forward that reads its result back) at batch 1
/// and 64 built from `sample`. The two alternate call by call and the median is kept, so a load
/// change on a shared machine hits both alike. Per batch: `unpruned_ms`, `pruned_ms`, images/s,
/// `speedup` and `speedup_over_flops_reduction` (1.0 = the speedup the FLOPs ratio promises).
pub fn latency_against_unpruned(
    sample: &Tensor<Cpu, 4>,
    flops_ratio: f64,
    mut unpruned: impl FnMut(Tensor<Cpu, 4>) -> Result<()>,
    mut pruned: impl FnMut(Tensor<Cpu, 4>) -> Result<()>,
) -> Result<Value> {
    let [n, c, h, w] = sample.dims();
    let mut out = serde_json::Map::new();
    for b in LATENCY_BATCHES {
        let x = if b == n {
            sample.clone()
        } else {
            let idx: Vec<i64> = (0..b).map(|i| (i % n) as i64).collect();
            sample.clone().select(0, Tensor::from_data(TensorData::new(idx, [b]), &sample.device()))
        };
        debug_assert_eq!(x.dims(), [b, c, h, w]);
        let reps = if b == 1 { 40 } else { 8 };
        let (tu, tp) = time_alternately(1, reps, || unpruned(x.clone()), || pruned(x.clone()))?;
        let (u, p) = (median(tu), median(tp));
        let speedup = u / p;
        out.insert(
            format!("batch{b}"),
            json!({
                "unpruned_ms": u * 1e3, "pruned_ms": p * 1e3,
                "unpruned_images_per_s": b as f64 / u, "pruned_images_per_s": b as f64 / p,
                "speedup": speedup,
                "speedup_over_flops_reduction": speedup * flops_ratio,
            }),
        );
    }
    Ok(Value::Object(out))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Width paths listed by [`table`], most taken first (the report holds all of them).
const WIDTH_PATHS_SHOWN: usize = 8;

/// The table view of an eval report (plain runs and controller runs).
pub fn table(report: &Value) -> String {
    let mut s = String::new();
    let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k:<22} {v}\n"));
    for k in ["source", "arch", "reduction", "controller", "allocation", "weights", "router"] {
        if let Some(v) = report.get(k).and_then(|v| v.as_str()) {
            line(&mut s, k, v.to_string());
        }
    }
    line(&mut s, "images", report["images"].to_string());
    line(&mut s, "top-1", format!("{:.2}%", 100.0 * f(&report["top1"])));
    line(&mut s, "loss", format!("{:.4}", f(&report["loss"])));
    if report.get("full_compute_top1").is_some() {
        line(&mut s, "full-compute top-1", format!("{:.2}%", 100.0 * f(&report["full_compute_top1"])));
    }
    if report.get("backbone_top1").is_some_and(|v| v.is_number()) {
        line(&mut s, "unpruned backbone top-1", format!("{:.2}%", 100.0 * f(&report["backbone_top1"])));
    }
    let Some(ratio) = report.get("flops_ratio").and_then(|v| v.as_f64()) else {
        return s;
    };
    let scope = if report.get("reduction").is_some() { "MACs" } else { "decision-layer MACs" };
    line(&mut s, "FLOPs ratio", format!("{ratio:.3} ({:.2}× fewer {scope})", 1.0 / ratio.max(1e-12)));
    let layers: Vec<&str> =
        report["layers"].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
    let lfr = report["layer_flops_ratio"].as_array().cloned().unwrap_or_default();
    let dist = report.get("action_distribution").and_then(|v| v.as_array()).cloned();
    let kept = report.get("kept_channels").and_then(|v| v.as_array()).cloned();
    let outs = report.get("out_channels").and_then(|v| v.as_array()).cloned();
    if let (Some(kept), Some(ratios)) = (
        report.get("kept_tokens").and_then(|v| v.as_array()),
        report.get("keep_ratios").and_then(|v| v.as_array()),
    ) {
        s.push_str(&format!("\n{:<8} {:>12} {:>11}\n", "stage", "kept tokens", "keep ratio"));
        for (i, (k, r)) in kept.iter().zip(ratios).enumerate() {
            s.push_str(&format!("{:<8} {:>12} {:>11.3}\n", i + 1, k.as_u64().unwrap_or(0), f(r)));
        }
    }
    // A run without decision layers (token pruning) has no per-layer table.
    if !layers.is_empty() {
        s.push('\n');
        match &dist {
            Some(d) => {
                let k = d.first().and_then(|r| r.as_array()).map(|r| r.len()).unwrap_or(0);
                let head: String = (1..=k).map(|a| format!(" {:>6}", format!("a={a}"))).collect();
                s.push_str(&format!("{:<20} {:>6} {head}\n", "layer", "FLOPs"));
            }
            None => s.push_str(&format!("{:<20} {:>6} {:>12}\n", "layer", "FLOPs", "channels")),
        }
    }
    for (t, name) in layers.iter().enumerate() {
        let r = lfr.get(t).map(f).unwrap_or(f64::NAN);
        let tail = match (&dist, &kept, &outs) {
            (Some(d), _, _) => d
                .get(t)
                .and_then(|r| r.as_array())
                .map(|r| r.iter().map(|p| format!(" {:>5.1}%", 100.0 * f(p))).collect())
                .unwrap_or_default(),
            (None, Some(kc), Some(oc)) => format!("{:>12}", format!("{}/{}", kc[t], oc[t])),
            _ => String::new(),
        };
        s.push_str(&format!("{name:<20} {r:>6.3} {tail}\n"));
    }
    if let Some(paths) = report.get("width_paths").and_then(|v| v.as_array()).filter(|p| !p.is_empty()) {
        let common = paths.iter().filter(|p| f(&p["share"]) >= 0.1).count();
        s.push_str(&format!(
            "\nwidth paths (groups per routed layer): {} distinct, {common} taken by ≥ 10 % of the images\n",
            paths.len()
        ));
        s.push_str(&format!("{:<20} {:>7} {:>7} {:>7}\n", "groups", "images", "FLOPs", "top-1"));
        for p in paths.iter().take(WIDTH_PATHS_SHOWN) {
            let groups: Vec<String> =
                p["groups"].as_array().map(|g| g.iter().map(|v| v.to_string()).collect()).unwrap_or_default();
            s.push_str(&format!(
                "{:<20} {:>6.1}% {:>7.3} {:>6.1}%\n",
                groups.join(" "),
                100.0 * f(&p["share"]),
                f(&p["flops_ratio"]),
                100.0 * f(&p["top1"])
            ));
        }
        if paths.len() > WIDTH_PATHS_SHOWN {
            let rest: f64 = paths.iter().skip(WIDTH_PATHS_SHOWN).map(|p| f(&p["share"])).sum();
            s.push_str(&format!("({} more, {:.1}% of the images)\n", paths.len() - WIDTH_PATHS_SHOWN, 100.0 * rest));
        }
    }
    if let Some(classes) = report.get("per_class").and_then(|v| v.as_array()).filter(|c| !c.is_empty()) {
        s.push_str(&format!("\n{:<20} {:>7} {:>7} {:>7}\n", "class", "images", "FLOPs", "top-1"));
        for c in classes {
            s.push_str(&format!(
                "{:<20} {:>7} {:>7.3} {:>6.1}%\n",
                c["class"].as_str().unwrap_or("?"),
                c["images"].as_u64().unwrap_or(0),
                f(&c["flops_ratio"]),
                100.0 * f(&c["top1"])
            ));
        }
    }
    if let Some(lat) = report.get("latency").and_then(|v| v.as_object()) {
        s.push_str(&format!(
            "\n{:<8} {:>13} {:>11} {:>14} {:>12} {:>9} {:>20}\n",
            "batch", "unpruned ms", "pruned ms", "unpruned img/s", "pruned img/s", "speedup", "speedup / FLOPs red."
        ));
        for b in LATENCY_BATCHES {
            if let Some(m) = lat.get(&format!("batch{b}")) {
                s.push_str(&format!(
                    "{b:<8} {:>13.3} {:>11.3} {:>14.1} {:>12.1} {:>8.2}× {:>20.2}\n",
                    f(&m["unpruned_ms"]),
                    f(&m["pruned_ms"]),
                    f(&m["unpruned_images_per_s"]),
                    f(&m["pruned_images_per_s"]),
                    f(&m["speedup"]),
                    f(&m["speedup_over_flops_reduction"])
                ));
            }
        }
    }
    s
}

/// `rlprune bench --unreduced`: a model that prunes inside its forward (ToMe, EViT, AdaHorNet)
/// against the same weights with nothing pruned, in alternation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReductionSpeedup {
    pub model: String,
    /// `tome` or `evit`.
    pub method: &'static str,
    pub batch: usize,
    pub repeats: usize,
    pub unreduced_ms: crate::bench::Stats,
    pub reduced_ms: crate::bench::Stats,
    /// Reduced speed over unreduced speed, from the medians.
    pub speedup: f64,
    /// The same ratio per alternating pair, median and spread.
    pub pair_speedup: crate::bench::Stats,
    /// MACs per image with the reduction over without.
    pub flops_ratio: f64,
}

/// Times the token reduction `target`'s model TOML asks for against the same model keeping every
/// token, `repeats` alternating pairs at `batch` after `warmup` (CPU).
pub fn token_reduction_speedup(target: &crate::bench::BenchModel, batch: usize, warmup: usize, repeats: usize) -> Result<ReductionSpeedup> {
    use crate::backbones::Backbone;
    use crate::bench::BenchModelKind;
    anyhow::ensure!(repeats >= 1 && batch >= 1, "at least one timed repeat of at least one image");
    let pruning = match &target.kind {
        BenchModelKind::Reference(spec) => spec.inner_pruning(target.ctx.img_size[0]),
        _ => None,
    };
    let Some(pruning) = pruning else {
        anyhow::bail!(
            "{}: no [model.tome] or [model.evit] on a deit model, and not an adahornet: --unreduced compares a model \
             that prunes inside its forward against the same weights with nothing pruned",
            target.name
        );
    };
    let (method, flops_ratio) = (pruning.name, pruning.flops_ratio);
    let device = Default::default();
    let model = target.build::<Cpu>(&device)?;
    let x = Tensor::<Cpu, 4>::random(target.input_shape(batch), burn::tensor::Distribution::Normal(0.0, 1.0), &device);
    let (unreduced_ms, reduced_ms, speedup, pair_speedup) = paired_ms(
        warmup,
        repeats,
        || {
            let out = model.forward_unpruned(x.clone()).ok_or_else(|| anyhow::anyhow!("{}: no unpruned forward", target.name))?;
            let _ = out.into_data();
            Ok(())
        },
        || {
            let _ = model.forward(x.clone()).into_data();
            Ok(())
        },
    )?;
    Ok(ReductionSpeedup { model: target.name.clone(), method, batch, repeats, unreduced_ms, reduced_ms, speedup, pair_speedup, flops_ratio })
}

impl ReductionSpeedup {
    pub fn table(&self) -> String {
        format!(
            "{} batch {}: {} against the unpruned forward (same weights), {} alternating pairs\n{}\
             speedup: {:.3} (per pair {:.3}, p10–p90 {:.3}–{:.3}) at a FLOPs ratio of {:.3}\n",
            self.model,
            self.batch,
            self.method,
            self.repeats,
            paired_rows(("unpruned", &self.unreduced_ms), (self.method, &self.reduced_ms)),
            self.speedup,
            self.pair_speedup.median,
            self.pair_speedup.p10,
            self.pair_speedup.p90,
            self.flops_ratio,
        )
    }
}

/// What [`routing_overhead`] measured: the dense forward against a channel-routed forward whose
/// policy keeps every group, timed call by call in alternation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoutingOverhead {
    pub model: String,
    pub batch: usize,
    pub groups: usize,
    pub repeats: usize,
    pub dense_ms: crate::bench::Stats,
    pub routed_ms: crate::bench::Stats,
    /// Routed speed over dense speed, from the medians (1.0 = routing costs nothing).
    pub speed_ratio: f64,
    /// The same ratio per alternating pair, median and spread.
    pub pair_ratio: crate::bench::Stats,
}

impl RoutingOverhead {
    pub fn table(&self) -> String {
        format!(
            "{} batch {}: dense forward against a {}-group channel router that keeps every group, {} alternating pairs\n{}\
             routed speed / dense speed: {:.3} (per pair {:.3}, p10–p90 {:.3}–{:.3})\n",
            self.model,
            self.batch,
            self.groups,
            self.repeats,
            paired_rows(("dense", &self.dense_ms), ("routed", &self.routed_ms)),
            self.speed_ratio,
            self.pair_ratio.median,
            self.pair_ratio.p10,
            self.pair_ratio.p90,
        )
    }
}

/// A router of `groups` groups for `model` whose greedy policy keeps every group: its head
/// scores the last action highest whatever the image (the encoders and the cell still run).
pub fn keep_all_router(model: &crate::backbones::AnyBackbone<Cpu>, groups: usize) -> Result<crate::controllers::channel_router::ChannelRouter<Cpu>> {
    use crate::backbones::Backbone;
    use burn::module::Param;
    let convs = model.prunable_convs();
    anyhow::ensure!(!convs.is_empty(), "the model has no layers a channel router can prune");
    anyhow::ensure!(groups >= 1, "a router needs at least one group");
    let cfg = crate::controllers::ControllerConfig { kind: "channel-router".into(), groups, hidden: 64, rnn: crate::controllers::RnnCell::Gru, options: Default::default() };
    let device = Default::default();
    let in_ch = crate::controllers::channel_router::ChannelRouter::<Cpu>::input_channels(0, &convs);
    let mut router = crate::controllers::channel_router::ChannelRouter::<Cpu>::new(&cfg, &in_ch, false, &device);
    let mut bias = vec![0.0f32; groups];
    bias[groups - 1] = 1.0;
    router.head.weight = Param::from_tensor(Tensor::zeros([groups, cfg.hidden], &device));
    router.head.bias = Some(Param::from_tensor(Tensor::from_data(TensorData::new(bias, [groups]), &device)));
    Ok(router)
}

/// Times `model`'s dense forward against its routed forward under [`keep_all_router`] on one
/// random batch: `warmup` untimed pairs, then `repeats` pairs, the two sides alternating so that
/// load changes hit both. Each call reads its logits back.
pub fn routing_overhead(
    name: &str,
    model: &crate::backbones::AnyBackbone<Cpu>,
    shape: [usize; 4],
    groups: usize,
    warmup: usize,
    repeats: usize,
) -> Result<RoutingOverhead> {
    use crate::backbones::Backbone;
    use crate::controllers::Mode;
    use rand::SeedableRng;
    anyhow::ensure!(repeats >= 1, "at least one timed repeat");
    let router = keep_all_router(model, groups)?;
    let device = Default::default();
    let x = Tensor::<Cpu, 4>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &device);
    let mut policy = crate::controllers::channel_router::RouterPolicy::new(router);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let dense_logits = model.forward(x.clone());
    let (routed_logits, trace) = model.forward_controlled(x.clone(), &mut policy, Mode::Greedy, &mut rng)?;
    anyhow::ensure!(
        trace.steps.iter().all(|s| s.actions.iter().all(|&a| a == groups)),
        "the keep-all router dropped groups"
    );
    let gap = (dense_logits - routed_logits).abs().max().into_scalar();
    anyhow::ensure!(gap < 1e-3, "the routed forward keeping every group differs from the dense one by {gap}");
    let (dense_ms, routed_ms, speed_ratio, pair_ratio) = paired_ms(
        warmup,
        repeats,
        || {
            let _ = model.forward(x.clone()).into_data();
            Ok(())
        },
        || {
            let (logits, _) = model.forward_controlled(x.clone(), &mut policy, Mode::Greedy, &mut rng)?;
            let _ = logits.into_data();
            Ok(())
        },
    )?;
    Ok(RoutingOverhead { model: name.to_string(), batch: shape[0], groups, repeats, dense_ms, routed_ms, speed_ratio, pair_ratio })
}
