#!/usr/bin/env bash
# Peak memory against slide size on generated slides (CPU).
# Per size: 4 generated slides (train: one negative + one positive; val: 1; test: 1), tiles of 32 px at
# level 0, one epoch, every point a fresh process, one after another (single-threaded torch);
# --max-memory (MAXMEM, default 2GB) makes abmil's growth end in `oom`.
set -u
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MAXMEM=${MAXMEM:-2GB}
OUT=${OUT:-results/slides-size-cpu}
WORK=${WORK:-/tmp/slides-size-sweep}
SIZES=${SIZES:-"1024 2048 4096 8192 16384"}
METHODS=${METHODS:-"grad-accum streamingclam abmil"}
TIMEOUT=${TIMEOUT:-900}  # seconds per point; a 16384² streamingclam point needs more (SIZES=16384 TIMEOUT=5400)
for S in $SIZES; do
  D=$WORK/$S
  if [ ! -f "$D/sweep.csv" ]; then
    python -m milbench_plugins.slides.generator "$D" --n 4 --size ${S}x${S} --seed $S >/dev/null
    printf 'slide_id,path,label,split\nslide-000,slide-000.svs,0,train\nslide-001,slide-001.svs,1,train\nslide-002,slide-002.tiff,0,val\nslide-003,slide-003.tiff,1,test\n' > "$D/sweep.csv"
  fi
  for M in $METHODS; do
    timeout "$TIMEOUT" milbench run -m $M -d slides --device cpu --max-memory "$MAXMEM" --results "$OUT" \
      --set manifest="$D/sweep.csv" --set tile_cache="$WORK/cache" --set instance_size=32 --set epochs=1 \
      2>&1 | grep -E " on slides \(seed|error:"
  done
done
