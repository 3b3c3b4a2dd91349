"""The quasi-linear block family: paper Eqs. (3)-(7) and QLNet's block, the authors' released
model's (equation 'qlnet'; docs/design.md, 'The block family').

Notation: the block input `u` has n channels, the output n' (n, or 2n in the first
block of stages 2-4); m is the multiplier. C, A are 1x1 convs (no bias), K the
learned derivative operator (`qhnet.models.derivative`), `*` the elementwise product,
BN_d the batchnorm on the derivative channels and BN_o the output batchnorm, whose
scale starts at zero so that every block's update q(u) starts at zero. A block
returns

    y = act(shortcut(u) + q(u)),

with `shortcut` the identity, or BN(1x1 conv, stride 2, n -> n') when the block
downsamples. The stride sits in K and in the 1x1 convs that must match its
resolution.

Optional mixing maps (`mixing=True`, identity at initialisation) make every block
closed under the channel-mixing group (docs/design.md, 'Streams and groups'): E = `mix_in` before K
(Eqs. 3, 5, and 4 without weight sharing) or on the bare `u` factor (Eqs. 6, 7),
and `mix_out` after the product on the output side (Eqs. 4, 5).

A sliced Eq. (3) block (`qhnet.symmetry.slicing`) reads a stream of k < n channels:
`hidden` = n keeps the product's n*m channels, E = `mix_in` is then k x n, and `radius`
keeps the activation's radius at the unsliced width.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from qhnet import config
from qhnet.models import activations, fused
from qhnet.models.derivative import DEFAULT_IMPL, Derivative

EQUATIONS = config.EQUATIONS

CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
BN_MOMENTUM, BN_EPSILON = 0.9, 1e-5  # every batchnorm of a block, folded (BN_d, fused) or not
LINEAR_INIT = nn.initializers.variance_scaling(1.0, 'fan_out', 'normal')  # QLNet's, every conv


def identity_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.eye(*shape, dtype=dtype)


def qlnet_width(n: int) -> int:
    """w, the product channels of QLNet's block on n input channels: 4n up to 128, else 2n."""
    return (4 if n <= 128 else 2) * n


class Conv1x1(nn.Module):
    """A 1x1 convolution (no bias) computed as one matrix product over the flattened pixels:
    the parameters of `nn.Conv(features, (1, 1), strides=stride)` (kernel [1, 1, n, features])
    and its results, at a fraction of XLA:CPU's cost for a convolution with few channels."""
    features: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = CONV_INIT

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features))
        if self.stride > 1:  # 'SAME' padding of a 1x1 kernel: pixels 0, s, 2s, ...
            x = x[:, ::self.stride, ::self.stride]
        pixels = x.astype(self.dtype).reshape(-1, x.shape[-1])
        return (pixels @ kernel[0, 0].astype(self.dtype)).reshape(*x.shape[:-1], self.features)


class Weight(nn.Module):
    """A layer's kernel alone, at <name>/kernel with the layer's shape and initializer, for code
    that applies it itself (`QuasiLinearBlock.eq3_fused`)."""
    shape: tuple[int, ...]
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param('kernel', self.kernel_init, self.shape)


class FoldedBatchNorm(nn.Module):
    """nn.BatchNorm's variables (names, initial values, running-average update) for a layer
    that normalizes inside its own computation: `apply(scale, bias, mean, var)`, given the
    running averages, returns its output and the batch's (mean, var)."""
    features: int
    use_running_average: bool
    momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, apply: Callable) -> jax.Array:
        shape = (self.features,)
        mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(shape, jnp.float32))
        var = self.variable('batch_stats', 'var', lambda: jnp.ones(shape, jnp.float32))
        scale = self.param('scale', nn.initializers.ones, shape)
        bias = self.param('bias', nn.initializers.zeros, shape)
        output, (batch_mean, batch_var) = apply(scale, bias, mean.value, var.value)
        if not self.use_running_average and not self.is_initializing():
            mean.value = self.momentum * mean.value + (1 - self.momentum) * batch_mean
            var.value = self.momentum * var.value + (1 - self.momentum) * batch_var
        return output


