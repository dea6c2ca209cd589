//! The TensorBoard event writer, read back by the real TensorBoard (`tests/py/read_events.py`).

mod common;

use std::path::Path;
use std::process::Command;

use rlprune::logging::tensorboard::{EventWriter, HParamValue};
use serde_json::Value;

/// Runs `tests/py/read_events.py` on `dir` and parses its JSON.
fn read_events(dir: &Path) -> Value {
    let python = common::python_with_tensorboard();
    let script = common::repo_root().join("tests/py/read_events.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("running {} {}: {e}", python.display(), script.display()));
    assert!(
        out.status.success(),
        "read_events.py failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bad JSON from read_events.py: {e}\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The single event file's record count as TensorBoard's reader sees it.
fn record_count(events: &Value, writer_file: &Path) -> u64 {
    let records = events["records"].as_object().expect("records");
    assert_eq!(records.len(), 1, "expected one event file, got {records:?}");
    let name = writer_file.file_name().unwrap().to_str().unwrap();
    records[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no record count for {name}: {records:?}"))
}

/// A float64 passed as its bit pattern.
fn num(v: &Value) -> f64 {
    f64::from_bits(v.as_u64().unwrap_or_else(|| panic!("not f64 bits: {v}")))
}

/// `(step, value)` pairs of one scalar tag.
fn scalar_series(events: &Value, tag: &str) -> Vec<(i64, f64)> {
    events["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no scalar tag {tag}: {}", events["scalars"]))
        .iter()
        .map(|p| {
            let bits = p[1]
                .as_u64()
                .and_then(|b| u32::try_from(b).ok())
                .expect("f32 bits");
            (p[0].as_i64().unwrap(), f32::from_bits(bits) as f64)
        })
        .collect()
}

/// What TensorBoard stores for a scalar: its float32 rounding.
fn f32ed(v: f64) -> f64 {
    v as f32 as f64
}

fn same_f64(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

#[test]
fn tensorboard_reads_back_scalars_histograms_text_and_hparams() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run-a");
    let mut w = EventWriter::create(&dir).unwrap();
    let file = w.path().to_path_buf();
    assert!(file.starts_with(&dir));
    let name = file.file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with("events.out.tfevents.") && name.ends_with(".rlprune"),
        "{name}"
    );

    let mut records = 1u64; // file_version
    let loss: Vec<(i64, f64)> = vec![
        (0, 2.4375),
        (1, 1.75),
        (2, -0.125),
        (10, 0.1),
        (500, 1e-7),
    ];
    for &(step, v) in &loss {
        w.scalar("train/loss", step, v).unwrap();
        records += 1;
    }
    let big: Vec<(i64, f64)> = vec![
        (0, 3.0e38),
        (7, -1.5e30),
        (1_000_000_000_000, 123456789.0),
        (i64::MAX, -42.0),
    ];
    for &(step, v) in &big {
        w.scalar("misc/big", step, v).unwrap();
        records += 1;
    }
    let odd: Vec<(i64, f64)> = vec![
        (1, f64::NAN),
        (2, f64::INFINITY),
        (3, f64::NEG_INFINITY),
        (-5, 0.5),
    ];
    for &(step, v) in &odd {
        w.scalar("misc/non_finite", step, v).unwrap();
        records += 1;
    }

    let mut values: Vec<f64> = (0..1000).map(|i| (i as f64 - 500.0) * 0.01).collect();
    let (sum, sum_squares): (f64, f64) = (values.iter().sum(), values.iter().map(|v| v * v).sum());
    values.extend([f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
    w.histogram("weights/conv1", 3, &values).unwrap();
    w.histogram("weights/conv1", 4, &[1.0, 1.0, 1.0]).unwrap();
    w.histogram("weights/empty", 3, &[f64::NAN, f64::INFINITY])
        .unwrap();
    records += 3;

    let markdown = "# Config\n\n| key | value |\n|---|---|\n| lr | 0.1 |\n\nünïcödé ✓";
    w.text("config", 0, markdown).unwrap();
    w.text("notes", 5, "second").unwrap();
    records += 2;

    let hparams = vec![
        ("lr".to_string(), HParamValue::Number(0.05)),
        (
            "optimizer".to_string(),
            HParamValue::Text("sgd".to_string()),
        ),
        ("augment".to_string(), HParamValue::Bool(true)),
        ("depth".to_string(), HParamValue::Number(-3.0)),
    ];
    let metrics = vec![
        ("hparam/accuracy".to_string(), 0.8125),
        ("hparam/flops".to_string(), 1.5e9),
    ];
    w.hparams(&hparams, &metrics, 99).unwrap();
    records += metrics.len() as u64 + 3;
    drop(w);

    let ev = read_events(&dir);
    // Every record survives TensorBoard's CRC checks: one bad checksum would end the file early.
    assert_eq!(record_count(&ev, &file), records, "{}", ev["records"]);
    assert_eq!(ev["file_versions"], serde_json::json!(["brain.Event:2"]));

    // Scalars: tags, steps and float32-rounded values, exactly.
    let mut tags: Vec<&str> = ev["scalars"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    tags.sort();
    assert_eq!(
        tags,
        [
            "hparam/accuracy",
            "hparam/flops",
            "misc/big",
            "misc/non_finite",
            "train/loss"
        ]
    );
    for (tag, expected) in [
        ("train/loss", &loss),
        ("misc/big", &big),
        ("misc/non_finite", &odd),
    ] {
        let got = scalar_series(&ev, tag);
        assert_eq!(got.len(), expected.len(), "{tag}: {got:?}");
        for (&(gs, gv), &(es, evv)) in got.iter().zip(expected.iter()) {
            assert_eq!(gs, es, "{tag}");
            assert!(
                same_f64(gv, f32ed(evv)),
                "{tag} step {es}: got {gv}, wrote {evv}"
            );
        }
    }
    assert_eq!(
        scalar_series(&ev, "hparam/accuracy"),
        vec![(99, f32ed(0.8125))]
    );
    assert_eq!(scalar_series(&ev, "hparam/flops"), vec![(99, f32ed(1.5e9))]);

    // Histograms.
    let conv = ev["histograms"]["weights/conv1"]
        .as_array()
        .expect("histogram tag");
    assert_eq!(conv.len(), 2);
    let h = &conv[0];
    assert_eq!(h["step"], 3);
    assert_eq!(num(&h["min"]), -5.0);
    assert_eq!(num(&h["max"]), 4.99);
    assert_eq!(num(&h["num"]), 1000.0);
    assert!((num(&h["sum"]) - sum).abs() < 1e-9, "{h}");
    assert!((num(&h["sum_squares"]) - sum_squares).abs() < 1e-6, "{h}");
    assert_eq!(h["bucket_count"], 30);
    assert_eq!(h["bucket_limit_count"], 30);
    assert_eq!(h["bucket_sum"].as_f64().unwrap(), 1000.0);
    let h = &conv[1];
    assert_eq!(h["step"], 4);
    assert_eq!(
        (
            num(&h["min"]),
            num(&h["max"]),
            num(&h["num"]),
            num(&h["sum"])
        ),
        (1.0, 1.0, 3.0, 3.0)
    );
    assert_eq!(
        (
            h["bucket_count"].as_u64(),
            h["bucket_sum"].as_f64().unwrap()
        ),
        (Some(1), 3.0)
    );
    let empty = &ev["histograms"]["weights/empty"][0];
    assert_eq!(
        (num(&empty["num"]), empty["bucket_count"].as_u64()),
        (0.0, Some(0))
    );

    // Text.
    assert_eq!(ev["texts"]["config"], serde_json::json!([[0, [markdown]]]));
    assert_eq!(ev["texts"]["notes"], serde_json::json!([[5, ["second"]]]));

    // HParams plugin data.
    let hp = &ev["hparams"];
    let exp = &hp["experiment"];
    assert_eq!(exp["version"], 0);
    assert_eq!(exp["tag"], "_hparams_/experiment");
    // tensorboard.hparams.DataType: STRING = 1, BOOL = 2, FLOAT64 = 3.
    assert_eq!(
        exp["hparams"],
        serde_json::json!({"lr": 3, "optimizer": 1, "augment": 2, "depth": 3})
    );
    assert_eq!(
        exp["metrics"],
        serde_json::json!(["hparam/accuracy", "hparam/flops"])
    );
    let start = &hp["session_start"];
    assert_eq!(start["tag"], "_hparams_/session_start_info");
    assert_eq!(
        start["hparams"],
        serde_json::json!({
            "lr": {"number": 0.05},
            "optimizer": {"string": "sgd"},
            "augment": {"bool": true},
            "depth": {"number": -3.0},
        })
    );
    assert_eq!(hp["session_end"]["tag"], "_hparams_/session_end_info");
    assert_eq!(hp["session_end"]["status"], 1, "STATUS_SUCCESS");
}

#[test]
fn flushed_writer_is_readable_before_drop() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(tmp.path()).unwrap();
    for step in 0..20 {
        w.scalar("loss", step, 1.0 / (step as f64 + 1.0)).unwrap();
    }
    w.text("note", 0, "still running").unwrap();
    w.flush().unwrap();

    let ev = read_events(tmp.path());
    assert_eq!(record_count(&ev, w.path()), 22);
    let got = scalar_series(&ev, "loss");
    let expected: Vec<(i64, f64)> = (0..20)
        .map(|s| (s, f32ed(1.0 / (s as f64 + 1.0))))
        .collect();
    assert_eq!(got, expected);
    assert_eq!(
        ev["texts"]["note"],
        serde_json::json!([[0, ["still running"]]])
    );

    // More records after a flush are appended cleanly.
    w.scalar("loss", 20, -1.0).unwrap();
    w.flush().unwrap();
    let ev = read_events(tmp.path());
    assert_eq!(record_count(&ev, w.path()), 23);
    assert_eq!(scalar_series(&ev, "loss").last(), Some(&(20, -1.0)));
}

#[test]
fn reader_drops_records_with_bad_crc() {
    // Guards the record-count checks above: TensorBoard's reader really stops at a bad checksum.
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    let mut w = EventWriter::create(&good).unwrap();
    for step in 0..5 {
        w.scalar("x", step, step as f64).unwrap();
    }
    w.flush().unwrap();
    let file = w.path().to_path_buf();
    drop(w);
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(record_count(&read_events(&good), &file), 6);

    let name = file.file_name().unwrap();
    for (case, flip_at) in [("data_crc", bytes.len() - 1), ("data", bytes.len() - 5)] {
        let bad = tmp.path().join(case);
        std::fs::create_dir(&bad).unwrap();
        let mut corrupted = bytes.clone();
        corrupted[flip_at] ^= 0x01;
        std::fs::write(bad.join(name), &corrupted).unwrap();
        let ev = read_events(&bad);
        assert_eq!(
            record_count(&ev, &file),
            5,
            "{case}: the corrupted last record must be dropped"
        );
    }
}

#[test]
fn two_writers_in_one_directory_get_distinct_files() {
    let tmp = tempfile::tempdir().unwrap();
    let a = EventWriter::create(tmp.path()).unwrap();
    let b = EventWriter::create(tmp.path()).unwrap();
    assert_ne!(a.path(), b.path());
    assert!(a.path().exists() && b.path().exists());
}

#[test]
fn unwritable_directory_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    // A regular file where a directory is needed fails even for root.
    let blocker = tmp.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let dir = blocker.join("run");
    let err = EventWriter::create(&dir).expect_err("creating a log dir under a file must fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&*dir.to_string_lossy()),
        "error should name the path: {msg}"
    );

    // A directory nobody may create entries in, root included (sysfs).
    #[cfg(target_os = "linux")]
    {
        let locked = std::path::Path::new("/sys/rlprune-test-logs");
        let err = EventWriter::create(locked).expect_err("a log dir under /sys must fail");
        assert!(format!("{err:#}").contains("/sys/rlprune-test-logs"), "{err:#}");
    }
}
