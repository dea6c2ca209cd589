//! `torch.save` zip checkpoints (`.pth`/`.pt`, torch >= 1.6).
//!
//! Layout: `<archive>/data.pkl` (the pickled object), `<archive>/data/<key>` (raw storages, one
//! per storage key), `<archive>/version`, and sometimes `<archive>/byteorder` (`little`/`big`).
//! The pickle is run on the restricted VM of `pickle.rs`, which yields tensor *descriptions*
//! (storage key, dtype, offset, size, stride); the storages are then read here and every view
//! is copied out contiguously as f32.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result, anyhow, bail};
use zip::ZipArchive;
use zip::result::ZipError;

use super::SourceDtype;
use super::pickle::{self, TensorRef, Value};
use crate::nn::params::{HostTensor, StateDict};

/// A state dict's pickle is small; this bounds what a corrupt or hostile archive can make us
/// allocate for it.
const MAX_PICKLE_BYTES: u64 = 1 << 30;
/// All entries together may inflate to at most this multiple of the archive's size, plus
/// [`INFLATION_SLACK`]. `torch.save` stores entries uncompressed, so a real checkpoint is near
/// 1; a compressed bomb is refused from the declared sizes, before anything is inflated.
const MAX_INFLATION: u64 = 16;
const INFLATION_SLACK: u64 = 1 << 20;
/// A view with more elements than its storage (stride 0, i.e. `expand`) may not exceed this.
const MAX_EXPANDED_NUMEL: usize = 1 << 26;

/// Reads the tensors of a PyTorch zip checkpoint. The state dict is the top-level dict, or its
/// `"model"` entry, or else its `"state_dict"` entry, when that entry is a dict (as official
/// releases and training checkpoints ship). Non-tensor entries are skipped.
pub fn read_pth(path: &Path) -> Result<StateDict> {
    Ok(read_pth_with_dtypes(path)?.0)
}

type Archive = ZipArchive<BufReader<File>>;

pub(crate) fn read_pth_with_dtypes(
    path: &Path,
) -> Result<(StateDict, BTreeMap<String, SourceDtype>)> {
    let p = path.display();
    let file = File::open(path).with_context(|| format!("{p}: cannot open"))?;
    let file_len = file.metadata().with_context(|| format!("{p}: cannot read"))?.len();
    let mut zip = ZipArchive::new(BufReader::new(file)).map_err(|e| {
        anyhow!("{p}: not a readable zip archive, the file may be truncated or corrupt ({e})")
    })?;
    check_inflation(&mut zip, file_len).map_err(|e| anyhow!("{p}: {e}"))?;

    let pkl_name = find_pickle(&zip).map_err(|e| anyhow!("{p}: {e}"))?;
    let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();
    let pkl =
        read_entry(&mut zip, &pkl_name, Some((MAX_PICKLE_BYTES, "a pickle"))).map_err(|e| anyhow!("{p}: {e}"))?;
    let big_endian =
        byte_order(&mut zip, &format!("{prefix}byteorder")).map_err(|e| anyhow!("{p}: {e}"))?;

    let root = pickle::load(&pkl).map_err(|e| anyhow!("{p}: {pkl_name}: {e}"))?;
    let tensors = select_tensors(&root).map_err(|e| anyhow!("{p}: {pkl_name}: {e}"))?;

    // Storages may back several tensors (views, tied weights): read each once, drop it after
    // its last use.
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for (_, t) in &tensors {
        *uses.entry(t.storage.key.as_str()).or_default() += 1;
    }
    let mut cache: HashMap<&str, Vec<u8>> = HashMap::new();
    let mut dict = StateDict::new();
    let mut dtypes = BTreeMap::new();
    for (name, t) in &tensors {
        let key = t.storage.key.as_str();
        let entry = format!("{prefix}data/{key}");
        if !cache.contains_key(key) {
            // The pickle declares each storage's size: an entry that would inflate beyond it
            // is refused before it is read.
            let declared = t.storage.numel.saturating_mul(t.storage.dtype.size()) as u64;
            let what = format!("the pickle's {} {} elements", t.storage.numel, t.storage.dtype);
            let bytes = match read_entry(&mut zip, &entry, Some((declared, what.as_str()))) {
                Ok(b) => b,
                Err(e) => bail!("{p}: {e} (storage of tensor '{name}')"),
            };
            cache.insert(key, bytes);
        }
        let data = materialize(t, &cache[key], big_endian)
            .map_err(|e| anyhow!("{p}: tensor '{name}' (storage '{entry}'): {e}"))?;
        dict.insert(name.clone(), HostTensor::new(t.size.clone(), data));
        dtypes.insert(name.clone(), t.storage.dtype);
        let n = uses.get_mut(key).expect("counted above");
        *n -= 1;
        if *n == 0 {
            cache.remove(key);
        }
    }
    Ok((dict, dtypes))
}

