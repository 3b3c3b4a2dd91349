"""The model zoo: shapes, train/eval modes, jitted forward and backward passes on real
images, activation placement, and clear errors for bad configs."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qhnet import config, models
from qhnet.models import activations, network
from tests.conftest import resize_images

ROWS = sorted(config.ROWS) + sorted(config.RELEASED)  # Table 1 and the released QLNet
ROW_MODELS = {key: row.model for key, row in {**config.ROWS, **config.RELEASED}.items()}


def qhnet_config(**overrides):
    model_config = config.model_config()
    model_config.update(overrides)
    return model_config


SMALL = dict(stem='small', widths=(8, 16, 32), depths=(2, 1, 1), num_classes=10)


@pytest.mark.parametrize('row', ROWS)
def test_full_size_output_shapes(row):
    model = models.build(config.row_config(row).model)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    assert logits.shape == (2, 100) and logits.dtype == jnp.float32
    assert set(variables) == {'params', 'batch_stats'}


@pytest.mark.parametrize('shape', [(28, 28, 1), (32, 32, 3)])
@pytest.mark.parametrize('equation', [3, 4, 5, 6, 7])
def test_small_input_variant(digits, shape, equation):
    images = resize_images(digits[0][:4], shape[0], shape[2])
    model = models.build(qhnet_config(equation=equation, **SMALL))
    variables = model.init(jax.random.key(0), images)
    eval_logits = model.apply(variables, images, train=False)
    assert eval_logits.shape == (4, 10)
    np.testing.assert_array_equal(eval_logits, model.apply(variables, images, train=False))
    train_logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
    assert train_logits.shape == (4, 10)
    # Batch statistics differ from the initial running ones, so the two modes differ.
    assert np.abs(train_logits - eval_logits).max() > 1e-4
    assert jax.tree_util.tree_structure(updates['batch_stats']) == \
        jax.tree_util.tree_structure(variables['batch_stats'])


@pytest.mark.parametrize('stride, size', [(1, 28), (2, 28), (2, 9)])
def test_patch_stem_is_nn_conv(digits, stride, size):
    """The small stems' 3x3 conv as a matrix product of patches: nn.Conv's parameters and
    results, at stride 1 and 2, even and odd sizes."""
    images = resize_images(digits[0][:3], size, 1)
    patches = network.Conv3x3Patches(8, stride=stride)
    conv = nn.Conv(8, (3, 3), strides=stride, padding=((1, 1), (1, 1)), use_bias=False)
    variables = patches.init(jax.random.key(0), images)
    expected = conv.apply(variables, images)
    assert expected.shape == (3, -(-size // stride), -(-size // stride), 8)
    np.testing.assert_allclose(patches.apply(variables, images), expected, rtol=1e-5, atol=1e-5)
    assert patches.strides == (stride, stride)


@pytest.mark.parametrize('name', ['qhnet', 'resnet50', 'mobilenet_v3_large'])
def test_strided_small_stem_halves_stage1(digits, name):
    images = resize_images(digits[0][:2], 28, 1)
    shapes = {}
    for stem in ('small', 'small_stride2'):  # shapes only: traced, not run
        model = models.build(qhnet_config(name=name, **{**SMALL, 'stem': stem}))
        variables = jax.eval_shape(model.init, jax.random.key(0), images)
        logits, state = jax.eval_shape(
            lambda variables: model.apply(variables, images, capture_intermediates=True,
                                          mutable=['intermediates']), variables)
        stem_out = state['intermediates']['stem_conv']['__call__'][0]
        shapes[stem] = stem_out.shape[1:3]
        assert logits.shape == (2, 10)
    assert shapes == {'small': (28, 28), 'small_stride2': (14, 14)}


def loss_and_grads(model, variables, images, labels):
    def loss_fn(params):
        logits, updates = model.apply({**variables, 'params': params}, images, train=True,
                                      mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates)
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])


QHNET_ROWS = [row for row in ROWS if ROW_MODELS[row]['name'] in ('qhnet', 'qlnet')]


def check_forward_backward(model_config, images, labels):
    model = models.build(model_config)
    variables = model.init(jax.random.key(0), images)
    (loss, (logits, _)), grads = loss_and_grads(model, variables, images, labels)
    assert logits.shape == (images.shape[0], model_config.num_classes)
    assert np.isfinite(loss) and np.isfinite(logits).all()
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(variables['params'])
    assert any(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads))


# One row per block equation in the fast suite; Eq. (3)'s other activations and layouts are slow.
FAST_ROWS = {'eq3_softball', 'eq4', 'eq5_softball', 'eq6', 'eq7_nows_x6', 'qlnet50'}


@pytest.mark.parametrize('row', [row if row in FAST_ROWS else pytest.param(row, marks=pytest.mark.slow)
                                 for row in QHNET_ROWS])
def test_every_qhnet_row_trains_on_real_images(digits, row):
    """Forward and backward under jit through each row's blocks in the small-input network
    (the baselines' passes are in test_baselines.py)."""
    model_config = config.row_config(row).model
    model_config.update(SMALL)
    images, labels = resize_images(digits[0][:8], 28, 1), jnp.asarray(digits[1][:8])
    check_forward_backward(model_config, images, labels)


@pytest.mark.slow
@pytest.mark.parametrize('row', ROWS)
def test_every_full_size_row_trains_on_real_images(digits, row):
    """Forward and backward under jit through every full-size network (64x64 real digits)."""
    images, labels = resize_images(digits[0][:2], 64, 3), jnp.asarray(digits[1][:2])
    check_forward_backward(config.row_config(row).model, images, labels)


def test_bfloat16_compute_keeps_float32_parameters(digits):
    images = resize_images(digits[0][:2], 28, 1)
    model = models.build(qhnet_config(dtype='bfloat16', **SMALL))
    variables = model.init(jax.random.key(0), images)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits = model.apply(variables, images)
    assert logits.dtype == jnp.float32 and np.isfinite(logits).all()


def block_inputs_and_outputs(model, variables, images):
    """[(name, block input, shortcut(input), block output)] in order, and the logits."""
    logits, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                                     mutable=['intermediates']))(variables, images)
    captured = state['intermediates']
    x = jax.nn.relu(captured['stem_bn']['__call__'][0])
    if model.stem == 'imagenet':
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    blocks = []
    for name in sorted((k for k in captured if k.startswith('stage')),
                       key=lambda k: tuple(int(p) for p in re.findall(r'\d+', k))):
        shortcut = captured[name]['shortcut_bn']['__call__'][0] if 'shortcut_bn' in captured[name] else x
        output = captured[name]['__call__'][0]
        blocks.append((name, x, shortcut, output))
        x = output
    return blocks, logits


