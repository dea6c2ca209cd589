//! Reference-weight import: real `torch.save` checkpoints of the parity fixtures, PyTorch zip
//! checkpoints (written from the format by
//! `tests/py/make_pth.py`, stdlib only), malicious pickles, broken files, safetensors round trips
//! and the parity fixture.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use rlprune::import::{
    SourceDtype, drop_ignored_keys, read_pth, read_safetensors, read_safetensors_metadata,
    read_tensor, read_weights, read_weights_with_dtypes, write_safetensors,
};
use rlprune::nn::params::{HostTensor, StateDict};

mod common;

struct Fixtures {
    dir: PathBuf,
    /// What the malicious pickles would create if anything executed them.
    pwned: PathBuf,
    expected: serde_json::Value,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("import-pth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let pwned = std::env::temp_dir().join(format!("pwned_{}_{nanos}", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/make_pth.py");
        let out = Command::new("python3")
            .arg(&script)
            .arg(&dir)
            .arg(&pwned)
            .output()
            .expect("python3 (stdlib only) is needed to write the .pth test files");
        assert!(
            out.status.success(),
            "make_pth.py failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
        Fixtures { dir, pwned, expected }
    })
}

fn fx(name: &str) -> PathBuf {
    fixtures().dir.join(name)
}

/// Compares every tensor of `got` with `expected.json`'s entry for `file`, bit for bit.
fn check_expected(file: &str, got: &StateDict) {
    let exp = fixtures().expected[file]
        .as_object()
        .unwrap_or_else(|| panic!("no expectation for {file}"));
    let got_keys: Vec<&String> = got.keys().collect();
    let mut exp_keys: Vec<&String> = exp.keys().collect();
    exp_keys.sort();
    assert_eq!(got_keys, exp_keys, "{file}: keys");
    for (k, e) in exp {
        let t = &got[k];
        let shape: Vec<usize> =
            e["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let data: Vec<f32> =
            e["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(t.shape, shape, "{file}: {k}: shape");
        assert_eq!(t.data.len(), data.len(), "{file}: {k}: length");
        for (i, (a, b)) in t.data.iter().zip(&data).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{file}: {k}[{i}]: got {a}, expected {b}");
        }
    }
}

fn err_of<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

// ------------------------------------------------------------------------------------- .pth

#[test]
fn pth_plain_ordered_dict() {
    let sd = read_pth(&fx("plain.pth")).unwrap();
    check_expected("plain.pth", &sd);
    // Independent spot checks of the formulae in make_pth.py.
    assert_eq!(sd["conv.weight"].shape, vec![2, 3, 2, 2]);
    assert_eq!(sd["conv.weight"].data[5], 5.0 * 0.5 - 3.0);
    assert_eq!(sd["conv.bias"].data, vec![0.25, -1.75]);
    assert_eq!(sd["bn.num_batches_tracked"].shape, Vec::<usize>::new());
    assert_eq!(sd["bn.num_batches_tracked"].data, vec![1234567.0]);
    assert_eq!(sd["fc.weight"].data[3], 0.3f32);
}

#[test]
fn pth_integer_buffers_are_marked_and_droppable() {
    let (mut sd, dtypes) = read_weights_with_dtypes(&fx("plain.pth")).unwrap();
    assert_eq!(dtypes["bn.num_batches_tracked"], SourceDtype::I64);
    assert!(!dtypes["bn.num_batches_tracked"].is_float());
    assert_eq!(dtypes["conv.weight"], SourceDtype::F32);
    drop_ignored_keys(&mut sd);
    assert!(!sd.contains_key("bn.num_batches_tracked"));
    assert_eq!(sd.len(), 4);
}

#[test]
fn pth_protocol_4_and_other_archive_name() {
    let sd = read_pth(&fx("proto4.pth")).unwrap();
    check_expected("proto4.pth", &sd);
}

#[test]
fn pth_model_and_state_dict_wrappers() {
    for f in ["model_wrapper.pth", "state_dict_wrapper.pth"] {
        let sd = read_pth(&fx(f)).unwrap();
        check_expected(f, &sd);
        assert_eq!(sd["head.bias"].data, vec![3.5, -4.25, 8.0]);
        assert_eq!(sd["head.scale"].data, vec![8.0]);
    }
}

#[test]
fn pth_non_contiguous_views() {
    let sd = read_pth(&fx("noncontig.pth")).unwrap();
    check_expected("noncontig.pth", &sd);
    // Storage is 0..12 as a 3x4 matrix; proj.weight is its transpose.
    assert_eq!(sd["proj.weight"].data, vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]);
    assert_eq!(sd["column"].data, vec![1., 5., 9.]);
    assert_eq!(sd["row"].data, vec![8., 9., 10., 11.]);
}

