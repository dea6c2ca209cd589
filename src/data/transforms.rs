//! Image transforms on CHW `f32` buffers.
//!
//! The loader applies, in order: bilinear resize (`resize`, train and test), then for training
//! only a random crop of the zero-padded image (`random_crop_padding`) and a random left-right
//! flip (`hflip`), then per-channel normalisation (`normalize`, `mean`, `std`). Padding uses 0,
//! i.e. black before normalisation, as torchvision's `RandomCrop(padding=p)` does.

use rand::Rng;

use super::DataConfig;

/// Bilinear resize of a CHW image to `[oh, ow]` with half-pixel centres (PyTorch's
/// `align_corners=False`, no antialiasing). Returns the input unchanged when sizes agree.
pub fn resize_bilinear(src: &[f32], [c, h, w]: [usize; 3], [oh, ow]: [usize; 2]) -> Vec<f32> {
    if (h, w) == (oh, ow) || h == 0 || w == 0 {
        return src.to_vec();
    }
    // Source coordinate of each output row/column: (index, next index, weight of next).
    let axis = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|o| {
                let s = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (s.floor() as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                (i0, i1, s - i0 as f32)
            })
            .collect()
    };
    let ys = axis(h, oh);
    let xs = axis(w, ow);
    let mut out = Vec::with_capacity(c * oh * ow);
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        for &(y0, y1, fy) in &ys {
            let (r0, r1) = (&plane[y0 * w..(y0 + 1) * w], &plane[y1 * w..(y1 + 1) * w]);
            for &(x0, x1, fx) in &xs {
                let top = r0[x0] + (r0[x1] - r0[x0]) * fx;
                let bot = r1[x0] + (r1[x1] - r1[x0]) * fx;
                out.push(top + (bot - top) * fy);
            }
        }
    }
    out
}

/// The `h x w` window at `(top, left)` of the image zero-padded by `pad` on every side
/// (`top, left` in `0..=2 * pad`; `(pad, pad)` returns the image itself).
pub fn pad_crop(src: &[f32], [c, h, w]: [usize; 3], pad: usize, top: usize, left: usize) -> Vec<f32> {
    let mut out = vec![0f32; c * h * w];
    for ch in 0..c {
        for y in 0..h {
            let sy = (y + top) as isize - pad as isize;
            if sy < 0 || sy >= h as isize {
                continue;
            }
            let sy = sy as usize;
            for x in 0..w {
                let sx = (x + left) as isize - pad as isize;
                if sx >= 0 && (sx as usize) < w {
                    out[(ch * h + y) * w + x] = src[(ch * h + sy) * w + sx as usize];
                }
            }
        }
    }
    out
}

/// Mirrors a CHW image left-right in place.
pub fn hflip(img: &mut [f32], [_, _, w]: [usize; 3]) {
    if w == 0 {
        return;
    }
    for row in img.chunks_exact_mut(w) {
        row.reverse();
    }
}

/// `(x - mean[c]) / std[c]` in place, per channel.
pub fn normalize(img: &mut [f32], [c, h, w]: [usize; 3], mean: &[f32], std: &[f32]) {
    let plane = h * w;
    for ch in 0..c.min(mean.len()).min(std.len()) {
        let (m, inv) = (mean[ch], 1.0 / std[ch]);
        for v in &mut img[ch * plane..(ch + 1) * plane] {
            *v = (*v - m) * inv;
        }
    }
}

/// The per-sample transform pipeline of a loader.
#[derive(Debug, Clone, PartialEq)]
pub struct Transform {
    /// Shape of the images fed in.
    pub in_shape: [usize; 3],
    pub resize: Option<[usize; 2]>,
    /// Padding of the random crop (0: no crop).
    pub crop_padding: usize,
    pub hflip: bool,
    /// Per-channel `(mean, std)`; `None` leaves values in `[0, 1]`.
    pub norm: Option<(Vec<f32>, Vec<f32>)>,
}

impl Transform {
    /// The pipeline `cfg` asks for; augmentation only when `train`.
    pub fn from_config(cfg: &DataConfig, in_shape: [usize; 3], train: bool) -> anyhow::Result<Self> {
        let norm = cfg.normalization()?;
        if let Some((m, _)) = &norm
            && m.len() != in_shape[0]
        {
            anyhow::bail!(
                "data.mean/std: {} value(s) given but the images have {} channel(s)",
                m.len(),
                in_shape[0]
            );
        }
        Ok(Self {
            in_shape,
            resize: cfg.resize,
            crop_padding: if train { cfg.random_crop_padding } else { 0 },
            hflip: train && cfg.hflip,
            norm,
        })
    }

    /// `[C, H, W]` after the transforms.
    pub fn output_shape(&self) -> [usize; 3] {
        match self.resize {
            Some([h, w]) => [self.in_shape[0], h, w],
            None => self.in_shape,
        }
    }

    /// Whether [`Transform::apply`] draws random numbers.
    pub fn is_random(&self) -> bool {
        self.crop_padding > 0 || self.hflip
    }

    /// Transforms one image. Random draws, in this order: crop offsets (if cropping), flip (if
    /// flipping).
    pub fn apply<R: Rng + ?Sized>(&self, image: Vec<f32>, rng: &mut R) -> anyhow::Result<Vec<f32>> {
        let [c, h, w] = self.in_shape;
        if image.len() != c * h * w {
            anyhow::bail!("image has {} values, expected {c}x{h}x{w} = {}", image.len(), c * h * w);
        }
        let mut img = match self.resize {
            Some(size) => resize_bilinear(&image, self.in_shape, size),
            None => image,
        };
        let shape = self.output_shape();
        if self.crop_padding > 0 {
            let p = self.crop_padding;
            let top = rng.random_range(0..=2 * p);
            let left = rng.random_range(0..=2 * p);
            img = pad_crop(&img, shape, p, top, left);
        }
        if self.hflip && rng.random_bool(0.5) {
            hflip(&mut img, shape);
        }
        if let Some((m, s)) = &self.norm {
            normalize(&mut img, shape, m, s);
        }
        Ok(img)
    }
}
