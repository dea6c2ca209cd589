//! Parity with the reference PyTorch implementations (`../shared/parity`): each fixture is
//! built from its `config.json` `args`, loads the reference `state_dict` strictly and must
//! reproduce the reference logits in eval mode (the inner, non-autodiff backend).

use std::path::PathBuf;

use burn::module::Module;
use rlprune::backbones::{infer, AnyBackbone, Backbone, ModelSpec};
use rlprune::import::{read_safetensors, read_tensor};
use rlprune::nn::params::{load_strict, HostTensor};

mod common;


struct Fixture {
    dir: PathBuf,
    spec: ModelSpec,
    num_params: u64,
}

/// The model family from the fixture's constructor call (`gfnet.GFNetPyramid(...)`, ...).
fn family(constructor: &str) -> &'static str {
    let name = constructor.split('(').next().unwrap_or_default().trim();
    match name {
        "gfnet.GFNet" => "gfnet",
        "gfnet.GFNetPyramid" => "gfnet-pyramid",
        "hornet.HorNet" => "hornet",
        other => panic!("no family for constructor {other}"),
    }
}

fn fixture(name: &str) -> Fixture {
    let dir = common::parity_fixture(name);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let fam = family(config["constructor"].as_str().unwrap());
    let spec = ModelSpec::from_args(fam, &config["args"]).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let num_params = config["num_params"].as_u64().unwrap();
    Fixture { dir, spec, num_params }
}

/// (max abs error, relative L2 error) of `got` against `want`.
fn errors(got: &HostTensor, want: &HostTensor) -> (f64, f64) {
    assert_eq!(got.shape, want.shape);
    let (mut max, mut num, mut den) = (0f64, 0f64, 0f64);
    for (&g, &w) in got.data.iter().zip(&want.data) {
        let d = (g as f64 - w as f64).abs();
        max = max.max(d);
        num += d * d;
        den += (w as f64) * (w as f64);
    }
    (max, (num / den).sqrt())
}

/// Runs the fixture on the CPU, or on the device named by `RLPRUNE_TEST_DEVICE` (`cuda`,
/// `cuda:N`; a test binary built with `--features cuda`, as `scripts/gpu-check.sh` runs it).
fn check(name: &str) {
    let spec = common::test_device();
    let result: anyhow::Result<()> = rlprune::with_backend!(spec, |B, device| {
        check_on::<B>(name, &device);
        Ok(())
    });
    result.unwrap_or_else(|e| panic!("{e:#}"));
}

fn check_on<B: rlprune::ModelBackend>(name: &str, device: &B::Device) {
    let fx = fixture(name);
    let model: AnyBackbone<B> = fx.spec.build(device).unwrap();
    assert_eq!(model.num_params() as u64, fx.num_params, "{name}: parameter count");
    assert_eq!(fx.spec.cost_native().params(), fx.num_params, "{name}: analytic parameter count");
    let weights = read_safetensors(&fx.dir.join("weights.safetensors")).unwrap();
    let model = load_strict(model, &weights, name).unwrap_or_else(|e| panic!("{e:#}"));
    let input = read_tensor(&fx.dir.join("input.safetensors"), "input").unwrap();
    let want = read_tensor(&fx.dir.join("output.safetensors"), "output").unwrap();
    let got = HostTensor::from_tensor(&model.forward(input.to_tensor::<B, 4>(device)));
    let (max_abs, rel_l2) = errors(&got, &want);
    println!("{name}: max abs err {max_abs:.3e}, rel L2 {rel_l2:.3e}");
    let tol = common::parity_tolerance();
    assert!(max_abs <= tol.max_abs && rel_l2 <= tol.rel_l2, "{name}: max abs {max_abs:.3e}, rel L2 {rel_l2:.3e} ({tol:?})");
}

#[test]
fn gfnet_iso() {
    check("gfnet_iso_seed0");
}

#[test]
fn gfnet_h() {
    check("gfnet_h_seed0");
}

#[test]
fn hornet_7x7() {
    check("hornet_7x7_seed0");
}

#[test]
fn hornet_gf() {
    check("hornet_gf_seed0");
}

/// The same fixture through the library's `infer` (model TOML → weights → input → output file).
#[test]
fn infer_writes_reference_logits() {
    let name = "hornet_gf_seed0";
    let fx = fixture(name);
    let tmp = tempfile::tempdir().unwrap();
    let toml_path = tmp.path().join("model.toml");
    std::fs::write(&toml_path, fx.spec.to_toml_string()).unwrap();
    // The TOML round-trips to the same spec.
    assert_eq!(rlprune::backbones::model_from_toml(&toml_path).unwrap(), fx.spec);
    let out = tmp.path().join("out.safetensors");
    infer(&toml_path, fx.dir.join("weights.safetensors"), fx.dir.join("input.safetensors"), &out).unwrap();
    let got = read_tensor(&out, "output").unwrap();
    let want = read_tensor(&fx.dir.join("output.safetensors"), "output").unwrap();
    let (max_abs, rel_l2) = errors(&got, &want);
    let tol = common::CPU_TOLERANCE;
    assert!(max_abs <= tol.max_abs && rel_l2 <= tol.rel_l2, "{name} via infer: {max_abs:.3e} / {rel_l2:.3e}");
}

#[test]
fn infer_rejects_wrong_weights() {
    let fx = fixture("gfnet_iso_seed0");
    let other = fixture("gfnet_h_seed0");
    let tmp = tempfile::tempdir().unwrap();
    let toml_path = tmp.path().join("model.toml");
    std::fs::write(&toml_path, fx.spec.to_toml_string()).unwrap();
    let out = tmp.path().join("out.safetensors");
    let err = infer(&toml_path, other.dir.join("weights.safetensors"), fx.dir.join("input.safetensors"), &out)
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("missing keys") && msg.contains("unexpected keys"), "{msg}");
    assert!(!out.exists());
}

/// An input with another channel count than the model's is refused, for a fixed-size model
/// (GFNet) and a fully convolutional one (HorNet), and nothing is written.
#[test]
fn infer_rejects_inputs_with_the_wrong_channel_count() {
    for name in ["gfnet_iso_seed0", "hornet_gf_seed0"] {
        let fx = fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        let toml_path = tmp.path().join("model.toml");
        std::fs::write(&toml_path, fx.spec.to_toml_string()).unwrap();
        let x = read_tensor(&fx.dir.join("input.safetensors"), "input").unwrap();
        assert_eq!(x.shape[1], 3);
        let [n, _, h, w] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
        let gray = HostTensor { shape: vec![n, 1, h, w], data: x.data[..n * h * w].to_vec() };
        let input = tmp.path().join("gray.safetensors");
        let dict = [("input".to_string(), gray)].into_iter().collect();
        rlprune::import::write_safetensors(&input, &dict, &Default::default()).unwrap();
        let out = tmp.path().join("out.safetensors");
        let err = infer(&toml_path, fx.dir.join("weights.safetensors"), &input, &out).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("gray.safetensors") && msg.contains("3-channel") && msg.contains("1 channels"), "{name}: {msg}");
        assert!(!out.exists());
    }
}
