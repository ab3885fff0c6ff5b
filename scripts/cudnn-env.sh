#!/usr/bin/env bash
# Sets up what `--features cuda` (and `nccl`) needs to compile and link: CUDA 13.0 from
# PyPI (../shared/tools/cuda-env.sh) plus cuDNN 9 and NCCL 2 from their wheels, in the
# same environment. Our
# convolutions call cuDNN through cudarc, which links libcudnn.so; the GPU machine loads
# PyTorch's libcudnn.so.9 at run time.
#
#   source scripts/cudnn-env.sh
#   cargo build --release --features cuda
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/../../shared/tools/cuda-env.sh" "" || return 1 2>/dev/null || exit 1
venv=${CUDA_ENV_DIR:-/opt/cuda13-build}
if [ ! -e "$CUDA_ROOT/lib/libcudnn.so" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check "nvidia-cudnn-cu13==9.*" \
    || { echo "cudnn-env: pip install failed" >&2; return 1 2>/dev/null || exit 1; }
  cudnn=$(echo "$venv"/lib/python3*/site-packages/nvidia/cudnn)
  ln -sf "$cudnn/lib/libcudnn.so.9" "$CUDA_ROOT/lib/libcudnn.so"
fi
# NCCL for `--features nccl` (linked like cuDNN; the GPU machine has PyTorch's).
if [ ! -e "$CUDA_ROOT/lib/libnccl.so" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check "nvidia-nccl-cu13==2.*" \
    || { echo "cudnn-env: pip install of NCCL failed" >&2; return 1 2>/dev/null || exit 1; }
  nccl=$(echo "$venv"/lib/python3*/site-packages/nvidia/nccl)
  ln -sf "$nccl/lib/libnccl.so.2" "$CUDA_ROOT/lib/libnccl.so"
fi
export LIBRARY_PATH="$CUDA_ROOT/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
echo "cudnn-env: $(readlink -f "$CUDA_ROOT/lib/libcudnn.so")"
