#!/usr/bin/env bash
# A quick GPU check for a 10-minute window, compiling included, sized for at most 8 minutes on
# one H200: the same check without the fused kernels and with K `grouped` took 350 s; the
# Triton compilation of the fused kernels is not yet measured. In bfloat16 at batch 256:
#   - ResNet50 against Eq. (3) softball@ds at 224x224, the latter with the block's product by
#     the layers (block_impl=xla) and by the fused Pallas kernels (block_impl=pallas):
#     training and inference img/s, peak memory, training MFU against the chip's bf16 peak;
#   - K's implementations folded and stencil (grouped, 3-10x stencil's time per network in
#     results/gpu_h200, is left out for time), forward and forward + backward, and Eq. (3)'s
#     whole product, pallas against xla, forward + backward, with its bandwidth and FLOP rate,
#     for the weight-shared and the per-channel layouts of Eq. (3); 5 repetitions (10 for the
#     models);
#   - the host's input pipeline with 16 grain worker processes, beside the training steps.
# Writes models, derivative and pipeline .md/.json (each opening with its command, device and
# date) to $OUT, by default benchmarks/results/<device> (e.g. benchmarks/results/gpu_h200,
# the layout of every benchmark's results; a dry run's default is a new temporary folder),
# then prints the fastest K in forward + backward, the fused product per network and
# Eq. (3)'s training img/s (xla and pallas) against ResNet50's. A pallas row or candidate that
# fails to compile is reported in its table and the part counts as failed.
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
    sizes=(--image-size 32 --batch 2)
    model_reps=(--reps 1)
    derivative_reps=(--reps 1)
    pipeline+=(--root "$data_root" --classes 2 --per-class 8 --image-size 32 --batch 2
               --workers 1 --seconds 0.5 --batches 1)
else
    sizes=(--batch 256)
    model_reps=(--reps 10)
    derivative_reps=(--reps 5)
    pipeline+=(--workers 16 --seconds 5)
fi

# Runs a part, prints its time and returns its exit status.
run() {
    local start=$SECONDS status=0
    printf '+' >&2; printf ' %q' "$@" >&2; echo >&2
    "$@" || status=$?
    echo "  ($((SECONDS - start)) s)" >&2
    return "$status"
}

# A part that fails is reported and the others still run.
failed=()
run "$python" -m benchmarks.models --models 'resnet50;eq3_softball' --block-impls xla,pallas \
    --dtype bfloat16 "${sizes[@]}" "${model_reps[@]}" --out "$out/models" || failed+=(models)
# Layouts 0 and 1: Eq. (3)'s; Eq. (7)'s (j, k) channels are left out for time.
run "$python" -m benchmarks.derivative --dtype bfloat16 --modes fwd,train,fused --layouts 0,1 \
    --impls folded,stencil "${sizes[@]}" "${derivative_reps[@]}" --out "$out/derivative" \
    || failed+=(derivative)
run "$python" -m benchmarks.pipeline "${pipeline[@]}" --out "$out/pipeline" || failed+=(pipeline)

# A summary that fails is reported like a part.
if [[ -f $out/derivative.json ]]; then
    "$python" - "$out/derivative.json" <<'EOF' || failed+=(derivative-summary)
import json, statistics, sys

with open(sys.argv[1]) as f:
    report = json.load(f)
titles = {'train': 'fastest K in train mode (forward + backward)',
          'fused': 'fastest Eq. (3) product (forward + backward)'}
totals = {mode: {} for mode in titles}  # mode -> layout -> candidate -> seconds per network
for layer in report['layers']:
    timed = {'train': layer['times'].get('train', {}), 'fused': layer.get('fused', {}).get('times', {})}
    for mode, times in timed.items():
        per_candidate = totals[mode].setdefault(layer['layout'], {})
        for name, values in times.items():  # each layer times its block count
            seconds = statistics.median(values[report['clock']]) * layer['count']
            per_candidate[name] = per_candidate.get(name, 0.0) + seconds
for mode, per_layout in totals.items():
    for layout, per_candidate in per_layout.items():
        ranked = sorted(per_candidate, key=per_candidate.get)
        if ranked:
            print(f'{titles[mode]}, {layout}: {ranked[0]} ('
                  + ', '.join(f'{name} {per_candidate[name] * 1e3:.1f} ms' for name in ranked)
                  + ' per network)')
EOF
fi
if [[ -f $out/models.json ]]; then
    "$python" - "$out/models.json" <<'EOF' || failed+=(models-summary)
import json, statistics, sys

with open(sys.argv[1]) as f:
    report = json.load(f)
rows = {row['label']: row for row in report['rows']}
errors = {item['label']: item['error'] for item in report.get('failed', [])}


def seconds(row, clock):
    return statistics.median(row['train_seconds'][clock])


base, clock, batch = rows['ResNet50'], report['clock'], report['batch']
parts = []
for impl in ('xla', 'pallas'):
    label = f'Eq. (3) softball@ds (block_impl={impl})'
    if label in rows:
        row = rows[label]
        parts.append(f'{impl} {batch / seconds(row, "wall"):.1f} img/s '
                     f'({seconds(base, clock) / seconds(row, clock):.2f}x)')
    else:
        parts.append(f'{impl} not measured ({errors.get(label, "no row")})')
print(f'Eq. (3) softball@ds training against ResNet50 ({batch / seconds(base, "wall"):.1f} '
      'img/s = 1.00x): ' + ', '.join(parts))
EOF
fi
echo "tables in $out; $SECONDS s in all"
if (( ${#failed[@]} )); then echo "failed: ${failed[*]}" >&2; exit 1; fi
