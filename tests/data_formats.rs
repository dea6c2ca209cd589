//! Readers: IDX (MNIST / Fashion-MNIST, including the shipped subset), CIFAR-10/100 binary,
//! image folders. Bad files must give errors naming the file, never panics.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rlprune::data::cifar::{self, CifarDataset, Variant};
use rlprune::data::image_folder::ImageFolder;
use rlprune::data::mnist::{self, IdxDataset};
use rlprune::data::{self, DataConfig, Dataset, DatasetKind, Loader, Split};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn subset_dir() -> PathBuf {
    repo().join("data/fashion-mnist-subset")
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let f = std::fs::File::open(path).unwrap();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(f), &mut out).unwrap();
    out
}

fn idx_images(n: u32, rows: u32, cols: u32, fill: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [0x0803u32, n, rows, cols] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v.extend((0..(n * rows * cols) as usize).map(fill));
    v
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0801u32.to_be_bytes());
    v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    v.extend_from_slice(labels);
    v
}

/// Writes a train/test IDX pair of `n` 3x2 images into `dir` (raw file names).
fn write_idx_dir(dir: &Path, images: &[u8], labels: &[u8]) {
    for p in ["train", "t10k"] {
        std::fs::write(dir.join(format!("{p}-images-idx3-ubyte")), images).unwrap();
        std::fs::write(dir.join(format!("{p}-labels-idx1-ubyte")), labels).unwrap();
    }
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            eprintln!("error: {e:#}");
            format!("{e:#}")
        }
    }
}

// ---------------------------------------------------------------- IDX

#[test]
fn shipped_subset_reads_with_expected_counts_balance_and_pixels() {
    let mut cfg = DataConfig::for_dataset(DatasetKind::FashionMnist);
    cfg.root = Some("data/fashion-mnist-subset".into());
    let splits = data::open(&cfg, &repo()).unwrap();
    assert_eq!(splits.train.len(), 6000);
    assert_eq!(splits.test.len(), 1000);
    assert_eq!(splits.train.image_shape(), [1, 28, 28]);
    assert_eq!(splits.train.num_classes(), 10);
    assert_eq!(splits.train.describe(), "fashion-mnist train (6000 images) from data/fashion-mnist-subset");
    assert_eq!(data::class_histogram(splits.train.as_ref()).unwrap(), vec![600; 10]);
    assert_eq!(data::class_histogram(splits.test.as_ref()).unwrap(), vec![100; 10]);
    assert_eq!(splits.train.class_names()[9], "Ankle boot");
    // The first Fashion-MNIST training image is an ankle boot, the first test image too.
    assert_eq!(splits.train.label(0).unwrap(), 9);
    assert_eq!(splits.test.label(0).unwrap(), 9);
    let s = splits.train.get(0).unwrap();
    assert_eq!(s.image.len(), 784);
    assert!(s.image.iter().all(|v| (0.0..=1.0).contains(v)));
    assert_eq!(s.image[0], 0.0, "Fashion-MNIST corners are background");
    assert!(s.image.contains(&1.0), "an ankle boot reaches full intensity");
    let (mean, std) = rlprune::data::fetch::pixel_stats(splits.train.as_ref()).unwrap();
    assert!((mean[0] - 0.286).abs() < 0.02, "mean {mean:?}");
    assert!((std[0] - 0.353).abs() < 0.02, "std {std:?}");
}

/// The subset's manifest (`data/fashion-mnist-subset/manifest.json`, written by
/// `scripts/make_fashion_subset.py`): per split, the official files it was drawn from (their
/// contents' SHA-256), the positions it took from them, and its own contents' SHA-256.
struct ManifestSplit {
    prefix: &'static str,
    split: Split,
    quota: usize,
    source_len: usize,
    indices: Vec<usize>,
    source_sha256: Vec<(String, String)>,
    sha256: Vec<(String, String)>,
}

