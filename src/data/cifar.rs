//! The CIFAR-10 and CIFAR-100 "binary version" files.
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` (train) and `test_batch.bin`, records of
//! 1 label byte + 3072 pixel bytes (1024 red, 1024 green, 1024 blue, each 32x32 row-major: CHW).
//! CIFAR-100: `train.bin` and `test.bin`, records of a coarse label byte (0..20), a fine label
//! byte (0..100) and the same 3072 pixel bytes; the fine label is used.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{Dataset, DatasetKind, Sample, Split, out_of_range, read_file};

/// Pixel bytes per CIFAR image (3 x 32 x 32).
pub const PIXELS: usize = 3 * 32 * 32;

/// CIFAR-10's class names (`batches.meta.txt`).
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// Which CIFAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Cifar10,
    Cifar100,
}

impl Variant {
    pub fn from_kind(kind: DatasetKind) -> anyhow::Result<Self> {
        match kind {
            DatasetKind::Cifar10 => Ok(Variant::Cifar10),
            DatasetKind::Cifar100 => Ok(Variant::Cifar100),
            other => anyhow::bail!("{other} is not a CIFAR dataset"),
        }
    }

    /// Bytes per record: label byte(s) + pixels.
    pub fn record_len(self) -> usize {
        self.label_bytes() + PIXELS
    }

    fn label_bytes(self) -> usize {
        match self {
            Variant::Cifar10 => 1,
            Variant::Cifar100 => 2,
        }
    }

    pub fn num_classes(self) -> usize {
        match self {
            Variant::Cifar10 => 10,
            Variant::Cifar100 => 100,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Variant::Cifar10 => "cifar10",
            Variant::Cifar100 => "cifar100",
        }
    }

    /// The file names of a split, in reading order.
    pub fn file_names(self, split: Split) -> Vec<String> {
        match (self, split) {
            (Variant::Cifar10, Split::Train) => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            (Variant::Cifar10, Split::Test) => vec!["test_batch.bin".to_string()],
            (Variant::Cifar100, Split::Train) => vec!["train.bin".to_string()],
            (Variant::Cifar100, Split::Test) => vec!["test.bin".to_string()],
        }
    }
}

/// The data files `dir` lacks.
pub fn missing_files(kind: DatasetKind, dir: &Path) -> Vec<String> {
    let Ok(v) = Variant::from_kind(kind) else { return Vec::new() };
    [Split::Train, Split::Test]
        .into_iter()
        .flat_map(|s| v.file_names(s))
        .filter(|n| !dir.join(n).is_file())
        .collect()
}

/// Parsed records of one or more CIFAR files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CifarRecords {
    /// `n * 3072` bytes, CHW per image.
    pub pixels: Vec<u8>,
    /// Class label per image (the fine label for CIFAR-100).
    pub labels: Vec<u8>,
    /// CIFAR-100 only: the coarse (superclass) label per image.
    pub coarse: Vec<u8>,
}

/// Appends the records of `bytes` (the contents of `path`) to `out`, checking the size and every
/// label.
pub fn parse_records(variant: Variant, path: &Path, bytes: &[u8], out: &mut CifarRecords) -> anyhow::Result<()> {
    let rec = variant.record_len();
    if bytes.is_empty() {
        anyhow::bail!("{}: empty file, expected records of {rec} bytes", path.display());
    }
    if !bytes.len().is_multiple_of(rec) {
        let whole = bytes.len() / rec;
        anyhow::bail!(
            "{}: size {} bytes is not a multiple of the {rec}-byte {} record: record {whole} at byte offset {} is incomplete ({} of {rec} bytes; truncated file?)",
            path.display(),
            bytes.len(),
            variant.name(),
            whole * rec,
            bytes.len() - whole * rec
        );
    }
    let n = bytes.len() / rec;
    out.pixels.reserve(n * PIXELS);
    out.labels.reserve(n);
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        let offset = i * rec;
        match variant {
            Variant::Cifar10 => {
                if r[0] >= 10 {
                    anyhow::bail!(
                        "{}: label {} of record {i} (byte offset {offset}) is out of range 0..10",
                        path.display(),
                        r[0]
                    );
                }
                out.labels.push(r[0]);
            }
            Variant::Cifar100 => {
                if r[0] >= 20 {
                    anyhow::bail!(
                        "{}: coarse label {} of record {i} (byte offset {offset}) is out of range 0..20",
                        path.display(),
                        r[0]
                    );
                }
                if r[1] >= 100 {
                    anyhow::bail!(
                        "{}: fine label {} of record {i} (byte offset {}) is out of range 0..100",
                        path.display(),
                        r[1],
                        offset + 1
                    );
                }
                out.coarse.push(r[0]);
                out.labels.push(r[1]);
            }
        }
        out.pixels.extend_from_slice(&r[variant.label_bytes()..]);
    }
    Ok(())
}

/// Reads and concatenates CIFAR files.
pub fn read_files(variant: Variant, paths: &[PathBuf]) -> anyhow::Result<CifarRecords> {
    let mut out = CifarRecords::default();
    for p in paths {
        let bytes = read_file(p)?;
        parse_records(variant, p, &bytes, &mut out)?;
    }
    Ok(out)
}

/// One split of CIFAR-10 or CIFAR-100, pixels held in memory as bytes.
pub struct CifarDataset {
    variant: Variant,
    split: Split,
    records: CifarRecords,
    source: String,
    class_names: Vec<String>,
    /// The files read.
    pub files: Vec<PathBuf>,
}

impl CifarDataset {
    /// Reads the given files of one split.
    pub fn from_files(variant: Variant, split: Split, files: &[PathBuf], source: &str) -> anyhow::Result<Self> {
        let records = read_files(variant, files)?;
        let class_names = match variant {
            Variant::Cifar10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
            Variant::Cifar100 => (0..100).map(|c| c.to_string()).collect(),
        };
        Ok(Self { variant, split, records, source: source.to_string(), class_names, files: files.to_vec() })
    }

    /// Reads a split from a directory holding the standard file names. Class names come from
    /// `batches.meta.txt` / `fine_label_names.txt` when present.
    pub fn open_dir(kind: DatasetKind, dir: &Path, split: Split, source: &str) -> anyhow::Result<Self> {
        let variant = Variant::from_kind(kind)?;
        let files: Vec<PathBuf> = variant.file_names(split).into_iter().map(|n| dir.join(n)).collect();
        if let Some(m) = files.iter().find(|p| !p.is_file()) {
            anyhow::bail!("{}: missing CIFAR file", m.display());
        }
        let mut ds = Self::from_files(variant, split, &files, source)?;
        let meta = match variant {
            Variant::Cifar10 => "batches.meta.txt",
            Variant::Cifar100 => "fine_label_names.txt",
        };
        if let Ok(text) = std::fs::read_to_string(dir.join(meta)) {
            let names: Vec<String> =
                text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
            if names.len() == variant.num_classes() {
                ds.class_names = names;
            }
        }
        Ok(ds)
    }

    /// The raw CHW bytes of image `index`.
    pub fn raw_image(&self, index: usize) -> Option<&[u8]> {
        self.records.pixels.get(index * PIXELS..(index + 1) * PIXELS)
    }

    /// CIFAR-100 only: the coarse label of image `index`.
    pub fn coarse_label(&self, index: usize) -> Option<usize> {
        self.records.coarse.get(index).map(|&c| c as usize)
    }
}

impl Dataset for CifarDataset {
    fn len(&self) -> usize {
        self.records.labels.len()
    }
    fn get(&self, index: usize) -> anyhow::Result<Sample> {
        let raw = self.raw_image(index).with_context(|| out_of_range(index, self.len(), &self.describe()))?;
        Ok(Sample { image: raw.iter().map(|&p| p as f32 / 255.0).collect(), label: self.records.labels[index] as usize })
    }
    fn label(&self, index: usize) -> anyhow::Result<usize> {
        self.records
            .labels
            .get(index)
            .map(|&l| l as usize)
            .with_context(|| out_of_range(index, self.len(), &self.describe()))
    }
    fn image_shape(&self) -> [usize; 3] {
        [3, 32, 32]
    }
    fn num_classes(&self) -> usize {
        self.variant.num_classes()
    }
    fn class_names(&self) -> Vec<String> {
        self.class_names.clone()
    }
    fn describe(&self) -> String {
        format!("{} {} ({} images) from {}", self.variant.name(), self.split.name(), self.len(), self.source)
    }
}
