#!/bin/bash
# 1 process (1 and 2 threads) against 2 ranks x 1 thread, twice, interleaved.
cd /tmp/dp; B=/work/main/target/release/byol
for i in 1 2; do
  for t in 1 2; do rm -rf p$t; echo "== one process, $t threads"; RAYON_NUM_THREADS=$t $B train --config m.toml --data data4 --run p$t --steps 40 2>&1 | tail -1; grep '"step":40' p$t/metrics.jsonl | grep -o '"images_per_sec":[0-9.]*'; done
  rm -rf r2; echo "== 2 ranks x 1 thread"; mpirun --allow-run-as-root --oversubscribe -np 2 -x RAYON_NUM_THREADS=1 $B train --config m.toml --data data4 --run r2 --steps 40 2>&1 | tail -2; grep '"step":40' r2/metrics.jsonl | grep -o '"images_per_sec":[0-9.]*'
done
