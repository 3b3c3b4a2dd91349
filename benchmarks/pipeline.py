"""Input pipeline, old against new: ImageFolder JPEGs to 224x224 training batches.

    python -m benchmarks.pipeline --baseline REV   # REV: a revision with the old loader
    python -m benchmarks.pipeline --no-baseline --data-dir /data/imagenet100  # train/<wnid>/*.JPEG

On the train split with augmentation on, each measurement running for `--seconds` (and
at least `--batches` batches) after a warm-up:

1. the old loader (a thread pool over PIL, float32 output) of `--baseline`, a git revision
   from before the grain loader (required unless `--no-baseline` leaves this part out),
   checked out with `git worktree` and run in a subprocess that imports that tree's `qhnet`:
   decode + random-resized crop + flip at each `--threads` count, alternating `--rounds`
   times with (2a), so that a change in machine load hits both; medians are reported;
2. the new grain loader (this working tree's `qhnet.data`) in this process
   (num_workers=0): (a) crop + flip, (b) + RandAugment + random erasing;
3. the new loader with `--workers` grain worker processes, (a) and (b);
4. decoders alone, on the same JPEGs and crop boxes: decode + crop + resize to 224 with a
   full PIL decode and PIL's bilinear resize (the old loader's), PIL's reduced-size
   `draft` decode, simplejpeg's reduced-size decode, and qhnet.data's own (simplejpeg's
   full decode, OpenCV's bilinear resize).

images/s per core = images / CPU seconds: of every thread of the process and, with worker
processes, of the workers too (`getrusage(RUSAGE_CHILDREN)` over the iterator's life,
start-up included). It is what one fully used core sustains, whatever else runs on the
machine; wall-clock images/s is what a run gets here. From the per-core rates: the cores
a 3,000 images/s accelerator step needs, and beside each training step of a
`benchmarks.models` JSON (`--models-json`, default benchmarks/results/<device>/models.json)
the cores it takes to keep that step fed.

Without `--data-dir`, a synthetic ImageFolder is generated into `--root`: real-sized
JPEGs (500x375, quality 90, ~100 KB, about an average ImageNet photo's 110 KB) made from
upsampled Fashion-MNIST images (/usr/share/datasets/fashion-mnist) in colour, with
film-grain texture so that they compress like photos, or from smooth random noise
when Fashion-MNIST is not installed. A default run takes a few minutes on 2 cores.

Writes a markdown report (stdout and `--out`.md) and JSON (`--out`.json); `--out` defaults
to benchmarks/results/<device>/pipeline (`timing.device_slug()`: cpu_2core, gpu_h200, ...),
overwritten by a rerun. The report names the old loader's revision as `--baseline` gave it.
"""

import argparse
import contextlib
import gzip
import io
import json
import math
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

import numpy as np
from PIL import Image
import simplejpeg

from benchmarks import timing

FASHION_MNIST = '/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = 'benchmarks.pipeline'
ACCELERATOR_IMAGES_PER_SECOND = 3000
PREFETCH_BATCHES = 2  # how far ahead both loaders decode (per worker for grain's workers)
DECODER_SAMPLE = 256  # JPEGs held in memory for the decoder comparison
DECODER_CHUNK = 16  # images each decoder decodes per turn
FULL_DECODE, DRAFT_DECODE, SIMPLEJPEG_DECODE, QHNET_DECODE = (
    'PIL full decode, PIL resize', 'PIL draft, PIL resize',
    'simplejpeg min_height/min_width, PIL resize', 'simplejpeg, OpenCV resize (qhnet.data)')
ERASING = 0.4
# The new loader's augmentations: (a) the old loader's, (b) the training recipe's.
AUGMENTATIONS = {
    'crop_flip': dict(rand_augment=False, erasing=0.0),
    'rand_augment_erasing': dict(rand_augment=True, erasing=ERASING),
}
AUGMENTATION_NAMES = {
    'crop_flip': 'crop + flip',
    'rand_augment_erasing': f'crop + flip + RandAugment + erasing {ERASING}',
}


# Data.

