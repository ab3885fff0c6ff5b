#!/usr/bin/env bash
# The small-image recipe sweep and BYOL's heads' normalisation ablation on Fashion-MNIST.
#
#   scripts/bench_recipe.sh OUT [CASE ...]      # default: every case below, in order
#   MINUTES=4 BYOL=target/release/byol scripts/bench_recipe.sh docs/measurements/recipe-DATE
#
# Each case is the pre-sweep configs/small.toml (BASE_CONFIG below) with a few keys
# changed (see `case_spec`): it trains
# `byol train --minutes $MINUTES` (the cosine schedules fitted to the steps that fit) on all
# 60,000 Fashion-MNIST training images, then `byol eval --protocol both` scores the
# encoder on the 10,000 test images (linear probe and kNN, features of the 60,000), with
# `--random-init` for the first case of each width (and `--pixels` for the first case). OUT gets one folder per case (config,
# log, metrics.jsonl, eval JSON) and summary.tsv: one line per case with its steps, linear
# and kNN top-1, the random network's, and the collapse indicator and effective rank at
# the first, middle and last logged steps.
#
# Needs: apt-get install -y dataset-fashion-mnist; a release build (cargo build --release).
set -euo pipefail

OUT=${1:?usage: scripts/bench_recipe.sh OUT [CASE ...]}
shift || true
BYOL=${BYOL:-target/release/byol}
MINUTES=${MINUTES:-4}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
DATA=${DATA:-$OUT/data}
mkdir -p "$OUT" "$DATA"

# Each case: optimizer base_lr weight_decay width head_norm [optim key=value ...], the rest
# from configs/small.toml (batch 256, ResNet-18 small stem, heads 1024 → 128) with a
# 10-step warm-up (a 4-minute run makes about 120 steps at width 16).
case_spec() {
  case "$1" in
    adamw-2e-3-w16)          echo "adamw 2e-3 1e-6 16 batch" ;;  # the preset before the sweep
    adamw-5e-3-w16)          echo "adamw 5e-3 1e-4 16 batch" ;;
    sgd-0.1-w16)             echo "sgd 0.1 5e-4 16 batch nesterov=true" ;;
    sgd-0.3-w16)             echo "sgd 0.3 5e-4 16 batch nesterov=true" ;;
    lars-1.0-w16)            echo "lars 1.0 1e-5 16 batch trust_coefficient=0.02" ;;
    lars-2.0-w16)            echo "lars 2.0 1e-5 16 batch trust_coefficient=0.02" ;;
    adamw-2e-3-w32)          echo "adamw 2e-3 1e-6 32 batch" ;;
    adamw-5e-3-w32)          echo "adamw 5e-3 1e-4 32 batch" ;;
    sgd-0.1-w32)             echo "sgd 0.1 5e-4 32 batch nesterov=true" ;;
    sgd-0.3-w32)             echo "sgd 0.3 5e-4 32 batch nesterov=true" ;;
    lars-1.0-w32)            echo "lars 1.0 1e-5 32 batch trust_coefficient=0.02" ;;
    *-group_ws|*-none)       local spec; spec=$(case_spec "${1%-*}") || return 1
                             set -- "$1" $spec
                             echo "$2 $3 $4 $5 ${1##*-} ${*:7}" ;;
    *) echo "unknown case $1" >&2; return 1 ;;
  esac
}

# The config every case starts from: configs/small.toml as it was before the sweep
# (AdamW 2e-3); each case replaces the keys of its spec.
BASE_CONFIG='[ingest]
codec = "raw"
max_side = 0
shard_size_mib = 64

[augment]
preset = "small"
size = 32

[loader]
batch_size = 256

[model]
arch = "resnet18"
width = 16
small_stem = true
projector_hidden = 1024
projection_dim = 128
predictor_hidden = 1024

[optim]
optimizer = "adamw"
base_lr = 2e-3
weight_decay = 1e-6
warmup_steps = 50
schedule = "cosine"

[byol]
tau_base = 0.99

[train]
device = "auto"
total_steps = 2000
log_every = 20
checkpoint_every_steps = 500
'

