#!/usr/bin/env bash
# Every benchmark at the paper's scale on one GPU (bfloat16, batch 256); the tables land
# next to the CPU ones with the device named in each. About 30-40 minutes on one H100,
# most of it compiling. Run from the repository root:  bash benchmarks/run_gpu.sh
set -euo pipefail
python -m benchmarks.derivative --batch 256 --dtype bfloat16 --reps 20 --out benchmarks/derivative_gpu
python -m benchmarks.models --batch 256 --dtype bfloat16 --reps 20 --variants --impls grouped,folded \
    --out benchmarks/models_gpu
python -m benchmarks.profile --batch 256 --dtype bfloat16 --steps 5 --out benchmarks/profile_gpu
# The host's JPEG decoding, beside the GPU's training step (the rate per core is what matters).
python -m benchmarks.pipeline --workers 1,4,8,16 --models-json benchmarks/models_gpu.json \
    --out benchmarks/pipeline_gpu_host
