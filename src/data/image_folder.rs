//! Class-per-folder image datasets (`<dir>/<class>/<image>.png|jpg|jpeg`).
//!
//! Class ids are the sorted sub-folder names. Opening only lists files; [`Dataset::get`] decodes
//! lazily, so memory use does not grow with the dataset. Each image is converted to RGB
//! (grayscale is replicated, alpha is dropped) and resized to the configured size with the
//! `image` crate's triangle (bilinear, antialiased when shrinking) filter.

use std::path::{Path, PathBuf};

use anyhow::Context;
use image::imageops::FilterType;

use super::{Dataset, Sample, Split, out_of_range};

/// File extensions read (case-insensitive); other files are ignored.
pub const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn is_hidden(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

fn has_image_ext(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn sorted_entries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("{}: cannot list directory", dir.display()))?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("{}: cannot list directory", dir.display()))?;
        let p = e.path();
        if !is_hidden(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// The class names of `dir`: its non-hidden sub-folders, sorted.
pub fn scan_classes(dir: &Path) -> anyhow::Result<Vec<String>> {
    if !dir.is_dir() {
        anyhow::bail!("{}: no such directory (expected one sub-folder per class)", dir.display());
    }
    let mut classes = Vec::new();
    for p in sorted_entries(dir)? {
        if p.is_dir() {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| format!("{}: class folder name is not valid UTF-8", p.display()))?;
            classes.push(name.to_string());
        }
    }
    if classes.is_empty() {
        anyhow::bail!("{}: no class sub-folders found", dir.display());
    }
    Ok(classes)
}

/// Decodes one image file to 8-bit RGB, with an error naming the file.
pub fn decode_rgb(path: &Path) -> anyhow::Result<image::RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read image file", path.display()))?;
    let img = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read image file", path.display()))?;
    if img.format().is_none() {
        let head: Vec<String> = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
        anyhow::bail!(
            "{}: not a PNG or JPEG image (first bytes at offset 0: {})",
            path.display(),
            head.join(" ")
        );
    }
    let img = img.decode().map_err(|e| anyhow::anyhow!("{}: cannot decode image: {e}", path.display()))?;
    Ok(img.to_rgb8())
}

/// Decodes `path`, resizes it to `[h, w]` and returns CHW floats in `[0, 1]`.
pub fn load_chw(path: &Path, [h, w]: [usize; 2]) -> anyhow::Result<Vec<f32>> {
    let rgb = decode_rgb(path)?;
    let (tw, th) = (w as u32, h as u32);
    let rgb = if rgb.width() == tw && rgb.height() == th {
        rgb
    } else {
        image::imageops::resize(&rgb, tw, th, FilterType::Triangle)
    };
    let plane = h * w;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px.0[c] as f32 / 255.0;
        }
    }
    Ok(out)
}

/// One split of an image-folder dataset.
pub struct ImageFolder {
    dir: PathBuf,
    split: Split,
    classes: Vec<String>,
    entries: Vec<(PathBuf, usize)>,
    size: [usize; 2],
    source: String,
}

impl ImageFolder {
    /// Lists `dir`. With `classes` given (the training split's), every sub-folder of `dir` must
    /// be one of them and labels follow that list; otherwise the sorted sub-folders define it.
    /// Images are resized to `size = [h, w]` when read.
    pub fn open(
        dir: &Path,
        classes: Option<&[String]>,
        size: [usize; 2],
        split: Split,
        source: &str,
    ) -> anyhow::Result<Self> {
        if size[0] == 0 || size[1] == 0 {
            anyhow::bail!("image-folder: resize must be positive, got {size:?}");
        }
        let found = scan_classes(dir)?;
        let classes: Vec<String> = match classes {
            None => found.clone(),
            Some(known) => {
                if let Some(extra) = found.iter().find(|c| !known.contains(c)) {
                    anyhow::bail!(
                        "{}: class folder {extra:?} does not exist in the training split (classes: {})",
                        dir.join(extra).display(),
                        known.join(", ")
                    );
                }
                known.to_vec()
            }
        };
        let mut entries = Vec::new();
        for name in &found {
            let label = classes.iter().position(|c| c == name).unwrap_or(0);
            for p in sorted_entries(&dir.join(name))? {
                if p.is_file() && has_image_ext(&p) {
                    entries.push((p, label));
                }
            }
        }
        if entries.is_empty() {
            anyhow::bail!(
                "{}: no images found (expected <class>/<name>.{{{}}})",
                dir.display(),
                EXTENSIONS.join(",")
            );
        }
        Ok(Self { dir: dir.to_path_buf(), split, classes, entries, size, source: source.to_string() })
    }

    /// The file of image `index`.
    pub fn path(&self, index: usize) -> Option<&Path> {
        self.entries.get(index).map(|(p, _)| p.as_path())
    }

    /// The split's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.entries.len()
    }
    fn get(&self, index: usize) -> anyhow::Result<Sample> {
        let (path, label) = self.entries.get(index).with_context(|| out_of_range(index, self.len(), &self.describe()))?;
        Ok(Sample { image: load_chw(path, self.size)?, label: *label })
    }
    fn label(&self, index: usize) -> anyhow::Result<usize> {
        self.entries.get(index).map(|e| e.1).with_context(|| out_of_range(index, self.len(), &self.describe()))
    }
    fn image_shape(&self) -> [usize; 3] {
        [3, self.size[0], self.size[1]]
    }
    fn num_classes(&self) -> usize {
        self.classes.len()
    }
    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }
    fn describe(&self) -> String {
        format!(
            "image-folder {} ({} images, {} classes, resized to {}x{}) from {}",
            self.split.name(),
            self.len(),
            self.classes.len(),
            self.size[0],
            self.size[1],
            self.source
        )
    }
}
