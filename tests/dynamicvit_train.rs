//! `rlprune train` for DynamicViT (`[controller] kind = "token-predictor"`): both training
//! modes end to end through the binary on a tiny synthetic config (one step per phase), the
//! checkpoints they write loaded by `rlprune eval` and `rlprune infer`, and config errors that
//! name their key.

use std::path::Path;

use rlprune::import::{read_safetensors, write_safetensors};
use rlprune::nn::params::HostTensor;

mod common;
use common::{rlprune, ok, failed, write};

/// 16×16 synthetic images, 4×4 patches (16 patch tokens), one full batch per split: one
/// optimizer step for the teacher and one for the student.
const TINY: &str = r#"name = "dvit-tiny"
seed = 3

[data]
dataset = "synthetic"
classes = 4
size = 16
train_size = 16
test_size = 16
batch_size = 16

[backbone]
arch = "dynamicvit-deit-s-0.7"
patch_size = 4
embed_dim = 16
depth = 3
num_heads = 2
mlp_ratio = 2.0
pruning_loc = [1, 2]
token_ratio = [0.7, 0.49]

[train]
epochs = 1
optimizer = { kind = "adamw", lr = 1e-3 }

[controller]
kind = "token-predictor"
epochs = 1
lr = 1e-3

[rl]
baseline = "self-critical"

[log]
every_steps = 1
histograms = false
"#;

