#!/usr/bin/env bash
# Data-parallel training on a GPU machine with one GPU: the NCCL path, as far as one GPU
# allows. Builds nothing: it runs the `--features nccl` binary scripts/gpu-prepare.sh
# packed (gpu-pack/byol-nccl.xz) with the OpenMPI libraries it links (gpu-pack/mpi-lib;
# no MPI call is made in a world of one, but the binary needs them to load) and NCCL
# from PyTorch's wheels.
#
#   scripts/gpu-dist.sh            on the GPU machine; writes everything under $OUT
#   scripts/gpu-dist.sh --dry-run  on CPU at tiny sizes with the CPU binary (NCCL does
#                                  not apply there: the plumbing is what it checks)
#
# Cases (each under CASE_SECS, default 100; the whole within TOTAL_SECS, default 230):
#   nccl-one   a world of one through NCCL (BYOL_NCCL_SINGLE=1) against the plain step:
#              configs/gpu-fmnist.toml for 30 steps each, same seed; the weights must
#              agree (max relative L2 per tensor) within the noise floor the plain run
#              shows against itself (run twice: an algorithm cuDNN runs with atomics is
#              not bit-reproducible): tolerance max(1e-4, 2 x that floor)
#   nccl-r50   ResNet-50 at 224 px, bf16, batch 128, 20 steps through NCCL: the share
#              of the run in the gradient all-reduce (flatten, all-reduce, split)
# `--plan` prints the training cases' datasets and batch sizes.
# On the device machine (carry gpu-pack), as a plain shell line with the time it needs:
#   OUT=$OUT bash scripts/gpu-dist.sh
#       about 3.5 minutes (3 runs of 30 steps at 32 px, 20 steps of ResNet-50 at 224);
#       timeout_s=300
# Writes summary.txt, results.jsonl, nvidia-smi.txt and logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."

CASE_SECS=${CASE_SECS:-100}
TOTAL_SECS=${TOTAL_SECS:-230}
PARTS=${PARTS:-dist}
source scripts/gpu-common.sh "$@"

# The NCCL binary, and the MPI libraries it links.
if [ $DRY = 1 ] || [ $PLAN = 1 ]; then
  NCCL_BYOL=${NCCL_BYOL:-$BYOL}
else
  NCCL_BYOL=${NCCL_BYOL:-$OUT/bin/byol-nccl}
  if [ ! -x "$NCCL_BYOL" ] && [ -e "$PACK/byol-nccl.xz" ]; then
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$PACK/byol-nccl.xz" "$NCCL_BYOL"
    chmod +x "$NCCL_BYOL"
  fi
  [ -d "$PACK/mpi-lib" ] && export LD_LIBRARY_PATH="$PWD/$PACK/mpi-lib:$LD_LIBRARY_PATH"
fi
if [ $PLAN = 0 ]; then
  "$NCCL_BYOL" --version | tee -a "$SUMMARY" || { say "FAIL: cannot run $NCCL_BYOL"; exit 1; }
fi

carried_datasets

