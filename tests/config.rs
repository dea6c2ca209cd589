//! Experiment files: includes, overrides, and errors that name the file, the line and the key.

use std::path::Path;


mod common;
use common::write;

const BASE: &str = r#"name = "t"
seed = 3

[data]
dataset = "synthetic"
batch_size = 16

[backbone]
arch = "small-cnn"

[train]
epochs = 2
optimizer = { kind = "sgd", lr = 0.1 }
"#;

fn err(text: &str, overrides: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "x.toml", text);
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let e = rlprune::methods::load(&p, &o).expect_err("should fail");
    format!("{e:#}").replace(&dir.path().display().to_string(), "DIR")
}

#[test]
fn valid_file_loads_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "x.toml", BASE);
    let (exp, _) = rlprune::methods::load(&p, &[]).unwrap();
    assert_eq!(exp.seed, 3);
    assert_eq!(exp.data.batch_size, 16);
    assert_eq!(exp.train.epochs, 2);
    assert_eq!(exp.device, "cpu");
    assert!(exp.log.tensorboard);
}

#[test]
fn out_of_range_value_names_file_line_and_key() {
    let text = BASE.replace("batch_size = 16", "batch_size = 0");
    let e = err(&text, &[]);
    assert_eq!(e, "DIR/x.toml:6: data.batch_size must be > 0, got 0", "{e}");
}

#[test]
fn unknown_key_is_refused_with_its_line() {
    let text = BASE.replace("batch_size = 16", "batch_size = 16\nbatchsize = 4");
    let e = err(&text, &[]);
    assert!(e.starts_with("DIR/x.toml:7: unknown key 'data.batchsize'"), "{e}");
}

#[test]
fn unknown_key_in_inline_table() {
    let text = BASE.replace("lr = 0.1 }", "lr = 0.1, momentun = 0.9 }");
    let e = err(&text, &[]);
    assert!(e.starts_with("DIR/x.toml:13:") && e.contains("momentun"), "{e}");
}

#[test]
fn wrong_type_names_key() {
    let text = BASE.replace("batch_size = 16", "batch_size = \"big\"");
    let e = err(&text, &[]);
    assert!(e.starts_with("DIR/x.toml:6: data.batch_size:") && e.contains("invalid type"), "{e}");
}

#[test]
fn malformed_toml_names_line() {
    let text = BASE.replace("epochs = 2", "epochs = = 2");
    let e = err(&text, &[]);
    assert!(e.starts_with("DIR/x.toml:12: invalid TOML"), "{e}");
}

#[test]
fn bad_value_in_nested_table() {
    let text = BASE.replace("lr = 0.1", "lr = -1.0");
    let e = err(&text, &[]);
    assert_eq!(e, "DIR/x.toml:13: train.optimizer.lr must be > 0, got -1", "{e}");
}

#[test]
fn unknown_arch_lists_known() {
    let text = BASE.replace("small-cnn", "resnet9000");
    let e = err(&text, &[]);
    assert!(e.starts_with("DIR/x.toml:9: backbone.arch 'resnet9000' is not a known backbone"), "{e}");
}

#[test]
fn overrides_are_typed_and_named_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "x.toml", BASE);
    let (exp, _) = rlprune::methods::load(
        &p,
        &["data.batch_size=32".into(), "train.optimizer.lr=0.5".into(), "name=renamed".into(), "log.tensorboard=false".into()],
    )
    .unwrap();
    assert_eq!(exp.data.batch_size, 32);
    assert_eq!(exp.train.optimizer.lr(), 0.5);
    assert_eq!(exp.name, "renamed");
    assert!(!exp.log.tensorboard);

    let e = err(BASE, &["data.batch_size=0"]);
    assert_eq!(e, "--set data.batch_size=0: data.batch_size must be > 0, got 0");
    let e = err(BASE, &["data.batch_size"]);
    assert!(e.contains("expected key=value"), "{e}");
    let e = err(BASE, &["train.epochs=many"]);
    assert!(e.starts_with("--set train.epochs=many: train.epochs: invalid type"), "{e}");
}