fn find_pickle(zip: &Archive) -> Result<String> {
    let found: Vec<&str> =
        zip.file_names().filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl")).collect();
    match found.as_slice() {
        [one] => Ok(one.to_string()),
        [] => {
            let mut names: Vec<&str> = zip.file_names().take(6).collect();
            names.sort_unstable();
            bail!(
                "no data.pkl in the zip archive, so it is not a PyTorch checkpoint (entries: {})",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            )
        }
        many => bail!("several data.pkl entries in the zip archive: {}", many.join(", ")),
    }
}

/// Refuses an archive whose entries declare more inflated bytes than [`MAX_INFLATION`] times
/// its size. Each read is then bounded by its entry's declared size, so what the archive can
/// make us allocate is bounded however its headers lie.
fn check_inflation(zip: &mut Archive, file_len: u64) -> Result<()> {
    let cap = file_len.saturating_mul(MAX_INFLATION).saturating_add(INFLATION_SLACK);
    let mut total = 0u64;
    for i in 0..zip.len() {
        let e = zip.by_index_raw(i).map_err(|e| anyhow!("cannot read zip entry {i}: {e}"))?;
        total = total.saturating_add(e.size());
    }
    if total > cap {
        bail!(
            "the zip entries declare {total} bytes once inflated, more than {MAX_INFLATION} times the \
             file's {file_len} bytes; refused before inflating (a zip bomb, or not a torch.save checkpoint)"
        );
    }
    Ok(())
}

/// Reads a zip entry whole; with `limit`, an entry declaring more bytes than `limit.0` (what
/// `limit.1` allows) is refused before it is inflated.
fn read_entry(zip: &mut Archive, name: &str, limit: Option<(u64, &str)>) -> Result<Vec<u8>> {
    let entry = match zip.by_name(name) {
        Ok(e) => e,
        Err(ZipError::FileNotFound) => bail!("zip entry '{name}' is missing"),
        Err(e) => bail!("cannot read zip entry '{name}': {e}"),
    };
    let size = entry.size();
    if let Some((limit, what)) = limit
        && size > limit
    {
        bail!("zip entry '{name}' inflates to {size} bytes, more than {what} allow ({limit} bytes)");
    }
    // The declared size only sizes the first allocation; reading stops at the real end.
    let mut buf = Vec::with_capacity(size.min(1 << 28) as usize);
    entry
        .take(size)
        .read_to_end(&mut buf)
        .map_err(|e| anyhow!("cannot read zip entry '{name}': {e}"))?;
    if (buf.len() as u64) != size {
        bail!("zip entry '{name}' is truncated ({} of {size} bytes)", buf.len());
    }
    Ok(buf)
}

fn byte_order(zip: &mut Archive, name: &str) -> Result<bool> {
    if zip.by_name(name).is_err() {
        return Ok(false); // files from before torch wrote it are little-endian
    }
    let b = read_entry(zip, name, Some((64, "a byte order")))?;
    match std::str::from_utf8(&b).map(str::trim) {
        Ok("little") => Ok(false),
        Ok("big") => Ok(true),
        _ => bail!("zip entry '{name}' names no byte order: {:?}", String::from_utf8_lossy(&b)),
    }
}

/// The (name, tensor) pairs of the state dict inside the unpickled object.
fn select_tensors(root: &Value) -> Result<Vec<(String, Rc<TensorRef>)>> {
    let Value::Dict(top) = root else {
        bail!(
            "expected a state dict (a dict of tensors) at the top level, found a {}",
            root.kind()
        );
    };
    let nested = {
        let top = top.borrow();
        ["model", "state_dict"].iter().find_map(|k| match top.get(k) {
            Some(Value::Dict(d)) => Some(d.clone()),
            _ => None,
        })
    };
    let dict = nested.unwrap_or_else(|| top.clone());
    let dict = dict.borrow();
    let mut out = Vec::new();
    for (k, v) in &dict.items {
        let Value::Tensor(t) = v else { continue };
        match k {
            Value::Str(k) => out.push((k.to_string(), t.clone())),
            other => bail!("a tensor is keyed by a {}, not a str", other.kind()),
        }
    }
    if out.is_empty() {
        let keys: Vec<String> = dict
            .items
            .iter()
            .take(10)
            .map(|(k, v)| match k {
                Value::Str(s) => format!("'{s}' ({})", v.kind()),
                other => other.kind().to_string(),
            })
            .collect();
        bail!("no tensors found in the checkpoint (keys: {})", keys.join(", "));
    }
    Ok(out)
}

