//! End-to-end `rlprune train`/`eval` through the binary: run-directory layout, exact resume,
//! CIFAR-format training, and clear errors (never a panic) for bad checkpoints.

use std::path::{Path, PathBuf};

mod common;
use common::{rlprune, ok, failed};

const SYNTH: &str = r#"name = "synth"
seed = 7

[data]
dataset = "synthetic"
batch_size = 32
classes = 4
size = 12
train_size = 256
test_size = 64

[backbone]
arch = "small-cnn"
channels = [8, 8, 16, 16]

[train]
epochs = 3
optimizer = { kind = "sgd", lr = 0.05, momentum = 0.9, weight_decay = 5e-4 }
schedule = { kind = "cosine", warmup_epochs = 0.5 }

[log]
every_steps = 2
"#;

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn setup(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("exp.toml");
    std::fs::write(&exp, text).unwrap();
    (dir, exp)
}

#[test]
fn train_writes_the_run_directory_and_learns() {
    let (dir, exp) = setup(SYNTH);
    let out = rlprune(&["train", exp.to_str().unwrap()], dir.path());
    let text = ok(&out);
    let runs: Vec<PathBuf> = std::fs::read_dir(dir.path().join("runs/synth")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(runs.len(), 1, "{text}");
    let run = &runs[0];
    for f in ["config.toml", "metrics.jsonl", "log.txt", "checkpoints/last.safetensors", "checkpoints/best.safetensors", "checkpoints/last.optim.safetensors", "checkpoints/state.json"] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    assert!(std::fs::read_dir(run).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("events.out.tfevents.")));
    // The resolved config is a loadable experiment.
    rlprune::methods::load(&run.join("config.toml"), &[]).unwrap();
    let m = metrics(run);
    assert_eq!(m.len(), 3);
    let top1 = m[2]["test_top1"].as_f64().unwrap();
    assert!(top1 > 0.6, "synthetic data should be learnable, got {top1}");
    // No temp files left behind.
    for e in std::fs::read_dir(run.join("checkpoints")).unwrap() {
        assert!(!e.unwrap().file_name().to_string_lossy().contains(".tmp"));
    }

    // eval on the run directory reproduces the best epoch's accuracy.
    let out = rlprune(&["eval", run.to_str().unwrap(), "--json"], dir.path());
    let report: serde_json::Value = serde_json::from_str(ok(&out).lines().last().unwrap()).unwrap();
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("checkpoints/state.json")).unwrap()).unwrap();
    assert!((report["top1"].as_f64().unwrap() - state["best_metric"].as_f64().unwrap()).abs() < 1e-9, "{report}");
}

