"""Softmax attention computed a block of (batch, head) pairs at a time, with its own VJP.

The CPU default of ``layers.attend``. Written as whole-tensor einsums, attention
materialises the (B, N, L, L) scores, probabilities and their gradients in main memory,
and on the XLA CPU backend those passes, not the matmuls, dominate attention on its own:
one 67 MB score tensor (B 16, N 16, L 256) took 14-40 ms to write (without and with page
faults) and ~4 ms to compute. Measured (docs/benchmarks.md): attention's forward and
backward 23 % (head dim 64) and 43 % (head dim 24) faster than the einsum form; in the
whole train step the same speed, with 37 % less memory at 16 heads; sampling the
fastest of the CPU formulations. Here the B * N
(batch, head) pairs are split into blocks whose (block, L, L) scores fit in cache
(``BLOCK_BYTES``), a ``lax.map`` runs the blocks one after another, and the backward pass
recomputes each block's probabilities from the saved log-sum-exp (as FlashAttention
does, keeping whole rows since a row of L scores is small) instead of storing them:

    forward, per block:  s = q k^T / sqrt(H),  lse = logsumexp(s),  o = exp(s - lse) v
    backward, per block: p = exp(s - lse),  dv = p^T do,  dp = do v^T,
                         ds = p * (dp - rowsum(do * o)) / sqrt(H),
                         dq = ds k,  dk = ds^T q

Scores, probabilities and all gradient arithmetic are float32 whatever the input dtype
(as in ``layers.einsum_attention``); outputs and gradients take the inputs' dtypes.

Sharding: the blocks are taken with a stride (block i holds the pairs g with
g mod num_blocks == i), so the batch axis's sharding lands on the within-block axis and
the mapped axis stays unsharded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

BLOCK_BYTES = 4 * 2**20  # one block's float32 (block, L, L) scores; best of 1-8 MiB at L 256


def num_blocks(pairs: int, length: int, block_bytes: int = BLOCK_BYTES) -> int:
    """The fewest blocks, dividing ``pairs`` (B * N) evenly, whose float32
    (pairs / blocks, L, L) scores fit in ``block_bytes`` (all ``pairs`` blocks of one
    pair each when even one pair's L x L scores do not)."""
    largest = max(1, block_bytes // (4 * length * length))
    return next(d for d in range(1, pairs + 1) if pairs % d == 0 and pairs // d <= largest)


def _to_blocks(x: Array, blocks: int) -> Array:
    """(B, L, N, H) -> (blocks, B N / blocks, L, H), block i holding pairs i, i + blocks, ..."""
    b, length, n, h = x.shape
    x = x.transpose(0, 2, 1, 3).reshape(b * n // blocks, blocks, length, h)
    return x.transpose(1, 0, 2, 3)


def _from_blocks(x: Array, shape: tuple[int, ...]) -> Array:
    """The inverse of ``_to_blocks`` for a (B, L, N, H) ``shape``."""
    b, length, n, h = shape
    return x.transpose(1, 0, 2, 3).reshape(b, n, length, h).transpose(0, 2, 1, 3)


def _scale(q: Array) -> float:
    return q.shape[-1] ** -0.5


def _scores(q: Array, k: Array) -> Array:
    return jnp.einsum("glh,gmh->glm", q, k, preferred_element_type=jnp.float32) * _scale(q)


def _forward_block(q: Array, k: Array, v: Array) -> tuple[Array, Array]:
    """One block's output (G, L, H) in ``v``'s dtype and float32 log-sum-exp (G, L)."""
    scores = _scores(q, k)
    peak = jax.lax.stop_gradient(scores.max(-1, keepdims=True))
    weights = jnp.exp(scores - peak)
    total = weights.sum(-1, keepdims=True)
    out = jnp.einsum("glm,gmh->glh", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / total).astype(v.dtype), (peak + jnp.log(total))[..., 0]


def _backward_block(
    q: Array, k: Array, v: Array, out: Array, lse: Array, d_out: Array
) -> tuple[Array, Array, Array]:
    """One block's (dq, dk, dv), recomputing its probabilities from ``lse``."""
    f32 = jnp.float32
    weights = jnp.exp(_scores(q, k) - lse[..., None])
    d_out, out = d_out.astype(f32), out.astype(f32)
    d_v = jnp.einsum("glm,glh->gmh", weights, d_out)
    d_weights = jnp.einsum("glh,gmh->glm", d_out, v, preferred_element_type=f32)
    row = (d_out * out).sum(-1, keepdims=True)
    d_scores = weights * (d_weights - row) * _scale(q)
    d_q = jnp.einsum("glm,gmh->glh", d_scores, k, preferred_element_type=f32)
    d_k = jnp.einsum("glm,glh->gmh", d_scores, q, preferred_element_type=f32)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q: Array, k: Array, v: Array, block_bytes: int) -> Array:
    return _attention_forward(q, k, v, block_bytes)[0]


def _attention_forward(q, k, v, block_bytes):
    b, length, n, _ = q.shape
    blocks = num_blocks(b * n, length, block_bytes)
    q_b, k_b, v_b = (_to_blocks(x, blocks) for x in (q, k, v))
    out_b, lse_b = jax.lax.map(lambda xs: _forward_block(*xs), (q_b, k_b, v_b))
    return _from_blocks(out_b, q.shape), (q_b, k_b, v_b, out_b, lse_b)


def _attention_backward(block_bytes, residuals, d_out):
    del block_bytes  # the residuals are already in blocks
    q_b, k_b, v_b, out_b, lse_b = residuals
    d_out_b = _to_blocks(d_out, q_b.shape[0])
    grads = jax.lax.map(lambda xs: _backward_block(*xs), (q_b, k_b, v_b, out_b, lse_b, d_out_b))
    return tuple(_from_blocks(g, d_out.shape) for g in grads)


_attention.defvjp(_attention_forward, _attention_backward)


def blockwise_attention(q: Array, k: Array, v: Array, block_bytes: int = BLOCK_BYTES) -> Array:
    """softmax(q k^T / sqrt(H)) v of (B, L, N, H) ``q, k, v`` -> (B, L, N, H) in ``v``'s
    dtype, a block of (batch, head) pairs at a time (``num_blocks``; module docstring)."""
    return _attention(q, k, v, block_bytes)