def _source_images(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` 28x28 grey images: Fashion-MNIST if present, else smooth noise."""
    if os.path.exists(FASHION_MNIST):
        with gzip.open(FASHION_MNIST) as f:
            data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        return data[rng.choice(len(data), count, replace=False)]
    noise = rng.random((count, 7, 7)) * 255
    return np.stack([np.asarray(Image.fromarray(n.astype(np.uint8)).resize((28, 28), Image.BICUBIC))
                     for n in noise])


def make_imagefolder(root: str, classes: int, per_class: int, seed: int = 0,
                     size: tuple[int, int] = (500, 375)) -> str:
    """Writes root/{train,val}/<wnid>/*.JPEG and root/classes.txt; returns the class-list
    path. Reuses an existing tree with the same layout."""
    wnids = [f'n{90000000 + i:08d}' for i in range(classes)]
    class_list = os.path.join(root, 'classes.txt')
    marker = os.path.join(root, f'.complete-{classes}-{per_class}-{size[0]}x{size[1]}')
    if not os.path.exists(marker):
        rng = np.random.default_rng(seed)
        sources = _source_images(classes * (per_class + 1), rng)
        width, height = size
        for split, count in (('train', per_class), ('val', 1)):
            for c, wnid in enumerate(wnids):
                folder = os.path.join(root, split, wnid)
                os.makedirs(folder, exist_ok=True)
                for i in range(count):
                    grey = sources[(c * (per_class + 1) + i + (per_class if split == 'val' else 0))
                                   % len(sources)]
                    base = np.asarray(Image.fromarray(grey).resize((width, height), Image.BICUBIC),
                                      np.float32)
                    tint = rng.uniform(0.4, 1.0, 3)
                    background = rng.uniform(0, 255, 3)
                    alpha = base[..., None] / 255
                    rgb = alpha * base[..., None] * tint + (1 - alpha) * background
                    rgb += rng.normal(0, 20, rgb.shape)  # film grain: photo-like entropy
                    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(
                        os.path.join(folder, f'{wnid}_{i}.JPEG'), quality=90)
        with open(class_list, 'w') as f:
            f.write('\n'.join(wnids) + '\n')
        open(marker, 'w').close()
    return class_list


def train_files(data_dir: str) -> list[str]:
    """Every file under data_dir/train, sorted."""
    return sorted(os.path.join(folder, name)
                  for folder, _, names in os.walk(os.path.join(data_dir, 'train'))
                  for name in names if not name.startswith('.'))


def sample_jpegs(paths: list[str], count: int, seed: int = 0) -> list[bytes]:
    """The bytes of up to `count` of `paths` drawn at random, RGB or grey JPEGs only (what
    every decoder compared reads)."""
    order = np.random.default_rng(seed).permutation(len(paths))
    jpegs = []
    for index in order:
        with open(paths[index], 'rb') as f:
            jpeg = f.read()
        with Image.open(io.BytesIO(jpeg)) as image:
            if image.format == 'JPEG' and image.mode in ('RGB', 'L'):
                jpegs.append(jpeg)
        if len(jpegs) == count:
            break
    return jpegs


def loader_config(schema, data_dir: str, class_list: str | None, image_size: int, **options):
    """`schema` (that tree's `qhnet.config.data_config()`) set to read the ImageFolder at
    `data_dir` as ImageNet-100, train augmentation on, with `options` on top."""
    schema.update(dict(name='imagenet100', format='imagefolder', data_dir=data_dir,
                       class_list=class_list, image_size=image_size, augment=True, **options))
    return schema


# Timing loaders.

def time_batches(batches: Iterator[dict], batch_size: int, seconds: float, min_batches: int,
                 warmup_batches: int) -> tuple[dict, dict]:
    """(first batch, timings) of consuming `batches`: the first and `warmup_batches` more
    untimed (start-up, and what was prefetched meanwhile), then at least `min_batches` and
    `seconds` of wall time, timed in wall and process CPU seconds."""
    start = time.perf_counter()
    first = next(batches)
    first_batch_seconds = time.perf_counter() - start
    for _ in range(warmup_batches):
        next(batches)
    timed = 0
    start, start_cpu = time.perf_counter(), time.process_time()
    while timed < min_batches or time.perf_counter() - start < seconds:
        next(batches)
        timed += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    images = timed * batch_size
    return first, dict(first_batch_seconds=first_batch_seconds, images=images,
                       images_consumed=(1 + warmup_batches + timed) * batch_size,
                       wall_seconds=wall, cpu_seconds=cpu, images_per_second=images / wall)


def warmup_batches(workers: int) -> int:
    """Batches a loader may hold decoded ahead, and the one being decoded: PREFETCH_BATCHES
    ahead in this process; with workers, as many again in each worker's read-ahead and in
    its output buffer."""
    return PREFETCH_BATCHES + 1 + 2 * PREFETCH_BATCHES * workers


def check_batch(batch: dict, batch_size: int, image_size: int, dtype, erase: bool) -> None:
    shape = (batch_size, image_size, image_size, 3)
    if batch['image'].shape != shape or batch['image'].dtype != dtype:
        raise AssertionError(f'batch images are {batch["image"].dtype} {batch["image"].shape}, '
                             f'expected {np.dtype(dtype)} {shape}')
    if ('erase' in batch) != erase:
        raise AssertionError(f'batch keys {sorted(batch)}: erasing boxes expected: {erase}')


def print_old_loader_runs(worktree: str, request: dict) -> None:
    """In the subprocess: times the old loader of `worktree` at each of request['threads']
    decode threads and prints the runs as one JSON line."""
    sys.path.insert(0, worktree)  # its qhnet, not ours (this module imports no qhnet)
    from qhnet import config, data  # noqa: PLC0415
    if not data.__file__.startswith(os.path.join(worktree, '')):
        raise RuntimeError(f'imported {data.__file__}, not the baseline in {worktree}')
    runs = []
    for threads in request['threads']:
        settings = loader_config(config.data_config(), request['data_dir'],
                                 request['class_list'], request['image_size'],
                                 num_workers=threads)
        batches = data.make_iterator(settings, 'train', batch_size=request['batch'], seed=0,
                                     train=True)
        first, timed = time_batches(batches, request['batch'], request['seconds'],
                                    request['min_batches'], warmup_batches(0))
        batches.close()
        check_batch(first, request['batch'], request['image_size'], np.float32, erase=False)
        runs.append(dict(threads=threads, **timed,
                         images_per_core_second=timed['images'] / timed['cpu_seconds']))
    print(json.dumps(runs))


def git(*args: str) -> str:
    return subprocess.run(['git', '-C', REPO_ROOT, *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@contextlib.contextmanager
def baseline_worktree(revision: str) -> Iterator[str]:
    """A temporary git worktree of `revision`, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix='qhnet-baseline-') as parent:
        worktree = os.path.join(parent, revision)
        git('worktree', 'add', '--detach', worktree, revision)
        try:
            yield worktree
        finally:
            git('worktree', 'remove', '--force', worktree)


def measure_old_loader(worktree: str, request: dict) -> list[dict]:
    """The old loader's runs, from a subprocess that imports the `qhnet` of `worktree`."""
    # Our benchmarks package is imported from REPO_ROOT first; the baseline's qhnet after.
    code = ('import json, sys; from benchmarks import pipeline; '
            'pipeline.print_old_loader_runs(sys.argv[1], json.loads(sys.argv[2]))')
    result = subprocess.run([sys.executable, '-c', code, worktree, json.dumps(request)],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f'the old loader failed:\n{result.stderr[-3000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The run of median images/s per core (the upper one of an even count), with the
    per-core rates of all rounds beside it."""
    ordered = sorted(runs, key=lambda run: run['images_per_core_second'])
    return dict(ordered[len(ordered) // 2],
                rounds_per_core=[run['images_per_core_second'] for run in runs])


def cpu_seconds_of_children() -> float:
    """User + system CPU seconds of every child process that has ended and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reap_workers(timeout: float = 10.0) -> int:
    """Waits for the worker processes that grain's close() killed rather than joined (it
    joins each for up to 25 s, then kills it without waiting), so that getrusage counts
    their CPU time; returns how many are still running."""
    children = multiprocessing.active_children()  # reaps those already dead
    for child in children:
        child.join(timeout)
    return sum(child.is_alive() for child in children)


def measure_new_loader(source: dict, augmentation: str, workers: int, batch: int,
                       seconds: float, min_batches: int) -> dict:
    """One timed run of this tree's loader. Per core: in the timed window with no workers;
    with workers, over the iterator's whole life (see the module docstring)."""
    # Imported late: the old loader's subprocess imports this module, then the baseline's qhnet.
    from qhnet import config, data  # noqa: PLC0415
    settings = loader_config(config.data_config(), source['data_dir'], source['class_list'],
                             source['image_size'], num_workers=workers,
                             **AUGMENTATIONS[augmentation])
    dataset = data.open_dataset(settings)
    children_before, cpu_before = cpu_seconds_of_children(), time.process_time()
    start = time.perf_counter()
    batches = dataset.batches('train', batch_size=batch, seed=0, train=True)
    try:
        first, timed = time_batches(batches, batch, seconds, min_batches,
                                    warmup_batches(workers))
    finally:
        close_start = time.perf_counter()
        batches.close()
        close_seconds = time.perf_counter() - close_start
    lifetime = dict(close_seconds=close_seconds, workers_left_running=reap_workers(),
                    lifetime_seconds=time.perf_counter() - start,
                    lifetime_cpu_seconds=time.process_time() - cpu_before,
                    lifetime_worker_cpu_seconds=cpu_seconds_of_children() - children_before)
    check_batch(first, batch, source['image_size'], np.uint8,
                erase=AUGMENTATIONS[augmentation]['erasing'] > 0)
    if workers:
        per_core = timed['images_consumed'] / (lifetime['lifetime_cpu_seconds']
                                               + lifetime['lifetime_worker_cpu_seconds'])
    else:
        per_core = timed['images'] / timed['cpu_seconds']
    return dict(workers=workers, augmentation=augmentation, **timed, **lifetime,
                images_per_core_second=per_core)


# Decoders.

def covering_size(width: int, height: int, box, size: int) -> tuple[int, int]:
    """The smallest decoded (width, height) at which the crop `box` still spans `size`
    pixels each way: the size the reduced-size decoders ask for."""
    return (math.ceil(width * size / (box[2] - box[0])),
            math.ceil(height * size / (box[3] - box[1])))


def scaled_box(box, scale_x: float, scale_y: float) -> tuple[float, ...]:
    return box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` decoded, in RGB (as qhnet.data's `_to_mode` for 8-bit images)."""
    image.load()
    return image if image.mode == 'RGB' else image.convert('RGB')


Decoded = tuple[np.ndarray, tuple[int, int]]  # the output pixels; the size decoded at


def decode_pil_full(jpeg: bytes, box, size: int) -> Decoded:
    with Image.open(io.BytesIO(jpeg)) as encoded:
        image = to_rgb(encoded)
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=box)), image.size


