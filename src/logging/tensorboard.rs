//! A TensorBoard event-file writer: scalars, histograms, text and hparams.
//!
//! The file is a sequence of TFRecord-framed, protobuf-encoded `tensorboard.Event` messages:
//!
//! ```text
//! u64 length (little endian) | u32 masked crc32c(length bytes) | data | u32 masked crc32c(data)
//! ```
//!
//! with `mask(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8` (wrapping). The message structs
//! below mirror the public `.proto` definitions of TensorBoard (`event.proto`, `summary.proto`,
//! `histogram.proto`, `tensor.proto`, `tensor_shape.proto`, the hparams plugin's `api.proto` and
//! `plugin_data.proto`, and `google/protobuf/struct.proto`), restricted to the fields written
//! here; field numbers must match those definitions exactly.
//!
//! Every I/O error is returned with the file path in its message; nothing here panics.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use prost::Message;

/// Hand-written protobuf messages (prost derive), field numbers as in TensorBoard's protos.
mod proto {
    use std::collections::BTreeMap;

    /// `tensorboard.Event` (event.proto).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        #[prost(int64, tag = "2")]
        pub step: i64,
        #[prost(oneof = "event::What", tags = "3, 5")]
        pub what: Option<event::What>,
    }

    pub mod event {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum What {
            #[prost(string, tag = "3")]
            FileVersion(String),
            #[prost(message, tag = "5")]
            Summary(super::Summary),
        }
    }

    /// `tensorboard.Summary` (summary.proto).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<SummaryValue>,
    }

    /// `tensorboard.Summary.Value`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SummaryValue {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(message, optional, tag = "9")]
        pub metadata: Option<SummaryMetadata>,
        #[prost(oneof = "summary_value::Value", tags = "2, 5, 8")]
        pub value: Option<summary_value::Value>,
    }

    pub mod summary_value {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(float, tag = "2")]
            Simple(f32),
            #[prost(message, tag = "5")]
            Histo(super::HistogramProto),
            #[prost(message, tag = "8")]
            Tensor(super::TensorProto),
        }
    }

    /// `tensorboard.SummaryMetadata`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SummaryMetadata {
        #[prost(message, optional, tag = "1")]
        pub plugin_data: Option<PluginData>,
        #[prost(string, tag = "2")]
        pub display_name: String,
        #[prost(string, tag = "3")]
        pub summary_description: String,
        /// `tensorboard.DataClass`.
        #[prost(int32, tag = "4")]
        pub data_class: i32,
    }

    /// `DataClass.DATA_CLASS_TENSOR`.
    pub const DATA_CLASS_TENSOR: i32 = 2;

    /// `tensorboard.SummaryMetadata.PluginData`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PluginData {
        #[prost(string, tag = "1")]
        pub plugin_name: String,
        #[prost(bytes = "vec", tag = "2")]
        pub content: Vec<u8>,
    }

    /// `tensorboard.HistogramProto` (histogram.proto).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HistogramProto {
        #[prost(double, tag = "1")]
        pub min: f64,
        #[prost(double, tag = "2")]
        pub max: f64,
        #[prost(double, tag = "3")]
        pub num: f64,
        #[prost(double, tag = "4")]
        pub sum: f64,
        #[prost(double, tag = "5")]
        pub sum_squares: f64,
        #[prost(double, repeated, packed = "true", tag = "6")]
        pub bucket_limit: Vec<f64>,
        #[prost(double, repeated, packed = "true", tag = "7")]
        pub bucket: Vec<f64>,
    }

    /// `tensorboard.TensorProto` (tensor.proto).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        /// `tensorboard.DataType`.
        #[prost(int32, tag = "1")]
        pub dtype: i32,
        #[prost(message, optional, tag = "2")]
        pub tensor_shape: Option<TensorShapeProto>,
        #[prost(float, repeated, packed = "true", tag = "5")]
        pub float_val: Vec<f32>,
        #[prost(bytes = "vec", repeated, tag = "8")]
        pub string_val: Vec<Vec<u8>>,
    }

    /// `DataType.DT_FLOAT`.
    pub const DT_FLOAT: i32 = 1;
    /// `DataType.DT_STRING`.
    pub const DT_STRING: i32 = 7;

    /// `tensorboard.TensorShapeProto` (tensor_shape.proto).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShapeProto {
        #[prost(message, repeated, tag = "2")]
        pub dim: Vec<TensorShapeDim>,
    }

    /// `tensorboard.TensorShapeProto.Dim`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShapeDim {
        #[prost(int64, tag = "1")]
        pub size: i64,
    }

    /// `google.protobuf.Value` (struct.proto), scalar kinds only.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(oneof = "value::Kind", tags = "2, 3, 4")]
        pub kind: Option<value::Kind>,
    }

    pub mod value {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Kind {
            #[prost(double, tag = "2")]
            Number(f64),
            #[prost(string, tag = "3")]
            String(String),
            #[prost(bool, tag = "4")]
            Bool(bool),
        }
    }

    /// `tensorboard.hparams.HParamsPluginData` (hparams plugin_data.proto).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HParamsPluginData {
        #[prost(int32, tag = "1")]
        pub version: i32,
        #[prost(oneof = "hparams_plugin_data::Data", tags = "2, 3, 4")]
        pub data: Option<hparams_plugin_data::Data>,
    }

    pub mod hparams_plugin_data {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Data {
            #[prost(message, tag = "2")]
            Experiment(super::Experiment),
            #[prost(message, tag = "3")]
            SessionStartInfo(super::SessionStartInfo),
            #[prost(message, tag = "4")]
            SessionEndInfo(super::SessionEndInfo),
        }
    }

    /// `tensorboard.hparams.Experiment` (hparams api.proto).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Experiment {
        #[prost(string, tag = "6")]
        pub name: String,
        #[prost(string, tag = "1")]
        pub description: String,
        #[prost(string, tag = "2")]
        pub user: String,
        #[prost(double, tag = "3")]
        pub time_created_secs: f64,
        #[prost(message, repeated, tag = "4")]
        pub hparam_infos: Vec<HParamInfo>,
        #[prost(message, repeated, tag = "5")]
        pub metric_infos: Vec<MetricInfo>,
    }

    /// `tensorboard.hparams.HParamInfo` (without a domain).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HParamInfo {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub display_name: String,
        #[prost(string, tag = "3")]
        pub description: String,
        /// `tensorboard.hparams.DataType`.
        #[prost(int32, tag = "4")]
        pub r#type: i32,
    }

    /// `tensorboard.hparams.DataType` values.
    pub const HP_DATA_TYPE_STRING: i32 = 1;
    pub const HP_DATA_TYPE_BOOL: i32 = 2;
    pub const HP_DATA_TYPE_FLOAT64: i32 = 3;

    /// `tensorboard.hparams.MetricName`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MetricName {
        #[prost(string, tag = "1")]
        pub group: String,
        #[prost(string, tag = "2")]
        pub tag: String,
    }

    /// `tensorboard.hparams.MetricInfo`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MetricInfo {
        #[prost(message, optional, tag = "1")]
        pub name: Option<MetricName>,
        #[prost(string, tag = "3")]
        pub display_name: String,
        #[prost(string, tag = "4")]
        pub description: String,
        /// `tensorboard.hparams.DatasetType`.
        #[prost(int32, tag = "5")]
        pub dataset_type: i32,
    }

    /// `tensorboard.hparams.SessionStartInfo`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionStartInfo {
        #[prost(btree_map = "string, message", tag = "1")]
        pub hparams: BTreeMap<String, Value>,
        #[prost(string, tag = "2")]
        pub model_uri: String,
        #[prost(string, tag = "3")]
        pub monitor_url: String,
        #[prost(string, tag = "4")]
        pub group_name: String,
        #[prost(double, tag = "5")]
        pub start_time_secs: f64,
    }

    /// `tensorboard.hparams.SessionEndInfo`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionEndInfo {
        /// `tensorboard.hparams.Status`.
        #[prost(int32, tag = "1")]
        pub status: i32,
        #[prost(double, tag = "2")]
        pub end_time_secs: f64,
    }

    /// `Status.STATUS_SUCCESS`.
    pub const STATUS_SUCCESS: i32 = 1;
}

