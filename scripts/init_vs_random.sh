#!/usr/bin/env bash
# Continued pretraining from our own export against random init, on the demo's texture
# set (the learning test's: 512 training images, seed 1; 256 test images, seed 2).
#
#   scripts/init_vs_random.sh [WORK]      (WORK default /tmp/byol-init-vs-random)
#   env: BYOL (default target/release/byol), MINUTES (default 2)
#
# 1. source: MINUTES of BYOL from random init (seed 1), exported to source.safetensors;
# 2. init0: `train --init source.safetensors --steps 0` (seed 2): checkpoint step 0;
# 3. init: MINUTES from the export (seed 2); random: MINUTES from random init (seed 2);
# 4. kNN top-1 (k 20, 32 px, the learning test's setting) of each, and the step-0
#    features of init0 against the source's (`byol embed`, byte for byte).
# Training runs under nice -n 19. Prints one line per encoder; writes WORK/summary.json.
set -euo pipefail
BYOL=${BYOL:-target/release/byol}
MINUTES=${MINUTES:-2}
WORK=${1:-/tmp/byol-init-vs-random}
rm -rf "$WORK"
mkdir -p "$WORK"

config() { # seed
  cat <<EOF
[augment]
preset = "small"
size = 16
[loader]
batch_size = 32
threads = 2
seed = $1
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
[byol]
tau_base = 0.99
[train]
device = "cpu"
seed = $1
total_steps = 3000
log_every = 20
checkpoint_every_steps = 100000
EOF
}
config 1 >"$WORK/seed1.toml"
config 2 >"$WORK/seed2.toml"

"$BYOL" bench textures --out "$WORK/train-src" --per-class 128 --seed 1
"$BYOL" bench textures --out "$WORK/test-src" --per-class 64 --seed 2
"$BYOL" ingest "$WORK/train-src" --out "$WORK/train" >/dev/null
"$BYOL" ingest "$WORK/test-src" --out "$WORK/test" >/dev/null

train() { # name seed args...
  local name=$1 seed=$2
  shift 2
  nice -n 19 "$BYOL" train --config "$WORK/seed$seed.toml" --data "$WORK/train" \
    --run "$WORK/$name" "$@" 2>&1 | grep -E "initialised|schedules fitted|trained to|stopped" || true
}
train source 1 --minutes "$MINUTES"
"$BYOL" export --checkpoint "$WORK/source" --out "$WORK/source.safetensors"
train init0 2 --steps 0 --init "$WORK/source.safetensors"
train init 2 --minutes "$MINUTES" --init "$WORK/source.safetensors"
train random 2 --minutes "$MINUTES"

knn() { # name [--random-init]
  local name=$1
  shift
  "$BYOL" eval --checkpoint "$WORK/$name" --train "$WORK/train" --test "$WORK/test" \
    --protocol knn --k 20 --size 32 --json "$WORK/$name.knn.json" "$@" >/dev/null 2>&1
}
knn source
knn init0
knn init
knn random --random-init

for name in source init0; do
  "$BYOL" embed --checkpoint "$WORK/$name" --data "$WORK/test" --size 32 \
    --out "$WORK/$name.npy" >/dev/null 2>&1
done
if cmp -s "$WORK/source.npy" "$WORK/init0.npy"; then same=true; else same=false; fi

jq -n --argjson same "$same" \
  --slurpfile s "$WORK/source.knn.json" --slurpfile z "$WORK/init0.knn.json" \
  --slurpfile i "$WORK/init.knn.json" --slurpfile r "$WORK/random.knn.json" '
  def acc(f; e): f[0].results[] | select(.encoder == e) | .accuracy;
  {
    minutes: '"$MINUTES"',
    exported_source: {step: $s[0].step, knn: acc($s; "trained")},
    init_step0: {step: $z[0].step, knn: acc($z; "trained")},
    step0_features_identical_to_source: $same,
    init: {step: $i[0].step, knn: acc($i; "trained")},
    random_init: {step: $r[0].step, knn: acc($r; "trained"), knn_at_step0: acc($r; "random-init")}
  }' | tee "$WORK/summary.json"
