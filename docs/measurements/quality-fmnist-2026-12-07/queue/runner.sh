#!/usr/bin/env bash
# Runs /tmp/q41/queue.txt line by line (lines may be appended while it runs), niced.
cd /work/main
n=0
while true; do
  n=$((n+1))
  line=$(sed -n "${n}p" /tmp/q41/queue.txt)
  if [ -z "$line" ]; then sleep 30; line=$(sed -n "${n}p" /tmp/q41/queue.txt); fi
  if [ -z "$line" ]; then n=$((n-1)); sleep 30; continue; fi
  [ "$line" = "STOP" ] && break
  echo "$(date +%T) start $n: $line" >> /tmp/q41/runner.log
  start=$(date +%s)
  OMP_WAIT_POLICY=PASSIVE nice -n 19 bash -c "$line" > /tmp/q41/job$n.log 2>&1
  echo "$(date +%T) end $n rc=$? $(( $(date +%s)-start )) s" >> /tmp/q41/runner.log
done
