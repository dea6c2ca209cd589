//! `rlprune visualize` of an RNP run: how many channel groups its policy computes, layer by
//! layer and class by class.

use std::path::Path;

use anyhow::{Context, Result};
use image::RgbImage;
use serde_json::json;

use super::Drawn;
use crate::experiment::{Experiment, Layered};

/// `rlprune visualize` of an RNP run: runs its router greedily over the test split and writes
/// `channel_use.png` ([`draw_channel_use`]) and `channel_use.json` (per layer and class, the
/// share of the class's images at each width; per class the mean FLOPs ratio) into `out`.
pub fn visualize_run(exp: &Experiment, layered: &Layered, run_dir: &Path, base: &Path, out: &Path) -> Result<Drawn> {
    let run = super::rnp::load_routed_run(exp, layered, run_dir, base)?;
    let ev = super::rnp::evaluate_controlled(&run.backbone, &run.router, &run.test_loader)?;
    let use_ = ChannelUse::from_eval(&ev, run.router.groups());
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create the output directory", out.display()))?;
    let png = out.join("channel_use.png");
    draw_channel_use(&png, &use_)?;
    let report = json!({
        "source": run_dir.display().to_string(),
        "weights": run.backbone_file.display().to_string(),
        "router": run.router_file.display().to_string(),
        "top1": ev.top1,
        "flops_ratio": ev.flops_ratio,
        "layers": use_.layers,
        "classes": use_.classes,
        "groups": use_.groups,
        "share": use_.share,
        "class_flops_ratio": use_.class_flops,
        "width_paths": ev.width_paths,
    });
    let json = out.join("channel_use.json");
    crate::fsutil::atomic_write(&json, serde_json::to_string_pretty(&report)?.as_bytes())?;
    Ok(Drawn { files: vec![png, json], summary: "channel_use.png and channel_use.json".into() })
}

/// What an RNP policy computes, class by class.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelUse {
    pub layers: Vec<String>,
    pub classes: Vec<String>,
    pub groups: usize,
    /// `share[layer][class][a - 1]`: the share of the class's images computing `a` groups.
    pub share: Vec<Vec<Vec<f64>>>,
    /// Per class, the mean decision-layer FLOPs ratio of its images.
    pub class_flops: Vec<f64>,
}

impl ChannelUse {
    pub fn from_eval(ev: &super::rnp::ControlledEval, groups: usize) -> Self {
        // The classes that have test images, as the evaluation's per-class table lists them.
        let share = ev
            .actions
            .iter()
            .map(|acts| {
                ev.per_class
                    .iter()
                    .map(|c| {
                        let mut row = vec![0.0; groups];
                        for (&a, _) in acts.iter().zip(&ev.labels).filter(|(_, l)| **l == c.label) {
                            if let Some(slot) = (a as usize).checked_sub(1).and_then(|i| row.get_mut(i)) {
                                *slot += 1.0 / c.images as f64;
                            }
                        }
                        row
                    })
                    .collect()
            })
            .collect();
        Self {
            layers: ev.layers.clone(),
            classes: ev.per_class.iter().map(|c| c.class.clone()).collect(),
            groups,
            share,
            class_flops: ev.per_class.iter().map(|c| c.flops_ratio).collect(),
        }
    }
}

/// Size of one heat-map cell of `channel_use.png`, in pixels.
const CELL: u32 = 26;

/// `channel_use.png`: one heat map per routed layer (rows: classes; columns: groups computed,
/// 1 to k; the darker, the larger the share of the class's images at that width), then the mean
/// FLOPs ratio per class as bars.
pub fn draw_channel_use(path: &Path, u: &ChannelUse) -> Result<()> {
    use plotters::prelude::*;
    let text = crate::logging::plot::register_font();
    let (k, c, l) = (u.groups.max(1) as u32, u.classes.len().max(1) as u32, u.layers.len() as u32);
    let label_w = if text { 110 } else { 10 };
    let panel_w = k * CELL + 30;
    let (w, h) = (label_w + (l + 1) * panel_w + 20, c * CELL + if text { 90 } else { 20 });
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing channel_use.png: {e:?}");
        let (labels, rest) = root.split_horizontally(label_w);
        let top = if text { 45 } else { 10 };
        if text {
            for (ci, name) in u.classes.iter().enumerate() {
                let y = top + ci as i32 * CELL as i32 + CELL as i32 / 2 - 7;
                labels.draw_text(name, &("sans-serif", 14).into_text_style(&labels), (6, y)).map_err(e)?;
            }
        }
        let panels = rest.split_evenly((1, l as usize + 1));
        let blue = |s: f64| {
            let s = s.clamp(0.0, 1.0);
            RGBColor((255.0 - s * 247.0) as u8, (255.0 - s * 207.0) as u8, (255.0 - s * 148.0) as u8)
        };
        for (t, panel) in panels.iter().enumerate() {
            let x0 = 10i32;
            if t < l as usize {
                if text {
                    panel.draw_text(&u.layers[t], &("sans-serif", 14).into_text_style(panel), (x0, 8)).map_err(e)?;
                    panel.draw_text("groups →", &("sans-serif", 12).into_text_style(panel), (x0, 26)).map_err(e)?;
                }
                for (ci, row) in u.share[t].iter().enumerate() {
                    for (a, &s) in row.iter().enumerate() {
                        let (x, y) = (x0 + a as i32 * CELL as i32, top + ci as i32 * CELL as i32);
                        let cell = [(x, y), (x + CELL as i32 - 1, y + CELL as i32 - 1)];
                        panel.draw(&Rectangle::new(cell, blue(s).filled())).map_err(e)?;
                        // A light outline, so that a width no image took still shows as a cell.
                        panel.draw(&Rectangle::new(cell, RGBColor(225, 225, 225))).map_err(e)?;
                    }
                }
                if text {
                    for a in 0..k {
                        let x = x0 + (a * CELL) as i32 + CELL as i32 / 2 - 4;
                        let y = top + (c * CELL) as i32 + 4;
                        panel.draw_text(&(a + 1).to_string(), &("sans-serif", 12).into_text_style(panel), (x, y)).map_err(e)?;
                    }
                }
            } else {
                if text {
                    panel.draw_text("mean FLOPs", &("sans-serif", 14).into_text_style(panel), (x0, 8)).map_err(e)?;
                }
                let max = u.class_flops.iter().cloned().fold(0.0f64, f64::max).max(1e-9);
                let span = (panel_w - 40) as f64;
                for (ci, &f) in u.class_flops.iter().enumerate() {
                    let y = top + ci as i32 * CELL as i32;
                    let len = (f / max * span) as i32;
                    panel.draw(&Rectangle::new([(x0, y + 4), (x0 + len.max(1), y + CELL as i32 - 5)], RGBColor(200, 60, 40).filled())).map_err(e)?;
                    if text {
                        let style = ("sans-serif", 11).into_text_style(panel);
                        panel.draw_text(&format!("{f:.2}"), &style, (x0 + len.max(1) + 3, y + 7)).map_err(e)?;
                    }
                }
            }
        }
        root.present().map_err(e)?;
    }
    let img = RgbImage::from_raw(w, h, buf).ok_or_else(|| anyhow::anyhow!("channel_use.png buffer has the wrong size"))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).context("encoding channel_use.png")?;
    crate::fsutil::atomic_write(path, &png)
}