# The largest relative L2 difference of any f32 tensor of two safetensors files.
compare() {
  "$PY" - "$1" "$2" <<'PY'
import json, math, struct, sys
def load(p):
    b = open(p, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    out = {}
    for k, v in h.items():
        if k == "__metadata__" or v["dtype"] != "F32":
            continue
        s, e = v["data_offsets"]
        out[k] = struct.unpack("<%df" % ((e - s) // 4), b[8 + n + s:8 + n + e])
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
worst = max((math.sqrt(sum((x - y) ** 2 for x, y in zip(a[k], b[k])) / max(sum(x * x for x in a[k]), 1e-30)), k) for k in a)
print(json.dumps({"max_rel_l2": worst[0], "tensor": worst[1]}))
PY
}

# --- a world of one through NCCL against the plain step -------------------------------
if [ $DRY = 1 ]; then STEPS=4; else STEPS=30; fi
cfg=$OUT/dist-fmnist.toml
sed -e "s/^device = .*/device = \"$DEVICE\"/" configs/gpu-fmnist.toml > "$cfg"
if [ $DRY = 1 ]; then
  sed -i -e 's/^width = .*/width = 8/' -e 's/^batch_size = .*/batch_size = 16/' "$cfg"
fi
for mode in plain plain2 nccl; do
  uses "$(basename "$FMNIST_TRAIN")" "$(batch_of "$cfg")" || break
  env_nccl=(); [ $mode = nccl ] && env_nccl=(BYOL_NCCL_SINGLE=1)
  rm -rf "$OUT/run-dist-$mode"
  timeout -k 5 "$(case_limit)" env "${env_nccl[@]}" "$NCCL_BYOL" train --config "$cfg" --data "$FMNIST_TRAIN" \
    --run "$OUT/run-dist-$mode" --steps $STEPS > "$OUT/logs/dist-$mode.log" 2>&1 \
    || { say "FAIL: the $mode run (see logs/dist-$mode.log)"; fail=1; }
done
ckpt=checkpoints/step-$(printf %010d $STEPS)/online.safetensors
if [ $PLAN = 1 ]; then
  :
elif [ -e "$OUT/run-dist-plain/$ckpt" ] && [ -e "$OUT/run-dist-plain2/$ckpt" ] && [ -e "$OUT/run-dist-nccl/$ckpt" ]; then
  floor=$(compare "$OUT/run-dist-plain/$ckpt" "$OUT/run-dist-plain2/$ckpt")
  row=$(compare "$OUT/run-dist-plain/$ckpt" "$OUT/run-dist-nccl/$ckpt")
  echo "$floor" | add_json nccl-floor
  echo "$row" | add_json nccl-one
  "$PY" -c '
import json, sys
r, f = json.loads(sys.argv[1]), json.loads(sys.argv[2])
d, name, floor, floor_name = r["max_rel_l2"], r["tensor"], f["max_rel_l2"], f["tensor"]
tol = max(1e-4, 2 * floor)
verdict = "PASS" if d <= tol else "FAIL"
print(f"nccl-one: the plain step against itself (noise floor): max relative L2 {floor:.2e} ({floor_name})")
print(f"nccl-one: a world of one through NCCL against the plain step: max relative L2 {d:.2e} ({name}); tolerance {tol:.1e}: {verdict}")
sys.exit(0 if d <= tol else 1)' "$row" "$floor" | tee -a "$SUMMARY"
  [ "${PIPESTATUS[0]}" = 0 ] || fail=1
  grep -h "through NCCL\|data-parallel sync" "$OUT/logs/dist-nccl.log" | sed 's/^/nccl-one: /' | tee -a "$SUMMARY"
else
  say "FAIL: nccl-one: a run left no checkpoint of step $STEPS"; fail=1
fi

# --- the all-reduce's share at ResNet-50 / 224 px --------------------------------------
if [ $DRY = 1 ]; then R50=(8 32 4 3); else R50=(64 224 128 20); fi
read -r width size batch steps <<< "${R50[*]}"
r50=$OUT/dist-r50.toml
cat > "$r50" <<EOF
[augment]
size = $size
[loader]
batch_size = $batch
threads = 0
[model]
arch = "resnet50"
width = $width
[optim]
optimizer = "lars"
[train]
device = "$DEVICE"
precision = "bf16"
total_steps = $steps
log_every = $steps
checkpoint_every_steps = 100000
EOF
uses "$(basename "$PHOTOS")" "$batch" || finish
timeout -k 5 "$(case_limit)" env BYOL_NCCL_SINGLE=1 "$NCCL_BYOL" train --config "$r50" --data "$PHOTOS" \
  --run "$OUT/run-dist-r50" --steps "$steps" > "$OUT/logs/dist-r50.log" 2>&1 \
  || { say "FAIL: nccl-r50 (see logs/dist-r50.log)"; fail=1; }
line=$(grep -h "data-parallel sync" "$OUT/logs/dist-r50.log")
if [ -n "$line" ]; then
  say "nccl-r50: $line"
  "$PY" -c '
import json, re, sys
m = re.search(r"gradients ([0-9.]+) s \(([0-9.]+)%\)", sys.argv[1])
print(json.dumps({"gradients_secs": float(m.group(1)), "gradients_share_percent": float(m.group(2))}))' "$line" | add_json nccl-r50
elif [ $DRY = 1 ]; then
  say "nccl-r50: not through NCCL on CPU (dry run): trained $(grep -c . "$OUT/run-dist-r50/metrics.jsonl" 2>/dev/null || echo 0) logged step(s)"
else
  say "FAIL: nccl-r50: no all-reduce reported (see logs/dist-r50.log)"; fail=1
fi

[ $fail = 0 ] && say "gpu-dist: all parts ran" || say "gpu-dist: some parts FAILED"
finish
