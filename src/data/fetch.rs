//! `rlprune data fetch` and `rlprune data check`.
//!
//! [`fetch`] downloads the official files into `data/<name>` (or `--dir`), streaming each into a
//! hidden `.part` file next to its destination, verifying its SHA-256 against the constants below
//! and only then renaming it into place; a failed or interrupted download leaves no partial file
//! behind. CIFAR archives are verified, then their data files are extracted the same way.
//!
//! What the constants verify:
//! * MNIST and Fashion-MNIST: the SHA-256 of each official `.gz` file as served by the mirrors
//!   (the same values torchvision's dataset prototypes pin, cross-checked against several
//!   independent projects). For Fashion-MNIST we also pin the SHA-256 of each file's
//!   *decompressed* contents, computed from the Debian package `dataset-fashion-mnist`: Debian
//!   re-compressed the official files (its `.gz` files differ from Zalando's only in the gzip
//!   header, which drops the original file name), so a file is accepted if either the file or
//!   its contents match.
//! * CIFAR-10/100: the SHA-256 of the official `cifar-{10,100}-binary.tar.gz` archives. The
//!   extracted `.bin` files are then checked by size and fully parsed (labels in range).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};

use super::cifar::{self, Variant};
use super::mnist::{self, open_maybe_gz};
use super::{
    DEBIAN_FASHION_MNIST, DataConfig, Dataset, DatasetKind, Split, class_histogram, image_folder, locate, resolve,
    shown,
};

/// One downloadable file.
#[derive(Debug, Clone, Copy)]
pub struct Remote {
    /// Full URL.
    pub url: &'static str,
    /// File name it is saved under.
    pub file: &'static str,
    /// SHA-256 of the file as served.
    pub sha256: &'static str,
    /// SHA-256 of the decompressed contents, where known.
    pub content_sha256: Option<&'static str>,
}

const MNIST_URL: &str = "https://ossci-datasets.s3.amazonaws.com/mnist/";
const FASHION_URL: &str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/";

/// The official MNIST files (torchvision's S3 mirror of Yann LeCun's files).
pub const MNIST_FILES: [Remote; 4] = [
    Remote {
        url: "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz",
        file: "train-images-idx3-ubyte.gz",
        sha256: "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        content_sha256: None,
    },
    Remote {
        url: "https://ossci-datasets.s3.amazonaws.com/mnist/train-labels-idx1-ubyte.gz",
        file: "train-labels-idx1-ubyte.gz",
        sha256: "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        content_sha256: None,
    },
    Remote {
        url: "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz",
        file: "t10k-images-idx3-ubyte.gz",
        sha256: "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        content_sha256: None,
    },
    Remote {
        url: "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz",
        file: "t10k-labels-idx1-ubyte.gz",
        sha256: "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        content_sha256: None,
    },
];