fn manifest() -> Vec<ManifestSplit> {
    let text = std::fs::read_to_string(subset_dir().join("manifest.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let hashes = |v: &serde_json::Value| -> Vec<(String, String)> {
        let mut out: Vec<_> =
            v.as_object().unwrap().iter().map(|(k, h)| (k.clone(), h.as_str().unwrap().to_string())).collect();
        out.sort();
        out
    };
    [("train", Split::Train), ("t10k", Split::Test)]
        .into_iter()
        .map(|(prefix, split)| {
            let e = &json["splits"][prefix];
            ManifestSplit {
                prefix,
                split,
                quota: e["quota_per_class"].as_u64().unwrap() as usize,
                source_len: e["source_len"].as_u64().unwrap() as usize,
                indices: e["indices"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as usize).collect(),
                source_sha256: hashes(&e["source_sha256"]),
                sha256: hashes(&e["sha256"]),
            }
        })
        .collect()
}

fn stems(prefix: &str) -> [String; 2] {
    [format!("{prefix}-images-idx3-ubyte"), format!("{prefix}-labels-idx1-ubyte")]
}

#[test]
fn subset_matches_its_manifest() {
    let official = rlprune::data::fetch::FASHION_FILES;
    for m in manifest() {
        // The shipped files are the ones the manifest describes...
        let mut shipped = Vec::new();
        for stem in stems(m.prefix) {
            let path = subset_dir().join(format!("{stem}.gz"));
            shipped.push((stem, rlprune::data::fetch::content_sha256(&path).unwrap()));
        }
        shipped.sort();
        assert_eq!(shipped, m.sha256, "{}: shipped files differ from the manifest", m.prefix);
        // ...drawn from the official files (the contents pinned for downloads)...
        for (stem, hash) in &m.source_sha256 {
            let pinned = official.iter().find(|r| r.file.trim_end_matches(".gz") == stem).unwrap();
            assert_eq!(Some(hash.as_str()), pinned.content_sha256, "{stem}: not the official contents");
        }
        // ...at positions that can be the first `quota` of each class in file order.
        let sub = IdxDataset::open_dir(DatasetKind::FashionMnist, &subset_dir(), m.split, "subset").unwrap();
        assert_eq!(m.indices.len(), 10 * m.quota);
        assert_eq!(sub.len(), m.indices.len());
        assert!(m.indices.windows(2).all(|w| w[0] < w[1]), "{}: indices not in file order", m.prefix);
        assert!(*m.indices.last().unwrap() < m.source_len);
        assert_eq!(data::class_histogram(&sub).unwrap(), vec![m.quota; 10]);
        // Before the first image a class has skipped, every image was kept.
        let gap = m.indices.iter().enumerate().find(|(j, i)| *j != **i).map_or(m.indices.len(), |(j, _)| j);
        assert!(gap > 0 && m.indices[..gap].iter().enumerate().all(|(j, i)| j == *i));
    }
}

/// Needs the full files of the Debian package `dataset-fashion-mnist`; `.ci/run` installs the
/// package and runs this test by name.
#[test]
#[ignore = "needs /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist); .ci/run runs it"]
fn subset_matches_the_full_files() {
    let full = Path::new(rlprune::data::DEBIAN_FASHION_MNIST);
    for m in manifest() {
        let mut source = Vec::new();
        for stem in stems(m.prefix) {
            let path = full.join(format!("{stem}.gz"));
            source.push((stem, rlprune::data::fetch::content_sha256(&path).unwrap()));
        }
        source.sort();
        assert_eq!(source, m.source_sha256, "{}: full files differ from the manifest's source", m.prefix);
        let all = IdxDataset::open_dir(DatasetKind::FashionMnist, full, m.split, "debian").unwrap();
        let sub = IdxDataset::open_dir(DatasetKind::FashionMnist, &subset_dir(), m.split, "subset").unwrap();
        assert_eq!(all.len(), m.source_len);
        // The selection rule, applied to the full labels, gives the manifest's positions.
        let mut taken = [0usize; 10];
        let mut keep = Vec::new();
        for (i, &l) in all.labels().iter().enumerate() {
            if taken[l as usize] < m.quota {
                taken[l as usize] += 1;
                keep.push(i);
            }
        }
        assert_eq!(keep, m.indices, "{}: selection rule disagrees with the manifest", m.prefix);
        for (j, &i) in keep.iter().enumerate() {
            assert_eq!(sub.raw_image(j), all.raw_image(i), "{}: subset image {j} != full image {i}", m.prefix);
            assert_eq!(sub.labels()[j], all.labels()[i]);
        }
    }
}

#[test]
fn raw_and_gz_files_read_identically_and_gzip_is_detected_by_content() {
    let tmp = tempfile::tempdir().unwrap();
    let raw_dir = tmp.path().join("raw");
    let odd_dir = tmp.path().join("odd");
    std::fs::create_dir_all(&raw_dir).unwrap();
    std::fs::create_dir_all(&odd_dir).unwrap();
    for stem in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
        let bytes = gunzip(&subset_dir().join(format!("{stem}.gz")));
        std::fs::write(raw_dir.join(stem), &bytes).unwrap();
        // gzip data under the raw name: must be detected by the magic bytes.
        std::fs::write(odd_dir.join(stem), gz(&bytes)).unwrap();
    }
    let from_gz = IdxDataset::open_dir(DatasetKind::FashionMnist, &subset_dir(), Split::Test, "gz").unwrap();
    let from_raw = IdxDataset::open_dir(DatasetKind::FashionMnist, &raw_dir, Split::Test, "raw").unwrap();
    let from_odd = IdxDataset::open_dir(DatasetKind::FashionMnist, &odd_dir, Split::Test, "odd").unwrap();
    assert_eq!(from_gz.len(), 1000);
    for ds in [&from_raw, &from_odd] {
        assert_eq!(ds.len(), from_gz.len());
        assert_eq!(ds.labels(), from_gz.labels());
        for i in [0, 1, 500, 999] {
            assert_eq!(ds.get(i).unwrap(), from_gz.get(i).unwrap());
        }
    }
}

