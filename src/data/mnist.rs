//! IDX files, the format of MNIST and Fashion-MNIST, raw or gzip-compressed.
//!
//! An IDX file is a big-endian header followed by the data: magic `0x00000803` then three
//! `u32` dimensions (count, rows, cols) for images, magic `0x00000801` then one (count) for
//! labels, then one byte per pixel or label. Compression is detected by the gzip magic bytes
//! (`1f 8b`), not by the file name. The reader streams, so a header promising more data than the
//! file holds costs no memory, and checks the exact length; gzip data may inflate to at most
//! 256 times its compressed size.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::Context;
use flate2::read::MultiGzDecoder;

use super::{Dataset, DatasetKind, Sample, Split, out_of_range};

/// Magic number of an IDX file of `u8` images (3 dimensions).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of `u8` labels (1 dimension).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// Labels of MNIST and Fashion-MNIST are in `0..NUM_CLASSES`.
pub const NUM_CLASSES: usize = 10;

/// Fashion-MNIST's class names (Zalando's order).
pub const FASHION_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// Largest pixel payload accepted (guards against absurd headers).
const MAX_BYTES: u64 = 1 << 34;

/// gzip input may inflate to at most this multiple of its compressed size, plus [`GZ_SLACK`]
/// (the official files inflate 2 to 5 times). A header promising more is refused before
/// reading, and a stream that inflates further is cut off while it is read.
const MAX_GZ_INFLATION: u64 = 256;
const GZ_SLACK: u64 = 1 << 20;

fn inflate_cap(compressed: u64) -> u64 {
    compressed.saturating_mul(MAX_GZ_INFLATION).saturating_add(GZ_SLACK)
}

/// A decompressing reader that fails with [`std::io::ErrorKind::FileTooLarge`] past its cap.
struct BoundedInflate<R> {
    inner: R,
    left: u64,
    cap: u64,
    compressed: u64,
}

impl<R: Read> Read for BoundedInflate<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min(usize::try_from(self.left.saturating_add(1)).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!(
                    "gzip data inflates to more than {} bytes, over {MAX_GZ_INFLATION} times the {}-byte file; refused (a gzip bomb?)",
                    self.cap, self.compressed
                ),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// `train` / `t10k`: the file-name prefix of a split.
pub fn split_prefix(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Test => "t10k",
    }
}

/// Candidate file names for the images (`what = "images"`, idx3) or labels (idx1) of a split,
/// in the order they are tried: raw, `.gz`, and the dotted spelling some mirrors use.
pub fn candidate_names(split: Split, what: &str) -> Vec<String> {
    let p = split_prefix(split);
    let idx = if what == "images" { "idx3" } else { "idx1" };
    let base = format!("{p}-{what}-{idx}-ubyte");
    let dotted = format!("{p}-{what}.{idx}-ubyte");
    vec![base.clone(), format!("{base}.gz"), dotted.clone(), format!("{dotted}.gz")]
}

/// The existing file for a split's images or labels in `dir`.
pub fn find_file(dir: &Path, split: Split, what: &str) -> Option<PathBuf> {
    candidate_names(split, what).into_iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

/// The files `dir` lacks (by their canonical names with an optional `[.gz]`).
pub fn missing_files(dir: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    for split in [Split::Train, Split::Test] {
        for what in ["images", "labels"] {
            if find_file(dir, split, what).is_none() {
                missing.push(format!("{}[.gz]", candidate_names(split, what)[0]));
            }
        }
    }
    missing
}

/// Opens a file for reading, transparently decompressing gzip (detected by its magic bytes).
/// Returns the reader and whether it decompresses.
pub fn open_maybe_gz(path: &Path) -> anyhow::Result<(Box<dyn Read>, bool)> {
    let f = File::open(path).with_context(|| format!("{}: cannot open file", path.display()))?;
    let compressed = f.metadata().with_context(|| format!("{}: cannot read file", path.display()))?.len();
    let mut r = BufReader::with_capacity(1 << 16, f);
    let head = r.fill_buf().with_context(|| format!("{}: cannot read file", path.display()))?;
    let gz = head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b;
    if gz {
        let cap = inflate_cap(compressed);
        Ok((Box::new(BoundedInflate { inner: MultiGzDecoder::new(r), left: cap, cap, compressed }), true))
    } else {
        Ok((Box::new(r), false))
    }
}

/// Refuses a gzip file whose header promises more than it may inflate to, before reading it.
fn check_promise(path: &Path, gz: bool, total: u64) -> anyhow::Result<()> {
    if !gz {
        return Ok(());
    }
    let compressed = std::fs::metadata(path).with_context(|| format!("{}: cannot read file", path.display()))?.len();
    if total > inflate_cap(compressed) {
        anyhow::bail!(
            "{}: the IDX header promises {total} bytes, over {MAX_GZ_INFLATION} times the {compressed}-byte gzip file; refused before inflating (a gzip bomb?)",
            path.display()
        );
    }
    Ok(())
}

/// Reads until `buf` is full or the input ends; the number of bytes read.
fn read_up_to(r: &mut dyn Read, buf: &mut [u8], path: &Path, gz: bool) -> anyhow::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_error(path, gz, n as u64, e)),
        }
    }
    Ok(n)
}

