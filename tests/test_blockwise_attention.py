"""Tests of the blockwise attention (dfm_jax.models.blockwise_attention): its forward
pass against a float64 numpy softmax attention, its hand-written backward pass against
autodiff of ``jax.nn.dot_product_attention``, the block choice, and its sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import numpy_attention
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dfm_jax.models import blockwise_attention, layers


def _inputs(shape, seed=0, scale=2.0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, shape) * scale for key in keys)


def test_num_blocks_fits_the_scores_in_the_budget():
    assert blockwise_attention.num_blocks(96, 256) == 6  # 16 pairs x 256 KiB = 4 MiB
    assert blockwise_attention.num_blocks(256, 256) == 16
    assert blockwise_attention.num_blocks(12, 4) == 1  # everything in one block
    assert blockwise_attention.num_blocks(7, 2048) == 7  # one pair's scores exceed 4 MiB
    assert blockwise_attention.num_blocks(15, 256, block_bytes=4 * 256 * 256 * 4) == 5


# block_bytes: one pair per block (12 blocks), 3 pairs (4 blocks), all 12 in one block.
@pytest.mark.parametrize("block_bytes", [1, 3 * 4 * 7 * 7, 2**20])
def test_forward_matches_numpy(block_bytes):
    q, k, v = _inputs((4, 7, 3, 8))  # B 4, L 7, N 3, H 8: 12 (batch, head) pairs
    out = blockwise_attention.blockwise_attention(q, k, v, block_bytes)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v), atol=2e-6)


@pytest.mark.parametrize("block_bytes", [1, 3 * 4 * 7 * 7])
def test_gradients_match_autodiff_of_dot_product_attention(block_bytes):
    q, k, v = _inputs((4, 7, 3, 8), seed=1)
    weights = jax.random.normal(jax.random.key(2), q.shape)  # a non-trivial cotangent

    def loss(attention):
        return lambda q, k, v: (attention(q, k, v) * weights).sum()

    ours = jax.grad(
        loss(lambda *x: blockwise_attention.blockwise_attention(*x, block_bytes)), (0, 1, 2)
    )
    reference = jax.grad(
        loss(lambda *x: jax.nn.dot_product_attention(*x, implementation="xla")), (0, 1, 2)
    )
    for got, want in zip(ours(q, k, v), reference(q, k, v), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


def test_bfloat16_inputs_keep_float32_softmax_and_bfloat16_outputs():
    q, k, v = (x.astype(jnp.bfloat16) for x in _inputs((2, 16, 2, 16), seed=3, scale=3.0))
    out = blockwise_attention.blockwise_attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    exact = numpy_attention(*(np.asarray(x, np.float32) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, atol=0.04)
    grads = jax.grad(lambda *x: blockwise_attention.blockwise_attention(*x).sum(), (0, 1, 2))
    assert [g.dtype for g in grads(q, k, v)] == [jnp.bfloat16] * 3


def test_batch_sharded_inputs_need_no_gather():
    """Under a data-parallel mesh the blocks keep the batch sharding: the compiled
    forward and backward move no activations between devices. 8 devices, B 8, N 4:
    4 blocks of 8 pairs, the within-block axis the batch (contiguous blocks would put
    the batch on the mapped axis)."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    q, k, v = (jax.device_put(x, sharding) for x in _inputs((8, 16, 4, 8), seed=4))
    block_bytes = 8 * 16 * 16 * 4
    assert blockwise_attention.num_blocks(32, 16, block_bytes) == 4
    attention = lambda *x: blockwise_attention.blockwise_attention(*x, block_bytes)  # noqa: E731
    step = jax.jit(jax.value_and_grad(lambda *x: attention(*x).sum()))
    hlo = step.lower(q, k, v).compile().as_text()
    assert not [op for op in ("all-gather", "all-to-all", "collective-permute") if op in hlo]
    value, grad = step(q, k, v)
    np.testing.assert_allclose(float(value), numpy_attention(q, k, v).sum(), rtol=1e-5)
    assert grad.sharding.is_equivalent_to(sharding, grad.ndim)


def test_attend_defaults_to_blockwise_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(
        blockwise_attention, "blockwise_attention", lambda *a: calls.append(1) or a[2]
    )
    q = jnp.ones((1, 2, 1, 4))
    layers.attend(q, q, q, None)
    assert calls == [1]
    layers.attend(q, q, q, "einsum")
    assert calls == [1]  # an explicit choice is kept
