"""qhnet.models.fused and fused_kernels: Eq. (3)'s fused product (Pallas, in the interpreter on
the CPU) against the block's layers, in the forward pass, every gradient and a few training
steps, on one device and on two; and the kernels' lowering for the GPU."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qhnet import config as qhnet_config
from qhnet import data, models
from qhnet.models import fused, fused_kernels
from qhnet.models.blocks import QuasiLinearBlock
from qhnet.training import feeding, recipe, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5  # float32, relative


def assert_close(actual, expected, what='', per_array=True):
    """Every entry within TOLERANCE of `expected`, relative to the largest entry of its array
    (per_array) or of the whole tree (for parameters after training steps, where a small bias
    near zero carries the rounding of large sums)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    tree_scale = max(float(jnp.max(jnp.abs(e))) for e in jax.tree.leaves(expected))
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        scale = float(jnp.max(jnp.abs(e))) if per_array else tree_scale
        error = float(jnp.max(jnp.abs(a - e)))
        assert error <= TOLERANCE * max(scale, 1e-30), (what, jax.tree_util.keystr(path), error, scale)


def perturbed(variables, key):
    """Every variable moved off its initial value (BN_o's zero scale, unit statistics)."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles smaller than the test images: several pixel blocks, channel chunks and output
    blocks per program, as at full size."""
    monkeypatch.setattr(fused_kernels, 'TILES', fused_kernels.Tiles(pixels=16, channels=2, outputs=4))


# (input height, width, channels), output channels, multiplier, stride, weight sharing:
# strides 1 and 2, odd and even sizes, one bank shared by every channel and per-channel kernels.
CASES = [((6, 8, 4), 4, 2, 1, True), ((7, 5, 4), 8, 2, 2, False),
         pytest.param((5, 7, 8), 8, 4, 1, False, marks=pytest.mark.slow),
         pytest.param((8, 6, 4), 8, 4, 2, True, marks=pytest.mark.slow)]


@pytest.mark.parametrize('shape,features,multiplier,stride,sharing', CASES)
def test_fused_block_equals_the_layers(digits, small_tiles, shape, features, multiplier, stride,
                                       sharing, request):
    """Same variables at init; with every variable moved, the same output, BN statistics
    update and gradients (parameters and input) in training, and the same output in
    evaluation (and its gradients, in the slow cases)."""
    height, width, channels = shape
    images = jnp.asarray(digits[0][:2 * channels]).reshape(2, channels, 8, 8).transpose(0, 2, 3, 1)
    u = images[:, :height, :width] - 0.3
    settings = dict(features=features, multiplier=multiplier,
                    weight_sharing=sharing, stride=stride, activation='softball')
    layers = QuasiLinearBlock(**settings, block_impl='xla')
    kernels = QuasiLinearBlock(**settings, block_impl='pallas')
    variables = layers.init(jax.random.key(0), u)
    assert_close(kernels.init(jax.random.key(0), u), variables, 'init')
    variables = perturbed(variables, jax.random.key(1))
    probe = jax.random.normal(jax.random.key(2), (2, *layers.apply(variables, u).shape[1:]))

    def loss(block, params, u):
        output, updates = block.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                      u, train=True, mutable=['batch_stats'])
        return jnp.sum(output * probe), (output, updates)

    grad = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)
    expected_grads, (expected, expected_stats) = grad(layers, variables['params'], u)
    grads, (output, stats) = grad(kernels, variables['params'], u)
    assert_close(output, expected, 'train output')
    assert_close(stats, expected_stats, 'batch statistics')
    assert_close(grads, expected_grads, 'gradients')
    assert_close(kernels.apply(variables, u), layers.apply(variables, u), 'eval output')
    if 'slow' not in request.keywords:
        return
    eval_grad = jax.grad(lambda block, v, u: jnp.sum(block.apply(v, u) * probe), argnums=(1, 2))
    assert_close(eval_grad(kernels, variables, u), eval_grad(layers, variables, u), 'eval gradients')


