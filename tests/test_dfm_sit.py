"""Tests of the official DFM-SiT importer (dfm_jax.weights.dfm_sit) and ``eval --init``.

The reference is ``dfm_jax.peers.torch_dfm_sit``: a PyTorch re-implementation of the authors'
``DFMSiT`` with the official state-dict layout and its Euler sampler, in the SiT
convention (``t_code = 1 - t``, output ``-v``). Its random state dict (tiny widths)
is imported; our DiT, driven in the paper convention, must give
``velocity(x, t) == -reference(x, 1 - t)``, and our sampler the official trajectory.
"""

from __future__ import annotations

import argparse
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import train_utils  # noqa: E402

from dfm_jax import config as config_lib  # noqa: E402
from dfm_jax.evaluation import runner  # noqa: E402
from dfm_jax.evaluation.features import FeatureExtractor  # noqa: E402
from dfm_jax.evaluation.point import class_balanced_labels  # noqa: E402
from dfm_jax.method import generation as generate_lib  # noqa: E402
from dfm_jax.method import sampling  # noqa: E402
from dfm_jax.models import dit  # noqa: E402
from dfm_jax.models.dit import DiT, DiTConfig  # noqa: E402
from dfm_jax.peers import torch_dfm_sit as reference_lib  # noqa: E402
from dfm_jax.training import setup as setup_lib  # noqa: E402
from dfm_jax.utils.viz import to_uint8  # noqa: E402
from dfm_jax.weights import dfm_sit, files  # noqa: E402

WIDTH, HEADS, DEPTH, PATCHES, C, CLASSES = 64, 4, 2, (1, 2), 4, 10
SIZES = (8, 16)  # scale sides: an 8x8 token grid
ATOL = 1e-5


def model_config(**overrides) -> DiTConfig:
    kw = dict(
        depth=DEPTH,
        width=WIDTH,
        num_heads=HEADS,
        patch_sizes=PATCHES,
        in_channels=C,
        num_classes=CLASSES,
        positions="sincos",
        stage_embedding=False,
    )
    kw.update(overrides)
    return DiTConfig(**kw)