fn checked_numel(size: &[usize]) -> Option<usize> {
    size.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Copies the strided view `t` of `bytes` out as a contiguous f32 vector.
fn materialize(t: &TensorRef, bytes: &[u8], big_endian: bool) -> Result<Vec<f32>> {
    let s = &t.storage;
    let es = s.dtype.size();
    let declared =
        s.numel.checked_mul(es).ok_or_else(|| anyhow!("storage size {} overflows", s.numel))?;
    if bytes.len() < declared {
        bail!(
            "storage holds {} bytes but the checkpoint declares {} {} elements ({declared} bytes)",
            bytes.len(),
            s.numel,
            s.dtype
        );
    }
    let numel = checked_numel(&t.size).ok_or_else(|| anyhow!("size {:?} overflows", t.size))?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    let mut last = t.offset;
    for (&n, &st) in t.size.iter().zip(&t.stride) {
        last = (n - 1)
            .checked_mul(st)
            .and_then(|x| last.checked_add(x))
            .ok_or_else(|| anyhow!("view (size {:?}, stride {:?}) overflows", t.size, t.stride))?;
    }
    if last >= s.numel {
        bail!(
            "view at offset {} with size {:?} and stride {:?} reaches element {last}, beyond the \
             storage's {} elements",
            t.offset,
            t.size,
            t.stride,
            s.numel
        );
    }
    if numel > s.numel && numel > MAX_EXPANDED_NUMEL {
        bail!("expanded view of {numel} elements over a storage of {} is too large", s.numel);
    }

    let mut out = Vec::with_capacity(numel);
    if is_contiguous(&t.size, &t.stride) {
        s.dtype.decode_all(&bytes[t.offset * es..(t.offset + numel) * es], big_endian, &mut out);
        return Ok(out);
    }
    // Odometer over the multi-index, keeping the linear storage index in step.
    let nd = t.size.len();
    let mut idx = vec![0usize; nd];
    let mut lin = t.offset;
    for _ in 0..numel {
        out.push(s.dtype.decode(&bytes[lin * es..(lin + 1) * es], big_endian));
        let mut d = nd;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            lin += t.stride[d];
            if idx[d] < t.size[d] {
                break;
            }
            lin -= t.stride[d] * t.size[d];
            idx[d] = 0;
        }
    }
    Ok(out)
}

/// Row-major contiguous, ignoring the stride of size-1 dimensions (as torch does).
fn is_contiguous(size: &[usize], stride: &[usize]) -> bool {
    let mut expect = 1usize;
    for (&n, &st) in size.iter().zip(stride).rev() {
        if n != 1 && st != expect {
            return false;
        }
        expect *= n;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::pickle::StorageRef;

    fn view(numel: usize, offset: usize, size: &[usize], stride: &[usize]) -> TensorRef {
        TensorRef {
            storage: Rc::new(StorageRef { key: "0".into(), dtype: SourceDtype::F32, numel }),
            offset,
            size: size.to_vec(),
            stride: stride.to_vec(),
        }
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    #[test]
    fn transposed_and_offset_views() {
        let b = bytes(12);
        // 3x4 storage viewed as its 4x3 transpose.
        let t = materialize(&view(12, 0, &[4, 3], &[1, 4]), &b, false).unwrap();
        assert_eq!(t, vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]);
        // Column 1 of the 3x4 matrix.
        let t = materialize(&view(12, 1, &[3], &[4]), &b, false).unwrap();
        assert_eq!(t, vec![1., 5., 9.]);
        // Scalar and broadcast (stride 0).
        assert_eq!(materialize(&view(12, 7, &[], &[]), &b, false).unwrap(), vec![7.]);
        assert_eq!(
            materialize(&view(12, 2, &[2, 2], &[0, 1]), &b, false).unwrap(),
            vec![2., 3., 2., 3.]
        );
    }

    #[test]
    fn out_of_bounds_views_are_errors() {
        let b = bytes(12);
        assert!(materialize(&view(12, 10, &[3], &[1]), &b, false).is_err());
        assert!(materialize(&view(12, 0, &[4, 3], &[4, 1]), &b, false).is_err());
        assert!(materialize(&view(13, 0, &[13], &[1]), &b, false).is_err()); // storage too short
        assert!(materialize(&view(12, 0, &[usize::MAX, 2], &[1, 1]), &b, false).is_err());
        assert!(materialize(&view(12, 0, &[1 << 40], &[0]), &b, false).is_err());
    }
}
