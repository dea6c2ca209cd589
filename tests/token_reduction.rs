//! ToMe and EViT against the official implementations (`../shared/parity/tome_deit_tiny_r8_seed0`,
//! `../shared/parity/evit_deit_tiny_k0.7_seed0`): a model TOML with `[model.tome]` or
//! `[model.evit]` run through `rlprune infer` gives the fixtures' logits and the same merged or
//! kept token sets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Tensor;
use rlprune::backbones::{infer, AnyBackbone, Backbone, ModelSpec};
use rlprune::import::read_safetensors;
use rlprune::nn::params::{load_strict, HostTensor};
use rlprune::{Cpu, CpuAutodiff};

mod common;

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// A model TOML for a fixture: `family = "deit"`, its `args`, and `[model.<method>]` with the
/// given keys of its config's `<method>` table.
fn model_toml(dir: &Path, method: &str, keys: &[&str]) -> String {
    let cfg = config(dir);
    let mut model: toml::Table = serde_json::from_value(cfg["args"].clone()).unwrap();
    model.insert("family".into(), "deit".into());
    let mut sub = toml::Table::new();
    for &k in keys {
        let v: toml::Value = serde_json::from_value(cfg[method][k].clone()).unwrap();
        sub.insert(k.into(), v);
    }
    model.insert(method.into(), toml::Value::Table(sub));
    let mut doc = toml::Table::new();
    doc.insert("model".into(), toml::Value::Table(model));
    toml::to_string(&doc).unwrap()
}

fn max_abs(got: &HostTensor, want: &HostTensor) -> f32 {
    assert_eq!(got.shape, want.shape);
    got.data.iter().zip(&want.data).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
}

/// Runs `rlprune infer` on a fixture with `toml` and `weights`; the output file's tensors.
fn run_infer(dir: &Path, toml: &str, weights: &str) -> (BTreeMap<String, HostTensor>, PathBuf, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model.toml");
    std::fs::write(&model, toml).unwrap();
    let out = tmp.path().join("out.safetensors");
    infer(&model, dir.join(weights), dir.join("input.safetensors"), &out).unwrap_or_else(|e| panic!("{e:#}"));
    let got = read_safetensors(&out).unwrap();
    (got, out, tmp)
}

fn int64(path: &Path, name: &str) -> Vec<i64> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name} is stored as int64");
    t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Whether two labelings of the same items describe the same partition.
fn same_partition(a: &[i64], b: &[i64]) -> bool {
    let (mut ab, mut ba) = (BTreeMap::new(), BTreeMap::new());
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| *ab.entry(x).or_insert(y) == y && *ba.entry(y).or_insert(x) == x)
}

#[test]
fn tome_reproduces_the_official_logits_and_source_map() {
    let dir = common::parity_fixture("tome_deit_tiny_r8_seed0");
    let toml = model_toml(&dir, "tome", &["r", "prop_attn", "trace_source"]);
    let spec = ModelSpec::from_toml_str(&toml).unwrap();
    let cfg = config(&dir);
    assert_eq!(spec.cost_native().params(), cfg["num_params"].as_u64().unwrap());
    let want = read_safetensors(&dir.join("output.safetensors")).unwrap();
    let (got, out, _tmp) = run_infer(&dir, &toml, "weights.safetensors");
    let err = max_abs(&got["output"], &want["output"]);
    println!("tome: logits max abs err {err:.3e}");
    assert!(err <= 1e-4, "logits max abs err {err:.3e}");
    let ours = int64(&out, "source_idx");
    let theirs: Vec<i64> = want["source_idx"].data.iter().map(|&v| v as i64).collect();
    assert_eq!(got["source_idx"].shape, vec![2, 197]);
    for (img, (a, b)) in ours.chunks(197).zip(theirs.chunks(197)).enumerate() {
        assert!(same_partition(a, b), "image {img}: another partition of the input tokens");
        // 149 final tokens, as `tokens_per_layer` ends.
        assert_eq!(a.iter().collect::<std::collections::BTreeSet<_>>().len(), 149);
    }
    // The DeiT-style checkpoint written by `torch.save` (`{"model": state_dict, ...}`) loads too.
    let (pth, _, _tmp2) = run_infer(&dir, &toml, "weights.pth");
    assert_eq!(pth["output"].data, got["output"].data);
}

