"""From the autoencoder settings to the decoder that turns generated latents into pixels.

Latent configs (``data.source = "array_record"``) generate model-space latents
``(z - shift_factor) * scaling_factor``; the trainer's sample grids and previews and
every evaluation metric need pixels. ``load_decoder`` builds the autoencoder that
``config.autoencoder`` names (``load_codec``) and ``check_matches_dataset`` checks that
it is the one the dataset was encoded with (name, scaling and shift factors from the
dataset's ``metadata.json``). Decoders are pytrees (a ``Codec``, or a plain function as
a ``FunctionDecoder``), passed into jitted functions as arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from absl import logging

from dfm_jax.data import latents as latent_data
from dfm_jax.models import autoencoder

#: Autoencoders that may be built with random weights (tests and demos only; always the
#: same weights, so that `prepare` and the decoder agree).
RANDOM_INIT_NAMES = ("tiny", "tiny-video")


def check_matches_dataset(settings, source) -> None:
    """Raises ValueError unless ``settings`` (``config.AutoencoderSettings``) name the
    dataset's autoencoder.

    ``source`` is the data source; only latent datasets (with ``metadata``) are checked.
    """
    metadata = getattr(source, "metadata", None)
    if not isinstance(metadata, latent_data.LatentMetadata):
        return
    name = settings.name
    if not name:
        raise ValueError(
            f"config.autoencoder.name is empty but the data are latents of "
            f"{metadata.autoencoder or 'an unnamed autoencoder'!r}: set "
            f"--config.autoencoder.name={metadata.autoencoder or '<name>'} (and "
            "--config.autoencoder.weights) so that samples can be decoded"
        )
    preset = autoencoder.preset_config(name)
    if metadata.autoencoder and metadata.autoencoder != name:
        raise ValueError(
            f"config.autoencoder.name={name!r} but {source!r} was encoded with "
            f"{metadata.autoencoder!r}; set --config.autoencoder.name={metadata.autoencoder}"
        )
    for field in ("scaling_factor", "shift_factor"):
        ours, theirs = getattr(preset, field), getattr(metadata, field)
        if abs(ours - theirs) > 1e-6 * max(1.0, abs(theirs)):
            raise ValueError(
                f"the dataset's metadata.json has {field}={theirs} but autoencoder {name!r} "
                f"uses {ours}: the latents were made with another convention; re-run "
                "`python -m dfm_jax.prepare` with this autoencoder"
            )


def load_codec(settings, mesh: jax.sharding.Mesh, *, required: bool) -> autoencoder.Codec | None:
    """The autoencoder of ``settings`` (``config.AutoencoderSettings``), replicated over
    ``mesh``; None for pixels.

    The returned ``Codec`` decodes model-space latents (B, h, w, C) to pixels
    (B, H, W, 3) in [-1, 1]: eagerly with ``codec.decode(z)``, or inside a jitted
    function that takes the codec as an argument, ``codec(z)`` (closing over it would
    bake its parameters into the program as constants).

    Args:
      settings: the autoencoder settings.
      mesh: the devices to replicate the parameters over.
      required: raise when the weights are missing (evaluation); otherwise log a warning
        and return None (training still runs; sample grids are skipped).
    """
    if not settings.name:
        return None
    if not settings.weights and settings.name not in RANDOM_INIT_NAMES:
        message = (
            f"config.autoencoder.weights is empty: decoding {settings.name!r} latents needs "
            "its diffusers weights (diffusion_pytorch_model.safetensors, or the directory "
            "holding it); set --config.autoencoder.weights=PATH"
        )
        if required:
            raise ValueError(message)
        logging.warning("%s. Sample grids are skipped until then.", message)
        return None
    codec = autoencoder.Codec.load(
        settings.name,
        settings.weights,
        dtype=settings.dtype,
        decode_tile=int(settings.decode_tile),
    )
    return codec.replicated(mesh)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FunctionDecoder:
    """A plain decode function as a (leafless) pytree, so it can be a jit argument like a
    ``Codec``. The function must be traceable and hashable (any Python function is)."""

    function: Callable[[jax.Array], jax.Array]

    def __call__(self, latents: jax.Array) -> jax.Array:
        return self.function(latents)


#: The decoder of pixel-space configs.
IDENTITY = FunctionDecoder(lambda x: x)
