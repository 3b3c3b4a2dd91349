"""The derivative operator K: every implementation computes the same function and gradients.

Each `impl` of `qhnet.models.derivative.depthwise_conv` is checked against an explicit
float64 numpy reference (a loop over output channels and taps) for shared and
per-channel kernels, both `expand` modes, strides 1 and 2, odd and even sizes; the
gradients (input and kernel) against autodiff of an independent jnp reference, and the
stencil's hand-written VJP against finite differences in float64.

Tolerances: float32 results agree to 1e-5 of the output's scale (max |reference|);
bfloat16 inputs (rounded to 8 mantissa bits, eps = 2^-8) to 3e-2 of the scale, against
the float32 reference on the same rounded inputs and kernels; float64 to 1e-12.
"""

import functools

import flax
import jax
import jax.test_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from qhnet import config as qhnet_config
from qhnet import models
from qhnet.models.derivative import DEFAULT_IMPL, IMPLEMENTATIONS, Derivative, depthwise_conv
from qhnet.models import derivative

# (name, kernels stored, outputs per input channel) as functions of (channels n, multiplier m).
LAYOUTS = {
    'shared-expand': (lambda n, m: m, lambda m: m),           # K on u, weight sharing
    'unshared-expand': (lambda n, m: n * m, lambda m: m),     # K on u, no weight sharing
    'shared-same': (lambda n, m: m, lambda m: 1),             # Eq. (7): (j, k) channels, shared bank
    'unshared-same': (lambda n, m: n, lambda m: 1),           # Eq. (7), no weight sharing
}
TOLERANCE = {'float32': 1e-5, 'bfloat16': 3e-2}


def reference(x: np.ndarray, kernel: np.ndarray, stride: int, ratio: int) -> np.ndarray:
    """Output channel c = j*ratio + i is kernel (c mod s) correlated with input channel j."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    batch, height, width, channels = x.shape
    stored = kernel.shape[-1]
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((batch, out_h, out_w, channels * ratio))
    for c in range(channels * ratio):
        for dy in range(3):
            for dx in range(3):
                window = padded[:, dy:dy + stride * (out_h - 1) + 1:stride,
                                dx:dx + stride * (out_w - 1) + 1:stride, c // ratio]
                out[..., c] += window * kernel[dy, dx, 0, c % stored]
    return out


def jnp_reference(x, kernel, stride, ratio):
    """The same operator in plain jnp (differentiable by JAX's own rules)."""
    channels, stored = x.shape[-1], kernel.shape[-1]
    per_output = jnp.tile(kernel.reshape(3, 3, stored), (1, 1, channels * ratio // stored))
    inputs = jnp.repeat(x, ratio, axis=-1)
    height, width = x.shape[1:3]
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    padded = jnp.pad(inputs, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(padded[:, dy:dy + stride * (out_h - 1) + 1:stride, dx:dx + stride * (out_w - 1) + 1:stride]
               * per_output[dy, dx] for dy in range(3) for dx in range(3))


def case(layout, stride, n=6, m=4, size=(7, 8), seed=0):
    stored, ratio = LAYOUTS[layout][0](n, m), LAYOUTS[layout][1](m)
    channels = n if ratio > 1 else n * m
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *size, channels)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 1, stored)).astype(np.float32)
    return x, kernel, stride, ratio


def scale_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


@pytest.mark.parametrize('impl', IMPLEMENTATIONS)
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('size', [(7, 8), (8, 5)])
def test_forward_matches_reference(impl, stride, layout, size):
    x, kernel, stride, ratio = case(layout, stride, size=size)
    y = jax.jit(functools.partial(depthwise_conv, stride=stride, channel_multiplier=ratio, impl=impl))(
        x, kernel)
    expected = reference(x, kernel, stride, ratio)
    assert y.shape == expected.shape and y.dtype == jnp.float32
    assert scale_error(y, expected) <= TOLERANCE['float32']


@pytest.mark.parametrize('impl', IMPLEMENTATIONS)
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('layout', LAYOUTS)
def test_gradients_match_reference(impl, stride, layout):
    x, kernel, stride, ratio = case(layout, stride)
    expected_y, expected_vjp = jax.vjp(
        functools.partial(jnp_reference, stride=stride, ratio=ratio), x, kernel)
    cotangent = np.random.default_rng(1).standard_normal(expected_y.shape).astype(np.float32)
    y, vjp = jax.vjp(functools.partial(depthwise_conv, stride=stride, channel_multiplier=ratio,
                                       impl=impl), x, kernel)
    grads = jax.jit(vjp)(cotangent)
    for actual, expected in zip(grads, expected_vjp(cotangent)):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        assert scale_error(actual, expected) <= TOLERANCE['float32']


@pytest.mark.parametrize('impl', IMPLEMENTATIONS)
@pytest.mark.parametrize('layout', LAYOUTS)
def test_bfloat16(impl, layout):
    """bf16 in, bf16 out; forward and gradients within 3e-2 of the float32 reference's scale."""
    x, kernel, stride, ratio = case(layout, 2)
    x16, k16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16).astype(jnp.float32)
    op = functools.partial(depthwise_conv, stride=stride, channel_multiplier=ratio, impl=impl)
    y, vjp = jax.vjp(op, x16, k16)
    assert y.dtype == jnp.bfloat16
    x32 = x16.astype(jnp.float32)
    expected_y, expected_vjp = jax.vjp(functools.partial(jnp_reference, stride=stride, ratio=ratio),
                                       x32, k16)
    assert scale_error(y, expected_y) <= TOLERANCE['bfloat16']
    cotangent = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    for actual, expected in zip(vjp(jnp.asarray(cotangent, jnp.bfloat16)), expected_vjp(cotangent)):
        assert scale_error(actual, expected) <= TOLERANCE['bfloat16']