/// Stopped after epoch 1 of 3 while the learning rate is still warming up (1.5 epochs), the
/// resumed run ends bit for bit where the uninterrupted one does: metrics, weights, optimizer.
#[test]
fn resumed_run_matches_uninterrupted_run() {
    let warm = SYNTH.replace("warmup_epochs = 0.5", "warmup_epochs = 1.5");
    assert_ne!(warm, SYNTH);
    let (dir, exp) = setup(&warm);
    let e = exp.to_str().unwrap();
    ok(&rlprune(&["train", e, "--out", "full"], dir.path()));
    ok(&rlprune(&["train", e, "--out", "part", "--stop-after-epoch", "1"], dir.path()));
    let part = metrics(&dir.path().join("part"));
    assert_eq!(part.len(), 1);
    // Inside the warm-up: the rate at the end of epoch 1 is below the peak.
    let lr1 = part[0]["lr"].as_f64().unwrap();
    assert!(lr1 < 0.05 * 0.9, "epoch 1 should end inside the warm-up, lr {lr1}");
    // Another seed would continue a different run: refused, the run left as it was.
    let before = common::snapshot(&dir.path().join("part"));
    let err = failed(&rlprune(&["train", e, "--resume", "part", "--set", "seed=8"], dir.path()));
    assert!(err.contains("started with seed 7") && err.contains("seed 8"), "{err}");
    assert_eq!(common::snapshot(&dir.path().join("part")), before);
    // What a process killed before its first TensorBoard flush leaves: an empty event file.
    let litter = dir.path().join("part/events.out.tfevents.1700000000.host.1.rlprune");
    std::fs::write(&litter, b"").unwrap();
    ok(&rlprune(&["train", e, "--resume", "part"], dir.path()));
    assert!(!litter.exists(), "the resumed run removes empty event files");
    let events: Vec<_> = std::fs::read_dir(dir.path().join("part"))
        .unwrap()
        .map(|f| f.unwrap())
        .filter(|f| f.file_name().to_string_lossy().starts_with("events.out.tfevents."))
        .map(|f| f.metadata().unwrap().len())
        .collect();
    assert_eq!(events.len(), 2, "both runs' event files are kept");
    assert!(events.iter().all(|&n| n > 0));
    let (a, b) = (metrics(&dir.path().join("full")), metrics(&dir.path().join("part")));
    assert_eq!(a.len(), 3);
    assert_eq!(b.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        for k in ["step", "train_loss", "train_top1", "test_loss", "test_top1", "lr"] {
            assert_eq!(x[k], y[k], "epoch {}: {k}", x["epoch"]);
        }
    }
    for file in ["last.safetensors", "last.optim.safetensors", "best.safetensors"] {
        let wa = rlprune::import::read_safetensors(&dir.path().join("full/checkpoints").join(file)).unwrap();
        let wb = rlprune::import::read_safetensors(&dir.path().join("part/checkpoints").join(file)).unwrap();
        assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>(), "{file}");
        for (k, ta) in &wa {
            let same = ta.data.iter().zip(&wb[k].data).all(|(u, v)| u.to_bits() == v.to_bits());
            assert!(same && ta.shape == wb[k].shape, "{file} {k}: not bit-identical");
        }
    }

    // --resume auto picks the newest run with a checkpoint of this name.
    let out = rlprune(&["train", e, "--resume", "auto"], dir.path());
    let err = failed(&out);
    assert!(err.contains("no runs of 'synth'") || err.contains("has a checkpoint"), "{err}");
}

