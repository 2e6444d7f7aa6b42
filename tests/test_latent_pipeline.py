"""Latent space end to end: prepare an image folder -> train on the latents -> decode samples.

Uses the "tiny" random-weight autoencoder (downsampling x2): 16x16 RGB images become
8x8x4 latents, split into 4x4 and 8x8 scales with patches 1 and 2.
"""

from __future__ import annotations

import glob
import os

import jax
import numpy as np
import pytest
import train_utils
from PIL import Image
from test_eval import fake_inception

from dfm_jax import config as config_lib
from dfm_jax import data
from dfm_jax.evaluation import runner
from dfm_jax.preparation import PrepareOptions
from dfm_jax.preparation import run as prepare
from dfm_jax.training import decoding, loop
from dfm_jax.training import setup as setup_lib

LATENT_CONFIG = {
    "data.source": "array_record",
    "data.channels": 4,
    "data.num_classes": 2,
    "autoencoder.name": "tiny",
    "pyramid.standardize": True,  # per-scale stds from the prepared metadata
    "total_steps": 2,
    "checkpoint_every": 2,
    "sample_every": 2,
}


@pytest.fixture(scope="module", autouse=True)
def _compile_cache():
    with train_utils.persistent_compile_cache():
        yield


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A prepared tiny-autoencoder dataset of 2 classes x 4 images (and one corrupt file)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        os.makedirs(root / label)
        for i in range(4):
            size = (16 + 4 * i, 20)
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    out = str(tmp_path_factory.mktemp("latents"))
    result = prepare(
        PrepareOptions(
            out=out,
            source="image_folder",
            data_dir=str(root),
            resolution=16,
            autoencoder="tiny",
            images_per_shard=4,
            pyramids=("laplacian_2",),
            progress=False,
        )
    )
    assert (result.records_written, result.skipped_images) == (8, 1)
    return out


def test_prepared_dataset_feeds_the_trainer(latents):
    settings = train_utils.tiny_settings({**LATENT_CONFIG, "data.dir": latents})
    source = data.make_source(settings.data)
    assert (len(source), source.example_shape, source.num_classes) == (8, (8, 8, 4), 2)
    stds = source.scale_stds("laplacian_2")
    assert len(stds) == 2 and all(s > 0 for s in stds)


def test_train_two_steps_then_sample_and_decode(latents, tmp_path):
    config = train_utils.tiny_settings({**LATENT_CONFIG, "data.dir": latents})
    workdir = str(tmp_path / "run")
    state = loop.run(config, workdir)
    assert int(state.step) == 2
    # Sample grids are decoded to RGB pixels: 2 classes x 2 samples of 16x16 images, each
    # cell the decoded sample of the final EMA parameters.
    with Image.open(os.path.join(workdir, "samples", "step_00000002_grid.png")) as grid:
        assert grid.mode == "RGB"
        grid = np.asarray(grid)
    samples = train_utils.grid_samples(setup_lib.build(config), state.ema_params)
    assert samples.shape == (4, 16, 16, 3)
    train_utils.assert_grid_holds(grid, samples, columns=2)
    with Image.open(os.path.join(workdir, "samples", "step_00000002_previews.png")) as strip:
        assert strip.mode == "RGB"

    # Evaluation decodes with the configured autoencoder before the feature network.
    inception = fake_inception(16 * 16 * 3)
    rows = runner.run_sweep(
        config,
        workdir,
        config_lib.EvalSettings(metrics=("is",), sweep="cfg=1.0", num_samples=8, is_splits=1),
        extractors={"inception": inception},
        print_summary=False,
        save_npz=True,
    )
    # IS recomputed by hand from the decoded samples the sweep wrote (one split).
    (npz_path,) = glob.glob(os.path.join(workdir, "eval", "samples_step2_*_n8.npz"))
    with np.load(npz_path) as npz:
        images = npz["arr_0"]
    assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
    logits = np.asarray(inception(images.astype(np.float32) / 127.5 - 1)["logits_unbiased"])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1)
    assert len(rows) == 1
    np.testing.assert_allclose(float(rows[0]["is"]), np.exp(kl.mean()), rtol=1e-4)


def test_autoencoder_must_match_the_dataset(latents):
    config = train_utils.tiny_settings(
        {**LATENT_CONFIG, "data.dir": latents, "autoencoder.name": "sd-vae-ft-ema"}
    )
    with pytest.raises(ValueError, match="was encoded with 'tiny'"):
        setup_lib.build(config)


def test_missing_autoencoder_weights_stop_evaluation_but_not_training(latents):
    # A declared channel count that the autoencoder does not make: refused when read.
    with pytest.raises(config_lib.ConfigError, match=r"data\.channels: is 4 but .*'flux-ae'"):
        train_utils.tiny_settings({**LATENT_CONFIG, "autoencoder.name": "flux-ae"})
    # metadata says tiny: checked before any weights
    config = train_utils.tiny_settings(
        {**LATENT_CONFIG, "data.dir": latents, "autoencoder.name": "flux-ae", "data.channels": None}
    )
    with pytest.raises(ValueError, match="was encoded with 'tiny'"):
        setup_lib.build(config)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    assert decoding.load_codec(config.autoencoder, mesh, required=False) is None
    with pytest.raises(ValueError, match=r"autoencoder\.weights is empty"):
        decoding.load_codec(config.autoencoder, mesh, required=True)
