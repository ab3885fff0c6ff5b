#!/usr/bin/env bash
# The GPU check every issue with a GPU machine runs: our BYOL step beside PyTorch's on
# CUDA, a numerical check against our CPU kernels, and a short real training run with
# its evaluation. Builds nothing: it runs the binary and data that
# scripts/gpu-prepare.sh packed into gpu-pack/ (carried to the GPU machine).
#
#   scripts/gpu-check.sh            on the GPU machine; writes everything under $OUT
#   scripts/gpu-check.sh --dry-run  our side of every part on CPU at tiny sizes (the peer
#                                   only where PyTorch is installed): kept working by a test
#
# Environment: OUT (results folder; default: a temp folder), BYOL (the binary; default:
# gpu-pack/byol.xz unpacked into $OUT/bin, or target/release/byol when dry), PYTHON
# (default python3),
# FMNIST_TRAIN / FMNIST_TEST / PHOTOS (datasets; default: the files in gpu-pack/,
# ingested into $OUT/data/ first).
#
# On the device machine (one call, about 4 minutes; carry gpu-pack):
#   run(command="OUT=$OUT bash scripts/gpu-check.sh", carry=["gpu-pack"], timeout_s=420)
# Writes: summary.txt (the figures), results.jsonl (one JSON object per measurement),
# nvidia-smi.txt, and a log per command under logs/.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT/logs"
PY=${PYTHON:-python3}
PACK=${PACK:-gpu-pack}
if [ $DRY = 1 ]; then BYOL=${BYOL:-target/release/byol}; else BYOL=${BYOL:-$OUT/bin/byol}; fi
# The carried binary is xz-compressed (the device machine has Python, maybe not xz).
if [ ! -x "$BYOL" ] && [ -e "$PACK/byol.xz" ]; then
  mkdir -p "$(dirname "$BYOL")"
  "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$PACK/byol.xz" "$BYOL"
  chmod +x "$BYOL"
fi
RESULTS=$OUT/results.jsonl
SUMMARY=$OUT/summary.txt
: > "$RESULTS"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
fail=0

# --- 1. the machine and the libraries ------------------------------------------------
if [ $DRY = 0 ]; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  head -15 "$OUT/nvidia-smi.txt" | tee -a "$SUMMARY"
  # candle loads cuBLAS, cuRAND, cuDNN, NVRTC from PyTorch's wheels (nvidia/*/lib).
  libs=$("$PY" - <<'PY'
import glob, os, importlib.util
spec = importlib.util.find_spec("nvidia")
roots = list(spec.submodule_search_locations) if spec else []
print(":".join(sorted({d for r in roots for d in glob.glob(os.path.join(r, "*", "lib")) + glob.glob(os.path.join(r, "*", "*", "lib"))})))
PY
)
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  DEVICE=cuda:0; TORCH_DEVICE=cuda
else
  DEVICE=cpu; TORCH_DEVICE=cpu
  say "dry run: our side on CPU at tiny sizes"
fi
"$BYOL" --version | tee -a "$SUMMARY" || { say "FAIL: cannot run $BYOL"; exit 1; }
have_torch=0
"$PY" -c "import torch" 2>/dev/null && have_torch=1
[ $have_torch = 0 ] && say "PyTorch not installed: the peer is skipped"

# Runs "$@", its output to logs/NAME.log, its last line (a JSON object) to results.jsonl
# with "case" added.
record() {
  local name=$1; shift
  local log=$OUT/logs/$name.log
  "$@" > "$log" 2> "$log.err"
  local rc=$?
  # A check that fails still prints its figures: keep them.
  add_json "$name" < <(tail -n 1 "$log") || { say "FAIL: $name printed no JSON (see $log)"; fail=1; }
  if [ $rc != 0 ]; then
    say "FAIL: $name exited $rc (see $log.err)"; tail -n 5 "$log.err" | tee -a "$SUMMARY"; fail=1
  fi
}

# Appends the JSON object on stdin to results.jsonl with "case" (and KEY=VALUE numbers)
# added; fails on anything else, an empty input included.
add_json() {
  local name=$1; shift
  "$PY" -c '
import json, sys
d = json.loads(sys.stdin.read())
d["case"] = sys.argv[1]
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1)
    d[k] = int(v)
print(json.dumps(d))' "$name" "$@" >> "$RESULTS" 2>/dev/null
}

# Peak GPU memory of the device while "$@" runs (nvidia-smi every 100 ms), in MiB, into
# the variable PEAK_MIB; 0 on CPU.
with_peak_memory() {
  PEAK_MIB=0
  if [ $DRY = 1 ]; then "$@"; return; fi
  local f=$OUT/logs/mem.$$
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$f" 2>/dev/null &
  local poll=$!
  "$@"
  kill $poll 2>/dev/null; wait $poll 2>/dev/null
  PEAK_MIB=$(sort -n "$f" | tail -n 1); PEAK_MIB=${PEAK_MIB:-0}
}

