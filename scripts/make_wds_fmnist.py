#!/usr/bin/env python3
"""Writes a WebDataset copy of Fashion-MNIST's training set: N shards of
`{index:06d}.png` (8-bit grayscale PNG, encoded here with zlib) + `{index:06d}.cls`
(the label as decimal text), samples in IDX order. Python standard library only.

    scripts/make_wds_fmnist.py OUT_DIR [--shards 6] [--idx DIR] [--gzip]

Then `byol ingest 'OUT_DIR/fmnist-{000000..000005}.tar' --out DS` ingests it, and
`byol ingest DIR/train-images-idx3-ubyte.gz --out DS2` the same images from IDX.
"""

import argparse
import gzip
import io
import os
import struct
import tarfile
import zlib


def read_idx(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    zero, kind, ndims = struct.unpack(">HBB", data[:4])
    assert zero == 0 and kind == 0x08, f"{path}: not an unsigned-byte IDX file"
    dims = struct.unpack(">" + "I" * ndims, data[4 : 4 + 4 * ndims])
    return dims, data[4 + 4 * ndims :]


def chunk(kind, body):
    return (
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def png_gray(width, height, pixels):
    rows = b"".join(
        b"\x00" + pixels[y * width : (y + 1) * width] for y in range(height)
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows, 6))
        + chunk(b"IEND", b"")
    )


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--idx", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--gzip", action="store_true", help="write .tar.gz shards")
    args = ap.parse_args()
    (count, rows, cols), pixels = read_idx(
        os.path.join(args.idx, "train-images-idx3-ubyte.gz")
    )
    (nlabels,), labels = read_idx(os.path.join(args.idx, "train-labels-idx1-ubyte.gz"))
    assert nlabels == count, f"{count} images but {nlabels} labels"
    os.makedirs(args.out, exist_ok=True)
    per = -(-count // args.shards)
    size = rows * cols
    ext, mode = (".tar.gz", "w:gz") if args.gzip else (".tar", "w")
    for s in range(args.shards):
        path = os.path.join(args.out, f"fmnist-{s:06d}{ext}")
        with tarfile.open(path + ".partial", mode, format=tarfile.GNU_FORMAT) as tar:
            for i in range(s * per, min(count, (s + 1) * per)):
                key = f"{i:06d}"
                add(tar, key + ".png", png_gray(cols, rows, pixels[i * size : (i + 1) * size]))
                add(tar, key + ".cls", str(labels[i]).encode())
        os.replace(path + ".partial", path)
        print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