/// The official Fashion-MNIST files (Zalando Research's S3 bucket).
pub const FASHION_FILES: [Remote; 4] = [
    Remote {
        url: "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz",
        file: "train-images-idx3-ubyte.gz",
        sha256: "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        content_sha256: Some("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    },
    Remote {
        url: "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-labels-idx1-ubyte.gz",
        file: "train-labels-idx1-ubyte.gz",
        sha256: "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        content_sha256: Some("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    },
    Remote {
        url: "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz",
        file: "t10k-images-idx3-ubyte.gz",
        sha256: "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        content_sha256: Some("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    },
    Remote {
        url: "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz",
        file: "t10k-labels-idx1-ubyte.gz",
        sha256: "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        content_sha256: Some("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
];

/// The official CIFAR-10 binary archive (Alex Krizhevsky's page).
pub const CIFAR10_ARCHIVE: Remote = Remote {
    url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    file: "cifar-10-binary.tar.gz",
    sha256: "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
    content_sha256: None,
};

/// The official CIFAR-100 binary archive.
pub const CIFAR100_ARCHIVE: Remote = Remote {
    url: "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    file: "cifar-100-binary.tar.gz",
    sha256: "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
    content_sha256: None,
};

/// Largest download accepted (guards against a misbehaving server).
const MAX_DOWNLOAD: u64 = 512 << 20;

/// Lower-case hex SHA-256 of everything `r` yields.
pub fn sha256_reader(r: &mut dyn Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Lower-case hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = File::open(path).with_context(|| format!("{}: cannot open file", path.display()))?;
    sha256_reader(&mut f).with_context(|| format!("{}: cannot read file", path.display()))
}

/// Lower-case hex SHA-256 of a file's contents, decompressed if it is gzip.
pub fn content_sha256(path: &Path) -> anyhow::Result<String> {
    let (mut r, _) = open_maybe_gz(path)?;
    sha256_reader(&mut *r).with_context(|| format!("{}: cannot read or decompress file", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a local file relates to the official one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// Byte-identical to the official file.
    Official,
    /// Different file bytes, identical decompressed contents (a re-compressed or uncompressed copy).
    OfficialContents,
    /// Neither matches: a subset, a different version, or a corrupt copy.
    Other { sha256: String },
}

/// Compares a local file with `remote`'s pinned hashes.
pub fn provenance(path: &Path, remote: &Remote) -> anyhow::Result<Provenance> {
    let sha = sha256_file(path)?;
    if sha == remote.sha256 {
        return Ok(Provenance::Official);
    }
    if let Some(c) = remote.content_sha256
        && content_sha256(path)? == c
    {
        return Ok(Provenance::OfficialContents);
    }
    Ok(Provenance::Other { sha256: sha })
}

/// Removes its file when dropped unless [`TempFile::persist`] moved it into place.
struct TempFile {
    path: PathBuf,
    done: bool,
}

impl TempFile {
    fn new(dir: &Path, name: &str) -> Self {
        Self { path: dir.join(format!(".{name}.{}.part", std::process::id())), done: false }
    }

    fn persist(mut self, dest: &Path) -> anyhow::Result<()> {
        std::fs::rename(&self.path, dest)
            .with_context(|| format!("cannot move {} to {}", self.path.display(), dest.display()))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn offline_hint(kind: DatasetKind, target: &Path) -> String {
    match kind {
        DatasetKind::FashionMnist => format!(
            "offline alternatives: use the subset shipped with the repository ([data] root = \"data/fashion-mnist-subset\"), \
             or `apt-get install dataset-fashion-mnist` (found automatically in {DEBIAN_FASHION_MNIST}), \
             or copy the four official .gz files from {FASHION_URL} into {} and run `rlprune data check fashion-mnist`",
            target.display()
        ),
        DatasetKind::Mnist => format!(
            "offline alternative: download the four .gz files from {MNIST_URL} on a machine with internet access, \
             copy them into {} and run `rlprune data check mnist`",
            target.display()
        ),
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
            let a = if kind == DatasetKind::Cifar10 { CIFAR10_ARCHIVE } else { CIFAR100_ARCHIVE };
            format!(
                "offline alternative: download {} on a machine with internet access, extract it and copy the .bin files into {}",
                a.url,
                target.display()
            )
        }
        _ => String::new(),
    }
}

/// Where to download `remote` from: its official URL, or `<mirror>/<its file name>`.
fn source_url(remote: &Remote, mirror: Option<&str>) -> String {
    match mirror {
        Some(m) => {
            let name = remote.url.rsplit('/').next().unwrap_or(remote.file);
            format!("{}/{name}", m.trim_end_matches('/'))
        }
        None => remote.url.to_string(),
    }
}

/// Streams `url` (`remote`'s file) into a temporary file in `dir`, verifying its SHA-256 (or, where pinned,
/// its decompressed contents' SHA-256). The verified temporary file is returned; dropping it
/// deletes it.
fn download(remote: &Remote, url: &str, dir: &Path, kind: DatasetKind, target: &Path) -> anyhow::Result<TempFile> {
    let fail = |why: String| {
        anyhow::anyhow!(
            "download of {url} failed: {why}; nothing was written for it (no partial file left); {}",
            offline_hint(kind, target)
        )
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    let resp = agent
        .get(url)
        .header("Accept-Encoding", "identity")
        .call()
        .map_err(|e| fail(describe_ureq_error(&e)))?;
    let tmp = TempFile::new(dir, remote.file);
    let mut out = File::create(&tmp.path).with_context(|| format!("{}: cannot create file", tmp.path.display()))?;
    let mut body = resp.into_body().into_with_config().limit(MAX_DOWNLOAD).reader();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = match body.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(fail(format!("connection error after {total} bytes: {e}"))),
        };
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).with_context(|| format!("{}: cannot write file", tmp.path.display()))?;
        total += n as u64;
    }
    out.sync_all().with_context(|| format!("{}: cannot write file", tmp.path.display()))?;
    drop(out);
    let got = hex(&h.finalize());
    if got != remote.sha256 {
        let content_ok = match remote.content_sha256 {
            Some(c) => content_sha256(&tmp.path).map(|s| s == c).unwrap_or(false),
            None => false,
        };
        if !content_ok {
            return Err(fail(format!(
                "sha256 mismatch: expected {}, got {got} ({total} bytes); the download is corrupt or the file changed upstream",
                remote.sha256
            )));
        }
    }
    Ok(tmp)
}

fn describe_ureq_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::HostNotFound => "the host name could not be resolved (no network or DNS?)".to_string(),
        ureq::Error::StatusCode(code) => format!("the server answered HTTP {code}"),
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::Io(io) => format!("network error: {io} (no internet access?)"),
        other => other.to_string(),
    }
}