#[test]
fn resume_auto_continues_the_newest_run() {
    let (dir, exp) = setup(SYNTH);
    let e = exp.to_str().unwrap();
    ok(&rlprune(&["train", e, "--stop-after-epoch", "2"], dir.path()));
    ok(&rlprune(&["train", e, "--resume", "auto"], dir.path()));
    let runs: Vec<PathBuf> = std::fs::read_dir(dir.path().join("runs/synth")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(runs.len(), 1);
    assert_eq!(metrics(&runs[0]).len(), 3);
}

/// Writes CIFAR-10 binary batches: records of 1 label byte + 3072 pixel bytes (CHW).
fn write_cifar10(dir: &Path, per_file: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut files: Vec<String> = (1..=5).map(|i| format!("data_batch_{i}.bin")).collect();
    files.push("test_batch.bin".into());
    for (f, name) in files.iter().enumerate() {
        let mut bytes = Vec::new();
        for r in 0..per_file {
            let label = ((r + f) % 10) as u8;
            bytes.push(label);
            for p in 0..3072usize {
                // A class-dependent pattern plus variation, so there is something to learn.
                bytes.push(((p * (label as usize + 1) + r * 7) % 256) as u8);
            }
        }
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn trains_one_epoch_on_cifar_format_files() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar10(&dir.path().join("data/cifar-10-batches-bin"), 20);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (exp, overrides) in [
        ("experiments/cifar10_resnet56.toml", vec!["--set", "backbone.arch=resnet20-cifar", "--set", "backbone.width=0.25"]),
        ("experiments/cifar10_vgg16.toml", vec!["--set", "backbone.width=0.125"]),
    ] {
        let exp = root.join(exp);
        let mut args = vec!["train", exp.to_str().unwrap(), "--set", "train.epochs=1", "--set", "data.batch_size=25", "--out", "run"];
        args.extend(overrides);
        let text = ok(&rlprune(&args, dir.path()));
        assert!(text.contains("test top-1"), "{text}");
        let m = metrics(&dir.path().join("run"));
        assert_eq!(m.len(), 1);
        assert!(m[0]["train_loss"].as_f64().unwrap().is_finite());
        std::fs::remove_dir_all(dir.path().join("run")).unwrap();
    }
}

#[test]
fn bad_checkpoints_give_clear_errors() {
    let (dir, exp) = setup(SYNTH);
    let e = exp.to_str().unwrap();
    ok(&rlprune(&["train", e, "--out", "run", "--set", "train.epochs=1"], dir.path()));

    // Garbage file.
    std::fs::write(dir.path().join("garbage.safetensors"), b"not a checkpoint at all").unwrap();
    let err = failed(&rlprune(&["eval", "run", "--checkpoint", "garbage.safetensors"], dir.path()));
    assert!(err.contains("garbage.safetensors"), "{err}");

    // Truncated checkpoint.
    let good = std::fs::read(dir.path().join("run/checkpoints/last.safetensors")).unwrap();
    std::fs::write(dir.path().join("trunc.safetensors"), &good[..good.len() / 2]).unwrap();
    let err = failed(&rlprune(&["eval", "run", "--checkpoint", "trunc.safetensors"], dir.path()));
    assert!(err.contains("trunc.safetensors"), "{err}");

    // Missing file.
    let err = failed(&rlprune(&["eval", "run", "--checkpoint", "nope.safetensors"], dir.path()));
    assert!(err.contains("nope.safetensors"), "{err}");

    // A checkpoint of another architecture.
    let other = SYNTH.replace("channels = [8, 8, 16, 16]", "channels = [4, 4, 8, 8]").replace("\"synth\"", "\"other\"");
    std::fs::write(dir.path().join("other.toml"), other).unwrap();
    let err = failed(&rlprune(&["eval", "other.toml", "--checkpoint", "run/checkpoints/last.safetensors"], dir.path()));
    assert!(err.contains("mis-shaped keys") && err.contains("features.0.conv.weight"), "{err}");
    let err = failed(&rlprune(&["eval", "run", "--set", "backbone.arch=vgg16-cifar", "--set", "backbone.channels=1"], dir.path()));
    assert!(err.contains("backbone") , "{err}");

    // Resume from a run whose state does not match its tensors (interrupted while checkpointing).
    let st_path = dir.path().join("run/checkpoints/state.json");
    let st = std::fs::read_to_string(&st_path).unwrap().replace("\"epoch\": 1", "\"epoch\": 0");
    std::fs::write(&st_path, st).unwrap();
    let err = failed(&rlprune(&["train", e, "--resume", "run"], dir.path()));
    assert!(err.contains("interrupted while checkpointing"), "{err}");
    std::fs::write(&st_path, "{ not json").unwrap();
    let err = failed(&rlprune(&["train", e, "--resume", "run"], dir.path()));
    assert!(err.contains("state.json"), "{err}");
}

#[test]
fn bad_inputs_exit_cleanly() {
    let (dir, exp) = setup(&SYNTH.replace("batch_size = 32", "batch_size = 0"));
    let err = failed(&rlprune(&["train", exp.to_str().unwrap()], dir.path()));
    assert!(err.contains("exp.toml:6: data.batch_size must be > 0, got 0"), "{err}");

    let (dir, exp) = setup(&SYNTH.replace("dataset = \"synthetic\"", "dataset = \"mnist\"\nroot = \"nowhere\""));
    let err = failed(&rlprune(&["train", exp.to_str().unwrap()], dir.path()));
    assert!(err.contains("nowhere"), "{err}");

    let (dir, exp) = setup(&SYNTH.replace("channels = [8, 8, 16, 16]", "channels = [8, 0, 16, 16]"));
    let err = failed(&rlprune(&["train", exp.to_str().unwrap()], dir.path()));
    assert!(err.contains("exp.toml:14:") && err.contains("backbone.channels"), "{err}");

    let (dir, exp) = setup(&SYNTH.replace("channels = [8, 8, 16, 16]", "channels = [8, 8, 16, 16]\nwidht = 2"));
    let err = failed(&rlprune(&["train", exp.to_str().unwrap()], dir.path()));
    assert!(err.contains("widht"), "{err}");

    // A corrupt IDX file.
    let (dir, exp) = setup(&SYNTH.replace("dataset = \"synthetic\"", "dataset = \"fashion-mnist\"\nroot = \"fm\""));
    std::fs::create_dir(dir.path().join("fm")).unwrap();
    for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
        std::fs::write(dir.path().join("fm").join(f), [0u8, 0, 8, 3, 0, 0]).unwrap();
    }
    let err = failed(&rlprune(&["train", exp.to_str().unwrap()], dir.path()));
    assert!(err.contains("idx"), "{err}");
}

#[test]
fn gfnet_and_hornet_experiments_train_a_step() {
    // The shipped Fashion-MNIST experiments with their own backbones, on a few synthetic
    // 1×28×28 images of 10 classes (HorNet's file resizes them to 32×32).
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in ["gfnet_fashion_mnist", "hornet_fashion_mnist"] {
        let exp = root.join(format!("experiments/{name}.toml"));
        let args = [
            "train", exp.to_str().unwrap(), "--out", name,
            "--set", "data.dataset=\"synthetic\"", "--set", "data.classes=10", "--set", "data.channels=1",
            "--set", "data.size=28", "--set", "data.train_size=32", "--set", "data.test_size=16",
            "--set", "data.batch_size=16", "--set", "train.epochs=1",
        ];
        let text = ok(&rlprune(&args, dir.path()));
        assert!(text.contains("test top-1"), "{name}: {text}");
        let m = metrics(&dir.path().join(name));
        assert_eq!(m.len(), 1, "{name}");
        assert_eq!(m[0]["step"].as_u64(), Some(2), "{name}");
        assert!(m[0]["train_loss"].as_f64().unwrap().is_finite(), "{name}");
    }
}

/// A diverging run stops with an error naming the step; nothing non-finite is saved and the last
/// finite epoch's checkpoint and metrics stay as they were; `eval` refuses non-finite weights.
#[test]
fn divergence_stops_the_run_and_keeps_the_last_finite_checkpoint() {
    let (dir, exp) = setup(SYNTH);
    let e = exp.to_str().unwrap();
    let run = |name: &str| dir.path().join(name);
    // From scratch at lr 1e6: SGD ends epoch 1 with infinite BatchNorm statistics, AdamW's loss
    // turns NaN within it. Neither leaves a checkpoint or a metrics line.
    for (out, optimizer, says) in [
        ("sgd", "train.optimizer={kind=\"sgd\",lr=1e6}", "weights became NaN or infinite"),
        ("adamw", "train.optimizer={kind=\"adamw\",lr=1e6}", "the loss became NaN"),
    ] {
        let err = failed(&rlprune(&["train", e, "--out", out, "--set", optimizer], dir.path()));
        assert!(err.contains(says) && err.contains("step "), "{err}");
        assert!(!run(out).join("checkpoints/last.safetensors").exists(), "{out}: a checkpoint was written");
        let lines = std::fs::read_to_string(run(out).join("metrics.jsonl")).unwrap_or_default();
        assert_eq!(lines.lines().count(), 0, "{out}: {lines}");
    }

    // One good epoch, then resumed at lr 1e6: epoch 2 diverges and epoch 1 stays.
    ok(&rlprune(&["train", e, "--out", "good", "--stop-after-epoch", "1"], dir.path()));
    let before = common::snapshot(&run("good").join("checkpoints"));
    let metrics_before = std::fs::read(run("good").join("metrics.jsonl")).unwrap();
    let err = failed(&rlprune(&["train", e, "--resume", "good", "--set", "train.optimizer={kind=\"sgd\",lr=1e6}"], dir.path()));
    assert!(err.contains("epoch 2, step") && err.contains("the checkpoint of epoch 1 is kept"), "{err}");
    assert_eq!(common::snapshot(&run("good").join("checkpoints")), before, "epoch 1's checkpoint changed");
    assert_eq!(std::fs::read(run("good").join("metrics.jsonl")).unwrap(), metrics_before);

    // `eval` of a checkpoint holding a NaN fails, naming the file.
    let last = run("good").join("checkpoints/last.safetensors");
    let mut weights = rlprune::import::read_safetensors(&last).unwrap();
    weights.values_mut().next().unwrap().data[0] = f32::NAN;
    let meta = rlprune::import::read_safetensors_metadata(&last).unwrap();
    let nan = dir.path().join("nan.safetensors");
    rlprune::import::write_safetensors(&nan, &weights, &meta).unwrap();
    let err = failed(&rlprune(&["eval", run("good").to_str().unwrap(), "--checkpoint", nan.to_str().unwrap()], dir.path()));
    assert!(err.contains("nan.safetensors") && err.contains("NaN or infinite"), "{err}");
}

/// A run directory belongs to one run: a second process is refused while the first holds it, a
/// `--out` that already holds a run is refused without `--resume`, and a run never writes
/// through a symbolic link planted in its directory.
#[test]
fn run_directories_are_owned() {
    let (dir, exp) = setup(SYNTH);
    let e = exp.to_str().unwrap();
    let run = dir.path().join("r");
    ok(&rlprune(&["train", e, "--out", "r", "--stop-after-epoch", "1"], dir.path()));
    let before = common::snapshot(&run);

    // Finished or not, rerunning into it without --resume would overwrite it.
    let err = failed(&rlprune(&["train", e, "--out", "r"], dir.path()));
    assert!(err.contains("not empty") && err.contains("--resume"), "{err}");
    assert_eq!(common::snapshot(&run), before);

    // While another process holds the run (here: this test holds its lock), a resume may not
    // enter.
    {
        let _held = rlprune::session::run::RunLock::acquire(&run).unwrap();
        let err = failed(&rlprune(&["train", e, "--resume", "r"], dir.path()));
        assert!(err.contains("another rlprune process is running in this run directory"), "{err}");
        assert_eq!(common::snapshot(&run), before);
    }

    // A symbolic link in place of metrics.jsonl is not followed.
    let elsewhere = dir.path().join("elsewhere.txt");
    std::fs::write(&elsewhere, b"untouched\n").unwrap();
    std::fs::remove_file(run.join("metrics.jsonl")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, run.join("metrics.jsonl")).unwrap();
    let err = failed(&rlprune(&["train", e, "--resume", "r"], dir.path()));
    assert!(err.contains("metrics.jsonl") && err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read(&elsewhere).unwrap(), b"untouched\n");

    // Once released, the run continues.
    std::fs::remove_file(run.join("metrics.jsonl")).unwrap();
    ok(&rlprune(&["train", e, "--resume", "r"], dir.path()));
}

/// Sizes that cannot fit are refused with one line before anything is allocated: a backbone
/// too large for the machine's memory, a training batch larger than the training split, and a
/// benchmark batch too large for memory. No run directory is left behind.
#[test]
fn sizes_that_cannot_fit_are_refused_before_allocating() {
    let (dir, exp) = setup(&SYNTH.replace("channels = [8, 8, 16, 16]", "channels = [100000, 100000, 100000, 100000]"));
    let err = failed(&rlprune(&["train", exp.to_str().unwrap()], dir.path()));
    assert!(err.contains("training small-cnn at batch 32 needs at least") && err.contains("memory available"), "{err}");
    assert!(err.contains("exp.toml"), "the error names the file: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let (dir, exp) = setup(&SYNTH.replace("batch_size = 32", "batch_size = 1000000000000"));
    let err = failed(&rlprune(&["train", exp.to_str().unwrap()], dir.path()));
    assert!(err.contains("data.batch_size = 1000000000000 is larger than the training split (256 images"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!dir.path().join("runs").exists(), "nothing was written");

    let err = failed(&rlprune(&["bench", "gfnet-ti", "--batch", "1000000000"], dir.path()));
    assert!(err.contains("inference of gfnet-ti at batch 1000000000 needs at least"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let err = failed(&rlprune(&["bench", "small-cnn", "--train", "--batch", "1000000000"], dir.path()));
    assert!(err.contains("training of small-cnn at batch 1000000000 needs at least"), "{err}");
}

/// A requested stop is a success with one line saying how to continue; resuming a finished run
/// says there is nothing left to do; Ctrl-C before the first checkpoint does not promise a
/// resume.
#[test]
fn requested_stops_succeed_and_interrupts_say_what_is_left() {
    let (dir, exp) = setup(SYNTH);
    let e = exp.to_str().unwrap();
    let out = rlprune(&["train", e, "--out", "r", "--stop-after-epoch", "1"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stopped after epoch 1 as asked") && err.contains("--resume"), "{err}");
    assert!(!err.contains("error"), "{err}");
    ok(&rlprune(&["train", e, "--resume", "r"], dir.path()));
    let out = rlprune(&["train", e, "--resume", "r"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success() && err.contains("already complete: nothing left to do"), "{err}");
    assert_eq!(metrics(&dir.path().join("r")).len(), 3);

    // Ctrl-C inside the first epoch (a long one), once the run directory exists.
    let (dir, exp) = setup(&SYNTH.replace("train_size = 256", "train_size = 400000"));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_rlprune"))
        .args(["train", exp.to_str().unwrap(), "--out", "c"])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !dir.path().join("c/config.toml").is_file() {
        assert!(t0.elapsed().as_secs() < 60, "the run never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = failed(&out);
    assert!(!dir.path().join("c/checkpoints/state.json").exists(), "the first epoch must not have ended: {err}");
    assert!(err.contains("before the first checkpoint") && err.contains("nothing to resume"), "{err}");
}

/// `--resume` continues the run as its own `config.toml` says, not as the experiment file and
/// the command line now say: a run started with `--set data.train_size=64` resumes on 64 images
/// without repeating the flag; a `--set` that would change another key is refused, the run left
/// as it was; more epochs are allowed and recorded in `config.toml`.
#[test]
fn resume_takes_the_runs_own_config() {
    let (dir, exp) = setup(SYNTH);
    let e = exp.to_str().unwrap();
    ok(&rlprune(&["train", e, "--out", "r", "--set", "data.train_size=64", "--stop-after-epoch", "1"], dir.path()));
    let run = dir.path().join("r");
    assert_eq!(metrics(&run)[0]["step"], 2, "64 images in batches of 32");

    let before = common::snapshot(&run);
    let err = failed(&rlprune(&["train", e, "--resume", "r", "--set", "data.batch_size=16"], dir.path()));
    assert!(err.contains("data.batch_size '32'") && err.contains("train.epochs"), "{err}");
    assert_eq!(common::snapshot(&run), before, "a refused resume must not touch the run");

    // Without the flag: the run's 64 images, not the file's 256.
    ok(&rlprune(&["train", e, "--resume", "r", "--stop-after-epoch", "2"], dir.path()));
    assert_eq!(metrics(&run)[1]["step"], 4, "{:?}", metrics(&run));
    // One more epoch than the run was started with.
    ok(&rlprune(&["train", e, "--resume", "r", "--set", "train.epochs=4"], dir.path()));
    let m = metrics(&run);
    assert_eq!(m.len(), 4, "{m:?}");
    assert_eq!(m[3]["step"], 8);
    let cfg: toml::Table = toml::from_str(&std::fs::read_to_string(run.join("config.toml")).unwrap()).unwrap();
    assert_eq!(cfg["train"]["epochs"].as_integer(), Some(4));
    assert_eq!(cfg["data"]["train_size"].as_integer(), Some(64));
}
