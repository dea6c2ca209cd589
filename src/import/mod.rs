//! Reference PyTorch weights: `.safetensors` files and `torch.save` zip checkpoints
//! (`.pth`/`.pt`), read without executing any pickle code.
//!
//! Everything comes out as a [`StateDict`] of f32 [`HostTensor`]s keyed by the reference
//! `state_dict` names, ready for [`crate::nn::params::load_strict`]. The format is detected from
//! the content, not the extension: a zip archive (`PK\x03\x04`) is a PyTorch checkpoint, a
//! little-endian header length followed by a JSON header is safetensors.
//!
//! The `.pth` reader ([`read_pth`]) runs the archive's `data.pkl` on a small pickle VM
//! (`pickle.rs`) that resolves only the tensor-rebuild globals in [`ALLOWED_GLOBALS`] and
//! implements them natively; anything else (`os.system`, `builtins.eval`, a pickled
//! `nn.Module` class) is refused by name before it could matter.

mod pickle;
mod pth;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::nn::params::{HostTensor, StateDict};

pub use pickle::{ALLOWED_GLOBALS, SUPPORTED_OPCODES};
pub use pth::read_pth;

/// The element type a tensor had in the file, before conversion to f32.
///
/// Integer and bool tensors (BatchNorm's `num_batches_tracked`, index buffers) are converted to
/// f32 too, exactly up to 2^24; [`read_weights_with_dtypes`] says which tensors they were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceDtype {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl SourceDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            SourceDtype::F64 | SourceDtype::I64 => 8,
            SourceDtype::F32 | SourceDtype::I32 => 4,
            SourceDtype::F16 | SourceDtype::BF16 | SourceDtype::I16 => 2,
            SourceDtype::I8 | SourceDtype::U8 | SourceDtype::Bool => 1,
        }
    }

    /// PyTorch's name (`float32`, `int64`, ...).
    pub fn name(self) -> &'static str {
        match self {
            SourceDtype::F32 => "float32",
            SourceDtype::F64 => "float64",
            SourceDtype::F16 => "float16",
            SourceDtype::BF16 => "bfloat16",
            SourceDtype::I64 => "int64",
            SourceDtype::I32 => "int32",
            SourceDtype::I16 => "int16",
            SourceDtype::I8 => "int8",
            SourceDtype::U8 => "uint8",
            SourceDtype::Bool => "bool",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, SourceDtype::F32 | SourceDtype::F64 | SourceDtype::F16 | SourceDtype::BF16)
    }

    /// Decodes one element from its bytes (`bytes.len() == self.size()`).
    fn decode(self, b: &[u8], big_endian: bool) -> f32 {
        macro_rules! num {
            ($t:ty) => {{
                let a = b.try_into().expect("element width");
                if big_endian { <$t>::from_be_bytes(a) } else { <$t>::from_le_bytes(a) }
            }};
        }
        match self {
            SourceDtype::F32 => num!(f32),
            SourceDtype::F64 => num!(f64) as f32,
            SourceDtype::F16 => f16_to_f32(num!(u16)),
            SourceDtype::BF16 => bf16_to_f32(num!(u16)),
            SourceDtype::I64 => num!(i64) as f32,
            SourceDtype::I32 => num!(i32) as f32,
            SourceDtype::I16 => num!(i16) as f32,
            SourceDtype::I8 => b[0] as i8 as f32,
            SourceDtype::U8 => b[0] as f32,
            SourceDtype::Bool => (b[0] != 0) as u8 as f32,
        }
    }

    /// Decodes a contiguous little- or big-endian run of elements.
    fn decode_all(self, bytes: &[u8], big_endian: bool, out: &mut Vec<f32>) {
        out.extend(bytes.chunks_exact(self.size()).map(|c| self.decode(c, big_endian)));
    }
}

impl std::fmt::Display for SourceDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// IEEE half precision to f32, exactly (subnormals, infinities and NaN included).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    if exp == 0 {
        // Zero or subnormal: mant * 2^-24, exact in f32.
        let v = mant as f32 * (1.0 / 16_777_216.0);
        if sign != 0 { -v } else { v }
    } else if exp == 31 {
        f32::from_bits(sign | 0x7f80_0000 | (mant << 13))
    } else {
        f32::from_bits(sign | ((exp + 112) << 23) | (mant << 13))
    }
}

/// bfloat16 to f32 (exact: bf16 is the upper half of an f32).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Reads tensors from `.safetensors` or a PyTorch zip checkpoint (by content: zip magic
/// "PK\x03\x04" vs safetensors header), converting f16/bf16/f64/f32 to f32. Errors name the
/// file and the key/offset.
pub fn read_weights(path: &Path) -> Result<StateDict> {
    Ok(read_weights_with_dtypes(path)?.0)
}

