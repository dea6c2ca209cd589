//! `rlprune bench` through the binary: the JSON line's fields, inference and training steps,
//! size overrides, thread limits and clear errors for bad input.

use std::process::Output;

mod common;
use common::rlprune;

const TINY_GFNET: &str =
    "[model]\nfamily = \"gfnet\"\nimg_size = 16\npatch_size = 4\nembed_dim = 16\ndepth = 2\nnum_classes = 5\n";

fn json_line(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rlprune failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "--json prints exactly one line:\n{stdout}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {}", lines[0]))
}

fn check_numbers(j: &serde_json::Value) {
    let f = |k: &str| {
        j[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing or not a number in {j}"))
    };
    for k in ["images_per_s", "latency_ms"] {
        let (lo, p10, med, p90, hi) = (
            f(&format!("{k}_min")),
            f(&format!("{k}_p10")),
            f(k),
            f(&format!("{k}_p90")),
            f(&format!("{k}_max")),
        );
        assert!(
            lo > 0.0 && lo <= p10 && p10 <= med && med <= p90 && p90 <= hi,
            "{k}: {j}"
        );
    }
    // Images per second and milliseconds per batch describe the same steps.
    let batch = j["batch"].as_f64().unwrap();
    let implied = 1e3 * batch / f("latency_ms_max");
    assert!((f("images_per_s_min") - implied).abs() <= 1e-6 * implied, "{j}");
    if cfg!(target_os = "linux") {
        assert!(f("peak_rss_mb") > 1.0, "{j}");
    }
}

#[test]
fn bench_json_reports_inference_and_training() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tiny.toml"), TINY_GFNET).unwrap();

    let j = json_line(&rlprune(
        &[
            "bench",
            "tiny.toml",
            "--batch",
            "3",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--json",
        ],
        dir.path(),
    ));
    assert_eq!(j["model"], "tiny.toml");
    assert_eq!(j["framework"], "rlprune");
    assert_eq!(j["device"], "cpu");
    assert_eq!(j["mode"], "infer");
    assert_eq!(
        (j["batch"].as_u64(), j["repeats"].as_u64(), j["warmup"].as_u64()),
        (Some(3), Some(2), Some(1))
    );
    assert_eq!(
        (
            j["img_size"].as_u64(),
            j["in_chans"].as_u64(),
            j["num_classes"].as_u64()
        ),
        (Some(16), Some(3), Some(5))
    );
    assert!(j["threads"].as_u64().unwrap() >= 1);
    // patch embed 3·16·16+16, pos_embed 16·16, per block 2 norms (64) + filter 4·3·16·2 (384)
    // + mlp 16·64+64+64·16+16 (2128), final norm 32, head 16·5+5.
    assert_eq!(j["params"].as_u64(), Some(784 + 256 + 2 * (64 + 384 + 2128) + 32 + 85));
    check_numbers(&j);

    let t = json_line(&rlprune(
        &[
            "bench",
            "tiny.toml",
            "--train",
            "--batch",
            "2",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--img-size",
            "8",
            "--num-classes",
            "3",
            "--json",
        ],
        dir.path(),
    ));
    assert_eq!(t["mode"], "train");
    assert_eq!(t["threads"].as_u64(), Some(1));
    assert_eq!((t["img_size"].as_u64(), t["num_classes"].as_u64()), (Some(8), Some(3)));
    check_numbers(&t);

    // Without --json: a table naming the model and the measured quantities.
    let out = rlprune(
        &["bench", "tiny.toml", "--batch", "2", "--repeats", "1", "--warmup", "0"],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("tiny.toml") && text.contains("images/s") && text.contains("peak RSS"),
        "{text}"
    );
}

#[test]
fn bench_zoo_names_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    // A zoo CNN at its own size (32×32, 10 classes).
    let j = json_line(&rlprune(
        &[
            "bench",
            "resnet56-cifar",
            "--batch",
            "2",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--json",
        ],
        dir.path(),
    ));
    assert_eq!(
        (j["img_size"].as_u64(), j["num_classes"].as_u64()),
        (Some(32), Some(10))
    );
    check_numbers(&j);

    for (args, expect) in [
        (vec!["bench", "no-such-model"], "unknown zoo name"),
        (vec!["bench", "missing.toml"], "missing.toml"),
        (vec!["bench", "gfnet-ti", "--batch", "0"], "--batch"),
        (vec!["bench", "gfnet-ti", "--threads", "0"], "thread"),
        // 16×16 patches do not fit an 8×8 input.
        (vec!["bench", "gfnet-ti", "--img-size", "8"], "img_size"),
    ] {
        let out = rlprune(&args, dir.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(expect) && !err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn bench_routed_times_a_keep_all_router_against_the_dense_net() {
    let dir = tempfile::tempdir().unwrap();
    let j = json_line(&rlprune(
        &["bench", "small-cnn", "--routed", "4", "--batch", "3", "--repeats", "3", "--warmup", "1", "--json"],
        dir.path(),
    ));
    assert_eq!((j["batch"].as_u64(), j["groups"].as_u64(), j["repeats"].as_u64()), (Some(3), Some(4), Some(3)), "{j}");
    for side in ["dense_ms", "routed_ms", "pair_ratio"] {
        let s = &j[side];
        let f = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{side}.{k} missing in {j}"));
        assert!(f("min") > 0.0 && f("min") <= f("p10") && f("p10") <= f("median") && f("median") <= f("p90") && f("p90") <= f("max"), "{j}");
    }
    let ratio = j["speed_ratio"].as_f64().unwrap();
    let implied = j["dense_ms"]["median"].as_f64().unwrap() / j["routed_ms"]["median"].as_f64().unwrap();
    assert!((ratio - implied).abs() < 1e-9, "{j}");

    for (args, expect) in [
        // GFNet has no convolution a channel router can prune.
        (vec!["bench", "gfnet-ti", "--routed", "4"], "no layers a channel router can prune"),
        (vec!["bench", "small-cnn", "--routed", "0"], "at least one group"),
        (vec!["bench", "small-cnn", "--routed", "4", "--train"], "--train"),
    ] {
        let out = rlprune(&args, dir.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.contains(expect) && !err.contains("panicked"), "{args:?}: {err}");
    }
}
