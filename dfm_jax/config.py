"""The experiment config: one schema, read once into typed settings.

Every field of an experiment is declared once, here, in a frozen dataclass per config
section: its type, its default (the paper's setup unless noted) and its documentation
(the comment beside it). Each section checks its own values when it is constructed;
``Settings.__post_init__`` checks the rules between sections (patch sizes that give
equal token grids, one p_q entry and one sampling stage per scale, ...). Errors are
``ConfigError`` (a ``ValueError``) naming the field and the fix.

* ``base_config()`` renders the schema as the ``ml_collections.ConfigDict`` that the
  files in ``configs/`` start from and that ``--config.<field>=<value>`` overrides;
  ``evaluator(...)`` renders one entry of ``config.evals``.
* ``read(config)`` turns such a ConfigDict into ``Settings`` once, at start: unknown
  fields (with the closest valid names), wrong types and invalid values are refused.
  Everything downstream (training setup, loop, evaluation, benchmark) receives
  ``Settings`` and never the ConfigDict, so data flow one way:
  config -> settings -> setup -> loop.
* ``flow_matching_twin(config)``: the single-scale Flow Matching baseline of a DFM
  config at equal compute (configs/*_fm.py).

Sections: the run (top level), ``mesh``, ``sharding_rules``, ``pyramid``,
``objective`` (the DFM objective's own ``ObjectiveConfig``), ``model``, ``optimizer``,
``data``, ``autoencoder``, ``sampling`` (the sampler's ``SamplerSettings`` plus the
periodic grids) and ``evals`` (evaluators, big_vision style: name -> ``EvalSettings``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import ml_collections

from dfm_jax import parallel
from dfm_jax.data.factory import SOURCES
from dfm_jax.evaluation.features import METRICS
from dfm_jax.method import objective, pyramid, sampling
from dfm_jax.models import autoencoder, dit
from dfm_jax.utils import names as names_lib

#: Training methods (``dfm_jax.method.methods``).
METHODS = ("dfm", "flow_matching", "pyramidal", "cascaded")


class ConfigError(ValueError):
    """An invalid experiment config; the message names the field and the fix."""


def _check(condition: bool, field: str, message: str) -> None:
    """Raises ``ConfigError("<field>: <message>")`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


def _positive_ints(section: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(section, name)
        _check(value >= 1, name, f"must be a positive integer, got {value}")


# ------------------------------------------------------------------------------ sections


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """Device-mesh axis sizes (``dfm_jax.parallel``); -1 takes the remaining devices."""

    data: int = -1  # pure data parallelism (parameters replicated)
    fsdp: int = 1  # data parallelism with parameters and optimizer state sharded (ZeRO-3)
    model: int = 1  # tensor parallelism of attention heads and MLP hidden units

    def __post_init__(self):
        parallel.check_mesh_shape(self.as_dict())

    def as_dict(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "model": self.model}


@dataclasses.dataclass(frozen=True)
class PyramidSettings:
    """The multiscale decomposition (``dfm_jax.method.pyramid``)."""

    kind: str = "laplacian"  # "laplacian" | "haar"
    ratios: tuple[int, ...] = (2,)  # coarse-to-fine resolution ratios; () is one scale (FM)
    # divide scale s by its data std; None: on for videos (spec section 6), off for images
    standardize: bool | None = None
    stds: tuple[float, ...] | None = None  # per-scale stds; None: the dataset's metadata
    temporal: bool = False  # videos: each ratio also resizes time (trilinear; laplacian only)

    def __post_init__(self):
        _check(
            self.kind in pyramid.KINDS, "kind", f"must be one of {pyramid.KINDS}, got {self.kind!r}"
        )
        _check(
            not self.temporal or self.kind == "laplacian",
            "temporal",
            f'resizes time with the trilinear Laplacian only: set kind="laplacian" or '
            f"temporal=False, got kind {self.kind!r}",
        )
        _check(all(r >= 2 for r in self.ratios), "ratios", f"must be >= 2, got {self.ratios}")
        if self.kind == "haar":
            _check(
                all(r == 2 for r in self.ratios),
                "ratios",
                f"the Haar pyramid has x2 levels only, got {self.ratios}",
            )
        if self.stds is not None:
            _check(
                len(self.stds) == self.num_scales,
                "stds",
                f"{self.stds} has {len(self.stds)} entries for {self.num_scales} scales",
            )
            _check(
                all(s > 0 and math.isfinite(s) for s in self.stds),
                "stds",
                f"must be positive, got {self.stds}",
            )

    @property
    def num_scales(self) -> int:
        return len(self.ratios) + 1

    @property
    def name(self) -> str:
        """Key of this decomposition's per-scale stds in dataset metadata, e.g. "laplacian_2"
        ("laplacian_2_t" when temporal)."""
        return pyramid.metadata_name(self.kind, self.ratios, self.temporal)

    @property
    def temporal_patch_sizes(self) -> tuple[int, ...] | None:
        """Frames per model patch of every scale: ``prod(ratios[:s])`` when temporal (equal
        token grids along time, as the spatial patch sizes along H and W), else None."""
        if not self.temporal:
            return None
        return tuple(math.prod(self.ratios[:s]) for s in range(self.num_scales))


@dataclasses.dataclass(frozen=True)
class PyramidalSettings:
    """Pyramidal Flow (``dfm_jax.method.pyramidal``), read when ``method = "pyramidal"``.

    Its K stages are the pyramid's scales (``pyramid.ratios`` all 2: x2 per stage), one
    single-scale DiT (``model.patch_sizes`` one entry) runs at every stage's resolution, and
    ``sampling.thresholds`` must equal the stage boundaries (fixed in training).
    """

    boundaries: tuple[float, ...] | None = None  # t at each stage jump; None: equal k / K
    gamma: float = 1.0 / 3.0  # block-noise correlation of the jump (code and paper: 1/3)

    def __post_init__(self):
        _check(
            0.0 < self.gamma <= 1.0 / 3.0 + 1e-12, "gamma", f"must be in (0, 1/3], got {self.gamma}"
        )

    def schedule(self, num_stages: int):
        """The ``pyramidal.PyramidalSchedule`` of ``num_stages`` stages."""
        from dfm_jax.method import pyramidal

        return pyramidal.PyramidalSchedule(num_stages, self.boundaries, self.gamma)


@dataclasses.dataclass(frozen=True)
class CascadedSettings:
    """The Cascaded baseline (``dfm_jax.method.cascaded``), read when ``method = "cascaded"``.

    Two scales (``pyramid.ratios`` one entry r): a stage-1 DiT with ``model.patch_sizes[0]``
    at the low resolution and a stage-2 DiT with ``model.patch_sizes[1]`` at the full
    resolution (equal token grids, as for DFM); both of ``model``'s size. Flow Matching
    times and label dropout come from ``objective`` (``current_*``, ``label_dropout``).
    """

    stage1_fraction: float = 0.5  # share of every batch (and so of the FLOPs) for stage 1
    condition_location: float = 1.5  # LogitNormal location of the training condition's t
    condition_scale: float = 1.0  # LogitNormal scale of the training condition's t
    inference_noise: float = 0.025  # 1 - t of the condition at inference (paper: 0.025)

    def __post_init__(self):
        _check(
            0.0 < self.stage1_fraction < 1.0,
            "stage1_fraction",
            f"must be in (0, 1), got {self.stage1_fraction}",
        )
        _check(self.condition_scale > 0, "condition_scale", "must be positive")
        _check(
            0.0 <= self.inference_noise < 1.0,
            "inference_noise",
            f"must be in [0, 1), got {self.inference_noise}",
        )


#: The DFM objective's hyperparameters, declared (with defaults and checks) where the
#: objective is: ``stage_probs`` (p_q), ``current_location``/``current_scale``,
#: ``earlier_location``/``earlier_scale``, ``stage_sampling``, ``label_dropout``.
ObjectiveSettings = objective.ObjectiveConfig


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The DFM-DiT (``dfm_jax.models.dit``): a named size with optional overrides."""

    size: str = "XL"  # S | B | L | XL (depth / width / heads 12/384/6 ... 28/1152/16)
    patch_sizes: tuple[int, ...] = (1, 2)  # one per scale, coarsest first; equal token grids
    depth: int | None = None  # overrides the size's depth
    width: int | None = None  # overrides the size's width
    num_heads: int | None = None  # overrides the size's heads
    positions: str = "rope"  # "rope" (paper) | "sincos" (authors' reimplementation)
    stage_embedding: bool = True  # embedding of the current stage in the conditioning
    preconditioning: bool = False  # EDM-style per-scale c_in / c_out (needs data stds)
    attention_impl: str | None = None  # blockwise | einsum | xla | cudnn | None (CPU: blockwise)
    dtype: str = "float32"  # compute dtype; "bfloat16" on accelerators
    remat: bool = False  # rematerialise every block in the backward pass
    remat_policy: str = "nothing_saveable"  # a jax.checkpoint_policies name

    def __post_init__(self):
        try:  # the architecture's own checks, with stand-in channels, classes and stds
            stds = (1.0,) * len(self.patch_sizes)
            self.architecture(in_channels=1, num_classes=1, scale_stds=stds)
        except ValueError as e:
            raise ConfigError(str(e).removeprefix("DiTConfig: ")) from None

    def architecture(
        self,
        *,
        in_channels: int,
        num_classes: int,
        scale_stds: tuple[float, ...] | None,
        temporal_patch_sizes: tuple[int, ...] | None = None,
    ) -> dit.DiTConfig:
        """The ``DiTConfig``; ``scale_stds`` (sigma_s as the model sees the scales) are
        used when ``preconditioning``; ``temporal_patch_sizes`` (a temporal pyramid's,
        ``PyramidSettings.temporal_patch_sizes``) give 3-D patches."""
        overrides = {
            name: getattr(self, name)
            for name in ("depth", "width", "num_heads")
            if getattr(self, name) is not None
        }
        return dit.dit_config(
            self.size,
            in_channels=in_channels,
            num_classes=num_classes,
            patch_sizes=self.patch_sizes,
            temporal_patch_sizes=temporal_patch_sizes,
            positions=self.positions,
            stage_embedding=self.stage_embedding,
            preconditioning=self.preconditioning,
            scale_stds=scale_stds if self.preconditioning else None,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            remat=self.remat,
            remat_policy=self.remat_policy,
            **overrides,
        )


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with warm-up, clipping and an EMA of the parameters (paper setup)."""

    learning_rate: float = 1e-4
    warmup_steps: int = 10_000  # linear warm-up from 0, then constant
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.01  # decoupled, on every parameter
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step))

    def __post_init__(self):
        _check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            _check(0 <= value < 1, name, f"must be in [0, 1), got {value}")
        _check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        _check(0 <= self.ema_decay <= 1, "ema_decay", f"must be in [0, 1], got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The training data (``dfm_jax.data.make_source``).

    ``image`` of every example holds pixels in [-1, 1], or autoencoder latents for
    ``source="array_record"``; images ``(H, W, C)``, videos ``(T, H, W, C)``.
    """

    # fashion_mnist | moving_fashion_mnist (clips) | synthetic | image_folder | tfds | array_record
    # | video_folder | kinetics (PyAV clips)
    source: str = "synthetic"
    dir: str = ""  # data directory: IDX files / class folders / TFDS data_dir / latents
    split: str = "train"  # split name (image_folder / array_record: a subfolder if present)
    resolution: int | None = None  # output side of pixel sources; None: native (synthetic 32)
    channels: int | None = None  # None: the source's (fashion_mnist 1, synthetic/folders 3)
    num_classes: int | None = None  # None: the dataset's; set: must equal it (synthetic: 10)
    frames: int = 0  # synthetic / moving_fashion_mnist / video sources: 0 images, T clips
    num_examples: int = 1024  # synthetic: dataset size
    tfds_name: str = ""  # tfds: the dataset name, e.g. "cifar10"
    image_key: str = "image"  # tfds: image feature
    label_key: str = "label"  # tfds: label feature ("" for unconditional)
    download: bool = False  # fashion_mnist / tfds: allow a TFDS download
    latent_sample: bool = True  # array_record moments: draw a latent per read (False: mean)
    validate_files: bool = True  # image_folder: header-check every file when indexing
    worker_count: int = 0  # Grain worker processes (0: in the training process)
    bad_records: str = "stop"  # array_record: a corrupt/misshapen record "stop"s or "skip"s
    frame_stride: int = 1  # video_folder / kinetics: decoded frames between clip frames
    fps: float = 0.0  # video sources: > 0 sets stride = round(video fps / fps); 0: frame_stride
    clip: str = ""  # video sources: "random" offset | "center"; "": random for train, else center
    random_flip: bool = False  # video sources: flip half the "random" clips left-right
    max_bad_fraction: float = 0.05  # video sources: stop when more of the reads failed (after 20)

    def __post_init__(self):
        _check(
            self.bad_records in ("stop", "skip"),
            "bad_records",
            f'must be "stop" (end the run) or "skip" (read the next record, counted), got '
            f"{self.bad_records!r}",
        )
        _check(
            self.source in SOURCES,
            "source",
            f"unknown data.source {self.source!r}; known sources: {', '.join(SOURCES)}",
        )
        for name in ("resolution", "channels"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, f"must be positive or None, got {value}")
        _check(
            self.num_classes is None or self.num_classes >= 1,
            "num_classes",
            f"must be positive or None, got {self.num_classes}",
        )
        _check(self.frames >= 0, "frames", f"must be >= 0 (0: images), got {self.frames}")
        _check(self.num_examples >= 1, "num_examples", f"must be positive, got {self.num_examples}")
        _check(self.worker_count >= 0, "worker_count", f"must be >= 0, got {self.worker_count}")
        _check(self.frame_stride >= 1, "frame_stride", f"must be >= 1, got {self.frame_stride}")
        _check(self.fps >= 0, "fps", f"must be >= 0 (0: use frame_stride), got {self.fps}")
        _check(
            self.clip in ("", "random", "center"),
            "clip",
            f'must be "random", "center" or "" (random for split train), got {self.clip!r}',
        )
        _check(
            0.0 <= self.max_bad_fraction <= 1.0,
            "max_bad_fraction",
            f"must lie in [0, 1], got {self.max_bad_fraction}",
        )


@dataclasses.dataclass(frozen=True)
class AutoencoderSettings:
    """The autoencoder of latent configs (``dfm_jax.models.autoencoder``).

    Empty ``name``: the model works on pixels. Otherwise samples are decoded with it for
    grids, previews and metrics (and ``python -m dfm_jax.prepare`` encodes with it).
    """

    # sd-vae-ft-ema | sd-vae-ft-mse | flux-ae | cogvideox-2b | cogvideox-5b (video) | tiny |
    # tiny-video (tests) | "" (pixels)
    name: str = ""
    weights: str = ""  # diffusers diffusion_pytorch_model.safetensors (or its directory)
    dtype: str = "float32"  # compute dtype; "bfloat16" on accelerators
    decode_tile: int = 0  # latent tile side for tiled decoding; 0 decodes whole

    def __post_init__(self):
        _check(
            not self.name or self.name in (*autoencoder.PRESETS, *autoencoder.VIDEO_PRESET_NAMES),
            "name",
            f"unknown autoencoder {self.name!r}; use one of "
            f"{sorted((*autoencoder.PRESETS, *autoencoder.VIDEO_PRESET_NAMES))} or '' "
            "for pixel space",
        )
        _check(
            self.dtype in ("float32", "bfloat16"),
            "dtype",
            f"must be float32 or bfloat16, got {self.dtype!r}",
        )
        _check(self.decode_tile >= 0, "decode_tile", f"must be >= 0, got {self.decode_tile}")


@dataclasses.dataclass(frozen=True)
class SamplingSettings(sampling.SamplerSettings):
    """The sampler of the periodic sample grids (and the default point of evaluations).

    Inherits ``steps_per_stage``, ``thresholds`` (paper convention), ``solver``,
    ``cfg_scale`` and ``guidance_interval`` from ``dfm_jax.method.sampling.SamplerSettings``
    (declared and checked there); adds what the grids show.
    """

    grid_classes: int = 10  # rows of the sample grid (the first classes)
    samples_per_class: int = 8  # columns of the sample grid
    preview_examples: int = 4  # rows of the progressive preview strip

    def __post_init__(self):
        super().__post_init__()
        _positive_ints(self, ("grid_classes", "samples_per_class", "preview_examples"))

    def sampler(self) -> sampling.SamplerSettings:
        """The sampler part alone."""
        names = [f.name for f in dataclasses.fields(sampling.SamplerSettings)]
        return sampling.SamplerSettings(**{name: getattr(self, name) for name in names})


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """One evaluator of ``config.evals`` (big_vision style), run by the trainer and by
    ``python -m dfm_jax.eval`` on the EMA parameters.

    Results go to ``<workdir>/eval/results.csv`` / ``results.md`` and TensorBoard.
    """

    # fid | fdd | is | pr | fd_fmnist; videos: fvd | fid, fdd (per frame) | fvd_fmnist
    metrics: tuple[str, ...] = ("fid", "fdd", "is")
    every: int = 0  # train steps between evaluations during training (+ at the end); 0: never
    num_samples: int = 50_000  # samples per sweep point
    sweep: str = ""  # sampler settings (dfm_jax.evaluation.sweep syntax); "": config.sampling
    batch_size: int | None = None  # generation batch; None: config.batch_size (capped)
    seed: int | None = None  # labels and noise; None: config.seed
    inception_weights: str = ""  # pytorch-fid Inception weights (fid, is, pr)
    dinov2_weights: str = ""  # DINOv2 weights (fdd)
    i3d_weights: str = ""  # TF-Hub i3d-kinetics-400 SavedModel directory (fvd)
    reference: str = ""  # reference statistics .npz (ADM batch or --compute_reference)
    fdd_reference: str = ""  # DINOv2 reference .npz (default: fdd_* keys of reference)
    is_splits: int = 10  # Inception Score splits

    def __post_init__(self):
        unknown = sorted(set(self.metrics) - set(METRICS))
        _check(not unknown, "metrics", f"unknown metrics {unknown}; known metrics: {list(METRICS)}")
        _check(bool(self.metrics), "metrics", "is empty; name at least one metric")
        _check(self.every >= 0, "every", f"must be >= 0 (0: not during training), got {self.every}")
        _positive_ints(self, ("num_samples", "is_splits"))
        _check(
            self.batch_size is None or self.batch_size >= 1,
            "batch_size",
            f"must be positive or None, got {self.batch_size}",
        )
        if "is" in self.metrics:
            _check(
                self.is_splits <= self.num_samples,
                "is_splits",
                f"{self.is_splits} must be <= num_samples {self.num_samples}",
            )
        if "pr" in self.metrics:
            _check(self.num_samples >= 4, "num_samples", "must be >= 4 for precision/recall")


# ------------------------------------------------------------------------------ the whole


@dataclasses.dataclass(frozen=True)
class Settings:
    """A whole experiment, validated (see the module docstring)."""

    seed: int = 0  # one seed: parameters, per-step randomness (fold_in(step)), data order
    total_steps: int = 500_000
    batch_size: int = 256  # global batch, split over the data-parallel mesh axes
    log_every: int = 100  # metrics to TensorBoard and a console line
    checkpoint_every: int = 5_000
    sample_every: int = 25_000  # sample grid + preview strip PNGs from the EMA parameters
    keep_checkpoints: int = 3
    max_consecutive_nonfinite: int = 20  # stop after this many skipped (non-finite) updates
    resume: str = ""  # a checkpoint directory to start from when the workdir has none
    method: str = (
        "dfm"  # "dfm" | "flow_matching" (one scale; flow_matching_twin) | "pyramidal" | "cascaded"
    )
    mesh: MeshSettings = MeshSettings()
    # Logical axis name -> mesh axes (dfm_jax.parallel.DEFAULT_RULES); None replicates.
    sharding_rules: tuple[tuple[str, Any], ...] = parallel.DEFAULT_RULES
    pyramid: PyramidSettings = PyramidSettings()
    objective: ObjectiveSettings = dataclasses.field(default_factory=ObjectiveSettings)
    model: ModelSettings = ModelSettings()
    optimizer: OptimizerSettings = OptimizerSettings()
    data: DataSettings = DataSettings()
    autoencoder: AutoencoderSettings = AutoencoderSettings()
    sampling: SamplingSettings = SamplingSettings()
    pyramidal: PyramidalSettings = PyramidalSettings()
    cascaded: CascadedSettings = CascadedSettings()
    evals: Mapping[str, EvalSettings] = dataclasses.field(default_factory=dict)

    _SECTIONS: ClassVar[tuple[str, ...]] = (
        "mesh",
        "pyramid",
        "objective",
        "model",
        "optimizer",
        "data",
        "autoencoder",
        "sampling",
        "pyramidal",
        "cascaded",
    )

    def __post_init__(self):
        _positive_ints(
            self,
            (
                "total_steps",
                "batch_size",
                "log_every",
                "checkpoint_every",
                "sample_every",
                "keep_checkpoints",
                "max_consecutive_nonfinite",
            ),
        )
        _check(self.method in METHODS, "method", f"must be one of {METHODS}, got {self.method!r}")
        if self.pyramid.standardize is None:  # the default: standardised video DFM / FM
            standardize = self.is_video and self.method in ("dfm", "flow_matching")
            object.__setattr__(
                self, "pyramid", dataclasses.replace(self.pyramid, standardize=standardize)
            )
        self._check_scales()
        if self.pyramid.temporal:
            self._check_temporal()
        if self.autoencoder.name and self.data.channels is not None:
            latent = autoencoder.preset_config(self.autoencoder.name).latent_channels
            _check(
                self.data.channels == latent,
                "data.channels",
                f"is {self.data.channels} but autoencoder {self.autoencoder.name!r} makes "
                f"{latent}-channel latents; set --config.data.channels={latent} (or another "
                "autoencoder)",
            )
        if self.data.source == "array_record":
            _check(
                bool(self.autoencoder.name),
                "autoencoder.name",
                "is empty but data.source='array_record' trains on autoencoder latents; name "
                "the autoencoder that encoded them (e.g. sd-vae-ft-ema, flux-ae) so that "
                "samples can be decoded",
            )

    @property
    def is_video(self) -> bool:
        """Clips ``(T, H, W, C)``: pixel clips (``data.frames``) or video-autoencoder latents."""
        return self.data.frames > 0 or self.autoencoder.name in autoencoder.VIDEO_PRESET_NAMES

    def _check_scales(self) -> None:
        """One patch size, one p_q entry and one sampling stage per scale."""
        scales, ratios, patches = self.num_scales, self.pyramid.ratios, self.model.patch_sizes
        if self.method == "pyramidal":
            self._check_pyramidal()
            return
        _check(
            len(patches) == scales,
            "model.patch_sizes",
            f"{patches} has {len(patches)} entries but pyramid.ratios {ratios} make "
            f"{scales} scales",
        )
        matching = [patches[0]]
        for ratio in ratios:
            matching.append(matching[-1] * ratio)
        _check(
            tuple(matching) == patches,
            "model.patch_sizes",
            f"{patches} do not give equal token grids for pyramid ratios {ratios}: each patch "
            f"size must be the previous one times the ratio, e.g. {tuple(matching)}",
        )
        if self.method == "cascaded":
            self._check_cascaded()
        _check(
            self.method == "cascaded" or len(self.objective.stage_probs) == scales,
            "objective.stage_probs",
            f"{self.objective.stage_probs} must have one entry per scale ({scales})",
        )
        try:
            self.sampling.check_num_scales(scales)
        except ValueError as e:
            raise ConfigError(f"sampling.{e}") from None  # the sampler names its field
        if self.method == "flow_matching":
            _check(
                scales == 1,
                "method",
                "'flow_matching' trains one scale: set pyramid.ratios=() and "
                "objective.stage_probs=(1.0,) (config.flow_matching_twin does it)",
            )

    def _check_temporal(self) -> None:
        """A temporal pyramid: DFM on videos whose frames divide by the ratios' product."""
        _check(
            self.method in ("dfm", "flow_matching"),
            "pyramid.temporal",
            f"is supported by methods dfm and flow_matching only, got {self.method!r}",
        )
        _check(
            self.is_video,
            "pyramid.temporal",
            "resizes the time axis of videos, but the data are images (data.frames=0 and no "
            "video autoencoder); set data.frames > 0 or pyramid.temporal=False",
        )
        total = math.prod(self.pyramid.ratios)
        _check(  # pixel clips; latent frame counts are checked by the pyramid at build time
            bool(self.autoencoder.name) or self.data.frames % total == 0,
            "data.frames",
            f"{self.data.frames} frames are not divisible by {total}, the product of the "
            f"temporal pyramid.ratios {self.pyramid.ratios}; use a multiple of {total} (odd "
            "frame counts, e.g. causal latents 1 + k, are not supported) or "
            "pyramid.temporal=False",
        )

    def _check_cascaded(self) -> None:
        """Cascaded: two scales, both stages with examples in every batch."""
        _check(
            self.num_scales == 2,
            "pyramid.ratios",
            f"Cascaded has two stages: give one ratio, got {self.pyramid.ratios}",
        )
        _check(not self.pyramid.standardize, "pyramid.standardize", "is not supported by cascaded")
        _check(not self.model.preconditioning, "model.preconditioning", "not supported by cascaded")
        n1 = round(self.batch_size * self.cascaded.stage1_fraction)
        _check(
            0 < n1 < self.batch_size,
            "cascaded.stage1_fraction",
            f"{self.cascaded.stage1_fraction} of batch {self.batch_size} leaves a stage empty",
        )

    def _check_pyramidal(self) -> None:
        """Pyramidal Flow: x2 stages, one patch size, trained boundaries, an even batch split."""
        stages, ratios = self.num_scales, self.pyramid.ratios
        _check(
            stages >= 2 and all(r == 2 for r in ratios),
            "pyramid.ratios",
            f"Pyramidal Flow needs x2 stages, e.g. (2, 2) for three, got {ratios}",
        )
        _check(
            len(self.model.patch_sizes) == 1,
            "model.patch_sizes",
            f"Pyramidal Flow runs one single-scale DiT at every stage: give one patch size, "
            f"got {self.model.patch_sizes}",
        )
        _check(not self.pyramid.standardize, "pyramid.standardize", "is not supported by pyramidal")
        _check(
            not self.model.preconditioning,
            "model.preconditioning",
            "is not supported by pyramidal",
        )
        try:
            self.sampling.check_num_scales(stages)
        except ValueError as e:
            raise ConfigError(f"sampling.{e}") from None
        try:
            schedule = self.pyramidal.schedule(stages)
        except ValueError as e:
            raise ConfigError(f"pyramidal.{e}") from None
        _check(
            all(
                abs(a - b) <= 1e-6
                for a, b in zip(self.sampling.thresholds, schedule.boundaries, strict=True)
            ),
            "sampling.thresholds",
            f"{self.sampling.thresholds} must equal the Pyramidal Flow stage boundaries "
            f"{schedule.boundaries} (pyramidal.boundaries), fixed in training",
        )
        _check(
            self.batch_size % stages == 0,
            "batch_size",
            f"{self.batch_size} must split evenly over the {stages} Pyramidal Flow stages",
        )

    @property
    def num_scales(self) -> int:
        return self.pyramid.num_scales

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (JSON-serialisable), e.g. for checkpoints and hparams."""
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ rendering


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_type(hint: Any) -> type | None:
    """``X`` for ``X | None``, else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return typing.get_origin(inner) or inner
    return None


def _render(section: Any) -> ml_collections.ConfigDict:
    """A dataclass instance as a ConfigDict; None fields stay typed (unset but overridable)."""
    rendered = ml_collections.ConfigDict()
    hints = _hints(type(section))
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if dataclasses.is_dataclass(value):
            rendered[field.name] = _render(value)
        elif field.name == "evals":
            rendered[field.name] = ml_collections.ConfigDict(
                {name: _render(e) for name, e in value.items()}
            )
        elif value is None:
            kind = _optional_type(hints[field.name])
            rendered[field.name] = ml_collections.config_dict.placeholder(kind)
        else:
            rendered[field.name] = value
    return rendered


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default; the experiment files in configs/ change what they need."""
    config = _render(Settings())
    config.pyramid = _render(PyramidSettings())  # as declared: Settings resolves standardize
    return config


def evaluator(**fields: Any) -> ml_collections.ConfigDict:
    """One ``config.evals`` entry: ``EvalSettings`` defaults with ``fields`` changed, e.g.
    ``config.evals.fd = evaluator(metrics=("fd_fmnist",), every=400, num_samples=500)``."""
    return _render(EvalSettings(**fields))


# ------------------------------------------------------------------------------ reading

_SECTION_NAMES = (*Settings._SECTIONS, "evals", "sharding_rules")


def _field_names(cls: type, prefix: str = "") -> list[str]:
    names = []
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            names += _field_names(hint, f"{prefix}{field.name}.")
        else:
            names.append(f"{prefix}{field.name}")
    return names


def _unknown_field_error(name: str, cls: type, prefix: str) -> ConfigError:
    """The error for ``prefix + name`` that ``cls`` does not declare: the closest fields
    of ``cls``, else fields of that name elsewhere (``model.frames`` -> ``data.frames``)."""
    close = [prefix + c for c in names_lib.closest(name, [f.name for f in dataclasses.fields(cls)])]
    if not close:
        close = [n for n in _field_names(Settings) if n.rsplit(".", 1)[-1] == name]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"unknown config field {prefix}{name}{hint}")


def _convert(hint: Any, value: Any, name: str) -> Any:
    """``value`` as the annotated type (lists -> tuples, ints -> floats), or ConfigError."""
    if value is None:
        _check(_optional_type(hint) is not None or hint is Any, name, "must be set, got None")
        return None
    inner = _optional_type(hint)
    if inner is not None:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is tuple:
        _check(isinstance(value, list | tuple), name, f"must be a tuple, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
        _check(len(value) == len(args), name, f"must have {len(args)} entries, got {value!r}")
        return tuple(
            _convert(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        _check(ok, name, f"must be a number, got {value!r}")
        return float(value)
    if hint is int or hint is bool or hint is str:
        ok = isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
        _check(ok, name, f"must be {hint.__name__}, got {value!r}")
        return value
    raise TypeError(f"config field {name}: unsupported annotation {hint!r}")


def _field_message(message: str, fields: set[str], prefix: str) -> str:
    """``config.<prefix><field>: <rest>`` for a message that starts with a field name
    (``"solver must be ..."``, ``"thresholds[0] = 1.2 ..."``), else ``config.<section>: ...``."""
    first, _, rest = message.partition(" ")
    name = first.rstrip(":")
    if name in fields or name.split(".", 1)[0] in _SECTION_NAMES:
        return f"config.{prefix}{name}: {rest}"
    if name.split("[", 1)[0] in fields:  # an entry of a field: "thresholds[0] = ..."
        return f"config.{prefix}{message}"
    return f"config.{prefix.rstrip('.') or 'config'}: {message}"


def _read_section(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    """An instance of dataclass ``cls`` from a mapping; errors are prefixed with the field."""
    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        if name not in fields:
            raise _unknown_field_error(name, cls, prefix)
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[name] = _read_section(hint, value, f"{prefix}{name}.")
        elif name == "evals":
            kwargs[name] = {
                key: _read_section(EvalSettings, entry, f"{prefix}evals.{key}.")
                for key, entry in value.items()
            }
        else:
            kwargs[name] = _convert(hint, value, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own check, naming its field first where it can
        raise ConfigError(_field_message(str(e).removeprefix("config."), fields, prefix)) from None


def read(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Settings:
    """The validated ``Settings`` of an experiment config (a ConfigDict or nested dicts).

    Raises:
      ConfigError: an unknown field (the message lists the closest valid names), a value
        of the wrong type, or an invalid value or combination, naming the field.
    """
    raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    try:
        return _read_section(Settings, raw, "")
    except ConfigError as e:
        message = str(e)
        if not message.startswith(("config.", "unknown config field")):
            message = f"config.{message}"
        raise ConfigError(message) from None


def check_devices(settings: Settings, num_devices: int) -> tuple[int, ...]:
    """The mesh axis sizes for ``num_devices``; raises unless the batch splits evenly."""
    try:
        sizes = parallel.resolve_mesh_shape(settings.mesh.as_dict(), num_devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    data_parallel = math.prod(sizes[: len(parallel.BATCH_AXES)])
    check_batch_size(settings.batch_size, data_parallel, "batch_size")
    return sizes


def check_batch_size(batch_size: int, data_parallel: int, field: str = "batch_size") -> None:
    """Raises ``ConfigError`` unless ``batch_size`` splits over the data-parallel devices."""
    _check(
        batch_size % data_parallel == 0,
        f"config.{field}",
        f"{batch_size} is not divisible by the {data_parallel} data-parallel devices; use a "
        f"multiple of {data_parallel}",
    )


def flow_matching_twin(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The single-scale Flow Matching baseline of a DFM config, at equal compute.

    One scale at full resolution with the finest scale's patch size (so the token grid,
    backbone, batch and optimizer are unchanged), ``p_q = (1,)``, no stage embedding and
    the same total number of sampling steps.
    """
    twin = copy.deepcopy(config)  # keeps the types of unset (None) fields
    twin.method = "flow_matching"
    twin.pyramid.ratios = ()
    twin.pyramid.stds = None
    twin.pyramid.temporal = False  # one scale: nothing to resize
    twin.objective.stage_probs = (1.0,)
    twin.model.patch_sizes = (int(config.model.patch_sizes[-1]),)
    twin.model.stage_embedding = False
    twin.sampling.steps_per_stage = (int(sum(config.sampling.steps_per_stage)),)
    twin.sampling.thresholds = ()
    return twin


def _forward_flops(
    config: ml_collections.ConfigDict,
    shapes: list[tuple[int, ...]],
    patch_sizes: tuple[int, ...] | None = None,
) -> int:
    """One forward pass of ``config.model`` (optionally other patch sizes) over ``shapes``."""
    fields = config.model.to_dict()
    if patch_sizes is not None:
        fields["patch_sizes"] = tuple(patch_sizes)
    model = _read_section(ModelSettings, fields, "model.")
    architecture = model.architecture(
        in_channels=int(config.data.channels),
        num_classes=int(config.data.num_classes),
        scale_stds=None,
    )
    return dit.forward_flops(architecture, shapes)


def _scale_shapes(config: ml_collections.ConfigDict) -> list[tuple[int, ...]]:
    """Per-example scale shapes of ``config``'s pyramid at ``data.resolution``."""
    size, channels = int(config.data.resolution), int(config.data.channels)
    sizes = pyramid.make(config.pyramid.kind, config.pyramid.ratios).scale_sizes(size, size)
    return [(h, w, channels) for h, w in sizes]


def _equal_steps(total: int, stages: int) -> tuple[int, ...]:
    """``total`` sampling steps split as equally as possible over ``stages``."""
    return tuple(total // stages + (k >= stages - total % stages) for k in range(stages))


def cascaded_twin(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The Cascaded baseline of a two-scale DFM config at equal training compute.

    Stage 1: a DiT with ``model.patch_sizes[0]`` at the coarse scale's resolution; stage 2:
    a DiT with ``model.patch_sizes[1]`` at the full resolution (both the same token grid as
    DFM, both of ``model``'s size); each batch split evenly (``cascaded.stage1_fraction``
    0.5); the DFM config's total sampling steps split equally (40 -> 20 + 20, the paper's).
    Equal compute: ``total_steps`` is scaled by the ratio of forward FLOPs per example,
    ``config``'s to the expected ``0.5 flops_1 + 0.5 flops_2``.
    """
    twin = copy.deepcopy(config)
    twin.method = "cascaded"
    twin.pyramid.stds = None
    twin.pyramid.temporal = False  # spatial stages only
    twin.pyramid.standardize = False
    twin.model.stage_embedding = False
    twin.model.preconditioning = False
    twin.sampling.steps_per_stage = _equal_steps(int(sum(config.sampling.steps_per_stage)), 2)
    low, high = _scale_shapes(config)
    p1, p2 = (int(p) for p in config.model.patch_sizes)
    fraction = float(twin.cascaded.stage1_fraction)
    flops = fraction * _forward_flops(twin, [low], (p1,)) + (1 - fraction) * _forward_flops(
        twin, [high, high], (p2, p2)
    )
    reference = _forward_flops(config, _scale_shapes(config))
    twin.total_steps = round(config.total_steps * reference / flops)
    return twin


def pyramidal_twin(
    config: ml_collections.ConfigDict, ratios: tuple[int, ...] = (2,)
) -> ml_collections.ConfigDict:
    """The Pyramidal Flow baseline of a DFM (or FM) config at equal training compute.

    K = len(ratios) + 1 stages (x2 each, coarse to fine), one single-scale DiT with the
    finest patch size of ``config`` (so the last stage has the same token grid, backbone,
    batch and optimizer), equal stage windows, the same total sampling steps split equally
    over the stages. Equal compute: a Pyramidal step costs less (the batch is split evenly
    over the stages and the coarse ones have fewer tokens), so ``total_steps`` is scaled by
    the ratio of forward FLOPs per example, ``config``'s to the twin's (``dfm_jax.models.dit
    .forward_flops``, with ``data.resolution`` and ``data.channels``).
    """
    twin = copy.deepcopy(config)
    twin.method = "pyramidal"
    twin.pyramid.ratios = tuple(ratios)
    twin.pyramid.stds = None
    twin.pyramid.temporal = False  # spatial stages only
    twin.pyramid.standardize = False
    twin.model.patch_sizes = (int(config.model.patch_sizes[-1]),)
    twin.model.stage_embedding = False
    twin.model.preconditioning = False
    stages = len(ratios) + 1
    twin.sampling.steps_per_stage = _equal_steps(int(sum(config.sampling.steps_per_stage)), stages)
    twin.sampling.thresholds = tuple(k / stages for k in range(1, stages))
    twin.pyramidal.boundaries = None
    size, channels = int(config.data.resolution), int(config.data.channels)
    reference = _forward_flops(config, _scale_shapes(config))
    mine = [(size // 2 ** (stages - 1 - k),) * 2 + (channels,) for k in range(stages)]
    flops = sum(_forward_flops(twin, [s]) for s in mine) / stages
    twin.total_steps = round(config.total_steps * reference / flops)
    return twin