def make_reference(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(
        width=WIDTH,
        heads=HEADS,
        depth=DEPTH,
        patch_sizes=PATCHES,
        channels=C,
        num_classes=CLASSES,
        input_size=SIZES[-1],
    )
    kw.update(overrides)
    return reference_lib.DFMSiTReference(**kw).eval()


def state_dict(module) -> dict[str, np.ndarray]:
    return files.tensors_to_numpy(module.state_dict(), "reference")


@pytest.fixture(scope="module")
def reference():
    ref = make_reference()
    return ref, state_dict(ref)


@pytest.fixture(scope="module")
def apply_fn():
    cfg = model_config()
    return jax.jit(lambda p, *a: DiT(cfg).apply({"params": p}, *a))


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def official_velocity(ref, scales, t, labels, drop_mask):
    """The reference in the paper convention: ``-G(x, 1 - t)``, one mask for the batch."""
    with torch.no_grad():
        out = ref(
            {s: nchw(x) for s, x in enumerate(scales)},
            torch.from_numpy(1.0 - np.asarray(t, np.float32)),
            torch.from_numpy(np.asarray(labels, np.int64)),
            torch.tensor(drop_mask, dtype=torch.bool),
        )
    return [-nhwc(out[s]) for s in range(len(scales))]


# --------------------------------------------------------------------------- #
# Velocity parity
# --------------------------------------------------------------------------- #


def test_imported_velocity_matches_official_forward(reference, apply_fn):
    """Mixed per-example masks (stage 1 only / both), labels including the null class."""
    ref, sd = reference
    params = dfm_sit.params_from_state_dict(sd, model_config(), grid=(8, 8))
    rng = np.random.default_rng(0)
    batch = 6
    scales = tuple(rng.standard_normal((batch, r, r, C)).astype(np.float32) for r in SIZES)
    t = rng.uniform(size=(batch, 2)).astype(np.float32)
    masks = np.array([[1, 0], [1, 1]] * 3, bool)
    t[~masks] = 0.0  # waiting stages sit at paper t = 0 (official t_code = 1)
    labels = np.array([0, CLASSES, 3, 9, CLASSES, 5], np.int32)
    out = [np.asarray(o) for o in apply_fn(params, scales, t, masks, labels)]
    worst = 0.0
    for mask in ([1, 0], [1, 1]):
        rows = np.all(masks == np.array(mask, bool), axis=1)
        expected = official_velocity(ref, [x[rows] for x in scales], t[rows], labels[rows], mask)
        for s in range(2):
            assert np.abs(expected[s]).max() > 0.1  # non-trivial outputs
            np.testing.assert_allclose(out[s][rows], expected[s], rtol=0, atol=ATOL)
            worst = max(worst, float(np.abs(out[s][rows] - expected[s]).max()))
    print(f"max |ours - official| = {worst:.2e}")
    # The masked fine scale really is ignored: changing it does not change anything.
    noisy = (scales[0], scales[1] + 1.0)
    out2 = apply_fn(params, noisy, t, masks, labels)
    coarse_only = ~masks[:, 1]
    np.testing.assert_array_equal(np.asarray(out2[0])[coarse_only], out[0][coarse_only])


def test_convention_conversion_is_one_exact_involution(reference, apply_fn):
    _, sd = reference
    cfg = model_config()
    paper = dfm_sit.params_from_state_dict(sd, cfg)
    sit = dfm_sit.sit_to_paper_convention(paper, cfg)  # back to the official weights
    leaves_back = jax.tree.leaves(dfm_sit.sit_to_paper_convention(sit, cfg))
    for a, b in zip(leaves_back, jax.tree.leaves(paper), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # Only the first timestep kernels and the output heads differ from the raw mapping.
    assert np.array_equal(sit["blocks_0"]["mlp"]["fc1"]["kernel"], sd["blocks.0.mlp.fc1.weight"].T)
    np.testing.assert_allclose(
        sit["t_embedder_1"]["mlp_0"]["kernel"],
        sd["t_embedder.embedders.1.mlp.0.weight"].T,
        rtol=0,
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        sit["final_layer_0"]["linear"]["bias"], sd["final_layer.projections.0.linear.bias"]
    )
    # The raw network at 1 - t is minus the converted one at t (no PyTorch involved).
    rng = np.random.default_rng(1)
    scales = tuple(rng.standard_normal((2, r, r, C)).astype(np.float32) for r in SIZES)
    t = rng.uniform(size=(2, 2)).astype(np.float32)
    mask = np.ones((2, 2), bool)
    labels = np.array([1, 2], np.int32)
    ours = apply_fn(paper, scales, t, mask, labels)
    raw = apply_fn(sit, scales, 1.0 - t, mask, labels)
    for a, b in zip(ours, raw, strict=True):
        np.testing.assert_allclose(np.asarray(a), -np.asarray(b), rtol=0, atol=ATOL)


def test_learn_sigma_head_keeps_the_velocity_channels(apply_fn):
    ref = make_reference(seed=3, out_channels=2 * C)
    sd = state_dict(ref)
    assert sd["final_layer.projections.1.linear.weight"].shape == (4 * 2 * C, WIDTH)
    assert dfm_sit.infer_architecture(sd)["out_channels"] == 2 * C
    params = dfm_sit.params_from_state_dict(sd, model_config())
    rng = np.random.default_rng(2)
    scales = tuple(rng.standard_normal((2, r, r, C)).astype(np.float32) for r in SIZES)
    t = rng.uniform(size=(2, 2)).astype(np.float32)
    labels = np.array([4, CLASSES], np.int32)
    out = apply_fn(params, scales, t, np.ones((2, 2), bool), labels)
    expected = official_velocity(ref, scales, t, labels, [1, 1])
    for o, e in zip(out, expected, strict=True):
        np.testing.assert_allclose(np.asarray(o), e[..., :C], rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- #
# Sampling end to end, against the official sampler in the SiT convention
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_sampling_matches_official_euler_sampler(reference, cfg_scale):
    ref, sd = reference
    cfg = model_config()
    params = dfm_sit.params_from_state_dict(sd, cfg)
    steps, tau = (3, 2), 0.7
    rng = np.random.default_rng(4)
    batch = 2
    noise = [rng.standard_normal((batch, r, r, C)).astype(np.float32) for r in SIZES]
    labels = np.array([7, 2], np.int32)

    @jax.jit
    def ours(params, noise, labels):
        def velocity_fn(scales, t, mask, y):
            return DiT(cfg).apply({"params": params}, scales, t, mask, y)

        settings = sampling.SamplerSettings(steps, (tau,), cfg_scale=cfg_scale)
        return sampling.sample(velocity_fn, noise, labels, settings, null_label=CLASSES)

    got = ours(params, noise, labels)
    expected = reference_lib.official_euler_sample(
        ref,
        {s: nchw(x) for s, x in enumerate(noise)},
        torch.from_numpy(labels.astype(np.int64)),
        list(steps),
        [1.0 - tau],  # the official stage_sampling_thresholds
        cfg_scale=cfg_scale,
        null_label=CLASSES,
    )
    for s in range(2):
        e = nhwc(expected[s])
        assert np.abs(e - noise[s]).max() > 0.5  # the trajectory moved
        np.testing.assert_allclose(np.asarray(got[s]), e, rtol=0, atol=5 * ATOL)
        print(f"cfg {cfg_scale} scale {s}: max diff {np.abs(np.asarray(got[s]) - e).max():.2e}")


def test_official_schedule_is_ours_in_the_sit_convention():
    times, masks = reference_lib.official_schedule([40, 10], [0.1])
    ours, active = sampling.stage_schedule((40, 10), (0.9,))
    np.testing.assert_allclose(1.0 - times, ours, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(masks, active)


# --------------------------------------------------------------------------- #
# Reading files, strictness
# --------------------------------------------------------------------------- #


class _NotData:
    pass


def test_read_checkpoint_entries_prefixes_and_safety(tmp_path, reference):
    _, sd = reference
    model = {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}
    ema = {f"_orig_mod.{k}": torch.from_numpy(2 * v) for k, v in sd.items()}
    path = str(tmp_path / "train.pt")
    torch.save(
        {
            "model": model,
            "ema": ema,
            "opt": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]},
            "args": argparse.Namespace(model="DFM-SiT-XL/2", qk_norm=False),
            "steps": 400_000,
        },
        path,
    )
    got_ema = dfm_sit.read_checkpoint(path)
    got_model = dfm_sit.read_checkpoint(path, which="model")
    assert sorted(got_ema) == sorted(got_model) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(got_ema[k], 2 * sd[k])
        np.testing.assert_array_equal(got_model[k], sd[k])
    assert dfm_sit.training_step(path) == 400_000
    with pytest.raises(ValueError, match=r"no 'opt_ema' state dict.*\['args', 'ema'.*model"):
        dfm_sit.read_checkpoint(path, which="opt_ema")
    bare = str(tmp_path / "bare.pt")
    torch.save(model, bare)
    assert sorted(dfm_sit.read_checkpoint(bare, which="model")) == sorted(sd)
    assert dfm_sit.training_step(bare) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dfm_sit.read_checkpoint(str(tmp_path / "nope.pt"))
    unsafe = str(tmp_path / "unsafe.pt")
    torch.save({"ema": model, "extra": _NotData()}, unsafe)
    with pytest.raises(ValueError, match="not loaded for safety"):
        dfm_sit.read_checkpoint(unsafe)


def _edited(sd, drop=(), add=None, change=None):
    out = {k: v for k, v in sd.items() if k not in drop}
    out.update(add or {})
    for k, fn in (change or {}).items():
        out[k] = fn(out[k])
    return out


@pytest.mark.parametrize(
    "edit, config, grid, match",
    [
        (dict(drop=["blocks.1.mlp.fc2.bias"]), {}, None, r"missing tensors \(1\).*fc2.bias"),
        (
            dict(add={"blocks.0.attn.extra.weight": np.zeros(3, np.float32)}),
            {},
            None,
            r"unexpected tensors \(1\).*blocks.0.attn.extra.weight",
        ),
        (
            dict(change={"blocks.0.mlp.fc1.bias": lambda v: v[:-1]}),
            {},
            None,
            r"shape mismatches.*blocks.0.mlp.fc1.bias: checkpoint \(255,\), expected \(256,\)",
        ),
        (
            dict(add={"blocks.0.attn.q_norm.weight": np.ones(16, np.float32)}),
            {},
            None,
            "qk_norm",
        ),
        ({}, {"num_classes": 12}, None, r"classes: checkpoint 10, config 12"),
        ({}, {"depth": 3}, None, r"depth: checkpoint 2, config 3"),
        (
            {},
            {"positions": "rope", "stage_embedding": True},
            None,
            r"positions: checkpoint sincos, config rope.*\n.*stage embedding",
        ),
        ({}, {}, (4, 4), r"token grid: checkpoint \(8, 8\).*\(4, 4\)"),
        (
            dict(change={"pos_embed": lambda v: v[:, ::-1]}),
            {},
            None,
            "pos_embed differs from the MAE 2-D sin-cos table",
        ),
        (dict(drop=["pos_embed"]), {}, None, r"not an official DFM-SiT state dict.*pos_embed"),
    ],
)
def test_strict_import_errors(reference, edit, config, grid, match):
    _, sd = reference
    with pytest.raises(ValueError, match=match):
        dfm_sit.params_from_state_dict(_edited(sd, **edit), model_config(**config), grid=grid)


def test_repa_projectors_are_skipped_and_params_fit_the_model(reference):
    _, sd = reference
    extra = {"projectors.0.0.weight": np.ones((8, WIDTH), np.float32)}
    cfg = model_config()
    params = dfm_sit.params_from_state_dict(_edited(sd, add=extra), cfg)
    expected = dit.param_shapes(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    bf16 = dfm_sit.params_from_state_dict(sd, model_config(param_dtype="bfloat16"))
    assert {a.dtype for a in jax.tree.leaves(bf16)} == {jnp.dtype("bfloat16")}


def test_released_config_matches_the_official_xl_layout(monkeypatch):
    """configs/imagenet512_dfm_sit.py against DFM-SiT-XL/2 at 512 px (meta tensors: no memory)."""
    monkeypatch.syspath_prepend(str(train_utils.REPO))
    config = config_lib.read(importlib.import_module("configs.imagenet512_dfm_sit").get_config())
    cfg = config.model.architecture(
        in_channels=config.data.channels, num_classes=config.data.num_classes, scale_stds=None
    )
    with torch.device("meta"):
        ref = reference_lib.DFMSiTReference(
            width=1152,
            heads=16,
            depth=28,
            patch_sizes=(1, 2),
            channels=4,
            num_classes=1000,
            input_size=64,
        )
    sd = ref.state_dict()
    arch = dfm_sit.infer_architecture(sd)
    dfm_sit.check_architecture(arch, cfg, grid=(32, 32))
    assert dfm_sit.official_shapes(cfg, 32, 4) == {k: tuple(v.shape) for k, v in sd.items()}
    trainable = sum(v.numel() for k, v in sd.items() if k != "pos_embed")
    assert dit.count_params(cfg) == trainable == 679_107_476
    s = config.sampling
    assert (tuple(s.steps_per_stage), tuple(s.thresholds), s.cfg_scale) == ((40, 10), (0.9,), 1.0)


# --------------------------------------------------------------------------- #
# python -m dfm_jax.eval --init=PATH.pt (the library path it calls)
# --------------------------------------------------------------------------- #


def _logits_extractor(pixels: int, classes: int = 5) -> FeatureExtractor:
    """A stand-in Inception for the IS metric: a fixed random projection to logits."""
    w = jax.random.normal(jax.random.key(9), (pixels, classes)) / np.sqrt(pixels)

    def apply(params, images):
        flat = images.reshape(images.shape[0], -1)
        return {"pool3": jnp.tanh(flat @ params), "logits_unbiased": 4.0 * flat @ params}

    return FeatureExtractor("inception", {"pool3": classes, "logits_unbiased": classes}, apply, w)


def _saved_npz(eval_dir: str) -> dict[str, np.ndarray]:
    """{file name: int32 samples} of every ``.npz`` under ``eval_dir``."""
    saved = {}
    for name in sorted(n for n in os.listdir(eval_dir) if n.endswith(".npz")):
        with np.load(os.path.join(eval_dir, name)) as npz:
            saved[name] = npz["arr_0"].astype(np.int32)
    return saved


def _assert_samples_of(saved: np.ndarray, images: dict[str, np.ndarray], which: str) -> None:
    """``saved`` (uint8 as int32) are ``images[which]`` quantised, and far from the others."""
    for name, x in images.items():
        diff = np.abs(saved - np.asarray(to_uint8(jnp.asarray(x))).astype(np.int32))
        if name == which:
            assert diff.max() <= 1, diff.max()
        else:
            assert diff.mean() > 5, diff.mean()


def test_eval_init_evaluates_the_imported_ema_weights(tmp_path, monkeypatch):
    """``--init`` evaluates the file's EMA weights; ``--init_key=model`` then adds a row and
    its own sample file (the EMA one kept as it was); a missing file is named."""
    # The tiny trainer config made DFM-SiT-shaped: 8x8x1 pixels, scales 4 and 8.
    config = train_utils.tiny_settings(
        {"model.positions": "sincos", "model.stage_embedding": False}
    )
    tiny = dict(width=32, heads=2, depth=1, patch_sizes=(1, 2), channels=1, num_classes=4)
    model_sd = state_dict(make_reference(seed=5, input_size=8, **tiny))
    ema_sd = state_dict(make_reference(seed=6, input_size=8, **tiny))
    path = str(tmp_path / "dfm_sit.pt")
    torch.save(
        {
            "model": {k: torch.from_numpy(v) for k, v in model_sd.items()},
            "ema": {k: torch.from_numpy(v) for k, v in ema_sd.items()},
            "steps": 123,
        },
        path,
    )
    used = []
    original = runner.import_params

    def recording(*args, **kwargs):
        used.append(original(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(runner, "import_params", recording)
    workdir = str(tmp_path / "results")
    evaluator = config_lib.EvalSettings(metrics=("is",), num_samples=8, batch_size=8, is_splits=1)

    def run(**options):
        extractors = {"inception": _logits_extractor(8 * 8)}
        return runner.run_sweep(
            config, workdir, evaluator, extractors=extractors, print_summary=False, **options
        )

    rows = run(init=path, save_npz=True)
    assert len(rows) == 1 and rows[0]["step"] == "123" and np.isfinite(float(rows[0]["is"]))
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))

    setup = setup_lib.build(config)
    ema = dfm_sit.params_from_state_dict(ema_sd, setup.model_config)
    raw = dfm_sit.params_from_state_dict(model_sd, setup.model_config)
    (placed,) = used
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(ema), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)

    # The saved samples are those of the EMA weights (and not of the raw ones).
    generate = generate_lib.make_generate_fn(setup.method, config.sampling.sampler())
    labels = class_balanced_labels(8, setup.num_classes, config.seed)
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    images = {
        name: np.asarray(generate(p, key, labels)) for name, p in (("ema", ema), ("raw", raw))
    }
    assert all(np.all(np.isfinite(x)) and x.std() > 0.05 for x in images.values())
    eval_dir = os.path.join(workdir, "eval")
    ((ema_name, ema_saved),) = _saved_npz(eval_dir).items()
    _assert_samples_of(ema_saved, images, "ema")
    assert ema_name.startswith("samples_step123_") and "_init-dfm_sit-ema-" in ema_name

    run(init=path, init_key="model", save_npz=True)
    saved = _saved_npz(eval_dir)
    assert len(saved) == 2
    np.testing.assert_array_equal(saved.pop(ema_name), ema_saved)
    (model_saved,) = saved.values()
    _assert_samples_of(model_saved, images, "raw")

    with pytest.raises(FileNotFoundError, match=r"--init=.*nope\.pt does not exist"):
        run(init=str(tmp_path / "nope.pt"))
