//! `rlprune visualize`: pictures of what an input-adaptive model kept, as in DynamicViT's figures.
//!
//! For each input image one PNG: the image, then one panel per pruning stage in which the
//! regions the model dropped by that stage are greyed out ([`grey_out`]) and the kept ones show
//! the original pixels. Panels are upscaled by an integer factor (nearest neighbour) so that
//! patches of small images stay visible, and separated by a white gap.
//!
//! Regions are a model's decision cells on the input: DynamicViT's patches (`patch_size`² pixels
//! each), or the positions of an AdaHorNet stage map (`img / grid` pixels each). A model reports
//! them through [`keep_map`], which runs its real pruned forward pass, so the picture shows
//! exactly the set the compute was spent on.
//!
//! The model comes from a run directory (its `config.toml` and `checkpoints/best.safetensors`,
//! else `last.safetensors`) or from a model TOML plus `--weights`. Images come from the run's test
//! split, or from `--data`: a dataset name (its test split, resized to the model's input) or a
//! safetensors file with tensor `input` `[N, C, H, W]` (shown min-max scaled per image, since
//! its normalisation is unknown).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use burn::tensor::{Int, Tensor, TensorData};
use image::{Rgb, RgbImage};
use rand::SeedableRng;
use serde_json::json;

use crate::backbones::spec::resolve_model;
use crate::backbones::{AnyBackbone, ModelSpec};
use crate::data::{self, DataConfig, DatasetKind, Loader};
use crate::import;
use crate::methods::Drawn;
use crate::nn::params::load_strict;
use crate::train::checkpoint;
use crate::{Cpu, ModelBackend};

/// The grey dropped regions are blended towards (light grey, as the paper's figures).
pub const GREY: u8 = 200;
/// White gap between panels, in pixels.
pub const GAP: usize = 4;

/// A dropped pixel: one quarter of the original, three quarters [`GREY`] (integer arithmetic so
/// that tests can recompute it exactly).
pub fn grey_out(v: u8) -> u8 {
    ((v as u16 + 3 * GREY as u16) / 4) as u8
}

#[derive(Debug, Clone, Default)]
pub struct VisualizeOptions {
    /// A run directory or a model TOML.
    pub target: PathBuf,
    /// Weights (required with a model TOML; overrides the run's checkpoint).
    pub weights: Option<PathBuf>,
    /// A dataset name or a safetensors file with tensor `input`.
    pub data: Option<String>,
    /// Where the dataset named by `data` lives (default: the usual search).
    pub data_root: Option<PathBuf>,
    /// Number of images (the first ones of the test split or file).
    pub images: usize,
    pub out: PathBuf,
    /// Upscaling factor (default: enough for panels of about 224 pixels).
    pub scale: Option<usize>,
    /// Directory that relative paths resolve against.
    pub base_dir: PathBuf,
}

/// What a model kept, per stage and image, on its grid of decision cells.
#[derive(Debug, Clone, PartialEq)]
pub struct KeepMap {
    /// Cells `[rows, cols]` covering the input (row-major numbering).
    pub grid: [usize; 2],
    /// `stages[s][n]`: the cells image `n` kept at stage `s`.
    pub stages: Vec<Vec<Vec<usize>>>,
    /// Predicted class per image.
    pub predicted: Vec<usize>,
    /// ToMe: `merged[n][cell]`, the final token that holds the cell's patch (cells of one final
    /// token were merged into it). Empty for models that drop instead of merging.
    pub merged: Vec<Vec<usize>>,
}

/// Runs `model`'s pruned forward pass on `x` and reports the kept cells, or an error for a model
/// without spatial pruning decisions.
pub fn keep_map<B: ModelBackend>(model: &AnyBackbone<B>, x: Tensor<B, 4>) -> Result<KeepMap> {
    let [_, _, h, w] = x.dims();
    if let AnyBackbone::Deit(m) = model {
        return token_reduction_map(m, x);
    }
    let (logits, kept, grid) = match model {
        AnyBackbone::DynamicVit(m) => {
            let p = m.vit().patch_embed.proj.kernel_size();
            let (logits, kept) = m.forward_pruned(x);
            (logits, kept, [h / p, w / p])
        }
        AnyBackbone::AdaHornet(m) => m.forward_pruned(x),
        _ => bail!(NOTHING_TO_SHOW),
    };
    let predicted = int_rows(logits.argmax(1)).into_iter().map(|r| r[0]).collect();
    let stages = kept.into_iter().map(int_rows).collect();
    Ok(KeepMap { grid, stages, predicted, merged: Vec::new() })
}

