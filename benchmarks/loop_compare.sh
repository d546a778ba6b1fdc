#!/bin/bash
# The job on the CPU backend with default settings, two trees side by side, alternating rounds;
# prints each run's summary line. Each run compiles (a fresh compilation cache).
#   git archive 868114f | tar -x -C /tmp/cbir_old   # the previous main loop
#   OLD=/tmp/cbir_old NEW=$PWD IMAGES=/path/to/256/photos benchmarks/loop_compare.sh
set -u
OLD=${OLD:?a checkout of the previous loop}; NEW=${NEW:-$PWD}; IMAGES=${IMAGES:?photos}
ROUNDS=${ROUNDS:-3}; PY=${PY:-python3}; WORK=$(mktemp -d)
for round in $(seq "$ROUNDS"); do
  for tree in old new; do
    src=$OLD; [ "$tree" = new ] && src=$NEW
    CBIR_JAX_COMPILATION_CACHE=$WORK/cache_${tree}_$round PYTHONPATH=$src nice -n 10 \
      "$PY" "$src/launch/extract.py" --images="$IMAGES" --output="$WORK/out_${tree}_$round" \
      --batch_size=16 --progress=none 2>/dev/null | sed "s/^/$tree r$round: /"
  done
done
rm -rf "$WORK"