@pytest.mark.parametrize('impl', IMPLEMENTATIONS)
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('layout', ['shared-expand', 'unshared-same'])
def test_float64_exact_and_finite_differences(impl, stride, layout):
    """In float64 every impl matches the reference to 1e-12 (the stencil accumulates in
    float64, not float32), and reverse-mode gradients match finite differences."""
    x, kernel, stride, ratio = case(layout, stride, n=3, m=2, size=(5, 6))
    op = functools.partial(depthwise_conv, stride=stride, channel_multiplier=ratio, impl=impl)
    with jax.enable_x64(True):
        x64, k64 = jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64)
        y = op(x64, k64)
        assert y.dtype == jnp.float64
        if impl == 'stencil':  # XLA:CPU's convolutions may round float64 through float32
            assert scale_error(y, reference(x, kernel, stride, ratio)) <= 1e-12
        jax.test_util.check_grads(op, (x64, k64), order=1, modes=['rev'], atol=1e-6, rtol=1e-6)


def test_stencil_second_order_reverse_mode():
    """Gradients of gradients (e.g. of a gradient norm) go through the stencil's custom VJP."""
    x, kernel, stride, ratio = case('shared-expand', 2, n=3, m=2, size=(5, 5))

    def grad_norm(impl, kernel):
        loss = lambda x, k: jnp.sum(jnp.tanh(depthwise_conv(x, k, stride, channel_multiplier=ratio,
                                                            impl=impl)))
        return jnp.sum(jnp.square(jax.grad(loss)(x, kernel)))

    expected = jax.grad(functools.partial(grad_norm, 'grouped'))(kernel)
    assert scale_error(jax.grad(functools.partial(grad_norm, 'stencil'))(kernel), expected) <= 1e-5


@pytest.mark.parametrize('platform, widest', [('cpu', 36), ('cuda', 1)])
def test_stencil_kernel_gradient_reductions_per_platform(platform, widest):
    """The shared bank's kernel gradient is one 36-way variadic reduction on the CPU and
    single reductions elsewhere: XLA:GPU's ptxas rejects the 36-way one (too much shared
    memory per block). The program is exported for `platform` without its device."""
    x, kernel, stride, ratio = case('shared-expand', 1, n=3, m=4, size=(6, 6))
    grad = jax.jit(jax.grad(lambda k: depthwise_conv(x, k, stride, channel_multiplier=ratio,
                                                     impl='stencil').sum()))
    text = jax.export.export(grad, platforms=[platform])(kernel).mlir_module()
    reduces = [line for line in text.splitlines() if 'stablehlo.reduce(' in line]
    assert reduces and max(line.count(' init: ') for line in reduces) == widest


