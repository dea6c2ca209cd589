//! Helpers shared by integration tests (`mod common;`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root (where Cargo.toml lives).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A Python interpreter that can `import tensorboard`.
///
/// 1. `$RLPRUNE_PYTHON`, if set (it must import tensorboard, else this panics);
/// 2. else `<repo>/.venv/bin/python` if it imports tensorboard;
/// 3. else creates `<repo>/.venv` with `python3 -m venv` and `pip install tensorboard` in it
///    (needs PyPI), then uses it.
///
/// The answer is computed once per test binary.
pub fn python_with_tensorboard() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(locate_python).clone()
}

fn imports_tensorboard(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import tensorboard"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
}

fn locate_python() -> PathBuf {
    if let Some(python) = std::env::var_os("RLPRUNE_PYTHON").filter(|p| !p.is_empty()) {
        let python = PathBuf::from(python);
        assert!(
            imports_tensorboard(&python),
            "RLPRUNE_PYTHON={} cannot `import tensorboard`",
            python.display()
        );
        return python;
    }
    let venv = repo_root().join(".venv");
    let python = venv_python(&venv);
    if python.exists() && imports_tensorboard(&python) {
        return python;
    }
    let base = if cfg!(windows) { "python" } else { "python3" };
    eprintln!(
        "creating {} and installing tensorboard (set RLPRUNE_PYTHON to skip)",
        venv.display()
    );
    if !python.exists() {
        let status = Command::new(base)
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap_or_else(|e| panic!("running `{base} -m venv {}`: {e}", venv.display()));
        assert!(
            status.success(),
            "`{base} -m venv {}` failed: {status}",
            venv.display()
        );
    }
    let status = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "tensorboard"])
        .status()
        .unwrap_or_else(|e| panic!("running pip in {}: {e}", venv.display()));
    assert!(
        status.success(),
        "`pip install tensorboard` in {} failed: {status}",
        venv.display()
    );
    assert!(
        imports_tensorboard(&python),
        "{} still cannot import tensorboard",
        python.display()
    );
    python
}

/// burn's backend RNG is process-global, and the test harness runs a binary's tests on
/// parallel threads: a test that seeds the RNG and then draws from it (model init, dropout,
/// a training run compared against another) holds this lock so no other test draws between.
pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static RNG_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the `rlprune` binary built for this test run in `cwd`.
pub fn rlprune(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rlprune")).args(args).current_dir(cwd).output().expect("run rlprune")
}

/// Asserts success; returns stdout and stderr together.
pub fn ok(out: &std::process::Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "rlprune failed:\n{text}");
    text
}

/// Asserts the clean failure bad input must give (exit 1, no panic); returns stderr.
pub fn failed(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "expected exit 1, got {:?}:\n{err}", out.status.code());
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "panic:\n{err}");
    err
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The folder of the reference fixtures: `$RLPRUNE_PARITY_DIR` if set, else the first
/// `shared/parity` above the crate (`../shared` next to a checkout, `../../shared` from a
/// worktree under `wt/`). Missing fixtures fail the test that needs them, naming where they
/// were looked for; nothing skips.
pub fn parity_root() -> PathBuf {
    if let Some(d) = std::env::var_os("RLPRUNE_PARITY_DIR") {
        let d = PathBuf::from(d);
        assert!(d.is_dir(), "RLPRUNE_PARITY_DIR={} is not a folder", d.display());
        return d;
    }
    let candidates: Vec<PathBuf> = repo_root().ancestors().skip(1).map(|a| a.join("shared").join("parity")).collect();
    candidates
        .iter()
        .find(|p| p.is_dir())
        .cloned()
        .unwrap_or_else(|| panic!("parity fixtures not found in any of {candidates:?} (set RLPRUNE_PARITY_DIR)"))
}

/// The fixture `name` under [`parity_root`]; a missing one fails the test.
pub fn parity_fixture(name: &str) -> PathBuf {
    let d = parity_root().join(name);
    assert!(d.is_dir(), "parity fixture {} not found", d.display());
    d
}

/// Every file under `dir` with its bytes, sorted by path: to show that a refused command left a
/// run directory exactly as it was.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.push((p, bytes));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

/// The device the parity tests run on: `RLPRUNE_TEST_DEVICE` (`cuda`, `cuda:N`: a test binary
/// built with `--features cuda`, as `scripts/gpu-check.sh` runs it), else the CPU.
pub fn test_device() -> rlprune::device::DeviceSpec {
    match std::env::var("RLPRUNE_TEST_DEVICE") {
        Ok(d) => rlprune::device::DeviceSpec::parse(&d).unwrap_or_else(|e| panic!("RLPRUNE_TEST_DEVICE: {e:#}")),
        Err(_) => rlprune::device::DeviceSpec::Cpu,
    }
}

/// How close outputs must be to the reference's.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub max_abs: f64,
    pub rel_l2: f64,
}

/// f32 throughout, as the reference ran.
pub const CPU_TOLERANCE: Tolerance = Tolerance { max_abs: 1e-4, rel_l2: 1e-5 };

/// A CUDA device: cubecl 0.10 stages f32 matmul and convolution operands as TF32 (10-bit
/// mantissa) on tensor cores and has no switch to turn that off (cubek-matmul 0.2,
/// `adjust_dtypes`). Measured on an H100: max abs up to 2.1e-4, rel L2 2–4e-4; this bound leaves
/// a margin of 5. With TF32 off the CPU tolerance would apply. `scripts/gpu-check.sh` uses the
/// same numbers.
pub const TF32_TOLERANCE: Tolerance = Tolerance { max_abs: 1e-3, rel_l2: 2e-3 };

/// The tolerance of [`test_device`].
pub fn parity_tolerance() -> Tolerance {
    match test_device() {
        rlprune::device::DeviceSpec::Cpu => CPU_TOLERANCE,
        _ => TF32_TOLERANCE,
    }
}

/// Asserts that each of `files` under `a` and `b` holds the same tensors, value for value (a
/// resumed run against the uninterrupted one).
pub fn assert_same_tensors(a: &Path, b: &Path, files: &[&str]) {
    for file in files {
        let x = rlprune::import::read_safetensors(&a.join(file)).unwrap();
        let y = rlprune::import::read_safetensors(&b.join(file)).unwrap();
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{file}");
        for (k, t) in &x {
            assert_eq!(t.data, y[k.as_str()].data, "{}/{file}: {k} differs from {}", b.display(), a.display());
        }
    }
}

/// `rlprune train <repo>/experiments/<experiment>` into `dir/run` on a few synthetic 28×28
/// images (32 train, 16 test, one epoch), with `extra` overrides.
pub fn train_on_synthetic(dir: &Path, experiment: &str, extra: &[&str]) {
    let exp = repo_root().join("experiments").join(experiment);
    let mut args = vec![
        "train", exp.to_str().unwrap(), "--out", "run",
        "--set", "data.dataset=\"synthetic\"", "--set", "data.classes=10", "--set", "data.channels=1",
        "--set", "data.size=28", "--set", "data.train_size=32", "--set", "data.test_size=16",
        "--set", "data.batch_size=16", "--set", "train.epochs=1",
    ];
    for s in extra {
        args.extend(["--set", s]);
    }
    ok(&rlprune(&args, dir));
}
