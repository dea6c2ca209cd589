//! The `[data]` table of an experiment file.
//!
//! Every key has a default except `dataset`. [`DataConfig::validate`] reports out-of-range values
//! as `(key, message)` pairs so that the experiment loader can print them as `data.<key>: ...`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Which dataset a `[data]` table reads.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// MNIST digits, IDX files (`train-images-idx3-ubyte[.gz]`, ...).
    Mnist,
    /// Fashion-MNIST (Zalando), IDX files with the MNIST names.
    FashionMnist,
    /// CIFAR-10 binary version (`data_batch_{1..5}.bin`, `test_batch.bin`).
    Cifar10,
    /// CIFAR-100 binary version (`train.bin`, `test.bin`), fine labels.
    Cifar100,
    /// One sub-folder per class of PNG/JPEG images (`<root>/<train_dir>/<class>/*.png`).
    ImageFolder,
    /// Generated, learnable patterns; needs no files (tests, smoke runs).
    #[default]
    Synthetic,
}

impl DatasetKind {
    /// All kinds, in documentation order.
    pub const ALL: [DatasetKind; 6] = [
        DatasetKind::Mnist,
        DatasetKind::FashionMnist,
        DatasetKind::Cifar10,
        DatasetKind::Cifar100,
        DatasetKind::ImageFolder,
        DatasetKind::Synthetic,
    ];

    /// The name used in TOML and on the command line (`fashion-mnist`).
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::ImageFolder => "image-folder",
            DatasetKind::Synthetic => "synthetic",
        }
    }

    /// Parses a TOML/CLI name. Also accepts the common spellings `cifar-10`, `cifar-100`,
    /// `fashion_mnist`, `fashionmnist` and `imagefolder`.
    pub fn from_name(name: &str) -> anyhow::Result<Self> {
        let n = name.trim().to_ascii_lowercase().replace('_', "-");
        Ok(match n.as_str() {
            "mnist" => DatasetKind::Mnist,
            "fashion-mnist" | "fashionmnist" => DatasetKind::FashionMnist,
            "cifar10" | "cifar-10" => DatasetKind::Cifar10,
            "cifar100" | "cifar-100" => DatasetKind::Cifar100,
            "image-folder" | "imagefolder" => DatasetKind::ImageFolder,
            "synthetic" => DatasetKind::Synthetic,
            _ => anyhow::bail!(
                "unknown dataset {name:?}; expected one of: {}",
                DatasetKind::ALL.map(|k| k.name()).join(", ")
            ),
        })
    }

    /// The folder name under `data/` where `open` looks and `data fetch` writes.
    pub fn default_dir_name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar-10-batches-bin",
            DatasetKind::Cifar100 => "cifar-100-binary",
            DatasetKind::ImageFolder => "image-folder",
            DatasetKind::Synthetic => "synthetic",
        }
    }

    /// Number of channels as stored, where fixed by the format (`None` for synthetic data,
    /// whose channel count is the `channels` key).
    pub fn stored_channels(self) -> Option<usize> {
        match self {
            DatasetKind::Mnist | DatasetKind::FashionMnist => Some(1),
            DatasetKind::Cifar10 | DatasetKind::Cifar100 | DatasetKind::ImageFolder => Some(3),
            DatasetKind::Synthetic => None,
        }
    }

    /// The standard per-channel `(mean, std)` used when `normalize = true` and no `mean`/`std`
    /// is given. ImageFolder uses the ImageNet statistics; synthetic data uses 0.5/0.25.
    pub fn standard_stats(self, channels: usize) -> (Vec<f32>, Vec<f32>) {
        match self {
            DatasetKind::Mnist => (vec![0.1307], vec![0.3081]),
            DatasetKind::FashionMnist => (vec![0.2860], vec![0.3530]),
            DatasetKind::Cifar10 => (vec![0.4914, 0.4822, 0.4465], vec![0.2470, 0.2435, 0.2616]),
            DatasetKind::Cifar100 => (vec![0.5071, 0.4865, 0.4409], vec![0.2673, 0.2564, 0.2762]),
            DatasetKind::ImageFolder => (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225]),
            DatasetKind::Synthetic => (vec![0.5; channels], vec![0.25; channels]),
        }
    }
}

impl std::fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn default_batch_size() -> usize {
    128
}
fn default_eval_batch_size() -> usize {
    256
}
fn default_prefetch() -> usize {
    4
}
fn default_workers() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_train_dir() -> PathBuf {
    PathBuf::from("train")
}
fn default_test_dir() -> PathBuf {
    PathBuf::from("val")
}
fn default_classes() -> usize {
    10
}
fn default_channels() -> usize {
    1
}
fn default_size() -> usize {
    28
}
fn default_train_size() -> usize {
    512
}
fn default_test_size() -> usize {
    128
}