const NOTHING_TO_SHOW: &str = "the model has no spatial keep decisions to show (visualize supports dynamicvit-deit and adahornet \
     models, and deit models with [model.tome] or [model.evit])";

/// A DeiT with ToMe (the final token of every patch, traced) or EViT (the patches kept at each
/// keep location; the fused token is no patch).
fn token_reduction_map<B: ModelBackend>(vit: &crate::backbones::vit::VisionTransformer<B>, x: Tensor<B, 4>) -> Result<KeepMap> {
    use crate::backbones::token_reduction::TokenReduction;
    let [_, _, h, w] = x.dims();
    let p = vit.patch_embed.proj.kernel_size();
    let grid = [h / p, w / p];
    let mut traced = vit.clone();
    match &mut traced.reduction {
        Some(TokenReduction::ToMe { trace_source, .. }) => *trace_source = true,
        Some(TokenReduction::Evit { .. }) => {}
        None => bail!(NOTHING_TO_SHOW),
    }
    let (logits, trace) = crate::backbones::Backbone::forward_traced(&traced, x);
    let predicted = int_rows(logits.argmax(1)).into_iter().map(|r| r[0]).collect();
    let mut map = KeepMap { grid, stages: Vec::new(), predicted, merged: Vec::new() };
    for (name, t) in trace {
        let [n, k] = t.dims();
        let v = t.into_data().convert::<i64>().to_vec::<i64>().expect("int tensor");
        let rows = (0..n).map(|i| &v[i * k..(i + 1) * k]);
        if name == "source_idx" {
            // Token 0 is the class token; patches follow in row-major order.
            map.merged = rows.map(|r| r[1..].iter().map(|&t| t as usize).collect()).collect();
        } else {
            map.stages.push(rows.map(|r| r.iter().filter(|&&c| c >= 0).map(|&c| c as usize).collect()).collect());
        }
    }
    Ok(map)
}

fn int_rows<B: burn::tensor::backend::Backend>(t: Tensor<B, 2, Int>) -> Vec<Vec<usize>> {
    let [n, k] = t.dims();
    let v = t.into_data().convert::<i64>().to_vec::<i64>().expect("int tensor");
    (0..n).map(|i| v[i * k..(i + 1) * k].iter().map(|&x| x as usize).collect()).collect()
}

/// Renders one image (`display`: CHW values in `[0, 1]`, 1 or 3 channels) and its kept cells per
/// stage as panels side by side, each upscaled by `scale`.
pub fn render(display: &[f32], [c, h, w]: [usize; 3], grid: [usize; 2], stages: &[&[usize]], scale: usize) -> Result<RgbImage> {
    ensure!(c == 1 || c == 3, "can only draw 1- or 3-channel images, got {c}");
    ensure!(display.len() == c * h * w, "image has {} values, expected {c}×{h}×{w}", display.len());
    ensure!(scale >= 1, "scale must be at least 1");
    let [gh, gw] = grid;
    ensure!(gh >= 1 && gw >= 1 && h.is_multiple_of(gh) && w.is_multiple_of(gw), "a {gh}×{gw} grid does not tile a {h}×{w} image");
    let (ch, cw) = (h / gh, w / gw);
    let pixel = |y: usize, x: usize| -> [u8; 3] {
        let v = |k: usize| (display[k * h * w + y * w + x].clamp(0.0, 1.0) * 255.0).round() as u8;
        if c == 1 { [v(0); 3] } else { [v(0), v(1), v(2)] }
    };
    let (pw, ph) = (w * scale, h * scale);
    let width = (stages.len() + 1) * pw + stages.len() * GAP;
    let mut img = RgbImage::from_pixel(width as u32, ph as u32, Rgb([255, 255, 255]));
    for panel in 0..=stages.len() {
        let mut kept = vec![panel == 0; gh * gw];
        if panel > 0 {
            for &cell in stages[panel - 1] {
                ensure!(cell < kept.len(), "kept cell {cell} is outside the {gh}×{gw} grid");
                kept[cell] = true;
            }
        }
        let x0 = panel * (pw + GAP);
        for y in 0..ph {
            for x in 0..pw {
                let (sy, sx) = (y / scale, x / scale);
                let mut p = pixel(sy, sx);
                if !kept[(sy / ch) * gw + sx / cw] {
                    p = p.map(grey_out);
                }
                img.put_pixel((x0 + x) as u32, y as u32, Rgb(p));
            }
        }
    }
    Ok(img)
}

