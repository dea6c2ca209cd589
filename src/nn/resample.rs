//! Resampling pretrained parameters whose shape follows the input resolution, so that weights
//! trained at one image size load into the same model built for another: position embeddings
//! (DeiT's and GFNet's fine-tuning scripts: bicubic, `align_corners=False`, extra tokens kept)
//! and GFNet's global filters (its fine-tuning script: bicubic, `align_corners=True`, real and
//! imaginary parts of each channel as separate images). The arithmetic is PyTorch's
//! `F.interpolate(mode='bicubic')`: cubic convolution with `A = −0.75`, source indices clamped
//! at the border.

use anyhow::{bail, ensure, Result};

use super::params::{HostTensor, StateDict};

const A: f64 = -0.75;

fn cubic_near(x: f64) -> f64 {
    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
}

fn cubic_far(x: f64) -> f64 {
    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
}

/// Per output index along one axis: the four clamped source indices and their weights.
fn axis_taps(n_in: usize, n_out: usize, align_corners: bool) -> Vec<([usize; 4], [f64; 4])> {
    let scale = if align_corners {
        if n_out > 1 { (n_in as f64 - 1.0) / (n_out as f64 - 1.0) } else { 0.0 }
    } else {
        n_in as f64 / n_out as f64
    };
    (0..n_out)
        .map(|o| {
            let src = if align_corners { scale * o as f64 } else { scale * (o as f64 + 0.5) - 0.5 };
            let base = src.floor();
            let t = src - base;
            let clamp = |i: f64| i.clamp(0.0, n_in as f64 - 1.0) as usize;
            let idx = [clamp(base - 1.0), clamp(base), clamp(base + 1.0), clamp(base + 2.0)];
            (idx, [cubic_far(t + 1.0), cubic_near(t), cubic_near(1.0 - t), cubic_far(2.0 - t)])
        })
        .collect()
}

/// Bicubic resize of `channels` planes `[C, h, w]` (row-major) to `[C, out_h, out_w]`.
pub fn bicubic(planes: &[f32], channels: usize, [h, w]: [usize; 2], [out_h, out_w]: [usize; 2], align_corners: bool) -> Vec<f32> {
    assert_eq!(planes.len(), channels * h * w);
    let rows = axis_taps(h, out_h, align_corners);
    let cols = axis_taps(w, out_w, align_corners);
    let mut out = Vec::with_capacity(channels * out_h * out_w);
    for plane in planes.chunks(h * w) {
        for (ri, rw) in &rows {
            for (ci, cw) in &cols {
                let mut acc = 0.0f64;
                for (r, wr) in ri.iter().zip(rw) {
                    let row = &plane[r * w..(r + 1) * w];
                    let along: f64 = ci.iter().zip(cw).map(|(&c, wc)| row[c] as f64 * wc).sum();
                    acc += wr * along;
                }
                out.push(acc as f32);
            }
        }
    }
    out
}

/// A position embedding `[1, extra + g·g, D]` resampled to `[1, extra + g'·g', D]`
/// (`new_grid = [g', g']`, or any `[h', w']`): the `extra` leading tokens (class/distillation
/// tokens) are kept, the grid tokens are resized bicubically with `align_corners=False`.
pub fn resample_pos_embed(t: &HostTensor, extra: usize, new_grid: [usize; 2]) -> Result<HostTensor> {
    let [one, tokens, dim] = t.shape[..] else { bail!("a position embedding is [1, tokens, dim], got {:?}", t.shape) };
    ensure!(one == 1 && tokens > extra, "a position embedding is [1, tokens, dim] with more than {extra} tokens, got {:?}", t.shape);
    let grid = tokens - extra;
    let side = (grid as f64).sqrt().round() as usize;
    ensure!(side * side == grid, "the position embedding's {grid} patch tokens are not a square grid");
    // [g·g, D] → D planes [g, g] → resized → back to tokens.
    let mut planes = vec![0.0f32; dim * grid];
    for p in 0..grid {
        for c in 0..dim {
            planes[c * grid + p] = t.data[(extra + p) * dim + c];
        }
    }
    let resized = bicubic(&planes, dim, [side, side], new_grid, false);
    let new_cells = new_grid[0] * new_grid[1];
    let mut data = t.data[..extra * dim].to_vec();
    data.resize((extra + new_cells) * dim, 0.0);
    for p in 0..new_cells {
        for c in 0..dim {
            data[(extra + p) * dim + c] = resized[c * new_cells + p];
        }
    }
    Ok(HostTensor::new(vec![1, extra + new_cells, dim], data))
}