/// `[data]` keys that apply to one kind of dataset only.
pub const KIND_ONLY_KEYS: &[(DatasetKind, &[&str])] = &[
    (DatasetKind::ImageFolder, &["train_dir", "test_dir"]),
    (DatasetKind::Synthetic, &["classes", "channels", "size", "train_size", "test_size", "synthetic_seed"]),
];

/// The `[data]` table: which dataset, where it lives, batching and transforms.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset to read (required): `"mnist"`, `"fashion-mnist"`, `"cifar10"`, `"cifar100"`,
    /// `"image-folder"` or `"synthetic"`.
    pub dataset: DatasetKind,
    /// Directory holding the dataset files; a relative path resolves against the directory the
    /// command runs in. Default: none, which searches `data/<name>` (`data/mnist`,
    /// `data/fashion-mnist`, `data/cifar-10-batches-bin`, `data/cifar-100-binary`) and, for
    /// Fashion-MNIST, the Debian package's `/usr/share/datasets/fashion-mnist`. Required for
    /// `image-folder`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Images per training batch. Default: 128.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Images per evaluation batch. Default: 256.
    #[serde(default = "default_eval_batch_size")]
    pub eval_batch_size: usize,
    /// Batches prepared ahead of the consumer by the background loader. Default: 4.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Background threads that read and transform batches (useful for `image-folder`, which
    /// decodes lazily). Results do not depend on it. Default: 1.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Drop the last incomplete training batch of each epoch (never below one batch; evaluation
    /// never drops images). Default: true.
    #[serde(default = "default_true")]
    pub drop_last: bool,
    /// Normalise each channel as `(x - mean) / std` after the other transforms. Default: true,
    /// with the dataset's standard statistics (MNIST 0.1307/0.3081, Fashion-MNIST 0.2860/0.3530,
    /// CIFAR-10 (0.4914, 0.4822, 0.4465)/(0.2470, 0.2435, 0.2616), CIFAR-100
    /// (0.5071, 0.4865, 0.4409)/(0.2673, 0.2564, 0.2762), image-folder ImageNet
    /// (0.485, 0.456, 0.406)/(0.229, 0.224, 0.225), synthetic 0.5/0.25).
    #[serde(default = "default_true")]
    pub normalize: bool,
    /// Per-channel means overriding the standard ones (one value, or one per channel).
    /// Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<Vec<f32>>,
    /// Per-channel standard deviations overriding the standard ones (one value, or one per
    /// channel; each > 0). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<Vec<f32>>,
    /// Bilinear resize to `[height, width]`, applied first, to train and test images. Required
    /// for `image-folder` (where images of any size are resized while decoding). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<[usize; 2]>,
    /// Training augmentation: zero-pad each side by this many pixels, then crop a random window
    /// of the original size. 0 disables it. Default: 0.
    #[serde(default)]
    pub random_crop_padding: usize,
    /// Training augmentation: flip images left-right with probability 0.5. Default: false.
    #[serde(default)]
    pub hflip: bool,
    /// Use at most this many training images: a deterministic class-balanced subset (the first
    /// images of each class in file order, taken round-robin over classes). Default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_limit: Option<usize>,
    /// Use at most this many test images, chosen like `train_limit`. Default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_limit: Option<usize>,
    /// `image-folder` only: training split folder, relative to `root`. Default: `"train"`.
    #[serde(default = "default_train_dir")]
    pub train_dir: PathBuf,
    /// `image-folder` only: test split folder, relative to `root`. Default: `"val"`.
    #[serde(default = "default_test_dir")]
    pub test_dir: PathBuf,
    /// `synthetic` only: number of classes. Default: 10.
    #[serde(default = "default_classes")]
    pub classes: usize,
    /// `synthetic` only: image channels. Default: 1.
    #[serde(default = "default_channels")]
    pub channels: usize,
    /// `synthetic` only: image height and width. Default: 28.
    #[serde(default = "default_size")]
    pub size: usize,
    /// `synthetic` only: number of training images. Default: 512.
    #[serde(default = "default_train_size")]
    pub train_size: usize,
    /// `synthetic` only: number of test images. Default: 128.
    #[serde(default = "default_test_size")]
    pub test_size: usize,
    /// `synthetic` only: seed of the generated images (the class patterns and the noise).
    /// Default: 0.
    #[serde(default)]
    pub synthetic_seed: u64,
}

impl Default for DataConfig {
    /// A synthetic dataset with every other key at its default.
    fn default() -> Self {
        Self::for_dataset(DatasetKind::Synthetic)
    }
}

