//! The documentation cannot go stale silently: every relative link in the README and `docs/`
//! resolves (file and heading), and the experiment TOML reference (`docs/reference.md`) names
//! every key the configuration structs accept, read from the loader's own "expected one of"
//! lists, so a new key without a line in the reference fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

mod common;

fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "md") {
                out.push(p);
            }
        }
    }
    let root = common::repo_root();
    let mut files = vec![root.join("README.md")];
    walk(&root.join("docs"), &mut files);
    files.sort();
    files
}

/// Targets of inline links `[text](target)` outside code blocks and code spans.
fn link_targets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop code spans, whose brackets are not links.
        let plain: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = plain.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].trim().to_string());
            rest = &after[end..];
        }
    }
    out
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn every_relative_link_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() { file.clone() } else { file.parent().unwrap().join(path) };
            if !resolved.exists() {
                broken.push(format!("{}: {target} (no such file)", file.display()));
                continue;
            }
            if let Some(a) = anchor
                && resolved.extension().is_some_and(|x| x == "md")
                && !anchors(&std::fs::read_to_string(&resolved).unwrap()).contains(a)
            {
                broken.push(format!("{}: {target} (no heading #{a} in {})", file.display(), resolved.display()));
            }
        }
    }
    assert!(checked > 20, "only {checked} links found: the scan is broken");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_check_sees_what_it_must() {
    let text = "see [a](docs/x.md#part-two) and `[not](a link)`\n```\n[nor](this)\n```\n[b](#top)";
    assert_eq!(link_targets(text), vec!["docs/x.md#part-two".to_string(), "#top".to_string()]);
    assert_eq!(slug(" `[controller]` and RNP's keys (v2)"), "controller-and-rnps-keys-v2");
}

const BASE: &str = "name = \"keys\"\n[data]\ndataset = \"synthetic\"\n[backbone]\narch = \"small-cnn\"\n";

/// The keys the loader accepts where `--set <table>.<probe>=1` is refused, from its
/// "expected one of `a`, `b`, ..." (or "expected `a`").
fn accepted_keys(dir: &Path, base: &str, sets: &[&str], table: &str) -> Vec<String> {
    let exp = common::write(dir, "keys.toml", base);
    let mut all: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let probe = if table.is_empty() { "not_a_key".to_string() } else { format!("{table}.not_a_key") };
    all.push(format!("{probe}=1"));
    let err = match rlprune::methods::load(&exp, &all) {
        Ok(_) => panic!("--set {probe}=1 was accepted"),
        Err(e) => format!("{e:#}"),
    };
    let list = err.split("expected ").nth(1).unwrap_or_else(|| panic!("no key list in: {err}"));
    let list = list.strip_prefix("one of ").unwrap_or(list);
    let keys: Vec<String> = list.split(',').filter_map(|k| k.trim().split('`').nth(1)).map(str::to_string).collect();
    assert!(!keys.is_empty(), "no keys in: {err}");
    keys
}

/// The options a CNN baseline's family accepts in `[backbone]` (checked when the model is
/// built, not when the file loads).
fn family_keys(arch: &str) -> Vec<String> {
    let options: toml::Table = toml::from_str("not_a_key = 1").unwrap();
    let err = format!("{:#}", rlprune::backbones::cost(arch, &options, &rlprune::backbones::CIFAR10).unwrap_err());
    let list = err.split("expected ").nth(1).unwrap_or_else(|| panic!("no key list in: {err}"));
    let list = list.strip_prefix("one of ").unwrap_or(list);
    list.split(',').filter_map(|k| k.trim().split('`').nth(1)).map(str::to_string).collect()
}

/// The text of `docs/reference.md` from `heading` to the next heading of the same or a higher level.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc.find(&format!("\n{heading}\n")).unwrap_or_else(|| panic!("docs/reference.md has no heading {heading}"));
    let level = heading.chars().take_while(|&c| c == '#').count();
    let body = &doc[start + heading.len() + 2..];
    let end = body
        .match_indices("\n#")
        .find(|(i, _)| body[i + 1..].chars().take_while(|&c| c == '#').count() <= level)
        .map(|(i, _)| i)
        .unwrap_or(body.len());
    &body[..end]
}

