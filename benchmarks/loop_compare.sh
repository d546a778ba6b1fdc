#!/bin/bash
# Alternating rounds: the job on the CPU backend, default settings, old loop (868114f) vs new.
cd /tmp/devloop_bench
for round in 1 2 3; do
  for tree in old new; do
    src=/tmp/devloop_old; [ $tree = new ] && src=/work/wt/devloop
    rm -rf out_$tree cache_$tree
    s=$(date +%s.%N)
    CBIR_JAX_COMPILATION_CACHE=/tmp/devloop_bench/cache_$tree PYTHONPATH=$src nice -n 10 /work/main/.venv/bin/python $src/launch/extract.py --images=/tmp/devloop_bench/img --output=/tmp/devloop_bench/out_$tree --batch_size=16 --progress=none 2>/dev/null | sed "s/^/$tree r$round: /"
  done
done
