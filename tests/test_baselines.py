"""Tests for the torchvision-layout baselines in qhnet.models.baselines."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from qhnet.models.baselines import MobileNetV3Large, ResNet50
from qhnet.models import baselines

MODELS = [ResNet50, MobileNetV3Large]
# Name of the last module before global pooling, whose output is the final feature map.
LAST_FEATURE_MODULE = {ResNet50: "stage4_block3", MobileNetV3Large: "last_bn"}
LAST_FEATURE_CHANNELS = {ResNet50: 2048, MobileNetV3Large: 960}


def abstract_variables(model, image_size=32):
    """Variable shapes from init, traced without any compute."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)


def num_params(variables):
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]))


@pytest.mark.parametrize("size,stride,shape", [
    (3, 1, (2, 7, 9, 5)), (3, 2, (2, 8, 9, 5)),
    pytest.param(5, 1, (2, 6, 6, 4), marks=pytest.mark.slow), (5, 2, (3, 9, 7, 4))])
def test_depthwise_stencil_equals_the_grouped_convolution(size, stride, shape):
    """MobileNetV3's depthwise convolutions on the CPU: values, input and kernel gradients
    equal XLA's grouped convolution (float64), odd and even sizes, strides 1 and 2."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), shape, jnp.float64)
        kernel = jax.random.normal(jax.random.key(1), (size, size, 1, shape[-1]), jnp.float64)
        padding = ((size // 2, size // 2),) * 2
        numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))

        def loss(conv, x, kernel):
            y = conv(x, kernel, (stride, stride), padding, dimension_numbers=numbers,
                     feature_group_count=shape[-1], precision=jax.lax.Precision.HIGHEST)
            return jnp.sum(jnp.sin(y)), y

        (_, stencil), stencil_grads = jax.value_and_grad(
            functools.partial(loss, baselines.depthwise_conv_general_dilated), (0, 1),
            has_aux=True)(x, kernel)
        (_, grouped), grouped_grads = jax.value_and_grad(
            functools.partial(loss, jax.lax.conv_general_dilated), (0, 1), has_aux=True)(x, kernel)
        traced = jax.make_jaxpr(lambda x, kernel: loss(
            baselines.depthwise_conv_general_dilated, x, kernel))(x, kernel)
        assert "conv_general_dilated" not in str(traced)  # the stencil, not XLA's convolution
        np.testing.assert_allclose(stencil, grouped, rtol=0, atol=1e-12)
        for mine, xla in zip(stencil_grads, grouped_grads):
            np.testing.assert_allclose(mine, xla, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "model_cls, num_classes, expected",
    [
        (ResNet50, 100, 23_712_932),
        (ResNet50, 1000, 25_557_032),
        (MobileNetV3Large, 100, 4_330_132),
        (MobileNetV3Large, 1000, 5_483_032),
    ],
)
def test_parameter_count_matches_torchvision(model_cls, num_classes, expected):
    assert num_params(abstract_variables(model_cls(num_classes=num_classes))) == expected


@pytest.mark.parametrize("model_cls", MODELS)
def test_shapes_at_224_match_torchvision(model_cls):
    model = model_cls(num_classes=100)
    variables = abstract_variables(model)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    logits, state = jax.eval_shape(
        functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"]),
        variables,
        images,
    )
    assert logits.shape == (2, 100)
    (features,) = state["intermediates"][LAST_FEATURE_MODULE[model_cls]]["__call__"]
    assert features.shape == (2, 7, 7, LAST_FEATURE_CHANNELS[model_cls])


@pytest.mark.parametrize("model_cls", MODELS)
def test_small_input_and_bfloat16_compute(model_cls):
    model = model_cls(num_classes=10, dtype=jnp.bfloat16)
    variables = abstract_variables(model)
    images = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
    logits = jax.eval_shape(model.apply, variables, images)
    assert logits.shape == (3, 10)
    assert logits.dtype == jnp.float32
    for leaf in jax.tree_util.tree_leaves(variables):
        assert leaf.dtype == jnp.float32


def test_small_stem_keeps_the_resolution_and_reads_widths_and_depths():
    """The small datasets' variants: a 3x3/1 stem and no pool (ResNet50 also takes the
    variant's widths and depths; MobileNetV3 keeps its table, so its parameters)."""
    images = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    resnet = ResNet50(num_classes=10, stem="small", widths=(16, 32, 128, 256), depths=(1, 1, 1, 1))
    variables = jax.eval_shape(functools.partial(resnet.init, train=False), jax.random.key(0), images)
    assert variables["params"]["stem_conv"]["kernel"].shape == (3, 3, 1, 16)
    assert num_params(variables) == 1_849_466
    _, state = jax.eval_shape(
        functools.partial(resnet.apply, capture_intermediates=True, mutable=["intermediates"]),
        variables, images)
    assert state["intermediates"]["stem_bn"]["__call__"][0].shape == (2, 28, 28, 16)
    assert state["intermediates"]["stage4_block1"]["__call__"][0].shape == (2, 4, 4, 1024)
    mobilenet = MobileNetV3Large(num_classes=10, stem="small")
    small = jax.eval_shape(functools.partial(mobilenet.init, train=False), jax.random.key(0), images)
    imagenet = jax.eval_shape(functools.partial(MobileNetV3Large(num_classes=10).init, train=False),
                              jax.random.key(0), images)
    assert num_params(small) == num_params(imagenet)
    _, state = jax.eval_shape(
        functools.partial(mobilenet.apply, capture_intermediates=True, mutable=["intermediates"]),
        small, images)
    assert state["intermediates"]["stem_bn"]["__call__"][0].shape == (2, 28, 28, 16)


