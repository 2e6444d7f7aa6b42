"""Class-conditional sample grids and progressive preview strips written during training."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dfm_jax.method import generation
from dfm_jax.training import decoding
from dfm_jax.training.setup import Setup
from dfm_jax.utils import viz


class SampleWriter:
    """Class-conditional sample grids and progressive preview strips from EMA parameters."""

    def __init__(self, setup: Setup, workdir: str, writer):
        settings = setup.settings.sampling
        self.setup, self.writer = setup, writer
        self.directory = os.path.join(workdir, "samples")
        self.rows = settings.grid_classes
        self.per_row = settings.samples_per_class
        self.preview_examples = settings.preview_examples
        self.labels = grid_labels(setup.num_classes, self.rows, self.per_row)
        self.generate = generation.make_generate_fn(setup.method, settings.sampler(), previews=True)
        self.key = jax.random.fold_in(jax.random.key(setup.settings.seed), 2**31 - 1)
        # Latents (image or video) are drawn through the autoencoder's decoder; 1- or
        # 3-channel pixel images and clips as they are (clips as animated GIFs).
        self.codec = decoding.load_codec(setup.settings.autoencoder, setup.mesh, required=False)
        shape = setup.example_shape
        self.video = len(shape) == 4
        self.enabled = self.codec is not None or shape[-1] in (1, 3)
        if not self.enabled:
            logging.info(
                "No sample grids for examples of shape %s (1- or 3-channel images or clips, "
                "or latents with config.autoencoder set, are drawn); evaluate with "
                "dfm_jax.eval",
                shape,
            )

    def __call__(self, step: int, ema_params) -> None:
        if not self.enabled:
            return
        with self.setup.context():
            images, previews = self.generate(ema_params, self.key, self.labels)
            if self.codec is not None:
                images = self.codec.decode(images)
                previews = [self.codec.decode(p) for p in previews]
        images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
        previews = [np.asarray(multihost_utils.process_allgather(p, tiled=True)) for p in previews]
        names = getattr(self.setup.source, "class_names", None)  # None: the ids are shown
        rows = viz.class_labels(np.asarray(self.labels)[:: self.per_row], names)
        examples = np.arange(0, len(images), self.per_row)[: self.preview_examples]
        previews = [p[examples] for p in previews]
        if self.video:
            tensorboard = self._write_clips(step, images, previews, rows)
        else:
            tensorboard = self._write_images(step, images, previews, rows)
        self.writer.write_images(step, tensorboard)
        logging.info("Wrote sample grid and previews of step %d to %s", step, self.directory)

    def _path(self, step: int, name: str) -> str:
        return os.path.join(self.directory, f"step_{step:08d}_{name}")

    def _write_images(self, step, images, previews, rows) -> dict[str, np.ndarray]:
        """``grid.png`` (one labelled row per class) and ``previews.png``."""
        grid = viz.image_grid(images, columns=self.per_row, row_labels=rows)
        strip = viz.preview_strip(previews, row_labels=rows[: len(previews[0])])
        if jax.process_index() == 0:
            viz.save_png(self._path(step, "grid.png"), grid)
            viz.save_png(self._path(step, "previews.png"), strip)
        return {"samples": grid[None], "previews": strip[None]}

    def _write_clips(self, step, clips, previews, rows) -> dict[str, np.ndarray]:
        """``grid.gif`` (the class grid, animated), ``previews.gif`` (the coarse stages'
        previews beside the final clip) and, for TensorBoard, the frames of the preview
        examples side by side (one row per example)."""
        frames = clips.shape[1]
        grid = np.stack(
            [
                viz.image_grid(clips[:, t], columns=self.per_row, row_labels=rows)
                for t in range(frames)
            ]
        )
        labels = rows[: len(previews[0])]
        # A temporal pyramid's coarse previews have fewer frames: show the nearest one.
        strip = np.stack(
            [
                viz.preview_strip(
                    [p[:, t * p.shape[1] // frames] for p in previews], row_labels=labels
                )
                for t in range(frames)
            ]
        )
        final = previews[-1]
        film = viz.image_grid(
            final.reshape(-1, *final.shape[2:]), columns=frames, row_labels=labels
        )
        if jax.process_index() == 0:
            viz.save_gif(self._path(step, "grid.gif"), grid)
            viz.save_gif(self._path(step, "previews.gif"), strip)
        return {"samples": film[None], "preview_first_frames": strip[0][None]}


def grid_labels(num_classes: int, rows: int, per_row: int) -> jax.Array:
    """Labels for a class grid: row r is class ``r % num_classes``, ``per_row`` times."""
    return jnp.repeat(jnp.arange(rows, dtype=jnp.int32) % num_classes, per_row)
