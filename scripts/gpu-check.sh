#!/usr/bin/env bash
# The GPU check every issue with a GPU machine runs: each op (convolution, BatchNorm,
# residual add, max-pool) forward and backward on CUDA against our CPU kernels, a
# numerical check of the whole step, our BYOL step beside PyTorch's at a user's settings,
# and a short real training run with its evaluation. Builds nothing: it runs the binary
# and data that scripts/gpu-prepare.sh packed into gpu-pack/ (carried to the GPU machine).
# PARTS (default ops,check,step,train; `objectives` on its own call) picks parts, run in
# that order: the verdicts first, then the figures. Every case runs under a time limit
# (CASE_SECS, default 100; "timed out" is recorded and the check moves on), and the whole
# within TOTAL_SECS (default 240).
#
#   scripts/gpu-check.sh            on the GPU machine; writes everything under $OUT
#   scripts/gpu-check.sh --dry-run  our side of every part on CPU at tiny sizes (the peer
#                                   only where PyTorch is installed): kept working by a test
#   scripts/gpu-check.sh --plan     prints the training cases' datasets and batch sizes
#
# Environment: OUT (results folder; default: a temp folder), BYOL (the binary; default:
# gpu-pack/byol.xz unpacked into $OUT/bin, or target/release/byol when dry), PYTHON
# (default python3),
# FMNIST_TRAIN / FMNIST_TEST / PHOTOS (datasets; default: the files in gpu-pack/,
# ingested into $OUT/data/ first).
#
# On the device machine (carry gpu-pack), as plain shell lines with the time each needs:
#   OUT=$OUT PARTS=ops,check,step bash scripts/gpu-check.sh
#       about 3 minutes (ops ~20 s, check ~20 s, step: 8 cases of ~15 s); timeout_s=300
#   OUT=$OUT PARTS=train TOTAL_SECS=230 CASE_SECS=200 bash scripts/gpu-check.sh
#       about 4 minutes (ingest ~30 s, 2 minutes of training, eval ~30 s, 30 steps at
#       224 px); timeout_s=300
#   OUT=$OUT PARTS=objectives TOTAL_SECS=280 CASE_SECS=60 bash scripts/gpu-check.sh
#       about 4.5 minutes (6 objectives x 30 s of training + their kNN); timeout_s=300
# Writes at most 8 files, none deeper than two folders: summary.txt (the figures),
# results.jsonl (one JSON object per measurement), nvidia-smi.txt, and logs.tar.gz (a log
# per command, the evaluation reports among them).
set -uo pipefail
cd "$(dirname "$0")/.."

PARTS=${PARTS:-ops,check,step,train}
source scripts/gpu-common.sh "$@"

# --- 2. each op against our CPU kernels (on CPU: candle's ops against ours) -------------
if [ $DRY = 1 ]; then OP_KERNELS=candle; else OP_KERNELS=auto; fi
if part ops; then
record "ops-fp32" "$BYOL" bench ops --device $DEVICE --kernels $OP_KERNELS --precision fp32 --tolerance 1e-4 --json
record "ops-bf16" "$BYOL" bench ops --device $DEVICE --kernels $OP_KERNELS --precision bf16 --tolerance 1e-2 --json
fi

# --- 3. numerical check: CUDA (or candle's kernels, when dry) against our CPU kernels ----
if [ $DRY = 1 ]; then CHECK_KERNELS=candle; CHECK="--width 8 --size 16 --batch 4"; else CHECK_KERNELS=auto; CHECK="--width 16 --size 32 --batch 16"; fi
if part check; then
record "check-fp32" "$BYOL" bench check --arch resnet18 --small-stem $CHECK --device $DEVICE --kernels $CHECK_KERNELS --precision fp32 --tolerance 1e-3 --json
record "check-bf16" "$BYOL" bench check --arch resnet18 --small-stem $CHECK --device $DEVICE --kernels $CHECK_KERNELS --precision bf16 --tolerance 1e-2 --json
fi

# --- 4. our step beside PyTorch's --------------------------------------------------------
if [ $DRY = 1 ]; then
  # name arch stem width size batch
  CASES=("r18-32 resnet18 cifar 8 16 4"
         "r50-224 resnet50 imagenet 8 32 2")
  STEPS="--warmup 1 --steps 1"; PSTEPS="--warmup 1 --steps 1"; PROFILE_STEPS="--warmup 1 --steps 1"
