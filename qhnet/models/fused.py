"""Eq. (3)'s update as fused Pallas kernels: the product of a block with weight sharing or
per-channel kernels, and no mixing maps,

    z = A [ (C u) * BN_d(K u) ],    C: n -> mn,  K: n -> mn (3x3, stride s),  A: mn -> n',

computed keeping none of its mn-channel tensors for the backward pass. BN_d is folded into
a scale and a shift per derivative channel, from the batch moments of K u (training)
or the running averages (evaluation). BN_o stays outside, on z's n' channels.

The kernels (`qhnet.models.fused_kernels`; Triton on the GPU, the Pallas interpreter on the
CPU): the batch moments of K u (training only); the forward pass, with C u, K u and the
product in registers (or, where `stores_product` says so, the product written for XLA to
apply A); the backward pass, which recomputes the product; and the transposed
stencil for u's gradient through K, which also sums K's gradient.

C's and A's gradients and u's cotangent through C are XLA matrix products on the backward
kernel's outputs; the input kernel adds the last to u's gradient through K as it writes it.
Each kernel treats each image alone, and tells XLA's partitioner so
(`custom_partitioning`): a batch split over devices stays split. The channel axis of
every mn-channel array here is derivative-major (k*n + j); the parameters keep the layers'
layout (j*m + k), and `product` converts. `jax.grad` goes through a `custom_vjp`;
forward-mode autodiff is not defined.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from qhnet.models import fused_kernels as kernels

# What model.block_impl='auto' runs on each platform. The fused kernels are checked against
# the layers on the CPU (in the interpreter) and lower for the GPU (Triton); the GPU's entry
# becomes 'pallas' once benchmarks/gpu_quick.sh measures them faster there.
AUTO = {'cpu': 'xla', 'gpu': 'xla', 'tpu': 'xla'}


# Dense bfloat16 FLOPs per byte of HBM traffic at an H100's or H200's peaks (about 300 and 200):
# the exchange rate at which `stores_product` weighs repeated FLOPs against stored bytes.
FLOPS_PER_BYTE = 200


def stores_product(geometry, n, outputs, itemsize) -> bool:
    """Whether the forward pass writes the mn-channel product for XLA to apply A instead of
    fusing A. The forward kernel forms C u (2n FLOPs per product value) once per block of
    output channels; storing the product costs 2 x `itemsize` bytes per value (written, read
    back). It is stored when the repeats' FLOPs exceed FLOPS_PER_BYTE times those bytes:
    (blocks - 1) x 2n > FLOPS_PER_BYTE x 2 x itemsize. In bfloat16 at the default tiles: the
    14x14 and 7x7 layers of the 224x224 network."""
    repeats = outputs // geometry.output_step(outputs) - 1
    return repeats * n > FLOPS_PER_BYTE * itemsize


def resolve(impl: str) -> str:
    """The block implementation ('xla' or 'pallas') that `impl` names on this platform (read
    when a model is traced, not built: building one starts no backend)."""
    return AUTO.get(jax.default_backend(), 'xla') if impl == 'auto' else impl


def _per_image(call, batched, *args, **static):
    """call(*args, **static), whose first `batched` arguments and every output lead with the
    batch axis and whose kernels treat each image alone, split over the devices that hold the
    batch, each running `call` on its own images (XLA cannot split a kernel: it would run the
    whole batch on every device)."""
    def run(*arrays):
        return call(*arrays, **static)

    def shardings(mesh, arg_shapes, result_shape):
        spec = arg_shapes[0].sharding.spec
        lead = NamedSharding(mesh, PartitionSpec(spec[0] if len(spec) else None))
        whole = NamedSharding(mesh, PartitionSpec())
        return (jax.tree.map(lambda _: lead, result_shape),
                tuple(lead if i < batched else whole for i in range(len(arg_shapes))))

    def partition(mesh, arg_shapes, result_shape):
        return (mesh, run) + shardings(mesh, arg_shapes, result_shape)

    def dims(array, name, lead):  # the sharding rule's factors: only the batch is shared
        return ' '.join(['batch'] * lead + [f'{name}_{i}' for i in range(lead, array.ndim)])

    outputs = jax.tree.leaves(jax.eval_shape(run, *args))
    rule = (', '.join(dims(a, f'in{i}', i < batched) for i, a in enumerate(args)) + ' -> '
            + ', '.join(dims(o, f'out{i}', True) for i, o in enumerate(outputs)))
    split = custom_partitioning(run)
    split.def_partition(partition, infer_sharding_from_operands=lambda *a: shardings(*a)[0],
                        sharding_rule=rule)
    return split(*args)


def _affine(sums, gamma, beta, mean, var, count, train, epsilon):
    """BN_d as d * scale + shift, from the batch moments (train) or the running averages;
    with the batch mean and variance as flax's BatchNorm computes them."""
    if train:
        mean = sums[0] / count
        var = jnp.maximum(0.0, sums[1] / count - mean * mean)
    scale = gamma * jax.lax.rsqrt(var + epsilon)
    return scale, beta - mean * scale, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _fused(u, ck, taps, gamma, beta, ak, mean, var, static):
    return _fused_forward(u, ck, taps, gamma, beta, ak, mean, var, static)[0]


