//! The quickstart as a new user runs it, shortened: `train` ends with the backbone's and the
//! pruned network's top-1, the FLOPs ratio and the `rlprune eval` command to run next, and that
//! command, run as printed, reports the same numbers with measured latencies.

mod common;
use common::{repo_root, rlprune};

/// The number after `key` in `line`, up to the next space, `%` or `,`.
fn number_after(line: &str, key: &str) -> f64 {
    let rest = line.split_once(key).unwrap_or_else(|| panic!("no '{key}' in: {line}")).1;
    let end = rest.find([' ', '%', ',']).unwrap_or(rest.len());
    rest[..end].parse().unwrap_or_else(|e| panic!("'{}' after '{key}' is not a number ({e}): {line}", &rest[..end]))
}

#[test]
fn shortened_quickstart_ends_with_its_outcome_and_the_eval_command() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = rlprune(
        &[
            "train",
            "experiments/quickstart.toml",
            "--out",
            run.to_str().unwrap(),
            "--set",
            "data.train_limit=1024",
            "--set",
            "data.test_limit=256",
            "--set",
            "train.epochs=2",
            "--set",
            "rl.epochs=2",
            "--set",
            "rl.finetune_epochs=1",
        ],
        repo_root(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    let [.., outcome, next] = lines.as_slice() else { panic!("too few lines:\n{stdout}") };
    let (backbone, pruned, flops) =
        (number_after(outcome, "backbone top-1 "), number_after(outcome, "pruned top-1 "), number_after(outcome, "FLOPs ratio "));
    assert!((0.0..=100.0).contains(&backbone) && (0.0..=100.0).contains(&pruned) && flops > 0.0 && flops <= 1.0, "{outcome}");

    let command = next.rsplit_once(": ").unwrap_or_else(|| panic!("no command in: {next}")).1;
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(&words[..2], ["rlprune", "eval"], "{next}");
    let mut args = words[1..].to_vec();
    args.push("--json");
    let out = rlprune(&args, repo_root());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("not a number in {report}"));
    // The printed figures are the best checkpoint's, which eval reads.
    assert!((100.0 * f(&report["top1"]) - pruned).abs() < 0.006, "{outcome} vs {report}");
    assert!((100.0 * f(&report["backbone_top1"]) - backbone).abs() < 0.006, "{outcome} vs {report}");
    assert!((f(&report["flops_ratio"]) - flops).abs() < 0.0006, "{outcome} vs {report}");
    for batch in ["batch1", "batch64"] {
        let l = &report["latency"][batch];
        assert!(f(&l["unpruned_ms"]) > 0.0 && f(&l["pruned_ms"]) > 0.0 && f(&l["speedup"]) > 0.0, "{report}");
    }
}
