"""The quasi-linear blocks: structure, zero update at init, weight sharing, mixing maps."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qhnet.models.blocks import EQUATIONS, QuasiLinearBlock
from qhnet.models.derivative import Derivative

N = 8


@pytest.fixture(scope='module')
def stream(digits) -> jax.Array:
    """Real digits as an 8-channel stream: 4 images, each channel a shifted copy."""
    images = jnp.asarray(digits[0][:4])
    return jnp.concatenate([jnp.roll(images, shift, axis=2) for shift in range(N)], axis=-1)


def init(block, u):
    return block.init(jax.random.key(0), u, train=False)


@pytest.mark.parametrize('equation', EQUATIONS)
@pytest.mark.parametrize('weight_sharing', [True, False])
def test_update_is_zero_at_init(stream, equation, weight_sharing):
    block = QuasiLinearBlock(features=N, equation=equation, weight_sharing=weight_sharing)
    variables = init(block, stream)
    np.testing.assert_array_equal(variables['params']['out_bn']['scale'], 0.0)
    np.testing.assert_array_equal(block.apply(variables, stream), stream)
    # The update is really there: with a non-zero output scale the block moves.
    params = flax.core.copy(variables['params'], {'out_bn': {'scale': jnp.ones(N), 'bias': jnp.zeros(N)}})
    moved = block.apply({**variables, 'params': params}, stream)
    assert np.abs(moved - stream).max() > 1e-3


@pytest.mark.parametrize('equation', EQUATIONS)
def test_downsampling_block_shapes_and_projection(stream, equation):
    block = QuasiLinearBlock(features=2 * N, equation=equation, stride=2)
    variables = init(block, stream)
    out = block.apply(variables, stream)
    assert out.shape == (4, 4, 4, 2 * N)
    projected = jax.lax.conv_general_dilated(
        stream[:, ::2, ::2], variables['params']['shortcut']['kernel'], (1, 1), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    stats = variables['batch_stats']['shortcut_bn']
    expected = (projected - stats['mean']) / jnp.sqrt(stats['var'] + 1e-5)
    np.testing.assert_allclose(out, expected, atol=1e-5)


# Parameter shapes per equation (docs/design.md, 'The block family'; n = 8 in, n' = 16 out, m = 4).
SHAPES = {
    3: {'coef': (1, 1, N, 4 * N), 'combine': (1, 1, 4 * N, 2 * N)},
    4: {'coef': (1, 1, N, 2 * N), 'combine': (1, 1, 4 * N, 2 * N)},
    5: {'coef': (1, 1, N, 4 * N)},
    6: {'coef': (1, 1, N, N), 'combine': (1, 1, 4 * N, 2 * N)},
    7: {'coef': (1, 1, N, 4 * N), 'combine': (1, 1, 4 * N, 2 * N)},
}


@pytest.mark.parametrize('equation', EQUATIONS)
def test_parameter_shapes(stream, equation):
    for weight_sharing, bank in [(True, (3, 3, 1, 4)), (False, (3, 3, 1, 4 * N))]:
        block = QuasiLinearBlock(features=2 * N, equation=equation, stride=2, weight_sharing=weight_sharing)
        params = init(block, stream)['params']
        shapes = {name: params[name]['kernel'].shape for name in SHAPES[equation]}
        assert shapes == SHAPES[equation]
        assert params['derivative']['kernel'].shape == bank
        assert params['derivative_bn']['scale'].shape == (4 * N,)
        assert params['out_bn']['scale'].shape == (2 * N,)
        assert 'mix_in' not in params and 'mix_out' not in params
        # BN_c on the coefficient branch: Eq. (7) only, as in the authors' code.
        assert ('coef_bn' in params) == (equation == 7)
        if equation == 7:
            assert params['coef_bn']['scale'].shape == (4 * N,)


@pytest.mark.parametrize('expand', [True, False])
def test_weight_sharing_really_shares(stream, expand):
    """One bank of m kernels: perturbing kernel k changes derivative k of every channel, nothing else."""
    m = 4
    operator = Derivative(m, shared=True, expand=expand)
    inputs = stream if expand else jnp.repeat(stream, m, axis=-1)
    params = operator.init(jax.random.key(1), inputs)['params']
    assert jax.tree_util.tree_map(jnp.shape, params) == {'kernel': (3, 3, 1, m)}
    base = operator.apply({'params': params}, inputs)
    k = 2
    perturbed = operator.apply({'params': {'kernel': params['kernel'].at[1, 0, 0, k].add(1.0)}}, inputs)
    changed = np.abs(perturbed - base).max(axis=(0, 1, 2)).reshape(N, m) > 1e-6
    np.testing.assert_array_equal(changed, np.broadcast_to(np.arange(m) == k, (N, m)))


# Where each equation needs a mixing map (docs/design.md, 'Streams and groups'), with and without
# weight sharing.
MIXING = {
    (3, True): {'mix_in'}, (3, False): {'mix_in'},
    (4, True): {'mix_out'}, (4, False): {'mix_in', 'mix_out'},
    (5, True): {'mix_in', 'mix_out'}, (5, False): {'mix_in', 'mix_out'},
    (6, True): {'mix_in'}, (6, False): {'mix_in'},
    (7, True): {'mix_in'}, (7, False): {'mix_in'},
}


@pytest.mark.parametrize('equation,weight_sharing', sorted(MIXING))
def test_mixing_maps_start_as_identity(stream, equation, weight_sharing):
    plain = QuasiLinearBlock(features=N, equation=equation, weight_sharing=weight_sharing)
    mixed = plain.clone(mixing=True)
    variables = init(mixed, stream)
    mixes = {name for name in variables['params'] if name.startswith('mix')}
    assert mixes == MIXING[equation, weight_sharing]
    for name in mixes:
        np.testing.assert_array_equal(variables['params'][name]['kernel'], np.eye(N))
    # A non-trivial update, identical with and without the identity mixing maps.
    params = dict(variables['params'], out_bn={'scale': jnp.ones(N), 'bias': jnp.zeros(N)})
    without = {name: value for name, value in params.items() if name not in mixes}
    np.testing.assert_allclose(mixed.apply({**variables, 'params': params}, stream),
                               plain.apply({**variables, 'params': without}, stream), atol=1e-6)


def test_train_mode_updates_batch_statistics(stream):
    block = QuasiLinearBlock(features=2 * N, stride=2)
    variables = init(block, stream)
    _, updates = block.apply(variables, stream, train=True, mutable=['batch_stats'])
    before = variables['batch_stats']['derivative_bn']['mean']
    assert np.abs(updates['batch_stats']['derivative_bn']['mean'] - before).max() > 1e-4