impl DataConfig {
    /// The given dataset with every other key at its default.
    pub fn for_dataset(dataset: DatasetKind) -> Self {
        Self {
            dataset,
            root: None,
            batch_size: default_batch_size(),
            eval_batch_size: default_eval_batch_size(),
            prefetch: default_prefetch(),
            workers: default_workers(),
            drop_last: true,
            normalize: true,
            mean: None,
            std: None,
            resize: None,
            random_crop_padding: 0,
            hflip: false,
            train_limit: None,
            test_limit: None,
            train_dir: default_train_dir(),
            test_dir: default_test_dir(),
            classes: default_classes(),
            channels: default_channels(),
            size: default_size(),
            train_size: default_train_size(),
            test_size: default_test_size(),
            synthetic_seed: 0,
        }
    }

    /// Channels of the stored images (before transforms).
    pub fn stored_channels(&self) -> usize {
        self.dataset.stored_channels().unwrap_or(self.channels)
    }

    /// The per-channel `(mean, std)` that normalisation uses, one entry per channel, or `None`
    /// when `normalize = false`. A one-element `mean`/`std` is broadcast to all channels.
    pub fn normalization(&self) -> anyhow::Result<Option<(Vec<f32>, Vec<f32>)>> {
        if !self.normalize {
            return Ok(None);
        }
        let c = self.stored_channels();
        let (m0, s0) = self.dataset.standard_stats(c);
        let expand = |key: &str, v: Option<&Vec<f32>>, dflt: Vec<f32>| -> anyhow::Result<Vec<f32>> {
            match v {
                None => Ok(dflt),
                Some(v) if v.len() == 1 => Ok(vec![v[0]; c]),
                Some(v) if v.len() == c => Ok(v.clone()),
                Some(v) => {
                    anyhow::bail!("data.{key}: has {} values but {} images have {c} channel(s)", v.len(), self.dataset)
                }
            }
        };
        let mean = expand("mean", self.mean.as_ref(), m0)?;
        let std = expand("std", self.std.as_ref(), s0)?;
        if let Some(bad) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            anyhow::bail!("data.std: every value must be > 0, got {bad}");
        }
        Ok(Some((mean, std)))
    }

    /// Out-of-range values as `(key, message)`, keys relative to `[data]`. Empty when valid.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut errs: Vec<(String, String)> = Vec::new();
        let mut err = |k: &str, m: String| errs.push((k.to_string(), m));
        for (key, v) in [
            ("batch_size", self.batch_size),
            ("eval_batch_size", self.eval_batch_size),
            ("prefetch", self.prefetch),
            ("workers", self.workers),
        ] {
            if v == 0 {
                err(key, format!("must be > 0, got {v}"));
            }
        }
        if self.workers > 64 {
            err("workers", format!("must be <= 64, got {}", self.workers));
        }
        if let Some([h, w]) = self.resize {
            if h == 0 || w == 0 || h > 4096 || w > 4096 {
                err("resize", format!("both sides must be in 1..=4096, got [{h}, {w}]"));
            }
        } else if self.dataset == DatasetKind::ImageFolder {
            err(
                "resize",
                "required for dataset = \"image-folder\" (images are resized to [height, width] while decoding)"
                    .to_string(),
            );
        }
        if self.random_crop_padding > 1024 {
            err("random_crop_padding", format!("must be <= 1024, got {}", self.random_crop_padding));
        }
        for (key, v) in [("train_limit", self.train_limit), ("test_limit", self.test_limit)] {
            if v == Some(0) {
                err(key, "must be > 0 when set, got 0".to_string());
            }
        }
        let c = self.stored_channels();
        for (key, v) in [("mean", &self.mean), ("std", &self.std)] {
            if let Some(v) = v {
                if v.len() != 1 && v.len() != c {
                    err(
                        key,
                        format!(
                            "must have 1 or {c} value(s) ({} images have {c} channel(s)), got {}",
                            self.dataset,
                            v.len()
                        ),
                    );
                }
                if let Some(x) = v.iter().find(|x| !x.is_finite()) {
                    err(key, format!("values must be finite, got {x}"));
                }
            }
        }
        if let Some(s) = &self.std
            && let Some(x) = s.iter().find(|x| x.is_finite() && **x <= 0.0)
        {
            err("std", format!("values must be > 0, got {x}"));
        }
        match self.dataset {
            DatasetKind::ImageFolder if self.root.is_none() => {
                err("root", "required for dataset = \"image-folder\"".to_string());
            }
            DatasetKind::Synthetic => {
                if !(2..=1000).contains(&self.classes) {
                    err("classes", format!("must be in 2..=1000, got {}", self.classes));
                }
                if !(1..=16).contains(&self.channels) {
                    err("channels", format!("must be in 1..=16, got {}", self.channels));
                }
                if !(4..=1024).contains(&self.size) {
                    err("size", format!("must be in 4..=1024, got {}", self.size));
                }
                if self.train_size == 0 {
                    err("train_size", "must be > 0, got 0".to_string());
                }
                if self.test_size == 0 {
                    err("test_size", "must be > 0, got 0".to_string());
                }
            }
            _ => {}
        }
        errs
    }
}