#[test]
fn both_training_modes_train_and_their_checkpoints_load_in_eval_and_infer() {
    let dir = tempfile::tempdir().unwrap();
    let exp = write(dir.path(), "d.toml", TINY);
    let exp_s = exp.to_str().unwrap();
    let gumbel = dir.path().join("gumbel");
    ok(&rlprune(&["train", exp_s, "--out", gumbel.to_str().unwrap()], dir.path()));
    let ck = gumbel.join("checkpoints");
    for f in ["last.safetensors", "best.safetensors", "teacher.safetensors"] {
        assert!(ck.join(f).is_file(), "{f} missing");
    }
    assert!(gumbel.join("teacher/checkpoints/last.safetensors").is_file(), "phase 1 ran the supervised trainer");
    let student = read_safetensors(&ck.join("last.safetensors")).unwrap();
    assert!(student.contains_key("score_predictor.1.out_conv.4.weight") && student.contains_key("blocks.2.mlp.fc2.bias"));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gumbel.join("dynamicvit.json")).unwrap()).unwrap();
    assert_eq!(summary["training"], "gumbel");
    // int(16 · 0.7) = 11 and int(16 · 0.49) = 7 patches survive the two stages.
    assert_eq!(summary["kept_tokens"], serde_json::json!([11, 7]));
    let fr = summary["flops_ratio"].as_f64().unwrap();
    assert!(fr > 0.3 && fr < 1.0, "flops ratio {fr}");
    assert!(gumbel.join("events.out.tfevents").exists() || std::fs::read_dir(&gumbel).unwrap().any(|e| {
        e.unwrap().file_name().to_string_lossy().starts_with("events.out.tfevents")
    }));

    // Resuming the finished run has nothing left to do and leaves the student as it was.
    let student_before = std::fs::read(ck.join("last.safetensors")).unwrap();
    let out = rlprune(&["train", exp_s, "--resume", gumbel.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already complete"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(ck.join("last.safetensors")).unwrap(), student_before);

    // The policy-gradient student from the first run's teacher (no phase 1).
    let pg = dir.path().join("pg");
    let teacher = format!("backbone.weights={}", ck.join("teacher.safetensors").display());
    ok(&rlprune(
        &["train", exp_s, "--set", "controller.training=policy-gradient", "--set", &teacher, "--out", pg.to_str().unwrap()],
        dir.path(),
    ));
    assert!(!pg.join("teacher").exists(), "the referenced teacher is reused, not retrained");
    let pg_summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pg.join("dynamicvit.json")).unwrap()).unwrap();
    assert_eq!(pg_summary["training"], "policy-gradient");
    assert_eq!(pg_summary["teacher_top1"], summary["teacher_top1"], "same teacher, same test split");
    let metrics = std::fs::read_to_string(pg.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"student_epoch\":1"), "{metrics}");
    // The policy-gradient student minimises a surrogate, and its log says so.
    let log = |run: &Path| std::fs::read_to_string(run.join("log.txt")).unwrap();
    assert!(log(&pg).contains("student 1/1: train surrogate"), "{}", log(&pg));
    assert!(log(&gumbel).contains("student 1/1: train loss"), "{}", log(&gumbel));
    // The teacher is DeiT-S's recipe shrunk by the experiment's keys, and its log says so.
    let teacher_log = std::fs::read_to_string(gumbel.join("teacher/log.txt")).unwrap();
    let line = teacher_log.lines().find(|l| l.contains(" params), ")).unwrap();
    assert!(line.contains(": deit-s with ") && line.contains("embed_dim = 16") && line.contains("depth = 3"), "{line}");
    // eval's table gives the kept tokens per stage, and no empty per-layer table.
    let table = ok(&rlprune(&["eval", gumbel.to_str().unwrap()], dir.path()));
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert!(table.contains("kept tokens"), "{table}");
    assert!(rows.iter().any(|r| r[..] == ["1", "11", "0.688"][..]), "{table}");
    assert!(rows.iter().any(|r| r[..] == ["2", "7", "0.438"][..]), "{table}");
    assert!(!table.contains("channels"), "{table}");

    // Gumbel training for 8 student epochs (the backbone at the predictors' rate) from the same
    // teacher and the same predictor initialisation: the student's loss (cross-entropy,
    // distillation, keep ratio) falls, and the predictors end elsewhere than after one epoch
    // (were they never updated, both runs would hold their initial weights).
    let long = dir.path().join("gumbel8");
    ok(&rlprune(
        &[
            "train", exp_s, "--set", "controller.epochs=8", "--set", "controller.lr=3e-3", "--set", "controller.lr_scale=1",
            "--set", &teacher, "--out", long.to_str().unwrap(),
        ],
        dir.path(),
    ));
    let losses: Vec<f64> = std::fs::read_to_string(long.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|l| l.get("student_epoch").map(|_| l["train_loss"].as_f64().unwrap()))
        .collect();
    println!("gumbel student losses: {losses:?}");
    assert_eq!(losses.len(), 8);
    let late = losses[5..].iter().sum::<f64>() / 3.0;
    assert!(late < 0.93 * losses[0], "the student's loss did not fall: {losses:?}");
    let one = read_safetensors(&ck.join("last.safetensors")).unwrap();
    let eight = read_safetensors(&long.join("checkpoints/last.safetensors")).unwrap();
    let predictors: Vec<&String> = one.keys().filter(|k| k.starts_with("score_predictor.")).collect();
    assert!(!predictors.is_empty());
    for k in predictors {
        let moved = one[k].data.iter().zip(&eight[k].data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-6, "{k}: the predictors did not move (max change {moved:.2e})");
    }

    // PPO on two rollout workers: the same seed and worker count give the same student.
    let ppo: Vec<_> = ["ppo_a", "ppo_b"]
        .iter()
        .map(|name| {
            let run = dir.path().join(name);
            ok(&rlprune(
                &[
                    "train", exp_s, "--set", "controller.training=policy-gradient", "--set", "rl.algorithm=ppo",
                    "--set", "rl.baseline=value", "--set", "rl.workers=2", "--set", "rl.minibatch=8", "--set", &teacher,
                    "--out", run.to_str().unwrap(),
                ],
                dir.path(),
            ));
            read_safetensors(&run.join("checkpoints/last.safetensors")).unwrap()
        })
        .collect();
    let key = "score_predictor.0.out_conv.4.weight";
    assert_eq!(ppo[0][key].data, ppo[1][key].data, "PPO runs with the same seed differ");
    let reinforce = read_safetensors(&pg.join("checkpoints/last.safetensors")).unwrap();
    assert_ne!(ppo[0][key].data, reinforce[key].data, "PPO made the same update as REINFORCE");

    // `rlprune eval RUN_DIR` loads the student and the teacher.
    for run in [&gumbel, &pg] {
        let text = ok(&rlprune(&["eval", run.to_str().unwrap(), "--json"], dir.path()));
        let report: serde_json::Value = serde_json::from_str(text.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
        assert_eq!(report["controller"], "token-predictor");
        assert_eq!(report["kept_tokens"], serde_json::json!([11, 7]));
        assert!((report["flops_ratio"].as_f64().unwrap() - fr).abs() < 1e-12);
        assert!(report["latency"]["batch1"]["speedup"].as_f64().is_some());
    }

    // `rlprune infer` with the run's model.toml and student checkpoint.
    let input = dir.path().join("x.safetensors");
    let data: Vec<f32> = (0..2 * 16 * 16).map(|i| ((i * 37) % 101) as f32 / 101.0).collect();
    let dict = [("input".to_string(), HostTensor::new(vec![2, 1, 16, 16], data))].into_iter().collect();
    write_safetensors(&input, &dict, &Default::default()).unwrap();
    let out = dir.path().join("y.safetensors");
    ok(&rlprune(
        &[
            "infer",
            "--model",
            pg.join("model.toml").to_str().unwrap(),
            "--weights",
            pg.join("checkpoints/last.safetensors").to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        dir.path(),
    ));
    let y = read_safetensors(&out).unwrap();
    assert_eq!(y["output"].shape, vec![2, 4]);
    assert_eq!(y["keep_abs_s0"].shape, vec![2, 11]);
    assert_eq!(y["keep_abs_s1"].shape, vec![2, 7]);
}

fn load_err(dir: &Path, text: &str) -> String {
    let p = write(dir, "e.toml", text);
    format!("{:#}", rlprune::methods::load(&p, &[]).unwrap_err())
}

#[test]
fn bad_token_predictor_options_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let with = |extra: &str| TINY.replace("lr = 1e-3\n\n[rl]", &format!("lr = 1e-3\n{extra}\n\n[rl]"));
    let e = load_err(dir.path(), &with("training = \"ppo\""));
    assert!(e.contains("controller.training must be \"gumbel\" or \"policy-gradient\""), "{e}");
    let e = load_err(dir.path(), &with("lr_scal = 0.1"));
    assert!(e.contains("controller.lr_scal") && e.contains("unknown key"), "{e}");
    let e = load_err(dir.path(), &with("lr_scale = 2.0"));
    assert!(e.contains("controller.lr_scale must be in [0, 1]"), "{e}");
    let e = load_err(dir.path(), &with("keep_penalty = -1"));
    assert!(e.contains("controller.keep_penalty must be >= 0"), "{e}");
    let e = load_err(dir.path(), &TINY.replace("epochs = 1\nlr = 1e-3", "epochs = 0\nlr = 1e-3"));
    assert!(e.contains("controller.epochs must be > 0"), "{e}");
    let e = load_err(dir.path(), &with("training = 3"));
    assert!(e.contains("controller.training") || e.contains("training"), "{e}");

    // Errors only the trainer can see: a backbone without predictors, an RL algorithm other
    // than REINFORCE or PPO for the policy-gradient variant.
    let exp = write(
        dir.path(),
        "deit.toml",
        &TINY.replace("arch = \"dynamicvit-deit-s-0.7\"", "arch = \"deit-s\"").replace(
            "pruning_loc = [1, 2]\ntoken_ratio = [0.7, 0.49]\n",
            "",
        ),
    );
    let e = failed(&rlprune(&["train", exp.to_str().unwrap(), "--out", "r"], dir.path()));
    assert!(e.contains("backbone.arch") && e.contains("dynamicvit-deit-s-0.7"), "{e}");
    let exp = write(dir.path(), "dqn.toml", &TINY.replace("baseline = \"self-critical\"", "algorithm = \"dqn\""));
    let e = failed(&rlprune(
        &["train", exp.to_str().unwrap(), "--set", "controller.training=policy-gradient", "--out", "r2"],
        dir.path(),
    ));
    assert!(e.contains("rl.algorithm must be \"reinforce\" or \"ppo\""), "{e}");
}