/// A global filter `[h, w, C, 2]` (GFNet's layout) resized to `[h', w', C, 2]`, bicubic with
/// `align_corners=True`, each channel's real and imaginary parts as separate images.
pub fn resample_global_filter(t: &HostTensor, [h2, w2]: [usize; 2]) -> Result<HostTensor> {
    let [h, w, c, two] = t.shape[..] else { bail!("a global filter is [h, w, C, 2], got {:?}", t.shape) };
    ensure!(two == 2, "a global filter is [h, w, C, 2], got {:?}", t.shape);
    let lanes = c * 2;
    let mut planes = vec![0.0f32; lanes * h * w];
    for p in 0..h * w {
        for l in 0..lanes {
            planes[l * h * w + p] = t.data[p * lanes + l];
        }
    }
    let resized = bicubic(&planes, lanes, [h, w], [h2, w2], true);
    let mut data = vec![0.0f32; h2 * w2 * lanes];
    for p in 0..h2 * w2 {
        for l in 0..lanes {
            data[p * lanes + l] = resized[l * h2 * w2 + p];
        }
    }
    Ok(HostTensor::new(vec![h2, w2, c, 2], data))
}

/// What a model declares about its resolution-dependent parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolutionParam {
    /// A position embedding with this many leading non-patch tokens.
    PosEmbed { extra_tokens: usize },
    /// A global filter `[h, w, C, 2]`.
    GlobalFilter,
}

