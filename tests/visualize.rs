//! `rlprune visualize`: PNG size, and the greyed regions of every stage panel are exactly the
//! cells the model's pruned forward pass dropped (recomputed here), for the DynamicViT parity
//! fixture (model TOML + weights + input tensor) and for a run directory written by `train`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rlprune::backbones::{AnyBackbone, ModelSpec};
use rlprune::import::{read_safetensors, read_tensor};
use rlprune::nn::params::load_strict;
use rlprune::visualize::{grey_out, keep_map, visualize, VisualizeOptions, GAP};
use rlprune::Cpu;

mod common;
use common::{rlprune, ok, failed};

fn fixture() -> PathBuf {
    common::parity_fixture("dynamicvit_deit_tiny_r0.7_seed0")
}

/// Checks one written PNG against the kept cells per stage: size, the first panel equal to the
/// image, and in panel `s` every cell equal to the first panel's (kept) or its greyed version
/// (dropped), with the greyed cells exactly the complement of `kept[s]`.
fn check_png(path: &Path, [h, w]: [usize; 2], grid: [usize; 2], kept: &[Vec<usize>], scale: usize) {
    let img = image::open(path).unwrap().to_rgb8();
    let stages = kept.len();
    let (pw, ph) = (w * scale, h * scale);
    assert_eq!((img.width() as usize, img.height() as usize), ((stages + 1) * pw + stages * GAP, ph), "{}", path.display());
    let (ch, cw) = (ph / grid[0], pw / grid[1]);
    for (s, keep) in kept.iter().enumerate() {
        let want: BTreeSet<usize> = keep.iter().copied().collect();
        let x0 = (s + 1) * (pw + GAP);
        let mut kept_cells = BTreeSet::new();
        let mut greyed_cells = BTreeSet::new();
        for cell in 0..grid[0] * grid[1] {
            let (cy, cx) = (cell / grid[1] * ch, cell % grid[1] * cw);
            let (mut same, mut grey) = (true, true);
            for y in cy..cy + ch {
                for x in cx..cx + cw {
                    let orig = img.get_pixel(x as u32, y as u32).0;
                    let got = img.get_pixel((x0 + x) as u32, y as u32).0;
                    same &= got == orig;
                    grey &= got == orig.map(grey_out);
                }
            }
            // A cell that is identical either way (already grey) cannot tell; the fixture's
            // min-max scaled noise never produces one, and the assertion below would catch it.
            assert!(same != grey, "stage {s} cell {cell}: neither kept nor greyed (or both)");
            if same {
                kept_cells.insert(cell);
            } else {
                greyed_cells.insert(cell);
            }
        }
        assert_eq!(kept_cells, want, "stage {s}: kept cells in {}", path.display());
        assert_eq!(greyed_cells.len(), grid[0] * grid[1] - want.len());
    }
    // Gaps are white.
    if stages > 0 {
        assert_eq!(img.get_pixel(pw as u32 + 1, 0).0, [255, 255, 255]);
    }
}

