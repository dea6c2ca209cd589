#!/usr/bin/env python3
"""Writes PyTorch zip checkpoints (the `torch.save` layout) with the standard library only.

torch is too heavy for CI, so this script builds the files from the format: a zip archive with
`<archive>/data.pkl` (pickle protocol 2, as torch.save writes it), raw little-endian storages
`<archive>/data/<key>`, `<archive>/version` and `<archive>/byteorder`. Stand-in `torch` and
`torch._utils` modules are put in `sys.modules`, so that pickle writes exactly the globals torch
writes (`torch._utils._rebuild_tensor_v2`, `torch.FloatStorage`, ...), and a Pickler with
`persistent_id` writes the `('storage', <storage class>, key, 'cpu', numel)` ids.

It also writes broken and malicious files for the error tests, and `expected.json`: for each
good file, every tensor's shape and values in row-major order, computed here from the storage
values, offset and strides, independently of the Rust reader.

Usage: make_pth.py OUT_DIR PWNED_PATH
    PWNED_PATH is the file the malicious pickles would create if they were ever executed.
    Nothing in this script unpickles anything.
"""

import argparse
import collections
import io
import json
import os
import pickle
import random
import struct
import sys
import types
import zipfile

# ---------------------------------------------------------------- stand-ins for torch

torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
torch._utils = torch_utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


def _stand_in(module, name):
    def f(*args):
        raise RuntimeError("stand-in for %s.%s, never called" % (module.__name__, name))

    f.__module__ = module.__name__
    f.__name__ = f.__qualname__ = name
    setattr(module, name, f)
    return f


_rebuild_tensor_v2 = _stand_in(torch_utils, "_rebuild_tensor_v2")
_rebuild_parameter = _stand_in(torch_utils, "_rebuild_parameter")

# Tensor subclasses and tensors with Python attributes go through
# torch._tensor._rebuild_from_type_v2(func, type, args, state).
torch_tensor = types.ModuleType("torch._tensor")
torch._tensor = torch_tensor
sys.modules["torch._tensor"] = torch_tensor
_rebuild_from_type_v2 = _stand_in(torch_tensor, "_rebuild_from_type_v2")
torch_nn = types.ModuleType("torch.nn")
torch_nn_parameter = types.ModuleType("torch.nn.parameter")
torch.nn, torch_nn.parameter = torch_nn, torch_nn_parameter
sys.modules["torch.nn"] = torch_nn
sys.modules["torch.nn.parameter"] = torch_nn_parameter
torch_nn_parameter.Parameter = type("Parameter", (), {"__module__": "torch.nn.parameter"})


class _Dtype:
    """torch.float32 and friends pickle as the global torch.<name>."""

    __module__ = "torch"

    def __init__(self, name):
        self.name = name
        setattr(torch, name, self)

    def __reduce__(self):
        return self.name


_Dtype("float32")

# dtype -> (storage class name, struct format, element size)
DTYPES = {
    "float32": ("FloatStorage", "f", 4),
    "float64": ("DoubleStorage", "d", 8),
    "float16": ("HalfStorage", "e", 2),
    "bfloat16": ("BFloat16Storage", None, 2),
    "int64": ("LongStorage", "q", 8),
}
STORAGE_CLASS = {}
for _dtype, (_cls, _, _) in DTYPES.items():
    STORAGE_CLASS[_dtype] = type(_cls, (), {"__module__": "torch"})
    setattr(torch, _cls, STORAGE_CLASS[_dtype])