def decode_pil_draft(jpeg: bytes, box, size: int) -> Decoded:
    """PIL's reduced-size decode (what qhnet.data did before simplejpeg): libjpeg's DCT
    scaling by 1/2, 1/4 or 1/8, then PIL's resize."""
    with Image.open(io.BytesIO(jpeg)) as encoded:
        width, height = encoded.size
        encoded.draft('RGB', covering_size(width, height, box, size))
        box = scaled_box(box, encoded.size[0] / width, encoded.size[1] / height)
        image = to_rgb(encoded)
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=box)), image.size


def decode_simplejpeg(jpeg: bytes, box, size: int) -> Decoded:
    """libjpeg-turbo's scaled decode (any of its M/8 factors), then PIL's crop and resize."""
    height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    min_width, min_height = covering_size(width, height, box, size)
    pixels = simplejpeg.decode_jpeg(jpeg, colorspace='RGB', min_height=min_height,
                                    min_width=min_width)
    box = scaled_box(box, pixels.shape[1] / width, pixels.shape[0] / height)
    image = Image.fromarray(pixels)
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=box)), image.size


def decode_qhnet(jpeg: bytes, box, size: int) -> Decoded:
    """What `qhnet.data` does: libjpeg-turbo's full decode (simplejpeg), OpenCV's resize."""
    from qhnet.data import transforms  # noqa: PLC0415
    pixels = transforms.decode_pixels(jpeg, 3)
    resized = transforms.resize(pixels, box, size)
    return resized, (pixels.shape[1], pixels.shape[0])


