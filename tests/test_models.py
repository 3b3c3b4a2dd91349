"""The model zoo: shapes, train/eval modes, jitted forward and backward passes on real
images, activation placement, and clear errors for bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from qhnet import models, params
from tests.conftest import resize_images

ROWS = sorted(params.TABLE1)


def qhnet_config(**overrides):
    config = default.model_config()
    config.update(overrides)
    return config


SMALL = dict(stem='small', widths=(8, 16, 32), depths=(2, 1, 1), num_classes=10)


@pytest.mark.parametrize('row', ROWS)
def test_full_size_output_shapes(row):
    model = models.build(params.row_config(row).model)
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


def loss_and_grads(model, variables, images, labels):
    def loss_fn(params):
        logits, updates = model.apply({**variables, 'params': params}, images, train=True,
                                      mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates)
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])


QHNET_ROWS = [row for row in ROWS if params.TABLE1[row][0] not in ('resnet50', 'mobilenet_v3_large')]


def check_forward_backward(model_config, images, labels):
    model = models.build(model_config)
    variables = model.init(jax.random.key(0), images)
    (loss, (logits, _)), grads = loss_and_grads(model, variables, images, labels)
    assert logits.shape == (images.shape[0], model_config.num_classes)
    assert np.isfinite(loss) and np.isfinite(logits).all()
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(variables['params'])
    assert any(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize('row', QHNET_ROWS)
def test_every_qhnet_row_trains_on_real_images(digits, row):
    """Forward and backward under jit through each row's blocks in the small-input network
    (the baselines' passes are in test_baselines.py)."""
    model_config = params.row_config(row).model
    model_config.update(SMALL)
    images, labels = resize_images(digits[0][:8], 28, 1), jnp.asarray(digits[1][:8])
    check_forward_backward(model_config, images, labels)


@pytest.mark.slow
@pytest.mark.parametrize('row', ROWS)
def test_every_full_size_row_trains_on_real_images(digits, row):
    """Forward and backward under jit through every full-size network (64x64 real digits)."""
    images, labels = resize_images(digits[0][:2], 64, 3), jnp.asarray(digits[1][:2])
    check_forward_backward(params.row_config(row).model, images, labels)


def test_bfloat16_compute_keeps_float32_parameters(digits):
    images = resize_images(digits[0][:2], 28, 1)
    model = models.build(qhnet_config(dtype='bfloat16', **SMALL))
    variables = model.init(jax.random.key(0), images)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits = model.apply(variables, images)
    assert logits.dtype == jnp.float32 and np.isfinite(logits).all()


@pytest.mark.parametrize('placement,carriers', [('all', 4), ('ds', 3)])
def test_activation_placement(digits, placement, carriers):
    """relu@all makes every block output non-negative; relu@ds only each stage's first block."""
    images = resize_images(digits[0][:4], 28, 1)
    model = models.build(qhnet_config(activation='relu', placement=placement, **SMALL))
    variables = model.init(jax.random.key(0), images)
    # Non-zero output scales and shifts so that every block's update is active.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, -0.5) if 'out_bn' in str(path) and 'bias' in str(path)
        else (jnp.ones_like(x) if 'out_bn' in str(path) else x), variables)
    _, state = model.apply(variables, images, capture_intermediates=True, mutable=['intermediates'])
    blocks = {name: value['__call__'][0] for name, value in state['intermediates'].items()
              if name.startswith('stage')}
    assert len(blocks) == 4
    non_negative = {name for name, out in blocks.items() if (out >= 0).all()}
    assert len(non_negative) == carriers
    assert {'stage1_block1', 'stage2_block1', 'stage3_block1'} <= non_negative


@pytest.mark.parametrize('field,value,valid', [
    ('name', 'vgg16', 'resnet50'),
    ('equation', 8, '3, 4, 5, 6, 7'),
    ('activation', 'gelu', 'softball'),
    ('placement', 'every', "'ds', 'all'"),
    ('stem', 'tiny', "'imagenet', 'small'"),
    ('dtype', 'float16', 'bfloat16'),
])
def test_bad_choices_fail_at_build_listing_valid_ones(field, value, valid):
    with pytest.raises(ValueError, match=f'unknown model.{field}.*valid choices.*{valid}'):
        models.build(qhnet_config(**{field: value}))


def test_bad_structure_fails_at_build():
    config = qhnet_config()
    config.widht = 3
    with pytest.raises(ValueError, match="unknown model config keys \\['widht'\\]"):
        models.build(config)
    with pytest.raises(ValueError, match='same length'):
        models.build(qhnet_config(widths=(8, 16), depths=(1,)))
    with pytest.raises(ValueError, match='Eq. \\(5\\)'):
        models.build(qhnet_config(equation=5, multiplier=3))