/// Renders one image (`display`: CHW in `[0, 1]`) beside ToMe's merge map: every patch filled
/// with the mean colour of the patches merged into the same final token, with a dark line
/// between patches of different tokens.
pub fn render_merged(display: &[f32], [c, h, w]: [usize; 3], grid: [usize; 2], merged: &[usize], scale: usize) -> Result<RgbImage> {
    ensure!(c == 1 || c == 3, "can only draw 1- or 3-channel images, got {c}");
    ensure!(display.len() == c * h * w, "image has {} values, expected {c}×{h}×{w}", display.len());
    ensure!(scale >= 1, "scale must be at least 1");
    let [gh, gw] = grid;
    ensure!(gh >= 1 && gw >= 1 && h.is_multiple_of(gh) && w.is_multiple_of(gw), "a {gh}×{gw} grid does not tile a {h}×{w} image");
    ensure!(merged.len() == gh * gw, "{} merge entries for a {gh}×{gw} grid", merged.len());
    let (ch, cw) = (h / gh, w / gw);
    let value = |k: usize, y: usize, x: usize| display[k * h * w + y * w + x].clamp(0.0, 1.0) as f64;
    let tokens = merged.iter().max().map_or(0, |m| m + 1);
    let mut sum = vec![[0.0f64; 3]; tokens];
    let mut count = vec![0usize; tokens];
    for y in 0..h {
        for x in 0..w {
            let t = merged[(y / ch) * gw + x / cw];
            for (k, acc) in sum[t].iter_mut().enumerate() {
                *acc += value(if c == 1 { 0 } else { k }, y, x);
            }
            count[t] += 1;
        }
    }
    let mean: Vec<[u8; 3]> = sum.iter().zip(&count).map(|(s, &n)| s.map(|v| (v / n.max(1) as f64 * 255.0).round() as u8)).collect();
    let (pw, ph) = (w * scale, h * scale);
    let mut img = RgbImage::from_pixel((2 * pw + GAP) as u32, ph as u32, Rgb([255, 255, 255]));
    for y in 0..ph {
        for x in 0..pw {
            let (sy, sx) = (y / scale, x / scale);
            let px = |k: usize| (value(if c == 1 { 0 } else { k }, sy, sx) * 255.0).round() as u8;
            img.put_pixel(x as u32, y as u32, Rgb([px(0), px(1), px(2)]));
            let cell = (sy / ch) * gw + sx / cw;
            let t = merged[cell];
            // The last pixel row/column of a cell whose neighbour below/right is another token.
            let edge_right = x % (cw * scale) == cw * scale - 1 && sx / cw + 1 < gw && merged[cell + 1] != t;
            let edge_down = y % (ch * scale) == ch * scale - 1 && sy / ch + 1 < gh && merged[cell + gw] != t;
            let p = if edge_right || edge_down { [40, 40, 40] } else { mean[t] };
            img.put_pixel((pw + GAP + x) as u32, y as u32, Rgb(p));
        }
    }
    Ok(img)
}

/// Images to show: model inputs `[N, C, H, W]`, the same images for display (CHW in `[0, 1]`),
/// and labels where known.
struct Images {
    inputs: Vec<f32>,
    shape: [usize; 4],
    display: Vec<Vec<f32>>,
    labels: Vec<Option<usize>>,
}