else
  # A user's settings: ResNet-18 small stem at 32 px, batch 512; ResNet-50 at 224, 256.
  CASES=("r18-32 resnet18 cifar 64 32 512"
         "r50-224 resnet50 imagenet 64 224 256")
  STEPS="--warmup 3 --steps 10"; PSTEPS="--warmup 3 --steps 10"; PROFILE_STEPS="--warmup 1 --steps 3"
fi
idle_mib=0
[ $DRY = 0 ] && [ $PLAN = 0 ] && idle_mib=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
if part step; then
for c in "${CASES[@]}"; do
  read -r name arch stem width size batch <<< "$c"
  args=(--arch "$arch" --width "$width" --size "$size" --batch "$batch")
  [ "$stem" = cifar ] && args+=(--small-stem)
  # bf16 is the headline (the peer channels-last, cudnn.benchmark on); fp32 with TF32
  # off on both sides is the exactness case.
  for prec in bf16 fp32; do
    cl=off; [ $prec = bf16 ] && cl=on
    # The plain figure first; the profile (which synchronises around every op) is its
    # own short record after it, so a time-out loses the profile, never the figure.
    with_peak_memory record "ours-$name-$prec" "$BYOL" bench step "${args[@]}" --device $DEVICE --precision $prec $STEPS --json
    [ $PLAN = 0 ] && echo "{\"case\": \"ours-$name-$prec-memory\", \"peak_device_mib\": $PEAK_MIB, \"idle_device_mib\": $idle_mib}" >> "$RESULTS"
    [ $prec = bf16 ] && record "ours-$name-$prec-profile" "$BYOL" bench step "${args[@]}" --device $DEVICE --precision $prec $PROFILE_STEPS --profile --json
    if [ $have_torch = 1 ]; then
      with_peak_memory record "pytorch-$name-$prec" "$PY" scripts/peer_torch_byol_step.py --device $TORCH_DEVICE \
        --arch $arch --stem $stem --width $width --res $size --batch $batch --precision $prec \
        --tf32 off --channels-last $cl --cudnn-benchmark on $PSTEPS --threads 2 --json
      [ $PLAN = 0 ] && echo "{\"case\": \"pytorch-$name-$prec-memory\", \"peak_device_mib\": $PEAK_MIB, \"idle_device_mib\": $idle_mib}" >> "$RESULTS"
    fi
  done
done
fi

# --- 5. real training: Fashion-MNIST for 2 minutes, then eval; data wait at 224 ----------
# The carried files (scripts/gpu-prepare.sh) are ingested here, timed like the rest.
if part train; then
carried_datasets
CFG=configs/gpu-fmnist.toml
MINUTES=2
if [ $DRY = 1 ]; then
  MINUTES=0.05
  CFG=$OUT/tiny.toml
  sed -e 's/^width = 64/width = 8/' -e 's/^batch_size = 512/batch_size = 16/' \
      -e 's/^device = "cuda:0"/device = "cpu"/' configs/gpu-fmnist.toml > "$CFG"
fi
if ! uses "$(basename "$FMNIST_TRAIN")" "$(batch_of "$CFG")"; then
  :
elif [ -e "$FMNIST_TRAIN/manifest.json" ]; then
  with_peak_memory timeout -k 5 "$(case_limit)" "$BYOL" train --config "$CFG" --data "$FMNIST_TRAIN" --run "$OUT/run-fmnist" --minutes $MINUTES \
    > "$OUT/logs/train-fmnist.log" 2>&1 || { say "FAIL: train (see logs/train-fmnist.log)"; fail=1; }
  tail -n 3 "$OUT/logs/train-fmnist.log" | tee -a "$SUMMARY"
  add_json train-fmnist "peak_device_mib=$PEAK_MIB" < <(tail -n 1 "$OUT/run-fmnist/metrics.jsonl" 2>/dev/null) \
    || { say "FAIL: the Fashion-MNIST run logged no metrics"; fail=1; }
  eval_args=(--checkpoint "$OUT/run-fmnist" --train "$FMNIST_TRAIN" --test "$FMNIST_TEST" --protocol knn --random-init)
  [ $DRY = 1 ] && eval_args+=(--device cpu)
  timeout -k 5 "$(case_limit)" "$BYOL" eval "${eval_args[@]}" --json "$OUT/logs/eval-fmnist.json" > "$OUT/logs/eval-fmnist.log" 2>&1 \
    || { say "FAIL: eval (see logs/eval-fmnist.log)"; fail=1; }
  add_json eval-fmnist-report < "$OUT/logs/eval-fmnist.json" 2>/dev/null \
    || { say "FAIL: no evaluation report"; fail=1; }
