#!/usr/bin/env bash
# A quick GPU check for a 10-minute window, compiling included, sized for at most 8 minutes on
# one H200: the same check without the fused kernels and with K `grouped` took 350 s. The
# fused kernels' Triton compilation on the GPU is not yet measured; compiling every layer's 5
# kernels once at the default tiles takes 31 s on 2 CPU cores (`python -m benchmarks.registers`),
# and the parts below compile them again in each program that runs them. In bfloat16 at
# batch 256, in order of what each part decides (a run cut short keeps the first parts' tables):
#   - models: ResNet50 against Eq. (3) softball@ds at 224x224, the latter with the block's
#     product by the layers (block_impl=xla) and by the fused Pallas kernels
#     (block_impl=pallas): training and inference img/s, peak memory, training MFU against
#     the chip's bf16 peak; 10 repetitions;
#   - kernels: Eq. (3)'s whole product per layer, forward + backward, by the layers and by
#     the fused kernels at their default tiles, and each kernel alone, with the bandwidth and
#     FLOP rate each reaches against the chip's peaks; 5 repetitions (a tile sweep, for a
#     second run: python -m benchmarks.kernels --tiles A,B,...);
#   - models_stage1: the same models cut to stage 1 (stem, stage 1, pool and head);
#   - derivative: K's implementations folded and stencil (grouped, 3-10x stencil's time per
#     network in results/gpu_h200, is left out for time), forward and forward + backward,
#     for the weight-shared and the per-channel layouts of Eq. (3); 5 repetitions;
#   - pipeline: the host's input pipeline with 16 grain worker processes.
# Each writes its .md/.json (opening with its command, device and date) to $OUT, by default
# benchmarks/results/<device> (e.g. benchmarks/results/gpu_h200, the layout of every
# benchmark's results; a dry run's default is a new temporary folder). Then it prints Eq.
# (3)'s training img/s (xla and pallas) against ResNet50's, whole and in stage 1, the fused
# product and its kernels per network, and the fastest K. A pallas row or candidate that
# fails to compile is reported in its table and the part counts as failed.
#
#     bash benchmarks/gpu_quick.sh             # -> benchmarks/results/<device>/{models,kernels,...}.*
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
    layer_reps=(--reps 1)
    pipeline+=(--root "$data_root" --classes 2 --per-class 8 --image-size 32 --batch 2
               --workers 1 --seconds 0.5 --batches 1)
else
    sizes=(--batch 256)
    model_reps=(--reps 10)
    layer_reps=(--reps 5)
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
# The parts in order of what they decide, so that a run cut short keeps the first ones' tables.
models=("$python" -m benchmarks.models --models 'resnet50;eq3_softball' --block-impls xla,pallas
        --dtype bfloat16 "${sizes[@]}" "${model_reps[@]}")
run "${models[@]}" --out "$out/models" || failed+=(models)
run "$python" -m benchmarks.kernels --dtype bfloat16 "${sizes[@]}" "${layer_reps[@]}" \
    --out "$out/kernels" || failed+=(kernels)
run "${models[@]}" --stages 1 --out "$out/models_stage1" || failed+=(models-stage1)
# Layouts 0 and 1: Eq. (3)'s; Eq. (7)'s (j, k) channels are left out for time.
run "$python" -m benchmarks.derivative --dtype bfloat16 --modes fwd,train --layouts 0,1 \
    --impls folded,stencil "${sizes[@]}" "${layer_reps[@]}" --out "$out/derivative" \
    || failed+=(derivative)
run "$python" -m benchmarks.pipeline "${pipeline[@]}" --out "$out/pipeline" || failed+=(pipeline)

# A summary that fails is reported like a part.
if [[ -f $out/derivative.json ]]; then
    "$python" - "$out/derivative.json" <<'EOF' || failed+=(derivative-summary)
import json, statistics, sys

with open(sys.argv[1]) as f:
    report = json.load(f)
totals = {}  # layout -> candidate -> seconds per network
for layer in report['layers']:
    per_candidate = totals.setdefault(layer['layout'], {})
    for name, values in layer['times'].get('train', {}).items():  # each layer times its count
        seconds = statistics.median(values[report['clock']]) * layer['count']
        per_candidate[name] = per_candidate.get(name, 0.0) + seconds
for layout, per_candidate in totals.items():
    ranked = sorted(per_candidate, key=per_candidate.get)
    if ranked:
        print(f'fastest K in train mode (forward + backward), {layout}: {ranked[0]} ('
              + ', '.join(f'{name} {per_candidate[name] * 1e3:.1f} ms' for name in ranked)
              + ' per network)')
EOF
fi
if [[ -f $out/kernels.json ]]; then
    "$python" - "$out/kernels.json" <<'EOF' || failed+=(kernels-summary)
import json, sys

from benchmarks.kernels import PARTS, network_seconds

with open(sys.argv[1]) as f:
    report = json.load(f)


def ms(name):  # per network; 'failed' where any layer failed
    seconds = network_seconds(report, name, report['clock'])
    return 'failed' if seconds is None else f'{seconds * 1e3:.1f}'


for tiles in report['tiles']:
    print(f'Eq. (3) product per network (forward + backward), {tiles}: xla {ms("xla")} ms; '
          'pallas ' + ', '.join(f'{part} {ms(f"{tiles} {part}")}' for part in PARTS) + ' ms')
EOF
fi
for stem in models models_stage1; do
    [[ -f $out/$stem.json ]] || continue
    "$python" - "$out/$stem.json" <<'EOF' || failed+=("$stem-summary")
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
scope = f', first {report["stages"]} stage(s)' if report.get('stages') else ''
print(f'Eq. (3) softball@ds training against ResNet50{scope} ({batch / seconds(base, "wall"):.1f} '
      'img/s = 1.00x): ' + ', '.join(parts))
EOF
done
echo "tables in $out; $SECONDS s in all"
if (( ${#failed[@]} )); then echo "failed: ${failed[*]}" >&2; exit 1; fi