# --- 2. our step beside PyTorch's --------------------------------------------------------
if [ $DRY = 1 ]; then
  # name arch stem width size batch
  CASES=("r18-32 resnet18 cifar 8 16 4"
         "r50-224 resnet50 imagenet 8 32 2")
  STEPS="--warmup 1 --steps 1"; PSTEPS="--warmup 1 --steps 1"
else
  CASES=("r18-32 resnet18 cifar 64 32 256"
         "r50-224 resnet50 imagenet 64 224 64")
  STEPS="--warmup 3 --steps 10"; PSTEPS="--warmup 3 --steps 10"
fi
idle_mib=0
[ $DRY = 0 ] && idle_mib=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
for c in "${CASES[@]}"; do
  read -r name arch stem width size batch <<< "$c"
  args=(--arch "$arch" --width "$width" --size "$size" --batch "$batch")
  [ "$stem" = cifar ] && args+=(--small-stem)
  for prec in fp32 bf16; do
    with_peak_memory record "ours-$name-$prec" "$BYOL" bench step "${args[@]}" --device $DEVICE --precision $prec $STEPS --json
    echo "{\"case\": \"ours-$name-$prec-memory\", \"peak_device_mib\": $PEAK_MIB, \"idle_device_mib\": $idle_mib}" >> "$RESULTS"
    if [ $have_torch = 1 ]; then
      record "pytorch-$name-$prec" "$PY" scripts/peer_torch_byol_step.py --device $TORCH_DEVICE \
        --arch $arch --stem $stem --width $width --res $size --batch $batch --precision $prec \
        --tf32 off $PSTEPS --threads 2 --json
    fi
  done
done

# --- 3. numerical check: CUDA (or candle's kernels, when dry) against our CPU kernels ----
if [ $DRY = 1 ]; then CHECK_KERNELS=candle; CHECK="--width 8 --size 16 --batch 4"; else CHECK_KERNELS=auto; CHECK="--width 16 --size 32 --batch 16"; fi
record "check-fp32" "$BYOL" bench check --arch resnet18 --small-stem $CHECK --device $DEVICE --kernels $CHECK_KERNELS --precision fp32 --tolerance 1e-3 --json
record "check-bf16" "$BYOL" bench check --arch resnet18 --small-stem $CHECK --device $DEVICE --kernels $CHECK_KERNELS --precision bf16 --tolerance 1e-2 --json

# --- 4. real training: Fashion-MNIST for 2 minutes, then eval; data wait at 224 ----------
# The carried files (scripts/gpu-prepare.sh) are ingested here, timed like the rest.
ingest() {
  local src=$1 out=$2; shift 2
  [ -e "$out/manifest.json" ] && return 0
  "$BYOL" ingest "$src" --out "$out" "$@" > "$OUT/logs/ingest-$(basename "$out").log" 2>&1 \
    || { say "FAIL: ingest $src (see logs/ingest-$(basename "$out").log)"; fail=1; }
  grep -E "^(ingested|time)" "$OUT/logs/ingest-$(basename "$out").log" | sed "s|^|ingest $(basename "$out"): |" | tee -a "$SUMMARY"
}
if [ -z "${FMNIST_TRAIN:-}" ] && [ -e "$PACK/fmnist/train-images-idx3-ubyte.gz" ]; then
  ingest "$PACK/fmnist/train-images-idx3-ubyte.gz" "$OUT/data/fmnist-train" --config configs/small.toml
  ingest "$PACK/fmnist/t10k-images-idx3-ubyte.gz" "$OUT/data/fmnist-test" --config configs/small.toml
fi
if [ -z "${PHOTOS:-}" ] && [ -d "$PACK/photos" ]; then
  ingest "$PACK/photos" "$OUT/data/photos"
fi
FMNIST_TRAIN=${FMNIST_TRAIN:-$OUT/data/fmnist-train}
FMNIST_TEST=${FMNIST_TEST:-$OUT/data/fmnist-test}
PHOTOS=${PHOTOS:-$OUT/data/photos}
CFG=configs/gpu-fmnist.toml
MINUTES=2
if [ $DRY = 1 ]; then
  MINUTES=0.05
  CFG=$OUT/tiny.toml
  sed -e 's/^width = 64/width = 8/' -e 's/^batch_size = 512/batch_size = 16/' \
      -e 's/^device = "cuda:0"/device = "cpu"/' configs/gpu-fmnist.toml > "$CFG"
