"""Class-conditional sample grids and progressive preview strips written during training."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dfm_jax.method import generation
from dfm_jax.training import decoding
from dfm_jax.training.setup import Setup, _rules
from dfm_jax.utils import viz


class SampleWriter:
    """Class-conditional sample grids and progressive preview strips from EMA parameters."""

    def __init__(self, setup: Setup, workdir: str, writer):
        sampling_config = setup.config.sampling
        self.setup, self.writer = setup, writer
        self.directory = os.path.join(workdir, "samples")
        self.rows = int(sampling_config.grid_classes)
        self.per_row = int(sampling_config.samples_per_class)
        self.preview_examples = int(sampling_config.preview_examples)
        self.labels = generation.grid_labels(setup.num_classes, self.rows, self.per_row)
        self.generate = generation.make_generate_fn(
            setup.model,
            setup.step_config.decomposition,
            setup.example_shape,
            sampling_config,
            null_label=setup.num_classes,
            return_previews=True,
        )
        self.key = jax.random.fold_in(jax.random.key(setup.config.seed), 2**31 - 1)
        # Latents are drawn through the autoencoder's decoder; 1- or 3-channel pixel images
        # as they are. Videos need a player: dfm_jax.eval evaluates those.
        self.codec = decoding.load_codec(setup.config, setup.mesh, required=False)
        shape = setup.example_shape
        self.enabled = len(shape) == 3 and (self.codec is not None or shape[-1] in (1, 3))
        if not self.enabled:
            logging.info(
                "No sample grids for examples of shape %s (1- or 3-channel images, or latents "
                "with config.autoencoder set, are drawn); evaluate with dfm_jax.eval",
                shape,
            )

    def __call__(self, step: int, ema_params) -> None:
        if not self.enabled:
            return
        with jax.set_mesh(self.setup.mesh), nn.logical_axis_rules(_rules(self.setup)):
            images, previews = self.generate(ema_params, self.key, self.labels)
            if self.codec is not None:
                images = self.codec.decode(images)
                previews = [self.codec.decode(p) for p in previews]
        images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
        previews = [np.asarray(multihost_utils.process_allgather(p, tiled=True)) for p in previews]
        grid = viz.image_grid(images, columns=self.per_row)
        examples = np.arange(0, len(images), self.per_row)[: self.preview_examples]
        strip = viz.preview_strip([p[examples] for p in previews])
        if jax.process_index() == 0:
            viz.save_png(os.path.join(self.directory, f"step_{step:08d}_grid.png"), grid)
            viz.save_png(os.path.join(self.directory, f"step_{step:08d}_previews.png"), strip)
        self.writer.write_images(step, {"samples": grid[None], "previews": strip[None]})
        logging.info("Wrote sample grid and previews of step %d to %s", step, self.directory)