/// Downloads one file into `dir/<remote.file>`, verified (see [`Remote`]); on any failure
/// nothing is left in `dir`. `kind` selects the offline advice in the error message.
pub fn fetch_file(remote: &Remote, dir: &Path, kind: DatasetKind) -> anyhow::Result<PathBuf> {
    let dest = dir.join(remote.file);
    download(remote, remote.url, dir, kind, dir)?.persist(&dest)?;
    Ok(dest)
}

/// Downloads dataset `name` (`mnist`, `fashion-mnist`, `cifar10`, `cifar100`) into `dir`, or
/// `<base_dir>/data/<name>` by default, verifying every file (see the module docs). Files already
/// present and verified are kept. With `mirror`, each file comes from `<mirror>/<file name>`
/// (a local copy or a proxy) instead of its official host, verified the same way. Returns the
/// dataset directory.
pub fn fetch(name: &str, dir: Option<&Path>, base_dir: &Path, mirror: Option<&str>) -> anyhow::Result<PathBuf> {
    let kind = DatasetKind::from_name(name)?;
    if matches!(kind, DatasetKind::ImageFolder | DatasetKind::Synthetic) {
        anyhow::bail!(
            "there is nothing to fetch for dataset {kind}; fetchable: mnist, fashion-mnist, cifar10, cifar100"
        );
    }
    let target = match dir {
        Some(d) => resolve(d, base_dir),
        None => base_dir.join("data").join(kind.default_dir_name()),
    };
    // The directories this call creates (target first), to remove again if nothing lands in them.
    let created: Vec<PathBuf> = target.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).map(Path::to_path_buf).collect();
    std::fs::create_dir_all(&target).with_context(|| format!("{}: cannot create directory", target.display()))?;
    remove_stale_parts(&target);
    let result = fetch_into(kind, &target, mirror);
    if result.is_err() {
        // `remove_dir` only removes empty directories: nothing written is ever deleted.
        for d in &created {
            let _ = std::fs::remove_dir(d);
        }
    }
    result.map(|()| target)
}

/// Removes `.<name>.<pid>.part` files left by a download that was killed.
fn remove_stale_parts(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".part") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn fetch_into(kind: DatasetKind, target: &Path, mirror: Option<&str>) -> anyhow::Result<()> {
    match kind {
        DatasetKind::Mnist | DatasetKind::FashionMnist => {
            let files = if kind == DatasetKind::Mnist { &MNIST_FILES } else { &FASHION_FILES };
            for r in files.iter() {
                let dest = target.join(r.file);
                if dest.is_file() && !matches!(provenance(&dest, r)?, Provenance::Other { .. }) {
                    continue;
                }
                download(r, &source_url(r, mirror), target, kind, target)?.persist(&dest)?;
            }
            // Parse both splits fully, as `open` will.
            for split in [Split::Train, Split::Test] {
                mnist::IdxDataset::open_dir(kind, target, split, &target.display().to_string())?;
            }
        }
        _ => {
            let variant = Variant::from_kind(kind)?;
            let archive = if kind == DatasetKind::Cifar10 { CIFAR10_ARCHIVE } else { CIFAR100_ARCHIVE };
            if !cifar_complete(variant, target) {
                let url = source_url(&archive, mirror);
                let tmp = download(&archive, &url, target, kind, target)?;
                extract_cifar(variant, &tmp.path, target).with_context(|| format!("{url}: cannot extract the verified archive"))?;
                if !cifar_complete(variant, target) {
                    anyhow::bail!(
                        "{url}: the verified archive lacks some data files or they have unexpected sizes"
                    );
                }
            }
            for split in [Split::Train, Split::Test] {
                cifar::CifarDataset::open_dir(kind, target, split, &target.display().to_string())?;
            }
        }
    }
    Ok(())
}