/// The first `n` test images of `cfg`'s dataset, transformed as for evaluation.
fn dataset_images(cfg: &DataConfig, base: &Path, n: usize) -> Result<Images> {
    let splits = data::open(cfg, base)?;
    let loader = Loader::try_new(splits.test.clone(), cfg, false, 0)?;
    let transform = loader.transform().clone();
    let [c, h, w] = transform.output_shape();
    let n = n.min(splits.test.len());
    ensure!(n >= 1, "{}: no test images", splits.test.describe());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (mut inputs, mut display, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let s = splits.test.get(i)?;
        let x = transform.apply(s.image, &mut rng)?;
        let shown = match &transform.norm {
            Some((mean, std)) => x.iter().enumerate().map(|(k, &v)| v * std[k / (h * w)] + mean[k / (h * w)]).collect(),
            None => x.clone(),
        };
        inputs.extend(x);
        display.push(shown);
        labels.push(Some(s.label));
    }
    Ok(Images { inputs, shape: [n, c, h, w], display, labels })
}

/// The first `n` images of tensor `input` of a safetensors file.
fn tensor_images(path: &Path, n: usize) -> Result<Images> {
    let t = import::read_tensor(path, "input")?;
    ensure!(t.shape.len() == 4, "{}: input must be [N, C, H, W], got shape {:?}", path.display(), t.shape);
    let [total, c, h, w] = [t.shape[0], t.shape[1], t.shape[2], t.shape[3]];
    let n = n.min(total);
    ensure!(n >= 1, "{}: input holds no image", path.display());
    let per = c * h * w;
    let inputs = t.data[..n * per].to_vec();
    let display = inputs
        .chunks(per)
        .map(|img| {
            let (lo, hi) = img.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
            let span = if hi > lo { hi - lo } else { 1.0 };
            img.iter().map(|&v| (v - lo) / span).collect()
        })
        .collect();
    Ok(Images { inputs, shape: [n, c, h, w], display, labels: vec![None; n] })
}

fn images_from_data(spec: &str, root: Option<&Path>, img_size: Option<usize>, base: &Path, n: usize) -> Result<Images> {
    if spec.ends_with(".safetensors") || Path::new(spec).is_file() {
        return tensor_images(&data::resolve(Path::new(spec), base), n);
    }
    let kind = DatasetKind::from_name(spec).context("--data: neither a safetensors file nor a dataset name")?;
    let mut cfg = DataConfig::for_dataset(kind);
    cfg.root = root.map(Path::to_path_buf);
    if let Some(s) = img_size {
        cfg.resize = Some([s, s]);
    }
    dataset_images(&cfg, base, n)
}

