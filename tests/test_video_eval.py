"""Video evaluation: per-frame FID, FVD, the GIF sheet, references from clips.

Stand-in networks (fixed random projections) keep it fast; each metric is recomputed by
hand from the samples the sweep saved (``--save_npz``), so the test checks what rows the
statistics get: every frame for FID (image network), one clip for FVD (video network,
its first ``frames`` frames). The real I3D's wiring is checked at a narrow width.
"""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils
from PIL import Image
from test_eval import random_checkpoint

from dfm_jax import config as config_lib
from dfm_jax.evaluation import features, metrics, references, runner
from dfm_jax.models import i3d
from dfm_jax.utils import viz

FRAMES, SIDE = 4, 8
VIDEO = {"data.frames": FRAMES, "data.resolution": SIDE}
CLIP_FRAMES = 2  # the stand-in video network embeds the first two frames


def _projection(params, x):
    return {"out": jnp.tanh(x.reshape(x.shape[0], -1) @ params)}


def _params(size: int, dim: int, seed: int) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (size, dim)) / np.sqrt(size)


def stand_ins() -> dict[str, features.FeatureExtractor]:
    """A per-frame "inception" (pool3 of 6) and an I3D-like clip network (logits_mean of 5)."""

    def frame_apply(params, images):
        return {"pool3": _projection(params, images)["out"]}

    def clip_apply(params, clips):
        return {"logits_mean": _projection(params, clips)["out"]}

    frame = features.FeatureExtractor(
        "inception", {"pool3": 6}, frame_apply, _params(SIDE * SIDE, 6, 1), per_frame=True
    )
    clip = features.FeatureExtractor(
        "i3d",
        {"logits_mean": 5},
        clip_apply,
        _params(CLIP_FRAMES * SIDE * SIDE, 5, 2),
        frames=CLIP_FRAMES,
        longer_clips=True,
    )
    return {"inception": frame, "i3d": clip}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    settings = train_utils.tiny_settings(VIDEO)
    workdir = str(tmp_path_factory.mktemp("video_eval"))
    random_checkpoint(settings, workdir, steps=(1,))
    reference = os.path.join(workdir, "reference.npz")
    counts = references.compute_reference(
        settings, reference, ("fid", "fvd"), stand_ins(), num_samples=16, batch_size=8
    )
    return settings, workdir, reference, counts


def _frechet(rows: np.ndarray, reference: str, prefix: str) -> float:
    with np.load(reference) as npz:
        mu, sigma = npz[f"{prefix}mu"], npz[f"{prefix}sigma"]
    rows = np.asarray(rows, np.float64)
    return metrics.frechet_distance(rows.mean(0), np.cov(rows, rowvar=False), mu, sigma)


def test_reference_counts_every_frame_for_fid_and_every_clip_for_fvd(run):
    _, _, reference, counts = run
    assert counts == {"fid": 16 * FRAMES, "fvd": 16}
    with np.load(reference) as npz:
        assert npz["mu"].shape == (6,) and npz["fvd_mu"].shape == (5,)


def test_video_sweep_scores_frames_and_clips_and_writes_a_gif_sheet(run):
    settings, workdir, reference, _ = run
    evaluator = config_lib.EvalSettings(
        metrics=("fid", "fvd"), num_samples=8, sweep="cfg=1.0", reference=reference
    )
    (row,) = runner.run_sweep(
        settings,
        workdir,
        evaluator,
        extractors=stand_ins(),
        print_summary=False,
        save_npz=True,
        save_png=4,
    )
    (npz_path,) = glob.glob(os.path.join(workdir, "eval", "samples_step1_*_n8.npz"))
    with np.load(npz_path) as npz:
        clips = npz["arr_0"]
    assert clips.shape == (8, FRAMES, SIDE, SIDE, 1)
    pixels = viz.from_uint8(clips)
    frame_rows = _projection(stand_ins()["inception"].params, pixels.reshape(-1, SIDE, SIDE, 1))
    clip_rows = _projection(stand_ins()["i3d"].params, pixels[:, :CLIP_FRAMES])
    np.testing.assert_allclose(
        float(row["fid"]), _frechet(frame_rows["out"], reference, ""), rtol=1e-4
    )
    np.testing.assert_allclose(
        float(row["fvd"]), _frechet(clip_rows["out"], reference, "fvd_"), rtol=1e-4
    )
    (sheet,) = glob.glob(os.path.join(workdir, "eval", "samples_step1_*.gif"))
    with Image.open(sheet) as gif:
        assert gif.n_frames >= 2  # one grid per frame (identical neighbours are merged)


def test_video_runs_refuse_the_inception_score_and_short_clips():
    with pytest.raises(ValueError, match=r"Inception Score \(is\) is defined for images"):
        features.check_metrics_input(("fid", "is"), (FRAMES, SIDE, SIDE, 1))
    long_clips = stand_ins()["i3d"]
    with pytest.raises(ValueError, match="T=at least 2 frames"):
        long_clips.check_input((1, SIDE, SIDE, 1))
    long_clips.check_input((FRAMES, SIDE, SIDE, 1))
    with pytest.raises(ValueError, match="take clips"):
        features.check_metrics_input(("fvd",), (SIDE, SIDE, 1))


def test_i3d_extractor_embeds_the_first_16_frames_clipped(monkeypatch):
    """The fvd extractor feeds ``i3d.fvd_embedding`` the first 16 frames, clipped to
    [-1, 1] (the network itself is checked against its reference in test_i3d.py)."""
    seen = {}

    def embedding(variables, videos, *, width, dtype):
        seen.update(variables=variables, videos=videos, width=width)
        return jnp.zeros((videos.shape[0], i3d.NUM_CLASSES))

    monkeypatch.setattr(i3d, "fvd_embedding", embedding)
    extractor = features.i3d_extractor(variables={"v": 1}, width=0.5)
    clips = np.random.default_rng(3).uniform(-1.2, 1.2, (2, 17, 40, 48, 1)).astype(np.float32)
    assert extractor(jnp.asarray(clips))["logits_mean"].shape == (2, 400)
    np.testing.assert_array_equal(np.asarray(seen["videos"]), np.clip(clips[:, :16], -1, 1))
    assert seen["variables"] == {"v": 1} and seen["width"] == 0.5