#[test]
fn tome_with_r_zero_is_the_plain_model() {
    let dir = common::parity_fixture("tome_deit_tiny_r8_seed0");
    let toml = model_toml(&dir, "tome", &["prop_attn", "trace_source"]).replace("[model.tome]", "[model.tome]\nr = 0");
    let want = read_safetensors(&dir.join("output.safetensors")).unwrap();
    let (got, out, _tmp) = run_infer(&dir, &toml, "weights.safetensors");
    let err = max_abs(&got["output"], &want["output_r0"]);
    assert!(err <= 1e-4, "r = 0: logits max abs err {err:.3e}");
    // With nothing merged, every input token is its own final token.
    assert_eq!(int64(&out, "source_idx"), [(0..197).collect::<Vec<i64>>(), (0..197).collect()].concat());
}

#[test]
fn evit_reproduces_the_official_logits_and_kept_tokens() {
    let dir = common::parity_fixture("evit_deit_tiny_k0.7_seed0");
    let toml = model_toml(&dir, "evit", &["base_keep_rate", "drop_loc", "fuse_token"]);
    let spec = ModelSpec::from_toml_str(&toml).unwrap();
    assert_eq!(spec.cost_native().params(), config(&dir)["num_params"].as_u64().unwrap());
    let want = read_safetensors(&dir.join("output.safetensors")).unwrap();
    let (got, out, _tmp) = run_infer(&dir, &toml, "weights.safetensors");
    let err = max_abs(&got["output"], &want["output"]);
    println!("evit: logits max abs err {err:.3e}");
    assert!(err <= 1e-4, "logits max abs err {err:.3e}");
    for (i, k) in [138usize, 98, 70].into_iter().enumerate() {
        let name = format!("keep_abs_s{i}");
        assert_eq!(got[&name].shape, vec![2, k], "{name}");
        let ours = int64(&out, &name);
        let theirs: Vec<i64> = want[&name].data.iter().map(|&v| v as i64).collect();
        for (a, b) in ours.chunks(k).zip(theirs.chunks(k)) {
            let set = |s: &[i64]| s.iter().copied().collect::<std::collections::BTreeSet<_>>();
            assert_eq!(set(a), set(b), "{name}: another kept set");
        }
    }
    assert!(got.keys().all(|k| k == "output" || k.starts_with("keep_abs_s")));
}

/// The merged and reduced models count fewer MACs than the plain one, by the token counts the
/// official models report, and the plain model is untouched by the new keys' absence.
#[test]
fn token_reduction_costs_follow_the_token_counts() {
    let dir = common::parity_fixture("tome_deit_tiny_r8_seed0");
    let tome = ModelSpec::from_toml_str(&model_toml(&dir, "tome", &["r"])).unwrap();
    let plain = ModelSpec::from_toml_str(&model_toml(&dir, "tome", &[]).replace("[model.tome]\n", "")).unwrap();
    let plain_r0 = ModelSpec::from_toml_str(&model_toml(&dir, "tome", &[]).replace("[model.tome]", "[model.tome]\nr = 0")).unwrap();
    let (t, p) = (tome.cost_native().macs(), plain.cost_native().macs());
    assert_eq!(plain_r0.cost_native().macs(), p);
    assert!(t < p && t as f64 > 0.6 * p as f64, "tome {t} vs plain {p}");
    assert!(!plain.to_toml_string().contains("tome"), "no [model.tome] unless asked for");
}

#[test]
fn token_method_settings_are_checked() {
    let dir = common::parity_fixture("evit_deit_tiny_k0.7_seed0");
    let base = model_toml(&dir, "evit", &["base_keep_rate", "drop_loc", "fuse_token"]);
    let err = |toml: &str| format!("{:#}", ModelSpec::from_toml_str(toml).unwrap_err());
    let both = format!("{base}\n[model.tome]\nr = 4\n");
    assert!(err(&both).contains("cannot both be set"), "{}", err(&both));
    let unknown = base.replace("fuse_token", "fuse_tokens");
    assert!(err(&unknown).contains("fuse_tokens"), "{}", err(&unknown));
    let far = base.replace("drop_loc = [3, 6, 9]", "drop_loc = [3, 6, 12]");
    assert!(err(&far).contains("drop_loc"), "{}", err(&far));
    let rate = base.replace("base_keep_rate = 0.7", "base_keep_rate = 0.0");
    assert!(err(&rate).contains("base_keep_rate"), "{}", err(&rate));
}

