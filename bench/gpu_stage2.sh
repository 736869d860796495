#!/usr/bin/env bash
# Stage-2 figures on a GPU: bench/bench_detector_ap.py with a GPU-length schedule.
#
#   bash bench/gpu_stage2.sh            # no arguments; writes bench/results/detector_ap_gpu.json
#
# What it runs (from the repository root, with .venv):
#   1. the demo data (data/demo) and its stage-1 run (runs/demo, configs/demo.yaml on CUDA),
#      each only when missing;
#   2. Mask R-CNN R50-FPN (torchvision), random init, AMP, batch 8 at the demo images' own
#      size (192 x 256), ITERATIONS iterations (the demo schedule scaled: warm-up 10 %, lr
#      steps at 75 % and 90 %), trained on GT / EXITS pseudo / reviewed pseudo (simulated
#      spot-fix review of the 10 % lowest-scoring objects) / box masks, seeds 0 1 2, on
#      every backend installed (Detectron2's built-in R50-FPN too when it imports; the bench
#      prints why it skips one that does not);
#   3. evaluation on data/demo/val.json; mean ± sd over the seeds and % of the GT-trained AP.
#
# Resumable: finished runs are reused (runs/bench_detector_ap_gpu/<backend>/<run>/row.json)
# and an interrupted torchvision run resumes from its last checkpoint (every 250
# iterations), so when a per-command time limit cuts it, run the same command again.
# Environment overrides (all optional): ITERATIONS (1500), JOBS (4 trainings at once on the
# one GPU), THREADS (2 CPU threads each), PY (.venv/bin/python), EXITS (.venv/bin/exits).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PY:-.venv/bin/python}
EXITS=${EXITS:-.venv/bin/exits}
ITERATIONS=${ITERATIONS:-1500}
JOBS=${JOBS:-4}
THREADS=${THREADS:-2}
OUT=bench/results/detector_ap_gpu.json

if [[ ! -x "$PY" ]]; then
    echo "gpu_stage2.sh: $PY not found: create the venv first (make venv)" >&2
    exit 1
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_stage2.sh: CUDA is not available to $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda)')); run this on a GPU machine, or use bench/bench_detector_ap.py --device cpu for the CPU-length figures" >&2
    exit 1
fi
"$PY" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

export PREFECT_SERVER_ANALYTICS_ENABLED=false
if [[ ! -f data/demo/instances.json ]]; then
    "$EXITS" demo-data data/demo
fi
if [[ ! -f runs/demo/run_summary.json ]]; then
    # stage 1 (minutes on a GPU): configs/demo.yaml has device: auto, so it runs on CUDA
    PREFECT_HOME=${PREFECT_HOME:-$(mktemp -d)} "$EXITS" run --images data/demo/images \
        --annotations data/demo/instances.json --workdir runs/demo --config configs/demo.yaml
fi

"$PY" bench/bench_detector_ap.py \
    --device cuda --seeds 0 1 2 --backends torchvision detectron2 \
    --iterations "$ITERATIONS" --jobs "$JOBS" --threads "$THREADS" \
    --set detector.arch=maskrcnn_resnet50_fpn \
    --set detector.amp=true \
    --set detector.batch_size=8 \
    --set detector.min_size=192 --set detector.max_size=256 \
    --set detector.roi_batch_size_per_image=128 \
    --set detector.num_workers=2 \
    --set detector.checkpoint_every=250 \
    --workdir runs/bench_detector_ap_gpu --out "$OUT"
echo "gpu_stage2.sh: wrote $OUT"
