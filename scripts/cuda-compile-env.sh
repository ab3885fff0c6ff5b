#!/usr/bin/env bash
# Sets up what compiling (not linking) `--features cuda` needs, for CI's clippy on a machine
# with no GPU: nvcc 13.0 with its headers from PyPI, in a venv of its own. candle's CUDA
# kernels and ours (trainer/src/kernels/cuda/kernels.cu) are compiled to PTX by nvcc at
# build time, and cudarc reads the CUDA version from `nvcc --version`. No cuBLAS, cuDNN or
# driver stub: `cargo clippy` links nothing. To build the binary use scripts/cudnn-env.sh.
#
#   source scripts/cuda-compile-env.sh
#   cargo clippy -p byol-trainer --features cuda
dir=${CUDA_COMPILE_DIR:-/opt/cuda13-compile}
if [ ! -f "$dir/.ready" ]; then
  { [ -x "$dir/bin/python3" ] || python3 -m venv "$dir"; } \
    && "$dir/bin/pip" install -q --disable-pip-version-check \
      "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
      "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-runtime==13.0.*" \
    && touch "$dir/.ready" \
    || { echo "cuda-compile-env: installing nvcc from PyPI failed" >&2; return 1 2>/dev/null || exit 1; }
fi
nv=$(echo "$dir"/lib/python3*/site-packages/nvidia/cu13)
export PATH="$nv/bin:$PATH" CUDA_ROOT="$nv" CUDA_PATH="$nv" CUDA_HOME="$nv"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
echo "cuda-compile-env: nvcc $(nvcc --version | grep -oE 'release [0-9.]+'), CUDA_ROOT=$nv"