/// [`read_weights`], also telling each tensor's dtype in the file (to tell integer buffers
/// such as `num_batches_tracked` from parameters).
pub fn read_weights_with_dtypes(path: &Path) -> Result<(StateDict, BTreeMap<String, SourceDtype>)> {
    let mut head = [0u8; 16];
    let n = {
        let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        read_up_to(&mut f, &mut head).with_context(|| format!("{}: cannot read", path.display()))?
    };
    let head = &head[..n];
    match detect(head) {
        Format::Zip => pth::read_pth_with_dtypes(path),
        Format::Safetensors => read_safetensors_with_dtypes(path),
        Format::LegacyPickle => bail!(
            "{}: this is a legacy (pre-zip, torch < 1.6) torch.save file, which is not \
             supported; re-save it with a recent torch or convert it to safetensors",
            path.display()
        ),
        Format::Unknown => bail!(
            "{}: unrecognised weights format (neither a safetensors file nor a PyTorch zip \
             checkpoint; first bytes {:02x?})",
            path.display(),
            &head[..head.len().min(8)]
        ),
    }
}

enum Format {
    Zip,
    Safetensors,
    LegacyPickle,
    Unknown,
}

fn detect(head: &[u8]) -> Format {
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Format::Zip;
    }
    if head.len() >= 9 && head[8] == b'{' {
        return Format::Safetensors;
    }
    // A pickle starts with PROTO; the legacy format starts with a pickled magic number.
    if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Format::LegacyPickle;
    }
    Format::Unknown
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn safetensors_dtype(d: Dtype) -> Option<SourceDtype> {
    Some(match d {
        Dtype::F32 => SourceDtype::F32,
        Dtype::F64 => SourceDtype::F64,
        Dtype::F16 => SourceDtype::F16,
        Dtype::BF16 => SourceDtype::BF16,
        Dtype::I64 => SourceDtype::I64,
        Dtype::I32 => SourceDtype::I32,
        Dtype::I16 => SourceDtype::I16,
        Dtype::I8 => SourceDtype::I8,
        Dtype::U8 => SourceDtype::U8,
        Dtype::BOOL => SourceDtype::Bool,
        _ => return None,
    })
}

/// Reads every tensor of a safetensors file as f32.
pub fn read_safetensors(path: &Path) -> Result<StateDict> {
    Ok(read_safetensors_with_dtypes(path)?.0)
}

fn read_safetensors_with_dtypes(path: &Path) -> Result<(StateDict, BTreeMap<String, SourceDtype>)> {
    let bytes = fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let mut dict = StateDict::new();
    let mut dtypes = BTreeMap::new();
    for (name, view) in st.iter() {
        let dtype = safetensors_dtype(view.dtype()).ok_or_else(|| {
            anyhow!("{}: tensor '{name}': unsupported dtype {}", path.display(), view.dtype())
        })?;
        let mut data = Vec::with_capacity(view.data().len() / dtype.size());
        dtype.decode_all(view.data(), false, &mut data);
        dict.insert(name.to_string(), HostTensor::new(view.shape().to_vec(), data));
        dtypes.insert(name.to_string(), dtype);
    }
    Ok((dict, dtypes))
}

/// Reads one named tensor of a safetensors file (e.g. `input` of a parity fixture).
pub fn read_tensor(path: &Path, name: &str) -> Result<HostTensor> {
    let mut dict = read_safetensors(path)?;
    dict.remove(name).ok_or_else(|| {
        let names: Vec<&str> = dict.keys().map(String::as_str).collect();
        anyhow!("{}: no tensor '{name}' (it holds: {})", path.display(), names.join(", "))
    })
}

/// Safetensors caps its JSON header at 100 MB; so do we.
const MAX_HEADER: u64 = 100_000_000;

/// The string metadata (`__metadata__`) of a safetensors file, reading only its header.
pub fn read_safetensors_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let p = path.display();
    let mut f = File::open(path).with_context(|| format!("{p}: cannot open"))?;
    let file_len = f.metadata().with_context(|| format!("{p}: cannot stat"))?.len();
    let mut len = [0u8; 8];
    if read_up_to(&mut f, &mut len).with_context(|| format!("{p}: cannot read"))? < 8 {
        bail!("{p}: not a valid safetensors file: shorter than its 8-byte header length");
    }
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n > file_len.saturating_sub(8) {
        bail!(
            "{p}: not a valid safetensors file: header length {n} exceeds the file ({file_len} bytes)"
        );
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).with_context(|| format!("{p}: cannot read the header"))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| anyhow!("{p}: not a valid safetensors file: header is not JSON ({e})"))?;
    let mut out = BTreeMap::new();
    if let Some(meta) = json.get("__metadata__") {
        let obj =
            meta.as_object().ok_or_else(|| anyhow!("{p}: __metadata__ is not a JSON object"))?;
        for (k, v) in obj {
            let v = v.as_str().ok_or_else(|| anyhow!("{p}: __metadata__ '{k}' is not a string"))?;
            out.insert(k.clone(), v.to_string());
        }
    }
    Ok(out)
}