def decoders() -> dict[str, Callable[[bytes, tuple, int], Decoded]]:
    """The decoders to compare, the old loader's (PIL's full decode and resize) first."""
    return {FULL_DECODE: decode_pil_full, DRAFT_DECODE: decode_pil_draft,
            SIMPLEJPEG_DECODE: decode_simplejpeg, QHNET_DECODE: decode_qhnet}


def crop_boxes(jpegs: list[bytes], seed: int = 0) -> list[tuple[int, int, int, int]]:
    """One random-resized crop box per JPEG, drawn as qhnet.data draws them."""
    from qhnet.data import transforms  # noqa: PLC0415
    draw_box = transforms.random_resized_crop_box
    rng = np.random.default_rng(seed)
    boxes = []
    for jpeg in jpegs:
        with Image.open(io.BytesIO(jpeg)) as image:
            boxes.append(draw_box(rng, *image.size))
    return boxes


def decoder_rates(candidates: dict, jpegs: list[bytes], boxes: list, size: int,
                  seconds: float) -> dict[str, float]:
    """Images per CPU second of each decoder on (jpegs, boxes), in turns of DECODER_CHUNK
    images round-robin (so that load from elsewhere hits all alike) until each has run
    `seconds`."""
    cpu, images = dict.fromkeys(candidates, 0.0), dict.fromkeys(candidates, 0)
    turn = 0
    while min(cpu.values()) < seconds:
        indices = [(turn * DECODER_CHUNK + i) % len(jpegs) for i in range(DECODER_CHUNK)]
        for name, decode in candidates.items():
            start = time.process_time()
            for i in indices:
                decode(jpegs[i], boxes[i], size)
            cpu[name] += time.process_time() - start
            images[name] += DECODER_CHUNK
        turn += 1
    return {name: images[name] / cpu[name] for name in candidates}


