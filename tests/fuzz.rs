//! Seeded mutation fuzzing of every parser that reads untrusted bytes: the pickle VM and `.pth`
//! reader, safetensors, IDX (raw and gzip), CIFAR batches, PNG/JPEG decoding, and the experiment
//! loader with `include` and `--set`. Each case starts from a valid input, applies one to four
//! random mutations (bit flips, interesting values, insertions, deletions, duplicated ranges,
//! truncation) and must come back as `Ok` or `Err`:
//! - a panic fails the test, naming the target, case and seed;
//! - a case that runs longer than [`CASE_TIMEOUT`] aborts the binary, naming the case;
//! - this binary's allocator refuses any single allocation above [`MAX_ALLOCATION`], which aborts
//!   it ("memory allocation of N bytes failed"): no parser may size a buffer from the input alone.
//!
//! CI runs a few thousand cases in seconds. `RLPRUNE_FUZZ_CASES=N` runs N cases per target (and
//! `RLPRUNE_FUZZ_SEED=S` another stream), for long runs:
//!   RLPRUNE_FUZZ_CASES=200000 cargo test --release --test fuzz

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MAX_ALLOCATION: usize = 1 << 30;
const CASE_TIMEOUT: Duration = Duration::from_secs(30);

struct Capped;

/// The running case's label, for the allocator's refusal message (written without allocating).
static CURRENT: Mutex<([u8; 160], usize)> = Mutex::new(([0; 160], 0));

fn refuse() -> *mut u8 {
    if let Ok(label) = CURRENT.try_lock() {
        let msg = b"fuzz: an allocation above 1 GiB was refused in ";
        // SAFETY: writes of valid buffers to stderr.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::write(2, label.0.as_ptr().cast(), label.1);
            libc::write(2, b"\n".as_ptr().cast(), 1);
        }
    }
    std::ptr::null_mut()
}

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION { refuse() } else { unsafe { System.alloc(layout) } }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION { refuse() } else { unsafe { System.alloc_zeroed(layout) } }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION { refuse() } else { unsafe { System.realloc(ptr, layout, new_size) } }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

fn cases(default: usize) -> usize {
    std::env::var("RLPRUNE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn base_seed() -> u64 {
    std::env::var("RLPRUNE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5EED)
}

/// One to four random mutations of `input`; half of the in-place ones land on `hot` offsets
/// (a format's size and count fields), where uniform positions would rarely reach.
fn mutate(input: &[u8], hot: &[usize], rng: &mut ChaCha8Rng) -> Vec<u8> {
    const INTERESTING: [&[u8]; 8] = [
        &[0],
        &[0xff],
        &[0x7f],
        &[0x80],
        &[0xff, 0xff, 0xff, 0xff],
        &[0x7f, 0xff, 0xff, 0xff],
        &[0, 0, 0, 0x80],
        &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
    ];
    let mut v = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = v.len();
        let pos = |rng: &mut ChaCha8Rng| {
            let h = if hot.is_empty() || rng.random_bool(0.5) { None } else { Some(hot[rng.random_range(0..hot.len())]) };
            h.filter(|&i| i < len).unwrap_or_else(|| rng.random_range(0..len))
        };
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = pos(rng);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = pos(rng);
                v[i] = rng.random();
            }
            2 if len > 0 => {
                let val = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let i = pos(rng);
                for (k, b) in val.iter().enumerate() {
                    if i + k < len {
                        v[i + k] = *b;
                    }
                }
            }
            3 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let mut extra = vec![0u8; n];
                rng.fill_bytes(&mut extra);
                v.splice(i..i, extra);
            }
            4 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(64));
                v.drain(i..i + n);
            }
            5 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(64));
                let chunk = v[i..i + n].to_vec();
                let at = rng.random_range(0..=len);
                v.splice(at..at, chunk);
            }
            6 if len > 0 => v.truncate(rng.random_range(0..len)),
            _ => {}
        }
    }
    v
}

/// Runs `n` mutated cases of `seed_input` through `check`, which must not panic; a watchdog
/// aborts the process when one case runs longer than [`CASE_TIMEOUT`].
fn fuzz(target: &str, seed_input: &[u8], n: usize, check: impl FnMut(&[u8])) {
    fuzz_hot(target, seed_input, &[], n, check)
}

/// The offsets of a zip archive's size, count and offset fields (local headers, central
/// directory entries, end of central directory).
fn zip_fields(b: &[u8]) -> Vec<usize> {
    let mut hot = Vec::new();
    for i in 0..b.len().saturating_sub(4) {
        let fields: &[usize] = match &b[i..i + 4] {
            [b'P', b'K', 3, 4] => &[14, 18, 22, 26, 28],
            [b'P', b'K', 1, 2] => &[16, 20, 24, 28, 30, 32, 42],
            [b'P', b'K', 5, 6] => &[8, 10, 12, 16, 20],
            _ => &[],
        };
        for f in fields {
            hot.extend((i + f..i + f + 4).filter(|&k| k < b.len()));
        }
    }
    hot
}