/// Fine-tuning runs through the reductions: every block's weights get a finite, non-zero
/// gradient through ToMe's merges and EViT's kept and fused tokens.
#[test]
fn gradients_flow_through_merged_and_fused_tokens() {
    for (fixture, method, keys) in [
        ("tome_deit_tiny_r8_seed0", "tome", &["r", "prop_attn"][..]),
        ("evit_deit_tiny_k0.7_seed0", "evit", &["base_keep_rate", "drop_loc", "fuse_token"][..]),
    ] {
        let dir = common::parity_fixture(fixture);
        let spec = ModelSpec::from_toml_str(&model_toml(&dir, method, keys)).unwrap();
        let dev = Default::default();
        let model: AnyBackbone<CpuAutodiff> = spec.build(&dev).unwrap();
        let weights = read_safetensors(&dir.join("weights.safetensors")).unwrap();
        let model = load_strict(model, &weights, fixture).unwrap();
        let x = read_safetensors(&dir.join("input.safetensors")).unwrap()["input"].to_tensor::<CpuAutodiff, 4>(&dev);
        let grads = model.forward(x).powi_scalar(2).sum().backward();
        let AnyBackbone::Deit(vit) = &model else { panic!("a deit model") };
        let last = vit.blocks.last().unwrap();
        for (name, w) in [("blocks.0.attn.qkv", &vit.blocks[0].attn.qkv.weight), ("last block fc2", &last.mlp.fc2.weight)] {
            let g: Tensor<Cpu, 2> = w.grad(&grads).unwrap_or_else(|| panic!("{method}: no gradient for {name}"));
            let g = g.into_data().to_vec::<f32>().unwrap();
            assert!(g.iter().all(|v| v.is_finite()) && g.iter().any(|&v| v != 0.0), "{method}: {name}");
        }
        assert!(model.num_params() > 0);
    }
}

/// `rlprune bench --unreduced`: the reduced and the full forward of the same model, timed in
/// alternation, with the FLOPs ratio of the token counts; a model without a reduction is refused.
#[test]
fn bench_compares_a_reduction_with_every_token_kept() {
    let dir = common::parity_fixture("evit_deit_tiny_k0.7_seed0");
    let tmp = tempfile::tempdir().unwrap();
    let reduced = tmp.path().join("evit.toml");
    std::fs::write(&reduced, model_toml(&dir, "evit", &["base_keep_rate", "drop_loc", "fuse_token"])).unwrap();
    let target = rlprune::bench::BenchModel::resolve(reduced.to_str().unwrap(), None, None, None).unwrap();
    let report = rlprune::methods::eval::token_reduction_speedup(&target, 2, 0, 2).unwrap();
    assert_eq!((report.method, report.batch, report.repeats), ("evit", 2, 2));
    assert!(report.flops_ratio > 0.5 && report.flops_ratio < 0.8, "{}", report.flops_ratio);
    assert!(report.speedup > 0.0 && report.table().contains("FLOPs ratio"));
    let plain = tmp.path().join("plain.toml");
    std::fs::write(&plain, model_toml(&dir, "evit", &[]).replace("[model.evit]\n", "")).unwrap();
    let target = rlprune::bench::BenchModel::resolve(plain.to_str().unwrap(), None, None, None).unwrap();
    let err = rlprune::methods::eval::token_reduction_speedup(&target, 1, 0, 1).unwrap_err().to_string();
    assert!(err.contains("no [model.tome] or [model.evit]"), "{err}");
}

/// The shipped DeiT experiment trains (on a few synthetic images here), and `rlprune eval` of the
/// run with `--set backbone.tome.r=…` or `backbone.evit.…` reports the reduction, its FLOPs ratio
/// and the latency against the same model keeping every token; the plain eval reports none.
#[test]
fn eval_of_a_trained_deit_with_tome_and_evit() {
    let dir = tempfile::tempdir().unwrap();
    common::train_on_synthetic(dir.path(), "deit_tome_evit_fashion_mnist.toml", &[]);
    let eval = |set: &[&str]| {
        let mut a = vec!["eval", "run", "--json"];
        for s in set {
            a.extend(["--set", s]);
        }
        let text = common::ok(&common::rlprune(&a, dir.path()));
        serde_json::from_str::<serde_json::Value>(text.lines().last().unwrap()).unwrap()
    };
    let plain = eval(&[]);
    assert!(plain.get("reduction").is_none() && plain.get("latency").is_none(), "{plain}");
    for (set, method) in [
        (&["backbone.tome.r=4"][..], "tome"),
        (&["backbone.evit.base_keep_rate=0.5", "backbone.evit.drop_loc=[1,3,5]", "backbone.evit.fuse_token=true"][..], "evit"),
    ] {
        let r = eval(set);
        assert_eq!(r["reduction"], method, "{r}");
        let ratio = r["flops_ratio"].as_f64().unwrap();
        assert!(ratio > 0.3 && ratio < 0.95, "{method}: FLOPs ratio {ratio}");
        for b in ["batch1", "batch64"] {
            assert!(r["latency"][b]["speedup"].as_f64().unwrap() > 0.0, "{method} {b}: {r}");
        }
        assert!((0.0..=1.0).contains(&r["top1"].as_f64().unwrap()));
    }
}

