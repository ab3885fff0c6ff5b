#!/usr/bin/env bash
# The GPU run around the step: how much of the step's speed a full `byol train` keeps,
# and what 2 GPU-minutes of training give on Fashion-MNIST beside PyTorch's reference
# given the same 2 minutes on the same GPU. Builds nothing: it runs what
# scripts/gpu-prepare.sh packed into gpu-pack/ (carried to the GPU machine).
#
#   scripts/gpu-run.sh            on the GPU machine; writes everything under $OUT
#   scripts/gpu-run.sh --dry-run  every part on CPU at tiny sizes (the peer only where
#                                 PyTorch is installed): kept working by a test
#
# Parts (PARTS, default steady,daemon,quality):
#   steady   step-only images/s (`byol bench step`) against full `byol train` images/s
#            on real data, for ResNet-18 w64 at 32 px, batch 512, and ResNet-50 at
#            224 px, batch 256, both bf16: run_over_step (aim >= 0.95) and the share
#            of the time the step waited for data (aim < 2%), loader threads one per core
#   quality  `byol train --minutes 2` with configs/gpu-fmnist.toml on all 60,000
#            training images, then `byol eval --protocol both --random-init --pixels` on
#            the 10,000 test images; beside it scripts/peer_byol_fmnist.py --device cuda
#   daemon   `byol daemon` on ResNet-50 at 224 px, bf16, batch 64, for at most 90 s, under
#            a wave of 2,000 distinct images made from the carried photos
#            (scripts/gpu_daemon_run.py): training images/s with the wave against
#            without (aim >= 0.9), seconds from the wave to its first batch, peak device
#            memory, and SIGTERM ending within stop_timeout_secs with a checkpoint
# Every case has a time limit (CASE_SECS, default 150) and the whole ends within
# TOTAL_SECS (default 290). `--plan` prints the training cases' datasets and batch sizes.
# On the device machine (carry gpu-pack), as plain shell lines with the time each needs:
#   OUT=$OUT PARTS=steady,daemon bash scripts/gpu-run.sh
#       about 4 minutes (2 x (step bench ~20 s + run ~40 s), daemon 90 s + stop); timeout_s=300
#   OUT=$OUT PARTS=quality bash scripts/gpu-run.sh
#       about 5 minutes (ingest ~30 s, 2 + 2 minutes of training, evaluations); timeout_s=330
# Writes summary.txt, results.jsonl (per network run_over_step; the eval reports),
# nvidia-smi.txt and logs.tar.gz: at most 8 files.
set -uo pipefail
cd "$(dirname "$0")/.."

PARTS=${PARTS:-steady,daemon,quality}
CASE_SECS=${CASE_SECS:-150}
TOTAL_SECS=${TOTAL_SECS:-290}
source scripts/gpu-common.sh "$@"

carried_datasets

# --- steady state: the run against the step ---------------------------------------------
if part steady; then
if [ $DRY = 1 ]; then
  # name arch stem width size batch steps data
  CASES=("r18-32 resnet18 cifar 8 16 8 6 $FMNIST_TRAIN"
         "r50-224 resnet50 imagenet 8 32 4 6 $PHOTOS")
  BENCH="--warmup 1 --steps 2"; LOG_EVERY=3
else
  CASES=("r18-32 resnet18 cifar 64 32 512 60 $FMNIST_TRAIN"
         "r50-224 resnet50 imagenet 64 224 256 40 $PHOTOS")
  BENCH="--warmup 3 --steps 10"; LOG_EVERY=10
fi
for c in "${CASES[@]}"; do
  read -r name arch stem width size batch steps data <<< "$c"
  args=(--arch "$arch" --width "$width" --size "$size" --batch "$batch")
  small=false; [ "$stem" = cifar ] && { args+=(--small-stem); small=true; }
  record "step-$name" "$BYOL" bench step "${args[@]}" --device $DEVICE --precision bf16 $BENCH --json
  uses "$(basename "$data")" "$batch" || continue
  if [ ! -e "$data/manifest.json" ]; then
    say "FAIL: no dataset at $data (scripts/gpu-prepare.sh packs it)"; fail=1; continue
  fi
  cfg=$OUT/steady-$name.toml
  preset=small; [ "$stem" = imagenet ] && preset=byol
  printf '[augment]\npreset = "%s"\nsize = %s\n[loader]\nbatch_size = %s\nthreads = 0\n[model]\narch = "%s"\nwidth = %s\nsmall_stem = %s\n[optim]\noptimizer = "lars"\nbase_lr = 0.2\nwarmup_steps = 0\nschedule = "constant"\n[train]\ndevice = "%s"\nprecision = "bf16"\nlog_every = %s\ncheckpoint_every_steps = 0\ncheckpoint_every_minutes = 0.0\n' \
    $preset "$size" "$batch" "$arch" "$width" $small $DEVICE $LOG_EVERY > "$cfg"
  rm -rf "$OUT/run-$name"
  with_peak_memory timeout -k 5 "$(case_limit)" "$BYOL" train --config "$cfg" --data "$data" --run "$OUT/run-$name" --steps "$steps" \
    > "$OUT/logs/run-$name.log" 2>&1 || { say "FAIL: the run of $name (see logs/run-$name.log)"; fail=1; continue; }
  # The last metrics line covers the last LOG_EVERY steps: the steady state.
  add_json "run-$name" "peak_device_mib=$PEAK_MIB" < <(tail -n 1 "$OUT/run-$name/metrics.jsonl" 2>/dev/null) \
    || { say "FAIL: the run of $name logged no metrics"; fail=1; }
  rm -rf "$OUT/run-$name"
