//! `rlprune sweep` on the synthetic dataset: one backbone, two penalties and a static baseline;
//! checks the CSV rows, the shared backbone and the PNG's dimensions.

use std::path::PathBuf;

use rlprune::sweep::{PLOT_SIZE, SweepOptions, run_sweep, split_sets};

mod common;
use common::write;

const COMMON: &str = r#"
seed = 3
[data]
dataset = "synthetic"
size = 16
train_size = 128
test_size = 64
batch_size = 32
eval_batch_size = 64
[backbone]
arch = "small-cnn"
channels = [8, 8, 16, 16]
[train]
epochs = 1
optimizer = { kind = "sgd", lr = 0.05, momentum = 0.9 }
[log]
every_steps = 2
histograms = false
"#;

#[test]
fn split_sets_finds_the_swept_key() {
    let sets =
        vec!["rl.compute_penalty=0.02,0.05".to_string(), "data.mean=[0.1,0.2]".to_string(), "rl.epochs=1".to_string()];
    let (k, v, fixed) = split_sets(&sets).unwrap();
    assert_eq!(k, "rl.compute_penalty");
    assert_eq!(v, vec!["0.02", "0.05"]);
    assert_eq!(fixed, vec!["data.mean=[0.1,0.2]", "rl.epochs=1"]);
    assert!(split_sets(&["rl.epochs=1".to_string()]).is_err());
    assert!(split_sets(&["a=1,2".to_string(), "b=3,4".to_string()]).is_err());
}

/// The swept RNP experiment and the static baseline, written into `dir`.
fn experiments(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let rnp = write(
        dir,
        "rnp.toml",
        &format!(
            "name = \"rnp-syn\"\n{COMMON}[controller]\nkind = \"channel-router\"\nhidden = 8\n[rl]\nepochs = 1\nworkers = 1\n"
        ),
    );
    let stat = write(
        dir,
        "static.toml",
        &format!(
            "name = \"static-syn\"\n{COMMON}[controller]\nkind = \"static-l1\"\ntarget_flops = 0.5\nfine_tune_epochs = 1\n"
        ),
    );
    (rnp, stat)
}

#[test]
fn tiny_sweep_writes_csv_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let (rnp, stat) = experiments(dir.path());
    let opts = SweepOptions {
        experiment: rnp,
        sets: vec!["rl.compute_penalty=0.05,0.5".into()],
        static_experiment: Some(stat),
        static_sets: vec!["controller.target_flops=0.45".into()],
        seeds: vec![],
        out: Some(PathBuf::from("sweep")),
        base_dir: dir.path().into(),
    };
    let out = run_sweep(&opts).unwrap();
    assert_eq!(out, dir.path().join("sweep"));
    // The backbone was trained once, by the first value's run; the others reused its weights.
    let first = out.join("rl.compute_penalty=0.05");
    assert!(first.join("backbone/checkpoints/last.safetensors").is_file());
    assert!(!out.join("rl.compute_penalty=0.5/backbone").exists());
    assert!(!out.join("static/backbone").exists());
    let cfg = std::fs::read_to_string(out.join("static/config.toml")).unwrap();
    assert!(cfg.contains("rl.compute_penalty=0.05/backbone/checkpoints/last.safetensors"), "{cfg}");

    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "method,rl.compute_penalty,top1,flops_ratio,latency_b1_ms,latency_b64_ms,throughput_b64,seed");
    assert_eq!(lines.len(), 5, "{csv}");
    let methods: Vec<(&str, &str)> = lines[1..]
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0], f[1])
        })
        .collect();
    assert_eq!(methods, vec![("unpruned", ""), ("rnp", "0.05"), ("rnp", "0.5"), ("static", "")]);
    for l in &lines[1..] {
        let nums: Vec<f64> = l.split(',').skip(2).take(5).map(|x| x.parse().unwrap()).collect();
        assert!(l.ends_with(','), "no seed column value without --seeds: {l}");
        assert!((0.0..=1.0).contains(&nums[0]), "top1 in {l}");
        assert!(nums[1] > 0.0 && nums[1] <= 1.0 + 1e-9, "flops ratio in {l}");
        assert!(nums[2..].iter().all(|v| v.is_finite() && *v > 0.0), "timings in {l}");
    }
    assert!(lines[1].split(',').nth(3) == Some("1.000000"));
    let static_flops: f64 = lines[4].split(',').nth(3).unwrap().parse().unwrap();
    assert!(static_flops <= 0.45, "{csv}");

    let png = image::open(out.join("sweep.png")).unwrap();
    assert_eq!((png.width(), png.height()), PLOT_SIZE);
    // Something was drawn: not a blank canvas.
    let rgb = png.to_rgb8();
    assert!(rgb.pixels().filter(|p| p.0 != [255, 255, 255]).count() > 1000);
}

