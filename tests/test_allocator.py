"""qhnet.allocator: freed XLA:CPU buffers are reused, not faulted in again every step."""

import json
import os
import subprocess
import sys

import pytest

from qhnet import allocator

# Minor page faults per call of a training block's jitted gradient, whose temporaries
# (12.8 MB arrays) XLA frees at the end of each call.
PROBE = r'''
import json, resource, sys
from qhnet import allocator
applied = allocator.reuse_freed_memory() if sys.argv[1] == 'reuse' else None
import jax, jax.numpy as jnp
from qhnet.models.blocks import QuasiLinearBlock

block = QuasiLinearBlock(16, activation='softball')
u = jnp.ones((64, 28, 28, 16))
variables = block.init(jax.random.key(0), u)


@jax.jit
def step(params, u):  # the gradient of a Fashion-MNIST stage-1 block, in training mode
    def loss(params):
        y, _ = block.apply({**variables, 'params': params}, u, train=True, mutable=['batch_stats'])
        return jnp.sum(y ** 2)
    return jax.grad(loss)(params)


x = variables['params']
for _ in range(3):
    jax.block_until_ready(step(x, u))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    jax.block_until_ready(step(x, u))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(json.dumps(dict(applied=applied, faults_per_call=faults)))
'''


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, '-c', PROBE, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_freed_buffers_are_reused_instead_of_faulted_in():
    default, reused = _faults('default'), _faults('reuse')
    assert reused['applied'] is True
    # The block's temporaries are tens of thousands of fresh 4 KiB pages by default.
    assert default['faults_per_call'] > 1000, default
    assert reused['faults_per_call'] < default['faults_per_call'] / 4, (default, reused)


def test_is_idempotent():
    assert allocator.reuse_freed_memory() == allocator.reuse_freed_memory()