#[test]
fn idx_bad_files_give_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let imgs = idx_images(4, 3, 2, |i| (i * 10 % 256) as u8);
    let labels = idx_labels(&[0, 1, 2, 3]);

    // Good pair first.
    write_idx_dir(d, &imgs, &labels);
    let ok = IdxDataset::open_dir(DatasetKind::Mnist, d, Split::Train, "tmp").unwrap();
    assert_eq!(ok.len(), 4);
    assert_eq!(ok.image_shape(), [1, 3, 2]);
    assert_eq!(ok.get(1).unwrap().image[0], 60.0 / 255.0);
    assert_eq!(ok.get(3).unwrap().label, 3);
    let img_path = d.join("train-images-idx3-ubyte");
    let lbl_path = d.join("train-labels-idx1-ubyte");
    let img_name = img_path.display().to_string();
    let lbl_name = lbl_path.display().to_string();

    // Wrong magic: a label file where images are expected.
    std::fs::write(&img_path, &labels).unwrap();
    let e = err_of(mnist::read_images(&img_path));
    assert!(e.contains(&img_name) && e.contains("magic") && e.contains("0x00000801"), "{e}");

    // Wrong magic in a label file.
    std::fs::write(&lbl_path, &imgs).unwrap();
    let e = err_of(mnist::read_labels(&lbl_path, 10));
    assert!(e.contains(&lbl_name) && e.contains("magic") && e.contains("0x00000803"), "{e}");

    // Truncated image file: expected vs actual size.
    std::fs::write(&img_path, &imgs[..imgs.len() - 5]).unwrap();
    let e = err_of(mnist::read_images(&img_path));
    assert!(e.contains(&img_name) && e.contains("truncated"), "{e}");
    assert!(e.contains("40 bytes in all") && e.contains("holds 35 bytes"), "{e}");

    // Truncated gzip file (compressed stream cut short).
    let z = gz(&imgs);
    std::fs::write(&img_path, &z[..z.len() / 2]).unwrap();
    let e = err_of(mnist::read_images(&img_path));
    assert!(e.contains(&img_name), "{e}");

    // Truncated gzip file whose compressed stream is complete but payload short.
    std::fs::write(&img_path, gz(&imgs[..30])).unwrap();
    let e = err_of(mnist::read_images(&img_path));
    assert!(e.contains(&img_name) && e.contains("truncated") && e.contains("decompressed"), "{e}");

    // Header itself truncated.
    std::fs::write(&img_path, &imgs[..10]).unwrap();
    let e = err_of(mnist::read_images(&img_path));
    assert!(e.contains(&img_name) && e.contains("header needs 16 bytes"), "{e}");

    // Trailing bytes.
    let mut long = imgs.clone();
    long.extend_from_slice(&[1, 2, 3]);
    std::fs::write(&img_path, &long).unwrap();
    let e = err_of(mnist::read_images(&img_path));
    assert!(e.contains(&img_name) && e.contains("3 extra byte(s) after byte offset 40"), "{e}");

    // Label count mismatch.
    std::fs::write(&img_path, &imgs).unwrap();
    std::fs::write(&lbl_path, idx_labels(&[0, 1, 2])).unwrap();
    let e = err_of(IdxDataset::open_dir(DatasetKind::Mnist, d, Split::Train, "tmp"));
    assert!(e.contains(&img_name) && e.contains(&lbl_name) && e.contains("4 images") && e.contains("3 labels"), "{e}");

    // Label out of range: entry and byte offset.
    std::fs::write(&lbl_path, idx_labels(&[0, 1, 12, 3])).unwrap();
    let e = err_of(IdxDataset::open_dir(DatasetKind::Mnist, d, Split::Train, "tmp"));
    assert!(e.contains(&lbl_name) && e.contains("label 12 of entry 2 (byte offset 10)"), "{e}");

    // Zero-sized images and empty files.
    std::fs::write(&img_path, idx_images(1, 0, 5, |_| 0)).unwrap();
    assert!(err_of(mnist::read_images(&img_path)).contains(&img_name));
    std::fs::write(&img_path, b"").unwrap();
    assert!(err_of(mnist::read_images(&img_path)).contains(&img_name));
    // Absurd header must not allocate or panic.
    std::fs::write(
        &img_path,
        idx_images(0, 1, 1, |_| 0).iter().take(4).chain(&[0xff; 12]).copied().collect::<Vec<u8>>(),
    )
    .unwrap();
    let e = err_of(mnist::read_images(&img_path));
    assert!(e.contains(&img_name) && e.contains("more than this reader accepts"), "{e}");
}