fn read_error(path: &Path, gz: bool, offset: u64, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::FileTooLarge {
        anyhow::anyhow!("{}: {e}", path.display())
    } else if gz {
        anyhow::anyhow!("{}: corrupt gzip data after {offset} decompressed bytes: {e}", path.display())
    } else {
        anyhow::anyhow!("{}: read error at byte offset {offset}: {e}", path.display())
    }
}

/// Reads exactly `expected` payload bytes after a `header_len`-byte header and checks that the
/// file ends there.
fn read_payload(
    r: &mut dyn Read,
    path: &Path,
    gz: bool,
    header_len: u64,
    expected: u64,
    what: &str,
) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::new();
    let got = match (&mut *r).take(expected).read_to_end(&mut data) {
        Ok(n) => n as u64,
        Err(e) => return Err(read_error(path, gz, header_len + data.len() as u64, e)),
    };
    let dec = if gz { " (decompressed)" } else { "" };
    if got < expected {
        anyhow::bail!(
            "{}: truncated IDX file: the header promises {what} = {} bytes after the {header_len}-byte header ({} bytes in all) but the file{dec} holds {} bytes",
            path.display(),
            expected,
            header_len + expected,
            header_len + got
        );
    }
    let mut extra = [0u8; 1];
    if read_up_to(r, &mut extra, path, gz)? > 0 {
        let mut rest = 1u64;
        let mut sink = [0u8; 1 << 14];
        loop {
            let k = read_up_to(r, &mut sink, path, gz)?;
            if k == 0 || rest > MAX_BYTES {
                break;
            }
            rest += k as u64;
        }
        anyhow::bail!(
            "{}: IDX file is longer than its header says: {rest} extra byte(s) after byte offset {}{dec} (expected exactly {} bytes)",
            path.display(),
            header_len + expected,
            header_len + expected
        );
    }
    Ok(data)
}

/// Reads `n` big-endian `u32` header fields starting at byte offset `start`; `total` is the
/// header's full length, for messages.
fn read_header(
    r: &mut dyn Read,
    path: &Path,
    gz: bool,
    start: usize,
    n: usize,
    total: usize,
) -> anyhow::Result<Vec<u32>> {
    let mut buf = vec![0u8; 4 * n];
    let got = read_up_to(r, &mut buf, path, gz)?;
    if got < buf.len() {
        let dec = if gz { " (decompressed)" } else { "" };
        anyhow::bail!(
            "{}: truncated IDX file: the header needs {total} bytes but the file{dec} holds {}",
            path.display(),
            start + got
        );
    }
    Ok(buf.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn check_magic(path: &Path, magic: u32, expected: u32) -> anyhow::Result<()> {
    if magic != expected {
        let what = if expected == IMAGES_MAGIC { "image" } else { "label" };
        let hint = match magic {
            IMAGES_MAGIC => " (this is an image file)",
            LABELS_MAGIC => " (this is a label file)",
            _ => "",
        };
        anyhow::bail!(
            "{}: not an IDX {what} file: magic number at byte offset 0 is 0x{magic:08x}, expected 0x{expected:08x}{hint}",
            path.display()
        );
    }
    Ok(())
}

/// The images of an IDX file: `count` images of `rows x cols` bytes, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

/// Reads an IDX image file (raw or gzip), checking magic, dimensions and exact length.
pub fn read_images(path: &Path) -> anyhow::Result<IdxImages> {
    let (mut r, gz) = open_maybe_gz(path)?;
    let magic = read_header(&mut *r, path, gz, 0, 1, 16)?;
    check_magic(path, magic[0], IMAGES_MAGIC)?;
    let h = read_header(&mut *r, path, gz, 4, 3, 16)?;
    let (count, rows, cols) = (h[0] as u64, h[1] as u64, h[2] as u64);
    if rows == 0 || cols == 0 {
        anyhow::bail!(
            "{}: IDX image header at byte offset 8 gives images of {rows} rows x {cols} columns; both must be > 0",
            path.display()
        );
    }
    let expected = match count.checked_mul(rows).and_then(|x| x.checked_mul(cols)) {
        Some(n) if n <= MAX_BYTES => n,
        _ => anyhow::bail!(
            "{}: IDX image header at byte offset 4 promises {count} images of {rows} x {cols} pixels, more than this reader accepts ({MAX_BYTES} bytes)",
            path.display()
        ),
    };
    check_promise(path, gz, 16 + expected)?;
    let what = format!("{count} images x {rows} x {cols}");
    let pixels = read_payload(&mut *r, path, gz, 16, expected, &what)?;
    Ok(IdxImages { count: count as usize, rows: rows as usize, cols: cols as usize, pixels })
}

/// Reads an IDX label file (raw or gzip), checking magic, exact length and that every label is
/// below `num_classes`.
pub fn read_labels(path: &Path, num_classes: usize) -> anyhow::Result<Vec<u8>> {
    let (mut r, gz) = open_maybe_gz(path)?;
    let magic = read_header(&mut *r, path, gz, 0, 1, 8)?;
    check_magic(path, magic[0], LABELS_MAGIC)?;
    let count = read_header(&mut *r, path, gz, 4, 1, 8)?[0] as u64;
    if count > MAX_BYTES {
        anyhow::bail!("{}: IDX label header promises {count} labels, more than this reader accepts", path.display());
    }
    check_promise(path, gz, 8 + count)?;
    let labels = read_payload(&mut *r, path, gz, 8, count, &format!("{count} labels"))?;
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, l)| **l as usize >= num_classes) {
        anyhow::bail!(
            "{}: label {l} of entry {i} (byte offset {}) is out of range 0..{num_classes}",
            path.display(),
            8 + i
        );
    }
    Ok(labels)
}

