//! A restricted pickle virtual machine for the `data.pkl` of PyTorch checkpoints.
//!
//! It understands the data opcodes that `torch.save` emits (protocol 2, and protocol 4/5 for
//! files saved with a newer `pickle_protocol`), and nothing that constructs arbitrary objects.
//! `GLOBAL`/`STACK_GLOBAL` resolve only names in [`ALLOWED_GLOBALS`]; any other name stops the
//! load before anything else happens. `REDUCE`, `NEWOBJ` and `BUILD` never call Python: each
//! allowed callable is implemented natively here (building a dict, describing a tensor view of a
//! storage). Storage bytes are not touched: a tensor is only a description (`TensorRef`) that
//! `pth.rs` materialises from the zip archive.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{Result, anyhow, bail};

use super::SourceDtype;

/// Every global a checkpoint may name, as `module.name`. Anything else is refused.
pub const ALLOWED_GLOBALS: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
    "torch.Tensor",
    "torch._tensor.Tensor",
    "torch.nn.parameter.Parameter",
    "torch.FloatStorage",
    "torch.DoubleStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
    "torch.UntypedStorage",
    "torch.float32",
    "torch.float",
    "torch.float64",
    "torch.double",
    "torch.float16",
    "torch.half",
    "torch.bfloat16",
    "torch.int64",
    "torch.long",
    "torch.int32",
    "torch.int",
    "torch.int16",
    "torch.short",
    "torch.int8",
    "torch.uint8",
    "torch.bool",
    "_codecs.encode",
    "argparse.Namespace",
];

/// An allowlisted global, resolved to what it means to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// `torch.Tensor` / `torch.nn.parameter.Parameter`: only an argument of `_rebuild_from_type_v2`.
    TensorClass,
    /// A storage class (`torch.FloatStorage`, ...); `UntypedStorage` holds bytes (`U8`).
    StorageClass(SourceDtype),
    /// A dtype value (`torch.float32`, ...): inert data.
    Dtype(SourceDtype),
    /// `_codecs.encode(str, encoding)`: how protocol 2 spells a `bytes` object.
    CodecsEncode,
    /// `argparse.Namespace`: training arguments stored next to the weights; kept opaque.
    Namespace,
}

fn resolve_global(module: &str, name: &str) -> Option<Global> {
    use SourceDtype as D;
    let g = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch", "Tensor") | ("torch._tensor", "Tensor") | ("torch.nn.parameter", "Parameter") => {
            Global::TensorClass
        }
        ("torch", "FloatStorage") => Global::StorageClass(D::F32),
        ("torch", "DoubleStorage") => Global::StorageClass(D::F64),
        ("torch", "HalfStorage") => Global::StorageClass(D::F16),
        ("torch", "BFloat16Storage") => Global::StorageClass(D::BF16),
        ("torch", "LongStorage") => Global::StorageClass(D::I64),
        ("torch", "IntStorage") => Global::StorageClass(D::I32),
        ("torch", "ShortStorage") => Global::StorageClass(D::I16),
        ("torch", "CharStorage") => Global::StorageClass(D::I8),
        ("torch", "ByteStorage") | ("torch", "UntypedStorage") => Global::StorageClass(D::U8),
        ("torch", "BoolStorage") => Global::StorageClass(D::Bool),
        ("torch", "float32") | ("torch", "float") => Global::Dtype(D::F32),
        ("torch", "float64") | ("torch", "double") => Global::Dtype(D::F64),
        ("torch", "float16") | ("torch", "half") => Global::Dtype(D::F16),
        ("torch", "bfloat16") => Global::Dtype(D::BF16),
        ("torch", "int64") | ("torch", "long") => Global::Dtype(D::I64),
        ("torch", "int32") | ("torch", "int") => Global::Dtype(D::I32),
        ("torch", "int16") | ("torch", "short") => Global::Dtype(D::I16),
        ("torch", "int8") => Global::Dtype(D::I8),
        ("torch", "uint8") => Global::Dtype(D::U8),
        ("torch", "bool") => Global::Dtype(D::Bool),
        ("_codecs", "encode") => Global::CodecsEncode,
        ("argparse", "Namespace") => Global::Namespace,
        _ => return None,
    };
    Some(g)
}

