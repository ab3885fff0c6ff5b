# Shared by scripts/gpu-check.sh, gpu-run.sh and gpu-dist.sh (sourced, after the caller
# set PARTS to its default): --dry-run, --plan, OUT, the carried binary, time limits per
# case and in all, the device's libraries, and the recording helpers (record, add_json,
# with_peak_memory, ingest, say, part, case_limit, uses, finish).
#
#   --dry-run  every part on CPU at tiny sizes (kept working by daemon/tests/gpu_check.rs)
#   --plan     runs nothing: prints `uses DATASET BATCH [RECORDS]` for every training case
#              at the GPU machine's settings (RECORDS when the case makes its own data),
#              so a test can check every packed dataset holds a batch of each case
#              (scripts/gpu-prepare.sh --plan prints what it packs)
# shellcheck shell=bash
DRY=0
PLAN=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  --plan) PLAN=1 ;;
esac
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
CASE_SECS=${CASE_SECS:-100}
# The whole check ends within TOTAL_SECS (default 240): each case gets the smaller of
# CASE_SECS and what is left; a case with under 10 s left is recorded as skipped.
DEADLINE=$(( $(date +%s) + ${TOTAL_SECS:-240} ))
# The time limit for the next case, in seconds (1: none left; never 0, which `timeout`
# reads as no limit).
case_limit() {
  local left=$(( DEADLINE - $(date +%s) ))
  [ $left -lt 10 ] && { echo 1; return; }
  [ $left -lt "$CASE_SECS" ] && echo $left || echo "$CASE_SECS"
}
# Which parts run (PARTS=ops,step for a first look at the kernels): all by default.
part() { [[ ",$PARTS," == *",$1,"* ]]; }
RESULTS=$OUT/results.jsonl
SUMMARY=$OUT/summary.txt
: > "$RESULTS"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
fail=0

# A training case on a dataset: under --plan, prints `uses DATASET BATCH [RECORDS]` and
# fails (so the case does not run); otherwise succeeds and prints nothing.
uses() {
  if [ $PLAN = 1 ]; then echo "uses $*"; return 1; fi
  return 0
}

# --- 1. the machine and the libraries ------------------------------------------------
if [ $PLAN = 1 ]; then
  DEVICE=cuda:0; TORCH_DEVICE=cuda
elif [ $DRY = 0 ]; then
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
  # A library the binary cannot find fails every case: say which, first.
  missing_libs=$(ldd "$BYOL" 2>&1 | grep "not found")
  if [ -n "$missing_libs" ]; then
    say "FAIL: $BYOL cannot find these libraries:"; say "$missing_libs"; fail=1
  else
    say "libraries: every library of $BYOL found"
  fi
  DEVICE=cuda:0; TORCH_DEVICE=cuda
else
  DEVICE=cpu; TORCH_DEVICE=cpu
  say "dry run: our side on CPU at tiny sizes"
fi
have_torch=0
if [ $PLAN = 0 ]; then
  "$BYOL" --version | tee -a "$SUMMARY" || { say "FAIL: cannot run $BYOL"; exit 1; }
  "$PY" -c "import torch" 2>/dev/null && have_torch=1
  [ $have_torch = 0 ] && say "PyTorch not installed: the peer is skipped"
fi

# Runs "$@", its output to logs/NAME.log, its last line (a JSON object) to results.jsonl
# with "case" added.
record() {
  [ $PLAN = 1 ] && return 0
  local name=$1; shift
  local log=$OUT/logs/$name.log
  local limit; limit=$(case_limit)
  if [ "$limit" -le 1 ]; then
    say "SKIPPED: $name (the check's ${TOTAL_SECS:-240} s are spent)"
    echo "{\"case\": \"$name\", \"skipped\": true}" >> "$RESULTS"; fail=1; return
  fi
  timeout -k 5 "$limit" "$@" > "$log" 2> "$log.err"
  local rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    say "TIMED OUT: $name after ${limit} s"
    echo "{\"case\": \"$name\", \"timed_out\": true}" >> "$RESULTS"; fail=1; return
  fi
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
  [ $PLAN = 1 ] && return 0
  if [ $DRY = 1 ]; then "$@"; return; fi
  local f=$OUT/logs/mem.$$
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$f" 2>/dev/null &
  local poll=$!
  "$@"
  kill $poll 2>/dev/null; wait $poll 2>/dev/null
  PEAK_MIB=$(sort -n "$f" | tail -n 1); PEAK_MIB=${PEAK_MIB:-0}
}


ingest() {
  [ $PLAN = 1 ] && return 0
  local src=$1 out=$2; shift 2
  [ -e "$out/manifest.json" ] && return 0
  "$BYOL" ingest "$src" --out "$out" "$@" > "$OUT/logs/ingest-$(basename "$out").log" 2>&1 \
    || { say "FAIL: ingest $src (see logs/ingest-$(basename "$out").log)"; fail=1; }
  grep -E "^(ingested|time)" "$OUT/logs/ingest-$(basename "$out").log" | sed "s|^|ingest $(basename "$out"): |" | tee -a "$SUMMARY"
}

# The carried datasets (scripts/gpu-prepare.sh) ingested into $OUT/data, once, unless
# FMNIST_TRAIN / PHOTOS name others; sets FMNIST_TRAIN, FMNIST_TEST and PHOTOS.
carried_datasets() {
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
}

# `batch_size` of a config file's [loader] table (the first one in the file).
batch_of() { sed -n 's/^batch_size = \([0-9]*\).*/\1/p' "$1" | head -n 1; }

# Ends the script: under --plan at once; otherwise the logs into one archive and, on the
# GPU machine, everything else under $OUT removed but the files that come back (at most 8,
# none deeper than two folders: the device tool's limit), which are listed; exits with
# the script's verdict.
finish() {
  [ $PLAN = 1 ] && exit 0
  tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs 2>/dev/null
  if [ $DRY = 0 ]; then
    rm -rf "$OUT/logs" "$OUT/bin" "$OUT/data" "$OUT"/run-* "$OUT"/*.toml "$OUT"/daemon
  fi
  local files; files=$(find "$OUT" -type f ! -path "$OUT/logs/*" ! -path "$OUT/bin/*" ! -path "$OUT/data/*" ! -path "$OUT/run-*" ! -name '*.toml' | wc -l)
  say "files under OUT: $files (at most 8 come back)"
  [ "$files" -le 8 ] || { say "FAIL: more than 8 files under OUT"; fail=1; }
  exit $fail
}
