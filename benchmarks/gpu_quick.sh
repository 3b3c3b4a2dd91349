#!/usr/bin/env bash
# A quick GPU check for a 10-minute window: about 6 minutes on one H200 (350 s measured),
# compiling included. In bfloat16 at batch 256:
#   - ResNet50 against Eq. (3) softball@ds at 224x224: training and inference img/s, peak
#     memory, training MFU against the chip's bfloat16 peak;
#   - K's implementations (grouped, folded, stencil), forward and forward + backward, for
#     the weight-shared and the per-channel layouts of Eq. (3);
#   - the host's input pipeline with 16 grain worker processes, beside the training steps.
# Writes models, derivative and pipeline .md/.json (each opening with its command, device and
# date) to $OUT, by default benchmarks/results/<device> (e.g. benchmarks/results/gpu_h200,
# the layout of every benchmark's results; a dry run's default is a new temporary folder),
# then prints the fastest K in forward + backward.
#
#     bash benchmarks/gpu_quick.sh             # -> benchmarks/results/<device>/{models,derivative,pipeline}.*
#     OUT=/tmp/quick bash benchmarks/gpu_quick.sh
#     bash benchmarks/gpu_quick.sh --dry-run   # or QHNET_DRY_RUN=1: the same steps, tiny, on CPU
set -euo pipefail

dry_run=${QHNET_DRY_RUN:-0}
for arg in "$@"; do
    case $arg in
        --dry-run) dry_run=1 ;;
        *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
    esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
cd "$repo"
if [[ $dry_run == 1 ]]; then
    export JAX_PLATFORMS=cpu
    # Tiny tables must not overwrite the committed ones in benchmarks/results.
    out=${OUT:-$(mktemp -d)}
else
    out=${OUT:-benchmarks/results/$("$python" -c 'from benchmarks import timing; print(timing.device_slug())')}
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the benchmarks run from the repository root

# The old loader (a git worktree at an old commit) is left out: its comparison is a
# per-core CPU figure, and it needs that commit's history in this checkout.
pipeline=(--no-baseline --rounds 1 --models-json "$out/models.json")
if [[ $dry_run == 1 ]]; then
    data_root=$(mktemp -d)
    trap 'rm -rf "$data_root"' EXIT
    sizes=(--image-size 32 --batch 2 --reps 1)
    pipeline+=(--root "$data_root" --classes 2 --per-class 8 --image-size 32 --batch 2
               --workers 1 --seconds 0.5 --batches 1)
else
    sizes=(--batch 256 --reps 10)
    pipeline+=(--workers 16 --seconds 5)
fi

run() {
    local start=$SECONDS
    printf '+' >&2; printf ' %q' "$@" >&2; echo >&2
    "$@"
    echo "  ($((SECONDS - start)) s)" >&2
}

# A part that fails is reported and the others still run.
failed=()
run "$python" -m benchmarks.models --models 'resnet50;eq3_softball' --dtype bfloat16 "${sizes[@]}" \
    --out "$out/models" || failed+=(models)
# Layouts 0 and 1: Eq. (3)'s; Eq. (7)'s (j, k) channels are left out for time.
run "$python" -m benchmarks.derivative --dtype bfloat16 --modes fwd,train --layouts 0,1 "${sizes[@]}" \
    --out "$out/derivative" || failed+=(derivative)
run "$python" -m benchmarks.pipeline "${pipeline[@]}" --out "$out/pipeline" || failed+=(pipeline)

[[ -f $out/derivative.json ]] && "$python" - "$out/derivative.json" <<'EOF'
import json, statistics, sys

with open(sys.argv[1]) as f:
    report = json.load(f)
totals = {}  # layout -> impl -> seconds per network (each layer times its block count)
for layer in report['layers']:
    per_impl = totals.setdefault(layer['layout'], {})
    for impl, times in layer['times']['train'].items():
        per_impl[impl] = per_impl.get(impl, 0.0) + statistics.median(times[report['clock']]) * layer['count']
for layout, per_impl in totals.items():
    ranked = sorted(per_impl, key=per_impl.get)
    print(f'fastest K in train mode (forward + backward), {layout}: {ranked[0]} ('
          + ', '.join(f'{impl} {per_impl[impl] * 1e3:.1f} ms' for impl in ranked) + ' per network)')
EOF
echo "tables in $out; $SECONDS s in all"
if (( ${#failed[@]} )); then echo "failed: ${failed[*]}" >&2; exit 1; fi
