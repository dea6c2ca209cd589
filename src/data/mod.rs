//! The data layer: real dataset readers, transforms and a prefetching loader.
//!
//! * [`open`] turns the `[data]` table ([`DataConfig`]) into a train and a test [`Dataset`],
//!   searching the usual places when no `root` is given (see [`search_dirs`]).
//! * Readers: IDX for MNIST/Fashion-MNIST ([`mnist`]), the CIFAR binary batches ([`cifar`]),
//!   class-per-folder PNG/JPEG ([`image_folder`], decoded lazily) and a generated dataset
//!   ([`synthetic`]). IDX and CIFAR keep the raw `u8` pixels in memory.
//! * [`Loader`] streams batches from background threads; order and augmentation are a pure
//!   function of `(seed, epoch, train)`.
//! * [`fetch()`] downloads and verifies the official files; [`check()`] summarises a dataset.
//!
//! Every reader reports bad input as an `anyhow` error naming the file and the byte offset or
//! entry; nothing reachable from file contents panics.

pub mod cifar;
pub mod config;
pub mod fetch;
pub mod image_folder;
pub mod loader;
pub mod mnist;
pub mod synthetic;
pub mod transforms;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

pub use config::{DataConfig, DatasetKind};
pub use fetch::{check, fetch};
pub use loader::Loader;

/// One image and its label. `image` is CHW, values in `[0, 1]`, before normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub image: Vec<f32>,
    pub label: usize,
}

/// A random-access, labelled image collection.
pub trait Dataset: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;
    /// Whether the dataset holds no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The image at `index` (CHW, `[0, 1]`) and its label. Errors for an index out of range
    /// or an unreadable image.
    fn get(&self, index: usize) -> anyhow::Result<Sample>;
    /// `[C, H, W]` of every image as stored (after the decoding resize for `image-folder`).
    fn image_shape(&self) -> [usize; 3];
    /// Number of classes; labels are in `0..num_classes()`.
    fn num_classes(&self) -> usize;
    /// A one-line description, e.g. `fashion-mnist train (6000 images) from data/fashion-mnist-subset`.
    fn describe(&self) -> String;
    /// The label at `index` without decoding the image (readers override this where cheap).
    fn label(&self, index: usize) -> anyhow::Result<usize> {
        Ok(self.get(index)?.label)
    }
    /// Human-readable class names, `num_classes()` of them.
    fn class_names(&self) -> Vec<String> {
        (0..self.num_classes()).map(|c| c.to_string()).collect()
    }
}

/// Which half of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// A batch of transformed images (NCHW, row-major) with their labels and dataset indices.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<i64>,
    /// `[N, C, H, W]` after transforms.
    pub shape: [usize; 4],
    /// Index of each image in the dataset the loader reads.
    pub indices: Vec<usize>,
}

impl Batch {
    /// Number of images in the batch.
    pub fn len(&self) -> usize {
        self.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }

    /// Images as a `[N, C, H, W]` float tensor and labels as an `[N]` int tensor.
    pub fn to_tensors<B: Backend>(&self, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
        let images = Tensor::<B, 4>::from_data(TensorData::new(self.images.clone(), self.shape), device);
        let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(self.labels.clone(), [self.labels.len()]), device);
        (images, labels)
    }
}

/// The two halves of a dataset as opened from a `[data]` table.
#[derive(Clone)]
pub struct DataSplits {
    pub train: Arc<dyn Dataset>,
    pub test: Arc<dyn Dataset>,
}

/// Where the Debian package `dataset-fashion-mnist` installs Fashion-MNIST.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Resolves `p` against `base_dir` when relative.
pub fn resolve(p: &Path, base_dir: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base_dir.join(p) }
}

/// `p` relative to `base_dir` when it lies below it (for messages), else `p` itself.
pub(crate) fn shown(p: &Path, base_dir: &Path) -> String {
    p.strip_prefix(base_dir).unwrap_or(p).display().to_string()
}

/// The directories [`open`] tries, in order, for a file-backed dataset: the configured `root`
/// alone when given; else `<base_dir>/data/<name>` and, for Fashion-MNIST, the Debian package
/// directory. Empty for `synthetic`.
pub fn search_dirs(cfg: &DataConfig, base_dir: &Path) -> Vec<PathBuf> {
    if cfg.dataset == DatasetKind::Synthetic {
        return Vec::new();
    }
    if let Some(root) = &cfg.root {
        return vec![resolve(root, base_dir)];
    }
    let mut dirs = vec![base_dir.join("data").join(cfg.dataset.default_dir_name())];
    if cfg.dataset == DatasetKind::FashionMnist {
        dirs.push(PathBuf::from(DEBIAN_FASHION_MNIST));
    }
    dirs
}