@pytest.fixture(scope="module")
def digit_batch():
    """Two real 8x8 digits, resized to 64x64 and tiled to 3 channels."""
    digits = load_digits()
    images = jnp.asarray(digits.images[:2] / 16.0, jnp.float32)[..., None]
    images = jax.image.resize(images, (2, 64, 64, 1), method="bilinear")
    return jnp.tile(images, (1, 1, 1, 3)), jnp.asarray(digits.target[:2])


@pytest.fixture(scope="module", params=MODELS, ids=lambda cls: cls.__name__)
def model_and_variables(request, digit_batch):
    model = request.param(num_classes=10)
    images, _ = digit_batch
    # An "rbg" key compiles the parameter initialisers about twice as fast as threefry.
    init_key = jax.random.key(0, impl="rbg")
    variables = jax.jit(functools.partial(model.init, train=False))(init_key, images)
    return model, variables


def test_train_step_on_digits(model_and_variables, digit_batch):
    model, variables = model_and_variables
    images, labels = digit_batch

    @jax.jit
    def loss_and_grads(params, batch_stats):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                rngs={"dropout": jax.random.key(1)},
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, updates["batch_stats"])

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, (logits, new_batch_stats)), grads = loss_and_grads(
        variables["params"], variables["batch_stats"]
    )
    assert logits.shape == (2, 10)
    assert np.isfinite(np.asarray(logits)).all()
    assert np.isfinite(float(loss))
    for grad in jax.tree_util.tree_leaves(grads):
        assert np.isfinite(np.asarray(grad)).all()
    # Every running mean / variance moved towards the batch statistics.
    for old, new in zip(
        jax.tree_util.tree_leaves(variables["batch_stats"]),
        jax.tree_util.tree_leaves(new_batch_stats),
    ):
        assert not np.array_equal(np.asarray(old), np.asarray(new))


def test_eval_mode_is_deterministic(model_and_variables, digit_batch):
    model, variables = model_and_variables
    images, _ = digit_batch
    apply_eval = jax.jit(
        lambda variables, rng: model.apply(variables, images, train=False, rngs={"dropout": rng})
    )
    first = apply_eval(variables, jax.random.key(1))
    second = apply_eval(variables, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
