"""The shared experiment config: defaults, validation, and builders.

Every experiment file in ``configs/`` starts from ``base_config()`` and changes
what it needs; every field is documented once, here. ``validate`` runs at start
and raises ``ValueError`` naming the field and the fix, before any data is read
or any array is allocated. The builders turn config sections into the method's
objects (decomposition, objective, model architecture, sampler settings).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from dfm_jax import parallel
from dfm_jax.method import objective, pyramid, sampling
from dfm_jax.models import autoencoder, dit

PYRAMID_KINDS = ("laplacian", "haar")


def _optional(kind: type):
    """A field that is None unless set, typed so that ``--config.x=...`` overrides parse."""
    return ml_collections.config_dict.placeholder(kind)


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment (the paper's optimisation setup)."""
    c = ml_collections.ConfigDict()

    # --- Run --------------------------------------------------------------------------------
    c.seed = 0  # one seed: parameters, per-step randomness (fold_in(step)), data order
    c.total_steps = 500_000
    c.batch_size = 256  # global batch, split over the data-parallel mesh axes
    c.log_every = 100  # metrics to TensorBoard and a console line
    c.checkpoint_every = 5_000
    c.sample_every = 25_000  # sample grid + preview strip PNGs from the EMA parameters
    c.keep_checkpoints = 3
    c.max_consecutive_nonfinite = 20  # stop after this many skipped (non-finite) updates
    c.resume = ""  # a checkpoint directory to start from when the workdir has none

    # --- Parallelism ------------------------------------------------------------------------
    # Mesh axes data (replicated params), fsdp (sharded params) and model (tensor parallel);
    # -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    # Logical axis name -> mesh axes (see dfm_jax.parallel); None replicates.
    c.sharding_rules = [list(rule) for rule in parallel.DEFAULT_RULES]

    # --- Decomposition ----------------------------------------------------------------------
    c.pyramid = ml_collections.ConfigDict()
    c.pyramid.kind = "laplacian"  # "laplacian" | "haar"
    c.pyramid.ratios = (2,)  # coarse-to-fine resolution ratios; () is Flow Matching
    c.pyramid.standardize = False  # divide scale s by its data std (paper: off for images)
    c.pyramid.stds = _optional(tuple)  # per-scale stds, or data's

    # --- Objective (dfm_jax.method.objective.ObjectiveConfig) ----------------------------
    c.objective = ml_collections.ConfigDict()
    c.objective.stage_probs = (0.9, 0.1)  # p_q; (1.0,) for Flow Matching
    c.objective.current_location = 0.0
    c.objective.current_scale = 1.0
    c.objective.earlier_location = 1.5  # the authors' code uses 2.0
    c.objective.earlier_scale = 1.0
    c.objective.stage_sampling = "per_example"  # or "per_batch" (authors' code)
    c.objective.label_dropout = 0.1

    # --- Model (dfm_jax.models.dit.DiTConfig) -------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.size = "XL"  # S | B | L | XL
    c.model.patch_sizes = (1, 2)  # one per scale, equal token grids
    c.model.depth = _optional(int)  # overrides the size's depth
    c.model.width = _optional(int)
    c.model.num_heads = _optional(int)
    c.model.positions = "rope"  # "rope" (paper) | "sincos" (authors' reimplementation)
    c.model.stage_embedding = True
    c.model.preconditioning = False
    c.model.attention_impl = _optional(str)  # xla | cudnn | None
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
    c.model.remat = False
    c.model.remat_policy = "nothing_saveable"

    # --- Optimizer --------------------------------------------------------------------------
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 10_000  # linear warm-up from 0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.99
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.01
    c.optimizer.grad_clip = 1.0  # global-norm clipping; 0 disables
    c.optimizer.ema_decay = 0.9999
    c.optimizer.ema_warmup = True  # decay min(ema_decay, (1 + step) / (10 + step))

    # --- Data (dfm_jax.data) ------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"
    c.data.dir = ""
    c.data.split = "train"
    c.data.resolution = 32
    c.data.channels = 3
    c.data.num_classes = 10
    c.data.tfds_name = ""
    c.data.image_key = "image"
    c.data.label_key = "label"
    c.data.download = False
    c.data.latent_sample = False
    c.data.worker_count = 0

    # --- Autoencoder (latent configs; dfm_jax.models.autoencoder) ------------------------------
    # Empty name: the model works on pixels. Otherwise samples are decoded with this
    # autoencoder for grids, previews and metrics (and `python -m dfm_jax.prepare` encodes
    # with it). Names: "sd-vae-ft-ema", "sd-vae-ft-mse", "flux-ae", "tiny" (tests).
    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.name = ""
    c.autoencoder.weights = ""  # diffusers diffusion_pytorch_model.safetensors (or its dir)
    c.autoencoder.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
    c.autoencoder.decode_tile = 0  # latent tile size for tiled decoding; 0 decodes whole

    # --- Sampling (periodic grids; eval sweeps override) --------------------------------------
    c.sampling = ml_collections.ConfigDict()
    c.sampling.steps_per_stage = (30, 10)
    c.sampling.thresholds = (0.9,)
    c.sampling.solver = "euler"
    c.sampling.cfg_scale = 1.0
    c.sampling.guidance_interval = (0.0, 1.0)
    c.sampling.grid_classes = 10  # rows of the sample grid (first classes)
    c.sampling.samples_per_class = 8
    c.sampling.preview_examples = 4
    return c