#[test]
fn the_shipped_dynamicvit_experiments_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The paper's lr_scale for 30 epochs from a converged DeiT; 0.1 for the small 5-epoch teacher.
    for (f, training, lr_scale) in [
        ("experiments/dynamicvit_fashion_mnist.toml", "gumbel", 0.1),
        ("experiments/dynamicvit_deit_s_imagenet.toml", "gumbel", 0.01),
    ] {
        let (e, _) = rlprune::methods::load(&root.join(f), &[]).unwrap_or_else(|e| panic!("{f}: {e:#}"));
        let ctl = e.controller.unwrap();
        assert_eq!(ctl.kind, "token-predictor", "{f}");
        let o = rlprune::methods::token_predictor::TokenPredictorOptions::from_config(&ctl).unwrap();
        assert_eq!(o.training, training);
        assert_eq!(o.lr_scale, lr_scale, "{f}");
    }
    let (e, _) =
        rlprune::methods::load(&root.join("experiments/dynamicvit_deit_s_imagenet.toml"), &[]).unwrap();
    let o = rlprune::methods::token_predictor::TokenPredictorOptions::from_config(&e.controller.unwrap()).unwrap();
    assert_eq!(o.epochs, 30);
    assert_eq!(e.backbone.arch, "dynamicvit-deit-s-0.7");
}