use proto::summary_value::Value as SummaryKind;

/// The file-version string TensorBoard expects in the first event of every file.
const FILE_VERSION: &str = "brain.Event:2";
/// Number of equal-width histogram buckets between the finite minimum and maximum.
const HISTOGRAM_BUCKETS: usize = 30;
const HPARAMS_PLUGIN: &str = "hparams";
const HPARAMS_EXPERIMENT_TAG: &str = "_hparams_/experiment";
const HPARAMS_SESSION_START_TAG: &str = "_hparams_/session_start_info";
const HPARAMS_SESSION_END_TAG: &str = "_hparams_/session_end_info";
const TEXT_PLUGIN: &str = "text";

/// A hyperparameter value as shown by TensorBoard's HParams dashboard.
#[derive(Debug, Clone, PartialEq)]
pub enum HParamValue {
    Number(f64),
    Text(String),
    Bool(bool),
}

/// Writes one TensorBoard event file (`events.out.tfevents.*`).
///
/// Records are buffered; call [`EventWriter::flush`] to make everything written so far durable
/// and visible to readers. Dropping the writer flushes on a best-effort basis.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
    /// Set when a write failed part-way: the file may end in a torn record, so appending more
    /// records would make them unreadable. All further writes then fail.
    failed: bool,
}