/// MNIST or Fashion-MNIST, one split, pixels held in memory as bytes.
pub struct IdxDataset {
    name: String,
    split: Split,
    rows: usize,
    cols: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
    source: String,
    class_names: Vec<String>,
    /// The image and label files read.
    pub files: [PathBuf; 2],
}

impl IdxDataset {
    /// Reads an image file and a label file. `name` (e.g. `fashion-mnist`) and `source` are only
    /// used in [`Dataset::describe`].
    pub fn from_files(name: &str, split: Split, images: &Path, labels: &Path, source: &str) -> anyhow::Result<Self> {
        let im = read_images(images)?;
        let lb = read_labels(labels, NUM_CLASSES)?;
        if im.count != lb.len() {
            anyhow::bail!(
                "{}: holds {} images but {} holds {} labels; the counts must match",
                images.display(),
                im.count,
                labels.display(),
                lb.len()
            );
        }
        let class_names = if name == DatasetKind::FashionMnist.name() {
            FASHION_CLASSES.iter().map(|s| s.to_string()).collect()
        } else {
            (0..NUM_CLASSES).map(|c| c.to_string()).collect()
        };
        Ok(Self {
            name: name.to_string(),
            split,
            rows: im.rows,
            cols: im.cols,
            pixels: im.pixels,
            labels: lb,
            source: source.to_string(),
            class_names,
            files: [images.to_path_buf(), labels.to_path_buf()],
        })
    }

    /// Reads a split from a directory holding the standard file names (see [`candidate_names`]).
    pub fn open_dir(kind: DatasetKind, dir: &Path, split: Split, source: &str) -> anyhow::Result<Self> {
        let find = |what: &str| {
            find_file(dir, split, what).with_context(|| {
                format!("{}: no {}[.gz] in this directory", dir.display(), candidate_names(split, what)[0])
            })
        };
        let images = find("images")?;
        let labels = find("labels")?;
        Self::from_files(kind.name(), split, &images, &labels, source)
    }

    /// The raw bytes of image `index` (`rows * cols`, row-major).
    pub fn raw_image(&self, index: usize) -> Option<&[u8]> {
        let n = self.rows * self.cols;
        let start = index.checked_mul(n)?;
        self.pixels.get(start..start.checked_add(n)?)
    }

    /// All labels, in file order.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn get(&self, index: usize) -> anyhow::Result<Sample> {
        let raw = self.raw_image(index).with_context(|| out_of_range(index, self.len(), &self.describe()))?;
        Ok(Sample { image: raw.iter().map(|&p| p as f32 / 255.0).collect(), label: self.labels[index] as usize })
    }
    fn label(&self, index: usize) -> anyhow::Result<usize> {
        self.labels.get(index).map(|&l| l as usize).with_context(|| out_of_range(index, self.len(), &self.describe()))
    }
    fn image_shape(&self) -> [usize; 3] {
        [1, self.rows, self.cols]
    }
    fn num_classes(&self) -> usize {
        NUM_CLASSES
    }
    fn class_names(&self) -> Vec<String> {
        self.class_names.clone()
    }
    fn describe(&self) -> String {
        format!("{} {} ({} images) from {}", self.name, self.split.name(), self.len(), self.source)
    }
}