// ---------------------------------------------------------------- CIFAR

/// A CIFAR record: label byte(s) then CHW pixels where pixel (c, y, x) = f(seed, c, y, x).
fn cifar_record(labels: &[u8], seed: u8) -> Vec<u8> {
    let mut r = labels.to_vec();
    for c in 0..3usize {
        for y in 0..32usize {
            for x in 0..32usize {
                r.push((seed as usize * 31 + c * 85 + y * 3 + x) as u8);
            }
        }
    }
    r
}

#[test]
fn cifar10_binary_roundtrip_labels_and_chw_order() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for b in 1..=5u8 {
        let bytes: Vec<u8> = [cifar_record(&[b], b), cifar_record(&[9 - b], b + 10)].concat();
        std::fs::write(d.join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    std::fs::write(
        d.join("test_batch.bin"),
        [cifar_record(&[0], 50), cifar_record(&[7], 51), cifar_record(&[3], 52)].concat(),
    )
    .unwrap();
    let mut cfg = DataConfig::for_dataset(DatasetKind::Cifar10);
    cfg.root = Some(d.to_path_buf());
    let splits = data::open(&cfg, Path::new("/nonexistent")).unwrap();
    assert_eq!(splits.train.len(), 10);
    assert_eq!(splits.test.len(), 3);
    assert_eq!(splits.train.image_shape(), [3, 32, 32]);
    assert_eq!(splits.train.num_classes(), 10);
    assert_eq!(splits.train.class_names()[0], "airplane");
    let labels: Vec<usize> = (0..10).map(|i| splits.train.label(i).unwrap()).collect();
    assert_eq!(labels, vec![1, 8, 2, 7, 3, 6, 4, 5, 5, 4]);
    let s = splits.test.get(1).unwrap();
    assert_eq!(s.label, 7);
    for (c, y, x) in [(0, 0, 0), (1, 0, 0), (2, 5, 7), (1, 31, 31)] {
        let want = (51 * 31 + c * 85 + y * 3 + x) as u8 as f32 / 255.0;
        assert_eq!(s.image[c * 1024 + y * 32 + x], want, "pixel c{c} y{y} x{x}");
    }
    assert!(splits.test.describe().starts_with("cifar10 test (3 images) from "));
}

#[test]
fn cifar100_uses_fine_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("train.bin"), [cifar_record(&[3, 99], 1), cifar_record(&[19, 0], 2)].concat()).unwrap();
    std::fs::write(d.join("test.bin"), cifar_record(&[0, 42], 3)).unwrap();
    let train = CifarDataset::open_dir(DatasetKind::Cifar100, d, Split::Train, "tmp").unwrap();
    let test = CifarDataset::open_dir(DatasetKind::Cifar100, d, Split::Test, "tmp").unwrap();
    assert_eq!(train.num_classes(), 100);
    assert_eq!((train.label(0).unwrap(), train.label(1).unwrap()), (99, 0));
    assert_eq!((train.coarse_label(0), train.coarse_label(1)), (Some(3), Some(19)));
    let s = test.get(0).unwrap();
    assert_eq!(s.label, 42);
    assert_eq!(s.image[2 * 1024 + 32 + 1], ((3 * 31 + 2 * 85 + 3 + 1) as u8) as f32 / 255.0);
}