/// EViT's keep-rate warm-up: a model in training keeps every token for `shrink_start_epoch`
/// epochs, then follows the cosine down to the base rate; evaluation keeps the base rate
/// throughout.
#[test]
fn evit_training_follows_the_keep_rate_warm_up() {
    use burn::module::AutodiffModule;
    let dir = common::parity_fixture("evit_deit_tiny_k0.7_seed0");
    let toml = model_toml(&dir, "evit", &["base_keep_rate", "drop_loc", "fuse_token"]) + "shrink_start_epoch = 1\nshrink_epochs = 2\n";
    let spec = ModelSpec::from_toml_str(&toml).unwrap();
    let dev = Default::default();
    let mut model: AnyBackbone<CpuAutodiff> = spec.build(&dev).unwrap();
    let x = read_safetensors(&dir.join("input.safetensors")).unwrap()["input"].to_tensor::<CpuAutodiff, 4>(&dev);
    let kept = |m: &AnyBackbone<CpuAutodiff>| m.forward_traced(x.clone().require_grad()).1.first().map(|(_, k)| k.dims()[1]);
    let eval_kept = |m: &AnyBackbone<CpuAutodiff>| m.valid().forward_traced(x.clone().inner()).1.first().map(|(_, k)| k.dims()[1]);
    model.set_training_progress(0.5);
    assert_eq!(kept(&model), None, "every token kept before the shrink starts");
    assert_eq!(eval_kept(&model), Some(138), "evaluation at the base rate");
    model.set_training_progress(2.0);
    assert_eq!(kept(&model), Some(167), "⌈0.85·196⌉ halfway down the cosine");
    model.set_training_progress(3.0);
    assert_eq!(kept(&model), Some(138));
}

