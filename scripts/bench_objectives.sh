#!/usr/bin/env bash
# Every objective on the texture set of daemon/tests/learning.rs, scored by kNN against
# the same encoder at random init.
#
#   scripts/bench_objectives.sh OUT [CASE ...]    # default: every method once, BYOL twice
#   scripts/bench_objectives.sh OUT msf-seed2 ... # a method with seed 2 (summary: all in OUT)
#   STEPS=3000 BYOL=target/release/byol scripts/bench_objectives.sh docs/measurements/objectives-DATE
#
# The set: `byol bench textures` writes the learning test's 4 texture classes, 128 per
# class for training (seed 1) and 64 per class for testing (seed 2), ingested at full
# size. Each case trains a width-8 ResNet-18 on 16-px views for $STEPS steps of batch 32
# (AdamW 3e-3, a 10-step warm-up, the cosine schedule: the learning test's config) with
# its method, then `byol eval --protocol knn --k 20 --size 32 --random-init` scores it.
# OUT gets one folder per case (config, log, metrics.jsonl, eval JSON) and summary.tsv:
# per case its kNN top-1 and the random-init one, the collapse indicator and effective
# rank at the first, middle and last logged steps, and the seconds per step (the run's
# last metrics line: elapsed / steps) with its ratio to the first BYOL case's.
#
# Needs a release build (cargo build --release). Nothing else may run meanwhile: the
# step times are compared.
set -euo pipefail

OUT=${1:?usage: scripts/bench_objectives.sh OUT [CASE ...]}
shift || true
BYOL=${BYOL:-target/release/byol}
STEPS=${STEPS:-3000}
DATA=${DATA:-$OUT/data}
mkdir -p "$OUT" "$DATA"

# Each case: its method's config lines (after the shared ones) and its seed; a case
# METHOD-seed2 is METHOD with the loader and weights seeded 2.
case_method() {
  case "${1%-seed2}" in
    byol|byol-seed1) printf '[train]\nmethod = "byol"\n[byol]\ntau_base = 0.99\n' ;;
    msf) printf '[train]\nmethod = "msf"\n[msf]\nk = 5\nbank_size = 256\ntau = 0.99\n' ;;
    simsiam) printf '[train]\nmethod = "simsiam"\n[simsiam]\nbottleneck = 4\n' ;;
    simclr) printf '[train]\nmethod = "simclr"\n[simclr]\ntemperature = 0.2\n' ;;
    barlow_twins) printf '[train]\nmethod = "barlow_twins"\n[barlow_twins]\nlambda = 5e-3\n' ;;
    mocov2) printf '[train]\nmethod = "mocov2"\n[mocov2]\nqueue_size = 256\ntemperature = 0.2\ntau = 0.99\n' ;;
    *) echo "unknown case $1" >&2; return 1 ;;
  esac
}
case_seed() { [[ $1 == *-seed2 ]] && echo 2 || echo 1; }
# MSF's asymmetric views: view 1 strong, view 2 weak (no blur at 16 px).
case_augment() {
  if [[ ${1%-seed2} == msf ]]; then
    printf '[augment]\npreset = "msf"\nsize = 16\n[augment.view1]\nblur_p = 0.0\n'
  else
    printf '[augment]\npreset = "small"\nsize = 16\n'
  fi
}

config() {
  local name=$1 seed
  seed=$(case_seed "$name")
  case_augment "$name"
  cat <<TOML
[loader]
batch_size = 32
threads = 2
seed = $seed
[model]
arch = "resnet18"
width = 8
small_stem = true
projector_hidden = 128
projection_dim = 32
predictor_hidden = 128
[optim]
optimizer = "adamw"
base_lr = 3e-3
warmup_steps = 10
TOML
  case_method "$name" | python3 -c '
import sys
seed, steps = sys.argv[1], sys.argv[2]
text = sys.stdin.read()
extra = f"device = \"cpu\"\nseed = {seed}\ntotal_steps = {steps}\nlog_every = 20\ncheckpoint_every_steps = {steps}\n"
print(text.replace("[train]\n", "[train]\n" + extra, 1), end="")
' "$seed" "$STEPS"
}

if [[ ! -d $DATA/train ]]; then
  "$BYOL" bench textures --out "$DATA/train-src" --per-class 128 --seed 1
  "$BYOL" bench textures --out "$DATA/test-src" --per-class 64 --seed 2
  "$BYOL" ingest "$DATA/train-src" --out "$DATA/train" --max-side 0 >/dev/null
  "$BYOL" ingest "$DATA/test-src" --out "$DATA/test" --max-side 0 >/dev/null
fi

CASES=("$@")
[[ ${#CASES[@]} -gt 0 ]] || CASES=(byol-seed1 byol-seed2 msf simsiam simclr barlow_twins mocov2)
for name in "${CASES[@]}"; do
  dir=$OUT/$name
  rm -rf "$dir"; mkdir -p "$dir"
  config "$name" > "$dir/config.toml"
  echo "== $name"
  "$BYOL" train --config "$dir/config.toml" --data "$DATA/train" --run "$dir/run" > "$dir/train.log" 2>&1
  "$BYOL" eval --checkpoint "$dir/run" --train "$DATA/train" --test "$DATA/test" \
    --protocol knn --k 20 --size 32 --random-init --json "$dir/eval.json" > "$dir/eval.log" 2>&1
  cp "$dir/run/metrics.jsonl" "$dir/metrics.jsonl"
  rm -rf "$dir/run"
done

# The summary covers every case folder in OUT (earlier calls' too), in the default order.
ALL=()
for name in byol-seed1 byol-seed2 msf msf-seed2 simsiam simsiam-seed2 simclr simclr-seed2 \
            barlow_twins barlow_twins-seed2 mocov2 mocov2-seed2; do
  [[ -f $OUT/$name/eval.json ]] && ALL+=("$name")
done
python3 - "$OUT" "${ALL[@]}" <<'PY'
import json, sys, os
out, cases = sys.argv[1], sys.argv[2:]
rows, base = [], None
for name in cases:
    d = os.path.join(out, name)
    if not os.path.exists(os.path.join(d, "eval.json")):
        continue
    ev = json.load(open(os.path.join(d, "eval.json")))
    acc = {r["encoder"]: r["accuracy"] for r in ev["results"] if r["protocol"] == "knn"}
    lines = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl")) if l.strip()]
    lines = [l for l in lines if "collapse" in l]
    pick = [lines[0], lines[len(lines) // 2], lines[-1]]
    s_per_step = lines[-1]["elapsed_secs"] / lines[-1]["step"]
    if base is None and name.startswith("byol"):
        base = s_per_step
    rows.append((name, acc["trained"], acc["random-init"],
                 "/".join(f'{l["collapse"]:.2f}' for l in pick),
                 "/".join(f'{l["effective_rank"]:.1f}' for l in pick),
                 f'{pick[0]["loss"]:.3f}/{pick[-1]["loss"]:.3f}', s_per_step))
with open(os.path.join(out, "summary.tsv"), "w") as f:
    f.write("case\tknn\tknn_random_init\tcollapse_first/mid/last\teffective_rank_first/mid/last\tloss_first/last\ts_per_step\tstep_vs_byol\n")
    for r in rows:
        ratio = f"{r[6] / base:.2f}" if base else "-"
        f.write(f"{r[0]}\t{r[1]:.3f}\t{r[2]:.3f}\t{r[3]}\t{r[4]}\t{r[5]}\t{r[6]:.4f}\t{ratio}\n")
print(open(os.path.join(out, "summary.tsv")).read(), end="")
PY