#[test]
fn the_reference_names_every_experiment_key() {
    let dir = tempfile::tempdir().unwrap();
    let doc = std::fs::read_to_string(common::repo_root().join("docs/reference.md")).unwrap();
    let with_controller = |kind: &str| format!("{BASE}[controller]\nkind = \"{kind}\"\n[rl]\n");
    let rnp = with_controller("channel-router");
    // Keys of [controller] the kind does not own (kind, groups, hidden, rnn) come from the
    // struct's serialised form.
    let (exp, _) = rlprune::methods::load(&common::write(dir.path(), "rnp.toml", &rnp), &[]).unwrap();
    let serialised = toml::Table::try_from(&exp).unwrap();
    let own: Vec<String> = serialised["controller"].as_table().unwrap().keys().cloned().collect();
    assert!(own.contains(&"groups".to_string()), "{own:?}");
    let backbone_own: Vec<String> =
        toml::Table::try_from(&rlprune::methods::load(&common::write(dir.path(), "w.toml", &format!("{BASE}weights = \"w\"\nreset_head = true\n")), &[]).unwrap().0)
            .unwrap()["backbone"]
            .as_table()
            .unwrap()
            .keys()
            .cloned()
            .collect();
    assert!(backbone_own.contains(&"reset_head".to_string()), "{backbone_own:?}");
    let sections: Vec<(&str, Vec<String>)> = vec![
        ("### Top level", accepted_keys(dir.path(), BASE, &[], "")),
        ("### `[data]`", accepted_keys(dir.path(), BASE, &[], "data")),
        (
            "### `[backbone]`",
            [
                backbone_own,
                family_keys("small-cnn"),
                family_keys("resnet20-cifar"),
                family_keys("vgg16-cifar"),
            ]
            .concat(),
        ),
        (
            "### `[train]`",
            [
                accepted_keys(dir.path(), BASE, &[], "train"),
                accepted_keys(dir.path(), BASE, &["train.optimizer={ kind = \"sgd\", lr = 0.1 }"], "train.optimizer"),
                accepted_keys(dir.path(), BASE, &["train.optimizer={ kind = \"adamw\", lr = 0.1 }"], "train.optimizer"),
                accepted_keys(dir.path(), BASE, &["train.schedule={ kind = \"cosine\" }"], "train.schedule"),
            ]
            .concat(),
        ),
        ("### `[log]`", accepted_keys(dir.path(), BASE, &[], "log")),
        (
            "### `[controller]`",
            [
                own,
                accepted_keys(dir.path(), &with_controller("static-l1"), &[], "controller"),
                accepted_keys(dir.path(), &with_controller("token-predictor"), &[], "controller"),
            ]
            .concat(),
        ),
        ("### `[rl]`", accepted_keys(dir.path(), &rnp, &[], "rl")),
        ("#### `[rl.ppo]`", accepted_keys(dir.path(), &rnp, &[], "rl.ppo")),
        ("#### `[rl.dqn]`", accepted_keys(dir.path(), &rnp, &[], "rl.dqn")),
    ];
    let mut missing = Vec::new();
    for (heading, keys) in &sections {
        let text = section(&doc, heading);
        for k in keys {
            let is_table = ["data", "backbone", "train", "log", "controller", "rl"].contains(&k.as_str()) && *heading == "### Top level";
            if is_table {
                assert!(doc.contains(&format!("### `[{k}]`")), "no section for [{k}]");
            } else if !text.contains(&format!("`{k}`")) {
                missing.push(format!("{heading}: `{k}`"));
            }
        }
    }
    assert!(missing.is_empty(), "docs/reference.md does not name these keys:\n{}", missing.join("\n"));
}