fn fuzz_hot(target: &str, seed_input: &[u8], hot: &[usize], n: usize, mut check: impl FnMut(&[u8])) {
    static WATCH: Mutex<Option<(String, Instant)>> = Mutex::new(None);
    static STARTED: AtomicU64 = AtomicU64::new(0);
    if STARTED.fetch_add(1, Ordering::SeqCst) == 0 {
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                if let Some((case, t)) = WATCH.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
                    && t.elapsed() > CASE_TIMEOUT
                {
                    eprintln!("fuzz: {case} has run for more than {CASE_TIMEOUT:?}: a hang");
                    std::process::abort();
                }
            }
        });
    }
    let seed = base_seed() ^ target.bytes().fold(0u64, |h, b| h.wrapping_mul(0x100_0000_01b3) ^ b as u64);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    check(seed_input);
    for case in 0..n {
        let input = mutate(seed_input, hot, &mut rng);
        let label = format!("{target} case {case} (RLPRUNE_FUZZ_SEED={}, {} bytes)", base_seed(), input.len());
        *WATCH.lock().unwrap_or_else(|e| e.into_inner()) = Some((label.clone(), Instant::now()));
        {
            let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
            let n = label.len().min(current.0.len());
            current.0[..n].copy_from_slice(&label.as_bytes()[..n]);
            current.1 = n;
        }
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input))) {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("{label} panicked: {}", msg.unwrap_or_default());
        }
        *WATCH.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

// ------------------------------------------------------------------------------ .pth and pickle

fn plain_pth(dir: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/make_pth.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(dir)
        .arg(dir.join("pwned"))
        .output()
        .expect("python3 (stdlib only) is needed to write the .pth seed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir.join("plain.pth")
}

/// The entries of a zip archive, in order.
fn unzip(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut e = z.by_index(i).unwrap();
            let mut b = Vec::new();
            e.read_to_end(&mut b).unwrap();
            (e.name().to_string(), b)
        })
        .collect()
}