#[test]
fn pth_shared_storage_with_offsets() {
    let sd = read_pth(&fx("shared.pth")).unwrap();
    check_expected("shared.pth", &sd);
    assert_eq!(sd["a"].data, vec![10., 11., 12., 13.]);
    assert_eq!(sd["b"].data, vec![14., 15., 16., 17., 18., 19.]);
    assert_eq!(sd["tied"], sd["a"]);
}

#[test]
fn pth_reduced_precision_dtypes() {
    let (sd, dtypes) = read_weights_with_dtypes(&fx("dtypes.pth")).unwrap();
    check_expected("dtypes.pth", &sd);
    assert_eq!(dtypes["half"], SourceDtype::F16);
    assert_eq!(dtypes["bf16"], SourceDtype::BF16);
    assert_eq!(dtypes["double"], SourceDtype::F64);
    let h = &sd["half"].data;
    assert_eq!(h[0], 0.333_251_95); // f16 nearest to 1/3
    assert_eq!(h[2], 65504.0);
    assert_eq!(h[3], 2f32.powi(-24)); // smallest subnormal
    assert!(h[5] == 0.0 && h[5].is_sign_negative());
    assert_eq!(sd["bf16"].data, vec![1.0, 3.140625, -0.0078125]);
    assert_eq!(sd["double"].data[0], 0.1f32);
}

#[test]
fn pth_big_endian_byteorder() {
    let sd = read_pth(&fx("bigendian.pth")).unwrap();
    check_expected("bigendian.pth", &sd);
}

#[test]
fn read_weights_detects_the_format_by_content() {
    let dir = tempfile::tempdir().unwrap();
    // A .pth under a .safetensors name and the reverse.
    let disguised = dir.path().join("weights.safetensors");
    std::fs::copy(fx("plain.pth"), &disguised).unwrap();
    check_expected("plain.pth", &read_weights(&disguised).unwrap());
    let st = dir.path().join("weights.pth");
    let sd = read_pth(&fx("plain.pth")).unwrap();
    write_safetensors(&st, &sd, &BTreeMap::new()).unwrap();
    assert_eq!(read_weights(&st).unwrap(), sd);
}

// ------------------------------------------------------------------------- malicious pickles

fn assert_refused(file: &str, global: &str) {
    let f = fixtures();
    for r in [read_pth(&fx(file)), read_weights(&fx(file))] {
        let e = err_of(r);
        assert!(
            e.contains(&format!("refusing to load global '{global}'")),
            "{file}: error does not name the global: {e}"
        );
        assert!(e.contains(file) && e.contains("data.pkl"), "{file}: error names no file: {e}");
    }
    assert!(!f.pwned.exists(), "{file}: the payload ran: {} exists", f.pwned.display());
}

#[test]
fn malicious_os_system_is_refused() {
    assert_refused("evil_os_system.pth", "os.system");
}

#[test]
fn malicious_builtins_eval_is_refused() {
    assert_refused("evil_eval.pth", "builtins.eval");
}

#[test]
fn malicious_stack_global_is_refused() {
    assert_refused("evil_stack_global.pth", "os.system");
}

#[test]
fn malicious_payload_inside_a_state_dict_is_refused() {
    assert_refused("evil_nested.pth", "builtins.exec");
}

#[test]
fn pickled_module_object_is_refused() {
    let e = err_of(read_pth(&fx("whole_module.pth")));
    assert!(e.contains("refusing to load global '__main__.GFNet'"), "{e}");
}

// ------------------------------------------------------------------------------ broken files

