"""Feature extractors and the metrics that use them.

A ``FeatureExtractor`` is a pure function ``apply(params, images) -> {output: (B, D)}``
plus its parameters; images are ``(B, H, W, C)`` float32 in [-1, 1] (the evaluation
quantises samples to uint8 first, as saved sample files hold them, and maps them
back). The evaluation jits ``apply`` with batch-sharded inputs and outputs on the
model's mesh, so anything built this way -- the real networks below, or a small
stand-in in a test -- runs through the same code path.

=============  ==============================  ===========================================
extractor      outputs (dim)                   built by
=============  ==============================  ===========================================
inception      pool3 (2048),                   ``inception_extractor(weights)``: the FID
               logits_unbiased (1008)          InceptionV3 (pytorch-fid weights)
dinov2         features (width, 1024 for L)    ``dinov2_extractor(weights)``: DINOv2 CLS
                                               token at 224 px (dgm-eval's FDD)
fd_fmnist      features (128)                  ``fd_fmnist_extractor(fd)``: the demo's
                                               Fashion-MNIST classifier (32x32x1 only)
fvd_fmnist     features (128)                  ``fvd_fmnist_extractor(fvd)``: the video
                                               demo's Moving Fashion-MNIST classifier
                                               (clips (8, 32, 32, 1) only)
i3d            logits_mean (400)               ``i3d_extractor(weights)``: FVD's I3D
                                               (Kinetics-400, TF-Hub weights), the first
                                               16 frames of clips of >= 16 frames
=============  ==============================  ===========================================

Grayscale images are repeated to three channels for Inception, DINOv2 and I3D.

Videos: a video network (``frames`` set: I3D, the FVD-FMNIST classifier) embeds each
clip; Inception and DINOv2 (``per_frame``) embed every frame of every clip, so FID and
FDD of a video run are the paper's per-frame metrics (all frames of every clip;
``(B, T, D)`` outputs, each frame a row of the statistics). The Inception Score is
defined for images only.
``METRICS`` maps each metric to its extractor, the output it reads, and the
result columns it fills.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from dfm_jax.evaluation import fd_fmnist, fvd_fmnist
from dfm_jax.models import dinov2 as dinov2_model
from dfm_jax.models import inception as inception_model

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureExtractor:
    """A feature network as a pure function and its parameters.

    Attributes:
      name: registry name ("inception", "dinov2", "fd_fmnist", or a custom one).
      outputs: output name -> feature dimension.
      apply: ``(params, images (B, H, W, C) float32 in [-1, 1]) -> {output: (B, D)}``;
        traced under ``jax.jit``, so it must be jit-compatible.
      params: the parameters passed to ``apply`` (any pytree, or None).
      channels: accepted channel counts.
      resolution: required image side, or None for any size.
      frames: None for an image network; the clip length T for a video network, which
        takes ``(B, T, H, W, C)`` clips instead.
      longer_clips: a video network also takes clips longer than ``frames`` (their
        first ``frames`` frames: FVD's 16).
      per_frame: an image network that also takes clips, frame by frame (``features``).
    """

    name: str
    outputs: Mapping[str, int]
    apply: Callable[[Any, Array], Mapping[str, Array]]
    params: Any = None
    channels: tuple[int, ...] = (1, 3)
    resolution: int | None = None
    frames: int | None = None
    longer_clips: bool = False
    per_frame: bool = False

    def __call__(self, images: Array) -> dict[str, Array]:
        """Features of ``images`` (unjitted convenience; evaluation jits ``features``)."""
        return self.features(self.params, images)

    def features(self, params: Any, samples: Array) -> dict[str, Array]:
        """``apply`` on images ``(B, H, W, C)`` -> ``(B, D)``, or on clips ``(B, T, H, W, C)``:
        a video network's ``(B, D)``, an image network's per frame ``(B, T, D)``."""
        if samples.ndim == 5 and self.frames is None:
            b, t = samples.shape[:2]
            out = self.apply(params, samples.reshape(b * t, *samples.shape[2:]))
            return {k: v.reshape(b, t, *v.shape[1:]) for k, v in out.items()}
        if self.longer_clips:
            samples = samples[:, : self.frames]
        return dict(self.apply(params, samples))

    def check_input(self, example_shape: Sequence[int]) -> None:
        """Raises ``ValueError`` unless this extractor accepts images (or clips) of
        ``example_shape``."""
        if self.frames is not None:
            example_shape = self._check_clip(example_shape)
        elif len(example_shape) == 4 and self.per_frame:
            example_shape = tuple(example_shape[1:])
        elif len(example_shape) != 3:
            raise ValueError(
                f"the {self.name} features take images (H, W, C), but the samples have shape "
                f"{tuple(example_shape)}; video metrics are fvd, fid and fdd (per frame) and "
                "fvd_fmnist (the video demo's)"
            )
        height, width, channels = example_shape
        if channels not in self.channels:
            raise ValueError(
                f"the {self.name} features take images with {self.channels} channel(s), but the "
                f"samples have {channels}; latent configs need a decode function to pixels"
            )
        if self.resolution is not None and (height, width) != (self.resolution,) * 2:
            raise ValueError(
                f"the {self.name} features take {self.resolution}x{self.resolution} images, "
                f"but the samples are {height}x{width}"
            )

    def _check_clip(self, example_shape: Sequence[int]) -> tuple[int, ...]:
        """The frame shape ``(H, W, C)`` of a ``(T, H, W, C)`` clip with ``T == frames``."""
        long_enough = (
            self.longer_clips and len(example_shape) == 4 and example_shape[0] >= self.frames
        )
        if len(example_shape) != 4 or (example_shape[0] != self.frames and not long_enough):
            kind = "images" if len(example_shape) == 3 else "samples"
            at_least = "at least " if self.longer_clips else ""
            raise ValueError(
                f"the {self.name} features take clips (T, H, W, C) of T={at_least}{self.frames} "
                "frames, "
                f"but the {kind} have shape {tuple(example_shape)}"
                + ("; image metrics (fd_fmnist, fid) take images" if kind == "images" else "")
            )
        return tuple(example_shape[1:])


def to_rgb(images: Array) -> Array:
    """Repeats a single channel three times; RGB passes through."""
    return jnp.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _inception_apply(module, variables, images):
    out = module.apply(variables, to_rgb(images))
    return {"pool3": out["pool3"], "logits_unbiased": out["logits_unbiased"]}


def inception_extractor(
    weights: str | os.PathLike, *, dtype: Any = jnp.float32, precision: Any = "highest"
) -> FeatureExtractor:
    """The FID InceptionV3 from pytorch-fid's weights (``.pth`` or ``.safetensors``).

    Outputs ``pool3`` (FID, precision/recall) and ``logits_unbiased`` (IS, softmax
    over all 1008 outputs as the original IS code).
    """
    from dfm_jax.weights.inception import load_inception

    module, variables = load_inception(weights, dtype=dtype, precision=precision)
    return FeatureExtractor(
        name="inception",
        outputs={
            "pool3": inception_model.FEATURE_DIM,
            "logits_unbiased": module.num_classes,
        },
        apply=functools.partial(_inception_apply, module),
        params=variables,
        **INPUTS["inception"],
    )


def _dinov2_apply(module, resolution, params, images):
    features = dinov2_model.fdd_features(module, params, to_rgb(images), resolution=resolution)
    return {"features": features}


def dinov2_extractor(
    weights: str | os.PathLike | None = None,
    *,
    module: dinov2_model.DINOv2 | None = None,
    params: Any = None,
    resolution: int = dinov2_model.FDD_RESOLUTION,
) -> FeatureExtractor:
    """DINOv2 CLS features for FDD (dgm-eval preprocessing at ``resolution`` px).

    Either ``weights`` (any released DINOv2 checkpoint; ViT-L/14 is the FDD
    standard) or a ready ``module`` and ``params`` (e.g. a small model in tests).
    """
    if module is None:
        from dfm_jax.weights.dinov2 import load_dinov2

        module, params = load_dinov2(weights)
    return FeatureExtractor(
        name="dinov2",
        outputs={"features": module.config.width},
        apply=functools.partial(_dinov2_apply, module, resolution),
        params=params,
        **INPUTS["dinov2"],
    )


def _fd_fmnist_apply(model, params, images):
    return {"features": model.apply(params, images)[1]}


def fd_fmnist_extractor(fd) -> FeatureExtractor:
    """The FD-FMNIST classifier's features (``dfm_jax.evaluation.fd_fmnist.FdFmnist``)."""
    return FeatureExtractor(
        name="fd_fmnist",
        outputs={"features": int(fd.settings.feature_dim)},
        apply=functools.partial(_fd_fmnist_apply, fd.settings.model()),
        params=fd.params,
        **INPUTS["fd_fmnist"],
    )


def _fvd_fmnist_apply(model, params, clips):
    return {"features": model.apply(params, clips)[2]}


def fvd_fmnist_extractor(fvd) -> FeatureExtractor:
    """The FVD-FMNIST video classifier's features (``fvd_fmnist.FvdFmnist``), for clips
    of its settings' shape (the video demo's ``(8, 32, 32, 1)`` by default)."""
    return FeatureExtractor(
        name="fvd_fmnist",
        outputs={"features": int(fvd.settings.feature_dim)},
        apply=functools.partial(_fvd_fmnist_apply, fvd.settings.model()),
        params=fvd.params,
        channels=(1,),
        resolution=int(fvd.settings.resolution),
        frames=int(fvd.settings.frames),
    )


def _i3d_apply(width, dtype, variables, clips):
    from dfm_jax.models import i3d

    clips = jnp.clip(clips, -1.0, 1.0)  # the reference asserts this range
    return {"logits_mean": i3d.fvd_embedding(variables, clips, width=width, dtype=dtype)}


def i3d_extractor(
    weights: str | os.PathLike | None = None,
    *,
    variables: Any = None,
    width: float = 1.0,
    dtype: Any = jnp.float32,
) -> FeatureExtractor:
    """FVD's I3D: the 400 Kinetics logits averaged over time of the first 16 frames,
    clips resized to 224x224 as the reference does (``dfm_jax.models.i3d``).

    Either ``weights`` (the TF-Hub ``i3d-kinetics-400`` SavedModel directory) or ready
    ``variables`` (of a network of channel ``width``, e.g. a narrow one in tests).
    """
    from dfm_jax.models import i3d

    if variables is None:
        from dfm_jax.weights.i3d import load_i3d

        _, variables = load_i3d(weights, dtype=dtype)
    return FeatureExtractor(
        name="i3d",
        outputs={"logits_mean": i3d.NUM_CLASSES},
        apply=functools.partial(_i3d_apply, width, dtype),
        params=variables,
        **INPUTS["i3d"],
    )


#: The inputs each extractor accepts (``FeatureExtractor.channels`` / ``resolution`` /
#: ``frames`` / ``per_frame``); the FD-FMNIST classifier takes the demo's 32x32
#: grayscale images only, I3D clips of at least 16 frames.
INPUTS: dict[str, dict[str, Any]] = {
    "inception": {"per_frame": True},
    "dinov2": {"per_frame": True},
    "fd_fmnist": {"channels": (1,), "resolution": fd_fmnist.RESOLUTION},
    "fvd_fmnist": {
        "channels": (1,),
        "resolution": fvd_fmnist.RESOLUTION,
        "frames": fvd_fmnist.FRAMES,
    },
    "i3d": {"frames": 16, "longer_clips": True},
}


def check_sample_kind(metric_names: Sequence[str], sample_shape: Sequence[int]) -> None:
    """Raises ``ValueError`` for metrics undefined on this kind of sample (IS on clips)."""
    if len(sample_shape) == 4 and "is" in metric_names:
        raise ValueError(
            "the Inception Score (is) is defined for images; video runs report fvd and the "
            "per-frame fid and fdd"
        )


def check_metrics_input(metric_names: Sequence[str], image_shape: Sequence[int]) -> None:
    """Raises ``ValueError`` unless every metric's extractor accepts ``image_shape``
    (checked before any network is loaded)."""
    check_sample_kind(metric_names, image_shape)
    for name in sorted(needed_extractors(metric_names)):
        stand_in = FeatureExtractor(name=name, outputs={}, apply=None, **INPUTS.get(name, {}))
        stand_in.check_input(image_shape)


@dataclasses.dataclass(frozen=True)
class Metric:
    """A metric: the extractor output it reads and the result columns it fills."""

    name: str
    extractor: str
    output: str
    columns: tuple[str, ...]
    description: str


METRICS: dict[str, Metric] = {
    "fid": Metric("fid", "inception", "pool3", ("fid",), "FID (Inception pool3)"),
    "fdd": Metric("fdd", "dinov2", "features", ("fdd",), "FDD (DINOv2 CLS)"),
    "is": Metric("is", "inception", "logits_unbiased", ("is", "is_std"), "Inception Score"),
    "pr": Metric(
        "pr", "inception", "pool3", ("precision", "recall"), "precision/recall (k=3, pool3)"
    ),
    "fd_fmnist": Metric(
        "fd_fmnist", "fd_fmnist", "features", ("fd_fmnist",), "FD-FMNIST (demo classifier)"
    ),
    "fvd_fmnist": Metric(
        "fvd_fmnist", "fvd_fmnist", "features", ("fvd_fmnist",), "FVD-FMNIST (video demo)"
    ),
    "fvd": Metric("fvd", "i3d", "logits_mean", ("fvd",), "FVD (I3D logits, first 16 frames)"),
}

#: Every result column a metric can fill, in table order.
METRIC_COLUMNS = tuple(column for metric in METRICS.values() for column in metric.columns)


def needed_extractors(metrics: Sequence[str]) -> dict[str, set[str]]:
    """Extractor name -> the outputs that ``metrics`` read from it."""
    needed: dict[str, set[str]] = {}
    for name in metrics:
        metric = METRICS[name]
        needed.setdefault(metric.extractor, set()).add(metric.output)
    return needed