/// `rlprune visualize` of a ToMe model draws its merge map: every patch in the mean colour of
/// the patches merged into the same final token (the official code's `source` partition), and
/// of an EViT model the patches kept at each keep location (the official kept sets).
#[test]
fn visualize_draws_tome_merge_maps_and_evit_kept_patches() {
    let tmp = tempfile::tempdir().unwrap();
    let read_json = |p: PathBuf| serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p).unwrap()).unwrap();
    // ToMe, without trace_source in the TOML: visualize traces the sources itself.
    let dir = common::parity_fixture("tome_deit_tiny_r8_seed0");
    std::fs::write(tmp.path().join("tome.toml"), model_toml(&dir, "tome", &["r", "prop_attn"])).unwrap();
    let w = dir.join("weights.safetensors");
    let x = dir.join("input.safetensors");
    let run = |model: &str, out: &str| {
        common::rlprune(
            &["visualize", model, "--weights", w.to_str().unwrap(), "--data", x.to_str().unwrap(), "--out", out, "--scale", "2"],
            tmp.path(),
        )
    };
    common::ok(&run("tome.toml", "tome"));
    let index = read_json(tmp.path().join("tome/index.json"));
    let source = int64(&dir.join("output.safetensors"), "source_idx");
    let t0 = source.len() / 2;
    for (i, entry) in index["images"].as_array().unwrap().iter().enumerate() {
        let merged: Vec<i64> = entry["merged_into"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(merged, source[i * t0 + 1..(i + 1) * t0], "image {i}: the official partition of the patches");
        assert_eq!(entry["final_tokens"], 148, "149 tokens after six merges of 8, one of them the class token");
        // The merge panel: a cell's centre pixel is its token's colour, shared by the token's cells.
        let img = image::open(tmp.path().join(format!("tome/image_{i:04}.png"))).unwrap().to_rgb8();
        let (cell, side) = (8 * 2, 112 * 2);
        let centre = |c: usize| *img.get_pixel((side + 4 + (c % 14) * cell + cell / 2) as u32, ((c / 14) * cell + cell / 2) as u32);
        let mut colour = BTreeMap::new();
        for (c, &t) in merged.iter().enumerate() {
            assert_eq!(*colour.entry(t).or_insert_with(|| centre(c)), centre(c), "image {i}: cells of token {t} differ");
        }
        let distinct: std::collections::BTreeSet<_> = colour.values().map(|p| p.0).collect();
        assert!(distinct.len() > 20, "image {i}: {} colours for {} tokens", distinct.len(), colour.len());
    }

    // EViT: one panel per keep location with the official kept sets.
    let dir = common::parity_fixture("evit_deit_tiny_k0.7_seed0");
    std::fs::write(tmp.path().join("evit.toml"), model_toml(&dir, "evit", &["base_keep_rate", "drop_loc", "fuse_token"])).unwrap();
    let (w, x) = (dir.join("weights.safetensors"), dir.join("input.safetensors"));
    let out = common::rlprune(
        &["visualize", "evit.toml", "--weights", w.to_str().unwrap(), "--data", x.to_str().unwrap(), "--out", "evit"],
        tmp.path(),
    );
    common::ok(&out);
    let index = read_json(tmp.path().join("evit/index.json"));
    for (s, k) in [138usize, 98, 70].into_iter().enumerate() {
        let want = int64(&dir.join("output.safetensors"), &format!("keep_abs_s{s}"));
        let per = want.len() / 2;
        for (i, entry) in index["images"].as_array().unwrap().iter().enumerate() {
            let mut got: Vec<i64> = entry["kept"][s].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let mut official: Vec<i64> = want[i * per..(i + 1) * per].iter().copied().filter(|&c| c >= 0).collect();
            got.sort();
            official.sort();
            // The fused token of an earlier stage can be among the kept (−1, no patch).
            assert!(got.len() <= k && got.len() + s >= k, "stage {s}: {} patches", got.len());
            assert_eq!(got, official, "image {i}, stage {s}");
        }
    }
    // A DeiT without a reduction has nothing to show.
    std::fs::write(tmp.path().join("plain.toml"), model_toml(&dir, "evit", &[]).replace("[model.evit]\n", "")).unwrap();
    let out = common::rlprune(
        &["visualize", "plain.toml", "--weights", w.to_str().unwrap(), "--data", x.to_str().unwrap(), "--out", "plain"],
        tmp.path(),
    );
    assert!(common::failed(&out).contains("[model.tome] or [model.evit]"));
}

/// `rlprune sweep RUN --set backbone.tome.r=…` evaluates a trained DeiT at each `r` without
/// training: one row per value with its top-1, FLOPs ratio (falling with `r`) and latency, the
/// run as trained as the unpruned row, and the plot; training-only options are refused.
#[test]
fn sweep_over_tome_r_evaluates_a_trained_run() {
    let dir = tempfile::tempdir().unwrap();
    common::train_on_synthetic(dir.path(), "deit_tome_evit_fashion_mnist.toml", &[]);
    let checkpoint_before = std::fs::read(dir.path().join("run/checkpoints/best.safetensors")).unwrap();
    common::ok(&common::rlprune(&["sweep", "run", "--set", "backbone.tome.r=2,4,6", "--out", "sw"], dir.path()));
    let csv = std::fs::read_to_string(dir.path().join("sw/sweep.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no column {name} in {csv}"));
    assert_eq!(rows.iter().map(|r| r[col("method")]).collect::<Vec<_>>(), ["unpruned", "tome", "tome", "tome"], "{csv}");
    let flops: Vec<f64> = rows.iter().map(|r| r[col("flops_ratio")].parse().unwrap()).collect();
    assert_eq!(flops[0], 1.0);
    assert!(flops.windows(2).all(|w| w[1] < w[0]), "FLOPs fall with r: {flops:?}");
    for r in &rows {
        let top1: f64 = r[col("top1")].parse().unwrap();
        let b64: f64 = r[col("latency_b64_ms")].parse().unwrap();
        assert!((0.0..=1.0).contains(&top1) && b64 > 0.0, "{csv}");
    }
    assert!(dir.path().join("sw/sweep.png").is_file());
    assert!(!dir.path().join("sw/backbone.tome.r=2").exists(), "nothing is trained");
    assert_eq!(std::fs::read(dir.path().join("run/checkpoints/best.safetensors")).unwrap(), checkpoint_before);
    let err = common::failed(&common::rlprune(&["sweep", "run", "--set", "backbone.tome.r=2,4", "--seeds", "0,1"], dir.path()));
    assert!(err.contains("without training"), "{err}");
}