fi
if [ -e "$FMNIST_TRAIN/manifest.json" ]; then
  with_peak_memory "$BYOL" train --config "$CFG" --data "$FMNIST_TRAIN" --run "$OUT/run-fmnist" --minutes $MINUTES \
    > "$OUT/logs/train-fmnist.log" 2>&1 || { say "FAIL: train (see logs/train-fmnist.log)"; fail=1; }
  tail -n 3 "$OUT/logs/train-fmnist.log" | tee -a "$SUMMARY"
  add_json train-fmnist "peak_device_mib=$PEAK_MIB" < <(tail -n 1 "$OUT/run-fmnist/metrics.jsonl" 2>/dev/null) \
    || { say "FAIL: the Fashion-MNIST run logged no metrics"; fail=1; }
  eval_args=(--checkpoint "$OUT/run-fmnist" --train "$FMNIST_TRAIN" --test "$FMNIST_TEST" --protocol knn --random-init)
  [ $DRY = 1 ] && eval_args+=(--device cpu)
  "$BYOL" eval "${eval_args[@]}" --json "$OUT/eval-fmnist.json" > "$OUT/logs/eval-fmnist.log" 2>&1 \
    || { say "FAIL: eval (see logs/eval-fmnist.log)"; fail=1; }
  add_json eval-fmnist-report < "$OUT/eval-fmnist.json" 2>/dev/null \
    || { say "FAIL: no evaluation report"; fail=1; }
else
  say "FAIL: no Fashion-MNIST dataset at $FMNIST_TRAIN (scripts/gpu-prepare.sh packs it)"; fail=1
fi
if [ -e "$PHOTOS/manifest.json" ]; then
  # The loader feeding ResNet-50 at 224: how long the step waits for data.
  P224=$OUT/r50-224.toml
  if [ $DRY = 1 ]; then
    printf '[model]\narch = "resnet50"\nwidth = 8\n[loader]\nbatch_size = 4\n[augment]\nsize = 32\n[train]\ndevice = "cpu"\nlog_every = 2\n' > "$P224"; PSTEPS_TRAIN=2
  else
    printf '[model]\narch = "resnet50"\n[loader]\nbatch_size = 64\n[train]\ndevice = "cuda:0"\nlog_every = 20\ncheckpoint_every_steps = 0\ncheckpoint_every_minutes = 0.0\n' > "$P224"; PSTEPS_TRAIN=60
  fi
  "$BYOL" train --config "$P224" --data "$PHOTOS" --run "$OUT/run-photos" --steps $PSTEPS_TRAIN \
    > "$OUT/logs/train-photos.log" 2>&1 || { say "FAIL: train at 224 (see logs/train-photos.log)"; fail=1; }
  add_json loader-r50-224 < <(tail -n 1 "$OUT/run-photos/metrics.jsonl" 2>/dev/null) \
    || { say "FAIL: the run at 224 logged no metrics"; fail=1; }
else
  say "no photos dataset at $PHOTOS: the data-wait measurement at 224 is skipped"
fi

# --- the figures --------------------------------------------------------------------------
"$PY" - "$RESULTS" <<'PY' | tee -a "$SUMMARY"
import json, sys
rows = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    rows[d["case"]] = d
print()
print(f"{'step':<16}{'ours img/s':>12}{'pytorch img/s':>15}{'ours/pytorch':>14}{'ours peak MiB':>15}{'pytorch reserved MiB':>22}")
for name in ["r18-32", "r50-224"]:
    for prec in ["fp32", "bf16"]:
        o = rows.get(f"ours-{name}-{prec}", {})
        p = rows.get(f"pytorch-{name}-{prec}", {})
        m = rows.get(f"ours-{name}-{prec}-memory", {})
        oi, pi = o.get("images_per_sec"), p.get("images_per_sec")
        ratio = f"{oi / pi:.2f}" if oi and pi else "-"
        peak = m.get("peak_device_mib", 0) - m.get("idle_device_mib", 0)
        res = p.get("max_reserved_bytes")
        print(f"{name + ' ' + prec:<16}{oi or 0:>12.1f}{pi or 0:>15.1f}{ratio:>14}{peak:>15}{(res or 0) / 2**20:>22.0f}")
for k in ["check-fp32", "check-bf16"]:
    c = rows.get(k)
    if c:
        print(f"{k}: loss {c['loss_checked']:.6f} vs {c['loss_reference']:.6f}; gradient error median {c['median_rel_l2']:.2e}, max {c['max_rel_l2']:.2e} ({c['worst'][0]['name']}); tolerance {c['tolerance']:.0e}: {'PASS' if c['pass'] else 'FAIL'}")
t = rows.get("train-fmnist")
if t:
    print(f"train fmnist: step {t['step']}, loss {t['loss']:.4f}, {t['images_per_sec']:.0f} img/s, data wait {t['data_wait_secs']:.2f} s in the last window, peak device {t.get('peak_device_mib', 0)} MiB")
e = rows.get("eval-fmnist-report")
if e:
    for r in e.get("results", []):
        print(f"eval fmnist: {r['encoder']} {r['protocol']} top-1 {100 * r['accuracy']:.2f}%")
l = rows.get("loader-r50-224")
if l:
    print(f"loader r50 224: {l['images_per_sec']:.0f} img/s, waiting for data {l['data_wait_secs']:.2f} s over the last {l.get('step')} steps' window")
PY
[ $fail = 0 ] && say "gpu-check: all parts ran" || say "gpu-check: some parts FAILED"
exit $fail