/// One storage referenced by a persistent id: the file `data/<key>` of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    pub key: String,
    pub dtype: SourceDtype,
    /// Elements of `dtype` that the storage holds, as the pickle declares.
    pub numel: usize,
}

/// A strided view of a storage, in elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

/// Keys that Python hashes by value; other keys are kept in insertion order without lookup.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum HashKey {
    Str(Rc<str>),
    Int(i64),
    None,
}

#[derive(Debug, Default)]
pub(crate) struct Dict {
    pub items: Vec<(Value, Value)>,
    index: HashMap<HashKey, usize>,
}

impl Dict {
    fn insert(&mut self, key: Value, value: Value) {
        let hk = match &key {
            Value::Str(s) => Some(HashKey::Str(s.clone())),
            Value::Int(i) => Some(HashKey::Int(*i)),
            Value::Bool(b) => Some(HashKey::Int(*b as i64)),
            Value::None => Some(HashKey::None),
            _ => None,
        };
        match hk {
            Some(hk) => match self.index.get(&hk) {
                Some(&i) => self.items[i].1 = value,
                None => {
                    self.index.insert(hk, self.items.len());
                    self.items.push((key, value));
                }
            },
            None => self.items.push((key, value)),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        let i = *self.index.get(&HashKey::Str(Rc::from(key)))?;
        Some(&self.items[i].1)
    }
}

/// A value on the pickle stack. Lists and dicts are shared (memo entries alias them, as in
/// Python); everything else is immutable.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Value]>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Dict>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// An allowed object whose content we do not need (`argparse.Namespace`).
    Opaque(&'static str),
}

/// Dropping a value frees its containers iteratively: a hostile pickle can nest lists or tuples
/// a million deep in a few megabytes, and the default recursive drop would overflow the stack.
impl Drop for Value {
    fn drop(&mut self) {
        let mut work = Vec::new();
        self.take_children(&mut work);
        while let Some(mut v) = work.pop() {
            v.take_children(&mut work);
        }
    }
}

impl Value {
    /// Moves the children of a container that only this value owns into `out`.
    fn take_children(&mut self, out: &mut Vec<Value>) {
        match self {
            Value::List(l) => {
                if let Some(cell) = Rc::get_mut(l) {
                    out.append(cell.get_mut());
                }
            }
            Value::Dict(d) => {
                if let Some(cell) = Rc::get_mut(d) {
                    let d = cell.get_mut();
                    d.index.clear();
                    for (k, v) in d.items.drain(..) {
                        out.push(k);
                        out.push(v);
                    }
                }
            }
            Value::Tuple(t) => {
                if let Some(items) = Rc::get_mut(t) {
                    out.extend(items.iter_mut().map(|x| std::mem::replace(x, Value::None)));
                }
            }
            _ => {}
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
            Value::Opaque(name) => name,
        }
    }
}

const MAX_PROTOCOL: u8 = 5;

/// The name of a pickle opcode, for error messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

/// The opcodes [`load`] executes.
pub const SUPPORTED_OPCODES: &[&str] = &[
    "PROTO",
    "FRAME",
    "STOP",
    "MARK",
    "POP",
    "POP_MARK",
    "DUP",
    "NONE",
    "NEWTRUE",
    "NEWFALSE",
    "INT",
    "BININT",
    "BININT1",
    "BININT2",
    "LONG1",
    "LONG4",
    "BINFLOAT",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
    "BINSTRING",
    "SHORT_BINSTRING",
    "BINBYTES",
    "SHORT_BINBYTES",
    "BINBYTES8",
    "EMPTY_TUPLE",
    "TUPLE",
    "TUPLE1",
    "TUPLE2",
    "TUPLE3",
    "EMPTY_LIST",
    "LIST",
    "APPEND",
    "APPENDS",
    "EMPTY_DICT",
    "DICT",
    "SETITEM",
    "SETITEMS",
    "BINPUT",
    "LONG_BINPUT",
    "MEMOIZE",
    "BINGET",
    "LONG_BINGET",
    "BINPERSID",
    "GLOBAL",
    "STACK_GLOBAL",
    "REDUCE",
    "NEWOBJ",
    "BUILD",
];

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            anyhow!(
                "truncated pickle: {n} bytes needed at byte {} but only {} remain",
                self.pos,
                self.data.len() - self.pos
            )
        })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn len_u64(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| anyhow!("length {n} does not fit in memory"))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow!("truncated pickle: unterminated line at byte {}", self.pos))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| anyhow!("invalid UTF-8 in line at byte {}", self.pos))?;
        self.pos += n + 1;
        Ok(s)
    }
}