def test_forward_stores_the_product_where_repeats_of_c_cost_more(digits, monkeypatch):
    """In bfloat16 at the default tiles the 14x14 and 7x7 layers of the 224 network write the
    product for XLA to apply A; that path gives the forward kernel's output and gradients."""
    from benchmarks.derivative import LAYERS
    from benchmarks.kernels import block_outputs
    stored = [(size, n, s) for size, n, s, _ in LAYERS if fused.stores_product(
        fused_kernels.Geometry(size, size, s), n, block_outputs(n, s), itemsize=2)]
    assert stored == [(14, 256, 1), (14, 256, 2), (7, 512, 1)]

    n, m, outputs = 4, 2, 16  # 4 blocks of 4 output channels: C u formed 4 times when fused
    u = jnp.asarray(digits[0][:2 * n]).reshape(2, n, 8, 8).transpose(0, 2, 3, 1)[:, :7, :5] - 0.3
    keys = jax.random.split(jax.random.key(0), 6)
    weights = dict(coef=jax.random.normal(keys[0], (n, m * n)),
                   kernel=jax.random.normal(keys[1], (3, 3, 1, m)),
                   bn_scale=1 + 0.2 * jax.random.normal(keys[2], (m * n,)),
                   bn_bias=0.2 * jax.random.normal(keys[3], (m * n,)),
                   combine=jax.random.normal(keys[4], (m * n, outputs)))
    probe = jax.random.normal(keys[5], (2, 4, 3, outputs))
    tiles = fused_kernels.Tiles(pixels=16, channels=2, outputs=4)

    def run(flops_per_byte):
        monkeypatch.setattr(fused, 'FLOPS_PER_BYTE', flops_per_byte)

        def loss(weights, u):
            z, (mean, var) = fused.product(u, **weights, mean=jnp.zeros(m * n), var=jnp.ones(m * n),
                                           multiplier=m, stride=2, train=True, tiles=tiles)
            return jnp.sum(z * probe) + jnp.sum(mean * var), z

        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(weights, u)

    assert fused.stores_product(fused_kernels.Geometry(7, 5, 2, tiles), n, outputs, 4) is False
    fused_grads, fused_z = run(1e9)
    stored_grads, stored_z = run(0)
    assert_close(stored_z, fused_z, 'output')
    assert_close(stored_grads, fused_grads, 'gradients')


def train_steps(block_impl, count=3):
    """The initial and the final state of `count` training steps of a 2-stage QHNet (m = 2)
    on scikit-learn's digits."""
    config = qhnet_config.get_config('digits')
    config.model.widths, config.model.depths, config.model.multiplier = (8, 16), (1, 1), 2
    config.model.block_impl = block_impl
    config.optimizer.warmup_epochs, config.optimizer.base_lr = 0.0, 0.2
    model = models.build(config.model)
    schedule = recipe.learning_rate_schedule(config, 100, 1000)
    optimizer = recipe.make_optimizer(config, schedule)
    info = data.get_info(config.data)
    state = steps.create_train_state(model, optimizer, info.image_shape, jax.random.key(0))
    initial = jax.device_get(state)
    step = steps.jit_train_step(feeding.make_mesh(), model=model, optimizer=optimizer, schedule=schedule,
                                label_smoothing=config.label_smoothing, inputs=steps.model_inputs(info))
    batches = data.make_iterator(config.data, 'train', batch_size=32, seed=0, train=True)
    for index in range(count):
        state, _ = step(state, next(batches), jax.random.key(index))
    return initial, jax.device_get(state)


def test_training_steps_give_the_same_parameters():
    initial, expected = train_steps('xla')
    _, state = train_steps('pallas')
    assert int(state.step) == 3
    # Past step 1 (BN_o's scale starts at zero) the fused branch's own weights move too.
    for block in ('stage1_block1', 'stage2_block1'):
        for layer in ('coef', 'derivative', 'combine'):
            assert not np.array_equal(state.params[block][layer]['kernel'],
                                      initial.params[block][layer]['kernel']), (block, layer)
    assert_close(state.params, expected.params, 'parameters', per_array=False)
    assert_close(state.batch_stats, expected.batch_stats, 'batch statistics', per_array=False)


