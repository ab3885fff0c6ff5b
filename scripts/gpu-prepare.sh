#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh and scripts/gpu-run.sh need on a GPU machine into gpu-pack/ (git-ignored;
# carry it with `run`'s carry: ["gpu-pack"]; it must stay under 64 MiB with the tree):
#   gpu-pack/byol.xz     the release binary built with CUDA and cuDNN, stripped
#                        and xz-compressed (66 MB stripped, 9 MB compressed: candle's
#                        PTX kernels compress well); gpu-check.sh unpacks it
#   gpu-pack/fmnist/     Fashion-MNIST IDX files: all 60,000 training images and the
#                        10,000 test images (ingested on the GPU machine by the scripts)
#   gpu-pack/photos/     200 of the 256-px photos (the loader at 224 px)
#   gpu-pack/byol-nccl.xz  the same built with `--features nccl` (data-parallel on
#                        GPUs; scripts/gpu-dist.sh), and gpu-pack/mpi-lib/ the OpenMPI
#                        libraries it links, from Debian's packages (libopenmpi-dev)
#
#   scripts/gpu-prepare.sh             CUDA build (needs ../shared/tools/cuda-env.sh and
#                                      installs cuDNN's wheel into that environment)
#   scripts/gpu-prepare.sh --data-only only the data (no build)
#
# Needs: apt-get install -y dataset-fashion-mnist; ../shared/data/photos256.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
pack=gpu-pack
mkdir -p "$pack"
if [ "$mode" != "--data-only" ]; then
  # shellcheck disable=SC1091
  source scripts/cudnn-env.sh
  # A target folder of its own, so the CPU build in target/release stays as it is.
  cargo build --release -p byol-daemon --features cuda --target-dir target/gpu
  strip -o "$pack/byol" target/gpu/release/byol
  xz -T0 -6 -f "$pack/byol"
  # The data-parallel build links OpenMPI: its libraries travel beside it.
  cargo build --release -p byol-daemon --features nccl --target-dir target/gpu
  strip -o "$pack/byol-nccl" target/gpu/release/byol
  xz -T0 -6 -f "$pack/byol-nccl"
  rm -rf "$pack/mpi-lib"
  mkdir -p "$pack/mpi-lib"
  ldd target/gpu/release/byol | awk '/libmpi|libopen-|libhwloc|libevent|libudev/ {print $3}' \
    | xargs -I{} cp -L {} "$pack/mpi-lib/"
fi
fm=/usr/share/datasets/fashion-mnist
mkdir -p "$pack/fmnist"
python3 - "$fm" "$pack/fmnist" <<'PY'
import gzip, struct, sys
src, dst = sys.argv[1], sys.argv[2]
def subset(name, count, header):
    data = gzip.open(f"{src}/{name}").read()
    dims = struct.unpack(">" + "I" * (data[3]), data[4:4 + 4 * data[3]])
    per = 1
    for d in dims[1:]:
        per *= d
    n = min(count, dims[0])
    out = data[:4] + struct.pack(">I", n) + data[8:4 + 4 * data[3]] + data[header:header + n * per]
    with gzip.open(f"{dst}/{name}", "wb", compresslevel=9) as f:
        f.write(out)
for split, count in [("train", 60000), ("t10k", 10000)]:
    subset(f"{split}-images-idx3-ubyte.gz", count, 16)
    subset(f"{split}-labels-idx1-ubyte.gz", count, 8)
PY
rm -rf "$pack/photos"
mkdir -p "$pack/photos"
# The first 200 photos by name (a glob, not `ls | head`: head closing the pipe early
# made ls exit 141 under pipefail).
photos=(../shared/data/photos256/*.jpg)
cp "${photos[@]:0:200}" "$pack/photos/"
du -sh "$pack" "$pack"/*