def _fused_forward(u, ck, taps, gamma, beta, ak, mean, var, static):
    geometry, train, epsilon, interpret = static
    count = u.shape[0] * geometry.outputs
    launch = dict(geometry=geometry, interpret=interpret)
    sums = (_per_image(kernels.moments, 1, u, taps, **launch).sum(0) if train
            else jnp.zeros((2,) + gamma.shape))
    scale, shift, mean, var = _affine(sums, gamma, beta, mean, var, count, train, epsilon)
    m, n, outputs = ak.shape
    if stores_product(geometry, n, outputs, u.dtype.itemsize):
        wide = _per_image(kernels.uncombined, 1, u, ck, taps, scale, shift, **launch)
        z = jnp.einsum('bpc,co->bpo', wide, ak.reshape(m * n, outputs),
                       precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32).astype(u.dtype)
    else:
        z = _per_image(kernels.forward, 1, u, ck, taps, scale, shift, ak, **launch)
    return (z, mean, var), (u, ck, taps, gamma, beta, ak, mean, var, sums)


def _fused_backward(static, residuals, cotangents):
    geometry, train, epsilon, interpret = static
    u, ck, taps, gamma, beta, ak, mean_in, var_in, sums = residuals
    dz, dmean, dvar = cotangents
    dz = dz.astype(u.dtype)
    count = u.shape[0] * geometry.outputs
    (scale, shift, _, _), affine_vjp = jax.vjp(
        lambda *a: _affine(*a, count, train, epsilon), sums, gamma, beta, mean_in, var_in)
    launch = dict(geometry=geometry, interpret=interpret)
    dcoef, product, dnorm, der, partial = _per_image(kernels.backward, 2, u, dz, ck, taps, scale,
                                                     shift, ak, **launch)
    dscale, dshift = partial.sum(0)
    dsums, dgamma, dbeta, dmean_in, dvar_in = affine_vjp((dscale, dshift, dmean, dvar))
    # Through C (at the strided centre pixels) and the two 1x1 maps' weights: XLA matrix products.
    precision, batch = jax.lax.Precision.HIGHEST, u.shape[0]
    m, n = gamma.shape
    dcoef = dcoef.reshape(*dcoef.shape[:2], m, n)
    dcentres = jnp.einsum('bpkj,kij->bpi', dcoef, ck, precision=precision,
                          preferred_element_type=jnp.float32).astype(u.dtype)
    du, dtaps = _per_image(kernels.input_gradient, 4, dnorm, der, u, dcentres, taps, dsums[0],
                           dsums[1], **launch)
    dtaps = dtaps.sum(axis=(0, 1, 2) if taps.ndim == 2 else (0, 1))
    s = geometry.stride
    centres = u.reshape(batch, geometry.height, geometry.width, n)[:, ::s, ::s]
    dck = jnp.einsum('bpi,bpkj->kij', centres.reshape(batch, geometry.outputs, n), dcoef,
                     precision=precision, preferred_element_type=jnp.float32)
    dak = jnp.einsum('bpkj,bpo->kjo', product.reshape(dcoef.shape), dz,
                     precision=precision, preferred_element_type=jnp.float32)
    return (du, dck.astype(ck.dtype), dtaps, dgamma, dbeta, dak.astype(ak.dtype), dmean_in, dvar_in)


_fused.defvjp(_fused_forward, _fused_backward)


def product(u, coef, kernel, bn_scale, bn_bias, combine, mean, var, *, multiplier, stride,
            train, epsilon=1e-5, interpret=None, tiles=None):
    """z = A [(C u) * BN_d(K u)] and BN_d's (mean, variance): the batch's when `train`, else
    `mean` and `var` (the running averages).

    u (B, H, W, n); the parameters as the unfused layers store them: `coef` C (n, mn),
    `kernel` K (3, 3, 1, m) shared or (3, 3, 1, mn) per channel, `bn_scale`, `bn_bias`,
    `mean`, `var` (mn,), `combine` A (mn, n'). Channel j*m + k is derivative k of channel j.
    Returns z (B, H', W', n') in u's dtype. `interpret`: run the kernels in the Pallas
    interpreter; by default everywhere but on the GPU. `tiles`: the kernels' program sizes
    (a `fused_kernels.Tiles`; by default `fused_kernels.TILES`).
    """
    batch, height, width, n = u.shape
    m = multiplier
    if interpret is None:
        interpret = jax.default_backend() != 'gpu'
    if kernels.pltriton is None:
        raise RuntimeError(f'jax {jax.__version__} has no jax.experimental.pallas.triton, which the '
                           "fused kernels use; use model.block_impl='xla'")
    if not interpret and (n % 16 or combine.shape[-1] % 16):
        raise ValueError(f'the fused kernels need widths that are multiples of 16 on the GPU, got '
                         f'{n} -> {combine.shape[-1]} channels; use model.block_impl=\'xla\'')
    geometry = kernels.Geometry(height, width, stride, tiles or kernels.TILES)
    if kernel.shape[-1] == m:  # one bank shared by every channel: taps[t, k]
        taps = kernel.reshape(9, m).astype(jnp.float32)
    else:  # per channel: taps[t, k, j]
        taps = kernel.reshape(9, n, m).transpose(0, 2, 1).astype(jnp.float32)

    def derivative_major(x):  # (..., n*m) with channel j*m + k -> (..., m, n)
        return jnp.swapaxes(x.reshape(*x.shape[:-1], n, m), -1, -2)

    ck = derivative_major(coef.astype(u.dtype)).transpose(1, 0, 2)
    ak = derivative_major(combine.T.astype(u.dtype)).transpose(1, 2, 0)
    stats = [derivative_major(x.astype(jnp.float32)) for x in (bn_scale, bn_bias, mean, var)]
    z, mean, var = _fused(u.reshape(batch, height * width, n), ck, taps, *stats[:2], ak, *stats[2:],
                          (geometry, train, epsilon, interpret))
    layer_major = [jnp.swapaxes(x, 0, 1).reshape(-1) for x in (mean, var)]
    return z.reshape(batch, geometry.out_h, geometry.out_w, -1), tuple(layer_major)