#[test]
fn fixture_model_toml_pngs_grey_exactly_the_dropped_patches() {
    let fx = fixture();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fx.join("config.json")).unwrap()).unwrap();
    let spec = ModelSpec::from_args("dynamicvit-deit", &cfg["args"]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let toml = tmp.path().join("model.toml");
    std::fs::write(&toml, spec.to_toml_string()).unwrap();
    let out = tmp.path().join("vis");
    let opts = VisualizeOptions {
        target: toml.clone(),
        weights: Some(fx.join("weights.safetensors")),
        data: Some(fx.join("input.safetensors").display().to_string()),
        images: 5,
        out: out.clone(),
        base_dir: tmp.path().to_path_buf(),
        ..Default::default()
    };
    let files = visualize(&opts).unwrap().files;
    // The fixture holds 2 images; asking for more shows what there is.
    assert_eq!(files.len(), 2);

    // Recompute the kept sets with the model's pruned forward pass.
    let dev = Default::default();
    let model: AnyBackbone<Cpu> = spec.build(&dev).unwrap();
    let model = load_strict(model, &read_safetensors(&fx.join("weights.safetensors")).unwrap(), "fixture").unwrap();
    let x = read_tensor(&fx.join("input.safetensors"), "input").unwrap().to_tensor::<Cpu, 4>(&dev);
    let map = keep_map(&model, x).unwrap();
    assert_eq!(map.grid, [14, 14]);
    assert_eq!(map.stages.iter().map(|s| s[0].len()).collect::<Vec<_>>(), vec![137, 96, 67]);
    // The kept patches come from the reference's own run (the fixture's `keep_abs_s{i}`), not
    // from the code that drew the pictures; the keep map agrees with them as sets.
    let reference: Vec<rlprune::nn::params::HostTensor> =
        (0..3).map(|s| read_tensor(&fx.join("output.safetensors"), &format!("keep_abs_s{s}")).unwrap()).collect();
    for (i, f) in files.iter().enumerate() {
        let kept: Vec<Vec<usize>> = reference
            .iter()
            .map(|t| {
                let k = t.shape[1];
                let mut row: Vec<usize> = t.data[i * k..(i + 1) * k].iter().map(|&v| v as usize).collect();
                row.sort_unstable();
                row
            })
            .collect();
        for (s, want) in kept.iter().enumerate() {
            let mut got = map.stages[s][i].clone();
            got.sort_unstable();
            assert_eq!(&got, want, "image {i}, stage {s}: keep map against the reference");
        }
        // 112×112 images: default scale 2.
        check_png(f, [112, 112], map.grid, &kept, 2);
    }
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["images"][1]["kept"][2].as_array().unwrap().len(), 67);

    // Same through the binary, with an explicit scale.
    let out2 = tmp.path().join("vis2");
    let w = fx.join("weights.safetensors");
    let input = fx.join("input.safetensors");
    let text = ok(&rlprune(
        &["visualize", toml.to_str().unwrap(), "--weights", w.to_str().unwrap(), "--data", input.to_str().unwrap(), "--images", "1", "--scale", "1", "--out", out2.to_str().unwrap()],
        tmp.path(),
    ));
    assert!(text.contains("wrote 1 image"), "{text}");
    let kept: Vec<Vec<usize>> = map.stages.iter().map(|s| s[0].clone()).collect();
    check_png(&out2.join("image_0000.png"), [112, 112], map.grid, &kept, 1);
}

const TINY_DVIT: &str = r#"name = "tiny-dvit"
seed = 3

[data]
dataset = "synthetic"
batch_size = 16
classes = 4
channels = 1
size = 16
train_size = 64
test_size = 16

[backbone]
arch = "dynamicvit-deit-s-0.7"
patch_size = 4
embed_dim = 16
depth = 4
num_heads = 2
pruning_loc = [1, 2, 3]
token_ratio = [0.75, 0.5, 0.25]

[train]
epochs = 1
optimizer = { kind = "adamw", lr = 1e-3 }
schedule = { kind = "constant" }

[log]
tensorboard = false
"#;

#[test]
fn run_directory_pngs_and_bad_options() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = tmp.path().join("exp.toml");
    std::fs::write(&exp, TINY_DVIT).unwrap();
    let run = tmp.path().join("run");
    ok(&rlprune(&["train", exp.to_str().unwrap(), "--out", run.to_str().unwrap()], tmp.path()));
    let out = tmp.path().join("vis");
    let text = ok(&rlprune(&["visualize", run.to_str().unwrap(), "--images", "3", "--out", out.to_str().unwrap()], tmp.path()));
    assert!(text.contains("wrote 3 image"), "{text}");
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["grid"], serde_json::json!([4, 4]));
    assert_eq!(index["scale"], 14);
    for (i, e) in index["images"].as_array().unwrap().iter().enumerate() {
        let kept: Vec<Vec<usize>> = e["kept"].as_array().unwrap().iter().map(|s| s.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect()).collect();
        assert_eq!(kept.iter().map(Vec::len).collect::<Vec<_>>(), vec![12, 8, 4]);
        check_png(&out.join(format!("image_{i:04}.png")), [16, 16], [4, 4], &kept, 14);
    }

    // Bad options: clear errors, exit 1.
    let o = out.to_str().unwrap();
    let err = failed(&rlprune(&["visualize", run.to_str().unwrap(), "--images", "0", "--out", o], tmp.path()));
    assert!(err.contains("--images"), "{err}");
    let err = failed(&rlprune(&["visualize", tmp.path().join("nope").to_str().unwrap(), "--out", o], tmp.path()));
    assert!(err.contains("neither a run directory, a model TOML file nor a zoo name"), "{err}");
    let model = tmp.path().join("m.toml");
    std::fs::write(&model, "[model]\nfamily = \"deit\"\nimg_size = 16\npatch_size = 4\nembed_dim = 8\ndepth = 1\nnum_heads = 2\n").unwrap();
    let err = failed(&rlprune(&["visualize", model.to_str().unwrap(), "--out", o], tmp.path()));
    assert!(err.contains("--weights"), "{err}");
    let err = failed(&rlprune(&["visualize", run.to_str().unwrap(), "--data", "imagenet", "--out", o], tmp.path()));
    assert!(err.contains("dataset"), "{err}");
}