else
  say "FAIL: no Fashion-MNIST dataset at $FMNIST_TRAIN (scripts/gpu-prepare.sh packs it)"; fail=1
fi
# The loader feeding ResNet-50 at 224: how long the step waits for data.
P224=$OUT/r50-224.toml
if [ $DRY = 1 ]; then
  printf '[model]\narch = "resnet50"\nwidth = 8\n[loader]\nbatch_size = 4\n[augment]\nsize = 32\n[train]\ndevice = "cpu"\nlog_every = 2\n' > "$P224"; PSTEPS_TRAIN=2
else
  printf '[model]\narch = "resnet50"\n[loader]\nbatch_size = 256\n[train]\ndevice = "cuda:0"\nprecision = "bf16"\nlog_every = 10\ncheckpoint_every_steps = 0\ncheckpoint_every_minutes = 0.0\n' > "$P224"; PSTEPS_TRAIN=30
fi
if ! uses "$(basename "$PHOTOS")" "$(batch_of "$P224")"; then
  :
elif [ -e "$PHOTOS/manifest.json" ]; then
  timeout -k 5 "$(case_limit)" "$BYOL" train --config "$P224" --data "$PHOTOS" --run "$OUT/run-photos" --steps $PSTEPS_TRAIN \
    > "$OUT/logs/train-photos.log" 2>&1 || { say "FAIL: train at 224 (see logs/train-photos.log)"; fail=1; }
  add_json loader-r50-224 < <(tail -n 1 "$OUT/run-photos/metrics.jsonl" 2>/dev/null) \
    || { say "FAIL: the run at 224 logged no metrics"; fail=1; }
else
  say "no photos dataset at $PHOTOS: the data-wait measurement at 224 is skipped"
fi
fi

if part objectives; then
# Every objective for OBJ_MINUTES (default 0.5) on Fashion-MNIST with
# configs/gpu-fmnist.toml and its method (a bank and queue of 16,384; MSF with its
# views), scored by kNN against the same encoder at random init (seed 0 for all, so
# scored once). Not in the default PARTS: its own call,
#   run(command="OUT=$OUT PARTS=objectives TOTAL_SECS=280 CASE_SECS=60 bash scripts/gpu-check.sh", carry=["gpu-pack"], timeout_s=300)
carried_datasets
OBJ_MINUTES=${OBJ_MINUTES:-0.5}; MEMORY=16384
[ $DRY = 1 ] && { OBJ_MINUTES=0.02; MEMORY=32; }
random=(--random-init)
for method in byol msf simsiam simclr barlow_twins mocov2; do
  cfg=$OUT/obj-$method.toml
  views='s/^preset = "small"/preset = "small"/'
  [ $method = msf ] && views='s/^preset = "small"/preset = "msf"/'
  sed -e "$views" -e "s/^\[train\]/[train]\nmethod = \"$method\"/" configs/gpu-fmnist.toml > "$cfg"
  [ $DRY = 1 ] && sed -i -e 's/^width = 64/width = 8/' -e 's/^batch_size = 512/batch_size = 16/' \
      -e 's/^device = "cuda:0"/device = "cpu"/' "$cfg"
  [ $method = msf ] && printf '[augment.view1]\nblur_p = 0.0\n' >> "$cfg"
  printf '[msf]\nbank_size = %s\n[mocov2]\nqueue_size = %s\n[simclr]\ntemperature = 0.2\n' $MEMORY $MEMORY >> "$cfg"
  run_dir=$OUT/run-obj-$method
  uses "$(basename "$FMNIST_TRAIN")" "$(batch_of "$cfg")" || continue
  timeout -k 5 "$(case_limit)" "$BYOL" train --config "$cfg" --data "$FMNIST_TRAIN" --run "$run_dir" --minutes $OBJ_MINUTES \
    > "$OUT/logs/obj-$method.log" 2>&1 || { say "FAIL: $method (see logs/obj-$method.log)"; fail=1; continue; }
  eval_args=(--checkpoint "$run_dir" --train "$FMNIST_TRAIN" --test "$FMNIST_TEST" --protocol knn "${random[@]}")
  [ $DRY = 1 ] && eval_args+=(--device cpu)
  timeout -k 5 "$(case_limit)" "$BYOL" eval "${eval_args[@]}" --json "$OUT/logs/eval-obj-$method.json" > "$OUT/logs/eval-obj-$method.log" 2>&1 \
    || { say "FAIL: eval of $method (see logs/eval-obj-$method.log)"; fail=1; continue; }
  random=()
  "$PY" - "$method" "$OUT/logs/eval-obj-$method.json" "$run_dir/metrics.jsonl" "$RESULTS" <<'PY' | tee -a "$SUMMARY"