config() { # name → a config file
  local name=$1 spec optimizer lr wd width norm extra
  spec=$(case_spec "$name")
  read -r optimizer lr wd width norm extra <<<"$spec"
  local file="$OUT/$name/config.toml"
  mkdir -p "$OUT/$name"
  printf '%s' "$BASE_CONFIG" | sed \
      -e "s/^width = .*/width = $width/" \
      -e "s/^optimizer = .*/optimizer = \"$optimizer\"/" \
      -e "s/^base_lr = .*/base_lr = $lr/" \
      -e "s/^weight_decay = .*/weight_decay = $wd/" \
      -e "s/^warmup_steps = .*/warmup_steps = 10/" \
      -e "s/^\[model\]/[model]\nhead_norm = \"$norm\"/" \
      -e "s/^\[optim\]/[optim]${extra:+\n${extra// /\\n}}/" \
      >"$file"
  echo "$file"
}

ingest() {
  [ -d "$DATA/train" ] || "$BYOL" ingest "$FMNIST/train-images-idx3-ubyte.gz" \
      --out "$DATA/train" --config configs/small.toml >"$OUT/ingest.log" 2>&1
  [ -d "$DATA/test" ] || "$BYOL" ingest "$FMNIST/t10k-images-idx3-ubyte.gz" \
      --out "$DATA/test" --config configs/small.toml >>"$OUT/ingest.log" 2>&1
}

run_case() {
  local name=$1 cfg width random=()
  cfg=$(config "$name")
  width=$(sed -n 's/^width = //p' "$cfg")
  # The random network once per width, raw pixels once (the same for every case).
  if ! grep -q "^w$width$" "$OUT/.random-done" 2>/dev/null; then
    random=(--random-init)
    echo "w$width" >>"$OUT/.random-done"
  fi
  if [ ! -e "$OUT/.pixels-done" ]; then
    random+=(--pixels)
    touch "$OUT/.pixels-done"
  fi
  rm -rf "$OUT/$name/run"
  echo "== $name: $(case_spec "$name")"
  timeout $((MINUTES * 60 + 180)) "$BYOL" train --config "$cfg" --data "$DATA/train" \
      --run "$OUT/$name/run" --minutes "$MINUTES" >"$OUT/$name/train.log" 2>&1
  timeout 1200 "$BYOL" eval --checkpoint "$OUT/$name/run" --train "$DATA/train" --test "$DATA/test" \
      --protocol both "${random[@]}" --json "$OUT/$name/eval.json" >"$OUT/$name/eval.log" 2>&1
  cp "$OUT/$name/run/metrics.jsonl" "$OUT/$name/metrics.jsonl"
  python3 - "$name" "$OUT/$name" >>"$OUT/summary.tsv" <<'PY'
import json, sys
name, folder = sys.argv[1], sys.argv[2]
ev = json.load(open(f"{folder}/eval.json"))
lines = [json.loads(l) for l in open(f"{folder}/metrics.jsonl") if l.strip()]
def pick(key):
    vals = [l.get(key) for l in lines if l.get(key) is not None]
    if not vals: return "-"
    return "/".join(f"{v:.2f}" for v in (vals[0], vals[len(vals) // 2], vals[-1]))
def acc(encoder, protocol):
    rows = [r for r in ev["results"] if r["encoder"] == encoder and r["protocol"] == protocol]
    return f"{rows[0]['accuracy'] * 100:.2f}" if rows else "-"
print("\t".join([name, str(lines[-1]["step"]), acc("trained", "linear"),
                 acc("trained", "knn"), acc("random-init", "linear"),
                 acc("random-init", "knn"), acc("raw-pixels", "linear"),
                 pick("collapse"), pick("effective_rank"), f"{lines[-1]['loss']:.3f}"]))
PY
  tail -1 "$OUT/summary.tsv"
}

ingest
[ -f "$OUT/summary.tsv" ] || printf 'case\tsteps\tlinear\tknn\trandom_linear\trandom_knn\tpixels_linear\tcollapse(first/mid/last)\teffective_rank(first/mid/last)\tloss\n' >"$OUT/summary.tsv"
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(adamw-2e-3-w16 adamw-5e-3-w16 sgd-0.1-w16 lars-1.0-w16)
for c in "${cases[@]}"; do run_case "$c"; done
