//! `[controller]` / `[rl]` configuration errors name the file, line and key.

use std::path::PathBuf;

use rlprune::experiment::Experiment;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const BASE: &str = "name = \"t\"\n[data]\ndataset = \"synthetic\"\n[backbone]\narch = \"small-cnn\"\n";

fn err(extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "e.toml", &format!("{BASE}{extra}"));
    format!("{:#}", Experiment::load(&p, &[]).unwrap_err())
}

#[test]
fn bad_rl_and_controller_keys_are_named() {
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nalgorithm = \"ppo\"\n");
    assert!(e.contains("e.toml:9: rl.algorithm") && e.contains("available: reinforce"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\ngroups = 0\n");
    assert!(e.contains("e.toml:8: controller.groups must be in 1..=64"), "{e}");
    let e = err("[controller]\nkind = \"gumbel\"\n");
    assert!(e.contains("controller.kind") && e.contains("channel-router"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\nrnn = \"lstm\"\n");
    assert!(e.contains("controller.rnn"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nbaseline = \"mean\"\n");
    assert!(e.contains("e.toml:9: rl.baseline"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\naccuracy_reward = \"acc\"\n");
    assert!(e.contains("rl.accuracy_reward"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nworkers = 0\n");
    assert!(e.contains("rl.workers must be in 1..=64"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\ncompute_penalty = -1.0\n");
    assert!(e.contains("rl.compute_penalty must be >= 0"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nlearning_rate = 0.1\n");
    assert!(e.contains("unknown key 'rl.learning_rate'"), "{e}");
    let e = err("[rl]\nlr = 0.1\n");
    assert!(e.contains("rl needs a [controller] section"), "{e}");
}

#[test]
fn the_shipped_rnp_experiments_load() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for f in ["experiments/quickstart.toml", "experiments/rnp_fashion_mnist.toml"] {
        let (exp, _) = Experiment::load(&root.join(f), &[]).unwrap();
        let ctl = exp.controller.expect("controller from the agents preset");
        assert_eq!(ctl.kind, "channel-router");
        assert_eq!(exp.rl.expect("rl").algorithm, "reinforce");
    }
    // Presets can be overridden from the command line.
    let (exp, _) = Experiment::load(&root.join("experiments/quickstart.toml"), &["rl.workers=1".into()]).unwrap();
    assert_eq!(exp.rl.unwrap().workers, 1);
}
