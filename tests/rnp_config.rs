//! `[controller]` / `[rl]` configuration errors name the file, line and key.

use std::path::PathBuf;


fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const BASE: &str = "name = \"t\"\n[data]\ndataset = \"synthetic\"\n[backbone]\narch = \"small-cnn\"\n";

fn err(extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "e.toml", &format!("{BASE}{extra}"));
    format!("{:#}", rlprune::methods::load(&p, &[]).unwrap_err())
}

#[test]
fn bad_rl_and_controller_keys_are_named() {
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nalgorithm = \"a2c\"\n");
    assert!(e.contains("e.toml:9: rl.algorithm") && e.contains("available: reinforce, ppo, dqn"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\ngroups = 0\n");
    assert!(e.contains("e.toml:8: controller.groups must be in 1..=64"), "{e}");
    let e = err("[controller]\nkind = \"gumbel\"\n");
    assert!(e.contains("controller.kind") && e.contains("channel-router"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\nrnn = \"foo\"\n");
    assert!(e.contains("e.toml:8: controller.rnn") && e.contains("available: gru, lstm"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nbaseline = \"mean\"\n");
    assert!(e.contains("e.toml:9: rl.baseline"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\naccuracy_reward = \"acc\"\n");
    assert!(e.contains("rl.accuracy_reward"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nworkers = 0\n");
    assert!(e.contains("rl.workers must be in 1..=64"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\ncompute_penalty = -1.0\n");
    assert!(e.contains("rl.compute_penalty must be >= 0"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nflops_target = 1.5\n");
    assert!(e.contains("rl.flops_target must be in (0, 1]"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nbudget = \"total\"\n");
    assert!(e.contains("e.toml:9: rl.budget must be \"per-image\" or \"mean\""), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nbudget = \"mean\"\n");
    assert!(e.contains("e.toml:9: rl.budget") && e.contains("needs a flops_target"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nbudget = \"mean\"\nflops_target = 0.5\nprice_lr = -1\n");
    assert!(e.contains("e.toml:11: rl.price_lr must be >= 0"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nlearning_rate = 0.1\n");
    assert!(e.contains("unknown key 'rl.learning_rate'"), "{e}");
    let e = err("[rl]\nlr = 0.1\n");
    assert!(e.contains("rl needs a [controller] section"), "{e}");
}

#[test]
fn bad_ppo_and_dqn_keys_are_named() {
    let rl = |body: &str| err(&format!("[controller]\nkind = \"channel-router\"\n[rl]\nalgorithm = \"ppo\"\n{body}"));
    let e = rl("[rl.ppo]\nclip = 0.0\n");
    assert!(e.contains("e.toml:11: rl.ppo.clip must be in (0, 1), got 0"), "{e}");
    let e = rl("[rl.ppo]\nclip = -0.2\n");
    assert!(e.contains("e.toml:11: rl.ppo.clip must be in (0, 1)"), "{e}");
    let e = rl("[rl.ppo]\ngae_lambda = 1.5\n");
    assert!(e.contains("e.toml:11: rl.ppo.gae_lambda must be in [0, 1], got 1.5"), "{e}");
    let e = rl("[rl.ppo]\nepochs = 0\n");
    assert!(e.contains("e.toml:11: rl.ppo.epochs must be > 0"), "{e}");
    let e = rl("[rl.ppo]\nepsilon_end = 0.1\n");
    assert!(e.contains("e.toml:11: unknown key 'rl.ppo.epsilon_end'"), "{e}");
    let e = rl("baseline = \"self-critical\"\n");
    assert!(e.contains("e.toml:10: rl.baseline") && e.contains("reinforce"), "{e}");
    let dqn = |body: &str| err(&format!("[controller]\nkind = \"channel-router\"\n[rl]\nalgorithm = \"dqn\"\n{body}"));
    let e = dqn("[rl.dqn]\nepsilon_start = 1.2\n");
    assert!(e.contains("e.toml:11: rl.dqn.epsilon_start must be in [0, 1], got 1.2"), "{e}");
    let e = dqn("[rl.dqn]\nepsilon_end = -0.1\n");
    assert!(e.contains("e.toml:11: rl.dqn.epsilon_end must be in [0, 1]"), "{e}");
    let e = dqn("[rl.dqn]\ntarget_sync_every = 0\n");
    assert!(e.contains("e.toml:11: rl.dqn.target_sync_every must be > 0"), "{e}");
    let e = dqn("[rl.dqn]\nreplay_capacity = 0\n");
    assert!(e.contains("e.toml:11: rl.dqn.replay_capacity must be > 0"), "{e}");
    let e = dqn("epsilon = 0.1\n");
    assert!(e.contains("unknown key 'rl.epsilon'"), "{e}");
    // Good PPO / DQN / LSTM settings load.
    let dir = tempfile::tempdir().unwrap();
    for extra in [
        "[controller]\nkind = \"channel-router\"\nrnn = \"lstm\"\n[rl]\nalgorithm = \"ppo\"\n[rl.ppo]\nclip = 0.1\n",
        "[controller]\nkind = \"channel-router\"\n[rl]\nalgorithm = \"dqn\"\n[rl.dqn]\nepsilon_end = 0.0\n",
    ] {
        let p = write(&dir, "ok.toml", &format!("{BASE}{extra}"));
        rlprune::methods::load(&p, &[]).unwrap();
    }
}

/// PPO's and DQN's keys moved from `[rl]` into `[rl.ppo]` / `[rl.dqn]`: configurations with
/// the old flat spelling (earlier experiments, the `config.toml` of earlier runs) still load,
/// with the values at their new place, errors at the old line under the new name, and a key
/// given in both spellings refused.
#[test]
fn flat_ppo_and_dqn_keys_of_earlier_configs_are_read_at_their_new_place() {
    let dir = tempfile::tempdir().unwrap();
    let flat = "[controller]\nkind = \"channel-router\"\n[rl]\nalgorithm = \"ppo\"\nclip = 0.1\nppo_epochs = 3\nreplay_capacity = 77\nepsilon_end = 0.0\n";
    let p = write(&dir, "old.toml", &format!("{BASE}{flat}"));
    let (exp, _) = rlprune::methods::load(&p, &[]).unwrap();
    let rl = exp.rl.clone().unwrap();
    assert_eq!((rl.ppo.clip, rl.ppo.epochs, rl.dqn.replay_capacity, rl.dqn.epsilon_end), (0.1, 3, 77, 0.0));
    // Written back in the new spelling only.
    let text = exp.to_toml().unwrap();
    assert!(text.contains("[rl.ppo]") && !text.contains("ppo_epochs"), "{text}");
    // The old spelling from the command line as well.
    let (exp, _) = rlprune::methods::load(&p, &["rl.gae_lambda=0.5".into()]).unwrap();
    assert_eq!(exp.rl.unwrap().ppo.gae_lambda, 0.5);
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nalgorithm = \"ppo\"\nclip = 2.0\n");
    assert!(e.contains("e.toml:10: rl.ppo.clip must be in (0, 1), got 2"), "{e}");
    let e = err("[controller]\nkind = \"channel-router\"\n[rl]\nclip = 0.1\n[rl.ppo]\nclip = 0.3\n");
    assert!(e.contains("rl.clip and rl.ppo.clip are the same setting"), "{e}");
}

#[test]
fn the_shipped_rnp_experiments_load() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for f in ["experiments/quickstart.toml", "experiments/rnp_fashion_mnist.toml"] {
        let (exp, _) = rlprune::methods::load(&root.join(f), &[]).unwrap();
        let ctl = exp.controller.expect("controller from the agents preset");
        assert_eq!(ctl.kind, "channel-router");
        assert_eq!(exp.rl.expect("rl").algorithm, "reinforce");
    }
    // Presets can be overridden from the command line.
    let (exp, _) = rlprune::methods::load(&root.join("experiments/quickstart.toml"), &["rl.workers=1".into()]).unwrap();
    assert_eq!(exp.rl.unwrap().workers, 1);
}
