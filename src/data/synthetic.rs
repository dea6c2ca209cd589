//! A generated, learnable dataset for tests and smoke runs.
//!
//! Class `k` of `K` is a sinusoidal grating whose orientation is `pi * k / K` and whose spatial
//! frequency cycles through four values, with a class-dependent phase per channel. Each image adds
//! a small random phase shift, a random contrast and Gaussian pixel noise, then clips to `[0, 1]`.
//! Image `i` of a split has label `i % K` and is generated on demand from
//! `(synthetic_seed, split, i)`, so nothing is stored and every read gives the same pixels.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::{DataConfig, Dataset, Sample, Split, out_of_range};

/// The parameters of a synthetic dataset (the `synthetic` keys of `[data]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    pub classes: usize,
    pub channels: usize,
    pub size: usize,
    pub train_size: usize,
    pub test_size: usize,
    pub seed: u64,
    /// Standard deviation of the per-pixel Gaussian noise.
    pub noise: f32,
}

impl SyntheticSpec {
    pub fn from_config(cfg: &DataConfig) -> Self {
        Self {
            classes: cfg.classes.max(1),
            channels: cfg.channels.max(1),
            size: cfg.size.max(1),
            train_size: cfg.train_size,
            test_size: cfg.test_size,
            seed: cfg.synthetic_seed,
            noise: 0.1,
        }
    }
}

/// SplitMix64 finaliser: a well-mixed 64-bit hash of `x`.
pub(crate) fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// One split of a synthetic dataset.
pub struct Synthetic {
    spec: SyntheticSpec,
    split: Split,
    len: usize,
}

impl Synthetic {
    pub fn new(spec: SyntheticSpec, split: Split) -> Self {
        let len = match split {
            Split::Train => spec.train_size,
            Split::Test => spec.test_size,
        };
        Self { spec, split, len }
    }

    fn render(&self, index: usize, label: usize) -> Vec<f32> {
        let s = &self.spec;
        let split_tag = match self.split {
            Split::Train => 1u64,
            Split::Test => 2u64,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(mix64(s.seed ^ mix64(split_tag ^ mix64(index as u64))));
        let k = label as f32;
        let theta = std::f32::consts::PI * k / s.classes as f32;
        let freq = [1.5f32, 2.5, 3.5, 4.5][label % 4];
        let (dx, dy) = (theta.cos(), theta.sin());
        let jitter: f32 = rng.random_range(-0.4..0.4);
        let contrast: f32 = rng.random_range(0.7..1.0);
        let noise = Normal::new(0.0f32, s.noise.max(0.0)).ok();
        let n = s.size as f32;
        let mut out = Vec::with_capacity(s.channels * s.size * s.size);
        for c in 0..s.channels {
            let phase = jitter + (c as f32) * (1.0 + (label % 3) as f32) * 0.9;
            for y in 0..s.size {
                for x in 0..s.size {
                    let t = (x as f32 * dx + y as f32 * dy) / n;
                    let mut v = 0.5 + 0.4 * contrast * (std::f32::consts::TAU * freq * t + phase).sin();
                    if let Some(d) = &noise {
                        v += d.sample(&mut rng);
                    }
                    out.push(v.clamp(0.0, 1.0));
                }
            }
        }
        out
    }
}

impl Dataset for Synthetic {
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, index: usize) -> anyhow::Result<Sample> {
        if index >= self.len {
            anyhow::bail!(out_of_range(index, self.len, &self.describe()));
        }
        let label = index % self.spec.classes;
        Ok(Sample { image: self.render(index, label), label })
    }
    fn label(&self, index: usize) -> anyhow::Result<usize> {
        if index >= self.len {
            anyhow::bail!(out_of_range(index, self.len, &self.describe()));
        }
        Ok(index % self.spec.classes)
    }
    fn image_shape(&self) -> [usize; 3] {
        [self.spec.channels, self.spec.size, self.spec.size]
    }
    fn num_classes(&self) -> usize {
        self.spec.classes
    }
    fn describe(&self) -> String {
        format!(
            "synthetic {} ({} images, {} classes, {}x{}x{}, seed {})",
            self.split.name(),
            self.len,
            self.spec.classes,
            self.spec.channels,
            self.spec.size,
            self.spec.size,
            self.spec.seed
        )
    }
}