def f32(x):
    """x rounded to float32, as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


class Storage:
    def __init__(self, key, dtype, values):
        self.key, self.dtype, self.values = key, dtype, list(values)

    def raw(self, endian="<"):
        _, fmt, _ = DTYPES[self.dtype]
        if self.dtype == "bfloat16":
            out = b""
            for v in self.values:
                bits = struct.unpack("<I", struct.pack("<f", v))[0]
                assert bits & 0xFFFF == 0, "value %r is not exact in bfloat16" % v
                out += struct.pack(endian + "H", bits >> 16)
            return out
        return struct.pack(endian + fmt * len(self.values), *self.values)

    def decoded(self):
        """The values as the file stores them, widened to float32 like the reader."""
        if self.dtype in ("float16",):
            return [struct.unpack("<e", struct.pack("<e", v))[0] for v in self.values]
        if self.dtype in ("float32", "float64", "bfloat16"):
            return [f32(v) for v in self.values]
        return [float(v) for v in self.values]


def contiguous_strides(size):
    strides, acc = [], 1
    for n in reversed(size):
        strides.insert(0, acc)
        acc *= n
    return strides


class Tensor:
    """Pickles as torch.Tensor does: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, size, stride=None, offset=0):
        self.storage, self.size, self.offset = storage, list(size), offset
        self.stride = list(stride) if stride is not None else contiguous_strides(size)

    def __reduce_ex__(self, protocol):
        return (
            _rebuild_tensor_v2,
            (self.storage, self.offset, tuple(self.size), tuple(self.stride), False,
             collections.OrderedDict()),
        )

    def values(self):
        """Row-major values of the view, by explicit index arithmetic."""
        src = self.storage.decoded()
        out = []

        def walk(dim, base):
            if dim == len(self.size):
                out.append(src[base])
                return
            for i in range(self.size[dim]):
                walk(dim + 1, base + i * self.stride[dim])

        walk(0, self.offset)
        return out


class Parameter:
    """Pickles as nn.Parameter does: _rebuild_parameter(tensor, requires_grad, hooks)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce_ex__(self, protocol):
        return (_rebuild_parameter, (self.tensor, True, collections.OrderedDict()))


class TypedTensor:
    """A Parameter with Python attributes: _rebuild_from_type_v2(_rebuild_tensor_v2, Parameter,
    (storage, ...), state)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce_ex__(self, protocol):
        t = self.tensor
        args = (t.storage, t.offset, tuple(t.size), tuple(t.stride), True, collections.OrderedDict())
        return (_rebuild_from_type_v2,
                (_rebuild_tensor_v2, torch_nn_parameter.Parameter, args, {"note": "attribute"}))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            numel = getattr(obj, "numel", len(obj.values))
            return ("storage", STORAGE_CLASS[obj.dtype], obj.key, "cpu", numel)
        return None


def pickle_bytes(obj, protocol=2):
    buf = io.BytesIO()
    Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def write_zip(path, pkl, storages, archive="archive", byteorder="little", skip_keys=()):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(archive + "/data.pkl", pkl)
        if byteorder is not None:
            z.writestr(archive + "/byteorder", byteorder)
        endian = ">" if byteorder == "big" else "<"
        for s in storages:
            if s.key not in skip_keys:
                z.writestr("%s/data/%s" % (archive, s.key), s.raw(endian))
        z.writestr(archive + "/version", "3\n")
        z.writestr(archive + "/.data/version", "3\n")


def state_dict(items):
    """An OrderedDict with `_metadata`, as nn.Module.state_dict() returns."""
    sd = collections.OrderedDict(items)
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("bn", {"version": 2})])
    return sd


def tensors_of(sd):
    out = {}
    for k, v in sd.items():
        t = v.tensor if isinstance(v, (Parameter, TypedTensor)) else v
        if isinstance(t, Tensor):
            out[k] = {"shape": t.size, "data": t.values()}
    return out


# ---------------------------------------------------------------- files