struct Machine {
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl Machine {
    fn pop(&mut self) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            bail!("stack underflow");
        }
        Ok(self.stack.pop().expect("checked above"))
    }
    fn top(&mut self) -> Result<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            bail!("stack underflow");
        }
        Ok(self.stack.last_mut().expect("checked above"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self.marks.pop().ok_or_else(|| anyhow!("MARK expected but none is open"))?;
        Ok(self.stack.split_off(m))
    }
    fn push_tuple(&mut self, items: Vec<Value>) {
        self.stack.push(Value::Tuple(items.into()));
    }
    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }
    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| anyhow!("memo entry {idx} is not defined"))?;
        self.stack.push(v);
        Ok(())
    }
    fn push_global(&mut self, module: &str, name: &str) -> Result<()> {
        // Protocol 2 writes Python 2 module names for some builtins (as Python's unpickler
        // does, map them back so that errors name what a reader would look for).
        let module = match module {
            "__builtin__" | "exceptions" => "builtins",
            "copy_reg" => "copyreg",
            m => m,
        };
        match resolve_global(module, name) {
            Some(g) => {
                self.stack.push(Value::Global(g));
                Ok(())
            }
            None => bail!(
                "refusing to load global '{}.{}' (only tensor-rebuild globals are allowed)",
                truncate(module, 100),
                truncate(name, 100)
            ),
        }
    }
}

fn as_str(v: &Value, what: &str) -> Result<Rc<str>> {
    match v {
        Value::Str(s) => Ok(s.clone()),
        other => bail!("{what} must be a str, found {}", other.kind()),
    }
}

fn as_usize(v: &Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(i) if *i >= 0 => {
            usize::try_from(*i).map_err(|_| anyhow!("{what} {i} is too large"))
        }
        Value::Int(i) => bail!("{what} must not be negative, found {i}"),
        other => bail!("{what} must be an int, found {}", other.kind()),
    }
}

fn as_usize_seq(v: &Value, what: &str) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(t) => t.iter().map(|x| as_usize(x, what)).collect(),
        Value::List(l) => l.borrow().iter().map(|x| as_usize(x, what)).collect(),
        other => bail!("{what} must be a tuple of ints, found {}", other.kind()),
    }
}

fn tuple_items(v: &Value, what: &str) -> Result<Rc<[Value]>> {
    match v {
        Value::Tuple(t) => Ok(t.clone()),
        other => bail!("{what} must be a tuple, found {}", other.kind()),
    }
}

/// `persistent_load(('storage', <storage class>, key, location, numel))`.
fn persistent_load(pid: Value) -> Result<Value> {
    let t = tuple_items(&pid, "persistent id")?;
    match &t[..] {
        [tag, class, key, _location, numel] => {
            match tag {
                Value::Str(s) if &**s == "storage" => {}
                other => bail!(
                    "unsupported persistent id: expected 'storage', found {}",
                    describe(other)
                ),
            }
            let dtype = match class {
                Value::Global(Global::StorageClass(d)) => *d,
                other => bail!("persistent id names no storage class (found {})", other.kind()),
            };
            let key = match key {
                Value::Str(s) => s.to_string(),
                Value::Int(i) => i.to_string(),
                other => bail!("storage key must be a str, found {}", other.kind()),
            };
            if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") {
                bail!("invalid storage key {key:?}");
            }
            let numel = as_usize(numel, "storage size")?;
            Ok(Value::Storage(Rc::new(StorageRef { key, dtype, numel })))
        }
        _ => bail!("unsupported persistent id: a tuple of {} items (expected 5)", t.len()),
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Str(s) => format!("{:?}", truncate(s, 40)),
        Value::Int(i) => i.to_string(),
        Value::Float(x) => x.to_string(),
        Value::Bytes(b) => format!("bytes of length {}", b.len()),
        other => other.kind().to_string(),
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn global_name(g: Global) -> &'static str {
    match g {
        Global::OrderedDict => "collections.OrderedDict",
        Global::RebuildTensor => "torch._utils._rebuild_tensor",
        Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
        Global::RebuildParameter => "torch._utils._rebuild_parameter",
        Global::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state",
        Global::RebuildFromTypeV2 => "torch._tensor._rebuild_from_type_v2",
        Global::TensorClass => "torch.Tensor",
        Global::StorageClass(_) => "a torch storage class",
        Global::Dtype(_) => "a torch dtype",
        Global::CodecsEncode => "_codecs.encode",
        Global::Namespace => "argparse.Namespace",
    }
}

