"""Input-pipeline throughput: ImageFolder JPEG decode + random-resized crop + flip at 224.

    python -m benchmarks.pipeline                        # writes a synthetic ImageFolder to /tmp
    python -m benchmarks.pipeline --data-dir /data/imagenet100   # a real one (train/<wnid>/*.JPEG)

Runs `qhnet.data.make_iterator(config.data, 'train', train=True)` for ImageNet-100 in
ImageFolder format with augmentation on (decode, random-resized crop, flip, normalise:
exactly what training reads) and reports images/s at each `--workers` count, and
images/s per core = images / process CPU seconds (every thread's decode work, so it
does not depend on how busy a shared machine is). Beside it, the training step's
images/s of each model from a `benchmarks.models` JSON (`--models-json`), and how
many such cores it would take to keep that step fed.

Without `--data-dir`, a synthetic ImageFolder is generated into `--root`: real-sized
JPEGs (500x375, quality 90, ~100 KB, about an average ImageNet photo's 110 KB) made from
upsampled Fashion-MNIST images (/usr/share/datasets/fashion-mnist) in colour, with
film-grain texture so that they compress like photos, or from smooth random noise
when Fashion-MNIST is not installed.
"""

import argparse
import gzip
import json
import os
import sys
import time

import ml_collections
import numpy as np
from PIL import Image

from benchmarks import timing

FASHION_MNIST = '/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'


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
                     size: tuple[int, int] = (500, 375)) -> tuple[str, float]:
    """Writes root/{train,val}/<wnid>/*.JPEG and root/classes.txt; returns the class-list
    path and the mean JPEG size in bytes. Reuses an existing tree with the same layout."""
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
    sizes = [os.path.getsize(os.path.join(dirpath, name))
             for dirpath, _, names in os.walk(os.path.join(root, 'train')) for name in names]
    return class_list, float(np.mean(sizes))


def data_config(data_dir: str, class_list: str | None, workers: int, image_size: int):
    return ml_collections.ConfigDict(dict(
        name='imagenet100', data_dir=data_dir, format='imagefolder', image_size=image_size,
        augment=True, num_workers=workers, class_list=class_list, channels=None))


def measure(config, batch: int, batches: int, seed: int = 0) -> dict:
    from qhnet import data  # noqa: PLC0415 (imported late: --help works without it)
    iterator = data.make_iterator(config, 'train', batch_size=batch, seed=seed, train=True)
    first = next(iterator)  # thread pool start-up, first file reads
    for _ in range(3):  # drain what was prefetched while the first batch was decoded
        next(iterator)
    assert first['image'].shape == (batch, config.image_size, config.image_size, 3), first['image'].shape
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    close = getattr(iterator, 'close', None)
    if close:
        close()
    images = batch * batches
    return dict(workers=config.num_workers, images=images, wall_seconds=wall, cpu_seconds=cpu,
                images_per_second=images / wall, images_per_core_second=images / cpu)


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


def markdown(report: dict) -> str:
    lines = [
        '# Input pipeline: ImageFolder JPEG decode + random-resized crop + flip',
        '',
        f'Device: **{report["device"]}**. `qhnet.data.make_iterator` (ImageNet-100, ImageFolder, '
        f'augment=True) at {report["image_size"]}x{report["image_size"]}, batch {report["batch"]}, '
        f'{report["source"]} (mean JPEG {report["mean_jpeg_bytes"] / 1e3:.0f} KB). {report["note"]}',
        '',
        'images/s per core = images / process CPU seconds (all decode threads): the rate one '
        'fully used core sustains, independent of other load on the machine.',
        '',
        '| decode threads | images/s (wall) | images/s per core (CPU time) |',
        '|---:|---:|---:|',
    ]
    for run in report['runs']:
        lines.append(f'| {run["workers"]} | {run["images_per_second"]:.1f} | '
                     f'{run["images_per_core_second"]:.1f} |')
    per_core = report['images_per_core_second']
    if report['train']:
        lines += ['', f'Beside the training step ({report["models_json"]}; same machine, its batch): '
                  f'the cores of JPEG decoding it takes to keep up with one training step at its '
                  f'measured rate (per-core rate {per_core:.1f} images/s).', '',
                  '| model | train img/s (wall) | train img/s per core (CPU time) | decode cores to keep up |',
                  '|---|---:|---:|---:|']
        for label, wall, cpu in report['train']:
            lines.append(f'| {label} | {wall:.1f} | {cpu:.1f} | {wall / per_core:.3g} |')
    return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data-dir', default=None, help='a real ImageFolder root (default: synthetic)')
    parser.add_argument('--class-list', default=None, help='wnid list for --data-dir (default: ImageNet-100)')
    parser.add_argument('--root', default='/tmp/qhnet_pipeline_imagefolder')
    parser.add_argument('--classes', type=int, default=10)
    parser.add_argument('--per-class', type=int, default=60)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--batches', type=int, default=20)
    parser.add_argument('--workers', type=lambda s: [int(x) for x in s.split(',')], default=[1, 2])
    parser.add_argument('--models-json', default='benchmarks/models_cpu.json')
    parser.add_argument('--note', default='')
    parser.add_argument('--out', default=None, help='path stem for .md and .json outputs')
    parser.add_argument('--render', default=None, help='only re-render the markdown of this JSON')
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(markdown(json.load(f)))
        return
    if args.data_dir:
        data_dir, class_list, mean_bytes, source = args.data_dir, args.class_list, float('nan'), args.data_dir
        sizes = [os.path.getsize(os.path.join(d, n)) for d, _, names in
                 os.walk(os.path.join(data_dir, 'train')) for n in names[:20]]
        mean_bytes = float(np.mean(sizes)) if sizes else float('nan')
    else:
        print(f'writing a synthetic ImageFolder to {args.root} ...', file=sys.stderr, flush=True)
        class_list, mean_bytes = make_imagefolder(args.root, args.classes, args.per_class)
        data_dir = args.root
        source = (f'synthetic ImageFolder of {args.classes}x{args.per_class} 500x375 JPEGs from '
                  'upsampled Fashion-MNIST')
    runs = []
    for workers in args.workers:
        config = data_config(data_dir, class_list, workers, args.image_size)
        runs.append(measure(config, args.batch, args.batches))
        print(f'  {workers} threads: {runs[-1]["images_per_second"]:.1f} images/s, '
              f'{runs[-1]["images_per_core_second"]:.1f} per core', file=sys.stderr, flush=True)
    report = dict(device=timing.device_name(), image_size=args.image_size, batch=args.batch,
                  source=source, mean_jpeg_bytes=mean_bytes, note=args.note, runs=runs,
                  images_per_core_second=float(np.median([r['images_per_core_second'] for r in runs])),
                  models_json=args.models_json, train=train_rates(args.models_json),
                  load_average_at_end=timing.load_average())
    text = markdown(report)
    print(text)
    if args.out:
        timing.write_report(args.out, text, report)


if __name__ == '__main__':
    main()