#[test]
fn broken_pth_files_give_clear_errors() {
    let cases: &[(&str, &[&str])] = &[
        ("truncated.pth", &["truncated.pth", "not a readable zip archive"]),
        ("no_pkl.pth", &["no_pkl.pth", "no data.pkl"]),
        (
            "missing_storage.pth",
            &["missing_storage.pth", "'archive/data/4' is missing", "fc.weight"],
        ),
        ("short_storage.pth", &["short_storage.pth", "tensor 'w'", "storage holds 6 bytes"]),
        ("not_a_dict.pth", &["not_a_dict.pth", "top level", "list"]),
        ("no_tensors.pth", &["no_tensors.pth", "no tensors found", "'epoch'"]),
        ("garbage.bin", &["garbage.bin", "not a readable zip archive"]),
        (
            "oversized_storage.pth",
            &["oversized_storage.pth", "'archive/data/0' inflates to 524288 bytes", "2 float32 elements", "(8 bytes)"],
        ),
        ("bomb.pth", &["bomb.pth", "declare 268435", "refused before inflating"]),
        ("empty.pth", &["empty.pth", "not a readable zip archive"]),
    ];
    for (file, needles) in cases {
        let e = err_of(read_pth(&fx(file)));
        eprintln!("{file}: {e}");
        for n in *needles {
            assert!(e.contains(n), "{file}: error lacks {n:?}: {e}");
        }
    }
    let e = err_of(read_weights(&fx("garbage.bin")));
    assert!(e.contains("garbage.bin") && e.contains("unrecognised weights format"), "{e}");
    let e = err_of(read_weights(&fx("empty.pth")));
    assert!(e.contains("empty.pth") && e.contains("unrecognised weights format"), "{e}");
    let e = err_of(read_weights(&fx("legacy.pth")));
    assert!(e.contains("legacy.pth") && e.contains("legacy"), "{e}");
    let e = err_of(read_weights(&fx("does_not_exist.pth")));
    assert!(e.contains("does_not_exist.pth"), "{e}");
}

#[test]
fn every_truncation_of_a_checkpoint_errs_without_panicking() {
    let raw = std::fs::read(fx("plain.pth")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.pth");
    for n in (0..raw.len()).step_by(7) {
        std::fs::write(&p, &raw[..n]).unwrap();
        assert!(read_weights(&p).is_err(), "a {n}-byte prefix was accepted");
    }
}

// ------------------------------------------------------------------------------- safetensors

fn sample_dict() -> StateDict {
    let mut d = StateDict::new();
    d.insert(
        "a.weight".into(),
        HostTensor::new(vec![2, 3], vec![1.0, -2.5, 3.25, f32::MIN_POSITIVE, 1e30, -0.0]),
    );
    d.insert("a.bias".into(), HostTensor::new(vec![3], vec![0.1, 0.2, 0.3]));
    d.insert("scalar".into(), HostTensor::new(vec![], vec![42.0]));
    d.insert("empty".into(), HostTensor::new(vec![0, 4], vec![]));
    d
}

#[test]
fn safetensors_round_trip_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ckpt.safetensors");
    let d = sample_dict();
    let meta: BTreeMap<String, String> =
        [("arch".to_string(), "gfnet-ti".to_string()), ("epoch".to_string(), "3".to_string())]
            .into();
    write_safetensors(&p, &d, &meta).unwrap();
    assert_eq!(read_safetensors(&p).unwrap(), d);
    assert_eq!(read_safetensors_metadata(&p).unwrap(), meta);
    assert_eq!(read_tensor(&p, "a.bias").unwrap(), d["a.bias"]);
    let e = err_of(read_tensor(&p, "input"));
    assert!(e.contains("no tensor 'input'") && e.contains("a.bias"), "{e}");
    // Identical contents give identical files: the metadata is written sorted.
    let many: BTreeMap<String, String> = (0..8).map(|i| (format!("key{i}"), format!("value {i}"))).collect();
    let files: Vec<Vec<u8>> = (0..4)
        .map(|i| {
            let q = dir.path().join(format!("same{i}.safetensors"));
            write_safetensors(&q, &d, &many).unwrap();
            let bytes = std::fs::read(&q).unwrap();
            std::fs::remove_file(&q).unwrap();
            bytes
        })
        .collect();
    assert!(files.windows(2).all(|w| w[0] == w[1]), "the same tensors and metadata gave different files");
    let text = String::from_utf8_lossy(&files[0]);
    let positions: Vec<usize> = (0..8).map(|i| text.find(&format!("\"key{i}\"")).unwrap()).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "metadata not sorted: {positions:?}");
    assert_eq!(u64::from_le_bytes(files[0][..8].try_into().unwrap()) % 8, 0, "data section 8-byte aligned");
    // No metadata.
    write_safetensors(&p, &d, &BTreeMap::new()).unwrap();
    assert!(read_safetensors_metadata(&p).unwrap().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "temp files left behind");
}