/// Rewrites every entry of `dict` named in `params` whose shape differs from the model's
/// (`shapes`, from [`super::params::param_shapes`]) to the model's shape. Returns one line per
/// resized entry (`pos_embed: [1, 197, 192] → [1, 325, 192]`). Entries the model does not have,
/// or whose non-spatial sizes differ (another width), are left for the strict load to report.
pub fn adapt_to_resolution(
    dict: &mut StateDict,
    shapes: &std::collections::BTreeMap<String, Vec<usize>>,
    params: &[(String, ResolutionParam)],
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    for (key, kind) in params {
        let (Some(t), Some(want)) = (dict.get(key), shapes.get(key)) else { continue };
        if &t.shape == want {
            continue;
        }
        let resized = match (kind, &want[..]) {
            (ResolutionParam::PosEmbed { extra_tokens }, &[1, tokens, dim]) if t.shape.len() == 3 && t.shape[2] == dim => {
                let cells = tokens.saturating_sub(*extra_tokens);
                let side = (cells as f64).sqrt().round() as usize;
                if side * side != cells || cells == 0 {
                    continue;
                }
                resample_pos_embed(t, *extra_tokens, [side, side])?
            }
            (ResolutionParam::GlobalFilter, &[h2, w2, c, 2]) if t.shape.len() == 4 && t.shape[2] == c && t.shape[3] == 2 => {
                resample_global_filter(t, [h2, w2])?
            }
            _ => continue,
        };
        notes.push(format!("{key}: {:?} → {:?}", t.shape, resized.shape));
        dict.insert(key.clone(), resized);
    }
    Ok(notes)
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // reference values as PyTorch printed them
mod tests {
    use super::*;

    fn input(c: usize, h: usize, w: usize) -> Vec<f32> {
        (0..c * h * w).map(|i| (0.37 * i as f64).sin() as f32 + 0.1 * (i % 5) as f32).collect()
    }

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 2e-6, "max abs difference {worst}");
    }

    // Expected values: torch 2.15 `F.interpolate(x, size, mode='bicubic', align_corners=...)`
    // on the same inputs (`sin(0.37 i) + 0.1 (i mod 5)`, shape [1, C, h, w]).
    #[test]
    fn bicubic_matches_pytorch_upsampling() {
        let got = bicubic(&input(2, 4, 4), 2, [4, 4], [6, 6], false);
        #[rustfmt::skip]
        let want = [-1.6799429e-01, 1.0596302e-01, 5.2391517e-01, 7.8492337e-01, 1.0970707e+00, 1.2682635e+00, 7.8393292e-01, 7.6041782e-01, 8.1423938e-01, 9.7857696e-01, 1.0785633e+00, 1.0998868e+00, 1.4501921e+00, 1.1807406e+00, 8.4225219e-01, 7.3477626e-01, 5.6500167e-01, 4.5941654e-01, 7.7336538e-01, 6.4485234e-01, 2.7595571e-01, -2.1268268e-01, -4.8649809e-01, -5.2266169e-01, -2.1975149e-01, -2.3799284e-01, -3.6362290e-01, -5.8349991e-01, -7.6301116e-01, -8.3358538e-01, -8.7951684e-01, -8.4925830e-01, -7.2170621e-01, -5.1321280e-01, -5.5128127e-01, -6.8188459e-01, -3.9752567e-01, -1.5939176e-01, 2.3497088e-01, 5.2326798e-01, 8.9820772e-01, 1.1174766e+00, 2.8359169e-01, 5.0154567e-01, 8.1322485e-01, 9.8000646e-01, 1.1529287e+00, 1.2361131e+00, 1.0239763e+00, 1.0417844e+00, 1.0566385e+00, 1.0528779e+00, 9.6561158e-01, 8.8423425e-01, 1.1174108e+00, 7.4242437e-01, 3.0141670e-01, 2.1440922e-01, 2.0795798e-02, -1.1390483e-01, 2.5116530e-01, -1.1182111e-03, -3.7850446e-01, -6.1277580e-01, -7.1471578e-01, -6.9946814e-01, -6.2817985e-01, -5.8707172e-01, -6.9705236e-01, -1.0302296e+00, -9.9243593e-01, -8.0780065e-01];
        close(&got, &want);
    }

    #[test]
    fn bicubic_matches_pytorch_with_align_corners_and_downsampling() {
        let got = bicubic(&input(3, 3, 2), 3, [3, 2], [5, 3], true);
        #[rustfmt::skip]
        let want = [0.0000000e+00, 2.3080774e-01, 4.6161544e-01, 3.8824460e-01, 6.1943942e-01, 8.5063434e-01, 8.7428790e-01, 1.0349933e+00, 1.1956987e+00, 1.2170489e+00, 1.1821781e+00, 1.1473073e+00, 1.3958808e+00, 1.1785780e+00, 9.6127522e-01, 8.9656550e-01, 8.1030494e-01, 7.2404432e-01, 7.8330892e-01, 6.6865623e-01, 5.5400348e-01, 4.8059627e-01, 3.4665081e-01, 2.1270533e-01, -6.3617021e-02, -1.7776789e-01, -2.9191875e-01, -5.2983612e-01, -6.1525142e-01, -7.0066679e-01, -7.6313090e-01, -7.2918534e-01, -6.9523984e-01, -6.5014499e-01, -7.0725751e-01, -7.6436996e-01, -4.9264768e-01, -5.8094382e-01, -6.6923988e-01, -3.4859282e-01, -2.8868398e-01, -2.2877514e-01, -2.5525355e-01, -2.4219453e-02, 2.0681465e-01];
        close(&got, &want);
        let got = bicubic(&input(2, 4, 4), 2, [4, 4], [3, 3], false);
        #[rustfmt::skip]
        let want = [2.5742087e-01, 7.3174852e-01, 1.1229715e+00, 1.1280376e+00, 4.2708755e-01, -1.3590558e-02, -5.9823835e-01, -5.3174508e-01, -6.7230529e-01, -3.3872284e-02, 5.6426477e-01, 1.0634749e+00, 1.1002365e+00, 7.1416038e-01, 4.5462325e-01, -3.1809574e-01, -7.1030122e-01, -7.7613837e-01];
        close(&got, &want);
    }

    #[test]
    fn same_size_is_identity_and_extra_tokens_are_kept() {
        let planes = input(3, 5, 5);
        close(&bicubic(&planes, 3, [5, 5], [5, 5], false), &planes);
        close(&bicubic(&planes, 3, [5, 5], [5, 5], true), &planes);
        let pos = HostTensor::new(vec![1, 1 + 9, 4], input(1, 10, 4));
        let up = resample_pos_embed(&pos, 1, [5, 5]).unwrap();
        assert_eq!(up.shape, vec![1, 26, 4]);
        assert_eq!(&up.data[..4], &pos.data[..4], "the class token is kept");
        // Token-major layout: token p's channel c is the resized plane c at p.
        let planes: Vec<f32> = (0..4).flat_map(|c| (0..9).map(move |p| (c, p))).map(|(c, p)| pos.data[(1 + p) * 4 + c]).collect();
        let want = bicubic(&planes, 4, [3, 3], [5, 5], false);
        assert_eq!(up.data[(1 + 7) * 4 + 2], want[2 * 25 + 7]);
        assert!(resample_pos_embed(&HostTensor::new(vec![1, 1 + 8, 4], input(1, 9, 4)), 1, [4, 4]).is_err());
    }

    #[test]
    fn adapt_resizes_only_what_the_model_declares() {
        let mut dict = StateDict::new();
        dict.insert("pos_embed".into(), HostTensor::new(vec![1, 5, 2], input(1, 5, 2)));
        dict.insert("blocks.0.filter.complex_weight".into(), HostTensor::new(vec![2, 2, 3, 2], input(1, 8, 3)));
        dict.insert("head.weight".into(), HostTensor::new(vec![7, 2], input(1, 7, 2)));
        let shapes = [("pos_embed", vec![1, 10, 2]), ("blocks.0.filter.complex_weight", vec![3, 2, 3, 2]), ("head.weight", vec![3, 2])]
            .into_iter()
            .map(|(k, s)| (k.to_string(), s))
            .collect();
        let params = vec![
            ("pos_embed".to_string(), ResolutionParam::PosEmbed { extra_tokens: 1 }),
            ("blocks.0.filter.complex_weight".to_string(), ResolutionParam::GlobalFilter),
        ];
        let notes = adapt_to_resolution(&mut dict, &shapes, &params).unwrap();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert_eq!(dict["pos_embed"].shape, vec![1, 10, 2]);
        assert_eq!(dict["blocks.0.filter.complex_weight"].shape, vec![3, 2, 3, 2]);
        assert_eq!(dict["head.weight"].shape, vec![7, 2], "the classifier is not a resolution parameter");
    }
}