/// Expected sizes of the CIFAR data files.
fn cifar_sizes(variant: Variant) -> Vec<(String, u64)> {
    let rec = variant.record_len() as u64;
    match variant {
        Variant::Cifar10 => {
            let mut v: Vec<(String, u64)> = (1..=5).map(|i| (format!("data_batch_{i}.bin"), 10_000 * rec)).collect();
            v.push(("test_batch.bin".to_string(), 10_000 * rec));
            v
        }
        Variant::Cifar100 => vec![("train.bin".to_string(), 50_000 * rec), ("test.bin".to_string(), 10_000 * rec)],
    }
}

fn cifar_complete(variant: Variant, dir: &Path) -> bool {
    cifar_sizes(variant)
        .iter()
        .all(|(n, size)| std::fs::metadata(dir.join(n)).map(|m| m.len() == *size).unwrap_or(false))
}

/// Extracts the data and metadata files of a verified CIFAR archive into `target`, each through
/// a temporary file. Only known file names are written; the archive's top folder is dropped.
/// Returns the names written, in archive order; completeness is checked by the caller.
pub fn extract_cifar(variant: Variant, archive: &Path, target: &Path) -> anyhow::Result<Vec<String>> {
    let mut wanted: Vec<String> = cifar_sizes(variant).into_iter().map(|(n, _)| n).collect();
    wanted.extend(
        match variant {
            Variant::Cifar10 => vec!["batches.meta.txt", "readme.html"],
            Variant::Cifar100 => vec!["coarse_label_names.txt", "fine_label_names.txt"],
        }
        .into_iter()
        .map(str::to_string),
    );
    let f = File::open(archive).with_context(|| format!("{}: cannot open file", archive.display()))?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut written = Vec::new();
    for entry in ar.entries().context("cannot read the tar archive")? {
        let mut entry = entry.context("corrupt tar entry")?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().context("bad tar entry name")?.into_owned();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
        if !wanted.contains(&name) {
            continue;
        }
        let tmp = TempFile::new(target, &name);
        let mut out = File::create(&tmp.path).with_context(|| format!("{}: cannot create file", tmp.path.display()))?;
        std::io::copy(&mut entry, &mut out)
            .with_context(|| format!("{}: cannot extract {name}", tmp.path.display()))?;
        out.sync_all().with_context(|| format!("{}: cannot write file", tmp.path.display()))?;
        drop(out);
        tmp.persist(&target.join(&name))?;
        written.push(name);
    }
    Ok(written)
}