def _error(field: str, message: str) -> ValueError:
    return ValueError(f"config.{field}: {message}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks the whole config; raises ``ValueError`` naming the field and the fix."""
    for field in (
        "total_steps",
        "batch_size",
        "log_every",
        "checkpoint_every",
        "sample_every",
        "keep_checkpoints",
        "max_consecutive_nonfinite",
    ):
        if int(config[field]) < 1:
            raise _error(field, f"must be a positive integer, got {config[field]}")
    if config.pyramid.kind not in PYRAMID_KINDS:
        raise _error("pyramid.kind", f"must be one of {PYRAMID_KINDS}, got {config.pyramid.kind!r}")
    num_scales = len(config.pyramid.ratios) + 1
    if len(config.model.patch_sizes) != num_scales:
        raise _error(
            "model.patch_sizes",
            f"{tuple(config.model.patch_sizes)} has {len(config.model.patch_sizes)} entries but "
            f"pyramid.ratios {tuple(config.pyramid.ratios)} make {num_scales} scales",
        )
    for coarse, fine, ratio in zip(
        config.model.patch_sizes[:-1],
        config.model.patch_sizes[1:],
        config.pyramid.ratios,
        strict=True,
    ):
        if fine != coarse * ratio:
            raise _error(
                "model.patch_sizes",
                f"{tuple(config.model.patch_sizes)} do not give equal token grids for pyramid "
                f"ratios {tuple(config.pyramid.ratios)}: each patch size must be the previous "
                f"one times the ratio, e.g. {_matching_patches(config)}",
            )
    build_objective(config)  # stage_probs length, sum, locations
    if len(config.objective.stage_probs) != num_scales:
        raise _error(
            "objective.stage_probs",
            f"{tuple(config.objective.stage_probs)} must have one entry per scale ({num_scales})",
        )
    # The decomposition itself (kind, ratios); its stds may come from the data later.
    build_pyramid(config, stds=(1.0,) * num_scales)
    steps, thresholds = config.sampling.steps_per_stage, config.sampling.thresholds
    if len(steps) != num_scales or len(thresholds) != num_scales - 1:
        raise _error(
            "sampling",
            f"steps_per_stage {tuple(steps)} and thresholds {tuple(thresholds)} must have "
            f"{num_scales} and {num_scales - 1} entries for {num_scales} scales",
        )
    try:
        sampling.stage_schedule(tuple(steps), tuple(thresholds))
    except ValueError as e:
        raise _error("sampling", str(e)) from e
    if config.sampling.solver not in sampling.SOLVERS:
        raise _error(
            "sampling.solver",
            f"must be one of {sampling.SOLVERS}, got {config.sampling.solver!r}",
        )
    _validate_autoencoder(config)
    if num_devices is not None:
        mesh_sizes = parallel.resolve_mesh_shape(dict(config.mesh), num_devices)
        check_batch_size(config, mesh_sizes[0] * mesh_sizes[1], dict(config.mesh))


def _validate_autoencoder(config: ml_collections.ConfigDict) -> None:
    settings = config.autoencoder
    if settings.name and settings.name not in autoencoder.PRESETS:
        raise _error(
            "autoencoder.name",
            f"unknown autoencoder {settings.name!r}; use one of {sorted(autoencoder.PRESETS)} "
            "or '' for pixel space",
        )
    if settings.dtype not in ("float32", "bfloat16"):
        raise _error("autoencoder.dtype", f"must be float32 or bfloat16, got {settings.dtype!r}")
    if int(settings.decode_tile) < 0:
        raise _error("autoencoder.decode_tile", f"must be >= 0, got {settings.decode_tile}")
    if config.data.source == "array_record" and not settings.name:
        raise _error(
            "autoencoder.name",
            "data.source='array_record' trains on autoencoder latents; name the autoencoder "
            "that encoded them (e.g. sd-vae-ft-ema, flux-ae) so that samples can be decoded",
        )


def check_batch_size(config: ml_collections.ConfigDict, data_parallel: int, mesh_shape) -> None:
    """Raises unless ``config.batch_size`` splits evenly over the data-parallel devices."""
    if config.batch_size % data_parallel:
        raise _error(
            "batch_size",
            f"{config.batch_size} is not divisible by the {data_parallel} data-parallel "
            f"devices of mesh {mesh_shape}; use a multiple of {data_parallel}",
        )


def _matching_patches(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    patches = [int(config.model.patch_sizes[0])]
    for ratio in config.pyramid.ratios:
        patches.append(patches[-1] * ratio)
    return tuple(patches)


def build_pyramid(config: ml_collections.ConfigDict, stds=None) -> pyramid.Decomposition:
    """The decomposition; ``stds`` (e.g. from dataset metadata) when standardising."""
    p = config.pyramid
    ratios = tuple(int(r) for r in p.ratios)
    if p.kind == "haar":
        if any(r != 2 for r in ratios):
            raise _error("pyramid.ratios", f"the Haar pyramid has x2 levels only, got {ratios}")
        decomposition = pyramid.HaarDWT(len(ratios)) if ratios else pyramid.Laplacian(())
    else:
        decomposition = pyramid.Laplacian(ratios)
    if p.standardize:
        stds = p.stds if p.stds is not None else stds
        if stds is None:
            raise _error(
                "pyramid.stds",
                "standardize=True needs per-scale stds: set config.pyramid.stds or use a "
                "prepared dataset whose metadata records them",
            )
        decomposition = pyramid.Standardized(decomposition, tuple(stds))
    return decomposition


def pyramid_name(config: ml_collections.ConfigDict) -> str:
    """Key of this decomposition's per-scale stds in dataset metadata, e.g. "laplacian_2x2"."""
    ratios = "x".join(str(int(r)) for r in config.pyramid.ratios) or "1"
    return f"{config.pyramid.kind}_{ratios}"


def data_scale_stds(config: ml_collections.ConfigDict, source) -> tuple[float, ...] | None:
    """Per-scale data stds: ``config.pyramid.stds`` if set, else the dataset's, else None."""
    if config.pyramid.stds is not None:
        return tuple(float(s) for s in config.pyramid.stds)
    return source.scale_stds(pyramid_name(config))


def preconditioning_stds(config: ml_collections.ConfigDict, stds) -> tuple[float, ...] | None:
    """sigma_s as the model sees the scales: 1 when standardised, else the data stds."""
    if not config.model.preconditioning:
        return None
    num_scales = len(config.pyramid.ratios) + 1
    if config.pyramid.standardize:
        return (1.0,) * num_scales
    if stds is None:
        raise _error(
            "model.preconditioning",
            "needs per-scale data stds: set config.pyramid.stds or use a prepared dataset "
            f"whose metadata records stds for {pyramid_name(config)!r}",
        )
    return tuple(stds)


def build_objective(config: ml_collections.ConfigDict) -> objective.ObjectiveConfig:
    try:
        return objective.ObjectiveConfig(**config.objective.to_dict())
    except ValueError as e:
        raise ValueError(f"config.objective: {e}") from e


def build_model_config(
    config: ml_collections.ConfigDict, in_channels: int, num_classes: int, scale_stds=None
) -> dit.DiTConfig:
    """The ``DiTConfig`` from ``config.model``; ``scale_stds`` feed preconditioning."""
    m = config.model
    overrides: dict[str, Any] = {
        name: m[name] for name in ("depth", "width", "num_heads") if m[name] is not None
    }
    return dit.dit_config(
        m.size,
        in_channels=in_channels,
        num_classes=num_classes,
        patch_sizes=tuple(m.patch_sizes),
        positions=m.positions,
        stage_embedding=m.stage_embedding,
        preconditioning=m.preconditioning,
        scale_stds=tuple(scale_stds) if scale_stds is not None else None,
        attention_impl=m.attention_impl,
        dtype=m.dtype,
        remat=m.remat,
        remat_policy=m.remat_policy,
        **overrides,
    )


def flow_matching_twin(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The single-scale Flow Matching baseline of a DFM config, at equal compute.

    One scale at full resolution with the finest scale's patch size (so the
    token grid, backbone, batch and optimizer are unchanged), ``p_q = (1,)``,
    and the same total number of sampling steps.
    """
    twin = ml_collections.ConfigDict(config.to_dict())
    twin.pyramid.ratios = ()
    twin.pyramid.stds = None
    twin.objective.stage_probs = (1.0,)
    twin.model.patch_sizes = (int(config.model.patch_sizes[-1]),)
    twin.model.stage_embedding = False
    twin.sampling.steps_per_stage = (int(sum(config.sampling.steps_per_stage)),)
    twin.sampling.thresholds = ()
    return twin