/// `--seeds 0,1`: every point is trained once per seed (`<point>/seed=S`), the static baseline
/// sweeps its own listed key, and `sweep_summary.csv` holds each point's mean over its seeds
/// with their sample standard deviation, which the plot draws as error bars.
#[test]
fn sweep_over_seeds_gives_means_and_spreads() {
    let dir = tempfile::tempdir().unwrap();
    let (rnp, stat) = experiments(dir.path());
    let opts = SweepOptions {
        experiment: rnp,
        sets: vec!["rl.compute_penalty=0.05,0.5".into()],
        static_experiment: Some(stat),
        static_sets: vec!["controller.target_flops=0.3,0.6".into()],
        seeds: vec![0, 1],
        out: Some(PathBuf::from("sweep")),
        base_dir: dir.path().into(),
    };
    let out = run_sweep(&opts).unwrap();
    for run in ["rl.compute_penalty=0.05/seed=0", "rl.compute_penalty=0.5/seed=1", "static/controller.target_flops=0.3/seed=1"] {
        assert!(out.join(run).join("config.toml").is_file(), "{run}");
    }
    let cfg = std::fs::read_to_string(out.join("rl.compute_penalty=0.5/seed=1/config.toml")).unwrap();
    assert!(cfg.contains("seed = 1"), "{cfg}");
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let rows: Vec<Vec<String>> = csv.lines().skip(1).map(|l| l.split(',').map(String::from).collect()).collect();
    assert_eq!(rows.len(), 1 + 4 + 4, "{csv}");
    let summary = std::fs::read_to_string(out.join("sweep_summary.csv")).unwrap();
    let lines: Vec<&str> = summary.lines().collect();
    assert_eq!(
        lines[0],
        "method,rl.compute_penalty,runs,top1,top1_std,flops_ratio,flops_ratio_std,latency_b1_ms,latency_b64_ms,latency_b64_ms_std"
    );
    let points: Vec<Vec<&str>> = lines[1..].iter().map(|l| l.split(',').collect()).collect();
    let keys: Vec<(&str, &str, &str)> = points.iter().map(|p| (p[0], p[1], p[2])).collect();
    assert_eq!(
        keys,
        vec![("unpruned", "", "1"), ("rnp", "0.05", "2"), ("rnp", "0.5", "2"), ("static", "0.3", "2"), ("static", "0.6", "2")]
    );
    for p in &points[1..] {
        let top1: Vec<f64> = rows.iter().filter(|r| r[0] == p[0] && r[1] == p[1]).map(|r| r[2].parse().unwrap()).collect();
        let mean = (top1[0] + top1[1]) / 2.0;
        let std = (top1[0] - top1[1]).abs() / 2f64.sqrt();
        assert!((p[3].parse::<f64>().unwrap() - mean).abs() < 1e-6, "{p:?} against {top1:?}");
        assert!((p[4].parse::<f64>().unwrap() - std).abs() < 1e-6, "{p:?} against {top1:?}");
    }
    let static_flops = |v: &str| points.iter().find(|p| p[0] == "static" && p[1] == v).unwrap()[5].parse::<f64>().unwrap();
    assert!(static_flops("0.3") <= 0.3 + 1e-9 && static_flops("0.3") < static_flops("0.6"), "{summary}");
    assert_eq!(image::open(out.join("sweep.png")).unwrap().width(), PLOT_SIZE.0);
}
