//! `[data]` parsing and validation, dataset discovery, limits, the synthetic dataset, and
//! `data fetch` / `data check` (without internet: a local HTTP server stands in).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use rlprune::data::fetch::{self, Remote};
use rlprune::data::{self, DataConfig, DatasetKind};

mod common;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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

#[test]
fn toml_table_parses_with_defaults_and_rejects_unknown_keys() {
    let c: DataConfig = toml::from_str("dataset = \"fashion-mnist\"\nroot = \"data/fashion-mnist-subset\"\n").unwrap();
    assert_eq!(c.dataset, DatasetKind::FashionMnist);
    assert_eq!(c.root.as_deref(), Some(Path::new("data/fashion-mnist-subset")));
    assert_eq!((c.batch_size, c.eval_batch_size, c.prefetch, c.workers), (128, 256, 4, 1));
    assert!(c.drop_last && c.normalize && !c.hflip);
    assert_eq!((c.random_crop_padding, c.resize, c.train_limit), (0, None, None));
    assert_eq!((c.classes, c.channels, c.size, c.train_size, c.test_size), (10, 1, 28, 512, 128));
    assert!(c.validate().is_empty());
    for (name, kind) in [
        ("mnist", DatasetKind::Mnist),
        ("cifar10", DatasetKind::Cifar10),
        ("cifar100", DatasetKind::Cifar100),
        ("image-folder", DatasetKind::ImageFolder),
        ("synthetic", DatasetKind::Synthetic),
    ] {
        let c: DataConfig = toml::from_str(&format!("dataset = \"{name}\"")).unwrap();
        assert_eq!(c.dataset, kind);
        assert_eq!(DatasetKind::from_name(name).unwrap(), kind);
    }
    let c: DataConfig =
        toml::from_str("dataset = \"cifar10\"\nresize = [40, 48]\nmean = [0.5]\nhflip = true\ntrain_limit = 100")
            .unwrap();
    assert_eq!(c.resize, Some([40, 48]));
    // Round trip.
    let back: DataConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    let e = toml::from_str::<DataConfig>("dataset = \"mnist\"\nbatchsize = 3").unwrap_err().to_string();
    assert!(e.contains("batchsize"), "{e}");
    assert!(toml::from_str::<DataConfig>("dataset = \"imagenet\"").is_err());
    assert!(toml::from_str::<DataConfig>("batch_size = 3").is_err(), "dataset is required");
    assert!(DatasetKind::from_name("imagenet").unwrap_err().to_string().contains("fashion-mnist"));
}

#[test]
fn validate_reports_keys_and_messages() {
    let mut c = DataConfig::for_dataset(DatasetKind::Cifar10);
    c.batch_size = 0;
    c.prefetch = 0;
    c.mean = Some(vec![0.1, 0.2]);
    c.std = Some(vec![0.0]);
    c.train_limit = Some(0);
    let v = c.validate();
    let has = |k: &str, m: &str| v.iter().any(|(key, msg)| key == k && msg.contains(m));
    assert!(has("batch_size", "must be > 0, got 0"), "{v:?}");
    assert!(has("prefetch", "must be > 0"), "{v:?}");
    assert!(has("mean", "1 or 3 value(s)"), "{v:?}");
    assert!(has("std", "> 0"), "{v:?}");
    assert!(has("train_limit", "> 0"), "{v:?}");
    let c = DataConfig::for_dataset(DatasetKind::ImageFolder);
    let v = c.validate();
    assert!(v.iter().any(|(k, _)| k == "resize") && v.iter().any(|(k, _)| k == "root"), "{v:?}");
    let mut c = DataConfig::for_dataset(DatasetKind::Synthetic);
    c.classes = 1;
    c.size = 0;
    let v = c.validate();
    assert!(v.iter().any(|(k, _)| k == "classes") && v.iter().any(|(k, _)| k == "size"), "{v:?}");
    // open refuses an invalid table with the key in the message.
    let e = err_of(data::open(&c, Path::new("/")));
    assert!(e.starts_with("data.classes: "), "{e}");
}