#[test]
fn corrupt_safetensors_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    write_safetensors(&good, &sample_dict(), &BTreeMap::new()).unwrap();
    let raw = std::fs::read(&good).unwrap();
    let bad = dir.path().join("bad.safetensors");
    // Truncated in the data, in the header, and a header length beyond the file.
    for cut in [raw.len() - 3, 20, 4] {
        std::fs::write(&bad, &raw[..cut]).unwrap();
        let e = err_of(read_safetensors(&bad));
        assert!(e.contains("bad.safetensors"), "{e}");
    }
    let mut huge = raw.clone();
    huge[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&bad, &huge).unwrap();
    assert!(err_of(read_safetensors(&bad)).contains("bad.safetensors"));
    assert!(err_of(read_safetensors_metadata(&bad)).contains("bad.safetensors"));
    // A header that is not JSON.
    let mut junk = 8u64.to_le_bytes().to_vec();
    junk.extend(b"{notjson");
    std::fs::write(&bad, &junk).unwrap();
    assert!(err_of(read_safetensors(&bad)).contains("bad.safetensors"));
    assert!(err_of(read_safetensors_metadata(&bad)).contains("bad.safetensors"));
    assert!(err_of(read_weights(&bad)).contains("bad.safetensors"));
}

/// A safetensors file with one tensor of `dtype` and raw little-endian `bytes`, by hand.
fn raw_safetensors(path: &Path, dtype: &str, shape: &[usize], bytes: &[u8]) {
    let mut header = format!(
        r#"{{"t":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[0,{}]}}}}"#,
        bytes.len()
    )
    .into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(bytes);
    std::fs::write(path, out).unwrap();
}

#[test]
fn safetensors_f16_bf16_f64_i64_convert_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.safetensors");
    let le16 = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();

    // f16: 1, -2, 65504, smallest subnormal, 1/3, inf, -0
    raw_safetensors(
        &p,
        "F16",
        &[7],
        &le16(&[0x3C00, 0xC000, 0x7BFF, 0x0001, 0x3555, 0x7C00, 0x8000]),
    );
    let t = read_tensor(&p, "t").unwrap();
    assert_eq!(&t.data[..5], &[1.0, -2.0, 65504.0, 2f32.powi(-24), 0.333_251_95]);
    assert_eq!(t.data[5], f32::INFINITY);
    assert!(t.data[6] == 0.0 && t.data[6].is_sign_negative());

    // bf16: 1, 3.140625, -0.0078125
    raw_safetensors(&p, "BF16", &[3], &le16(&[0x3F80, 0x4049, 0xBC00]));
    assert_eq!(read_tensor(&p, "t").unwrap().data, vec![1.0, 3.140625, -0.0078125]);

    let f64s: Vec<u8> = [0.1f64, -1e-3].iter().flat_map(|x| x.to_le_bytes()).collect();
    raw_safetensors(&p, "F64", &[2], &f64s);
    assert_eq!(read_tensor(&p, "t").unwrap().data, vec![0.1f32, -1e-3f32]);

    let i64s: Vec<u8> = [7i64, -3].iter().flat_map(|x| x.to_le_bytes()).collect();
    raw_safetensors(&p, "I64", &[1, 2], &i64s);
    let (d, dt) = read_weights_with_dtypes(&p).unwrap();
    assert_eq!(d["t"], HostTensor::new(vec![1, 2], vec![7.0, -3.0]));
    assert_eq!(dt["t"], SourceDtype::I64);

    raw_safetensors(&p, "F8_E4M3", &[2], &[0, 0]);
    let e = err_of(read_safetensors(&p));
    assert!(e.contains("t.safetensors") && e.contains("'t'") && e.contains("F8_E4M3"), "{e}");
}

// ---------------------------------------------------------------------------- atomic writes