/// Whether `dir` holds the files of a file-backed dataset, or which are missing.
fn missing_files(kind: DatasetKind, dir: &Path) -> Vec<String> {
    match kind {
        DatasetKind::Mnist | DatasetKind::FashionMnist => mnist::missing_files(dir),
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => cifar::missing_files(kind, dir),
        DatasetKind::ImageFolder | DatasetKind::Synthetic => Vec::new(),
    }
}

/// Finds the directory holding `cfg.dataset` (see [`search_dirs`]); a clear error listing the
/// places searched when there is none.
pub fn locate(cfg: &DataConfig, base_dir: &Path) -> anyhow::Result<PathBuf> {
    let kind = cfg.dataset;
    let dirs = search_dirs(cfg, base_dir);
    let mut tried = Vec::new();
    for dir in &dirs {
        if kind == DatasetKind::ImageFolder {
            if dir.is_dir() {
                return Ok(dir.clone());
            }
            tried.push(format!("{} (no such directory)", dir.display()));
            continue;
        }
        if !dir.is_dir() {
            tried.push(format!("{} (no such directory)", dir.display()));
            continue;
        }
        let missing = missing_files(kind, dir);
        if missing.is_empty() {
            return Ok(dir.clone());
        }
        tried.push(format!("{} (missing {})", dir.display(), missing.join(", ")));
    }
    if kind == DatasetKind::ImageFolder && dirs.is_empty() {
        anyhow::bail!(
            "dataset image-folder needs [data] root = \"<dir>\" holding {}/<class>/*.png",
            cfg.train_dir.display()
        );
    }
    let hint = match kind {
        DatasetKind::FashionMnist => format!(
            "run `rlprune data fetch fashion-mnist{}`, or `apt-get install dataset-fashion-mnist`, or set [data] root = \"data/fashion-mnist-subset\" (the subset shipped in the repository)",
            dir_hint(cfg)
        ),
        DatasetKind::Mnist | DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
            format!("run `rlprune data fetch {}{}`", kind.name(), dir_hint(cfg))
        }
        _ => "check [data] root".to_string(),
    };
    anyhow::bail!("dataset {} not found; searched: {}; {hint}", kind.name(), tried.join("; "))
}

fn dir_hint(cfg: &DataConfig) -> String {
    match &cfg.root {
        Some(r) => format!(" --dir {}", r.display()),
        None => String::new(),
    }
}

/// Opens the train and test halves described by `cfg`. `base_dir` is the directory that a
/// relative `root` (and the default `data/<name>`) resolves against: the repository / cwd.
/// `train_limit` / `test_limit` are applied here (see [`balanced_subset`]).
pub fn open(cfg: &DataConfig, base_dir: &Path) -> anyhow::Result<DataSplits> {
    let problems = cfg.validate();
    if let Some((k, m)) = problems.first() {
        anyhow::bail!("data.{k}: {m}");
    }
    let (train, test): (Arc<dyn Dataset>, Arc<dyn Dataset>) = match cfg.dataset {
        DatasetKind::Synthetic => {
            let spec = synthetic::SyntheticSpec::from_config(cfg);
            (
                Arc::new(synthetic::Synthetic::new(spec.clone(), Split::Train)),
                Arc::new(synthetic::Synthetic::new(spec, Split::Test)),
            )
        }
        kind => {
            let dir = locate(cfg, base_dir)?;
            let label = shown(&dir, base_dir);
            match kind {
                DatasetKind::Mnist | DatasetKind::FashionMnist => (
                    Arc::new(mnist::IdxDataset::open_dir(kind, &dir, Split::Train, &label)?),
                    Arc::new(mnist::IdxDataset::open_dir(kind, &dir, Split::Test, &label)?),
                ),
                DatasetKind::Cifar10 | DatasetKind::Cifar100 => (
                    Arc::new(cifar::CifarDataset::open_dir(kind, &dir, Split::Train, &label)?),
                    Arc::new(cifar::CifarDataset::open_dir(kind, &dir, Split::Test, &label)?),
                ),
                _ => {
                    let [h, w] = cfg.resize.context("data.resize: required for dataset = \"image-folder\"")?;
                    let train_dir = dir.join(&cfg.train_dir);
                    let test_dir = dir.join(&cfg.test_dir);
                    let train = image_folder::ImageFolder::open(
                        &train_dir,
                        None,
                        [h, w],
                        Split::Train,
                        &shown(&train_dir, base_dir),
                    )?;
                    let classes = train.class_names();
                    let test = image_folder::ImageFolder::open(
                        &test_dir,
                        Some(&classes),
                        [h, w],
                        Split::Test,
                        &shown(&test_dir, base_dir),
                    )?;
                    (Arc::new(train), Arc::new(test))
                }
            }
        }
    };
    let (a, b) = (train.image_shape(), test.image_shape());
    // `resize` brings both splits to one height and width; channels must agree in any case.
    if a[0] != b[0] || (cfg.resize.is_none() && a != b) {
        anyhow::bail!(
            "{} has {}x{}x{} images but {} has {}x{}x{}: the splits must have the same shape (or set data.resize)",
            train.describe(),
            a[0],
            a[1],
            a[2],
            test.describe(),
            b[0],
            b[1],
            b[2]
        );
    }
    let train = limit(train, cfg.train_limit)?;
    let test = limit(test, cfg.test_limit)?;
    Ok(DataSplits { train, test })
}

