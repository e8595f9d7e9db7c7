#!/usr/bin/env bash
# The GPU checks of issues #4 and #5 as one script for one H200 (about 9 minutes), run through the device tool:
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
# .whl holds the wheels of ultralytics 8.4.190, ultralytics-thop and ultralytics-platform (see the device README);
# the machine has torch but no ultralytics. Results land in $OUT (and benchmarks/results/ on that machine).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/site/polars && echo 'def __getattr__(name): raise ImportError("polars stand-in")' > /tmp/site/polars/__init__.py
export PYTHONPATH=/tmp/site:$PWD YOLO_OFFLINE=1 YOLO_VERBOSE=False PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
T=../shared/models/bccd/yolov8s-bccd.pt; D=../shared/data/bccd/bccd.yaml
[ -f "$T" ] || { T=shared/models/bccd/yolov8s-bccd.pt; D=shared/data/bccd/bccd.yaml; }
common=(--teacher "$T" --student yolov8n.yaml --data "$D" --imgsz 512 --epochs 80 --batch 16 --workers 5
        --splits val test --recipes none default --ultralytics-kd 1.0 6.0)
# two seeds side by side: the GPU has room, the 16 CPU cores feed both
python3 benchmarks/gain.py "${common[@]}" --seeds 0 --project /tmp/g0 --out "$OUT/gain-gpu-s0.json" > "$OUT/gain-s0.log" 2>&1 &
python3 benchmarks/gain.py "${common[@]}" --seeds 1 --project /tmp/g1 --out "$OUT/gain-gpu-s1.json" > "$OUT/gain-s1.log" 2>&1 &
wait
python3 benchmarks/speed.py --teacher "$T" --student yolov8n.yaml --data "$D" --imgsz 640 --batch 32 --workers 14 \
    --steps 30 --end-to-end 3 --out "$OUT/speed-gpu.json" 2>&1 | tee "$OUT/speed.log"