class QuasiLinearBlock(nn.Module):
    """One residual block y = act(shortcut(u) + q(u)) with q(u) from paper Eq. (`equation`), or
    QLNet's block (`equation='qlnet'`)."""
    features: int
    equation: int | str = 3    # 3-7, or 'qlnet'
    multiplier: int = 4
    weight_sharing: bool = True
    stride: int = 1
    mixing: bool = False
    activation: str = 'identity'
    dtype: jnp.dtype = jnp.float32
    derivative_impl: str = DEFAULT_IMPL  # how K is computed (qhnet.models.derivative); same params and results
    block_impl: str = 'xla'  # 'pallas': Eq. (3) by fused kernels (eq3_fused); 'auto': per platform
    hidden: int | None = None    # channels j of the product; None: u's (Eq. 3), qlnet_width (QLNet)
    radius: float | None = None  # of a ball activation; None: sqrt(features)

    @nn.compact
    def __call__(self, u: jax.Array, train: bool = False) -> jax.Array:
        if (self.hidden not in (None, u.shape[-1]) and self.equation != 'qlnet'
                and not (self.equation == 3 and self.mixing)):
            raise ValueError(f'a block reading {u.shape[-1]} stream channels with hidden width '
                             f'{self.hidden} needs Eq. (3) with mixing=True (its k x n map E); '
                             f'got Eq. ({self.equation}), mixing={self.mixing}')
        update = {3: self.eq3, 4: self.eq4, 5: self.eq5, 6: self.eq6, 7: self.eq7,
                  'qlnet': self.qlnet}[self.equation]
        y = self.shortcut(u, train) + update(u, train)
        return activations.get(self.activation, self.radius)(y)

    # Building blocks shared by the equations.

    def hidden_width(self, n: int) -> int:
        """The channels j of the product on n stream channels: `hidden` if set, else n
        (QLNet: `qlnet_width(n)`)."""
        return self.hidden or (qlnet_width(n) if self.equation == 'qlnet' else n)

    @property
    def kernel_init(self) -> nn.initializers.Initializer:
        return LINEAR_INIT if self.equation == 'qlnet' else CONV_INIT

    def conv1x1(self, features: int, name: str, stride: int = 1) -> Callable:
        return Conv1x1(features, stride, dtype=self.dtype, kernel_init=self.kernel_init, name=name)

    def batch_norm(self, train: bool, name: str, zero_scale: bool = False) -> Callable:
        return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                            scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                            dtype=self.dtype, name=name)

    def derivative(self, stride: int, expand: bool = True) -> Callable:
        return Derivative(self.multiplier, shared=self.weight_sharing, expand=expand, stride=stride,
                          dtype=self.dtype, impl=self.derivative_impl,
                          kernel_init=self.kernel_init, name='derivative')

    def mix(self, x: jax.Array, name: str, features: int | None = None) -> jax.Array:
        """A mixing map (n x features, features = n unless given; the identity, or its first
        rows, at init) when `mixing` is on; otherwise nothing."""
        if not self.mixing:
            return x
        return nn.Dense(features or x.shape[-1], use_bias=False, kernel_init=identity_init,
                        dtype=self.dtype, name=name)(x)

    def shortcut(self, u: jax.Array, train: bool) -> jax.Array:
        if self.stride == 1 and u.shape[-1] == self.features:
            return u
        projected = self.conv1x1(self.features, 'shortcut', self.stride)(u)
        return self.batch_norm(train, 'shortcut_bn')(projected)

    def output_norm(self, x: jax.Array, train: bool) -> jax.Array:
        return self.batch_norm(train, 'out_bn', zero_scale=True)(x)

    # The equations. n = u.shape[-1], n' = self.features, m = self.multiplier.

    def eq3(self, u: jax.Array, train: bool) -> jax.Array:
        """Eq. (3): du_i/dt = sum_j A_ij (sum_k C_jk u_k) du_j/dx + (B, D, d/dy terms).

            q(u) = BN_o(A [ (C u) * BN_d(K E u) ]),   C: n -> mn,  A: mn -> n'

        Coefficient channel (j, k) multiplies derivative k of channel j; a sliced block
        reads k stream channels into n = `hidden` channels j (E: k x n).
        """
        n, m = self.hidden_width(u.shape[-1]), self.multiplier
        if fused.resolve(self.block_impl) == 'pallas' and not self.mixing:
            return self.output_norm(self.eq3_fused(u, train), train)
        coef = self.conv1x1(m * n, 'coef', self.stride)(u)
        derivative = self.batch_norm(train, 'derivative_bn')(
            self.derivative(self.stride)(self.mix(u, 'mix_in', n)))
        return self.output_norm(self.conv1x1(self.features, 'combine')(coef * derivative), train)

    def eq3_fused(self, u: jax.Array, train: bool) -> jax.Array:
        """Eq. (3)'s A [(C u) * BN_d(K u)] by the fused kernels of `qhnet.models.fused`, from the
        variables of `eq3`'s layers (same names, shapes, initial values)."""
        n, m = u.shape[-1], self.multiplier
        coef = Weight((1, 1, n, m * n), self.kernel_init, name='coef')()
        kernel = Weight((3, 3, 1, m if self.weight_sharing else m * n), self.kernel_init,
                        name='derivative')()
        combine = Weight((1, 1, m * n, self.features), self.kernel_init, name='combine')()

        def apply(scale, bias, mean, var):
            return fused.product(u.astype(self.dtype), coef[0, 0], kernel, scale, bias, combine[0, 0],
                                 mean, var, multiplier=m, stride=self.stride, train=train,
                                 epsilon=BN_EPSILON)

        return FoldedBatchNorm(m * n, not train, name='derivative_bn')(apply)

    def eq4(self, u: jax.Array, train: bool) -> jax.Array:
        """Eq. (4): du_i/dt = sum_k C_ik u_k sum_j A_ij du_j/dx + (D, B, d/dy terms).

            q(u) = BN_o(E_out [ (C u) * (A BN_d(K E_in u)) ]),   C: n -> n',  A: mn -> n'

        With weight sharing K commutes with channel mixing, so E_in is not needed.
        """
        coef = self.conv1x1(self.features, 'coef', self.stride)(u)
        stream = u if self.weight_sharing else self.mix(u, 'mix_in')
        derivative = self.batch_norm(train, 'derivative_bn')(self.derivative(self.stride)(stream))
        product = coef * self.conv1x1(self.features, 'combine')(derivative)
        return self.output_norm(self.mix(product, 'mix_out'), train)

    def eq5(self, u: jax.Array, train: bool) -> jax.Array:
        """Eq. (5): du_i/dt = sum_k C_ik u_k du_i/dx + sum_k D_ik u_k du_i/dy.

            q(u) = BN_o(E_out [ sum over groups of (C u) * BN_d(K E_in u) ]),   C: n -> mn

        Each channel only sees its own derivatives: the m products of channel j are
        summed in n'/n groups, giving n' channels (n'/n of them per input channel).
        """
        n, m = u.shape[-1], self.multiplier
        groups = self.features // n
        coef = self.conv1x1(m * n, 'coef', self.stride)(u)
        derivative = self.batch_norm(train, 'derivative_bn')(
            self.derivative(self.stride)(self.mix(u, 'mix_in')))
        product = coef * derivative  # channel j*m + k
        summed = product.reshape(*product.shape[:-1], n, groups, m // groups).sum(axis=-1)
        summed = summed.reshape(*product.shape[:-1], self.features)
        return self.output_norm(self.mix(summed, 'mix_out'), train)

    def eq6(self, u: jax.Array, train: bool) -> jax.Array:
        """Eq. (6): du_i/dt = sum_j A_ij d/dx (sum_k C_jk u_j u_k) + (B, d/dy terms).

            q(u) = BN_o(A BN_d(K [ (E u) * (C u) ])),   C: n -> n,  A: mn -> n'

        A conservation law: K differentiates the product, so the stride sits in K.
        """
        coef = self.conv1x1(u.shape[-1], 'coef')(u)
        product = self.mix(u, 'mix_in') * coef
        derivative = self.batch_norm(train, 'derivative_bn')(self.derivative(self.stride)(product))
        return self.output_norm(self.conv1x1(self.features, 'combine')(derivative), train)

    def eq7(self, u: jax.Array, train: bool) -> jax.Array:
        """Eq. (7): du_i/dt = sum_j A_ij d/dx (sum_k C_jk u_j u_k) + sum_j B_ij d/dy (sum_k D_jk u_j u_k).

            q(u) = BN_o(A BN_d(K [ BN_c(C u) * repeat_m(E u) ])),   C: n -> mn (C, D, ... stacked)

        Product channel (j, k) is (C_k u)_j * u_j, and K applies derivative k to it:
        one 3x3 kernel per product channel (or per k with weight sharing). BN_c on the
        coefficient branch is the authors' Eq. (7)-type block (their `Bottleneck`: conv2,
        bn2, product, depthwise conv1, bn1, conv3, bn3); Eqs. (3)-(6) have none.
        """
        n, m = u.shape[-1], self.multiplier
        coef = self.batch_norm(train, 'coef_bn')(self.conv1x1(m * n, 'coef')(u))
        product = coef * jnp.repeat(self.mix(u, 'mix_in'), m, axis=-1)
        derivative = self.batch_norm(train, 'derivative_bn')(
            self.derivative(self.stride, expand=False)(product))
        return self.output_norm(self.conv1x1(self.features, 'combine')(derivative), train)

    def qlnet(self, u: jax.Array, train: bool) -> jax.Array:
        """QLNet's block, the authors' released model (not among the paper's equations): the
        derivative of a product of two affine maps of u,

            du_i/dt = sum_j A_ij d/dx [ (C_j u + c_j)(D_j u + e_j) ] + (d/dy terms),

            q(u) = BN_o(A BN_d(K_s[ (BN_c(C u))_first w * (BN_c(C u))_last w ])),
            C: n -> 2w, w = `qlnet_width(n)`, K: w -> mw (m = 2, a kernel per channel), A: mw -> n'

        The two halves of C's output (one BN over all 2w) are multiplied; the stride sits in K.
        """
        width = self.hidden_width(u.shape[-1])
        coef = self.batch_norm(train, 'coef_bn')(self.conv1x1(2 * width, 'coef')(u))
        product = coef[..., :width] * coef[..., width:]
        derivative = self.batch_norm(train, 'derivative_bn')(self.derivative(self.stride)(product))
        return self.output_norm(self.conv1x1(self.features, 'combine')(derivative), train)