#[test]
fn write_safetensors_replaces_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.safetensors");
    let mut d = sample_dict();
    write_safetensors(&p, &d, &BTreeMap::new()).unwrap();
    d.get_mut("a.bias").unwrap().data[0] = 9.0;
    write_safetensors(&p, &d, &BTreeMap::new()).unwrap();
    assert_eq!(read_safetensors(&p).unwrap(), d);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temp files left behind");
}

#[test]
fn failed_write_leaves_the_old_file_intact() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.safetensors");
    let old = sample_dict();
    write_safetensors(&p, &old, &BTreeMap::new()).unwrap();
    let before = std::fs::read(&p).unwrap();

    // A tensor whose shape does not match its data is refused before anything is written.
    let mut bad = old.clone();
    bad.insert("broken".into(), HostTensor { shape: vec![2, 2], data: vec![1.0] });
    let e = err_of(write_safetensors(&p, &bad, &BTreeMap::new()));
    assert!(e.contains("w.safetensors") && e.contains("broken"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), before);

    // A failure after the temp file is written: the final rename cannot replace a non-empty
    // directory. The directory and its content survive, and no temp file is left.
    let target = dir.path().join("taken.safetensors");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"old").unwrap();
    let e = err_of(write_safetensors(&target, &old, &BTreeMap::new()));
    assert!(e.contains("taken.safetensors") && e.contains("rename"), "{e}");
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"old");

    // A missing directory.
    let e = err_of(write_safetensors(
        &dir.path().join("no/such/dir/x.safetensors"),
        &old,
        &BTreeMap::new(),
    ));
    assert!(e.contains("x.safetensors"), "{e}");

    // A directory nobody may create files in, root included (sysfs): an error naming the file.
    #[cfg(target_os = "linux")]
    {
        let q = Path::new("/sys/rlprune-test.safetensors");
        let e = err_of(write_safetensors(q, &old, &BTreeMap::new()));
        assert!(e.contains("/sys/rlprune-test.safetensors"), "{e}");
        assert!(!q.exists());
    }

    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "temp files left: {names:?}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

// --------------------------------------------------------------------------- parity fixture

fn parity_dir(name: &str) -> PathBuf {
    common::parity_fixture(name)
}

