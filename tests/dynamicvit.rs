//! DynamicViT parity with the reference (`../shared/parity/dynamicvit_deit_tiny_r0.7_*`):
//! eval mode (logits and the kept token sets per stage) and the differentiable training
//! recipe (loss and two gradients, with the reference's stored Gumbel noise).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rlprune::backbones::dynamicvit::{distill_loss, DistillLossWeights, DynamicVit, DynamicVitArgs};
use rlprune::backbones::vit::VisionTransformer;
use rlprune::backbones::{infer, AnyBackbone, ModelSpec};
use rlprune::backbones::token_predictor::FixedGumbel;
use rlprune::import::{read_safetensors, read_tensor};
use rlprune::nn::params::{load_strict, HostTensor, StateDict};
use burn::tensor::backend::AutodiffBackend;
use rlprune::{Cpu, ModelBackend};

mod common;

fn fixture_dir(name: &str) -> PathBuf {
    common::parity_fixture(name)
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn args(dir: &Path) -> DynamicVitArgs {
    match ModelSpec::from_args("dynamicvit-deit", &config(dir)["args"]).unwrap() {
        ModelSpec::DynamicVit(a) => a,
        other => panic!("wrong family {}", other.family()),
    }
}

/// (max abs error, relative L2 error).
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

/// Rows of an `[N, k]` index tensor as sets.
fn index_sets(t: &HostTensor) -> Vec<BTreeSet<i64>> {
    let k = t.shape[1];
    t.data.chunks(k).map(|r| r.iter().map(|&v| v as i64).collect()).collect()
}

#[test]
fn eval_matches_reference_logits_and_kept_sets() {
    let result: anyhow::Result<()> = rlprune::with_backend!(common::test_device(), |B, device| {
        eval_on::<B>(&device);
        Ok(())
    });
    result.unwrap_or_else(|e| panic!("{e:#}"));
}

fn eval_on<B: ModelBackend>(dev: &B::Device) {
    let dir = fixture_dir("dynamicvit_deit_tiny_r0.7_seed0");
    let a = args(&dir);
    let model = DynamicVit::<B>::from_args(&a, dev).unwrap();
    let n_params = config(&dir)["num_params"].as_u64().unwrap();
    assert_eq!(model.num_params() as u64, n_params);
    assert_eq!(ModelSpec::DynamicVit(a.clone()).cost_native().params(), n_params);
    let weights = read_safetensors(&dir.join("weights.safetensors")).unwrap();
    let model = load_strict(model, &weights, "dynamicvit").unwrap_or_else(|e| panic!("{e:#}"));
    let input = read_tensor(&dir.join("input.safetensors"), "input").unwrap();
    let want = read_safetensors(&dir.join("output.safetensors")).unwrap();
    let (logits, kept) = model.forward_pruned(input.to_tensor::<B, 4>(dev));
    let (max_abs, rel) = errors(&HostTensor::from_tensor(&logits), &want["output"]);
    println!("dynamicvit eval: logits max abs err {max_abs:.3e}, rel L2 {rel:.3e}");
    let tol = common::parity_tolerance();
    assert!(max_abs <= tol.max_abs && rel <= tol.rel_l2, "max abs {max_abs:.3e}, rel L2 {rel:.3e} ({tol:?})");
    assert_eq!(kept.len(), 3);
    for (i, k) in kept.iter().enumerate() {
        let got = index_sets(&HostTensor::from_tensor(&k.clone().float()));
        let want = index_sets(&want[&format!("keep_abs_s{i}")]);
        assert_eq!(got, want, "stage {i}: kept sets differ");
    }
    println!("dynamicvit eval: kept sets equal at all 3 stages ({:?} tokens)", a.keep_counts());
}

#[test]
fn infer_writes_logits_and_keep_abs() {
    let dir = fixture_dir("dynamicvit_deit_tiny_r0.7_seed0");
    let spec = ModelSpec::DynamicVit(args(&dir));
    let tmp = tempfile::tempdir().unwrap();
    let toml_path = tmp.path().join("model.toml");
    std::fs::write(&toml_path, spec.to_toml_string()).unwrap();
    assert_eq!(rlprune::backbones::model_from_toml(&toml_path).unwrap(), spec);
    let out = tmp.path().join("out.safetensors");
    infer(&toml_path, dir.join("weights.safetensors"), dir.join("input.safetensors"), &out).unwrap();
    let got = read_safetensors(&out).unwrap();
    let want = read_safetensors(&dir.join("output.safetensors")).unwrap();
    let (max_abs, rel) = errors(&got["output"], &want["output"]);
    assert!(max_abs <= 1e-4 && rel <= 1e-5, "via infer: {max_abs:.3e} / {rel:.3e}");
    // Stored as int64, like the reference.
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for i in 0..3 {
        let name = format!("keep_abs_s{i}");
        assert_eq!(st.tensor(&name).unwrap().dtype(), safetensors::Dtype::I64);
        assert_eq!(index_sets(&got[&name]), index_sets(&want[&name]), "{name}");
    }
}

#[test]
fn train_loss_and_gradients_match_reference() {
    let result: anyhow::Result<()> = rlprune::with_autodiff_backend!(common::test_device(), |B, device| {
        train_on::<B>(&device);
        Ok(())
    });
    result.unwrap_or_else(|e| panic!("{e:#}"));
}

fn train_on<B>(dev: &B::Device)
where
    B: AutodiffBackend + ModelBackend,
    B::InnerBackend: ModelBackend,
{
    let dev = dev.clone();
    let dir = fixture_dir("dynamicvit_deit_tiny_r0.7_train_seed0");
    let cfg = config(&dir);
    let a = args(&dir);
    let weights = read_safetensors(&dir.join("weights.safetensors")).unwrap();
    let student = load_strict(DynamicVit::<B>::from_args(&a, &dev).unwrap(), &weights, "student")
        .unwrap_or_else(|e| panic!("{e:#}"));
    // The teacher: the same weights without predictors, in eval mode.
    let teacher_weights: StateDict =
        weights.iter().filter(|(k, _)| !k.starts_with("score_predictor.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let teacher = load_strict(VisionTransformer::<B::InnerBackend>::from_args(&a.deit(), &dev).unwrap(), &teacher_weights, "teacher")
        .unwrap_or_else(|e| panic!("{e:#}"));
    let inputs = read_safetensors(&dir.join("input.safetensors")).unwrap();
    let want = read_safetensors(&dir.join("output.safetensors")).unwrap();
    let x_inner = inputs["input"].to_tensor::<B::InnerBackend, 4>(&dev);
    let tokens = teacher.blocks.iter().fold(teacher.embed(x_inner), |x, b| b.forward(x, None));
    let tokens = teacher.norm.forward(tokens);
    let [n, t, _] = tokens.dims();
    let teacher_logits = teacher.head_from_normed(tokens.clone());
    let teacher_tokens = tokens.narrow(1, 1, t - 1);
    let (e_logit, _) = errors(&HostTensor::from_tensor(&teacher_logits), &want["teacher_logits"]);
    let (e_tok, _) = errors(&HostTensor::from_tensor(&teacher_tokens), &want["teacher_tokens"]);
    println!("dynamicvit train teacher logits: max abs err {e_logit:.3e}");
    println!("dynamicvit train teacher tokens: max abs err {e_tok:.3e}");
    let tol = common::parity_tolerance();
    assert!(e_logit <= tol.max_abs && e_tok <= tol.max_abs, "teacher differs: {e_logit:.3e} {e_tok:.3e} ({tol:?})");

    let mut noise = FixedGumbel { per_stage: (0..3).map(|i| inputs[&format!("gumbel_s{i}")].to_tensor::<B, 3>(&dev)).collect() };
    let out = student.forward_train(inputs["input"].to_tensor::<B, 4>(&dev), &mut noise);
    for (i, d) in out.decisions.iter().enumerate() {
        let (e, _) = errors(&HostTensor::from_tensor(d), &want[&format!("decision_s{i}")]);
        assert!(e < 1e-6, "stage {i} decisions differ ({e})");
    }
    let labels_f = &inputs["labels"];
    let labels = Tensor::<B, 1, Int>::from_data(
        TensorData::new(labels_f.data.iter().map(|&v| v as i64).collect::<Vec<_>>(), [n]),
        &dev,
    );
    let loss = distill_loss(
        &out,
        labels,
        Tensor::from_inner(teacher_logits),
        Tensor::from_inner(teacher_tokens),
        &a.token_ratio,
        DistillLossWeights { clf_weight: 1.0, ratio_weight: 2.0, distill_weight: 0.5 },
    );
    let got_loss: f64 = loss.total.clone().into_scalar().elem();
    let want_loss = cfg["loss"].as_f64().unwrap();
    let rel_loss = (got_loss - want_loss).abs() / want_loss.abs();
    println!("dynamicvit train: loss {got_loss:.7} vs {want_loss:.7} (rel err {rel_loss:.3e})");
    assert!(rel_loss <= tol.rel_l2.max(1e-4), "loss {got_loss} vs reference {want_loss}");

    let grads = loss.total.backward();
    let vit = student.vit();
    let g_head = vit.head.weight.val().grad(&grads).expect("head gradient");
    let g_pred = vit.score_predictor[0].out_conv.4.weight.val().grad(&grads).expect("predictor gradient");
    let (_, r_head) = errors(&HostTensor::from_tensor(&g_head), &want["grad_head_weight"]);
    let (_, r_pred) = errors(&HostTensor::from_tensor(&g_pred), &want["grad_score_predictor0_out_conv4_weight"]);
    println!("dynamicvit train: grad head rel L2 {r_head:.3e}, grad score_predictor.0.out_conv.4 rel L2 {r_pred:.3e}");
    assert!(r_head <= tol.rel_l2.max(1e-3), "head gradient rel L2 {r_head:.3e}");
    assert!(r_pred <= tol.rel_l2.max(1e-3), "predictor gradient rel L2 {r_pred:.3e}");
}

#[test]
fn any_backbone_path_is_the_pruned_one() {
    use rlprune::backbones::Backbone;
    let dir = fixture_dir("dynamicvit_deit_tiny_r0.7_seed0");
    let spec = ModelSpec::DynamicVit(args(&dir));
    let dev = Default::default();
    let model: AnyBackbone<Cpu> = spec.build(&dev).unwrap();
    let weights = read_safetensors(&dir.join("weights.safetensors")).unwrap();
    let model = load_strict(model, &weights, "dynamicvit").unwrap();
    let input = read_tensor(&dir.join("input.safetensors"), "input").unwrap();
    let logits = model.forward(input.to_tensor::<Cpu, 4>(&dev));
    let want = read_tensor(&dir.join("output.safetensors"), "output").unwrap();
    let (max_abs, _) = errors(&HostTensor::from_tensor(&logits), &want);
    assert!(max_abs <= 1e-4);
}