impl std::fmt::Debug for EventWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWriter")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EventWriter {
    /// Creates `dir` if needed and a new file `events.out.tfevents.<secs>.<host>.<pid>.rlprune`;
    /// writes the file_version event ("brain.Event:2").
    ///
    /// Should that name already exist (a second writer in the same directory, process and
    /// second), `.<n>` is appended to it; an existing file is never overwritten.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating TensorBoard log directory {}", dir.display()))?;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base = format!(
            "events.out.tfevents.{secs}.{}.{}.rlprune",
            hostname(),
            std::process::id()
        );
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let mut attempt = 0u32;
        let (path, file) = loop {
            let name = if attempt == 0 {
                base.clone()
            } else {
                format!("{base}.{}", SEQ.fetch_add(1, Ordering::Relaxed) + 1)
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && attempt < 1000 => attempt += 1,
                Err(e) => {
                    return Err(anyhow!(e)).with_context(|| {
                        format!("creating TensorBoard event file {}", path.display())
                    });
                }
            }
        };
        let mut writer = EventWriter {
            path,
            out: BufWriter::new(file),
            failed: false,
        };
        writer.write_event(proto::Event {
            wall_time: wall_time(),
            step: 0,
            what: Some(proto::event::What::FileVersion(FILE_VERSION.to_string())),
        })?;
        Ok(writer)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs a scalar (stored as float32, as TensorBoard does; NaN and infinities are kept).
    pub fn scalar(&mut self, tag: &str, step: i64, value: f64) -> Result<()> {
        self.write_values(
            step,
            vec![proto::SummaryValue {
                tag: tag.to_string(),
                metadata: None,
                value: Some(SummaryKind::Simple(value as f32)),
            }],
        )
    }

    /// Logs a histogram of `values` with up to 30 equal-width buckets spanning the finite min..max
    /// (bucket `i` covers `[limit[i-1], limit[i])`, the last one closed). Non-finite values are
    /// skipped; an empty (or all non-finite) input gives an empty histogram with `num = 0`.
    pub fn histogram(&mut self, tag: &str, step: i64, values: &[f64]) -> Result<()> {
        let histo = build_histogram(values);
        self.write_values(
            step,
            vec![proto::SummaryValue {
                tag: tag.to_string(),
                metadata: None,
                value: Some(SummaryKind::Histo(histo)),
            }],
        )
    }

    /// Logs a markdown text (text plugin: a scalar DT_STRING tensor).
    pub fn text(&mut self, tag: &str, step: i64, markdown: &str) -> Result<()> {
        let tensor = proto::TensorProto {
            dtype: proto::DT_STRING,
            tensor_shape: Some(proto::TensorShapeProto { dim: Vec::new() }),
            float_val: Vec::new(),
            string_val: vec![markdown.as_bytes().to_vec()],
        };
        self.write_values(
            step,
            vec![proto::SummaryValue {
                tag: tag.to_string(),
                // The text plugin's content is `TextPluginData { version: 0 }`, which encodes to
                // zero bytes.
                metadata: Some(plugin_metadata(TEXT_PLUGIN, Vec::new())),
                value: Some(SummaryKind::Tensor(tensor)),
            }],
        )
    }

    /// Writes the hparams experiment + session-start (the hparams) + session-end (status
    /// success) so the HParams dashboard shows the run with its final metrics; also writes each
    /// metric as a scalar under its tag (at `step`) so the dashboard has values.
    pub fn hparams(
        &mut self,
        hparams: &[(String, HParamValue)],
        metrics: &[(String, f64)],
        step: i64,
    ) -> Result<()> {
        use proto::hparams_plugin_data::Data;
        let now = wall_time();
        let hparam_infos = hparams
            .iter()
            .map(|(name, value)| proto::HParamInfo {
                name: name.clone(),
                display_name: String::new(),
                description: String::new(),
                r#type: match value {
                    HParamValue::Number(_) => proto::HP_DATA_TYPE_FLOAT64,
                    HParamValue::Text(_) => proto::HP_DATA_TYPE_STRING,
                    HParamValue::Bool(_) => proto::HP_DATA_TYPE_BOOL,
                },
            })
            .collect();
        let metric_infos = metrics
            .iter()
            .map(|(tag, _)| proto::MetricInfo {
                name: Some(proto::MetricName {
                    group: String::new(),
                    tag: tag.clone(),
                }),
                display_name: String::new(),
                description: String::new(),
                dataset_type: 0,
            })
            .collect();
        let experiment = Data::Experiment(proto::Experiment {
            name: String::new(),
            description: String::new(),
            user: String::new(),
            time_created_secs: now,
            hparam_infos,
            metric_infos,
        });
        let values: BTreeMap<String, proto::Value> = hparams
            .iter()
            .map(|(name, value)| {
                let kind = match value {
                    HParamValue::Number(x) => proto::value::Kind::Number(*x),
                    HParamValue::Text(s) => proto::value::Kind::String(s.clone()),
                    HParamValue::Bool(b) => proto::value::Kind::Bool(*b),
                };
                (name.clone(), proto::Value { kind: Some(kind) })
            })
            .collect();
        let start = Data::SessionStartInfo(proto::SessionStartInfo {
            hparams: values,
            model_uri: String::new(),
            monitor_url: String::new(),
            group_name: String::new(),
            start_time_secs: now,
        });
        // Metrics first, so that the dashboard finds values once the session is marked ended.
        for (tag, value) in metrics {
            self.scalar(tag, step, *value)?;
        }
        for (tag, data) in [
            (HPARAMS_EXPERIMENT_TAG, experiment),
            (HPARAMS_SESSION_START_TAG, start),
        ] {
            self.write_hparams_value(tag, data)?;
        }
        let end = Data::SessionEndInfo(proto::SessionEndInfo {
            status: proto::STATUS_SUCCESS,
            end_time_secs: wall_time(),
        });
        self.write_hparams_value(HPARAMS_SESSION_END_TAG, end)
    }

    /// Flushes the buffer and syncs the file's data to disk.
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("flushing TensorBoard event file {}", self.path.display()))?;
        self.out
            .get_ref()
            .sync_data()
            .with_context(|| format!("syncing TensorBoard event file {}", self.path.display()))
    }

    /// One hparams-plugin summary: metadata carries the `HParamsPluginData`, the value is the
    /// plugin's null tensor (an empty float32 tensor of shape `[0]`), at step 0.
    fn write_hparams_value(
        &mut self,
        tag: &str,
        data: proto::hparams_plugin_data::Data,
    ) -> Result<()> {
        let content = proto::HParamsPluginData {
            version: 0,
            data: Some(data),
        }
        .encode_to_vec();
        let null_tensor = proto::TensorProto {
            dtype: proto::DT_FLOAT,
            tensor_shape: Some(proto::TensorShapeProto {
                dim: vec![proto::TensorShapeDim { size: 0 }],
            }),
            float_val: Vec::new(),
            string_val: Vec::new(),
        };
        self.write_values(
            0,
            vec![proto::SummaryValue {
                tag: tag.to_string(),
                metadata: Some(plugin_metadata(HPARAMS_PLUGIN, content)),
                value: Some(SummaryKind::Tensor(null_tensor)),
            }],
        )
    }

    fn write_values(&mut self, step: i64, value: Vec<proto::SummaryValue>) -> Result<()> {
        self.write_event(proto::Event {
            wall_time: wall_time(),
            step,
            what: Some(proto::event::What::Summary(proto::Summary { value })),
        })
    }

    fn write_event(&mut self, event: proto::Event) -> Result<()> {
        if self.failed {
            bail!(
                "TensorBoard event file {} is unusable after an earlier write error",
                self.path.display()
            );
        }
        let record = frame_record(&event.encode_to_vec());
        if let Err(e) = self.out.write_all(&record) {
            self.failed = true;
            return Err(anyhow!(e)).with_context(|| {
                format!("writing to TensorBoard event file {}", self.path.display())
            });
        }
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        // Best effort: errors cannot be reported from here.
        let _ = self.flush();
    }
}