#[test]
fn cifar_bad_files_give_errors_naming_file_and_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("data_batch_1.bin");
    let name = p.display().to_string();
    let mut bytes = [cifar_record(&[1], 0), cifar_record(&[2], 1)].concat();
    bytes.extend_from_slice(&[0u8; 100]);
    let mut out = cifar::CifarRecords::default();
    let e = err_of(cifar::parse_records(Variant::Cifar10, &p, &bytes, &mut out));
    assert!(
        e.contains(&name) && e.contains("not a multiple of the 3073-byte") && e.contains("byte offset 6146"),
        "{e}"
    );

    let bad_label = [cifar_record(&[1], 0), cifar_record(&[10], 1)].concat();
    let e = err_of(cifar::parse_records(Variant::Cifar10, &p, &bad_label, &mut out));
    assert!(e.contains(&name) && e.contains("label 10 of record 1 (byte offset 3073)"), "{e}");

    // A CIFAR-10 file read as CIFAR-100 is misaligned.
    let e = err_of(cifar::parse_records(
        Variant::Cifar100,
        &p,
        &[cifar_record(&[1], 0), cifar_record(&[2], 0)].concat(),
        &mut out,
    ));
    assert!(e.contains(&name) && e.contains("3074-byte"), "{e}");
    let e = err_of(cifar::parse_records(Variant::Cifar100, &p, &cifar_record(&[3, 100], 0), &mut out));
    assert!(e.contains("fine label 100 of record 0 (byte offset 1)"), "{e}");
    let e = err_of(cifar::parse_records(Variant::Cifar10, &p, &[], &mut out));
    assert!(e.contains(&name) && e.contains("empty"), "{e}");

    // Through the directory reader: a truncated test file.
    let d = tmp.path();
    for b in 1..=5 {
        std::fs::write(d.join(format!("data_batch_{b}.bin")), cifar_record(&[1], 0)).unwrap();
    }
    let rec = cifar_record(&[1], 0);
    std::fs::write(d.join("test_batch.bin"), &rec[..3000]).unwrap();
    let e = err_of(CifarDataset::open_dir(DatasetKind::Cifar10, d, Split::Test, "tmp"));
    assert!(e.contains("test_batch.bin") && e.contains("byte offset 0"), "{e}");
}

// ---------------------------------------------------------------- image folder

fn write_image_folder(root: &Path) {
    let w = |rel: &str, img: image::DynamicImage| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        img.save(&p).unwrap();
    };
    // 2x3 (h x w) RGB, pixel (y, x) = (10x + y, 100 + y, 200 - x).
    let rgb = image::RgbImage::from_fn(3, 2, |x, y| image::Rgb([(10 * x + y) as u8, (100 + y) as u8, (200 - x) as u8]));
    w("train/cat/a.png", rgb.clone().into());
    let gray = image::GrayImage::from_fn(3, 2, |x, y| image::Luma([(40 * x + 7 * y) as u8]));
    w("train/cat/b_gray.png", gray.into());
    let rgba = image::RgbaImage::from_fn(3, 2, |x, _| image::Rgba([50, 60, 70 + x as u8, (x * 100) as u8]));
    w("train/dog/c_alpha.png", rgba.into());
    let big = image::RgbImage::from_fn(16, 12, |x, y| image::Rgb([(x * 10) as u8, (y * 10) as u8, 128]));
    w("train/dog/d.JPG", big.into());
    std::fs::write(root.join("train/dog/notes.txt"), "ignored").unwrap();
    w("val/dog/e.png", rgb.into());
}

