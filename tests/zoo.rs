//! The model zoo against the official parameter counts and GMACs
//! (`../shared/reference/official_models.json`), and the analytic counts against built models.

use std::path::Path;

use burn::module::Module;
use rlprune::backbones::zoo::{official_name, zoo, ZooSpec};
use rlprune::backbones::{AnyBackbone, ModelSpec};
use rlprune::Cpu;

mod common;

fn official() -> Option<Vec<(String, u64, f64)>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = [root.join("../shared/reference"), root.join("../../shared/reference")]
        .into_iter()
        .find(|p| p.exists())?
        .join("official_models.json");
    let text = std::fs::read_to_string(&p).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    Some(
        v["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (m["name"].as_str().unwrap().to_string(), m["params"].as_u64().unwrap(), m["gflops"].as_f64().unwrap())
            })
            .collect(),
    )
}

#[test]
fn zoo_matches_official_numbers() {
    let official = official().expect("../shared/reference/official_models.json not found");
    let mut matched = 0;
    println!("{:<16} {:>12} {:>12} {:>9} {:>9} {:>7}", "name", "params", "official", "GMACs", "official", "diff");
    for e in zoo() {
        let Some(off) = official_name(e.name) else {
            println!("{:<16} {:>12} {:>12} {:>9.3} {:>9} {:>7}", e.name, e.params, "-", e.gmacs, "-", "-");
            continue;
        };
        let (_, params, gflops) = official.iter().find(|(n, ..)| n == off).unwrap_or_else(|| panic!("{off} not in json"));
        let rel = (e.gmacs - gflops).abs() / gflops;
        println!("{:<16} {:>12} {:>12} {:>9.3} {:>9.3} {:>6.3}%", e.name, e.params, params, e.gmacs, gflops, 100.0 * rel);
        assert_eq!(e.params, *params, "{}: parameter count", e.name);
        assert!(rel <= 0.02, "{}: {:.3} GMACs vs official {gflops}", e.name, e.gmacs);
        matched += 1;
    }
    assert!(matched >= 18, "only {matched} zoo entries were compared");
}

/// Small models of every reference family: the built model's parameter count equals the
/// analytic one (the same code that counts the full-size zoo).
#[test]
fn analytic_counts_match_built_models() {
    let specs = [
        r#"[model]
family = "gfnet"
img_size = 32
patch_size = 4
embed_dim = 24
depth = 2
num_classes = 7"#,
        r#"[model]
family = "gfnet-pyramid"
img_size = 64
embed_dim = [8, 16, 24, 32]
depth = [1, 1, 2, 1]
num_classes = 5
no_layerscale = true"#,
        r#"[model]
family = "gfnet-pyramid"
img_size = 32
in_chans = 1
embed_dim = [8, 16, 24, 32]
depth = [1, 2, 1, 1]"#,
        r#"[model]
family = "hornet"
base_dim = 8
depths = [1, 1, 2, 1]
num_classes = 3
gnconv = [{ order = 2, s = 0.5 }, { order = 3 }, { order = 4, gflayer = "GlobalLocalFilter", h = 6, w = 4 }, { order = 1, gflayer = "GlobalLocalFilter" }]"#,
        r#"[model]
family = "hornet"
base_dim = 16
depths = [1, 1, 1, 1]
layer_scale_init_value = 0.0
in_chans = 1"#,
        r#"[model]
family = "deit"
img_size = 32
patch_size = 8
embed_dim = 24
depth = 2
num_heads = 3
num_classes = 10
representation_size = 12"#,
    ];
    for text in specs {
        let spec = ModelSpec::from_toml_str(text).unwrap_or_else(|e| panic!("{text}: {e:#}"));
        let model: AnyBackbone<Cpu> = spec.build(&Default::default()).unwrap();
        assert_eq!(spec.cost_native().params(), model.num_params() as u64, "{text}");
    }
}

/// Full-size models that are cheap to build: built count = analytic count = official count.
#[test]
fn full_size_built_models_match() {
    for name in ["gfnet-ti", "gfnet-h-ti", "deit-256"] {
        let spec = ModelSpec::named(name).unwrap();
        let model: AnyBackbone<Cpu> = spec.build(&Default::default()).unwrap();
        assert_eq!(spec.cost_native().params(), model.num_params() as u64, "{name}");
    }
}

#[test]
fn cnn_entries_are_built_models() {
    for e in zoo() {
        if let ZooSpec::Cnn { ctx, .. } = e.spec {
            assert!(e.params > 0 && e.gmacs > 0.0, "{}", e.name);
            assert_eq!(e.img_size, ctx.img_size[0]);
        }
    }
    let by = |n: &str| zoo().into_iter().find(|e| e.name == n).unwrap();
    // torchvision's ResNet-18: 11,689,512 parameters, 1.81 GMACs (convs + fc).
    assert_eq!(by("resnet18").params, 11_689_512);
    assert!((by("resnet18").gmacs - 1.814).abs() < 0.01, "{}", by("resnet18").gmacs);
}

