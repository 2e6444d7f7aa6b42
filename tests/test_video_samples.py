"""Video runs: clips are drawn as animated GIFs whose frames are the class grid per frame."""

from __future__ import annotations

import io

import jax
import numpy as np
import pytest
import train_utils
from PIL import Image

from dfm_jax.training import samples as samples_lib
from dfm_jax.training import setup as setup_lib
from dfm_jax.utils import viz


class _Writer:
    def __init__(self):
        self.images = {}

    def write_images(self, step, images):
        self.images.update(images)


def _gif_frames(path) -> np.ndarray:
    with Image.open(path) as gif:
        frames = []
        for index in range(gif.n_frames):
            gif.seek(index)
            frames.append(np.asarray(gif.convert("L")))
    return np.stack(frames)[..., None]


def test_gif_bytes_round_trip_grayscale_exactly():
    frames = np.random.default_rng(0).integers(0, 256, (5, 7, 9, 1), dtype=np.uint8)
    np.testing.assert_array_equal(_gif_frames(io.BytesIO(viz.gif_bytes(frames))), frames)


def test_video_sample_grid_is_an_animated_class_grid(tmp_path):
    settings = train_utils.tiny_settings({"data.frames": 3})
    setup = setup_lib.build(settings)
    writer = _Writer()
    sample_writer = samples_lib.SampleWriter(setup, str(tmp_path), writer)
    assert sample_writer.enabled and sample_writer.video
    params = jax.tree.map(
        lambda a: 0.05 * jax.random.normal(jax.random.key(1), a.shape, a.dtype),
        setup.abstract_state.ema_params,
    )
    sample_writer(7, params)
    with setup.context():
        clips, previews = sample_writer.generate(params, sample_writer.key, sample_writer.labels)
    clips = np.asarray(clips)
    assert clips.shape == (4, 3, 8, 8, 1) and clips.std() > 0.01
    frames = _gif_frames(tmp_path / "samples" / "step_00000007_grid.gif")
    assert len(frames) == 3
    rows = ["0", "1"]  # synthetic data has no class names: ids label the rows
    for t in range(3):
        np.testing.assert_array_equal(frames[t], viz.image_grid(clips[:, t], 2, row_labels=rows))
    strip = _gif_frames(tmp_path / "samples" / "step_00000007_previews.gif")
    coarse = np.asarray(previews[0])[::2]
    expected = viz.preview_strip([coarse[:, 0], clips[::2, 0]], row_labels=rows)
    np.testing.assert_array_equal(strip[0], expected)
    assert writer.images["samples"].shape[0] == 1


@pytest.mark.slow  # 10 s; test_video_pipeline writes decoded latent GIFs end to end
def test_latent_video_samples_are_decoded_by_the_video_autoencoder(tmp_path):
    """Video latents (B, T', h, w, C) are drawn after the video codec's decode."""
    settings = train_utils.tiny_settings(
        {"data.frames": 2, "data.channels": 4, "autoencoder.name": "tiny-video"}
    )
    setup = setup_lib.build(settings)
    sample_writer = samples_lib.SampleWriter(setup, str(tmp_path), _Writer())
    assert sample_writer.enabled and sample_writer.video
    params = jax.tree.map(
        lambda a: 0.05 * jax.random.normal(jax.random.key(1), a.shape, a.dtype),
        setup.abstract_state.ema_params,
    )
    sample_writer(3, params)
    with setup.context():
        latents, _ = sample_writer.generate(params, sample_writer.key, sample_writer.labels)
    clips = np.asarray(sample_writer.codec.decode(latents))
    assert clips.shape[:2] == (4, 8) and clips.shape[-1] == 3  # one even chunk: 4 T' frames
    grids = np.stack([viz.image_grid(clips[:, t], 2, row_labels=["0", "1"]) for t in range(8)])
    expected = _gif_frames(io.BytesIO(viz.gif_bytes(grids)))  # the same palette quantisation
    frames = _gif_frames(tmp_path / "samples" / "step_00000003_grid.gif")
    np.testing.assert_array_equal(frames, expected)
