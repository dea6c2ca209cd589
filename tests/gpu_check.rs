//! `scripts/gpu-check.sh`'s parity gate, exercised without a GPU: stand-in parity test binaries
//! print fixture lines in the real tests' format, and the script must exit 1 when one is beyond
//! the GPU tolerance (or a test fails) and 0 when all are within it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// A stand-in test binary printing `lines` and exiting with `rc`.
fn fake_test(dir: &Path, name: &str, lines: &[&str], rc: i32) -> String {
    let path = dir.join(name);
    let body: String = lines.iter().map(|l| format!("echo '{l}'\n")).collect();
    std::fs::write(&path, format!("#!/bin/sh\n{body}exit {rc}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

fn gpu_check(dir: &Path, tests: &[String]) -> (Option<i32>, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).args(["--bin", env!("CARGO_BIN_EXE_rlprune"), "--steps", "parity", "--device", "cpu"]);
    cmd.args(["--parity-dir", dir.to_str().unwrap(), "--out", dir.join("table.md").to_str().unwrap()]);
    for t in tests {
        cmd.args(["--parity-test", t]);
    }
    let out = cmd.output().unwrap();
    let table = std::fs::read_to_string(dir.join("table.md")).unwrap_or_default();
    (out.status.code(), format!("{table}\n{}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn parity_gate_passes_within_tolerance_and_fails_beyond_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok_line = "gfnet_iso_seed0: max abs err 2.100e-4, rel L2 4.000e-4";
    let result = "test result: ok. 1 passed; 0 failed";

    let within = fake_test(d, "parity-0000", &[ok_line, result], 0);
    let (rc, text) = gpu_check(d, std::slice::from_ref(&within));
    assert_eq!(rc, Some(0), "{text}");
    assert!(text.contains("within tolerance"), "{text}");

    // Beyond max abs 1e-3, though the stand-in's own verdict is "ok".
    let beyond = fake_test(d, "parity-1111", &["hornet_gf_seed0: max abs err 5.000e-3, rel L2 4.000e-4", result], 0);
    let (rc, text) = gpu_check(d, &[within.clone(), beyond]);
    assert_eq!(rc, Some(1), "{text}");
    assert!(text.contains("FAILED: beyond max abs 1e-3") && text.contains("parity gate FAILED"), "{text}");

    // Beyond rel L2 2e-3 only.
    let rel = fake_test(d, "parity-2222", &["hornet_gf_seed0: max abs err 1.000e-4, rel L2 3.000e-3", result], 0);
    assert_eq!(gpu_check(d, &[rel]).0, Some(1));

    // A failing test binary, and a missing one.
    let failing = fake_test(d, "dynamicvit-3333", &[ok_line, "test result: FAILED. 0 passed; 1 failed"], 101);
    assert_eq!(gpu_check(d, &[failing]).0, Some(1));
    let (rc, text) = gpu_check(d, &[d.join("parity-missing").display().to_string()]);
    assert_eq!(rc, Some(1), "{text}");

    // Asked for parity with no test binaries: the gate cannot pass.
    let (rc, text) = gpu_check(d, &[]);
    assert_eq!(rc, Some(1), "{text}");
    assert!(text.contains("FAILED (not run)"), "{text}");
}