done
[ $PLAN = 0 ] && "$PY" - "$RESULTS" "$LOG_EVERY" <<'PY' | tee -a "$SUMMARY"
import json, sys
rows = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    rows[d["case"]] = d
log_every = int(sys.argv[2])
out = open(sys.argv[1], "a")
for name in ["r18-32", "r50-224"]:
    step, run = rows.get(f"step-{name}", {}), rows.get(f"run-{name}", {})
    if "images_per_sec" not in step or "images_per_sec" not in run:
        print(f"steady {name}: not measured")
        continue
    ratio = run["images_per_sec"] / step["images_per_sec"]
    window = log_every * step.get("batch", 0) / run["images_per_sec"] if run["images_per_sec"] else 0
    wait = run["data_wait_secs"] / window if window else float("nan")
    out.write(json.dumps({"case": f"steady-{name}", "run_over_step": ratio, "data_wait_share": wait,
                          "step_images_per_sec": step["images_per_sec"],
                          "run_images_per_sec": run["images_per_sec"]}) + "\n")
    print(f"steady {name}: step {step['images_per_sec']:.0f} img/s, run {run['images_per_sec']:.0f} img/s, "
          f"run_over_step {ratio:.2f} (aim 0.95), data wait {100 * wait:.1f}% (aim < 2%)")
PY
fi

# --- the daemon under a wave -------------------------------------------------------------
if part daemon; then
PHOTOS_SRC=${PHOTOS_SRC:-$PACK/photos}
if [ $DRY = 1 ]; then
  DAEMON=(--device cpu --arch resnet18 --width 8 --size 32 --batch 16 --precision fp32 --seed-images 64 --wave 100 --seconds 40 --stop-timeout 10)
else
  DAEMON=(--device cuda:0 --arch resnet50 --width 64 --size 224 --batch 64 --precision bf16 --seed-images 512 --wave 2000 --seconds 90 --stop-timeout 30)
fi
rm -rf "$OUT/daemon"
# The daemon run makes its own dataset: --seed-images records, then the wave.
seed_images=$(printf '%s\n' "${DAEMON[@]}" | sed -n '/^--seed-images$/{n;p}')
daemon_batch=$(printf '%s\n' "${DAEMON[@]}" | sed -n '/^--batch$/{n;p}')
if uses daemon-seed "$daemon_batch" "$seed_images"; then
with_peak_memory timeout -k 5 "$(case_limit)" "$PY" scripts/gpu_daemon_run.py --byol "$BYOL" --photos "$PHOTOS_SRC" \
  --work "$OUT/daemon" "${DAEMON[@]}" --json "$OUT/logs/daemon.json" > "$OUT/logs/daemon-run.log" 2>&1 \
  || { say "FAIL: the daemon run (see logs/daemon-run.log)"; tail -n 5 "$OUT/logs/daemon-run.log" | tee -a "$SUMMARY"; fail=1; }
cp "$OUT/daemon/daemon.log" "$OUT/logs/daemon.log" 2>/dev/null
add_json daemon < "$OUT/logs/daemon.json" 2>/dev/null || { say "FAIL: no daemon report"; fail=1; }
"$PY" - "$OUT/logs/daemon.json" <<'PY' 2>/dev/null | tee -a "$SUMMARY"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"daemon: {r['quiet_images_per_sec']:.1f} img/s without a wave, {r['wave_images_per_sec']:.1f} with "
      f"{r['wave_ingested']} of {r['wave_files']} files ingested in {r['wave_secs']:.1f} s: "
      f"{r['wave_over_quiet']:.2f} (aim 0.9); wave to first batch {r['wave_to_first_batch_secs']} s; "
      f"peak device {r['peak_device_mib']} MiB; SIGTERM exit {r['sigterm_exit_code']} in {r['sigterm_secs']:.1f} s "
      f"(limit {r['stop_timeout_secs']:.0f} s), checkpoint {r['last_checkpoint']}")