def test_variadic_and_separate_sums_agree():
    terms = [jnp.asarray(np.random.default_rng(t).normal(size=(2, 5, 5, 3)), jnp.float32)
             for t in range(6)]
    np.testing.assert_allclose(derivative._variadic_sums(terms, (1, 2)),
                               derivative._separate_sums(terms, (1, 2)), rtol=1e-6)


def test_unknown_impl_and_bad_kernel():
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match='valid choices'):
        depthwise_conv(x, jnp.zeros((3, 3, 1, 3)), impl='fft')
    with pytest.raises(ValueError, match='does not fit'):
        depthwise_conv(x, jnp.zeros((3, 3, 1, 5)), channel_multiplier=2)


@pytest.mark.parametrize('shared', [True, False])
@pytest.mark.parametrize('expand', [True, False])
def test_module_params_identical_across_impls(shared, expand):
    """`impl` changes neither the parameter tree nor the values nor the output."""
    m, n = 4, 5
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, n if expand else n * m)),
                    jnp.float32)
    outputs = {}
    for impl in IMPLEMENTATIONS:
        module = Derivative(m, shared=shared, expand=expand, stride=2, impl=impl)
        variables = module.init(jax.random.key(0), x)
        assert jax.tree_util.tree_map(jnp.shape, variables) == {
            'params': {'kernel': (3, 3, 1, m if shared else n * m)}}
        outputs[impl] = (variables, module.apply(variables, x))
    base_vars, base_y = outputs['grouped']
    for variables, y in outputs.values():
        np.testing.assert_array_equal(variables['params']['kernel'], base_vars['params']['kernel'])
        assert scale_error(y, base_y) <= TOLERANCE['float32']


def small_qhnet(equation, weight_sharing, **kwargs):
    return models.QHNet(equation=equation, weight_sharing=weight_sharing, stem='small',
                        widths=(8, 16), depths=(2, 1), num_classes=5, **kwargs)


@pytest.mark.parametrize('equation,weight_sharing', [
    pytest.param(3, True, marks=pytest.mark.slow), pytest.param(3, False, marks=pytest.mark.slow),
    (6, True), (7, False)])
def test_model_impls_and_remat_agree(digits, equation, weight_sharing):
    """Every impl, and the default one with remat: same parameter tree, logits, batch
    statistics and gradients of a training step."""
    images = jnp.repeat(jnp.asarray(digits[0][:4]), 3, axis=-1)
    labels = jnp.asarray(digits[1][:4]) % 5
    results = {}
    for impl, remat in [(impl, False) for impl in IMPLEMENTATIONS] + [(DEFAULT_IMPL, True)]:
        model = small_qhnet(equation, weight_sharing, derivative_impl=impl, remat=remat)
        variables = model.init(jax.random.key(0), images, train=False)
        # Output BN scales start at zero (no update, no gradient for K): switch them on.
        variables = {**variables, 'params': flax.traverse_util.path_aware_map(
            lambda path, x: jnp.ones_like(x) if path[-2:] == ('out_bn', 'scale') else x,
            variables['params'])}

        def loss(params):
            logits, updates = model.apply({**variables, 'params': params}, images, train=True,
                                          mutable=['batch_stats'])
            one_hot = jax.nn.one_hot(labels, 5)
            return -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), -1)), (logits, updates)

        (value, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
            variables['params'])
        results[impl, remat] = variables, logits, updates, grads
    base = results['grouped', False]
    structure = jax.tree_util.tree_structure(base[0])
    for key, result in results.items():
        assert jax.tree_util.tree_structure(result[0]) == structure, key
        for a, b in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(base)):
            # Relative 1e-4, with an absolute floor for gradients that vanish analytically
            # (a BN shift right before another BN) and come out as float32 noise (~1e-9).
            assert a.shape == b.shape, key
            assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4 * np.abs(b).max() + 1e-6, key


def test_config_and_validation():
    config = qhnet_config.get_config().model
    assert config.derivative_impl == DEFAULT_IMPL and config.remat is False
    model = models.build(config)
    assert model.derivative_impl == DEFAULT_IMPL and not model.remat
    config.derivative_impl = 'fft'
    with pytest.raises(ValueError, match='derivative_impl'):
        models.build(config)
    config.derivative_impl = 'folded'
    with pytest.raises(ValueError, match='remat'):
        models.build(ml_collections.ConfigDict({**config.to_dict(), 'remat': 'yes'}))
