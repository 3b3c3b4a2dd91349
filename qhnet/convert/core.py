"""A PyTorch `state_dict`, as a dict of numpy arrays, to the variables of a qhnet model.

A source's mapping (`qlnet.py`, `torchvision.py`) names, for every tensor of its
`state_dict`, the variable of the Flax model it fills: a path
('params' | 'batch_stats', layer, ..., leaf). Layouts follow from the tensor's rank: a
4-D conv weight (out, in / groups, kh, kw) becomes an HWIO kernel (kh, kw, in / groups, out),
a 2-D linear weight (out, in) a Dense kernel (in, out), vectors stay as they are.
BatchNorm's `num_batches_tracked` counters carry no part of the function; they are
accepted and dropped.

`to_variables` is strict: every tensor of the file is used, every variable of the model is
filled, every shape matches. Anything else raises `ConversionError` naming the tensors, before
anything is written.
"""

from typing import Any, Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

Path = tuple[str, ...]


class ConversionError(ValueError):
    """A state_dict that does not fit the model, or a file that is not a state_dict."""


def batch_norm(torch_prefix: str, layer: Path) -> dict[str, Path]:
    """The four tensors of a PyTorch BatchNorm at `torch_prefix` and the Flax BatchNorm
    `layer` (a path of module names) they fill."""
    return {f'{torch_prefix}.weight': ('params', *layer, 'scale'),
            f'{torch_prefix}.bias': ('params', *layer, 'bias'),
            f'{torch_prefix}.running_mean': ('batch_stats', *layer, 'mean'),
            f'{torch_prefix}.running_var': ('batch_stats', *layer, 'var')}


def weight(torch_key: str, layer: Path, leaf: str = 'kernel') -> dict[str, Path]:
    """A conv or linear weight `torch_key` into `layer`'s kernel."""
    return {torch_key: ('params', *layer, leaf)}


def flax_layout(tensor: np.ndarray) -> np.ndarray:
    """A PyTorch tensor in the layout of the Flax variable it fills (module docstring)."""
    if tensor.ndim == 4:
        return tensor.transpose(2, 3, 1, 0)
    if tensor.ndim == 2:
        return tensor.T
    return tensor


def _listed(names: list[str], limit: int = 4) -> str:
    shown = ', '.join(names[:limit])
    return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')


def template(model, image_size: int = 224) -> dict[str, Any]:
    """The shapes of `model`'s variables (abstractly: no FLOPs, no memory)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def fill(mapping: Mapping[str, Path], state_dict: Mapping[str, np.ndarray],
         shapes: Mapping[str, Any], source: str, dtype=np.float32) -> dict[str, Any]:
    """The variables that `state_dict` fills through `mapping`, as nested dicts of numpy
    arrays of `dtype` shaped as `shapes` (the model's variables, `template`); strict (module
    docstring)."""
    tensors = {key: value for key, value in state_dict.items()
               if not key.endswith('num_batches_tracked')}
    wanted = traverse_util.flatten_dict(shapes)
    unknown_targets = sorted('/'.join(path) for path in set(mapping.values()) - set(wanted))
    if unknown_targets:  # a mapping that names variables the model lacks: ours to fix
        raise AssertionError(f'the {source} mapping names variables the model lacks: '
                             f'{_listed(unknown_targets)}')
    missing = sorted(key for key in mapping if key not in tensors)
    extra = sorted(key for key in tensors if key not in mapping)
    problems = []
    if missing:
        problems.append(f'lacks {len(missing)} tensor(s) the model needs ({_listed(missing)})')
    if extra:
        problems.append(f'has {len(extra)} tensor(s) the model has no place for '
                        f'({_listed(extra)})')
    if problems:
        raise ConversionError(f'this state_dict is not a {source} of this configuration: it '
                              f'{"; it ".join(problems)}')
    unfilled = sorted('/'.join(path) for path in set(wanted) - set(mapping.values()))
    if unfilled:
        raise AssertionError(f'the {source} mapping leaves variables unfilled: '
                             f'{_listed(unfilled)}')
    flat, mismatched = {}, []
    for key, path in mapping.items():
        tensor = flax_layout(np.asarray(tensors[key]))
        if tensor.shape != tuple(wanted[path].shape):
            mismatched.append(f'{key} {tuple(np.asarray(tensors[key]).shape)} -> '
                              f'{"/".join(path)} {tuple(wanted[path].shape)}')
        flat[path] = tensor.astype(dtype)
    if mismatched:
        raise ConversionError(f'{len(mismatched)} tensor(s) of this state_dict do not fit the '
                              f'{source} model of this configuration (file shape -> model '
                              f'variable shape): {_listed(mismatched, 3)}; check the model '
                              'fields (e.g. --config.model.num_classes, widths, depths)')
    for name, tensor in flat.items():
        if not np.all(np.isfinite(tensor)):
            raise ConversionError(f'{"/".join(name)} holds non-finite values: the file is '
                                  'damaged or not a trained model')
    return traverse_util.unflatten_dict(flat)