/// A token-predictor run stopped after any student epoch, or between the teacher and the
/// student, and resumed, ends bit for bit where the uninterrupted run does, for the Gumbel
/// recipe and for policy gradient with PPO (optimizer moments, step count, data order, Gumbel
/// noise and rollout seeds all continue); the teacher is trained once.
#[test]
fn interrupted_token_predictor_runs_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let text = TINY.replace("train_size = 16", "train_size = 32").replace("epochs = 1\nlr = 1e-3", "epochs = 3\nlr = 1e-3");
    let exp = write(dir.path(), "d.toml", &text);
    let exp_s = exp.to_str().unwrap();
    for (mode, sets) in [("gumbel", vec![]), ("ppo", vec!["--set", "controller.training=policy-gradient", "--set", "rl.algorithm=ppo", "--set", "rl.baseline=value"])] {
        let train = |args: &[&str]| {
            let mut a = vec!["train", exp_s];
            a.extend_from_slice(&sets);
            a.extend_from_slice(args);
            rlprune(&a, dir.path())
        };
        let run = |name: &str| dir.path().join(format!("{mode}-{name}"));
        let arg = |name: &str| run(name).to_str().unwrap().to_string();
        ok(&train(&["--out", &arg("full")]));
        let o = train(&["--out", &arg("cut"), "--stop-after-epoch", "1"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && err.contains("as asked"), "{mode}: {err}");
        let o = train(&["--resume", &arg("cut"), "--stop-after-epoch", "2"]);
        assert!(o.status.success(), "{mode}: {}", String::from_utf8_lossy(&o.stderr));
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run("cut").join("checkpoints/token_predictor_state.json")).unwrap()).unwrap();
        assert_eq!(state["student_epochs"], 2, "{mode}");
        ok(&train(&["--resume", &arg("cut")]));
        // Stopped between the teacher and the student.
        ok(&train(&["--out", &arg("boundary"), "--stop-after-epoch", "0"]));
        assert!(!run("boundary").join("checkpoints/best.safetensors").exists(), "{mode}: no student epoch ran");
        ok(&train(&["--resume", &arg("boundary")]));
        for name in ["cut", "boundary"] {
            let files = ["last.safetensors", "best.safetensors", "teacher.safetensors"];
            common::assert_same_tensors(&run("full").join("checkpoints"), &run(name).join("checkpoints"), &files);
            let epochs = |run: &Path| -> Vec<(f64, f64, f64)> {
                std::fs::read_to_string(run.join("metrics.jsonl"))
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                    .filter(|l| l.get("student_epoch").is_some())
                    .map(|l| (l["train_loss"].as_f64().unwrap(), l["test_top1"].as_f64().unwrap(), l["test_loss"].as_f64().unwrap()))
                    .collect()
            };
            assert_eq!(epochs(&run("full")).len(), 3);
            assert_eq!(epochs(&run("full")), epochs(&run(name)), "{mode} {name}");
            let teacher_epochs = |r: &Path| std::fs::read_to_string(r.join("teacher/metrics.jsonl")).unwrap().lines().count();
            assert_eq!(teacher_epochs(&run(name)), teacher_epochs(&run("full")), "{mode} {name}: the teacher trained once");
        }
    }
}