#[test]
fn include_merges_and_including_file_wins() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("presets")).unwrap();
    write(dir.path(), "presets/opt.toml", "epochs = 7\noptimizer = { kind = \"adamw\", lr = 0.001 }\nlabel_smoothing = 0.1\n");
    let text = BASE.replace("[train]\nepochs = 2", "[train]\ninclude = \"presets/opt.toml\"\nepochs = 2");
    let p = write(dir.path(), "x.toml", &text);
    let (exp, _) = rlprune::methods::load(&p, &[]).unwrap();
    assert_eq!(exp.train.epochs, 2, "the including file wins");
    assert_eq!(exp.train.label_smoothing, 0.1, "the preset fills in");

    // An error inside the preset points at the preset's line.
    write(dir.path(), "presets/opt.toml", "label_smoothing = 1.5\n");
    let e = format!("{:#}", rlprune::methods::load(&p, &[]).unwrap_err());
    assert!(e.ends_with("presets/opt.toml:1: train.label_smoothing must be in [0, 1), got 1.5"), "{e}");

    let text = BASE.replace("[train]\nepochs = 2", "[train]\ninclude = \"nope.toml\"\nepochs = 2");
    let e = err(&text, &[]);
    assert!(e.contains("x.toml:12: train.include: included file") && e.contains("does not exist"), "{e}");
}

#[test]
fn include_cycle_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "include = \"b.toml\"\n");
    let p = write(dir.path(), "b.toml", "include = \"a.toml\"\n");
    let e = format!("{:#}", rlprune::methods::load(&p, &[]).unwrap_err());
    assert!(e.contains("nested deeper"), "{e}");
}

/// (A build with the feature passes the request on to the driver probe: tests/device_cli.rs.)
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_on_cpu_build_is_refused() {
    let text = BASE.replace("seed = 3", "seed = 3\ndevice = \"cuda\"");
    let e = err(&text, &[]);
    assert!(e.starts_with("DIR/x.toml:3: device") && e.contains("--features cuda"), "{e}");
}

#[test]
fn missing_file_is_an_error() {
    let e = rlprune::methods::load(Path::new("/nonexistent/x.toml"), &[]).unwrap_err();
    assert!(format!("{e:#}").contains("/nonexistent/x.toml: cannot read"));
}

#[test]
fn shipped_experiments_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(root.join("experiments")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            rlprune::methods::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        }
    }
}

/// Every shipped experiment finds its data where it is usually installed (the shipped subset,
/// Debian's Fashion-MNIST) or fails with one line that names the dataset and how to get it.
#[test]
fn shipped_experiments_find_their_data_or_say_how_to_get_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(root.join("experiments")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let (exp, _) = rlprune::methods::load(&p, &[]).unwrap();
        match rlprune::data::open(&exp.data, root) {
            Ok(splits) => {
                let (train, test) = (splits.train.len(), splits.test.len());
                assert!(train > 0 && test > 0, "{}", p.display());
            }
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(!msg.contains('\n'), "{}: not one line: {msg}", p.display());
                let name = exp.data.dataset.name();
                assert!(msg.contains(name) || msg.contains("root"), "{}: does not name the dataset: {msg}", p.display());
                assert!(
                    msg.contains("rlprune data fetch") || msg.contains("root"),
                    "{}: does not say how to get the data: {msg}",
                    p.display()
                );
            }
        }
    }
}

/// A run whose data cannot be found stops before it creates its run directory, for every kind of
/// experiment (supervised, RNP, static L1, token predictor).
#[test]
fn missing_data_leaves_no_run_directory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    for exp in ["fashion_mnist_cnn", "rnp_fashion_mnist", "static_fashion_mnist", "dynamicvit_fashion_mnist"] {
        let runs = dir.path().join(exp);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlprune"))
            .arg("train")
            .arg(root.join("experiments").join(format!("{exp}.toml")))
            .args(["--set", &format!("log.dir=\"{}\"", runs.display())])
            .args(["--set", &format!("data.root=\"{}\"", dir.path().join("nowhere").display())])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{exp}: {err}");
        assert!(err.contains("fashion-mnist") && err.trim().lines().count() == 1, "{exp}: {err}");
        assert!(!runs.exists(), "{exp}: left {}", runs.display());
    }
    // A bad backbone key is refused before the run directory exists too, for every method.
    for exp in ["quickstart", "static_fashion_mnist", "deit_tome_evit_fashion_mnist"] {
        let runs = dir.path().join(format!("{exp}-bad-key"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlprune"))
            .arg("train")
            .arg(root.join("experiments").join(format!("{exp}.toml")))
            .args(["--set", &format!("log.dir=\"{}\"", runs.display()), "--set", "backbone.not_a_key=1"])
            .current_dir(root)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("not_a_key") && err.trim().lines().count() == 1, "{exp}: {err}");
        assert!(!runs.exists(), "{exp}: left {}", runs.display());
    }
}

