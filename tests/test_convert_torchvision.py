"""qhnet.convert of torchvision's resnet50 and mobilenet_v3_large (qhnet/convert/torchvision.py).

The fast tests need no torch: fixtures/state_shapes.json holds the shapes of both
state_dicts at 1000 classes (and of the authors' QLNet's, tests/test_convert.py), written once
with torchvision 0.29:

    shapes = {name: {key: list(value.shape) for key, value in getattr(torchvision.models,
              name)().state_dict().items()} for name in ('resnet50', 'mobilenet_v3_large')}
    open(PATH, 'w').write(json.dumps(shapes).replace('], ', '],\\n') + '\\n')

The slow tests compare the converted Flax models with torchvision's on real photos.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qhnet import config, convert, models
from qhnet.convert import core
from tests import authors_qlnet

SOURCES = ('resnet50', 'mobilenet_v3_large')
# The Dense layer whose output the model returns as its (float32) logits.
HEAD = {'resnet50': 'head', 'mobilenet_v3_large': 'fc2'}
with open(os.path.join(os.path.dirname(__file__), 'fixtures',
                       'state_shapes.json'), encoding='utf-8') as file:
    STATE_SHAPES = json.load(file)


def model_config(source, **fields):
    cfg = config.row_config(source)
    cfg.model.num_classes = 1000
    cfg.model.update(fields)
    return cfg.model


def random_state(source):
    """A state_dict of random numpy arrays shaped as torchvision's (positive variances)."""
    rng = np.random.default_rng(0)
    state = {}
    for key, shape in STATE_SHAPES[source].items():
        if key.endswith('num_batches_tracked'):
            state[key] = np.array(0, np.int64)
        elif len(shape) >= 2:  # a weight, scaled as fan-in so activations stay O(1)
            state[key] = rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape)
        else:
            state[key] = rng.uniform(0.5, 1.5, shape)
    return state


def shapes_of(tree):
    return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


@pytest.mark.parametrize('source', SOURCES)
def test_converted_variables_are_the_models(source):
    """The variables and their use by the model, traced (the slow test runs them)."""
    cfg = model_config(source)
    model = models.build(cfg)
    variables = convert.to_variables(source, random_state(source), cfg)
    assert shapes_of(variables) == shapes_of(core.template(model))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(variables))
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    assert logits.shape == (2, 1000)


@pytest.mark.parametrize('source', SOURCES)
def test_missing_tensor_is_named(source):
    state = random_state(source)
    key = next(key for key in state if key.endswith('running_var'))
    del state[key]
    with pytest.raises(convert.ConversionError, match=f'lacks 1 tensor.*{key}'):
        convert.to_variables(source, state, model_config(source))


@pytest.mark.parametrize('source', SOURCES)
def test_extra_tensor_is_named(source):
    state = random_state(source)
    state['features.17.0.weight'] = np.ones((8, 8, 1, 1))
    with pytest.raises(convert.ConversionError, match=r'has 1 tensor.*features\.17\.0\.weight'):
        convert.to_variables(source, state, model_config(source))


@pytest.mark.parametrize('source', SOURCES)
def test_wrong_shape_is_named(source):
    """A 1000-class file against a 100-class config: the classifier's two tensors."""
    classifier = {'resnet50': 'fc', 'mobilenet_v3_large': r'classifier\.3'}[source]
    with pytest.raises(convert.ConversionError,
                       match=rf'2 tensor.*{classifier}\.weight \(1000, \d+\) -> .*\(\d+, 100\)'):
        convert.to_variables(source, random_state(source), model_config(source, num_classes=100))


@pytest.mark.parametrize('source', SOURCES)
def test_small_stem_and_other_model_are_refused(source):
    with pytest.raises(convert.ConversionError, match="model.stem is 'small'"):
        convert.check_source(source, model_config(source, stem='small'))
    other = next(name for name in SOURCES if name != source)
    with pytest.raises(convert.ConversionError, match=f'describes a {other!r}'):
        convert.check_source(source, model_config(other))


# Against torchvision.

@pytest.fixture(scope='module')
def photos():
    """4 real 224x224 photos, NHWC, ImageNet-normalised, as float64."""
    return authors_qlnet.photos().astype(np.float64)


def torchvision_model(source):
    """torchvision's `source` with its own random init and random BatchNorm statistics and
    affine parameters (so that no BatchNorm is the identity), in eval mode."""
    torch = pytest.importorskip('torch')
    torchvision = pytest.importorskip('torchvision')
    torch.manual_seed(0)
    model = getattr(torchvision.models, source)()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def relative_difference(flax_logits, torch_logits):
    return float(np.max(np.abs(flax_logits - torch_logits)) / np.max(np.abs(torch_logits)))


@pytest.mark.slow
@pytest.mark.parametrize('source', SOURCES)
def test_logits_equal_torchvisions(source, photos):
    torch = pytest.importorskip('torch')
    torch_model = torchvision_model(source)
    state = {key: value.numpy() for key, value in torch_model.state_dict().items()}
    cfg = model_config(source)
    model = models.build(cfg)
    nchw = torch.from_numpy(photos.transpose(0, 3, 1, 2).copy())

    with torch.no_grad():
        expected = torch_model(nchw.float()).numpy()
    logits = model.apply(convert.to_variables(source, state, cfg),
                         photos.astype(np.float32), train=False)
    difference = relative_difference(np.asarray(logits), expected)
    print(f'{source} float32: relative max difference {difference:.2e}')
    assert difference <= 1e-5
    np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(expected, -1))

    # The models return their logits cast to float32: compare the float64 output of the
    # last Dense layer, before that cast.
    with torch.no_grad():
        expected = torch_model.double()(nchw).numpy()
    with jax.enable_x64(True):
        _, state64 = model.clone(dtype=jnp.float64).apply(
            convert.to_variables(source, state, cfg, dtype=np.float64), jnp.asarray(photos),
            train=False, capture_intermediates=True, mutable=['intermediates'])
        logits = state64['intermediates'][HEAD[source]]['__call__'][0]
        assert logits.dtype == jnp.float64
    difference = relative_difference(np.asarray(logits), expected)
    print(f'{source} float64: relative max difference {difference:.2e}')
    assert difference <= 1e-10