/// Opens dataset `name` (from `dir`, or the usual places) and returns a summary: where it was
/// found, per split the files (with whether they are the official ones), image count and shape,
/// pixel mean/std, and the per-class histogram. For `image-folder` (`dir` required) every image
/// is decoded, so a corrupt file is reported.
pub fn check(name: &str, dir: Option<&Path>, base_dir: &Path) -> anyhow::Result<String> {
    let kind = DatasetKind::from_name(name)?;
    let mut cfg = DataConfig::for_dataset(kind);
    cfg.root = dir.map(Path::to_path_buf);
    let mut out = String::new();
    match kind {
        DatasetKind::Synthetic => {
            let splits = super::open(&cfg, base_dir)?;
            out.push_str("synthetic dataset (generated, no files)\n");
            for ds in [&splits.train, &splits.test] {
                summarize(&mut out, ds.as_ref(), &[])?;
            }
        }
        DatasetKind::ImageFolder => {
            let root =
                dir.context("dataset image-folder needs --dir <root> (holding train/<class>/ and val/<class>/)")?;
            let root = resolve(root, base_dir);
            out.push_str(&format!("image-folder at {}\n", root.display()));
            for (split, sub) in [(Split::Train, &cfg.train_dir), (Split::Test, &cfg.test_dir)] {
                let d = root.join(sub);
                if split == Split::Test && !d.is_dir() {
                    out.push_str(&format!("  {}: no {} directory\n", split.name(), d.display()));
                    continue;
                }
                let ds = image_folder::ImageFolder::open(&d, None, [1, 1], split, &shown(&d, base_dir))?;
                let (mut wmin, mut wmax, mut hmin, mut hmax) = (u32::MAX, 0, u32::MAX, 0);
                for i in 0..ds.len() {
                    if let Some(p) = ds.path(i) {
                        let img = image_folder::decode_rgb(p)?;
                        wmin = wmin.min(img.width());
                        wmax = wmax.max(img.width());
                        hmin = hmin.min(img.height());
                        hmax = hmax.max(img.height());
                    }
                }
                out.push_str(&format!(
                    "  {}: {} images in {} classes, all decode; sizes {}..{} x {}..{} (HxW)\n",
                    split.name(),
                    ds.len(),
                    ds.num_classes(),
                    hmin,
                    hmax,
                    wmin,
                    wmax
                ));
                histogram_lines(&mut out, &ds)?;
            }
        }
        DatasetKind::Mnist | DatasetKind::FashionMnist => {
            let found = locate(&cfg, base_dir)?;
            out.push_str(&format!("{kind} at {}\n", found.display()));
            let remotes = if kind == DatasetKind::Mnist { &MNIST_FILES } else { &FASHION_FILES };
            for split in [Split::Train, Split::Test] {
                let ds = mnist::IdxDataset::open_dir(kind, &found, split, &shown(&found, base_dir))?;
                let mut files = Vec::new();
                for f in ds.files.iter() {
                    let fname = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    let stem = fname.trim_end_matches(".gz");
                    let remote = remotes.iter().find(|r| r.file.trim_end_matches(".gz") == stem);
                    let note = match remote {
                        Some(r) => match provenance(f, r)? {
                            Provenance::Official => "official file, sha256 verified".to_string(),
                            Provenance::OfficialContents => {
                                "official contents, decompressed sha256 verified (the file differs from the official .gz, e.g. a re-compressed or uncompressed copy)".to_string()
                            }
                            Provenance::Other { sha256 } => format!("not the official file (sha256 {sha256})"),
                        },
                        None => format!("sha256 {}", sha256_file(f)?),
                    };
                    files.push(format!("{} ({note})", f.display()));
                }
                summarize(&mut out, &ds, &files)?;
            }
        }
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
            let found = locate(&cfg, base_dir)?;
            out.push_str(&format!("{kind} at {}\n", found.display()));
            let variant = Variant::from_kind(kind)?;
            let sizes = cifar_sizes(variant);
            for split in [Split::Train, Split::Test] {
                let ds = cifar::CifarDataset::open_dir(kind, &found, split, &shown(&found, base_dir))?;
                let files: Vec<String> = ds
                    .files
                    .iter()
                    .map(|f| {
                        let n = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                        let full = sizes
                            .iter()
                            .any(|(s, len)| s == n && std::fs::metadata(f).map(|m| m.len() == *len).unwrap_or(false));
                        let note = if full {
                            "official size, all records valid"
                        } else {
                            "records valid, not the official size"
                        };
                        format!("{} ({note})", f.display())
                    })
                    .collect();
                summarize(&mut out, &ds, &files)?;
            }
        }
    }
    Ok(out)
}

fn summarize(out: &mut String, ds: &dyn Dataset, files: &[String]) -> anyhow::Result<()> {
    let [c, h, w] = ds.image_shape();
    out.push_str(&format!("  {}: {c}x{h}x{w} images, {} classes\n", ds.describe(), ds.num_classes()));
    for f in files {
        out.push_str(&format!("    file {f}\n"));
    }
    if !ds.is_empty() && ds.len() <= 200_000 {
        let (mean, std) = pixel_stats(ds)?;
        let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.4}")).collect::<Vec<_>>().join(", ");
        out.push_str(&format!("    pixel mean ({}) std ({})\n", fmt(&mean), fmt(&std)));
    }
    histogram_lines(out, ds)
}

fn histogram_lines(out: &mut String, ds: &dyn Dataset) -> anyhow::Result<()> {
    let hist = class_histogram(ds)?;
    let names = ds.class_names();
    let parts: Vec<String> = hist
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{}={n}", names.get(i).cloned().unwrap_or_else(|| i.to_string())))
        .collect();
    out.push_str(&format!("    classes: {}\n", parts.join(" ")));
    Ok(())
}

/// Per-channel mean and standard deviation of all pixels (in `[0, 1]`).
pub fn pixel_stats(ds: &dyn Dataset) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let [c, h, w] = ds.image_shape();
    let plane = h * w;
    let mut s = vec![0f64; c];
    let mut s2 = vec![0f64; c];
    for i in 0..ds.len() {
        let img = ds.get(i)?.image;
        for ch in 0..c {
            for &v in img.get(ch * plane..(ch + 1) * plane).unwrap_or(&[]) {
                s[ch] += v as f64;
                s2[ch] += (v as f64) * (v as f64);
            }
        }
    }
    let n = (ds.len() * plane).max(1) as f64;
    let mean: Vec<f64> = s.iter().map(|x| x / n).collect();
    let std = s2.iter().zip(&mean).map(|(x, m)| (x / n - m * m).max(0.0).sqrt()).collect();
    Ok((mean, std))
}
