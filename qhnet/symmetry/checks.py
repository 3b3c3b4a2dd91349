"""What the command line (`python -m qhnet.symmetry`) checks before any work, and reads: a
workdir's newest checkpoint, an output workdir that can take the result, a model with finite
logits, and the first images of a split. A problem is a `CommandError`: one line that names
it and the fix.
"""

import os
import tempfile

import numpy as np

from qhnet import data
from qhnet.symmetry.families import apply
from qhnet.symmetry.folding import leaves
from qhnet.training import checkpoints


def first_images(dataset: data.Dataset, split: str, count: int) -> np.ndarray:
    """The first `count` images of `split` (fewer if the split is smaller), unaugmented and
    normalised as the models read them."""
    batch = next(dataset.batches(split, batch_size=count, seed=0, train=False))
    return np.asarray(data.normalise(batch['image'][batch['mask'] > 0], dataset.info))


class CommandError(Exception):
    """A problem with the command's input: one line that names it and the fix."""


def restore(workdir: str, trust_unverified: bool = False) -> checkpoints.Restored:
    """The newest readable checkpoint of --workdir (`checkpoints.restore_variables`)."""
    if not workdir:
        raise CommandError('--workdir is missing or empty; pass --workdir=DIR, the workdir of a '
                           'training run (python -m qhnet.main --workdir=DIR)')
    if not os.path.isdir(workdir):
        raise CommandError(f'--workdir={workdir} is not a directory; pass the workdir of a '
                           'training run (python -m qhnet.main --workdir=DIR)')
    try:
        return checkpoints.restore_variables(workdir, trust_unverified=trust_unverified)
    except checkpoints.CheckpointRestoreError as error:  # its message names the fix
        raise CommandError(' '.join(str(error).splitlines())) from error


def check_output(workdir: str, output_workdir: str, step: int) -> None:
    """Refuses to write into the training run, next to checkpoints of other steps (the newest
    would be read back instead of the one written), or where nothing can be written."""
    if os.path.realpath(output_workdir) == os.path.realpath(workdir):
        raise CommandError(f'--output_workdir is --workdir ({workdir}), whose checkpoint the '
                           'transformed model would overwrite; pass another --output_workdir')
    try:
        os.makedirs(output_workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_workdir):
            pass
    except OSError as error:
        raise CommandError(f'cannot write to --output_workdir={output_workdir} '
                           f'({error.strerror or error}); pass a writable directory') from error
    if checkpoints.has_checkpoints(output_workdir):
        store = checkpoints.CheckpointStore(output_workdir, read_only=True)
        try:
            others = [s for s in store.steps() if s != step]
        finally:
            store.close()
        if others:
            raise CommandError(f'--output_workdir={output_workdir} holds checkpoints of steps '
                               f'{others}, not of step {step}, the one restored; pass a new '
                               '--output_workdir or delete that one')


def check_finite(spec, form, images, step: int, variables) -> None:
    """Refuses a model whose logits on `images` are not finite: there is no function to check."""
    if np.all(np.isfinite(np.asarray(apply(spec, form, images)))):
        return
    bad = [name for name, x in leaves(variables) if not np.all(np.isfinite(np.asarray(x)))]
    where = (f'non-finite variables: {", ".join(bad[:3])}{" ..." if len(bad) > 3 else ""}' if bad
             else 'the variables are finite, the activations overflow')
    raise CommandError(f'the logits of the checkpoint of step {step} on {len(images)} test images '
                       f'are not finite ({where}), so there is no function to check; verify a '
                       'run whose checkpoint has finite logits (train it again: qhnet.main rolls '
                       'non-finite steps back)')
