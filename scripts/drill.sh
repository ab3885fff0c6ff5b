#!/usr/bin/env bash
# Fault drills for the byol daemon (the long versions of daemon/tests/drills.rs):
#   1. kill -9 at random moments, 20 times, while files keep arriving, restarting each
#      time: every restart succeeds, `byol inspect --verify` passes, the step never
#      falls below the last checkpoint's; at the end every complete file is in the
#      dataset exactly once with its final content and label.
#   2. 10,000 files landing at once.
#   3. A full disk while writing shards, checkpoints and metrics.jsonl (tmpfs; needs
#      root): a clear error, the previous state intact, training goes on, and the
#      daemon carries on once there is room (every metrics line written, none torn).
#   4. The watched folder deleted: the daemon keeps running, nothing is retired.
#   5. The watched folder replaced (mv in in.old; mkdir in): watched again, the new
#      folder's files ingested.
#   6. inotify's watch limit reached by new sub-folders while the daemon runs (in a user
#      namespace with its own limit): they are polled, and their later files ingested.
#   7. Folders whose watch cannot be added: class folders moved in unreadable (mode 000,
#      the daemon without root's powers in a user namespace), made readable later: each
#      said once, watched natively again, its files and later files ingested.
#
# Usage: scripts/drill.sh [--kills N] [--files N] [--photos DIR] [--only 1,7] [--byol PATH]
# Needs a release build (cargo build --release), or the binary to drill in --byol (e.g. an
# older commit's, for figures before and after). Prints one line per finding and a summary;
# exits 1 on the first broken promise.
set -euo pipefail
HERE=$PWD
cd "$(dirname "$0")/.."
KILLS=20 FILES=10000 PHOTOS=../shared/data/photos256 ONLY=1,2,3,4,5,6,7 BYOL=$PWD/target/release/byol
while [ $# -gt 0 ]; do
  case "$1" in
    --kills) KILLS=$2; shift 2 ;;
    --files) FILES=$2; shift 2 ;;
    --photos) PHOTOS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --byol) BYOL=$(cd "$HERE" && realpath "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$BYOL" ] || { echo "build first: cargo build --release" >&2; exit 2; }