def main():
    out_dir, pwned = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    expected = {}

    def p(name):
        return os.path.join(out_dir, name)

    # A plain state dict: conv, BatchNorm with int64 num_batches_tracked, a Parameter.
    s0 = Storage("0", "float32", [i * 0.5 - 3.0 for i in range(24)])
    s1 = Storage("1", "float32", [0.25, -1.75])
    s2 = Storage("2", "float32", [1.0, 2.0])
    s3 = Storage("3", "int64", [1234567])
    s4 = Storage("4", "float32", [f32(0.1 * i) for i in range(12)])
    plain = state_dict([
        ("conv.weight", Tensor(s0, [2, 3, 2, 2])),
        ("conv.bias", Tensor(s1, [2])),
        ("bn.running_mean", Tensor(s2, [2])),
        ("bn.num_batches_tracked", Tensor(s3, [])),
        ("fc.weight", Parameter(Tensor(s4, [3, 4]))),
    ])
    plain_storages = [s0, s1, s2, s3, s4]
    write_zip(p("plain.pth"), pickle_bytes(plain), plain_storages)
    expected["plain.pth"] = tensors_of(plain)

    # The same with pickle protocol 4 (FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL) and
    # another archive name, as torch.save(..., pickle_protocol=4) of a file named "weights".
    write_zip(p("proto4.pth"), pickle_bytes(plain, protocol=4), plain_storages, archive="weights")
    expected["proto4.pth"] = tensors_of(plain)

    # Official releases: {"model": state_dict, ...} with training state next to it.
    sm = Storage("0", "float32", [3.5, -4.25, 8.0])
    wrapped = state_dict([("head.bias", Tensor(sm, [3])), ("head.scale", TypedTensor(Tensor(sm, [1], offset=2)))])
    ckpt = {
        "model": wrapped,
        "epoch": 299,
        # protocol 2 writes bytes as _codecs.encode(str, 'latin1'); dtypes as torch.<name>.
        "extra": {"blob": b"\x00\xffabc", "dtype": torch.float32, "big": 2 ** 40, "neg": -7},
        "args": argparse.Namespace(lr=5e-4, model="gfnet-ti", drop_path=0.1),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "max_accuracy": 80.1,
    }
    write_zip(p("model_wrapper.pth"), pickle_bytes(ckpt), [sm])
    expected["model_wrapper.pth"] = tensors_of(wrapped)
    write_zip(p("state_dict_wrapper.pth"), pickle_bytes({"state_dict": wrapped, "epoch": 3}), [sm])
    expected["state_dict_wrapper.pth"] = tensors_of(wrapped)

    # Non-contiguous views: a transpose, a column (offset + stride), a size-1 dim with an
    # arbitrary stride.
    st = Storage("7", "float32", [float(i) for i in range(12)])
    noncontig = state_dict([
        ("proj.weight", Tensor(st, [4, 3], stride=[1, 4])),
        ("column", Tensor(st, [3], stride=[4], offset=1)),
        ("row", Tensor(st, [1, 4], stride=[99, 1], offset=8)),
        ("permuted", Tensor(st, [2, 2, 3], stride=[6, 1, 2], offset=0)),
    ])
    write_zip(p("noncontig.pth"), pickle_bytes(noncontig), [st])
    expected["noncontig.pth"] = tensors_of(noncontig)

    # One storage behind several tensors at different offsets, and a tied weight (the same
    # tensor object twice: pickle memoizes it).
    sh = Storage("5", "float32", [10.0 + i for i in range(10)])
    a = Tensor(sh, [4], offset=0)
    shared = state_dict([
        ("a", a),
        ("b", Tensor(sh, [2, 3], offset=4)),
        ("tied", a),
    ])
    write_zip(p("shared.pth"), pickle_bytes(shared), [sh])
    expected["shared.pth"] = tensors_of(shared)

    # Reduced precisions.
    h = Storage("0", "float16", [1.0 / 3.0, -2.0, 65504.0, 2.0 ** -24, 0.0, -0.0])
    bf = Storage("1", "bfloat16", [1.0, 3.140625, -0.0078125])
    d = Storage("2", "float64", [0.1, -1e-3, 12345.678])
    dtypes = state_dict([
        ("half", Tensor(h, [2, 3])),
        ("half_t", Tensor(h, [3, 2], stride=[1, 3])),
        ("bf16", Tensor(bf, [3])),
        ("double", Tensor(d, [3])),
    ])
    write_zip(p("dtypes.pth"), pickle_bytes(dtypes), [h, bf, d])
    expected["dtypes.pth"] = tensors_of(dtypes)

    # A big-endian file (torch writes byteorder = "big" there).
    write_zip(p("bigendian.pth"), pickle_bytes(dtypes), [h, bf, d], byteorder="big")
    expected["bigendian.pth"] = tensors_of(dtypes)

    # ------------------------------------------------------------ broken files
    raw = open(p("plain.pth"), "rb").read()
    open(p("truncated.pth"), "wb").write(raw[: len(raw) // 2])
    write_zip(p("missing_storage.pth"), pickle_bytes(plain), plain_storages, skip_keys=("4",))
    with zipfile.ZipFile(p("no_pkl.pth"), "w") as z:
        z.writestr("archive/data/0", s0.raw())
        z.writestr("archive/version", "3\n")
    short = Storage("0", "float32", [1.0, 2.0])
    short_sd = state_dict([("w", Tensor(short, [2]))])
    pkl = pickle_bytes(short_sd)
    with zipfile.ZipFile(p("short_storage.pth"), "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", short.raw()[:6])
    write_zip(p("not_a_dict.pth"), pickle_bytes([Tensor(short, [2])]), [short])
    write_zip(p("no_tensors.pth"), pickle_bytes({"epoch": 3, "lr": 0.1}), [])
    # ------------------------------------------------------------ zip bombs
    # A storage entry that inflates far beyond the 8 bytes its pickle declares (within the
    # whole-archive cap, so the per-entry check is what refuses it).
    pkl = pickle_bytes(state_dict([("w", Tensor(short, [2]))]))
    with zipfile.ZipFile(p("oversized_storage.pth"), "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", bytes(512 << 10))
    # Consistent sizes, but 256 MiB of zeros deflated to a few hundred KB: about 1000 times the
    # file once inflated.
    big = Storage("0", "float32", [])
    big.numel = 64 << 20
    pkl = pickle_bytes(state_dict([("w", Tensor(big, [64 << 20]))]))
    with zipfile.ZipFile(p("bomb.pth"), "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", bytes(256 << 20))
    rng = random.Random(0)
    open(p("garbage.bin"), "wb").write(bytes(rng.randrange(256) for _ in range(4096)))
    open(p("empty.pth"), "wb").close()
    # The legacy (torch < 1.6) format begins with a pickled magic number.
    open(p("legacy.pth"), "wb").write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"\0" * 64)

    # ------------------------------------------------------------ malicious files
    # Hand-written opcodes, so the exact globals are known: GLOBAL 'os system', REDUCE.
    cmd = "touch " + pwned

    def binunicode(s):
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    def short_binunicode(s):
        b = s.encode()
        return b"\x8c" + bytes([len(b)]) + b

    evil_os = b"\x80\x02" + b"cos\nsystem\n" + binunicode(cmd) + b"\x85R."
    write_zip(p("evil_os_system.pth"), evil_os, [])

    code = "__import__('os').system(%r)" % cmd
    evil_eval = b"\x80\x02" + b"cbuiltins\neval\n" + binunicode(code) + b"\x85R."
    write_zip(p("evil_eval.pth"), evil_eval, [])

    evil_stack = (b"\x80\x04\x95" + struct.pack("<Q", 0) + short_binunicode("os") + b"\x94"
                  + short_binunicode("system") + b"\x94\x93\x94" + binunicode(cmd) + b"\x85\x94R\x94.")
    write_zip(p("evil_stack_global.pth"), evil_stack, [])

    # A payload after a legitimate tensor inside the state dict, as a poisoned release would
    # hide it; pickle writes it from __reduce__ (GLOBAL builtins exec).
    class Payload:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').close()" % pwned,))

    poisoned = state_dict([("conv.bias", Tensor(s1, [2])), ("evil", Payload())])
    write_zip(p("evil_nested.pth"), pickle_bytes(poisoned), [s1])

    # A pickled module object: GLOBAL of a class outside the allowlist, then NEWOBJ/BUILD.
    class GFNet:
        pass

    GFNet.__module__ = "__main__"
    GFNet.__qualname__ = "GFNet"
    sys.modules["__main__"].GFNet = GFNet
    write_zip(p("whole_module.pth"), pickle_bytes({"model": GFNet()}), [])

    with open(p("expected.json"), "w") as f:
        json.dump(expected, f)


if __name__ == "__main__":
    main()