PY
fi
rm -rf "$OUT/daemon"
fi

# --- quality in 2 GPU-minutes, beside PyTorch ----------------------------------------------
if part quality; then
CFG=configs/gpu-fmnist.toml; MINUTES=2; PEER=(--width 64 --batch 512 --precision bf16 --workers 12 --threads 4)
if [ $DRY = 1 ]; then
  MINUTES=0.05; CFG=$OUT/tiny.toml
  sed -e 's/^width = 64/width = 8/' -e 's/^batch_size = 512/batch_size = 16/' \
      -e 's/^device = "cuda:0"/device = "cpu"/' configs/gpu-fmnist.toml > "$CFG"
  PEER=(--width 8 --batch 16 --workers 0 --threads 2 --limit 512)
fi
if ! uses "$(basename "$FMNIST_TRAIN")" "$(batch_of "$CFG")"; then
  :
elif [ -e "$FMNIST_TRAIN/manifest.json" ]; then
  rm -rf "$OUT/run-fmnist"
  timeout -k 5 "$(case_limit)" "$BYOL" train --config "$CFG" --data "$FMNIST_TRAIN" --run "$OUT/run-fmnist" --minutes $MINUTES \
    > "$OUT/logs/train-fmnist.log" 2>&1 || { say "FAIL: train (see logs/train-fmnist.log)"; fail=1; }
  tail -n 2 "$OUT/logs/train-fmnist.log" | tee -a "$SUMMARY"
  eval_args=(--checkpoint "$OUT/run-fmnist" --train "$FMNIST_TRAIN" --test "$FMNIST_TEST" --protocol both --random-init --pixels)
  [ $DRY = 1 ] && eval_args+=(--device cpu)
  timeout -k 5 "$(case_limit)" "$BYOL" eval "${eval_args[@]}" --json "$OUT/logs/eval-fmnist.json" > "$OUT/logs/eval-fmnist.log" 2>&1 \
    || { say "FAIL: eval (see logs/eval-fmnist.log)"; fail=1; }
  add_json eval-fmnist < "$OUT/logs/eval-fmnist.json" 2>/dev/null || { say "FAIL: no evaluation report"; fail=1; }
  "$PY" - "$OUT/logs/eval-fmnist.json" <<'PY' 2>/dev/null | tee -a "$SUMMARY"
import json, sys
r = json.load(open(sys.argv[1]))
for x in r["results"]:
    print(f"ours {x['encoder']} {x['protocol']}: {x['accuracy']:.4f}")
PY
else
  say "FAIL: no Fashion-MNIST dataset at $FMNIST_TRAIN (scripts/gpu-prepare.sh packs it)"; fail=1
fi
FM_IDX=${FM_IDX:-$PACK/fmnist}
peer_batch=$(printf '%s\n' "${PEER[@]}" | sed -n '/^--batch$/{n;p}')
if ! uses fmnist-train "$peer_batch"; then
  :
elif [ $have_torch = 1 ] && [ -e "$FM_IDX/train-images-idx3-ubyte.gz" ]; then
  timeout -k 5 "$(case_limit)" "$PY" scripts/peer_byol_fmnist.py --data "$FM_IDX" --device $TORCH_DEVICE \
    --minutes $MINUTES "${PEER[@]}" --json "$OUT/logs/peer-fmnist.json" > "$OUT/logs/peer-fmnist.log" 2>&1 \
    || { say "FAIL: the PyTorch reference (see logs/peer-fmnist.log)"; fail=1; }
  "$PY" - "$OUT/logs/peer-fmnist.json" "$RESULTS" <<'PY' 2>/dev/null | tee -a "$SUMMARY"
import json, sys
r = json.load(open(sys.argv[1]))
row = {k: v for k, v in r.items() if k != "log"}
row["case"] = "peer-fmnist"
open(sys.argv[2], "a").write(json.dumps(row) + "\n")
print(f"pytorch: {r['steps']} steps, {r['images_per_sec']:.0f} img/s")
for x in r["rows"]:
    print(f"pytorch {x['encoder']} {x['protocol']}: {x['accuracy']:.4f}")
PY
else
  say "the PyTorch reference is skipped (no PyTorch, or no IDX files at $FM_IDX)"
fi
fi

[ $PLAN = 1 ] && finish
[ $fail = 0 ] && say "gpu-run: all parts ran" || say "gpu-run: some parts FAILED"
finish