fn rezip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        w.start_file(name.as_str(), opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

#[test]
fn pth_files_and_their_pickles() {
    let dir = tempfile::tempdir().unwrap();
    let seed = plain_pth(dir.path());
    let raw = std::fs::read(&seed).unwrap();
    let case = dir.path().join("case.pth");
    // The whole file: mostly the zip layer.
    fuzz_hot("pth", &raw, &zip_fields(&raw), cases(600), |b| {
        write(&case, b);
        let _ = rlprune::import::read_pth(&case);
    });
    // A valid archive around a mutated pickle: the pickle VM.
    let entries = unzip(&seed);
    let pkl = entries.iter().position(|(n, _)| n.ends_with("data.pkl")).unwrap();
    fuzz("pickle", &entries[pkl].1, cases(1500), |b| {
        let mut e = entries.clone();
        e[pkl].1 = b.to_vec();
        write(&case, &rezip(&e));
        let _ = rlprune::import::read_pth(&case);
    });
    // Mutated storages (lengths, contents) under a valid pickle.
    let storage = entries.iter().position(|(n, _)| n.contains("/data/")).unwrap();
    fuzz("pth-storage", &entries[storage].1, cases(300), |b| {
        let mut e = entries.clone();
        e[storage].1 = b.to_vec();
        write(&case, &rezip(&e));
        let _ = rlprune::import::read_pth(&case);
    });
}

// ---------------------------------------------------------------------------------- safetensors

#[test]
fn safetensors_files() {
    use rlprune::nn::params::{HostTensor, StateDict};
    let dir = tempfile::tempdir().unwrap();
    let mut dict = StateDict::new();
    dict.insert("conv.weight".into(), HostTensor::new(vec![2, 1, 3, 3], (0..18).map(|i| i as f32 * 0.5).collect()));
    dict.insert("fc.bias".into(), HostTensor::new(vec![4], vec![1.0, -2.0, 3.0, -4.0]));
    let seed = dir.path().join("seed.safetensors");
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    rlprune::import::write_safetensors(&seed, &dict, &meta).unwrap();
    let raw = std::fs::read(&seed).unwrap();
    let case = dir.path().join("case.safetensors");
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let digits: Vec<usize> = (0..8).chain((8..8 + n).filter(|&i| raw[i].is_ascii_digit())).collect();
    fuzz_hot("safetensors", &raw, &digits, cases(1500), |b| {
        write(&case, b);
        let _ = rlprune::import::read_safetensors(&case);
        let _ = rlprune::import::read_safetensors_metadata(&case);
        let _ = rlprune::import::read_weights(&case);
    });
}

// ------------------------------------------------------------------------------- IDX and CIFAR

fn idx_images(n: u32, rows: u32, cols: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [0x0803u32, n, rows, cols] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v.extend((0..(n * rows * cols) as usize).map(|i| (i * 37 % 256) as u8));
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn idx_files_raw_and_gzip() {
    use rlprune::data::mnist::{read_images, read_labels};
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path().join("case");
    let images = idx_images(6, 5, 4);
    let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 6];
    labels.extend([1, 7, 3, 0, 9, 2]);
    let gz_fields = |b: &[u8]| -> Vec<usize> { (0..10).chain(b.len().saturating_sub(8)..b.len()).collect() };
    let gz_images = gz(&images);
    for (target, seed, hot) in [("idx-images", images.clone(), (0..16).collect()), ("idx-images-gz", gz_images.clone(), gz_fields(&gz_images))] {
        fuzz_hot(target, &seed, &hot, cases(1000), |b| {
            write(&case, b);
            let _ = read_images(&case);
        });
    }
    let gz_labels = gz(&labels);
    for (target, seed, hot) in [("idx-labels", labels.clone(), (0..8).collect()), ("idx-labels-gz", gz_labels.clone(), gz_fields(&gz_labels))] {
        fuzz_hot(target, &seed, &hot, cases(500), |b| {
            write(&case, b);
            let _ = read_labels(&case, 10);
        });
    }
}

#[test]
fn cifar_batches() {
    use rlprune::data::cifar::{CifarRecords, Variant, parse_records};
    for (variant, rec) in [(Variant::Cifar10, 3073), (Variant::Cifar100, 3074)] {
        let seed: Vec<u8> = (0..3 * rec).map(|i| if i % rec < rec - 3072 { (i / rec) as u8 } else { (i % 251) as u8 }).collect();
        let path = Path::new("data_batch_1.bin");
        let labels: Vec<usize> = (0..3).flat_map(|r| (r * rec..r * rec + rec - 3072).collect::<Vec<_>>()).collect();
        fuzz_hot(&format!("cifar-{rec}"), &seed, &labels, cases(800), |b| {
            let mut out = CifarRecords::default();
            let _ = parse_records(variant, path, b, &mut out);
        });
    }
}

// ------------------------------------------------------------------------------- images

#[test]
fn png_and_jpeg_images() {
    let dir = tempfile::tempdir().unwrap();
    let img = image::RgbImage::from_fn(12, 9, |x, y| image::Rgb([(x * 20) as u8, (y * 25) as u8, ((x + y) * 9) as u8]));
    let case = dir.path().join("case");
    for (target, format) in [("png", image::ImageFormat::Png), ("jpeg", image::ImageFormat::Jpeg)] {
        let mut bytes = std::io::Cursor::new(Vec::new());
        img.write_to(&mut bytes, format).unwrap();
        fuzz(target, bytes.get_ref(), cases(400), |b| {
            write(&case, b);
            let _ = rlprune::data::image_folder::decode_rgb(&case);
        });
    }
}

// ---------------------------------------------------------------------- experiments and --set

#[test]
fn experiment_files_includes_and_overrides() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("agents")).unwrap();
    std::fs::create_dir(dir.path().join("experiments")).unwrap();
    let agent = std::fs::read(root.join("agents/rnp-gru.toml")).unwrap();
    let exp = std::fs::read(root.join("experiments/quickstart.toml")).unwrap();
    let exp_path = dir.path().join("experiments/quickstart.toml");
    let agent_path = dir.path().join("agents/rnp-gru.toml");
    write(&agent_path, &agent);
    rlprune::methods::load(&root.join("experiments/quickstart.toml"), &[]).unwrap();
    fuzz("experiment", &exp, cases(1500), |b| {
        write(&exp_path, b);
        let _ = rlprune::methods::load(&exp_path, &[]);
    });
    write(&exp_path, &exp);
    fuzz("include", &agent, cases(800), |b| {
        write(&agent_path, b);
        let _ = rlprune::methods::load(&exp_path, &[]);
    });
    write(&agent_path, &agent);
    let set = b"rl.flops_target=0.5".to_vec();
    let table = b"train.optimizer={kind=\"sgd\",lr=0.1,momentum=0.9}".to_vec();
    for (target, seed) in [("set", set), ("set-table", table)] {
        fuzz(target, &seed, cases(800), |b| {
            let o = String::from_utf8_lossy(b).into_owned();
            let _ = rlprune::methods::load(&exp_path, &[o]);
        });
    }
}