#[test]
fn missing_dataset_error_lists_searched_places() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let e = err_of(data::open(&DataConfig::for_dataset(DatasetKind::Mnist), base));
    let want = base.join("data/mnist").display().to_string();
    assert!(e.contains("dataset mnist not found") && e.contains(&want), "{e}");
    assert!(e.contains("rlprune data fetch mnist"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");

    let e = err_of(data::open(&DataConfig::for_dataset(DatasetKind::Cifar100), base));
    assert!(e.contains(&base.join("data/cifar-100-binary").display().to_string()), "{e}");

    // Present directory, missing files: the message says which.
    std::fs::create_dir_all(base.join("data/cifar-10-batches-bin")).unwrap();
    std::fs::write(base.join("data/cifar-10-batches-bin/test_batch.bin"), [0u8; 3073]).unwrap();
    let e = err_of(data::open(&DataConfig::for_dataset(DatasetKind::Cifar10), base));
    assert!(e.contains("missing data_batch_1.bin") && !e.contains("missing test_batch.bin"), "{e}");

    // An explicit root is the only place searched.
    let mut c = DataConfig::for_dataset(DatasetKind::FashionMnist);
    c.root = Some("nowhere/fm".into());
    let e = err_of(data::open(&c, base));
    assert!(e.contains(&base.join("nowhere/fm").display().to_string()), "{e}");
    assert!(!e.contains("/usr/share/datasets"), "{e}");
    assert!(
        e.contains("apt-get install dataset-fashion-mnist") && e.contains("fetch fashion-mnist --dir nowhere/fm`"),
        "{e}"
    );
    assert_eq!(data::search_dirs(&c, base), vec![base.join("nowhere/fm")]);

    // Without root, Fashion-MNIST also looks in the Debian package's directory.
    let dirs = data::search_dirs(&DataConfig::for_dataset(DatasetKind::FashionMnist), base);
    assert_eq!(dirs, vec![base.join("data/fashion-mnist"), PathBuf::from("/usr/share/datasets/fashion-mnist")]);
}

#[test]
fn fashion_mnist_found_in_data_dir_then_debian_package() {
    let tmp = tempfile::tempdir().unwrap();
    // data/fashion-mnist under base_dir wins.
    let local = tmp.path().join("data/fashion-mnist");
    std::fs::create_dir_all(&local).unwrap();
    for f in std::fs::read_dir(repo().join("data/fashion-mnist-subset")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, local.join(f.file_name().unwrap())).unwrap();
    }
    let cfg = DataConfig::for_dataset(DatasetKind::FashionMnist);
    let s = data::open(&cfg, tmp.path()).unwrap();
    assert_eq!(s.test.describe(), "fashion-mnist test (1000 images) from data/fashion-mnist");
}

/// Needs the Debian package `dataset-fashion-mnist`; `.ci/run` installs it and runs this test.
#[test]
#[ignore = "needs /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist); .ci/run runs it"]
fn debian_fashion_mnist_is_found_and_checked() {
    // Without data/fashion-mnist, the Debian package's copy is found...
    let cfg = DataConfig::for_dataset(DatasetKind::FashionMnist);
    let empty = tempfile::tempdir().unwrap();
    let s = data::open(&cfg, empty.path()).unwrap();
    assert_eq!(s.train.len(), 60_000);
    assert_eq!(s.test.len(), 10_000);
    assert!(s.test.describe().ends_with("from /usr/share/datasets/fashion-mnist"));
    assert_eq!(data::class_histogram(s.test.as_ref()).unwrap(), vec![1000; 10]);
    // ...and `data check` verifies it holds the official contents.
    let report = data::check("fashion-mnist", None, empty.path()).unwrap();
    assert_eq!(report.matches("official contents, decompressed sha256 verified").count(), 4, "{report}");
    assert!(report.contains("Sneaker=6000"), "{report}");
}

#[test]
fn limits_take_class_balanced_first_images() {
    assert_eq!(data::balanced_subset(&[0, 0, 1, 0, 2, 1, 2, 2], 3, 5), vec![0, 1, 2, 4, 5]);
    assert_eq!(data::balanced_subset(&[0, 0, 0, 1], 2, 3), vec![0, 1, 3]);
    assert_eq!(data::balanced_subset(&[0, 1], 2, 10), vec![0, 1]);
    let mut cfg = DataConfig::for_dataset(DatasetKind::FashionMnist);
    cfg.root = Some("data/fashion-mnist-subset".into());
    cfg.train_limit = Some(95);
    cfg.test_limit = Some(5000);
    let s = data::open(&cfg, &repo()).unwrap();
    assert_eq!(s.train.len(), 95);
    assert_eq!(s.test.len(), 1000, "a limit above the size keeps everything");
    let h = data::class_histogram(s.train.as_ref()).unwrap();
    assert_eq!(h.iter().sum::<usize>(), 95);
    assert!(h.iter().all(|&n| n == 9 || n == 10), "{h:?}");
    assert!(s.train.describe().contains("class-balanced subset limited to 95"), "{}", s.train.describe());
    // Deterministic.
    let again = data::open(&cfg, &repo()).unwrap();
    for i in [0, 50, 94] {
        assert_eq!(s.train.get(i).unwrap(), again.train.get(i).unwrap());
    }
}

