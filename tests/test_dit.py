"""Tests of the DFM-DiT (dfm_jax.models.dit): shapes, init, masking, precision, FLOPs,
parameter counts, config validation and sharding annotations (PyTorch parity with the
official DFM-SiT: test_dfm_sit.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from dfm_jax import parallel
from dfm_jax.models import dit, layers
from dfm_jax.models.dit import DiT, DiTConfig, count_params, dit_config, forward_flops

C = 3  # channels of the toy scales


def tiny(**overrides) -> DiTConfig:
    kw = dict(depth=1, width=32, num_heads=4, patch_sizes=(1, 2), in_channels=C, num_classes=10)
    kw.update(overrides)
    return DiTConfig(**kw)


def make_inputs(cfg, sizes, batch=2, frames=None, mask=None, seed=0):
    """Random scales (B, [T], r, r, C), t (B, S), mask (B, S) and labels (B,).

    numpy random numbers: eager jax.random would compile a kernel per shape.
    """
    rng = np.random.default_rng(seed)
    lead = (batch,) if frames is None else (batch, frames)
    scales = tuple(
        rng.standard_normal((*lead, r, r, cfg.in_channels)).astype(np.float32) for r in sizes
    )
    t = rng.uniform(size=(batch, len(sizes))).astype(np.float32)
    if mask is None:
        mask = np.ones((batch, len(sizes)), bool)
    labels = rng.integers(0, cfg.num_classes + 1, size=(batch,)).astype(np.int32)
    return scales, t, np.asarray(mask), labels


def init_variables(cfg, inputs, seed=0):
    """Real initialisation (boxed), jitted, with the cheap-to-compile "rbg" RNG."""
    return jax.jit(DiT(cfg).init)(jax.random.key(seed, impl="rbg"), *inputs)


def random_params(cfg, inputs, seed=1, std=0.1):
    """Non-zero parameters everywhere (no zero heads), from the abstract tree, in numpy."""
    abstract = nn.unbox(jax.eval_shape(DiT(cfg).init, jax.random.key(0), *inputs)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: (std * rng.standard_normal(a.shape)).astype(a.dtype), abstract
    )


def apply_fn(cfg):
    return jax.jit(lambda p, *a: DiT(cfg).apply({"params": p}, *a))


# ----------------------------------------------------------------------------
# Shapes and initialisation
# ----------------------------------------------------------------------------

SHAPE_CASES = [
    # (patch sizes, sizes, frames, positions, extra config)
    ((2,), (16,), None, "rope", {}),
    ((1, 2), (8, 16), None, "rope", {}),
    ((1, 2), (8, 16), None, "sincos", {}),
    ((1, 2, 4), (4, 8, 16), None, "rope", {}),
    (
        (1, 2, 4),
        (4, 8, 16),
        None,
        "sincos",
        {"preconditioning": True, "scale_stds": (1.0, 0.5, 0.25)},
    ),
    ((1, 2), (4, 8), 3, "rope", {}),
    ((1, 2), (4, 8), 3, "sincos", {}),
]


@pytest.mark.parametrize("patches,sizes,frames,positions,extra", SHAPE_CASES)
def test_output_shapes(patches, sizes, frames, positions, extra):
    cfg = tiny(patch_sizes=patches, positions=positions, **extra)
    mask = np.ones((2, len(sizes)), bool)
    mask[1, 1:] = False  # the second example only has its coarsest scale active
    inputs = make_inputs(cfg, sizes, frames=frames, mask=mask)
    out = apply_fn(cfg)(random_params(cfg, inputs), *inputs)
    assert isinstance(out, tuple) and len(out) == len(sizes)
    for o, x in zip(out, inputs[0]):
        assert o.shape == x.shape
        assert o.dtype == jnp.float32
        assert np.all(np.isfinite(o)) and np.abs(o).max() > 0


@pytest.mark.parametrize(
    "patches,sizes,frames,extra",
    [
        ((1, 2, 4), (4, 8, 16), None, {}),
        (
            (1, 2),
            (4, 8),
            2,
            {"positions": "sincos", "preconditioning": True, "scale_stds": (1.0, 0.5)},
        ),
    ],
)
def test_zero_output_and_initialisation(patches, sizes, frames, extra):
    cfg = tiny(patch_sizes=patches, **extra)
    inputs = make_inputs(cfg, sizes, frames=frames)
    boxed = init_variables(cfg, inputs)["params"]
    params = nn.unbox(boxed)
    out = apply_fn(cfg)(params, *inputs)
    for o in out:
        assert np.all(np.asarray(o) == 0.0), "zero-initialised heads must give exactly 0"
    for s, p in enumerate(patches):
        assert params[f"x_embedder_{s}"]["proj"]["kernel"].shape == (p * p * C, 32)
        assert params[f"final_layer_{s}"]["linear"]["kernel"].shape == (32, p * p * C)
        assert params[f"t_embedder_{s}"]["mlp_0"]["kernel"].shape == (256, 32)
        assert not np.any(params[f"final_layer_{s}"]["linear"]["kernel"])
        assert not np.any(params[f"final_layer_{s}"]["adaLN_modulation"]["kernel"])
        assert np.std(params[f"t_embedder_{s}"]["mlp_0"]["kernel"]) == pytest.approx(0.02, rel=0.1)
    assert params["y_embedder"]["embedding_table"].shape == (11, 32)
    assert params["stage_embedder"]["embedding_table"].shape == (len(patches), 32)
    blk = params["blocks_0"]
    assert blk["attn"]["qkv"]["kernel"].shape == (32, 3, 4, 8)
    assert blk["attn"]["proj"]["kernel"].shape == (4, 8, 32)
    # Every parameter is boxed with one logical name per axis.
    specs = nn.get_partition_spec(boxed)
    assert specs["blocks_0"]["attn"]["qkv"]["kernel"] == jax.sharding.PartitionSpec(
        "embed", None, "heads", "kv"
    )
    assert specs["y_embedder"]["embedding_table"] == jax.sharding.PartitionSpec("classes", "embed")
    for leaf in jax.tree_util.tree_leaves(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    ):
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == leaf.value.ndim


# ----------------------------------------------------------------------------
# Masking, equivariance, precision
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "positions,patches,sizes,mask,extra",
    [
        ("rope", (1, 2), (4, 8), [[1, 0], [1, 1]], {}),
        (
            "sincos",
            (1, 2, 4),
            (2, 4, 8),
            [[1, 0, 0], [1, 1, 0]],
            {"preconditioning": True, "scale_stds": (0.8, 0.4, 0.2)},
        ),
    ],
)
def test_masked_scale_gets_zero_gradient(positions, patches, sizes, mask, extra):
    cfg = tiny(patch_sizes=patches, positions=positions, in_channels=2, **extra)
    scales, t, mask, labels = make_inputs(cfg, sizes, mask=np.array(mask, bool))
    params = random_params(cfg, (scales, t, mask, labels))
    model = DiT(cfg)

    def flat_out(xs):
        out = model.apply({"params": params}, xs, t, mask, labels)
        return jnp.concatenate([o.reshape(-1) for o in out])

    jac = jax.jit(jax.jacrev(flat_out))(scales)  # tuple over scales: (n_out, B, H, W, C)
    m = np.asarray(mask)
    for s in range(len(sizes)):
        for b in range(m.shape[0]):
            block = np.asarray(jac[s][:, b])
            if m[b, s]:
                assert np.abs(block).max() > 0, f"active scale {s} of example {b} is ignored"
            else:
                assert np.all(block == 0.0), f"masked scale {s} of example {b} leaks"


def test_batch_permutation_equivariance():
    cfg = tiny(patch_sizes=(1, 2))
    mask = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], bool)
    inputs = make_inputs(cfg, (4, 8), batch=4, mask=mask)
    params = random_params(cfg, inputs)
    f = apply_fn(cfg)
    out = f(params, *inputs)
    perm = np.array([2, 0, 3, 1])
    scales, t, m, labels = inputs
    out_p = f(params, tuple(x[perm] for x in scales), t[perm], m[perm], labels[perm])
    for a, b in zip(out_p, out):
        np.testing.assert_allclose(a, b[perm], rtol=1e-5, atol=1e-6)
    # Sanity: examples do differ, so the check is not vacuous.
    assert np.abs(out[0][0] - out[0][1]).max() > 1e-3


def test_stage_embedding_follows_mask():
    # Scale 2 input is zero either way, so masking it only changes the stage index.
    mask = np.array([[1, 1], [1, 0]], bool)
    for stage_embedding in (True, False):
        cfg = tiny(patch_sizes=(1, 2), stage_embedding=stage_embedding)
        scales, t, _, labels = make_inputs(cfg, (4, 8), batch=2)
        scales = (np.stack([scales[0][0]] * 2), np.zeros_like(scales[1]))
        t = np.stack([t[0]] * 2)
        labels = np.stack([labels[0]] * 2)
        out = apply_fn(cfg)(random_params(cfg, (scales, t, mask, labels)), scales, t, mask, labels)
        diff = max(float(np.abs(o[0] - o[1]).max()) for o in out)
        if stage_embedding:
            assert diff > 1e-3
        else:
            assert diff == 0.0


def test_preconditioning_scales_inputs_and_outputs():
    stds = (0.7, 0.3)
    pc = tiny(patch_sizes=(1, 2), preconditioning=True, scale_stds=stds)
    plain = tiny(patch_sizes=(1, 2))
    scales, t, mask, labels = make_inputs(plain, (4, 8))
    params = random_params(plain, (scales, t, mask, labels))
    out = apply_fn(pc)(params, scales, t, mask, labels)
    c_in = [1 / np.sqrt(t[:, s] ** 2 * v**2 + (1 - t[:, s]) ** 2) for s, v in enumerate(stds)]
    pre = tuple(x * c[:, None, None, None] for x, c in zip(scales, c_in))
    ref = apply_fn(plain)(params, pre, t, mask, labels)
    for o, r, v in zip(out, ref, stds):
        np.testing.assert_allclose(o, np.sqrt(v**2 + 1) * r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positions", ["rope", "sincos"])
def test_bfloat16_forward_close_to_float32(positions):
    cfg32 = tiny(patch_sizes=(1, 2), positions=positions, depth=2)
    cfg16 = tiny(patch_sizes=(1, 2), positions=positions, depth=2, dtype="bfloat16")
    assert cfg16.dtype == "bfloat16" and cfg16.param_dtype == "float32"
    inputs = make_inputs(cfg32, (8, 16))
    params = random_params(cfg32, inputs)
    out32 = apply_fn(cfg32)(params, *inputs)
    out16 = apply_fn(cfg16)(params, *inputs)
    for a, b in zip(out16, out32):
        assert a.dtype == jnp.float32
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        # bfloat16 has an 8-bit mantissa (~0.4 % per rounding): a few % end to end.
        assert rel < 0.05, rel
        assert rel > 1e-5, "bfloat16 config did not change the computation"


# ----------------------------------------------------------------------------
# FLOPs and parameter counts
# ----------------------------------------------------------------------------


def _xla_flops(cfg, shapes):
    model = DiT(cfg)
    inputs = dit.dummy_inputs(cfg, shapes, batch_size=1)
    params = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    cost = jax.jit(model.apply).lower(params, *inputs).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


@pytest.mark.parametrize(
    "positions,patches,shapes",
    [
        ("rope", (1, 2), [(8, 8, 4), (16, 16, 4)]),
        ("sincos", (1, 2), [(2, 4, 4, 4), (2, 8, 8, 4)]),
    ],
)
def test_forward_flops_match_xla_cost_analysis(positions, patches, shapes):
    # Width 128 so that the uncounted elementwise work stays below a few percent.
    cfg = DiTConfig(
        depth=2,
        width=128,
        num_heads=4,
        patch_sizes=patches,
        in_channels=4,
        num_classes=10,
        positions=positions,
    )
    analytic = forward_flops(cfg, shapes)
    xla = _xla_flops(cfg, shapes)
    assert abs(xla - analytic) / xla < 0.05, (analytic, xla)


def test_forward_flops_formula_xl():
    # DiT-XL/2 at 256 tokens: the DiT paper's 118.6 GFLOPs count multiply-adds as
    # one FLOP, i.e. ~237 G in 2 x MAC units (their count includes 4->8 out channels).
    cfg = dit_config("XL/2", in_channels=4, num_classes=1000)
    flops = forward_flops(cfg, [(32, 32, 4)])
    assert flops / 2 == pytest.approx(118.6e9, rel=0.01)


# Exact counts of our DiT-XL/2 at 16-channel 64x64 latents (see test below).
XL_FM_PARAMS = 674_928_064
XL_DFM_PARAMS = 679_248_080


def test_param_count_xl_dfm_vs_fm():
    fm = dit_config("XL/2", in_channels=16, num_classes=1000)
    dfm = dit_config("XL/2", patch_sizes=(1, 2), in_channels=16, num_classes=1000)
    n_fm, n_dfm = count_params(fm), count_params(dfm)
    # Paper Table 2: 712.12 M vs 716.48 M, a DFM overhead of 4.36 M.
    assert 4.3e6 <= n_dfm - n_fm <= 4.4e6, (n_fm, n_dfm)
    assert (n_fm, n_dfm) == (XL_FM_PARAMS, XL_DFM_PARAMS)
    d = 1152
    extra = (
        (16 * d + d)  # 1x1 patch embedder
        + (256 * d + d + d * d + d)  # timestep embedder
        + (d * 2 * d + 2 * d + d * 16 + 16)  # final layer with 1x1 patches
        + d  # one more stage-table row
    )
    assert n_dfm - n_fm == extra
    # Positions are not parameters: the count does not depend on the grid or kind.
    assert count_params(dataclasses.replace(fm, positions="sincos")) == n_fm


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes,frames,match",
    [
        ((8, 8), None, "different token grids"),
        ((8, 15), None, "not divisible"),
        ((8,), None, "1 scales given"),
    ],
)
def test_bad_scale_shapes_raise(sizes, frames, match):
    cfg = tiny(patch_sizes=(1, 2))
    inputs = make_inputs(cfg, sizes, frames=frames)
    with pytest.raises(ValueError, match=match) as err:
        DiT(cfg).init(jax.random.key(0), *inputs)
    assert "patch sizes (1, 2)" in str(err.value)


def test_bad_inputs_raise():
    cfg = tiny(patch_sizes=(1, 2))
    scales, t, mask, labels = make_inputs(cfg, (4, 8))
    model = DiT(cfg)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="channels"):
        model.init(key, (scales[0][..., :2], scales[1][..., :2]), t, mask, labels)
    with pytest.raises(ValueError, match="every scale must be"):
        model.init(key, (scales[0], scales[1][:, None]), t, mask, labels)
    with pytest.raises(ValueError, match="different token grids"):
        video = (jnp.zeros((2, 2, 4, 4, C)), jnp.zeros((2, 3, 8, 8, C)))
        model.init(key, video, t, mask, labels)
    with pytest.raises(ValueError, match="t and mask"):
        model.init(key, scales, t[:, :1], mask, labels)
    with pytest.raises(ValueError, match="labels"):
        model.init(key, scales, t, mask, labels[:1])
    with pytest.raises(ValueError, match="width divisible by 16"):
        cfg_v = tiny(width=40, num_heads=4, positions="sincos")
        DiT(cfg_v).init(key, tuple(x[:, None] for x in scales), t, mask, labels)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"width": 30, "num_heads": 4}, "not divisible by num_heads"),
        ({"positions": "alibi"}, "positions must be one of"),
        ({"attention_impl": "flash"}, "attention_impl"),
        ({"attention_impl": "cudnn"}, "needs dtype bfloat16"),
        ({"preconditioning": True}, "needs scale_stds"),
        ({"scale_stds": (1.0,)}, "scale_stds has 1 entries"),
        ({"scale_stds": (1.0, -1.0)}, "positive"),
        ({"patch_sizes": ()}, "at least one scale"),
        ({"patch_sizes": (1, 0)}, "positive integers"),
        ({"depth": 0}, "depth"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"dtype": "notadtype"}, "unknown dtype"),
        ({"width": 36, "num_heads": 4}, "even head dimension"),
        ({"width": 18, "num_heads": 2, "positions": "sincos"}, "divisible by 4"),
        ({"remat": True, "remat_policy": "nope"}, "remat_policy"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_dit_config_names():
    cfg = dit_config("XL", patch_sizes=[1, 2], in_channels=16, num_classes=1000)
    assert (cfg.depth, cfg.width, cfg.num_heads, cfg.patch_sizes) == (28, 1152, 16, (1, 2))
    assert dit_config("B/4", in_channels=4, num_classes=10).patch_sizes == (4,)
    s = dit_config("S/2", patch_sizes=(1, 2), in_channels=4, num_classes=10, depth=3)
    assert (s.depth, s.width, s.num_heads) == (3, 384, 6)
    assert hash(s) == hash(
        dit_config("S/2", patch_sizes=(1, 2), in_channels=4, num_classes=10, depth=3)
    )
    with pytest.raises(ValueError, match="unknown DiT size"):
        dit_config("XXL", patch_sizes=(2,), in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match="finest patch size 2"):
        dit_config("XL/2", patch_sizes=(1, 4), in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match="pass patch_sizes"):
        dit_config("XL", in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match="bad patch suffix"):
        dit_config("XL/x", in_channels=4, num_classes=10)


# ----------------------------------------------------------------------------
# Sharding annotations and remat
# ----------------------------------------------------------------------------


def test_sharded_apply_with_logical_rules_matches_unsharded(capfd):
    """Forward and gradients on a {data: 2, fsdp: 2, model: 2} mesh equal the unsharded
    ones, and XLA partitions every op without replicating it first (its "Involuntary full
    rematerialization" warning, which a lookup from an FSDP-split embedding table gave).

    Batch 4 over data x fsdp = 4 shards leaves one example per shard, the case that
    triggers an XLA SPMD miscompile unless the adaLN vectors are replicated.
    """
    cfg = tiny(patch_sizes=(1, 2), remat=True)
    inputs = make_inputs(cfg, (4, 8), batch=4, mask=np.array([[1, 1], [1, 0]] * 2, bool))
    model = DiT(cfg)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "model"))
    rules = parallel.DEFAULT_RULES
    specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), *inputs))
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    host_params = random_params(cfg, inputs)

    def loss(p):
        return sum(jnp.sum(o**2) for o in model.apply({"params": p}, *inputs))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        variables = jax.jit(model.init, out_shardings=shardings)(
            jax.random.key(0, impl="rbg"), *inputs
        )
        qkv = variables["params"]["blocks_0"]["attn"]["qkv"]["kernel"]
        assert isinstance(qkv.value.sharding, NamedSharding)
        assert qkv.value.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "model", None)
        params = jax.device_put(host_params, nn.unbox(shardings["params"]))
        fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
        # The activation annotations become sharding constraints under the mesh.
        assert "sharding_constraint" in fwd.lower(params, *inputs).as_text()
        out = fwd(params, *inputs)
        # Gradients through the rematerialised blocks under the mesh.
        grads = jax.jit(jax.grad(loss))(params)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    ref = apply_fn(cfg)(host_params, *inputs)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    ref_grads = jax.jit(jax.grad(loss))(host_params)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_stage_embedding_row_is_the_number_of_active_scales_minus_one():
    """Rows set to known vectors: an example at stage k reads row k - 1 and no other row."""
    cfg = tiny(patch_sizes=(1, 2))
    mask = np.array([[1, 0], [1, 1]], bool)  # stage 1, stage 2
    inputs = make_inputs(cfg, (4, 8), batch=2, mask=mask)
    params = random_params(cfg, inputs)
    apply = apply_fn(cfg)

    def with_rows(row0, row1):
        table = np.stack([row0, row1]).astype(np.float32)
        return apply({**params, "stage_embedder": {"embedding_table": table}}, *inputs)

    rng = np.random.default_rng(5)
    a, b, other = (rng.standard_normal(32) for _ in range(3))
    base = with_rows(a, b)

    def changed(out, example):
        return max(float(np.abs(o[example] - r[example]).max()) for o, r in zip(out, base))

    row0_changed = with_rows(other, b)
    row1_changed = with_rows(a, other)
    assert changed(row0_changed, 0) > 1e-3 and changed(row1_changed, 0) == 0.0  # stage 1
    assert changed(row1_changed, 1) > 1e-3 and changed(row0_changed, 1) == 0.0  # stage 2


# ----------------------------------------------------------------------------
# Temporal patches (scales of a temporal pyramid have fewer frames)
# ----------------------------------------------------------------------------


def test_temporal_patches_cut_contiguous_3d_blocks_and_give_equal_grids():
    """Scale (T_s, H_s, W_s) with patches (pt, p, p): grid (T_s/pt, H_s/p, W_s/p); every
    token holds exactly one contiguous pt x p x p block, and the heads invert it."""
    cfg = tiny(temporal_patch_sizes=(1, 2))
    assert dit.token_grid(cfg, [(2, 4, 4, C), (4, 8, 8, C)]) == (2, 4, 4)
    x = np.arange(1 * 4 * 4 * 6 * C, dtype=np.float32).reshape(1, 4, 4, 6, C)
    tokens = np.asarray(layers.patchify(dit._fold_time(jnp.asarray(x), 2), 2))
    assert tokens.shape == (1, 2 * 2 * 3, 2 * 2 * 2 * C)
    blocks = x.reshape(1, 2, 2, 2, 2, 3, 2, C).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    np.testing.assert_array_equal(
        np.sort(tokens, axis=-1), np.sort(blocks.reshape(1, 12, -1), axis=-1)
    )
    np.testing.assert_array_equal(dit._unfold_time(dit._fold_time(jnp.asarray(x), 2), 2), x)
    inputs = (
        (np.ones((2, 2, 4, 4, C), np.float32), np.ones((2, 4, 8, 8, C), np.float32)),
        *make_inputs(cfg, (4, 8))[1:],
    )
    out = apply_fn(cfg)(random_params(cfg, inputs), *inputs)
    assert [o.shape for o in out] == [(2, 2, 4, 4, C), (2, 4, 8, 8, C)]
    with pytest.raises(ValueError, match="temporal patch size 2"):
        dit.token_grid(cfg, [(2, 4, 4, C), (3, 8, 8, C)])
    with pytest.raises(ValueError, match="temporal patch size 2"):
        dit.token_grid(cfg, [(4, 4, C), (8, 8, C)])
    with pytest.raises(ValueError, match="different token grids"):
        dit.token_grid(cfg, [(4, 4, 4, C), (4, 8, 8, C)])
    with pytest.raises(ValueError, match="temporal_patch_sizes"):
        tiny(temporal_patch_sizes=(1,))
