#!/usr/bin/env python3
"""Build data/fashion-mnist-subset/ from the full Fashion-MNIST IDX files.

Selection (deterministic, no randomness): walking each file in its original order, keep an image
while its class has fewer than the quota; the quota is 600 per class for the training split
(6,000 images) and 100 per class for the test split (1,000 images). In other words, the subset
holds the first 600 (train) / 100 (test) images of each class in file order, and keeps that
order. Output files use the standard IDX names, gzip-compressed with a fixed header (no file
name, mtime 0) so that reruns give identical bytes for a given zlib.

Source: by default the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist), whose files hold the official Fashion-MNIST contents
(Zalando Research, MIT licence); `rlprune data check fashion-mnist` verifies their decompressed
SHA-256. Any directory with the four official files works (`--source DIR`).

Usage: python3 scripts/make_fashion_subset.py [--source DIR] [--out DIR]
Standard library only.
"""

import argparse
import gzip
import hashlib
import json
import os
import re
import struct
import sys

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
QUOTA = {"train": 600, "t10k": 100}
NUM_CLASSES = 10


def read_maybe_gz(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


def find(source, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(source, name)
        if os.path.isfile(p):
            return p
    sys.exit(f"error: {os.path.join(source, stem)}[.gz] not found")


def read_images(path):
    data = read_maybe_gz(path)
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IMAGES_MAGIC:
        sys.exit(f"error: {path}: bad magic 0x{magic:08x}")
    size = rows * cols
    if len(data) != 16 + n * size:
        sys.exit(f"error: {path}: expected {16 + n * size} bytes, got {len(data)}")
    return rows, cols, [data[16 + i * size:16 + (i + 1) * size] for i in range(n)]


def read_labels(path):
    data = read_maybe_gz(path)
    magic, n = struct.unpack(">II", data[:8])
    if magic != LABELS_MAGIC:
        sys.exit(f"error: {path}: bad magic 0x{magic:08x}")
    if len(data) != 8 + n:
        sys.exit(f"error: {path}: expected {8 + n} bytes, got {len(data)}")
    return list(data[8:])


def write_gz(path, payload):
    tmp = path + ".tmp"
    with open(tmp, "wb") as raw:
        # filename="" and mtime=0: no name or time in the gzip header, so output is reproducible.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(payload)
    os.replace(tmp, path)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "data", "fashion-mnist-subset"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    manifest = {
        "description": "Fashion-MNIST subset: per split, the first `quota` images of each class in "
        "file order. `source_sha256`: decompressed contents of the official files it was drawn from; "
        "`indices`: positions in those files; `sha256`: decompressed contents of the shipped files.",
        "splits": {},
    }
    for prefix, quota in QUOTA.items():
        rows, cols, images = read_images(find(args.source, f"{prefix}-images-idx3-ubyte"))
        labels = read_labels(find(args.source, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            sys.exit(f"error: {prefix}: {len(images)} images but {len(labels)} labels")
        taken = [0] * NUM_CLASSES
        keep = []
        for i, label in enumerate(labels):
            if taken[label] < quota:
                taken[label] += 1
                keep.append(i)
        if taken != [quota] * NUM_CLASSES:
            sys.exit(f"error: {prefix}: not enough images per class: {taken}")
        n = len(keep)
        img_payload = struct.pack(">IIII", IMAGES_MAGIC, n, rows, cols) + b"".join(images[i] for i in keep)
        lbl_payload = struct.pack(">II", LABELS_MAGIC, n) + bytes(labels[i] for i in keep)
        entry = {"quota_per_class": quota, "source_len": len(labels), "source_sha256": {}, "sha256": {}}
        for stem, payload in ((f"{prefix}-images-idx3-ubyte", img_payload), (f"{prefix}-labels-idx1-ubyte", lbl_payload)):
            out = os.path.join(args.out, stem + ".gz")
            digest = write_gz(out, payload)
            content = hashlib.sha256(payload).hexdigest()
            entry["source_sha256"][stem] = hashlib.sha256(read_maybe_gz(find(args.source, stem))).hexdigest()
            entry["sha256"][stem] = content
            print(f"{out}: {n} entries, sha256 {digest}, contents sha256 {content}")
        entry["indices"] = keep
        manifest["splits"][prefix] = entry
        print(f"{prefix}: kept {n} images; last index kept {keep[-1]} of {len(labels)}")

    path = os.path.join(args.out, "manifest.json")
    with open(path + ".tmp", "w") as f:
        text = json.dumps(manifest, indent=1)
        # Index lists on one line each: the manifest stays readable and diffs stay small.
        text = re.sub(r"\[\s*([0-9,\s]+?)\s*\]", lambda m: "[" + ",".join(m.group(1).split()).replace(",,", ",") + "]", text)
        f.write(text + "\n")
    os.replace(path + ".tmp", path)
    print(f"{path}: written")


if __name__ == "__main__":
    main()