#[test]
fn parity_fixture_gfnet_iso_weights_match_config() {
    let dir = parity_dir("gfnet_iso_seed0");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let (sd, dtypes) = read_weights_with_dtypes(&dir.join("weights.safetensors")).unwrap();
    assert!(dtypes.values().all(|d| *d == SourceDtype::F32));

    let args = &cfg["args"];
    let u = |k: &str| args[k].as_u64().unwrap() as usize;
    let (img, patch, dim, depth, mlp, classes) = (
        u("img_size"),
        u("patch_size"),
        u("embed_dim"),
        u("depth"),
        u("mlp_ratio"),
        u("num_classes"),
    );
    let grid = img / patch;
    let hidden = dim * mlp;
    let mut want: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    want.insert("patch_embed.proj.weight".into(), vec![dim, 3, patch, patch]);
    want.insert("patch_embed.proj.bias".into(), vec![dim]);
    want.insert("pos_embed".into(), vec![1, grid * grid, dim]);
    for b in 0..depth {
        let k = |s: &str| format!("blocks.{b}.{s}");
        want.insert(k("filter.complex_weight"), vec![grid, grid / 2 + 1, dim, 2]);
        for n in ["norm1", "norm2"] {
            want.insert(k(&format!("{n}.weight")), vec![dim]);
            want.insert(k(&format!("{n}.bias")), vec![dim]);
        }
        want.insert(k("mlp.fc1.weight"), vec![hidden, dim]);
        want.insert(k("mlp.fc1.bias"), vec![hidden]);
        want.insert(k("mlp.fc2.weight"), vec![dim, hidden]);
        want.insert(k("mlp.fc2.bias"), vec![dim]);
    }
    want.insert("norm.weight".into(), vec![dim]);
    want.insert("norm.bias".into(), vec![dim]);
    want.insert("head.weight".into(), vec![classes, dim]);
    want.insert("head.bias".into(), vec![classes]);

    let got: BTreeMap<String, Vec<usize>> =
        sd.iter().map(|(k, t)| (k.clone(), t.shape.clone())).collect();
    assert_eq!(got, want);
    let total: usize = sd.values().map(|t| t.data.len()).sum();
    assert_eq!(total as u64, cfg["num_params"].as_u64().unwrap());
    for name in cfg["perturbed_params"].as_array().unwrap() {
        let t = &sd[name.as_str().unwrap()];
        assert!(t.data.iter().all(|v| v.is_finite()));
        assert!(t.data.windows(2).any(|w| w[0] != w[1]), "{name} was not perturbed");
    }
    // The input tensor of the same fixture.
    let input = read_tensor(&dir.join("input.safetensors"), "input").unwrap();
    let shape: Vec<usize> = cfg["input_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(input.shape, shape);

    // Through a round trip, bit for bit.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("copy.safetensors");
    write_safetensors(&p, &sd, &[("arch".to_string(), "gfnet_iso".to_string())].into()).unwrap();
    assert_eq!(read_weights(&p).unwrap(), sd);
    assert_eq!(read_safetensors_metadata(&p).unwrap()["arch"], "gfnet_iso");
}

/// Checkpoints written by PyTorch's own `torch.save` (2.15, zip format): two bare state dicts and
/// a DeiT training checkpoint (`{"model": ..., "epoch": ..., "args": ...}`). Each must load to
/// exactly the tensors of the fixture's `weights.safetensors`, with the same dtypes.
#[test]
fn real_torch_save_checkpoints_load_bit_for_bit() {
    for name in ["gfnet_iso_seed0", "hornet_gf_seed0", "tome_deit_tiny_r8_seed0"] {
        let dir = parity_dir(name);
        let (pth, pth_dtypes) = read_weights_with_dtypes(&dir.join("weights.pth")).unwrap();
        let (st, st_dtypes) = read_weights_with_dtypes(&dir.join("weights.safetensors")).unwrap();
        assert_eq!(pth.keys().collect::<Vec<_>>(), st.keys().collect::<Vec<_>>(), "{name}: keys");
        assert_eq!(pth_dtypes, st_dtypes, "{name}: dtypes");
        let mut values = 0usize;
        for (k, want) in &st {
            let got = &pth[k];
            assert_eq!(got.shape, want.shape, "{name} {k}: shape");
            let same = got.data.iter().zip(&want.data).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same && got.data.len() == want.data.len(), "{name} {k}: values differ");
            values += want.data.len();
        }
        println!("{name}: {} tensors, {values} values identical", st.len());
        assert!(values > 10_000, "{name}: suspiciously small ({values} values)");
        // The explicit reader agrees with the format-detecting one.
        assert_eq!(read_pth(&dir.join("weights.pth")).unwrap(), pth);
    }
}

/// Integer tensors are never loaded as weights: a weight stored as int64 is refused, naming the
/// tensor, while BatchNorm's int64 `num_batches_tracked` counters are dropped as before.
#[test]
fn integer_tensors_are_not_loaded_as_weights() {
    use rlprune::import::{IntTensor, read_model_weights, write_safetensors_with_ints};
    let dir = tempfile::tempdir().unwrap();
    let floats: StateDict = [("fc.bias".to_string(), HostTensor::new(vec![2], vec![0.5, -0.5]))].into_iter().collect();
    let counter = ("bn.num_batches_tracked".to_string(), IntTensor { shape: vec![], data: vec![100] });
    let ok_path = dir.path().join("ok.safetensors");
    write_safetensors_with_ints(&ok_path, &floats, &[counter.clone()].into_iter().collect(), &BTreeMap::new()).unwrap();
    let dict = read_model_weights(&ok_path).unwrap();
    assert_eq!(dict.keys().collect::<Vec<_>>(), vec!["fc.bias"]);

    let weight = ("fc.weight".to_string(), IntTensor { shape: vec![2, 2], data: vec![1, 2, 3, 4] });
    let bad_path = dir.path().join("bad.safetensors");
    write_safetensors_with_ints(&bad_path, &floats, &[counter, weight].into_iter().collect(), &BTreeMap::new()).unwrap();
    let e = err_of(read_model_weights(&bad_path));
    assert!(e.contains("bad.safetensors") && e.contains("fc.weight") && e.contains("not a floating-point type"), "{e}");
}
