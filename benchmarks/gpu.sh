#!/usr/bin/env bash
# The GPU checks (issue #12: gain table and speed table) as one script for one H200, run through the device tool:
#   run(command="bash benchmarks/gpu.sh", carry=[".whl", "shared"], timeout_s=600)          # about 8 minutes
# and its smoke mode, the very same script end to end at a tiny size on a CPU (same installs, paths and outputs):
#   bash benchmarks/gpu.sh smoke                                                            # under 5 minutes
# .whl holds the wheels of ultralytics 8.4.190, ultralytics-thop and ultralytics-platform (see the device README):
# the GPU machine has torch but no ultralytics. shared/ is a copy of ../shared/data/bccd and ../shared/models/bccd
# (../shared does not travel). Results land in $OUT (benchmarks/results/<mode>/ when OUT is unset).
set -uo pipefail
mode=${1:-gpu}
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/site/polars && echo 'def __getattr__(name): raise ImportError("polars stand-in")' > /tmp/site/polars/__init__.py
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks YOLO_OFFLINE=1 YOLO_VERBOSE=False PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/$mode}
mkdir -p "$OUT"
if [ "$mode" = smoke ]; then
  setting=smoke; device=cpu; workers=2
  speed=(--imgsz 128 --batch 8 --steps 2 --warmup 1 --end-to-end 1 --recipes default)
else
  setting=gpu; device=0; workers=7
  speed=(--imgsz 640 --batch 32 --steps 30 --end-to-end 3)
fi
gain=(--settings "$setting" --recipes none default --splits val test --device "$device" --workers "$workers")
# the two seeds side by side: on the GPU they share it, 16 CPU cores feed both
for seed in 0 1; do
  python3 benchmarks/gain.py "${gain[@]}" --seeds "$seed" --project "/tmp/gain-s$seed" \
    --out "$OUT/gain-s$seed.json" > "$OUT/gain-s$seed.log" 2>&1 &
done
wait
tail -n 8 "$OUT"/gain-s*.log
python3 benchmarks/speed.py "${speed[@]}" --device "$device" --workers "$workers" --out "$OUT/speed.json" 2>&1 \
  | tee "$OUT/speed.log" | grep -v -i warning