fn rebuild_tensor(args: &[Value]) -> Result<Value> {
    let storage = match &args[0] {
        Value::Storage(s) => s.clone(),
        other => bail!("tensor rebuild expects a storage, found {}", other.kind()),
    };
    let offset = as_usize(&args[1], "storage offset")?;
    let size = as_usize_seq(&args[2], "tensor size")?;
    let stride = as_usize_seq(&args[3], "tensor stride")?;
    if size.len() != stride.len() {
        bail!("tensor size {size:?} and stride {stride:?} differ in rank");
    }
    Ok(Value::Tensor(Rc::new(TensorRef { storage, offset, size, stride })))
}

/// Applies an allowlisted callable natively. Nothing here runs foreign code.
fn call(g: Global, args: &[Value]) -> Result<Value> {
    let name = global_name(g);
    let arity = |lo: usize, hi: usize| -> Result<()> {
        if args.len() < lo || args.len() > hi {
            bail!("{name} called with {} arguments", args.len());
        }
        Ok(())
    };
    match g {
        Global::OrderedDict => {
            arity(0, 1)?;
            let mut d = Dict::default();
            if let Some(items) = args.first() {
                let items: Vec<Value> = match items {
                    Value::List(l) => l.borrow().clone(),
                    Value::Tuple(t) => t.to_vec(),
                    other => bail!("OrderedDict expects a list of pairs, found {}", other.kind()),
                };
                for item in items {
                    let pair = tuple_items(&item, "OrderedDict item")?;
                    if pair.len() != 2 {
                        bail!("OrderedDict item must be a pair");
                    }
                    d.insert(pair[0].clone(), pair[1].clone());
                }
            }
            Ok(Value::Dict(Rc::new(RefCell::new(d))))
        }
        // (storage, storage_offset, size, stride)
        Global::RebuildTensor => {
            arity(4, 4)?;
            rebuild_tensor(args)
        }
        // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        Global::RebuildTensorV2 => {
            arity(6, 7)?;
            rebuild_tensor(args)
        }
        // (data, requires_grad, backward_hooks[, state])
        Global::RebuildParameter | Global::RebuildParameterWithState => {
            arity(3, 4)?;
            match &args[0] {
                t @ Value::Tensor(_) => Ok(t.clone()),
                other => bail!("{name} expects a tensor, found {}", other.kind()),
            }
        }
        // (func, type, args, state): func(*args), then the Python state, which we ignore.
        Global::RebuildFromTypeV2 => {
            arity(4, 4)?;
            let func = match &args[0] {
                Value::Global(f) => *f,
                other => bail!("{name} expects a rebuild function, found {}", other.kind()),
            };
            if !matches!(
                func,
                Global::RebuildTensor
                    | Global::RebuildTensorV2
                    | Global::RebuildParameter
                    | Global::RebuildParameterWithState
            ) {
                bail!("{name} may only apply a tensor rebuild function, not {}", global_name(func));
            }
            if !matches!(args[1], Value::Global(Global::TensorClass)) {
                bail!("{name} may only rebuild torch.Tensor or torch.nn.Parameter");
            }
            let inner = tuple_items(&args[2], "rebuild arguments")?;
            call(func, &inner)
        }
        Global::CodecsEncode => {
            arity(1, 2)?;
            let s = as_str(&args[0], "_codecs.encode argument")?;
            let enc = match args.get(1) {
                Some(v) => as_str(v, "encoding")?.to_ascii_lowercase(),
                None => "utf-8".to_string(),
            };
            let bytes: Vec<u8> = match enc.as_str() {
                "latin1" | "latin-1" | "iso-8859-1" => s
                    .chars()
                    .map(|c| u8::try_from(u32::from(c)))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| anyhow!("character outside latin-1 in _codecs.encode"))?,
                "utf-8" | "utf8" => s.as_bytes().to_vec(),
                other => bail!("_codecs.encode with unsupported encoding {other:?}"),
            };
            Ok(Value::Bytes(bytes.into()))
        }
        Global::Namespace => Ok(Value::Opaque("argparse.Namespace")),
        Global::TensorClass | Global::StorageClass(_) | Global::Dtype(_) => {
            bail!("{name} is not callable here")
        }
    }
}