def decoder_fidelity(candidates: dict, jpegs: list[bytes], boxes: list,
                     size: int) -> dict[str, tuple[float, float]]:
    """Per decoder: (mean absolute difference of its pixels from the full decode's,
    fraction of the JPEGs it decoded at reduced size)."""
    differences = {name: [] for name in candidates}
    reduced = dict.fromkeys(candidates, 0)
    for jpeg, box in zip(jpegs, boxes):
        full, full_size = decode_pil_full(jpeg, box, size)
        for name, decode in candidates.items():
            pixels, decoded_size = decode(jpeg, box, size)
            differences[name].append(np.abs(pixels.astype(np.int16) - full).mean())
            reduced[name] += decoded_size != full_size
    return {name: (float(np.mean(differences[name])), reduced[name] / len(jpegs))
            for name in candidates}


def compare_decoders(jpegs: list[bytes], size: int, seconds: float) -> list[dict]:
    """Per decoder: images/s per core decoding, cropping and resizing `jpegs` to `size`, and
    how its output and decoded size differ from the full decode's."""
    boxes = crop_boxes(jpegs)
    candidates = decoders()
    rates = decoder_rates(candidates, jpegs, boxes, size, seconds)
    fidelity = decoder_fidelity(candidates, jpegs, boxes, size)
    return [dict(decoder=name, images_per_core_second=rates[name],
                 mean_abs_difference_from_full=fidelity[name][0],
                 reduced_size_fraction=fidelity[name][1]) for name in candidates]


# Report.

def train_rates(path: str) -> list[tuple[str, float, float]]:
    """(model, wall images/s, CPU-time images/s per core) of each training step in a models JSON."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        report = json.load(f)
    rows = []
    for row in report['rows']:
        wall = timing.median(row['train_seconds']['wall'])
        cpu = timing.median(row['train_seconds']['cpu'])
        rows.append((row['label'], report['batch'] / wall, report['batch'] / cpu))
    return rows


def new_tree_state() -> str:
    """This checkout: its commit, and whether qhnet/ differs from it."""
    modified = git('status', '--porcelain', '--', 'qhnet')
    return f'{timing.git_revision()}{" + uncommitted qhnet/ changes" if modified else ""}'


def rand_augment_name() -> str:
    """timm's name of the RandAugment policy of the default config."""
    from qhnet import config  # noqa: PLC0415
    recipe = config.data_config()
    return f'rand-m{recipe.rand_augment_magnitude:g}-mstd{recipe.rand_augment_std:g}-inc1'


def summary(report: dict) -> dict:
    """The headline rates and ratios, all from this run's measurements."""
    old = max((run['images_per_core_second'] for run in report['old']), default=None)
    in_process = {run['augmentation']: run['images_per_core_second']
                  for run in report['in_process']}
    most_workers = max(run['workers'] for run in report['workers'])
    with_workers = {run['augmentation']: run['images_per_core_second']
                    for run in report['workers'] if run['workers'] == most_workers}
    rates = {row['decoder']: row['images_per_core_second'] for row in report['decoders']}
    fastest = max(rates, key=rates.get)
    return dict(
        old_per_core=old, new_per_core=in_process,
        new_over_old=None if old is None else in_process['crop_flip'] / old,
        rand_augment_erasing_over_crop_flip=(in_process['rand_augment_erasing']
                                             / in_process['crop_flip']),
        most_workers=most_workers, new_per_core_with_workers=with_workers,
        fastest_decoder=fastest,
        qhnet_over_full=rates[QHNET_DECODE] / rates[FULL_DECODE],
        qhnet_over_fastest=rates[QHNET_DECODE] / rates[fastest])


