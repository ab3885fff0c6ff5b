#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh and scripts/gpu-run.sh need on a GPU machine into gpu-pack/ (git-ignored;
# carry it with `run`'s carry: ["gpu-pack"]; it must stay under 64 MiB with the tree):
#   gpu-pack/byol.xz     the release binary built with CUDA and cuDNN, stripped
#                        and xz-compressed (66 MB stripped, 9 MB compressed: candle's
#                        PTX kernels compress well); gpu-check.sh unpacks it
#   gpu-pack/fmnist/     Fashion-MNIST IDX files: all 60,000 training images and the
#                        10,000 test images (ingested on the GPU machine by the scripts)
#   gpu-pack/photos/     all 500 of the 256-px photos, 7 MB (the loader at 224 px; the
#                        largest batch a script trains on them is 256)
#   gpu-pack/byol-nccl.xz  the same built with `--features nccl` (data-parallel on
#                        GPUs; scripts/gpu-dist.sh), and gpu-pack/mpi-lib/ the OpenMPI
#                        libraries it links, from Debian's packages (libopenmpi-dev)
#
#   scripts/gpu-prepare.sh             CUDA build (needs ../shared/tools/cuda-env.sh and
#                                      installs cuDNN's wheel into that environment)
#   scripts/gpu-prepare.sh --data-only only the data (no build)
#   scripts/gpu-prepare.sh --plan      packs nothing: prints `packs DATASET RECORDS` for
#                                      each dataset (what the scripts' --plan is checked
#                                      against, by daemon/tests/gpu_check.rs)
#
# Needs: apt-get install -y dataset-fashion-mnist; ../shared/data/photos256.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
pack=gpu-pack
photos=(../shared/data/photos256/*.jpg)
FMNIST_TRAIN_COUNT=60000
FMNIST_TEST_COUNT=10000
if [ "$mode" = "--plan" ]; then
  [ -e "${photos[0]}" ] && echo "packs photos ${#photos[@]}" || echo "packs photos 0"
  echo "packs fmnist-train $FMNIST_TRAIN_COUNT"
  echo "packs fmnist-test $FMNIST_TEST_COUNT"
  exit 0
fi
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
python3 - "$fm" "$pack/fmnist" "$FMNIST_TRAIN_COUNT" "$FMNIST_TEST_COUNT" <<'PY'
import gzip, struct, sys
src, dst = sys.argv[1], sys.argv[2]
counts = {"train": int(sys.argv[3]), "t10k": int(sys.argv[4])}
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
for split, count in counts.items():
    subset(f"{split}-images-idx3-ubyte.gz", count, 16)
    subset(f"{split}-labels-idx1-ubyte.gz", count, 8)
PY
rm -rf "$pack/photos"
mkdir -p "$pack/photos"
# Every photo: each script's largest batch on them must fit with drop_last.
cp "${photos[@]}" "$pack/photos/"
du -sh "$pack" "$pack"/*
