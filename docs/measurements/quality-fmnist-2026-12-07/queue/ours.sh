#!/usr/bin/env bash
# ours.sh NAME CONFIG: 702 steps of our BYOL, exported, scored by the reference evaluator.
set -euo pipefail
name=$1; cfg=$2
B=/tmp/q41/byol
rm -rf /tmp/q41/runs/$name
$B train --config $cfg --data /tmp/w46/fm-train --run /tmp/q41/runs/$name --steps 702
$B export --checkpoint /tmp/q41/runs/$name --out /tmp/q41/$name.safetensors
cp /tmp/q41/runs/$name/metrics.jsonl /tmp/q41/$name-metrics.jsonl
/work/venv/bin/python /work/main/scripts/peer_byol_fmnist.py --score /tmp/q41/$name.safetensors --threads 2 --json /tmp/q41/$name-score.json
[ "$name" = ours-km-s1 ] && $B eval --checkpoint /tmp/q41/runs/$name --train /tmp/w46/fm-train --test /tmp/w46/fm-test --protocol both --json /tmp/q41/$name-byol-eval.json