#[test]
fn synthetic_is_deterministic_and_learnable() {
    let mut cfg = DataConfig::for_dataset(DatasetKind::Synthetic);
    cfg.channels = 3;
    cfg.size = 16;
    let s = data::open(&cfg, Path::new("/")).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (512, 128));
    assert_eq!(s.train.image_shape(), [3, 16, 16]);
    assert_eq!(s.train.get(7).unwrap(), s.train.get(7).unwrap());
    assert_ne!(s.train.get(7).unwrap().image, s.test.get(7).unwrap().image);
    assert_eq!(data::class_histogram(s.test.as_ref()).unwrap(), vec![13, 13, 13, 13, 13, 13, 13, 13, 12, 12]);
    // Nearest class mean on the raw pixels already separates the classes.
    let d = 3 * 16 * 16;
    let mut means = vec![vec![0f32; d]; 10];
    let mut counts = [0f32; 10];
    for i in 0..s.train.len() {
        let x = s.train.get(i).unwrap();
        counts[x.label] += 1.0;
        for (m, v) in means[x.label].iter_mut().zip(&x.image) {
            *m += v;
        }
    }
    for (m, n) in means.iter_mut().zip(counts) {
        m.iter_mut().for_each(|v| *v /= n);
    }
    let mut correct = 0;
    for i in 0..s.test.len() {
        let x = s.test.get(i).unwrap();
        let dist = |m: &Vec<f32>| m.iter().zip(&x.image).map(|(a, b)| (a - b) * (a - b)).sum::<f32>();
        let pred = (0..10).min_by(|&a, &b| dist(&means[a]).total_cmp(&dist(&means[b]))).unwrap();
        correct += usize::from(pred == x.label);
    }
    assert!(correct as f32 / s.test.len() as f32 > 0.9, "nearest-mean accuracy {correct}/128");
    // A different seed gives different images.
    cfg.synthetic_seed = 1;
    let t = data::open(&cfg, Path::new("/")).unwrap();
    assert_ne!(t.train.get(0).unwrap().image, s.train.get(0).unwrap().image);
}