/// A run records its data root and weights as absolute paths and only the `[data]` keys that
/// apply to its dataset, so `eval` of the run works from any directory.
#[test]
fn run_config_is_self_contained() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root.join("data"), dir.path().join("data")).unwrap();
    std::fs::write(
        dir.path().join("e.toml"),
        "name = \"e\"\n[data]\ndataset = \"fashion-mnist\"\nroot = \"data/fashion-mnist-subset\"\ntrain_limit = 256\n\
         test_limit = 64\nbatch_size = 64\n[backbone]\narch = \"small-cnn\"\nchannels = [4, 4, 8, 8]\n[train]\nepochs = 1\n\
         [log]\nhistograms = false\n",
    )
    .unwrap();
    let rlprune = |args: &[&str], cwd: &Path| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_rlprune")).args(args).current_dir(cwd).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    rlprune(&["train", "e.toml", "--out", "run"], dir.path());
    let cfg: toml::Table = toml::from_str(&std::fs::read_to_string(dir.path().join("run/config.toml")).unwrap()).unwrap();
    let data = cfg["data"].as_table().unwrap();
    assert_eq!(data["root"].as_str().unwrap(), dir.path().join("data/fashion-mnist-subset").to_str().unwrap());
    for key in ["classes", "channels", "size", "train_size", "test_size", "synthetic_seed", "train_dir", "test_dir"] {
        assert!(!data.contains_key(key), "data.{key} does not apply to fashion-mnist: {data:?}");
    }
    // From another directory, the run evaluates as it trained.
    let elsewhere = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let report: serde_json::Value =
        serde_json::from_str(&rlprune(&["eval", run.to_str().unwrap(), "--json"], elsewhere.path())).unwrap();
    assert_eq!(report["images"], 64);
    // A synthetic experiment keeps the keys that shape its data.
    let syn = dir.path().join("s.toml");
    std::fs::write(&syn, "name = \"s\"\n[data]\ndataset = \"synthetic\"\nclasses = 4\n[backbone]\narch = \"small-cnn\"\n").unwrap();
    let (exp, _) = rlprune::methods::load(&syn, &[]).unwrap();
    let text = exp.to_toml().unwrap();
    assert!(text.contains("classes = 4") && !text.contains("train_dir"), "{text}");
}

/// Weights trained on other classes: loading them is an error that names `reset_head`; with
/// `reset_head = true` every layer but the classifier is loaded and the classifier starts
/// fresh for this experiment's classes.
#[test]
fn reset_head_fine_tunes_weights_of_other_classes() {
    use rlprune::Cpu;
    use rlprune::backbones::{AnyBackbone, BuildContext, build};
    use rlprune::nn::params::state_dict;
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let opts: toml::Table = toml::from_str("channels = [8, 8, 16, 16]").unwrap();
    let ten = BuildContext { num_classes: 10, in_channels: 1, img_size: [16, 16] };
    let pretrained: AnyBackbone<Cpu> = build("small-cnn", &opts, &ten, &device).unwrap();
    let saved = state_dict(&pretrained);
    let weights = dir.path().join("ten.safetensors");
    rlprune::import::write_safetensors(&weights, &saved, &Default::default()).unwrap();
    let exp = write(
        dir.path(),
        "e.toml",
        &format!(
            "name = \"ft\"\n[data]\ndataset = \"synthetic\"\nclasses = 4\nchannels = 1\nsize = 16\nbatch_size = 16\n\
             [backbone]\narch = \"small-cnn\"\nchannels = [8, 8, 16, 16]\nweights = {:?}\n",
            weights.display().to_string()
        ),
    );
    let four = BuildContext { num_classes: 4, ..ten };
    let built = |sets: &[String]| {
        let (e, layered) = rlprune::methods::load(&exp, sets)?;
        rlprune::session::supervised::build_backbone::<Cpu>(&e, &layered, &four, dir.path(), &device)
    };
    let e = format!("{:#}", built(&[]).unwrap_err());
    assert!(e.contains("has 10 classes") && e.contains("has 4") && e.contains("reset_head = true"), "{e}");
    let model = built(&["backbone.reset_head=true".into()]).unwrap();
    let loaded = state_dict(&model);
    assert_eq!(loaded["fc.weight"].shape[0], 4);
    for (k, t) in &saved {
        if !k.starts_with("fc.") {
            assert_eq!(&loaded[k], t, "{k} is loaded from the weights");
        }
    }
    let e = err(&BASE.replace("arch = \"small-cnn\"\n", "arch = \"small-cnn\"\nreset_head = true\n"), &[]);
    assert!(e.contains("backbone.reset_head needs [backbone] weights"), "{e}");
}