import json, sys
method, report, metrics, results = sys.argv[1:]
r = json.load(open(report))
acc = {x["encoder"]: x["accuracy"] for x in r["results"] if x["protocol"] == "knn"}
last = [json.loads(l) for l in open(metrics) if l.strip()][-1]
row = {"case": f"objective-{method}", "knn": acc.get("trained"), "steps": last["step"],
       "images_per_sec": last["images_per_sec"], "effective_rank": last.get("effective_rank")}
if "random-init" in acc:
    row["knn_random_init"] = acc["random-init"]
open(results, "a").write(json.dumps(row) + "\n")
extra = f", random init {acc['random-init']:.3f}" if "random-init" in acc else ""
print(f"objective {method}: trained knn {acc['trained']:.3f}{extra}, {last['step']} steps, {last['images_per_sec']:.0f} img/s")
PY
  rm -rf "$run_dir"
done
fi

# --- the figures --------------------------------------------------------------------------
[ $PLAN = 1 ] && finish
"$PY" - "$RESULTS" <<'PY' | tee -a "$SUMMARY"
import json, sys
rows = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    rows[d["case"]] = d
print()
for k in ["ops-fp32", "ops-bf16"]:
    c = rows.get(k)
    if c and "diffs" in c:
        bad = [d for d in c["diffs"] if not d["pass"]]
        worst = max(c["diffs"], key=lambda d: d["rel_l2"])
        print(f"{k}: {len(c['diffs'])} tensors, worst {worst['rel_l2']:.2e} ({worst['case']}, {worst['tensor']}); tolerance {c['tolerance']:.0e}: {'PASS' if c['pass'] else 'FAIL'}")
        for d in bad:
            print(f"  FAIL {d['case']}: {d['tensor']} relative L2 {d['rel_l2']:.2e}")
print(f"{'step':<16}{'ours img/s':>12}{'pytorch img/s':>15}{'ours/pytorch':>14}{'ours MiB':>10}{'pytorch MiB':>13}{'mem ratio':>11}")
for name in ["r18-32", "r50-224"]:
    for prec in ["bf16", "fp32"]:
        o = rows.get(f"ours-{name}-{prec}", {})
        p = rows.get(f"pytorch-{name}-{prec}", {})
        m = rows.get(f"ours-{name}-{prec}-memory", {})
        pm = rows.get(f"pytorch-{name}-{prec}-memory", {})
        oi, pi = o.get("images_per_sec"), p.get("images_per_sec")
        ratio = f"{oi / pi:.3f}" if oi and pi else "-"
        peak = m.get("peak_device_mib", 0) - m.get("idle_device_mib", 0)
        ppeak = pm.get("peak_device_mib", 0) - pm.get("idle_device_mib", 0)
        mratio = f"{peak / ppeak:.2f}" if peak > 0 and ppeak > 0 else "-"
        note = " (timed out)" if o.get("timed_out") else ""
        print(f"{name + ' ' + prec:<16}{oi or 0:>12.1f}{pi or 0:>15.1f}{ratio:>14}{peak:>10}{ppeak:>13}{mratio:>11}{note}")
for name in ["r18-32", "r50-224"]:
    p = rows.get(f"ours-{name}-bf16-profile", {}).get("profile")
    if p:
        top = ", ".join(f"{o['op']} {o['ms_per_step']:.1f} ms ({100 * o['share']:.0f}%)" for o in p["ops"][:5])
        print(f"profile {name} bf16 (profiled step {1e3 * p['step_seconds_median']:.1f} ms): {top}")
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
finish