#[test]
fn image_folder_reads_classes_converts_and_resizes() {
    let tmp = tempfile::tempdir().unwrap();
    write_image_folder(tmp.path());
    let mut cfg = DataConfig::for_dataset(DatasetKind::ImageFolder);
    cfg.root = Some(tmp.path().to_path_buf());
    cfg.resize = Some([2, 3]);
    let splits = data::open(&cfg, Path::new("/")).unwrap();
    let train = &splits.train;
    assert_eq!(train.len(), 4, "notes.txt is ignored");
    assert_eq!(train.num_classes(), 2);
    assert_eq!(train.class_names(), vec!["cat", "dog"]);
    assert_eq!(train.image_shape(), [3, 2, 3]);
    assert_eq!((0..4).map(|i| train.label(i).unwrap()).collect::<Vec<_>>(), vec![0, 0, 1, 1]);
    let px = |img: &[f32], c: usize, y: usize, x: usize| (img[c * 6 + y * 3 + x] * 255.0).round() as u8;
    // RGB PNG, exact.
    let a = train.get(0).unwrap();
    assert_eq!(a.image.len(), 18);
    for (y, x) in [(0, 0), (1, 2), (0, 1)] {
        assert_eq!(px(&a.image, 0, y, x), (10 * x + y) as u8);
        assert_eq!(px(&a.image, 1, y, x), (100 + y) as u8);
        assert_eq!(px(&a.image, 2, y, x), (200 - x) as u8);
    }
    // Grayscale is replicated to three equal channels.
    let b = train.get(1).unwrap();
    for c in 0..3 {
        assert_eq!(px(&b.image, c, 1, 2), 87);
    }
    // RGBA: alpha dropped, colour kept.
    let c = train.get(2).unwrap();
    assert_eq!((px(&c.image, 0, 0, 0), px(&c.image, 1, 1, 1), px(&c.image, 2, 0, 2)), (50, 60, 72));
    // A 12x16 JPEG is resized to 2x3.
    let d = train.get(3).unwrap();
    assert_eq!(d.image.len(), 18);
    assert!(d.image.iter().all(|v| (0.0..=1.0).contains(v)));
    // Test split: labels follow the training classes (dog = 1 although val has only dog).
    assert_eq!(splits.test.len(), 1);
    assert_eq!(splits.test.label(0).unwrap(), 1);
    // Through the loader.
    let mut lc = cfg.clone();
    lc.batch_size = 3;
    lc.drop_last = false;
    let loader = Loader::new(splits.train.clone(), &lc, true, 0);
    let batches: Vec<_> = loader.epoch(0).collect::<anyhow::Result<_>>().unwrap();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].shape, [3, 3, 2, 3]);
}

