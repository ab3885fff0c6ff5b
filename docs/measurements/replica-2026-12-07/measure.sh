#!/bin/bash
# Issue 44: 2 ranks x 1 thread, before (059b4c3) and after, 3 rounds interleaved; and the
# CPU step (byol bench step) before and after. Release builds with --features mpi.
set -u
cd /tmp/m44
export CARGO_TARGET_DIR=/work/main/target
if [ ! -x byol-before ]; then
  flock /tmp/byol-cpu.lock sh -c "cd /work/wt-44-before && cargo build --release -p byol-daemon --features mpi && cp /work/main/target/release/byol /tmp/m44/byol-before"
fi
flock /tmp/byol-cpu.lock sh -c "cd /work/main && cargo build --release -p byol-daemon --features mpi && cp /work/main/target/release/byol /tmp/m44/byol-after"
[ -d data4 ] || { ./byol-after bench textures --out tex --per-class 256 && ./byol-after ingest tex --out data4; }
for i in 1 2 3; do
  for v in before after; do
    rm -rf r-$v-$i
    flock /tmp/byol-cpu.lock mpirun --allow-run-as-root --oversubscribe -np 2 -x RAYON_NUM_THREADS=1 ./byol-$v train --config m.toml --data data4 --run r-$v-$i --steps 40 > r-$v-$i.log 2>&1
    echo "$v $i $(grep '"step":40' r-$v-$i/metrics.jsonl | grep -o '"images_per_sec":[0-9.]*')"
  done
done
for i in 1 2 3; do
  for v in before after; do
    flock /tmp/byol-cpu.lock ./byol-$v bench step --arch resnet18 --small-stem --width 16 --size 32 --batch 256 --device cpu --json > step-$v-$i.json 2> step-$v-$i.err
    echo "step $v $i $(grep -o '"images_per_sec":[0-9.]*' step-$v-$i.json | head -1)"
  done
done
