"""PyTorch weights into qhnet: the authors' released QLNet and torchvision's baselines.

    python -m qhnet.convert --source=qlnet50 --weights=qlnet-50-v0.pth.tar --workdir=DIR

writes a checkpoint that every command reading a workdir takes (evaluation, `python -m
qhnet.symmetry`, `--config.init_from`). In Python, on a dict of numpy arrays (no torch):

    variables = convert.to_variables('qlnet50', state_dict, cfg.model)

Sources (`SOURCES`): 'qlnet50', the authors' QLNet (`liuyao/QLNet`, `qlnet-50-v0.pth.tar`);
'resnet50' and 'mobilenet_v3_large', torchvision's ImageNet models. Only the ImageNet
stems exist in PyTorch: a config with a small-input stem is refused.

    core.py          the strict fill: every tensor used, every variable filled, shapes equal
    qlnet.py         the authors' ResNet of PDEBlocks -> the 'qlnet' model
    torchvision.py   torchvision's resnet50 and mobilenet_v3_large -> the baselines
    __main__.py      the command line: load the file (torch), convert, write the checkpoint
"""

from typing import Any, Mapping

import ml_collections
import numpy as np

from qhnet import models
from qhnet.convert import core, qlnet, torchvision
from qhnet.convert.core import ConversionError

# source -> (the model name of the config it fills, its mapping from a model config)
SOURCES = {'qlnet50': ('qlnet', qlnet.mapping),
           'resnet50': ('resnet50', torchvision.resnet50),
           'mobilenet_v3_large': ('mobilenet_v3_large', torchvision.mobilenet_v3_large)}

__all__ = ['ConversionError', 'SOURCES', 'check_source', 'load_state_dict', 'to_variables']


def check_source(source: str, model_config: ml_collections.ConfigDict) -> None:
    """Raises ConversionError unless `source` is known and `model_config` is its model."""
    if source not in SOURCES:
        raise ConversionError(f'unknown source {source!r}; valid sources: {list(SOURCES)}')
    name = SOURCES[source][0]
    if model_config.name != name:
        raise ConversionError(f'a {source} state_dict fills a {name!r} model, but the config '
                              f'describes a {model_config.name!r}; pass the config of '
                              f'{source} (configs/{source}.py)')
    if model_config.stem != 'imagenet':
        raise ConversionError(f'{source} exists in PyTorch with its ImageNet stem only; the '
                              f"config's model.stem is {model_config.stem!r} (a small-input "
                              "variant); convert with the ImageNet variants ('imagenet1k', "
                              "'imagenet100')")


def to_variables(source: str, state_dict: Mapping[str, np.ndarray],
                 model_config: ml_collections.ConfigDict, dtype=np.float32) -> dict[str, Any]:
    """{'params', 'batch_stats'} of the model `model_config` describes, filled from a
    PyTorch `state_dict` of `source` (numpy arrays, PyTorch layouts); strict (`core.fill`)."""
    check_source(source, model_config)
    shapes = core.template(models.build(model_config))
    return core.fill(SOURCES[source][1](model_config), state_dict, shapes, source, dtype)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch checkpoint file as numpy arrays: a bare state_dict or a dict
    holding one under 'state_dict' (a DataParallel 'module.' prefix is removed). Needs torch
    (`pip install 'qhnet[torch]'`), except for a `.npz` of the state_dict's tensors."""
    if path.endswith('.npz'):
        return _load_npz(path)
    try:
        import torch  # pylint: disable=import-outside-toplevel; an optional extra
    except ImportError as error:
        raise ConversionError("reading a PyTorch file needs torch: pip install 'qhnet[torch]' "
                              '(or convert a dict of numpy arrays with '
                              'qhnet.convert.to_variables)') from error
    try:
        loaded = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError as error:
        raise ConversionError(f'{path} does not exist; pass --weights=FILE, a PyTorch '
                              'checkpoint') from error
    except Exception as error:  # pylint: disable=broad-except; torch.load raises many kinds
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConversionError(f'{path} is not a readable PyTorch checkpoint (truncated or '
                              f'damaged?): {detail[:200]}') from error
    state = loaded.get('state_dict', loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not state or not all(
            isinstance(value, torch.Tensor) for value in state.values()):
        keys = list(loaded)[:6] if isinstance(loaded, dict) else type(loaded).__name__
        raise ConversionError(f'{path} holds no state_dict (a dict of tensors, bare or under '
                              f"'state_dict'); it holds {keys}")
    if all(key.startswith('module.') for key in state):
        state = {key[len('module.'):]: value for key, value in state.items()}
    return {key: value.detach().cpu().numpy() for key, value in state.items()}


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            state = {key: archive[key] for key in archive.files}
    except FileNotFoundError as error:
        raise ConversionError(f'{path} does not exist; pass --weights=FILE') from error
    except Exception as error:  # pylint: disable=broad-except; zipfile and numpy raise many kinds
        raise ConversionError(f'{path} is not a readable .npz of tensors (truncated or '
                              f'damaged?): {str(error).splitlines()[0][:200]}') from error
    if not state:
        raise ConversionError(f'{path} holds no state_dict: the .npz has no arrays')
    return state