/// Removes entries the model loader ignores: BatchNorm's `*.num_batches_tracked` counters.
pub fn drop_ignored_keys(dict: &mut StateDict) {
    dict.retain(|k, _| k != "num_batches_tracked" && !k.ends_with(".num_batches_tracked"));
}

/// Model weights from a safetensors or `.pth` file ([`read_weights`]) without the entries the
/// loader ignores, refusing integer or boolean tensors: they are buffers or data, never
/// parameters, and read as floats they would load silently as nonsense weights.
pub fn read_model_weights(path: &Path) -> Result<StateDict> {
    let (mut dict, dtypes) = read_weights_with_dtypes(path)?;
    drop_ignored_keys(&mut dict);
    if let Some((k, d)) = dtypes.iter().find(|(k, d)| dict.contains_key(k.as_str()) && !d.is_float()) {
        bail!("{}: tensor {k} is {d}, not a floating-point type: model weights must be f32, f64, f16 or bf16", path.display());
    }
    Ok(dict)
}

struct F32View<'a>(&'a HostTensor);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        self.0.data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()
    }
    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

/// An integer tensor to write next to the float ones (e.g. DynamicViT's kept indices).
#[derive(Debug, Clone, PartialEq)]
pub struct IntTensor {
    pub shape: Vec<usize>,
    pub data: Vec<i64>,
}

struct I64View<'a>(&'a IntTensor);

impl View for I64View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::I64
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        self.0.data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()
    }
    fn data_len(&self) -> usize {
        self.0.data.len() * 8
    }
}

/// A tensor view of either kind, for one `serialize` call.
enum AnyView<'a> {
    F32(F32View<'a>),
    I64(I64View<'a>),
}

impl View for AnyView<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            Self::F32(v) => v.dtype(),
            Self::I64(v) => v.dtype(),
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            Self::F32(v) => v.shape(),
            Self::I64(v) => v.shape(),
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Self::F32(v) => v.data(),
            Self::I64(v) => v.data(),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            Self::F32(v) => v.data_len(),
            Self::I64(v) => v.data_len(),
        }
    }
}

/// Writes a StateDict as safetensors atomically (see [`crate::fsutil::atomic_write`]):
/// on error the previous file at `path`, if any, is untouched and no temp file is left behind.
pub fn write_safetensors(
    path: &Path,
    dict: &StateDict,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_safetensors_with_ints(path, dict, &BTreeMap::new(), metadata)
}

/// [`write_safetensors`] plus int64 tensors (names must not collide with `dict`'s).
pub fn write_safetensors_with_ints(
    path: &Path,
    dict: &StateDict,
    ints: &BTreeMap<String, IntTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let p = path.display();
    let shapes = dict.iter().map(|(k, t)| (k, &t.shape, t.data.len())).chain(ints.iter().map(|(k, t)| (k, &t.shape, t.data.len())));
    for (k, shape, len) in shapes {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n != Some(len) {
            bail!("{p}: tensor '{k}': shape {shape:?} does not match its {len} values");
        }
        if dict.contains_key(k) && ints.contains_key(k) {
            bail!("{p}: tensor '{k}' given twice");
        }
    }
    let views = dict
        .iter()
        .map(|(k, t)| (k.as_str(), AnyView::F32(F32View(t))))
        .chain(ints.iter().map(|(k, t)| (k.as_str(), AnyView::I64(I64View(t)))));
    let bytes = safetensors::tensor::serialize(views, None::<HashMap<String, String>>)
        .with_context(|| format!("{p}: cannot serialise safetensors"))?;
    let bytes = with_sorted_metadata(bytes, metadata).with_context(|| format!("{p}: cannot serialise safetensors"))?;
    crate::fsutil::atomic_write(path, &bytes).with_context(|| format!("{p}: cannot write safetensors"))
}

/// Adds `metadata` to a serialised safetensors file's header in sorted order, so identical
/// contents give identical files (the `safetensors` crate writes it from a `HashMap`, in an
/// order that changes from process to process).
fn with_sorted_metadata(bytes: Vec<u8>, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    if metadata.is_empty() {
        return Ok(bytes);
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().context("short safetensors buffer")?) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n])?;
    let mut text = String::from("{\"__metadata__\":");
    text.push_str(&serde_json::to_string(metadata)?);
    for (k, v) in &header {
        text.push(',');
        text.push_str(&serde_json::to_string(k)?);
        text.push(':');
        text.push_str(&serde_json::to_string(v)?);
    }
    text.push('}');
    // The data section starts 8-byte aligned, as the format's writer pads it.
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}