/// Serves `body` once per connection on localhost, `count` times. Returns the URL.
fn serve(body: Vec<u8>, count: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(count) {
            let Ok(mut s) = stream else { continue };
            let mut req = [0u8; 4096];
            let _ = s.read(&mut req);
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = s.write_all(&body);
        }
    });
    format!("http://127.0.0.1:{port}/file.gz")
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn download_verifies_sha256_and_never_leaves_partial_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let body = b"hello dataset".to_vec();
    let good_sha = fetch::sha256_reader(&mut &body[..]).unwrap();
    let url = leak(serve(body.clone(), 2));
    let good = Remote { url, file: "hello.bin", sha256: leak(good_sha), content_sha256: None };
    let path = fetch::fetch_file(&good, dir, DatasetKind::Mnist).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    assert_eq!(files_in(dir), vec!["hello.bin"]);

    let bad = Remote { url, file: "other.bin", sha256: "00", content_sha256: None };
    let e = err_of(fetch::fetch_file(&bad, dir, DatasetKind::Mnist));
    assert!(e.contains("sha256 mismatch") && e.contains(url), "{e}");
    assert_eq!(files_in(dir), vec!["hello.bin"], "no partial or unverified file left");

    // Nothing listens on this port: a clear failure, with offline alternatives.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead =
        Remote { url: leak(format!("http://127.0.0.1:{port}/x.gz")), file: "x.gz", sha256: "00", content_sha256: None };
    let e = err_of(fetch::fetch_file(&dead, dir, DatasetKind::FashionMnist));
    assert!(e.contains("download of http://127.0.0.1") && e.contains("failed"), "{e}");
    assert!(e.contains("data/fashion-mnist-subset") && e.contains("apt-get install dataset-fashion-mnist"), "{e}");
    assert_eq!(files_in(dir), vec!["hello.bin"]);
    assert!(err_of(data::fetch("synthetic", None, dir, None)).contains("nothing to fetch"));
    // A whole-dataset fetch that cannot download leaves no dataset directory and no file behind:
    // through `rlprune data fetch --mirror`, from a local server that serves the wrong bytes.
    let base = tempfile::tempdir().unwrap();
    let mirror = serve(b"not an IDX file".to_vec(), 1);
    let mirror = mirror.trim_end_matches("/file.gz");
    let out = common::rlprune(&["data", "fetch", "mnist", "--mirror", mirror], base.path());
    let e = common::failed(&out);
    assert!(e.contains(&format!("download of {mirror}/train-images-idx3-ubyte.gz failed")), "{e}");
    assert!(e.contains("sha256 mismatch") && e.contains("no partial file left"), "{e}");
    assert!(!base.path().join("data/mnist").exists(), "no empty dataset directory left");
    assert_eq!(files_in(base.path()), Vec::<String>::new());
    // The same for a CIFAR archive, from a mirror that is not there.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead_mirror = format!("http://127.0.0.1:{port}/mirror/");
    let e = err_of(data::fetch("cifar10", None, base.path(), Some(&dead_mirror)));
    assert!(e.contains(&format!("download of http://127.0.0.1:{port}/mirror/cifar-10-binary.tar.gz failed")), "{e}");
    assert!(!base.path().join("data/cifar-10-batches-bin").exists(), "no empty dataset directory left");
}

#[test]
fn cifar_archive_extraction_writes_only_known_files_flat() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("a.tar.gz");
    {
        let gz = flate2::write::GzEncoder::new(std::fs::File::create(&archive).unwrap(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        let mut add = |path: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, data).unwrap();
        };
        add("cifar-10-batches-bin/data_batch_1.bin", &[7u8; 3073]);
        add("cifar-10-batches-bin/batches.meta.txt", b"airplane\n");
        add("cifar-10-batches-bin/unexpected.sh", b"echo no");
        b.into_inner().unwrap().finish().unwrap();
    }
    let target = tmp.path().join("out");
    std::fs::create_dir_all(&target).unwrap();
    let written = fetch::extract_cifar(rlprune::data::cifar::Variant::Cifar10, &archive, &target).unwrap();
    assert_eq!(written, vec!["data_batch_1.bin", "batches.meta.txt"]);
    assert_eq!(files_in(&target), vec!["batches.meta.txt", "data_batch_1.bin"]);
    assert_eq!(std::fs::read(target.join("data_batch_1.bin")).unwrap(), vec![7u8; 3073]);
    // A corrupt archive is an error, not a panic, and leaves no partial file.
    std::fs::write(&archive, b"\x1f\x8b garbage").unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(fetch::extract_cifar(rlprune::data::cifar::Variant::Cifar10, &archive, &empty).is_err());
    assert!(files_in(&empty).is_empty());
}

#[test]
#[ignore = "needs internet access; downloads MNIST (11 MB)"]
fn fetch_real_mnist() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = data::fetch("mnist", None, tmp.path(), None).unwrap();
    let report = data::check("mnist", Some(&dir), tmp.path()).unwrap();
    assert!(report.contains("official file, sha256 verified"), "{report}");
}

#[test]
fn check_summarises_the_shipped_subset() {
    let report = data::check("fashion-mnist", Some(Path::new("data/fashion-mnist-subset")), &repo()).unwrap();
    assert!(report.contains("fashion-mnist train (6000 images) from data/fashion-mnist-subset"), "{report}");
    assert!(report.contains("not the official file"), "{report}");
    assert!(report.contains("T-shirt/top=600") && report.contains("Ankle boot=100"), "{report}");
    assert!(report.contains("pixel mean (0.28"), "{report}");
    let report = data::check("synthetic", None, Path::new("/")).unwrap();
    assert!(report.contains("synthetic train (512 images"), "{report}");
    let e = err_of(data::check("mnist", None, Path::new("/nonexistent-base")));
    assert!(e.contains("/nonexistent-base/data/mnist"), "{e}");
}
