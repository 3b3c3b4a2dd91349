#!/usr/bin/env bash
# Every benchmark at the paper's scale on one GPU (bfloat16, batch 256); the tables land in
# $OUT, by default benchmarks/results/<device> (e.g. benchmarks/results/gpu_h200) beside the
# CPU ones, as derivative, kernels, models, profile and pipeline .md/.json, each opening with
# its command, device and date. About 30-40 minutes on one H100, most of it compiling (without
# the fused Eq. (3) kernels, whose compilation is not yet measured). Run from
# the repository root:
#
#     bash benchmarks/run_gpu.sh
#     OUT=/tmp/gpu BASELINE=REV bash benchmarks/run_gpu.sh   # REV: a revision with the old loader
#
# Without BASELINE the pipeline benchmark leaves out the old loader (`--no-baseline`).
set -euo pipefail
python=${PYTHON:-python}
out=${OUT:-benchmarks/results/$("$python" -c 'from benchmarks import timing; print(timing.device_slug())')}
mkdir -p "$out"
"$python" -m benchmarks.derivative --batch 256 --dtype bfloat16 --reps 20 --modes fwd,train,block \
    --out "$out/derivative"
# The fused product's kernels under a few tiles (the default first; wider output blocks
# recompute C u and K u fewer times in the forward kernel).
"$python" -m benchmarks.kernels --batch 256 --dtype bfloat16 --reps 20 \
    --tiles 64x32x64/w4s1,64x32x128/w8s1,32x32x256/w8s1,128x32x64/w8s1,64x16x64/w4s2 \
    --out "$out/kernels"
"$python" -m benchmarks.models --batch 256 --dtype bfloat16 --reps 20 --variants --impls grouped,folded \
    --block-impls xla,pallas --out "$out/models"
"$python" -m benchmarks.profile --batch 256 --dtype bfloat16 --steps 5 --out "$out/profile"
# The host's JPEG decoding, beside the GPU's training step (the rate per core is what matters).
if [[ -n ${BASELINE:-} ]]; then baseline=(--baseline "$BASELINE"); else baseline=(--no-baseline); fi
"$python" -m benchmarks.pipeline "${baseline[@]}" --workers 1,4,8,16 --models-json "$out/models.json" \
    --out "$out/pipeline"