#[test]
fn model_toml_errors_name_the_key() {
    let err = ModelSpec::from_toml_str("[model]\nfamily = \"gfnet\"\nembed_dims = 3\n").unwrap_err();
    assert!(format!("{err:#}").contains("embed_dims"), "{err:#}");
    let err = ModelSpec::from_toml_str("[model]\nfamily = \"hornet\"\ngnconv = [{order = 2, kernel = 7}]\n").unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("gnconv") , "{msg}");
    let err = ModelSpec::from_toml_str("[model]\nfamily = \"gfnet-pyramid\"\nimg_size = 28\n").unwrap_err();
    assert!(format!("{err:#}").contains("img_size"), "{err:#}");
    // gnConv's default order 5 needs stage widths of at least 16.
    let err = ModelSpec::from_toml_str("[model]\nfamily = \"hornet\"\nbase_dim = 8\n").unwrap_err();
    assert!(format!("{err:#}").contains("order 5"), "{err:#}");
    let err = ModelSpec::from_toml_str("[model]\nfamily = \"resnet\"\n").unwrap_err();
    assert!(format!("{err:#}").contains("unknown model family"), "{err:#}");
    let err = ModelSpec::from_toml_str("[model]\nfamily = \"deit\"\n[other]\n").unwrap_err();
    assert!(format!("{err:#}").contains("other"), "{err:#}");
}

/// `backbones::cost` (what memory checks read before building) counts exactly the trainable
/// parameters of the model `backbones::build` makes, for the families without reference
/// arguments and two with them, at CIFAR and ImageNet sizes, with width options.
#[test]
fn registry_cost_counts_the_built_parameters() {
    use rlprune::backbones::{BuildContext, build, cost};
    let device = Default::default();
    let cases: &[(&str, &str, usize, usize)] = &[
        ("small-cnn", "", 1, 28),
        ("small-cnn", "channels = [8, 12, 16, 24]", 3, 32),
        ("vgg16-cifar", "width = 0.25", 3, 32),
        ("resnet20-cifar", "", 3, 32),
        ("resnet56-cifar", "width = 0.5", 3, 32),
        ("resnet18", "width = 0.25", 3, 32),
        ("resnet18", "width = 0.25", 3, 96),
        ("gfnet-ti", "", 3, 32),
        ("deit-ti", "", 3, 32),
    ];
    for &(arch, options, in_channels, size) in cases {
        let options: toml::Table = toml::from_str(options).unwrap();
        let ctx = BuildContext { num_classes: 10, in_channels, img_size: [size, size] };
        let analytic = cost(arch, &options, &ctx).unwrap();
        let model: AnyBackbone<Cpu> = build(arch, &options, &ctx, &device).unwrap();
        let built = rlprune::nn::params::trainable_param_count(&model) as u64;
        assert_eq!(analytic.params(), built, "{arch} {options:?} at {size}");
        assert!(analytic.activations >= analytic.largest_activation && analytic.largest_activation > 0, "{arch}");
    }
}

