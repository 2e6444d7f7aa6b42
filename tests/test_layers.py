"""Tests of the DiT building blocks (dfm_jax.models.layers)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import numpy_attention

from dfm_jax.models import layers
from dfm_jax.peers.torch_dfm_sit import mae_2d_sincos


def test_timestep_embedding_matches_dit_formula():
    t = np.array([0.0, 0.25, 1.0], np.float32)
    emb = np.asarray(layers.timestep_embedding(t, 256))
    half = 128
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t[:, None] * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)
    # Cosines first: t = 0 gives ones then zeros.
    np.testing.assert_array_equal(emb[0], np.r_[np.ones(half), np.zeros(half)])
    assert layers.timestep_embedding(t, 7).shape == (3, 7)


def test_2d_sincos_matches_mae_layout():
    np.testing.assert_allclose(layers.get_2d_sincos_pos_embed(32, 5, 5), mae_2d_sincos(32, 5))
    # Non-square grid: first half depends on the column only, second on the row only.
    emb = layers.get_2d_sincos_pos_embed(16, 3, 4).reshape(3, 4, 16)
    np.testing.assert_allclose(emb[0, :, :8], emb[2, :, :8])
    np.testing.assert_allclose(emb[:, 0, 8:], emb[:, 3, 8:])
    assert not np.allclose(emb[0, 0], emb[0, 1])
    assert not np.allclose(emb[0, 0], emb[1, 0])


def test_3d_sincos_layout():
    d, t, h, w = 32, 3, 2, 4
    emb = layers.get_3d_sincos_pos_embed(d, t, h, w).reshape(t, h * w, d)
    spatial = layers.get_2d_sincos_pos_embed(3 * d // 4, h, w)
    temporal = layers.get_1d_sincos_pos_embed(d // 4, np.arange(t))
    for f in range(t):
        np.testing.assert_allclose(emb[f, :, d // 4 :], spatial)
        np.testing.assert_allclose(
            emb[f, :, : d // 4], np.broadcast_to(temporal[f], (h * w, d // 4))
        )
    with pytest.raises(ValueError, match="divisible by 16"):
        layers.get_3d_sincos_pos_embed(24, 1, 2, 2)


@pytest.mark.parametrize(
    "head_dim,axes,expected",
    [
        (8, 2, (2, 2)),
        (72, 2, (18, 18)),
        (72, 3, (12, 12, 12)),
        (16, 3, (4, 2, 2)),
        (10, 2, (2, 3)),
        (8, 1, (4,)),
    ],
)
def test_rope_pairs_per_axis(head_dim, axes, expected):
    assert layers.rope_pairs_per_axis(head_dim, axes) == expected


def test_rope_pairs_errors():
    with pytest.raises(ValueError, match="even"):
        layers.rope_pairs_per_axis(7, 2)
    with pytest.raises(ValueError, match=">= 6"):
        layers.rope_pairs_per_axis(4, 3)


@pytest.mark.parametrize("grid", [(4, 5), (2, 3, 3)])
def test_rope_scores_depend_only_on_relative_position(grid):
    head_dim = 24
    rng = np.random.default_rng(0)
    coords = layers.grid_coordinates(grid)
    n = len(coords)
    q = rng.standard_normal((1, n, 2, head_dim)).astype(np.float32)
    k = rng.standard_normal((1, n, 2, head_dim)).astype(np.float32)
    # The same feature vector at every position: scores must depend on offsets only.
    q[:] = q[:, :1]
    k[:] = k[:, :1]

    def scores(c):
        cos, sin = layers.rope_angles(c, head_dim)
        qr, kr = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        return np.einsum("blnh,bmnh->bnlm", np.asarray(qr), np.asarray(kr))

    base = scores(coords)
    shifted = scores(coords + np.array([3] * len(grid)))
    np.testing.assert_allclose(base, shifted, rtol=1e-4, atol=1e-4)
    # ... and they do depend on the offset along every axis.
    for a in range(len(grid)):
        other = coords.copy()
        other[:, a] *= 2
        assert not np.allclose(scores(other), base, atol=1e-3)
    # Rotations preserve norms; position 0 is the identity.
    cos, sin = layers.rope_angles(coords, head_dim)
    qr = np.asarray(layers.apply_rope(q, cos, sin))
    np.testing.assert_allclose(np.linalg.norm(qr, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(qr[:, 0], q[:, 0], rtol=1e-6)


def test_grid_coordinates_order():
    c = layers.grid_coordinates((2, 2, 3))
    assert c.shape == (12, 3)
    np.testing.assert_array_equal(c[:4], [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0]])
    np.testing.assert_array_equal(c[6], [1, 0, 0])


@pytest.mark.parametrize("shape", [(2, 8, 12, 3), (2, 3, 8, 12, 3)])
def test_patchify_roundtrip_and_conv_equivalence(shape):
    p = 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    tokens = layers.patchify(jnp.asarray(x), p)
    grid = (*shape[1:-3], shape[-3] // p, shape[-2] // p)
    assert tokens.shape == (2, math.prod(grid), p * p * 3)
    np.testing.assert_array_equal(layers.unpatchify(tokens, p, grid, 3), x)
    # A Dense over the flattened patch equals a Conv (HWIO kernel, stride p) per frame.
    kernel = rng.standard_normal((p, p, 3, 5)).astype(np.float32)
    frames = x.reshape(-1, *shape[-3:])
    conv = jax.lax.conv_general_dilated(
        frames,
        kernel,
        (p, p),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest",
    )
    dense = np.asarray(tokens) @ kernel.reshape(p * p * 3, 5)
    np.testing.assert_allclose(
        dense.reshape(-1), np.asarray(conv).reshape(-1), rtol=1e-4, atol=1e-4
    )


def test_logical_dense_kernel_layout_and_init():
    x = jnp.ones((2, 5, 16))
    mod = layers.logical_dense(
        (3, 4, 2),
        ("embed", None, "heads", "kv"),
        name="qkv",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )
    variables = mod.init(jax.random.key(0), x)
    kernel = variables["params"]["kernel"]
    assert kernel.names == ("embed", None, "heads", "kv")
    assert kernel.value.shape == (16, 3, 4, 2)
    assert variables["params"]["bias"].names == (None, "heads", "kv")
    # Xavier-uniform with the fans of the flattened (16, 24) matrix.
    bound = math.sqrt(6 / (16 + 24))
    values = np.asarray(kernel.value).ravel()  # 384 draws of U(-bound, bound)
    assert float(np.abs(values).max()) <= bound
    # U(-b, b): mean 0, std b / sqrt(3), and it fills the interval (a zero, constant or
    # differently scaled init fails).
    assert abs(values.mean()) < 4 * bound / math.sqrt(3 * values.size)
    np.testing.assert_allclose(values.std(), bound / math.sqrt(3), rtol=0.1)
    assert values.min() < -0.9 * bound and values.max() > 0.9 * bound
    np.testing.assert_array_equal(variables["params"]["bias"].value, 0.0)
    y = mod.apply(variables, x)
    np.testing.assert_allclose(
        y, jnp.einsum("bld,dcnh->blcnh", x, kernel.value), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="logical names"):
        layers.logical_dense(
            4, ("embed",), name="d", dtype=jnp.float32, param_dtype=jnp.float32
        ).init(jax.random.key(0), x)


def test_rope_angles_are_the_axial_formula():
    """Pair i of an axis with n pairs turns by coord * theta^(-i / n), written out by hand."""
    coords = np.array([[0, 0], [1, 2], [3, 5], [7, 1]])
    head_dim, theta = 16, 100.0  # 8 pairs: 4 for rows, 4 for columns
    cos, sin = layers.rope_angles(coords, head_dim, theta)
    assert cos.shape == sin.shape == (4, 8)
    for row, (h, w) in enumerate(coords):
        angles = [h * theta ** (-i / 4) for i in range(4)] + [
            w * theta ** (-i / 4) for i in range(4)
        ]
        np.testing.assert_allclose(cos[row], np.cos(angles), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(sin[row], np.sin(angles), rtol=1e-6, atol=1e-7)
    # 3-D (t, h, w) with head_dim 12: 6 pairs as (2, 2, 2).
    cos, _ = layers.rope_angles(np.array([[2, 3, 4]]), 12, theta)
    expected = [c * theta ** (-i / 2) for c in (2, 3, 4) for i in range(2)]
    np.testing.assert_allclose(cos[0], np.cos(expected), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("implementation", ["blockwise", "einsum", "xla", None])
def test_attention_implementations_match_numpy(implementation):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (2, 7, 3, 8)) * 2 for key in keys)  # L 7, N 3, H 8
    out = layers.attend(q, k, v, implementation)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v), atol=2e-6)


def test_einsum_attention_in_bfloat16_keeps_float32_scores():
    """bf16 q, k, v: within bf16 rounding of the float64 result (a bf16 softmax would not
    be, for scores this large) and a bf16 output."""
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (2, 16, 2, 16)) * 3 for key in keys)
    out = layers.einsum_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    exact = numpy_attention(*(np.asarray(x.astype(jnp.bfloat16), np.float32) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, atol=0.04)