fn read_str(bytes: &[u8], at: usize) -> Result<Value> {
    let s = std::str::from_utf8(bytes).map_err(|_| anyhow!("invalid UTF-8 string at byte {at}"))?;
    Ok(Value::Str(Rc::from(s)))
}

fn latin1(bytes: &[u8]) -> Value {
    let s: String = bytes.iter().map(|&b| char::from(b)).collect();
    Value::Str(Rc::from(s))
}

/// Runs the pickle in `data` and returns the value that `STOP` leaves.
pub(crate) fn load(data: &[u8]) -> Result<Value> {
    let mut r = Reader { data, pos: 0 };
    let mut m = Machine { stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() };
    loop {
        let at = r.pos;
        let op = r.u8().map_err(|_| anyhow!("truncated pickle: no STOP opcode before the end"))?;
        step(&mut r, &mut m, op)
            .map_err(|e| anyhow!("{e} (opcode {} at byte {at})", opcode_name(op)))?;
        if op == b'.' {
            let v = m.stack.pop().expect("STOP checked the stack");
            return Ok(v);
        }
    }
}

fn step(r: &mut Reader<'_>, m: &mut Machine, op: u8) -> Result<()> {
    let at = r.pos;
    match op {
        0x80 => {
            let p = r.u8()?;
            if p > MAX_PROTOCOL {
                bail!("unsupported pickle protocol {p}");
            }
        }
        0x95 => {
            r.u64()?;
        }
        b'.' => {
            m.top()?;
        }
        b'(' => m.marks.push(m.stack.len()),
        b'0' => {
            m.pop()?;
        }
        b'1' => {
            m.pop_mark()?;
        }
        b'2' => {
            let v = m.top()?.clone();
            m.stack.push(v);
        }
        b'N' => m.stack.push(Value::None),
        0x88 => m.stack.push(Value::Bool(true)),
        0x89 => m.stack.push(Value::Bool(false)),
        b'I' => {
            let line = r.line()?;
            let v = match line {
                "00" => Value::Bool(false),
                "01" => Value::Bool(true),
                s => Value::Int(s.parse().map_err(|_| anyhow!("invalid INT literal {s:?}"))?),
            };
            m.stack.push(v);
        }
        b'J' => m.stack.push(Value::Int(r.i32()? as i64)),
        b'K' => m.stack.push(Value::Int(r.u8()? as i64)),
        b'M' => m.stack.push(Value::Int(r.u16()? as i64)),
        0x8a | 0x8b => {
            let n = if op == 0x8a {
                r.u8()? as usize
            } else {
                let n = r.i32()?;
                usize::try_from(n).map_err(|_| anyhow!("negative LONG4 length"))?
            };
            let bytes = r.take(n)?;
            if n > 8 {
                bail!("integer of {n} bytes is too large");
            }
            let v = if n == 0 {
                0
            } else {
                let fill = if bytes[n - 1] & 0x80 != 0 { 0xff } else { 0 };
                let mut buf = [fill; 8];
                buf[..n].copy_from_slice(bytes);
                i64::from_le_bytes(buf)
            };
            m.stack.push(Value::Int(v));
        }
        b'G' => m.stack.push(Value::Float(f64::from_be_bytes(r.take(8)?.try_into()?))),
        b'X' => {
            let n = r.u32()? as usize;
            let v = read_str(r.take(n)?, at)?;
            m.stack.push(v);
        }
        0x8c => {
            let n = r.u8()? as usize;
            let v = read_str(r.take(n)?, at)?;
            m.stack.push(v);
        }
        0x8d => {
            let n = r.len_u64()?;
            let v = read_str(r.take(n)?, at)?;
            m.stack.push(v);
        }
        b'T' => {
            let n = usize::try_from(r.i32()?).map_err(|_| anyhow!("negative BINSTRING length"))?;
            let v = latin1(r.take(n)?);
            m.stack.push(v);
        }
        b'U' => {
            let n = r.u8()? as usize;
            let v = latin1(r.take(n)?);
            m.stack.push(v);
        }
        b'B' => {
            let n = r.u32()? as usize;
            m.stack.push(Value::Bytes(r.take(n)?.into()));
        }
        b'C' => {
            let n = r.u8()? as usize;
            m.stack.push(Value::Bytes(r.take(n)?.into()));
        }
        0x8e => {
            let n = r.len_u64()?;
            m.stack.push(Value::Bytes(r.take(n)?.into()));
        }
        b')' => m.push_tuple(Vec::new()),
        b't' => {
            let items = m.pop_mark()?;
            m.push_tuple(items);
        }
        0x85..=0x87 => {
            let n = (op - 0x84) as usize;
            let floor = m.marks.last().copied().unwrap_or(0);
            if m.stack.len() < floor + n {
                bail!("stack underflow");
            }
            let items = m.stack.split_off(m.stack.len() - n);
            m.push_tuple(items);
        }
        b']' => m.stack.push(Value::List(Rc::new(RefCell::new(Vec::new())))),
        b'l' => {
            let items = m.pop_mark()?;
            m.stack.push(Value::List(Rc::new(RefCell::new(items))));
        }
        b'a' => {
            let v = m.pop()?;
            match m.top()? {
                Value::List(l) => l.borrow_mut().push(v),
                other => bail!("APPEND to a {}", other.kind()),
            }
        }
        b'e' => {
            let items = m.pop_mark()?;
            match m.top()? {
                Value::List(l) => l.borrow_mut().extend(items),
                other => bail!("APPENDS to a {}", other.kind()),
            }
        }
        b'}' => m.stack.push(Value::Dict(Rc::new(RefCell::new(Dict::default())))),
        b'd' => {
            let items = m.pop_mark()?;
            let d = Rc::new(RefCell::new(Dict::default()));
            set_items(&d, items)?;
            m.stack.push(Value::Dict(d));
        }
        b's' => {
            let v = m.pop()?;
            let k = m.pop()?;
            match m.top()? {
                Value::Dict(d) => d.borrow_mut().insert(k, v),
                other => bail!("SETITEM on a {}", other.kind()),
            }
        }
        b'u' => {
            let items = m.pop_mark()?;
            match m.top()? {
                Value::Dict(d) => {
                    let d = d.clone();
                    set_items(&d, items)?;
                }
                other => bail!("SETITEMS on a {}", other.kind()),
            }
        }
        b'q' => {
            let i = r.u8()? as u32;
            m.memo_put(i)?;
        }
        b'r' => {
            let i = r.u32()?;
            m.memo_put(i)?;
        }
        0x94 => {
            let i = u32::try_from(m.memo.len()).map_err(|_| anyhow!("memo too large"))?;
            m.memo_put(i)?;
        }
        b'h' => {
            let i = r.u8()? as u32;
            m.memo_get(i)?;
        }
        b'j' => {
            let i = r.u32()?;
            m.memo_get(i)?;
        }
        b'Q' => {
            let pid = m.pop()?;
            let v = persistent_load(pid)?;
            m.stack.push(v);
        }
        b'c' => {
            let module = r.line()?;
            let name = r.line()?;
            m.push_global(module, name)?;
        }
        0x93 => {
            let name = m.pop()?;
            let module = m.pop()?;
            let (module, name) = (as_str(&module, "module name")?, as_str(&name, "global name")?);
            m.push_global(&module, &name)?;
        }
        b'R' => {
            let args = m.pop()?;
            let func = m.pop()?;
            let g = match func {
                Value::Global(g) => g,
                other => bail!("REDUCE of a {}, which is not callable", other.kind()),
            };
            let args = tuple_items(&args, "REDUCE arguments")?;
            let v = call(g, &args)?;
            m.stack.push(v);
        }
        0x81 => {
            let args = m.pop()?;
            let cls = m.pop()?;
            let args = tuple_items(&args, "NEWOBJ arguments")?;
            let v = match cls {
                Value::Global(g @ (Global::OrderedDict | Global::Namespace)) => call(g, &args)?,
                Value::Global(g) => bail!("NEWOBJ of {} is not allowed", global_name(g)),
                other => bail!("NEWOBJ of a {}", other.kind()),
            };
            m.stack.push(v);
        }
        b'b' => {
            let state = m.pop()?;
            match m.top()? {
                // OrderedDict attributes (`_metadata` of a state dict), Parameter/Tensor Python
                // state, Namespace fields: none of them matter for the weights.
                Value::Dict(_) | Value::Tensor(_) | Value::Opaque(_) => {
                    if !matches!(state, Value::Dict(_) | Value::Tuple(_) | Value::None) {
                        bail!("BUILD with a {} state", state.kind());
                    }
                }
                other => bail!("BUILD on a {} is not allowed", other.kind()),
            }
        }
        other => bail!("unsupported pickle opcode 0x{other:02x} ({})", opcode_name(other)),
    }
    Ok(())
}