fn limit(ds: Arc<dyn Dataset>, limit: Option<usize>) -> anyhow::Result<Arc<dyn Dataset>> {
    match limit {
        Some(n) if n < ds.len() => Ok(Arc::new(Subset::balanced(ds, n)?)),
        _ => Ok(ds),
    }
}

/// Picks `limit` indices balanced over classes, deterministically: the images of each class in
/// index order, taken round-robin over classes (class 0's first, class 1's first, ...,
/// class 0's second, ...) until `limit` are chosen; a class that runs out is skipped. The result
/// is sorted by index.
pub fn balanced_subset(labels: &[usize], num_classes: usize, limit: usize) -> Vec<usize> {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes.max(1)];
    for (i, &l) in labels.iter().enumerate() {
        if let Some(v) = by_class.get_mut(l) {
            v.push(i);
        }
    }
    let mut picked = Vec::with_capacity(limit.min(labels.len()));
    let mut round = 0;
    while picked.len() < limit {
        let mut any = false;
        for class in &by_class {
            if let Some(&i) = class.get(round) {
                any = true;
                if picked.len() < limit {
                    picked.push(i);
                }
            }
        }
        if !any {
            break;
        }
        round += 1;
    }
    picked.sort_unstable();
    picked
}

/// A view of some images of another dataset.
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
    note: String,
}

impl Subset {
    /// A view of `indices` (each must be `< inner.len()`).
    pub fn new(inner: Arc<dyn Dataset>, indices: Vec<usize>, note: &str) -> anyhow::Result<Self> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= inner.len()) {
            anyhow::bail!("subset index {bad} out of range for {}", inner.describe());
        }
        Ok(Self { inner, indices, note: note.to_string() })
    }

    /// The class-balanced first-`limit` subset of [`balanced_subset`].
    pub fn balanced(inner: Arc<dyn Dataset>, limit: usize) -> anyhow::Result<Self> {
        let labels = (0..inner.len()).map(|i| inner.label(i)).collect::<anyhow::Result<Vec<_>>>()?;
        let indices = balanced_subset(&labels, inner.num_classes(), limit);
        Self::new(inner, indices, &format!("class-balanced subset limited to {limit}"))
    }

    /// Index in the inner dataset of this view's image `i`.
    pub fn inner_index(&self, i: usize) -> Option<usize> {
        self.indices.get(i).copied()
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, index: usize) -> anyhow::Result<Sample> {
        let i = self.inner_index(index).with_context(|| out_of_range(index, self.len(), &self.describe()))?;
        self.inner.get(i)
    }
    fn label(&self, index: usize) -> anyhow::Result<usize> {
        let i = self.inner_index(index).with_context(|| out_of_range(index, self.len(), &self.describe()))?;
        self.inner.label(i)
    }
    fn image_shape(&self) -> [usize; 3] {
        self.inner.image_shape()
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn class_names(&self) -> Vec<String> {
        self.inner.class_names()
    }
    fn describe(&self) -> String {
        format!("{} images of {} ({})", self.indices.len(), self.inner.describe(), self.note)
    }
}

pub(crate) fn out_of_range(index: usize, len: usize, what: &str) -> String {
    format!("index {index} out of range for {what} ({len} images)")
}

/// Per-class image counts of `ds` (reads labels only where the reader allows).
pub fn class_histogram(ds: &dyn Dataset) -> anyhow::Result<Vec<usize>> {
    let mut h = vec![0usize; ds.num_classes()];
    for i in 0..ds.len() {
        let l = ds.label(i)?;
        if let Some(c) = h.get_mut(l) {
            *c += 1;
        }
    }
    Ok(h)
}

/// Reads a whole file, with an error naming it.
pub(crate) fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{}: cannot read file", path.display()))
}
