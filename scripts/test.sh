#!/usr/bin/env bash
# The test command: installs what the test suite needs from Debian, then runs every test.
#
#   scripts/test.sh                 # install what is missing, then all the tests
#   scripts/test.sh --install-only  # install what is missing (CI, before clippy)
#   scripts/test.sh --list          # print the Debian packages the suite needs, one a line
#
# The one list of what the tests need from the system:
#   dataset-fashion-mnist      real IDX files for the end-to-end tests
#   python3-prometheus-client  the Prometheus parsers `daemon/tests/service.rs` reads /metrics with
#   systemd                    `systemd-analyze` on configs/byol.service
#   openmpi-bin                `mpirun` for the data-parallel tests
#   libopenmpi-dev             mpi.h, which the `mpi` feature's bindings are generated from
#   libclang-dev               libclang, which generates them (bindgen)
#   util-linux                 `unshare` (user and mount namespaces of the watching and full-disk tests)
#
# Packages are installed with apt-get: directly as root, through sudo otherwise. When
# neither works the script names what is missing and exits with status 2; nothing runs.
# With the packages in place a missing data set or tool is a test failure, not a skip
# (BYOL_REQUIRE_REAL_DATA=1).
set -euo pipefail
cd "$(dirname "$0")/.."

# "package<TAB>check": the check succeeds when the package's part the tests use is here.
requirements() {
  cat <<'EOF'
dataset-fashion-mnist	[ -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]
python3-prometheus-client	/usr/bin/python3 -c 'import prometheus_client' 2>/dev/null
systemd	command -v systemd-analyze >/dev/null
openmpi-bin	command -v mpirun >/dev/null
libopenmpi-dev	[ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] || [ -e /usr/include/mpi.h ]
libclang-dev	ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1
util-linux	command -v unshare >/dev/null
EOF
}

missing() {
  local pkg check
  while IFS=$'\t' read -r pkg check; do
    bash -c "$check" || echo "$pkg"
  done < <(requirements)
}

install_missing() {
  local need
  mapfile -t need < <(missing)
  [ ${#need[@]} -eq 0 ] && return 0
  echo "== installing the Debian packages the tests need: ${need[*]}"
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      echo "error: the tests need these Debian packages: ${need[*]}" >&2
      echo "       not root, and sudo is not available without a password; install them with" >&2
      echo "       sudo apt-get install -y ${need[*]}" >&2
      exit 2
    fi
  fi
  if ! { "${sudo[@]}" apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}"; }; then
    echo "error: apt-get could not install: ${need[*]}" >&2
    exit 2
  fi
  mapfile -t need < <(missing)
  if [ ${#need[@]} -gt 0 ]; then
    echo "error: installed, but still not usable: ${need[*]}" >&2
    exit 2
  fi
}

case "${1:-}" in
  --list)
    requirements | cut -f1
    exit 0
    ;;
  --install-only)
    install_missing
    exit 0
    ;;
  "") ;;
  *)
    echo "usage: scripts/test.sh [--install-only | --list]" >&2
    exit 2
    ;;
esac

install_missing
export BYOL_REQUIRE_REAL_DATA=1
echo "== cargo test --workspace"
cargo test --workspace
# Data-parallel training under mpirun (2 ranks on loopback), built with the `mpi` feature.
echo "== cargo test --features mpi --test data_parallel"
cargo test -p byol-daemon --features mpi --test data_parallel -- --test-threads=1
echo "== all tests passed"