# Where the activation sits: after every downsampling block and after the last (the authors'
# resnet.py), or after every block.
RESNET50_DS = {'stage2_block1', 'stage3_block1', 'stage4_block1', 'stage4_block3'}


@pytest.mark.parametrize('layout,placement,carriers', [
    ({}, 'ds', RESNET50_DS),
    ({}, 'all', None),
    # Small-input variant whose last block also downsamples: the activation once, not twice.
    (dict(stem='small', widths=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=10), 'ds',
     {'stage2_block1', 'stage3_block1', 'stage4_block1'}),
    (dict(SMALL), 'ds', {'stage2_block1', 'stage3_block1'}),
])
def test_activation_placement(digits, layout, placement, carriers):
    """At initialisation every block's update q(u) is zero (BN_o's scale starts at zero), so a
    block outputs act(shortcut(u)) if it carries the activation and shortcut(u) if not; the head
    reads the global average of the last block's output."""
    images = resize_images(digits[0][:2], 64 if not layout else 28, 3 if not layout else 1)
    model = models.build(qhnet_config(activation='softball', placement=placement, **layout))
    variables = jax.jit(model.init)(jax.random.key(0), images)
    blocks, logits = block_inputs_and_outputs(model, variables, images)
    carriers = {name for name, *_ in blocks} if carriers is None else carriers
    assert carriers <= {name for name, *_ in blocks}
    for name, block_input, shortcut, output in blocks:
        expected = activations.softball(shortcut) if name in carriers else shortcut
        np.testing.assert_allclose(output, expected, rtol=1e-6, atol=1e-6, err_msg=name)
        # Each activation visibly changes its input, so the check above can fail.
        assert np.abs(activations.softball(shortcut) - shortcut).max() > 1e-3
    # Stage 1 of the ResNet50 layout at @ds: its first block passes its input through.
    if not layout and placement == 'ds':
        name, block_input, _, output = blocks[0]
        assert name == 'stage1_block1'
        np.testing.assert_array_equal(output, block_input)
    head = variables['params']['head']
    pooled = jnp.mean(blocks[-1][3], axis=(1, 2))
    np.testing.assert_allclose(logits, pooled @ head['kernel'] + head['bias'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('field,value,valid', [
    ('name', 'vgg16', 'resnet50'),
    ('equation', 8, '3, 4, 5, 6, 7'),
    ('activation', 'gelu', 'softball'),
    ('placement', 'every', "'ds', 'all'"),
    ('stem', 'tiny', "'imagenet', 'small', 'small_stride2'"),
    ('dtype', 'float16', 'bfloat16'),
])
def test_bad_choices_fail_at_build_listing_valid_ones(field, value, valid):
    with pytest.raises(ValueError, match=f'config.model.{field} must be one of .*{valid}'):
        models.build(qhnet_config(**{field: value}))


def test_bad_structure_fails_at_build():
    model_config = qhnet_config()
    model_config.widht = 3
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['widht'\\] in config.model"):
        models.build(model_config)
    with pytest.raises(ValueError, match='one entry per stage'):
        models.build(qhnet_config(widths=(8, 16), depths=(1,)))
    with pytest.raises(ValueError, match='Eq. \\(5\\)'):
        models.build(qhnet_config(equation=5, multiplier=3))