def test_the_layers_run_where_kernels_do_not_apply():
    """Mixing maps keep the layers; 'auto' is the layers on the CPU; a bad name is refused."""
    u = jnp.ones((1, 4, 4, 4))
    settings = dict(features=4, mixing=True)
    fused_variables = QuasiLinearBlock(**settings, block_impl='pallas').init(jax.random.key(0), u)
    assert 'mix_in' in fused_variables['params']
    assert fused.resolve('auto') == fused.AUTO[jax.default_backend()] == 'xla'
    config = qhnet_config.get_config('digits')
    config.model.block_impl = 'triton'
    with pytest.raises(qhnet_config.ConfigError, match='block_impl'):
        qhnet_config.validate(config)


SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from qhnet.models import fused, fused_kernels

keys = jax.random.split(jax.random.key(0), 7)
n, m, outputs = 4, 2, 8
args = [jax.random.normal(keys[0], (4, 7, 6, n)), jax.random.normal(keys[1], (n, m * n)),
        jax.random.normal(keys[2], (3, 3, 1, m)), 1 + 0.1 * jax.random.normal(keys[3], (m * n,)),
        0.1 * jax.random.normal(keys[4], (m * n,)), jax.random.normal(keys[5], (m * n, outputs)),
        jnp.zeros(m * n), jnp.ones(m * n)]
probe = jax.random.normal(keys[6], (4, 4, 3, outputs))

def loss(probe, *args):
    z, (mean, var) = fused.product(*args, multiplier=m, stride=2, train=True)
    return jnp.sum(z * probe) + jnp.sum(mean) + jnp.sum(var)

step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(1, 7))))
single = step(probe, *args)
mesh = Mesh(np.array(jax.devices()), ('data',))
split = [jax.device_put(a, NamedSharding(mesh, PartitionSpec('data'))) for a in (probe, args[0])]
compiled = step.lower(*split, *args[1:]).compile()
print('all-gathers', compiled.as_text().count('all-gather('))
sharded = compiled(*split, *args[1:])
print('input gradient', sharded[1][0].sharding.spec)
worst = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
            for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)))
print('relative difference', worst)
"""


def test_kernels_split_the_batch_over_devices():
    """On a mesh of 2 CPU devices with the batch split, each device runs the kernels on its
    own images (no all-gather), and the loss and gradients equal one device's."""
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
               JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert 'all-gathers 0' in result.stdout, result.stdout
    assert "input gradient P('data'" in result.stdout, result.stdout
    assert float(result.stdout.split('relative difference')[1]) <= TOLERANCE, result.stdout


def test_tiles():
    """Tiles print as they parse, and a size that is no power of two is refused."""
    tiles = fused_kernels.Tiles(pixels=128, channels=16, outputs=32, warps=8, stages=2)
    assert str(tiles) == '128x16x32/w8s2' and fused_kernels.Tiles.parse(str(tiles)) == tiles
    assert fused_kernels.Geometry(7, 5, 2, tiles).outputs == 12
    with pytest.raises(ValueError, match='Tiles.pixels must be a power of two, got 48'):
        fused_kernels.Tiles(pixels=48)
    with pytest.raises(ValueError, match='expected PIXELSxCHANNELSxOUTPUTS/wWARPSsSTAGES'):
        fused_kernels.Tiles.parse('64x32x64')


@pytest.mark.parametrize('stride,sharing,tiles', [
    (1, True, None), (2, False, fused_kernels.Tiles(128, 16, 128, warps=8, stages=2))])