W=$(mktemp -d /tmp/byol-drill.XXXXXX)
echo "drill folder: $W"
mapfile -t SEEDS < <(find "$PHOTOS" -name '*.jpg' | sort)
[ ${#SEEDS[@]} -gt 0 ] || { echo "no photos in $PHOTOS" >&2; exit 2; }
fail() { echo "FAIL: $*" >&2; exit 1; }
# No daemon outlives the drill, however it ends.
trap 'kill -9 $(jobs -p) 2>/dev/null || true; umount "$W"/full/data "$W"/full/run 2>/dev/null || true' EXIT

config() { # $1 = folder, $2 = extra [daemon] lines
  cat > "$1/d.toml" <<TOML
[augment]
preset = "small"
size = 32
[loader]
batch_size = 16
threads = 1
newest_share = 0.25
newest_records = 256
[model]
arch = "resnet18"
width = 8
small_stem = true
projector_hidden = 64
projection_dim = 32
predictor_hidden = 64
[optim]
optimizer = "adamw"
base_lr = 1e-3
warmup_steps = 10
schedule = "constant"
[train]
device = "cpu"
log_every = 10
checkpoint_every_steps = 5
keep_last = 2
[ingest]
max_side = 64
shard_size_mib = 1
[daemon]
watch = [{ path = "$1/in", layout = "imagefolder" }]
data = "$1/data"
run = "$1/run"
listen = "127.0.0.1:0"
settle_secs = 0.3
idle_after_epochs = 0
new_data_within_steps = 10
retry_secs = 2.0
$2
TOML
}

# A distinct file: photo i (cycling) with its number appended (JPEG readers ignore it).
N=0
new_file() { # $1 = folder
  local cls=$((N % 3)) src=${SEEDS[$((N % ${#SEEDS[@]}))]}
  mkdir -p "$1/c$cls"
  if [ $((N % 2)) = 0 ]; then
    { cat "$src"; printf 'byol-drill-%08d' "$N"; } > "$1/c$cls/f$N.jpg"
  else
    { cat "$src"; printf 'byol-drill-%08d' "$N"; } > "$1/c$cls/f$N.jpg.part"
    mv "$1/c$cls/f$N.jpg.part" "$1/c$cls/f$N.jpg"
  fi
  N=$((N + 1))
}

newest_checkpoint() { { ls "$1/run/checkpoints" 2>/dev/null || true; } | { grep -v tmp || true; } | sed "s/step-0*//" | sort -n | tail -1; }

# The dataset's sources against the files: every complete file once, same content, class.
dataset_matches() { # $1 = drill folder
  /usr/bin/python3 - "$1" <<'PY'
import hashlib, json, os, sys
root = sys.argv[1]
try:
    from blake3 import blake3 as h
except ImportError:
    h = None
m = json.load(open(os.path.join(root, "data/manifest.json")))
src = {s["path"]: (s["hash"], s.get("label")) for s in m["sources"]}
files = {}
for cls in sorted(os.listdir(os.path.join(root, "in"))):
    d = os.path.join(root, "in", cls)
    for f in os.listdir(d):
        if f.endswith(".part"):
            continue
        files[os.path.realpath(os.path.join(d, f))] = cls
missing = [p for p in files if p not in src]
extra = [p for p in src if p not in files]
wrong = [p for p, c in files.items() if p in src and src[p][1] != c]
print(f"  dataset: {len(src)} sources for {len(files)} files; missing {len(missing)}, "
      f"extra {len(extra)}, wrong label {len(wrong)}")
sys.exit(1 if missing or extra or wrong else 0)
PY
}
check_dataset() { dataset_matches "$1" || fail "dataset does not match the folders"; }
# Console lines (said once each) matching $2; the log's own lines, which begin with a
# timestamp, not counted.
said() { grep -v '^[0-9]\{4\}-[0-9][0-9]-[0-9][0-9]T' "$1" | grep -c "$2" || true; }
runs() { [[ ",$ONLY," == *",$1,"* ]]; }

wait_all_ingested() { # $1 = folder, $2 = seconds
  local t=0
  until dataset_matches "$1" >/dev/null 2>&1; do
    sleep 1; t=$((t + 1)); [ $t -lt "$2" ] || { check_dataset "$1"; fail "not all files ingested in $2 s"; }
  done
}

if runs 1; then
echo "== 1. kill -9 at random moments, $KILLS times, files arriving"
D=$W/kills; mkdir -p "$D/in"; config "$D" ""
for _ in $(seq 1 32); do new_file "$D/in"; done
floor=0; restarts=0; committed=0; early=0
for i in $(seq 1 "$KILLS"); do
  "$BYOL" daemon --config "$D/d.toml" > "$D/out$i.txt" 2>&1 &
  pid=$!
  for _ in $(seq 1 3); do new_file "$D/in"; done
  sleep "$(/usr/bin/python3 -c "import random; random.seed($i); print(round(random.uniform(0.2, 6.0), 2))")"
  kill -9 "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  from=$(grep -m1 -o 'training from step [0-9]*' "$D/out$i.txt" | grep -o '[0-9]*$' || true)
  if [ -n "$from" ]; then
    [ "$from" -ge "$floor" ] || fail "kill $i: resumed at $from, below the checkpoint at $floor"
    restarts=$((restarts + 1))
  fi
  if [ ! -e "$D/data/manifest.json" ] && [ "$committed" = 0 ]; then
    # Killed before the first commit (a loaded machine): no dataset yet, the next start begins it.
    early=$((early + 1))
  else
    "$BYOL" inspect "$D/data" --verify > "$D/verify$i.txt" 2>&1 || fail "kill $i: inspect --verify: $(tail -3 "$D/verify$i.txt")"
    committed=1
  fi
  floor=$(newest_checkpoint "$D"); floor=${floor:-0}
done
"$BYOL" daemon --config "$D/d.toml" > "$D/final.txt" 2>&1 &
pid=$!
wait_all_ingested "$D" 120
kill -TERM $pid; wait $pid || fail "the final stop did not exit 0"
check_dataset "$D"
echo "  $KILLS kills ($early before the first commit), $restarts restarts reached training, every inspect --verify passed, newest checkpoint step $floor"
fi
if runs 2; then
echo "== 2. $FILES files landing at once"
D=$W/flood; mkdir -p "$D/in" "$D/stage"; config "$D" ""
"$BYOL" daemon --config "$D/d.toml" > "$D/out.txt" 2>&1 &
pid=$!
N0=$N; for _ in $(seq 1 "$FILES"); do new_file "$D/stage"; done
start=$(date +%s.%N)
for c in "$D"/stage/*; do mv "$c" "$D/in/"; done
wait_all_ingested "$D" 900
secs=$(/usr/bin/python3 -c "import time; print(round(time.time() - $start, 1))")
kill -0 $pid || fail "the daemon died under the flood"
rss=$(grep RssAnon /proc/$pid/status | awk '{print $2}')
kill -TERM $pid; wait $pid || fail "stop after the flood"
echo "  $FILES files in ${secs} s, anonymous RSS ${rss} kB at the end"
fi
if runs 3; then
echo "== 3. a full disk (tmpfs)"
if [ "$(id -u)" != 0 ]; then
  echo "  skipped: mounting a tmpfs needs root"
else
  D=$W/full; mkdir -p "$D/in" "$D/data" "$D/run"; config "$D" ""
  mount -t tmpfs -o size=3m tmpfs "$D/data"
  mount -t tmpfs -o size=5m tmpfs "$D/run"   # room for one checkpoint of this network (2.9 MB), not two
  for _ in $(seq 1 40); do new_file "$D/in"; done
  "$BYOL" daemon --config "$D/d.toml" > "$D/out.txt" 2>&1 &
  pid=$!
  sleep 4
  for _ in $(seq 1 400); do new_file "$D/in"; done
  t=0; until grep -q "ingest failed" "$D/out.txt"; do sleep 1; t=$((t+1)); [ $t -lt 120 ] || fail "no ingest error on a full disk"; done
  grep -m1 "^error: ingest failed" "$D/out.txt" | sed 's/^/  /'
  kill -0 $pid || fail "the daemon died on a full disk"
  "$BYOL" inspect "$D/data" --verify > "$D/verify.txt" 2>&1 || fail "dataset damaged by the full disk"
  echo "  dataset intact after ENOSPC: $(grep -m1 -i 'records' "$D/verify.txt")"
  # Checkpoints on a full disk: the run folder's tmpfs holds one checkpoint, not two.
  t=0; until grep -q "checkpoint failed" "$D/out.txt"; do sleep 1; t=$((t+1)); [ $t -lt 180 ] || fail "no checkpoint failure on a full disk"; done
  grep -m1 "^error: checkpoint failed" "$D/out.txt" | sed 's/^/  /'
  ls "$D/run/checkpoints" | sed 's/^/  still there: /'
  kill -0 $pid || fail "the daemon died when a checkpoint failed"
  # metrics.jsonl on a full disk: the lines wait, training goes on.
  dd if=/dev/zero of="$D/run/filler" bs=64k 2>/dev/null || true
  t=0; until grep -q "metrics failed" "$D/out.txt"; do sleep 1; t=$((t+1)); [ $t -lt 120 ] || fail "no metrics failure on a full disk"; done
  grep -m1 "^error: metrics failed" "$D/out.txt" | sed 's/^/  /'
  before=$(grep -c '^step ' "$D/out.txt"); sleep 5; after=$(grep -c '^step ' "$D/out.txt")
  [ "$after" -gt "$before" ] || fail "training stopped on a full disk"
  echo "  training went on on a full disk: $((after - before)) step lines in 5 s"
  kill -0 $pid || fail "the daemon died when a metrics write failed"
  rm -f "$D/run/filler"
  mount -o remount,size=256m "$D/data"; mount -o remount,size=256m "$D/run"
  t=0; until grep -q "metrics written again" "$D/out.txt"; do sleep 1; t=$((t+1)); [ $t -lt 120 ] || fail "the metrics lines were not written after the retry"; done
  /usr/bin/python3 - "$D/run/metrics.jsonl" <<'PY' || fail "metrics.jsonl lost or tore a line"
import json, sys
steps = [json.loads(l)["step"] for l in open(sys.argv[1])]
gaps = [b for a, b in zip(steps, steps[1:]) if b != a + 10]
print(f"  metrics.jsonl after the outage: {len(steps)} whole lines, steps {steps[0]}..{steps[-1]}, gaps {len(gaps)}")
sys.exit(1 if gaps else 0)
PY
  wait_all_ingested "$D" 300
  echo "  room again: every file ingested after the retry"
  kill -TERM $pid; wait $pid || fail "stop after the full disk"
  umount "$D/data" "$D/run"
fi
fi
if runs 4; then
echo "== 4. the watched folder deleted"
D=$W/gone; mkdir -p "$D/in"; config "$D" ""
for _ in $(seq 1 40); do new_file "$D/in"; done
"$BYOL" daemon --config "$D/d.toml" > "$D/out.txt" 2>&1 &
pid=$!
wait_all_ingested "$D" 120
before=$(/usr/bin/python3 -c "import json; print(len(json.load(open('$D/data/manifest.json'))['sources']))")
rm -rf "$D/in"; sleep 3
kill -0 $pid || fail "the daemon died when its folder was deleted"
after=$(/usr/bin/python3 -c "import json; print(len(json.load(open('$D/data/manifest.json'))['sources']))")
kill -TERM $pid; wait $pid || fail "stop after the deletion"
echo "  sources before $before, after $after"
[ "$after" = "$before" ] || echo "  note: files deleted one by one before the folder itself went were retired"
fi
if runs 5; then
echo "== 5. the watched folder replaced (mv in in.old; mkdir in)"
D=$W/replaced; mkdir -p "$D/in"; config "$D" ""
for _ in $(seq 1 40); do new_file "$D/in"; done
"$BYOL" daemon --config "$D/d.toml" > "$D/out.txt" 2>&1 &
pid=$!
wait_all_ingested "$D" 120
mv "$D/in" "$D/in.old"; mkdir "$D/in"
t=0; until grep -q "was replaced; watching the new folder" "$D/out.txt"; do sleep 1; t=$((t+1)); [ $t -lt 30 ] || fail "the replaced folder was not watched again"; done
start=$(date +%s.%N)
for _ in $(seq 1 40); do new_file "$D/in"; done
wait_all_ingested "$D" 120
secs=$(/usr/bin/python3 -c "import time; print(round(time.time() - $start, 1))")
kill -TERM $pid; wait $pid || fail "stop after the replacement"
echo "  the new folder's 40 files in ${secs} s; the dataset matches the new folder"
fi
if runs 6; then
echo "== 6. inotify's watch limit reached by new sub-folders (a user namespace's own limit)"
if ! unshare -U -r true 2>/dev/null; then
  echo "  skipped: no user namespaces here"
else
  D=$W/limit; mkdir -p "$D/in/c0"; config "$D" "poll_interval_secs = 1.0"
  for _ in $(seq 1 20); do new_file "$D/in"; done
  # The limit admits the folders that exist now (in, c0..c2) and no new one.
  unshare -U -r sh -c 'echo 4 > /proc/sys/user/max_inotify_watches && exec "$0" daemon --config "$1"' \
    "$BYOL" "$D/d.toml" > "$D/out.txt" 2>&1 &
  pid=$!
  wait_all_ingested "$D" 120
  start=$(date +%s.%N)
  for k in 1 2 3; do mkdir -p "$D/in/new$k"; done
  sleep 2
  for k in 1 2 3; do for j in 1 2 3 4 5; do
    cp "${SEEDS[$(( (k * 5 + j) % ${#SEEDS[@]} ))]}" "$D/in/new$k/late$j.jpg"
  done; done
  wait_all_ingested "$D" 120
  secs=$(/usr/bin/python3 -c "import time; print(round(time.time() - $start, 1))")
  grep -m1 "^warning: .*watch limit" "$D/out.txt" | sed 's/^/  /'
  kill -TERM $pid; wait $pid || fail "stop after the watch limit"
  echo "  15 files written into 3 sub-folders past the limit, all ingested in ${secs} s"
fi
fi
if runs 7; then
echo "== 7. folders whose watch cannot be added (unreadable when moved in; the daemon without root's powers)"
if ! unshare -U sh -c 'test ! -r /proc/1/root' 2>/dev/null; then
  echo "  skipped: no user namespace without root's powers here"
else
  D=$W/unwatched; mkdir -p "$D/in/c0" "$D/stage"; config "$D" "poll_interval_secs = 1.0"
  for _ in $(seq 1 20); do new_file "$D/in"; done
  unshare -U "$BYOL" daemon --config "$D/d.toml" > "$D/out.txt" 2>&1 &
  pid=$!
  wait_all_ingested "$D" 120
  for k in 1 2 3 4 5; do
    mkdir -p "$D/stage/p$k"
    for j in 1 2; do cp "${SEEDS[$(( (k * 7 + j) % ${#SEEDS[@]} ))]}" "$D/stage/p$k/early$j.jpg"; done
    chmod 000 "$D/stage/p$k"; mv "$D/stage/p$k" "$D/in/p$k"
  done
  t=0; until [ "$(said "$D/out.txt" 'cannot watch natively')" -ge 5 ]; do sleep 1; t=$((t+1)); [ $t -lt 30 ] || fail "the failed watches were not said"; done
  sleep 2
  said=$(said "$D/out.txt" 'cannot watch natively')
  [ "$said" = 5 ] || fail "each failed watch said once: $said lines for 5 folders"
  start=$(date +%s.%N)
  for k in 1 2 3 4 5; do chmod 755 "$D/in/p$k"; done
  t=0; until [ "$(said "$D/out.txt" 'is watched natively again')" -ge 5 ]; do sleep 1; t=$((t+1)); [ $t -lt 30 ] || fail "the watches were not restored"; done
  restored=$(/usr/bin/python3 -c "import time; print(round(time.time() - $start, 1))")
  for k in 1 2 3 4 5; do for j in 1 2 3; do
    cp "${SEEDS[$(( (k * 11 + j) % ${#SEEDS[@]} ))]}" "$D/in/p$k/late$j.jpg"
  done; done
  start=$(date +%s.%N)
  wait_all_ingested "$D" 120
  secs=$(/usr/bin/python3 -c "import time; print(round(time.time() - $start, 1))")
  grep -m1 '^warning: .*cannot watch natively' "$D/out.txt" | sed 's/^/  /'
  kill -TERM $pid; wait $pid || fail "stop after the unreadable folders"
  echo "  5 unreadable folders: said once each, watched natively ${restored} s after the chmod; their 25 files ingested (15 later ones in ${secs} s)"
fi
fi
echo "all drills passed; logs in $W"