def markdown(report: dict) -> str:
    s = report['summary']
    size = report['image_size']
    old_loader = (f'`qhnet.data` of {report["baseline"]}, from a git worktree in a subprocess'
                  if report['old'] else 'not measured (`--no-baseline`)')
    title = ('# Input pipeline: old thread-pool loader against the grain loader'
             if report['old'] else '# Input pipeline: the grain loader')
    lines = [
        title,
        '',
        timing.provenance_line(report),
        '',
        f'Data: {report["source"]} (mean JPEG '
        f'{report["mean_jpeg_bytes"] / 1e3:.0f} KB), train split, augmentation on, '
        f'{size}x{size}, batch {report["batch"]}, {report["seconds"]:g} s (and at least '
        f'{report["min_batches"]} batches) per measurement after a warm-up. New loader: '
        f'`qhnet.data` of this working tree; old loader: {old_loader}. Load average at the end: '
        f'{report["load_average_at_end"]}. {report["note"]}'.rstrip(),
        '',
        'images/s per core = images / CPU seconds of every thread (and worker process) doing '
        'the work: the rate one fully used core sustains, whatever else runs on the machine.',
        '',
    ]
    new_loader = ('decodes JPEGs with libjpeg-turbo (simplejpeg), resizes with OpenCV\'s '
                  'bilinear interpolation (no antialiasing filter; the decoder table gives the '
                  'difference) and returns uint8, normalised on the device.')
    if report['old']:
        lines += [
            '## Old against new, per core, at equal augmentation (random-resized crop + flip)',
            '',
            'The old loader decodes every JPEG with PIL, resizes the crop with PIL\'s filtered '
            'bilinear resample and returns normalised float32; the new one '
            f'{new_loader} Old and new alternated {report["rounds"]} times; medians, with every '
            'round\'s per-core rate.',
            '']
    else:
        lines += [
            '## Per core, random-resized crop + flip',
            '',
            f'The loader {new_loader} {report["rounds"]} rounds; the median, with every '
            'round\'s per-core rate.',
            '']
    lines += [
        '| loader | images/s (wall) | images/s per core | rounds, per core | '
        'new / old per core |',
        '|---|---:|---:|---|---:|',
    ]
    new = next(run for run in report['in_process'] if run['augmentation'] == 'crop_flip')
    def rounds(run: dict) -> str:
        return ' / '.join(f'{rate:.0f}' for rate in run.get('rounds_per_core', []))

    for run in report['old']:
        lines.append(f'| old ({report["baseline"]}), {run["threads"]} decode thread'
                     f'{"s" if run["threads"] > 1 else ""} | {run["images_per_second"]:.1f} | '
                     f'{run["images_per_core_second"]:.1f} | {rounds(run)} | '
                     f'{new["images_per_core_second"] / run["images_per_core_second"]:.2f}x |')
    lines += [
        f'| new, in process (num_workers=0) | {new["images_per_second"]:.1f} | '
        f'{new["images_per_core_second"]:.1f} | {rounds(new)} | |',
        '',
    ]
    if report['old']:
        lines += [
            f'**New / old per core: {s["new_over_old"]:.2f}x** (against the faster old row; '
            f'goal >= 2x: {"met" if s["new_over_old"] >= 2 else "not met"}).',
            '',
        ]
    lines += [
        '## RandAugment and random erasing (new loader, in process)',
        '',
        '| augmentation | images/s (wall) | images/s per core | per core vs crop + flip |',
        '|---|---:|---:|---:|',
    ]
    for run in report['in_process']:
        ratio = run['images_per_core_second'] / new['images_per_core_second']
        lines.append(f'| {AUGMENTATION_NAMES[run["augmentation"]]} | '
                     f'{run["images_per_second"]:.1f} | {run["images_per_core_second"]:.1f} | '
                     f'{ratio:.2f}x |')
    lines += [
        '',
        f'RandAugment is timm\'s {report["rand_augment"]} (PIL, on the host). Random erasing '
        'costs the host only its boxes (`augment.erasing_boxes`, int32 [erasing_count, 4] per '
        'image): the N(0, 1) noise is drawn and applied on the device inside the jitted step '
        '(`augment.erase`), so it is not in these numbers.',
        '',
        '## Grain worker processes',
        '',
        '| workers | augmentation | images/s (wall) | images/s per core, whole life | '
        'first batch (s) | close (s) | life (s) | CPU s, this process | CPU s, workers |',
        '|---:|---|---:|---:|---:|---:|---:|---:|---:|',
    ]
    left_running = sum(run['workers_left_running'] for run in report['workers'])
    for run in report['workers']:
        lines.append(f'| {run["workers"]} | {AUGMENTATION_NAMES[run["augmentation"]]} | '
                     f'{run["images_per_second"]:.1f} | {run["images_per_core_second"]:.1f} | '
                     f'{run["first_batch_seconds"]:.1f} | {run["close_seconds"]:.1f} | '
                     f'{run["lifetime_seconds"]:.1f} | '
                     f'{run["lifetime_cpu_seconds"]:.1f} | '
                     f'{run["lifetime_worker_cpu_seconds"]:.1f} |')
    lines += [
        '',
        'Wall images/s: the timed window, after the first batch and the prefetched ones. Per '
        'core: every image consumed over the iterator\'s life / (CPU seconds of this process '
        '+ of the workers, from `getrusage(RUSAGE_CHILDREN)` once they are joined). That '
        'includes the workers\' start-up (a spawned interpreter each, importing jax and qhnet) '
        'and the batches they prefetched that nobody consumed, so it is below the in-process '
        'steady-state rate. Close: grain\'s `close()`, which joins each worker for up to 25 s '
        'and then kills it; the killed ones are waited for before their CPU time is read.',
    ]
    if left_running:
        lines.append('')
        lines.append(f'**{left_running} worker(s) were still running when their CPU time was '
                     'read: those per-core rates leave them out.**')
    lines += [
        '',
        f'## Decoders: decode + random-resized crop + resize to {size}, one thread',
        '',
        f'The same {report["decoder_images"]} JPEGs and crop boxes '
        '(`qhnet.data.transforms.random_resized_crop_box`) for every decoder, timed round-robin.',
        '',
        '| decoder | images/s per core | vs PIL full decode | JPEGs decoded at reduced size | '
        'mean abs difference from full decode (0-255) |',
        '|---|---:|---:|---:|---:|',
    ]
    full = report['decoders'][0]['images_per_core_second']
    for row in report['decoders']:
        lines.append(f'| {row["decoder"]} | {row["images_per_core_second"]:.1f} | '
                     f'{row["images_per_core_second"] / full:.2f}x | '
                     f'{100 * row["reduced_size_fraction"]:.0f}% | '
                     f'{row["mean_abs_difference_from_full"]:.2f} |')
    lines += [
        '',
        f'Fastest: **{s["fastest_decoder"]}**. qhnet.data\'s is '
        f'{s["qhnet_over_full"]:.2f}x the old loader\'s (PIL full decode and resize), '
        f'{s["qhnet_over_fastest"]:.2f}x the fastest. Reduced-size decoding rarely pays here: '
        'PIL\'s `draft` scales by 1/2, 1/4 or 1/8 only, when both sides of the JPEG are at '
        f'least that many times the size that still covers the crop at {size}, and '
        'libjpeg-turbo\'s other M/8 scales have no SIMD inverse DCT. The difference column '
        'is against the first row; most of qhnet.data\'s comes from resizing without an '
        'antialiasing filter (and from rounding the crop box to whole pixels).',
        '',
        f'## Cores needed for a {ACCELERATOR_IMAGES_PER_SECOND:,} img/s accelerator step',
        '',
        '| loader | augmentation | images/s per core | cores |',
        '|---|---|---:|---:|',
    ]
    rows = ([(f'old ({report["baseline"]}), faster row', 'crop_flip', s['old_per_core'])]
            if report['old'] else [])
    rows += [('new, in process', name, rate) for name, rate in s['new_per_core'].items()]
    rows += [(f'new, {s["most_workers"]} workers (start-up included)', name, rate)
             for name, rate in s['new_per_core_with_workers'].items()]
    for loader, augmentation, rate in rows:
        lines.append(f'| {loader} | {AUGMENTATION_NAMES[augmentation]} | {rate:.1f} | '
                     f'{ACCELERATOR_IMAGES_PER_SECOND / rate:.1f} |')
    if report['train']:
        per_core = s['new_per_core']['rand_augment_erasing']
        lines += [
            '',
            f'## Beside the training step ({report["models_json"]})',
            '',
            'The cores of the new loader with RandAugment + erasing (what training reads; '
            f'{per_core:.1f} images/s per core in process) it takes to keep up with each '
            'training step at its measured rate (same machine, its batch).',
            '',
            '| model | train img/s (wall) | train img/s per core (CPU time) | loader cores to '
            'keep up |',
            '|---|---:|---:|---:|',
        ]
        for label, wall, cpu in report['train']:
            lines.append(f'| {label} | {wall:.1f} | {cpu:.1f} | {wall / per_core:.3g} |')
    return '\n'.join(lines) + '\n'


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def positive_integers(text: str) -> list[int]:
    values = [int(x) for x in text.split(',')]
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f'need positive integers, got {text!r}')
    return values


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data-dir', default=None,
                        help='a real ImageFolder root (default: synthetic)')
    parser.add_argument('--class-list', default=None,
                        help='wnid list for --data-dir (default: ImageNet-100)')
    parser.add_argument('--root', default='/tmp/qhnet_pipeline_imagefolder',
                        help='where the synthetic ImageFolder is written')
    parser.add_argument('--classes', type=int, default=10)
    parser.add_argument('--per-class', type=int, default=60)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--seconds', type=float, default=8.0,
                        help='timed wall seconds per measurement (each decoder: CPU seconds)')
    parser.add_argument('--batches', type=int, default=3,
                        help='timed batches per measurement, at least')
    parser.add_argument('--threads', type=positive_integers, default=[1, 2],
                        help="the old loader's decode threads, e.g. 1,2")
    parser.add_argument('--workers', type=positive_integers, default=[1, 2],
                        help="the new loader's worker processes, e.g. 1,2")
    parser.add_argument('--baseline', default=None,
                        help='git revision of the old loader, from before the grain loader '
                             '(required unless --no-baseline); the report names it as given')
    parser.add_argument('--rounds', type=int, default=3,
                        help='old/new crop + flip measurements, alternating')
    parser.add_argument('--no-baseline', action='store_true',
                        help='skip the old loader (its git worktree and subprocess)')
    parser.add_argument('--models-json', default=None,
                        help='a benchmarks.models JSON to set the loader beside (default: '
                             'benchmarks/results/<device>/models.json)')
    parser.add_argument('--note', default='')
    parser.add_argument('--out', default=None,
                        help='path stem for .md and .json outputs (default: '
                             'benchmarks/results/<device>/pipeline)')
    parser.add_argument('--render', default=None, help='only re-render the markdown of this JSON')
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(markdown(json.load(f)), end="")
        return
    if args.baseline is None and not args.no_baseline:
        parser.error('--baseline REV (the git revision of the old loader) is required unless '
                     '--no-baseline')
    if args.data_dir:
        data_dir, class_list, source = args.data_dir, args.class_list, args.data_dir
    else:
        progress(f'writing a synthetic ImageFolder to {args.root} ...')
        data_dir, class_list = args.root, make_imagefolder(args.root, args.classes, args.per_class)
        source = (f'synthetic ImageFolder of {args.classes}x{args.per_class} 500x375 JPEGs from '
                  'upsampled Fashion-MNIST')
    jpegs = sample_jpegs(train_files(data_dir), DECODER_SAMPLE)
    loader_source = dict(data_dir=data_dir, class_list=class_list, image_size=args.image_size)
    timing_args = dict(batch=args.batch, seconds=args.seconds, min_batches=args.batches)

    old_rounds, new_rounds = [], []
    with (contextlib.nullcontext() if args.no_baseline
          else baseline_worktree(args.baseline)) as worktree:
        for round_index in range(args.rounds):
            if worktree:
                progress(f'round {round_index + 1}: old loader ({args.baseline}), '
                         f'{args.threads} threads ...')
                old_rounds.append(measure_old_loader(worktree, dict(
                    **loader_source, **timing_args, threads=args.threads)))
            progress(f'round {round_index + 1}: new loader in process, crop_flip ...')
            new_rounds.append(measure_new_loader(loader_source, 'crop_flip', 0, **timing_args))
    old = [median_run([runs[i] for runs in old_rounds]) for i in range(len(args.threads))
           ] if old_rounds else []
    in_process, workers = [median_run(new_rounds)], []
    for augmentation in AUGMENTATIONS:
        if augmentation != 'crop_flip':
            progress(f'new loader in process, {augmentation} ...')
            in_process.append(measure_new_loader(loader_source, augmentation, 0, **timing_args))
    for count in args.workers:
        for augmentation in AUGMENTATIONS:
            progress(f'new loader, {count} workers, {augmentation} ...')
            workers.append(measure_new_loader(loader_source, augmentation, count, **timing_args))
    progress('decoders ...')
    decoder_rows = compare_decoders(jpegs, args.image_size, args.seconds)

    # JAX's device is looked up only now, after the loaders were timed.
    models_json = args.models_json or timing.results_stem('models') + '.json'
    report = dict(**timing.provenance_fields(MODULE, argv), new_tree=new_tree_state(),
                  baseline=None if args.no_baseline else args.baseline,
                  rand_augment=rand_augment_name(), image_size=args.image_size,
                  batch=args.batch, seconds=args.seconds, min_batches=args.batches,
                  rounds=args.rounds, source=source,
                  mean_jpeg_bytes=float(np.mean([len(jpeg) for jpeg in jpegs])),
                  decoder_images=len(jpegs), note=args.note, old=old, in_process=in_process,
                  workers=workers, decoders=decoder_rows,
                  models_json=timing.display_path(models_json), train=train_rates(models_json),
                  load_average_at_end=timing.load_average())
    report['summary'] = summary(report)
    text = markdown(report)
    print(text, end="")
    timing.write_report(args.out or timing.results_stem('pipeline'), text, report)


if __name__ == '__main__':
    main()