def test_kernels_lower_for_the_gpu(stride, sharing, tiles):
    """Forward and backward lower through Pallas' Triton backend (GPU widths, bfloat16), with
    the tiles' warps and stages."""
    n, m, outputs = 64, 4, 128
    args = (jnp.zeros((2, 14, 14, n), jnp.bfloat16), jnp.zeros((n, m * n)),
            jnp.zeros((3, 3, 1, m if sharing else m * n)), jnp.ones(m * n), jnp.zeros(m * n),
            jnp.zeros((m * n, outputs)), jnp.zeros(m * n), jnp.ones(m * n))

    def loss(*args):
        z, (mean, var) = fused.product(*args, multiplier=m, stride=stride, train=True,
                                       interpret=False, tiles=tiles)
        return jnp.sum(jnp.square(z.astype(jnp.float32))) + jnp.sum(mean) + jnp.sum(var)

    lowered = jax.jit(jax.grad(loss, argnums=tuple(range(8)))).trace(*args).lower(
        lowering_platforms=('cuda',))
    text = lowered.as_text()
    assert text.count('xla.gpu.triton') == 4  # moments, forward, backward, input
    tiles = tiles or fused_kernels.TILES
    assert text.count(f'num_warps = {tiles.warps} : i32') == 4, tiles
    assert text.count(f'num_stages = {tiles.stages} : i32') == 4, tiles


@pytest.mark.parametrize('layer', [0, 5])  # 56x56x64 at stride 1, 14x14x256 at stride 2
def test_kernels_compile_for_sm90_without_spilling(layer):
    """Compiled for an H100/H200 by the triton package, each kernel of the default tiles and a
    shared bank keeps its values in registers: a spill inside its loops would cost a round trip
    to memory per value."""
    if (platform.system(), platform.machine()) != ('Linux', 'x86_64'):
        pytest.skip("the 'triton' package (in .[dev]) is built for Linux x86-64 only")
    import triton  # noqa: F401  (in .[dev] on this platform: its absence is a failure)
    from benchmarks.derivative import LAYERS
    from benchmarks.registers import layer_resources
    size, channels, stride, _ = LAYERS[layer]
    resources = layer_resources(size, channels, stride, True, [fused_kernels.TILES])
    assert len(resources) == 5, resources
    for name, value in resources.items():
        assert isinstance(value, dict), (name, value)  # compiled
        assert value['stack'] == 0, (name, value)


@pytest.mark.slow
def test_bfloat16_block_agrees_to_bfloat16_rounding():
    """In bfloat16 the kernels keep float32 between their steps and the layers round after each:
    they agree to about a percent."""
    u = jax.random.normal(jax.random.key(0), (4, 9, 9, 16))
    settings = dict(features=32, stride=2, activation='softball', dtype=jnp.bfloat16)
    layers = QuasiLinearBlock(**settings, block_impl='xla')
    variables = perturbed(layers.init(jax.random.key(1), u), jax.random.key(2))

    def run(block):
        def loss(params, u):
            output, _ = block.apply({'params': params, 'batch_stats': variables['batch_stats']}, u,
                                    train=True, mutable=['batch_stats'])
            return jnp.sum(output.astype(jnp.float32) * jnp.cos(u[:, ::2, ::2, :1])), output
        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(variables['params'], u)

    expected, fused_run = run(layers), run(QuasiLinearBlock(**settings, block_impl='pallas'))
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(fused_run), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.max(np.abs(a - e)) <= 3e-2 * np.max(np.abs(e)), jax.tree_util.keystr(path)


@pytest.mark.slow
def test_the_224_network_lowers_for_the_gpu(monkeypatch):
    """Every block of the 224x224 Eq. (3) network at batch 256 in bfloat16: a training step's
    4 kernels per block lower for the GPU."""
    config = qhnet_config.get_config()
    config.model.dtype, config.model.block_impl = 'bfloat16', 'pallas'
    model = models.build(config.model)
    monkeypatch.setattr(fused.jax, 'default_backend', lambda: 'gpu')  # compile, not interpret
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))

    def loss(params, batch_stats, images):
        logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                train=True, mutable=['batch_stats'])
        return jnp.sum(logits)

    images = jax.ShapeDtypeStruct((256, 224, 224, 3), jnp.float32)
    lowered = jax.jit(jax.grad(loss)).trace(variables['params'], variables['batch_stats'],
                                            images).lower(lowering_platforms=('cuda',))
    assert lowered.as_text().count('xla.gpu.triton') == 4 * sum(config.model.depths)