#[test]
fn image_folder_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    write_image_folder(tmp.path());
    let broken = tmp.path().join("train/cat/broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\n this is not really a png").unwrap();
    let ds = ImageFolder::open(&tmp.path().join("train"), None, [4, 4], Split::Train, "tmp").unwrap();
    let i = (0..ds.len()).find(|&i| ds.path(i) == Some(broken.as_path())).unwrap();
    let e = err_of(ds.get(i));
    assert!(e.contains(&broken.display().to_string()), "{e}");
    // Not an image at all, with an image extension.
    let text = tmp.path().join("train/dog/text.jpg");
    std::fs::write(&text, b"hello world").unwrap();
    let ds = ImageFolder::open(&tmp.path().join("train"), None, [4, 4], Split::Train, "tmp").unwrap();
    let i = (0..ds.len()).find(|&i| ds.path(i) == Some(text.as_path())).unwrap();
    let e = err_of(ds.get(i));
    assert!(e.contains(&text.display().to_string()) && e.contains("not a PNG or JPEG"), "{e}");
    // The loader surfaces the error and stops.
    let mut cfg = DataConfig::for_dataset(DatasetKind::ImageFolder);
    cfg.resize = Some([4, 4]);
    cfg.batch_size = 2;
    let loader = Loader::new(Arc::new(ds), &cfg, false, 0);
    let items: Vec<_> = loader.epoch(0).collect();
    // broken.png (class cat) comes first in the evaluation order.
    let first_err = items.iter().find_map(|b| b.as_ref().err()).unwrap().to_string();
    assert!(first_err.contains("broken.png"), "{first_err}");
    assert!(items.last().unwrap().is_err(), "the stream ends at the error");

    // A class in val/ unknown to train/.
    std::fs::create_dir_all(tmp.path().join("val/bird")).unwrap();
    let mut cfg = DataConfig::for_dataset(DatasetKind::ImageFolder);
    cfg.root = Some(tmp.path().to_path_buf());
    cfg.resize = Some([4, 4]);
    let e = err_of(data::open(&cfg, Path::new("/")));
    assert!(e.contains("bird") && e.contains("training split"), "{e}");
    // resize is required.
    cfg.resize = None;
    let e = err_of(data::open(&cfg, Path::new("/")));
    assert!(e.contains("data.resize") && e.contains("required"), "{e}");
    // Missing folder.
    cfg.resize = Some([4, 4]);
    cfg.root = Some(tmp.path().join("nope"));
    let e = err_of(data::open(&cfg, Path::new("/")));
    assert!(e.contains("nope"), "{e}");
}

/// Train and test splits of different image sizes are refused (unless `resize` makes them
/// agree); different channel counts are refused in any case.
#[test]
fn splits_of_different_shapes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let labels = idx_labels(&[0, 1, 2, 3]);
    std::fs::write(d.join("train-images-idx3-ubyte"), idx_images(4, 32, 32, |i| (i % 256) as u8)).unwrap();
    std::fs::write(d.join("t10k-images-idx3-ubyte"), idx_images(4, 28, 28, |i| (i % 256) as u8)).unwrap();
    for p in ["train", "t10k"] {
        std::fs::write(d.join(format!("{p}-labels-idx1-ubyte")), &labels).unwrap();
    }
    let mut cfg = DataConfig::for_dataset(DatasetKind::Mnist);
    cfg.root = Some(d.to_path_buf());
    let e = err_of(data::open(&cfg, d));
    assert!(e.contains("1x32x32") && e.contains("1x28x28") && e.contains("same shape"), "{e}");
    cfg.resize = Some([28, 28]);
    let splits = data::open(&cfg, d).unwrap();
    assert_eq!((splits.train.len(), splits.test.len()), (4, 4));
}

/// A gzip IDX file that would inflate far beyond its size is refused before it is inflated
/// (when its header promises that much) or while it is (when the data runs past the header's
/// promise), never by filling memory first.
#[test]
fn gzip_bombs_are_refused() {
    let gz = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    // 64 MiB of pixels, as the header promises, deflated about 1000 times.
    let bomb = dir.path().join("bomb-images.gz");
    std::fs::write(&bomb, gz(&idx_images(1 << 16, 32, 32, |_| 0))).unwrap();
    let e = err_of(mnist::read_images(&bomb));
    assert!(e.contains("bomb-images.gz") && e.contains("refused before inflating"), "{e}");
    // Three labels, then 64 MiB of zeros the header does not mention.
    let mut raw = idx_labels(&[1, 2, 3]);
    raw.extend(std::iter::repeat_n(0u8, 64 << 20));
    let trail = dir.path().join("trail-labels.gz");
    std::fs::write(&trail, gz(&raw)).unwrap();
    let e = err_of(mnist::read_labels(&trail, 10));
    assert!(e.contains("trail-labels.gz") && e.contains("gzip bomb"), "{e}");
    // Images that compress as real ones do still read (4 MiB, beyond the fixed slack).
    let ok = dir.path().join("noise-images.gz");
    std::fs::write(&ok, gz(&idx_images(4096, 32, 32, |i| (i.wrapping_mul(2_654_435_761) >> 13) as u8))).unwrap();
    assert_eq!(mnist::read_images(&ok).unwrap().count, 4096);
}
