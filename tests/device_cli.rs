//! Requesting CUDA from a build without the `cuda` feature: one clear error line and exit code 1
//! from `train`, `eval` and `infer`, whether the request comes from `--device` or the experiment.
//! (With the feature, the request reaches the driver probe instead; see docs/gpu.md.)
#![cfg(not(feature = "cuda"))]

use std::path::Path;
use std::process::Command;

fn rlprune_fails(args: &[&str], cwd: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rlprune")).args(args).current_dir(cwd).output().expect("run rlprune");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "expected exit 1 for {args:?}, got {:?}:\n{err}", out.status.code());
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line for {args:?}, got:\n{err}");
    assert!(lines[0].starts_with("error: ") && !err.contains("panicked"), "{err}");
    assert!(lines[0].contains("built without it") && lines[0].contains("--features cuda"), "{err}");
    err
}

const EXP: &str = r#"name = "dev"
[data]
dataset = "synthetic"
batch_size = 8
classes = 2
size = 8
train_size = 16
test_size = 8
[backbone]
arch = "small-cnn"
"#;

#[test]
fn cuda_on_a_cpu_build_is_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("exp.toml"), EXP).unwrap();
    std::fs::write(dir.join("exp_cuda.toml"), format!("device = \"cuda:1\"\n{EXP}")).unwrap();
    std::fs::write(dir.join("exp_dp.toml"), format!("devices = [\"cuda:0\", \"cuda:1\"]\n{EXP}")).unwrap();

    let e = rlprune_fails(&["train", "exp.toml", "--device", "cuda"], dir);
    assert!(e.contains("--device"), "{e}");
    rlprune_fails(&["eval", "exp.toml", "--checkpoint", "none.safetensors", "--device", "cuda:0"], dir);
    rlprune_fails(&["infer", "--model", "m.toml", "--weights", "w", "--input", "x", "--output", "y", "--device", "cuda"], dir);
    // From the experiment file: the error names the file, line and key.
    let e = rlprune_fails(&["train", "exp_cuda.toml"], dir);
    assert!(e.contains("exp_cuda.toml:1") && e.contains("device"), "{e}");
    let e = rlprune_fails(&["train", "exp_dp.toml"], dir);
    assert!(e.contains("devices"), "{e}");
    assert!(!dir.join("runs").exists(), "no run directory for a failed start");
}

#[test]
fn bad_device_names_and_mixed_peers_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("exp.toml"), EXP).unwrap();
    for (args, want) in [
        (vec!["train", "exp.toml", "--device", "gpu"], "must be \"cpu\", \"cuda\" or \"cuda:N\""),
        (vec!["train", "exp.toml", "--set", "devices=[\"cpu\", \"cpu\", \"cpu\"]"], "multiple of the number of devices (3)"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_rlprune")).args(&args).current_dir(dir).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
