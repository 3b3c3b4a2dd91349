"""Training and evaluation: the paper's recipe under `jax.jit` on one device or many, with
checkpoints that resume, roll back and verify themselves.

    from qhnet import config, training
    summary = training.train_and_evaluate(config.row_config('eq3_softball', 'digits'), workdir)
    step, run_config, variables = training.restore_variables(workdir)
    scores = training.evaluate(run_config, variables)          # top1, top5, loss
    record = training.evaluate_checkpoint(run_config, workdir)  # --evaluate_only

The package, bottom up (each module imports only those above it):

    recipe.py       schedule, optimizer, loss: the recipe as optax objects
    feeding.py      the mesh, replicated values, batches put on the devices ahead of the step
    steps.py        TrainState and the jitted training step
    evaluation.py   top-1, top-5 and loss over a split
    checkpoints.py  orbax checkpoints with content digests; restore_variables, save_variables
    metrics.py      metrics.jsonl, TensorBoard events, curves.png
    workdirs.py     the workdir: writable, and holding this experiment only
    checkpoint_evaluation.py
                    evaluate_checkpoint (--evaluate_only): a workdir's newest checkpoint, scored
    preflight.py    every check before anything is compiled or written
    loop.py         train_and_evaluate: the run loop, rollback, summary

The names below are imported on first use, so that `python -m qhnet.symmetry` loads
checkpoints and evaluation without the training loop.
"""

import importlib

_EXPORTS = {
    'train_and_evaluate': 'loop', 'TrainingDivergedError': 'loop', 'SUMMARY_FILE': 'loop',
    'evaluate': 'evaluation', 'evaluator': 'evaluation',
    'restore_variables': 'checkpoints', 'save_variables': 'checkpoints',
    'CheckpointWriteError': 'checkpoints', 'CheckpointRestoreError': 'checkpoints',
    'IncompatibleWorkdirError': 'workdirs', 'WorkdirError': 'workdirs',
    'evaluate_checkpoint': 'checkpoint_evaluation', 'EVALUATION_FILE': 'checkpoint_evaluation',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
