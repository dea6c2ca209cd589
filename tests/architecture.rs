//! The layers of `src/` (docs/architecture.md): every top-level module may name only the modules
//! of lower layers, so the modules form no cycle. Read from every `crate::` path in the source,
//! doc links and comments included (a doc link is a dependency for rustdoc and for readers);
//! only a file's closing `#[cfg(test)] mod tests` is left out (a unit test may drive its module
//! through the CLI above it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Lowest first; modules on one line are one layer and may not use each other.
const LAYERS: &[&[&str]] = &[
    &["fsutil", "device"],
    &["logging"],
    &["data"],
    &["nn"],
    &["import"],
    &["metrics"],
    &["backbones"],
    &["controllers"],
    &["train"],
    &["rl"],
    &["bench"],
    &["experiment"],
    &["session"],
    &["methods"],
    &["sweep"],
    &["visualize"],
    &["cli"],
];

type Uses = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn library_part(src: &str) -> &str {
    src.split("#[cfg(test)]\nmod tests").next().unwrap_or(src)
}

/// Top-level modules named right after `crate::`, including inside `crate::{a, b::c}`.
fn crate_uses(src: &str) -> BTreeSet<String> {
    let src = library_part(src);
    let mut out = BTreeSet::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    for (i, _) in src.match_indices("crate::") {
        let rest = &src[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(inner[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
            out.insert(ident(inner[start..].trim()));
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

fn collect(dir: &Path, src_root: &Path, uses: &mut Uses) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, src_root, uses);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(src_root).unwrap();
            let top = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for used in crate_uses(&text) {
                if used != top {
                    uses.entry(top.clone()).or_default().entry(used).or_default().insert(rel.display().to_string());
                }
            }
        }
    }
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Uses of a module in the same or a higher layer, as "a -> b (files)".
fn violations(uses: &Uses, modules: &BTreeSet<String>) -> Vec<String> {
    let mut v = Vec::new();
    for (from, targets) in uses {
        for (to, files) in targets {
            if !modules.contains(to) {
                continue; // a crate-root item (`crate::Cpu`, `crate::ModelBackend`)
            }
            match (layer_of(from), layer_of(to)) {
                (Some(a), Some(b)) if b < a => {}
                (Some(_), Some(_)) => v.push(format!("{from} -> {to} ({})", files.iter().cloned().collect::<Vec<_>>().join(", "))),
                _ => v.push(format!("{from} -> {to}: a module missing from LAYERS")),
            }
        }
    }
    v
}

#[test]
fn every_module_uses_only_lower_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules: BTreeSet<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() || p.extension().is_some_and(|e| e == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().to_string())
        .filter(|m| m != "lib" && m != "main")
        .collect();
    for m in &modules {
        assert!(layer_of(m).is_some(), "src/{m} is in no layer of tests/architecture.rs (and docs/architecture.md)");
    }
    let mut uses = Uses::new();
    collect(&root, &root, &mut uses);
    assert!(uses.len() > 10, "the scan found too few modules: {uses:?}");
    let v = violations(&uses, &modules);
    assert!(v.is_empty(), "paths that point to the same or a higher layer:\n{}", v.join("\n"));
}

#[test]
fn the_check_sees_upward_and_grouped_uses() {
    let src = "use crate::{nn::Linear, methods::{rnp, eval}};\n/// see [`crate::bench`]\nlet x = crate::session::run::newest_run;\n#[cfg(test)]\nmod tests {\n    use crate::cli::run;\n}";
    assert_eq!(crate_uses(src), ["bench", "methods", "nn", "session"].into_iter().map(String::from).collect());
    let modules: BTreeSet<String> = ["nn", "backbones", "methods"].into_iter().map(String::from).collect();
    let mut uses = Uses::new();
    uses.entry("backbones".into()).or_default().entry("nn".into()).or_default().insert("backbones/mod.rs".into());
    assert!(violations(&uses, &modules).is_empty());
    uses.entry("backbones".into()).or_default().entry("methods".into()).or_default().insert("backbones/vit.rs".into());
    assert_eq!(violations(&uses, &modules), vec!["backbones -> methods (backbones/vit.rs)".to_string()]);
}