fn set_items(d: &Rc<RefCell<Dict>>, items: Vec<Value>) -> Result<()> {
    if !items.len().is_multiple_of(2) {
        bail!("odd number of items for a dict");
    }
    let mut d = d.borrow_mut();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        d.insert(k, v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol-2 pickle of `OrderedDict([("w", tensor)])` with a 2x3 float view of storage
    /// "0", written by hand from the opcode table.
    fn sample() -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storage");
        p.extend(b"ctorch\nFloatStorage\nq\x03X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend(b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89h\x00)Rtq\x04Rq\x05u}bh\x05\x86.");
        p
    }

    #[test]
    fn hand_written_pickle_loads() {
        let v = load(&sample()).unwrap();
        let Value::Tuple(t) = &v else { panic!("expected a tuple, got {}", v.kind()) };
        let Value::Dict(d) = &t[0] else { panic!() };
        let d = d.borrow();
        let Some(Value::Tensor(t)) = d.get("w") else { panic!() };
        assert_eq!(t.size, vec![2, 3]);
        assert_eq!(t.stride, vec![3, 1]);
        assert_eq!(t.storage.key, "0");
        assert_eq!(t.storage.numel, 6);
        assert_eq!(t.storage.dtype, SourceDtype::F32);
    }

    #[test]
    fn every_truncation_and_byte_flip_errs_without_panicking() {
        let p = sample();
        for n in 0..p.len() {
            assert!(load(&p[..n]).is_err(), "prefix of {n} bytes was accepted");
        }
        for i in 0..p.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut q = p.clone();
                q[i] ^= flip;
                let _ = load(&q);
            }
        }
    }

    #[test]
    fn deep_nesting_neither_recurses_nor_overflows() {
        let n = 1_000_000;
        // Lists: n empty lists, each appended into the one below.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', n));
        p.extend(std::iter::repeat_n(b'a', n - 1));
        p.push(b'.');
        assert_eq!(load(&p).unwrap().kind(), "list");
        // Tuples: (((...),),)
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85, n));
        p.push(b'.');
        assert_eq!(load(&p).unwrap().kind(), "tuple");
        // Dicts, abandoned on the stack by an error.
        let mut p = vec![0x80, 2, b'}'];
        for _ in 0..n {
            p.extend([b'K', 1, b'}']);
        }
        p.extend(std::iter::repeat_n(b's', n));
        assert!(load(&p).is_err());
    }

    #[test]
    fn documented_allowlists_match_the_code() {
        for g in ALLOWED_GLOBALS {
            let (module, name) = g.rsplit_once('.').unwrap();
            assert!(resolve_global(module, name).is_some(), "{g} is listed but not resolved");
        }
        assert!(resolve_global("os", "system").is_none());
        let named: Vec<&str> = (0..=255u8).map(opcode_name).collect();
        for op in SUPPORTED_OPCODES {
            assert!(named.contains(op), "{op}");
        }
    }

    #[test]
    fn long_ints_and_floats() {
        // LONG1 -1 (1 byte 0xff), LONG1 2^40, BINFLOAT 1.5, TUPLE3, STOP
        let mut p = vec![0x80, 2, 0x8a, 1, 0xff, 0x8a, 6, 0, 0, 0, 0, 0, 1, b'G'];
        p.extend(1.5f64.to_be_bytes());
        p.extend([0x87, b'.']);
        let v = load(&p).unwrap();
        let Value::Tuple(t) = &v else { panic!() };
        assert!(matches!(t[0], Value::Int(-1)));
        assert!(matches!(t[1], Value::Int(x) if x == 1 << 40));
        assert!(matches!(t[2], Value::Float(x) if x == 1.5));
    }
}