/// `rlprune visualize`: writes `image_XXXX.png` per image and `index.json` (label, prediction,
/// kept cells per stage) into `opts.out` (the PNGs are `files`), or, for a run whose method draws
/// its own picture ([`crate::methods::Method::visualize`]), that picture.
pub fn visualize(opts: &VisualizeOptions) -> Result<Drawn> {
    ensure!(opts.images >= 1, "--images must be at least 1");
    if let Some(s) = opts.scale {
        ensure!((1..=64).contains(&s), "--scale must be in 1..=64, got {s}");
    }
    let base = &opts.base_dir;
    let target = data::resolve(&opts.target, base);
    let device = Default::default();
    let (model, images, source): (AnyBackbone<Cpu>, Images, String) = if target.is_dir() {
        let cfg = crate::experiment::experiment_of(&target)?;
        let (exp, layered) = crate::methods::load(&cfg, &[])?;
        if let Some(ctl) = &exp.controller
            && let Some(draw) = crate::methods::kind(&ctl.kind)?.visualize
        {
            return draw(&exp, &layered, &target, base, &opts.out);
        }
        let weights = match &opts.weights {
            Some(w) => data::resolve(w, base),
            None => {
                let ck = checkpoint::dir(&target);
                let best = ck.join("best.safetensors");
                let last = ck.join("last.safetensors");
                if best.is_file() {
                    best
                } else if last.is_file() {
                    last
                } else {
                    bail!("{}: no checkpoints/best.safetensors or last.safetensors (pass --weights)", target.display());
                }
            }
        };
        // The model is built for the experiment's data, whatever --data shows it.
        let splits = data::open(&exp.data, base)?;
        let loader = Loader::try_new(splits.train.clone(), &exp.data, false, exp.seed)?;
        let ctx = crate::session::supervised::build_context(splits.train.as_ref(), &loader);
        let model = crate::session::supervised::build_backbone::<Cpu>(&exp, &layered, &ctx, base, &device)?;
        let dict = checkpoint::read_model(&weights, &exp.backbone.arch, None)?;
        let model = load_strict(model, &dict, &weights.display().to_string())?;
        let images = match &opts.data {
            Some(d) => images_from_data(d, opts.data_root.as_deref(), Some(ctx.img_size[0]), base, opts.images)?,
            None => dataset_images(&exp.data, base, opts.images)?,
        };
        (model, images, format!("{} ({})", target.display(), weights.display()))
    } else if target.is_file() || ModelSpec::named(&target.to_string_lossy()).is_some() {
        let spec = resolve_model(&target.to_string_lossy(), &[])?;
        let weights = opts.weights.as_ref().map(|w| data::resolve(w, base)).context("a model TOML or zoo name needs --weights FILE")?;
        let data = opts
            .data
            .as_deref()
            .context("a model TOML or zoo name needs --data (a dataset name or a safetensors file with tensor `input`)")?;
        let dict = import::read_model_weights(&weights)?;
        let model = load_strict(spec.build::<Cpu>(&device)?, &dict, &weights.display().to_string())?;
        let images = images_from_data(data, opts.data_root.as_deref(), spec.img_size(), base, opts.images)?;
        if let Some(s) = spec.img_size() {
            ensure!(images.shape[2] == s && images.shape[3] == s, "the model is built for {s}×{s} images, the data has {}×{}", images.shape[2], images.shape[3]);
        }
        (model, images, format!("{} ({})", target.display(), weights.display()))
    } else {
        bail!("{}: neither a run directory, a model TOML file nor a zoo name", target.display());
    };

    let [n, c, h, w] = images.shape;
    let x = Tensor::<Cpu, 4>::from_data(TensorData::new(images.inputs.clone(), images.shape), &device);
    let map = keep_map(&model, x)?;
    let scale = opts.scale.unwrap_or_else(|| 224usize.div_ceil(h.max(w)).max(1));
    std::fs::create_dir_all(&opts.out).with_context(|| format!("{}: cannot create the output directory", opts.out.display()))?;
    let mut files = Vec::with_capacity(n);
    let mut entries = Vec::with_capacity(n);
    for i in 0..n {
        let stages: Vec<&[usize]> = map.stages.iter().map(|s| s[i].as_slice()).collect();
        let img = match map.merged.get(i) {
            Some(merged) => render_merged(&images.display[i], [c, h, w], map.grid, merged, scale)?,
            None => render(&images.display[i], [c, h, w], map.grid, &stages, scale)?,
        };
        let file = opts.out.join(format!("image_{i:04}.png"));
        img.save(&file).with_context(|| format!("{}: cannot write", file.display()))?;
        let mut entry = json!({
            "file": file.file_name().map(|f| f.to_string_lossy().to_string()),
            "label": images.labels[i],
            "predicted": map.predicted[i],
            "kept": stages,
        });
        if let Some(merged) = map.merged.get(i) {
            entry["merged_into"] = json!(merged);
            entry["final_tokens"] = json!(merged.iter().collect::<std::collections::BTreeSet<_>>().len());
        }
        entries.push(entry);
        files.push(file);
    }
    let index = json!({
        "source": source,
        "grid": map.grid,
        "cell_pixels": [h / map.grid[0].max(1), w / map.grid[1].max(1)],
        "scale": scale,
        "images": entries,
    });
    crate::fsutil::atomic_write(&opts.out.join("index.json"), serde_json::to_string_pretty(&index)?.as_bytes())?;
    let summary = format!("{} image(s) and index.json", files.len());
    Ok(Drawn { files, summary })
}