/// Fine-tuning as DeiT's and GFNet's scripts do it: timm-layout weights of a 1000-class model
/// at 224 load into a 10-class model at 288 with `reset_head`; the position embedding's grid is
/// resized bicubically (class token kept), GFNet's global filters are resized to the new grid,
/// every other tensor loads as saved, and the model runs at 288.
#[test]
fn pretrained_weights_load_at_another_resolution_and_class_count() {
    use rlprune::Cpu;
    use rlprune::backbones::{AnyBackbone, Backbone, ModelSpec};
    use rlprune::nn::params::state_dict;
    use rlprune::nn::resample::{resample_global_filter, resample_pos_embed};
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    for (arch, extra, filter) in [("deit-ti", 1, None), ("gfnet-ti", 0, Some("blocks.3.filter.complex_weight"))] {
        let pretrained: AnyBackbone<Cpu> = ModelSpec::named(arch).unwrap().build(&device).unwrap();
        let saved = state_dict(&pretrained);
        assert_eq!(saved["head.weight"].shape[0], 1000);
        let weights = dir.path().join(format!("{arch}.safetensors"));
        rlprune::import::write_safetensors(&weights, &saved, &Default::default()).unwrap();
        let exp = write(
            dir.path(),
            &format!("{arch}.toml"),
            &format!(
                "name = \"ft\"\n[data]\ndataset = \"synthetic\"\nclasses = 10\nchannels = 3\nsize = 288\nbatch_size = 2\n\
                 [backbone]\narch = \"{arch}\"\nweights = {:?}\nreset_head = true\n",
                weights.display().to_string()
            ),
        );
        let (e, layered) = rlprune::methods::load(&exp, &[]).unwrap();
        let ctx = rlprune::backbones::BuildContext { num_classes: 10, in_channels: 3, img_size: [288, 288] };
        let model = rlprune::session::supervised::build_backbone::<Cpu>(&e, &layered, &ctx, dir.path(), &device).unwrap();
        let loaded = state_dict(&model);
        assert_eq!(loaded["head.weight"].shape[0], 10, "{arch}");
        let want = resample_pos_embed(&saved["pos_embed"], extra, [18, 18]).unwrap();
        assert_eq!(loaded["pos_embed"].shape, vec![1, extra + 18 * 18, saved["pos_embed"].shape[2]], "{arch}");
        assert_eq!(loaded["pos_embed"], want, "{arch}");
        let mut resized = vec!["pos_embed".to_string()];
        if let Some(f) = filter {
            // GFNet: 14×8 half spectrum at 224, 18×10 at 288.
            assert_eq!(&saved[f].shape[..2], &[14, 8]);
            assert_eq!(loaded[f], resample_global_filter(&saved[f], [18, 10]).unwrap(), "{arch}");
            resized.extend(loaded.keys().filter(|k| k.ends_with("complex_weight")).cloned());
        }
        for (k, t) in &saved {
            if !k.starts_with("head.") && !resized.contains(k) {
                assert_eq!(&loaded[k], t, "{arch}: {k} is loaded as saved");
            }
        }
        let x = burn::tensor::Tensor::<Cpu, 4>::random([1, 3, 288, 288], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        let logits: Vec<f32> = model.forward(x).into_data().to_vec().unwrap();
        assert!(logits.len() == 10 && logits.iter().all(|v| v.is_finite()), "{arch}");
    }
}
