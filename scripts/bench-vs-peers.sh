#!/usr/bin/env bash
# Runs our benchmarks and the peers a user would pick instead, side by side in one
# session, so ratios compare like with like on this noisy machine.
#
#   scripts/bench-vs-peers.sh [OUT_DIR]      (default: bench-results/)
#
# Needs: apt-get install -y mate-backgrounds plasma-workspace-wallpapers dataset-fashion-mnist
#        pip install torch torchvision pillow numpy albumentations==2.0.8   (peers; large)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-results}
mkdir -p "$out"
peer=../shared/bench/peer_torchvision_aug.py
photos=../shared/data/photos256
export NO_ALBUMENTATIONS_UPDATE=1

echo "== ingest (ours vs decode-only)"
cargo bench -q -p byol-ingest --bench ingest 2>/dev/null | tee "$out/ingest.txt"

echo "== augment, one process (ours; peers albu and classic)"
cargo bench -q -p byol-augment --bench two_views 2>/dev/null | tee "$out/augment.txt"
for api in albu classic; do
  python3 $peer --images $photos --api $api --size 224 --mode single --n 200 --reps 3
  python3 $peer --images $photos --api $api --size 96 --mode single --n 400 --reps 3
  python3 $peer --data fmnist --api $api --size 32 --mode single --n 1000 --reps 3
done 2>/dev/null | tee "$out/augment-peers.jsonl"

echo "== loader, 2 workers (ours; peers albu and classic DataLoader)"
cargo bench -q -p byol-loader --bench loader 2>/dev/null | tee "$out/loader.txt"
for api in albu classic; do
  python3 $peer --images $photos --api $api --size 224 --mode loader --workers 2 --n 640 --reps 3
  python3 $peer --data fmnist --api $api --size 32 --mode loader --workers 2 --n 3200 --reps 3
done 2>/dev/null | tee "$out/loader-peers.jsonl"