/// A zoo name works where a model TOML is taken: `infer --model deit-ti --set ...` gives what
/// the equivalent model TOML gives, and bad names or keys get one clear error. `zoo` prints
/// aligned columns; `flops` ends its output with a newline.
#[test]
fn zoo_names_work_where_a_model_is_expected() {
    use rlprune::backbones::spec::resolve_model;
    let dir = tempfile::tempdir().unwrap();
    let sets = ["num_classes=10".to_string(), "img_size=32".to_string()];
    let spec = resolve_model("deit-ti", &sets).unwrap();
    assert_eq!((spec.num_classes(), spec.img_size()), (10, Some(32)));
    let model: AnyBackbone<Cpu> = spec.build(&Default::default()).unwrap();
    let weights = dir.path().join("w.safetensors");
    rlprune::import::write_safetensors(&weights, &rlprune::nn::params::state_dict(&model), &Default::default()).unwrap();
    std::fs::write(dir.path().join("m.toml"), spec.to_toml_string()).unwrap();
    let x = rlprune::nn::params::HostTensor::new(vec![2, 3, 32, 32], (0..2 * 3 * 32 * 32).map(|i| ((i % 97) as f32) / 97.0).collect());
    let input = dir.path().join("x.safetensors");
    rlprune::import::write_safetensors(&input, &[("input".to_string(), x)].into_iter().collect(), &Default::default()).unwrap();
    let run = |model: &str, extra: &[&str], out: &str| {
        let mut args = vec!["infer", "--model", model, "--weights", "w.safetensors", "--input", "x.safetensors", "--output", out];
        args.extend_from_slice(extra);
        common::rlprune(&args, dir.path())
    };
    common::ok(&run("deit-ti", &["--set", "num_classes=10", "--set", "img_size=32"], "by_name.safetensors"));
    common::ok(&run("m.toml", &[], "by_file.safetensors"));
    let a = rlprune::import::read_tensor(&dir.path().join("by_name.safetensors"), "output").unwrap();
    let b = rlprune::import::read_tensor(&dir.path().join("by_file.safetensors"), "output").unwrap();
    assert_eq!(a.shape, vec![2, 10]);
    assert_eq!(a.data, b.data);

    let err = common::failed(&run("deit-tiny", &[], "o.safetensors"));
    assert!(err.contains("'deit-tiny'") && err.contains("rlprune zoo"), "{err}");
    let err = common::failed(&run("deit-ti", &["--set", "num_clases=10"], "o.safetensors"));
    assert!(err.contains("num_clases"), "{err}");
    let err = common::failed(&run("missing.toml", &[], "o.safetensors"));
    assert!(err.contains("missing.toml: no such model file"), "{err}");
    assert!(!dir.path().join("o.safetensors").exists());

    let zoo = common::ok(&common::rlprune(&["zoo"], dir.path()));
    let widths: std::collections::BTreeSet<usize> = zoo.lines().map(|l| l.trim_end().len()).collect();
    assert_eq!(widths.len(), 1, "zoo rows of different widths:\n{zoo}");
    for name in ["small-cnn", "resnet20-cifar", "dynamicvit-deit-256-0.7"] {
        assert!(zoo.lines().any(|l| l.starts_with(name)), "{name} missing:\n{zoo}");
    }
    let flops = common::ok(&common::rlprune(&["flops", "gfnet-ti"], dir.path()));
    assert!(flops.ends_with(")\n"), "{flops:?}");
}

/// `infer` takes inputs of another size than the model TOML's where the model allows it: a DeiT
/// built for 32×32 runs 48×48 images (its weights resampled as for fine-tuning) and gives what
/// the model built for 48 with the resampled weights gives; a non-square input is refused.
#[test]
fn infer_runs_other_input_sizes_where_the_model_allows_it() {
    use rlprune::backbones::spec::resolve_model;
    use rlprune::nn::params::{state_dict, HostTensor};
    let dir = tempfile::tempdir().unwrap();
    let sets: Vec<String> = ["num_classes=10", "img_size=32", "patch_size=8", "depth=2", "embed_dim=48", "num_heads=3"].map(String::from).to_vec();
    let spec = resolve_model("deit-ti", &sets).unwrap();
    let model: AnyBackbone<Cpu> = spec.build(&Default::default()).unwrap();
    let saved = state_dict(&model);
    rlprune::import::write_safetensors(&dir.path().join("w.safetensors"), &saved, &Default::default()).unwrap();
    std::fs::write(dir.path().join("m.toml"), spec.to_toml_string()).unwrap();
    let write_input = |name: &str, h: usize, w: usize| {
        let x = HostTensor::new(vec![2, 3, h, w], (0..2 * 3 * h * w).map(|i| ((i % 89) as f32) / 89.0 - 0.5).collect());
        rlprune::import::write_safetensors(&dir.path().join(name), &[("input".to_string(), x)].into_iter().collect(), &Default::default()).unwrap();
    };
    write_input("x48.safetensors", 48, 48);
    write_input("x48x32.safetensors", 48, 32);
    let run = |input: &str, out: &str| {
        common::rlprune(&["infer", "--model", "m.toml", "--weights", "w.safetensors", "--input", input, "--output", out], dir.path())
    };
    common::ok(&run("x48.safetensors", "y48.safetensors"));
    let got = rlprune::import::read_tensor(&dir.path().join("y48.safetensors"), "output").unwrap();
    assert_eq!(got.shape, vec![2, 10]);

    let at48 = spec.at_input_size([48, 48]).unwrap();
    assert_eq!(at48.img_size(), Some(48));
    let mut dict = saved.clone();
    let big: AnyBackbone<Cpu> = at48.build(&Default::default()).unwrap();
    let notes = rlprune::backbones::adapt_pretrained(&big, &mut dict).unwrap();
    assert_eq!(notes, vec!["pos_embed: [1, 17, 48] → [1, 37, 48]".to_string()]);
    let big = rlprune::nn::params::load_strict(big, &dict, "w").unwrap();
    let x = rlprune::import::read_tensor(&dir.path().join("x48.safetensors"), "input").unwrap().to_tensor::<Cpu, 4>(&Default::default());
    let want: Vec<f32> = rlprune::backbones::Backbone::forward(&big, x).into_data().to_vec().unwrap();
    assert_eq!(got.data, want);

    let err = common::failed(&run("x48x32.safetensors", "bad.safetensors"));
    assert!(err.contains("square images") && err.contains("48×32"), "{err}");
    assert!(!dir.path().join("bad.safetensors").exists());
}