fn plugin_metadata(plugin_name: &str, content: Vec<u8>) -> proto::SummaryMetadata {
    proto::SummaryMetadata {
        plugin_data: Some(proto::PluginData {
            plugin_name: plugin_name.to_string(),
            content,
        }),
        display_name: String::new(),
        summary_description: String::new(),
        data_class: proto::DATA_CLASS_TENSOR,
    }
}

/// TFRecord framing of one serialized record.
fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&len);
    record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    record
}

/// The TFRecord checksum: crc32c, rotated right by 15 bits, plus a constant.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn build_histogram(values: &[f64]) -> proto::HistogramProto {
    let finite = || values.iter().copied().filter(|v| v.is_finite());
    let mut num = 0usize;
    let (mut min, mut max, mut sum, mut sum_squares) = (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0.0);
    for v in finite() {
        num += 1;
        min = min.min(v);
        max = max.max(v);
        sum += v;
        sum_squares += v * v;
    }
    if num == 0 {
        return proto::HistogramProto {
            min: 0.0,
            max: 0.0,
            num: 0.0,
            sum: 0.0,
            sum_squares: 0.0,
            bucket_limit: Vec::new(),
            bucket: Vec::new(),
        };
    }
    let buckets = if max > min { HISTOGRAM_BUCKETS } else { 1 };
    // `min + span * f` is non-decreasing in `f` (rounding is monotonic); a span that overflows
    // (values near ±f64::MAX) is handled in halves.
    let (half_min, half_span) = (min / 2.0, max / 2.0 - min / 2.0);
    let span = max - min;
    let bucket_limit: Vec<f64> = (1..=buckets)
        .map(|i| {
            if i == buckets {
                return max;
            }
            let f = i as f64 / buckets as f64;
            let edge = if span.is_finite() {
                min + span * f
            } else {
                2.0 * (half_min + half_span * f)
            };
            edge.clamp(min, max)
        })
        .collect();
    let mut bucket = vec![0.0; buckets];
    for v in finite() {
        let index = if buckets == 1 {
            0
        } else {
            let t = (v / 2.0 - half_min) / half_span;
            ((t * buckets as f64) as usize).min(buckets - 1)
        };
        bucket[index] += 1.0;
    }
    proto::HistogramProto {
        min,
        max,
        num: num as f64,
        sum,
        sum_squares,
        bucket_limit,
        bucket,
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The host name for the event file name, restricted to `[A-Za-z0-9._-]`.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_known_value() {
        // crc32c("123456789") = 0xE3069283 (the standard check value); the masked values were
        // computed independently with TensorBoard's Python `masked_crc32c`.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc32c(&0u64.to_le_bytes()), 0x0798_0329);
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
    }

    #[test]
    fn record_framing_layout() {
        let rec = frame_record(b"abc");
        assert_eq!(rec.len(), 8 + 4 + 3 + 4);
        assert_eq!(&rec[..8], &3u64.to_le_bytes());
        assert_eq!(
            &rec[8..12],
            &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes()
        );
        assert_eq!(&rec[12..15], b"abc");
        assert_eq!(&rec[15..], &masked_crc32c(b"abc").to_le_bytes());
    }

    #[test]
    fn histogram_skips_non_finite_and_counts_everything() {
        let h = build_histogram(&[1.0, f64::NAN, 2.0, f64::INFINITY, 3.0, -f64::INFINITY]);
        assert_eq!(
            (h.min, h.max, h.num, h.sum, h.sum_squares),
            (1.0, 3.0, 3.0, 6.0, 14.0)
        );
        assert_eq!(h.bucket.len(), HISTOGRAM_BUCKETS);
        assert_eq!(h.bucket.iter().sum::<f64>(), 3.0);
        assert_eq!(*h.bucket_limit.last().unwrap(), 3.0);
        assert!(h.bucket_limit.windows(2).all(|w| w[0] <= w[1]));

        let h = build_histogram(&[f64::MAX, -f64::MAX, 0.0]);
        assert_eq!(h.bucket.iter().sum::<f64>(), 3.0);
        assert!(h.bucket_limit.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(
            (
                h.bucket[0],
                h.bucket[HISTOGRAM_BUCKETS / 2],
                h.bucket[HISTOGRAM_BUCKETS - 1]
            ),
            (1.0, 1.0, 1.0)
        );

        let h = build_histogram(&[5.0, 5.0]);
        assert_eq!(
            (h.bucket_limit.clone(), h.bucket.clone()),
            (vec![5.0], vec![2.0])
        );

        let h = build_histogram(&[f64::NAN]);
        assert_eq!(h.num, 0.0);
        assert!(h.bucket.is_empty());
    }
}
