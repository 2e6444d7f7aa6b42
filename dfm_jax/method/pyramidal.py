"""Pyramidal Flow (Jin et al. 2024, arXiv 2410.05954): one flow whose resolution grows in time.

Time convention (this project's, everywhere below): ``t = 0`` is noise, ``t = 1`` is data,
``x_t = t x + (1 - t) eps``. The paper and its code (jy0205/Pyramid-Flow,
``diffusion_schedulers/scheduling_flow_matching.py`` and
``pyramid_dit/pyramid_dit_for_video_gen_pipeline.py``) write ``sigma = 1 - t`` (sigma = 1
is noise); every formula here is that code's, rewritten with ``t = 1 - sigma``.

Stages k = 0 .. K-1 run coarse to fine, stage k at resolution ``H / 2^(K-1-k)`` (x2 per
level only: the re-noising works on 2x2 blocks). Stage k owns the window ``[s_k, e_k]`` of
the data fraction t, with ``s_0 = 0``, ``e_(K-1) = 1`` and ``e_(k-1) = s_k`` = the stage
boundaries (``PyramidalSchedule.boundaries``; default equal windows, the code's
``stage_range = [0, 1/3, 2/3, 1]``).

Training at stage k (``training_points``): one full-resolution noise n; the noise of a
level below is ``2 x bilinear_down(n)`` (a 2x2 mean times 2: unit variance again); the
clean latents ``x_k`` are successive bilinear (no antialias, = 2x2 mean) downsamplings.
With ``s'_k = s_k / (sqrt(1 + 1/gamma) (1 - s_k) + s_k)`` (the corrected start, the code's
``corrected_sigma``; ``s'_0 = 0``)::

    x_start = (1 - s'_k) n_k + s'_k up_nearest(x_(k-1))     (x_start = n_0 at stage 0)
    x_end   = (1 - e_k) n_k + e_k x_k                       (x_end = x_(K-1) at the last)
    x_tau   = (1 - tau) x_start + tau x_end,  tau ~ U(0, 1)  target v = x_end - x_start

(the code's ``r = 1 - tau``, target ``x_s - x_e = -v``), MSE per example. The batch is split
into K equal contiguous parts, part k trained at stage k (the code's ``sample_ratios =
[1, 1, 1]``); the loss is the mean over all examples.

Inference jump into stage k >= 1 (``jump``), with ``s = s_k`` (the UNcorrected start, the
code's ``ori_start_sigmas``)::

    x <- up_nearest(x);  x <- alpha x + beta n',
    alpha = 1 / (sqrt(1 + 1/gamma) (1 - s) + s),  beta = alpha (1 - s) / sqrt(gamma)

with block noise n' whose every 2x2 block is ``N(0, (1 + gamma) I - gamma 11^T)``
(``block_noise``). Why it is right: the end state of stage k - 1 is ``(1 - s) n_(k-1) +
s x_(k-1)``; up-sampled, its noise is constant on each 2x2 block (covariance ``11^T``);
adding ``beta n'`` makes the total noise covariance ``alpha^2 (1 - s)^2 (1 + 1/gamma) I``,
white with std ``1 - alpha s = 1 - s'_k``, and the signal coefficient is ``alpha s = s'_k``:
exactly the stage-k training start point. The correction of the start ``s -> s'`` is what
makes the two agree; ``tests/test_pyramidal.py`` checks it on Gaussian data.

Which version, and why. We implement the released code's formulas (above). The paper
(eqs. 20, 25-27, as quoted in jy0205/Pyramid-Flow issue #249, "Implementation does not match
mathematical derivation in paper?") writes the same jump the other way round and with the
opposite sign of gamma: with ``g = -gamma_paper`` (the code's gamma; paper gamma = -1/3 is
a pairwise correlation of -1/3) it gives the END of the previous stage from the new
start, ``e = s' sqrt(1 + g) / ((1 - s') sqrt(g) + s' sqrt(1 + g))``, and the rescaling
``x <- (s' / e) up(x) + ((1 - s') / sqrt(1 + g)) n'``. Solving the first for ``s'`` gives
exactly the code's ``s' = e / (sqrt(1 + 1/g) (1 - e) + e)`` (with ``e`` the code's ``s``
above), and then ``s' / e = alpha`` and ``(1 - s') / sqrt(1 + g) = alpha (1 - e) / sqrt(g)
= beta``: the two are one map for every gamma (for gamma = 1/3: ``s' = e / (2 - e)``, the
code's commented-out line, and the paper's eq. 26 ``e = 2 s' / (1 + s')``). The reported
mismatch is this change of direction and sign, not a different method. We follow the code
because it is what produced the released models (parametrised by the stage boundaries, the
uncorrected starts, as its ``stage_range``), and the identity above shows that the jump
preserves the marginal exactly (signal ``s'``, white noise ``1 - s'``), which our Gaussian
tests verify numerically. ``gamma = 1/3`` (the code's default) is the largest value for
which the block covariance is positive semidefinite (its eigenvalue along ``1`` is
``1 - 3 gamma``); then the block mean of ``n'`` is exactly 0 and the jump leaves the
low-frequency content (the block means) untouched up to the factor ``alpha``.

Model time. The network sees one scalar time per example, the code's ``timestep_ratio``
made global: stage k's window in model time is ``[c_k, c_(k+1)]`` with ``c`` the cumulative
corrected stage lengths ``e_k - s'_k`` normalised to 1 (the code's ``timestep_ratios``), and
``t_model = c_k + tau (c_(k+1) - c_k)``. The network is ONE single-scale DiT (one patch
embedder, one head) applied at every stage's resolution: the token count varies with the
stage (RoPE or sin-cos positions are computed from the token grid, ``models/dit.py``), as
in Pyramid-Flow, so coarse stages are cheaper.

Sampling (``sample``): noise at the coarsest resolution (distributed exactly as the code's
``2^(K-1)``-fold ``2 x bilinear_down`` of full-resolution noise), ``T_k`` equal steps of a
``solvers`` step function (Euler or Heun) in tau over each stage, the jump between stages,
classifier-free guidance with ``guidance.make_evaluators``, the guidance interval on the
model time.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfm_jax.method import guidance, objective, pyramid, solvers
from dfm_jax.method.schedule import SamplerSettings
from dfm_jax.models import dit

Array = jax.Array

#: ``velocity_fn(k, x, tau, labels) -> v``: stage k (static int), state ``x`` (B', H_k,
#: W_k, C) or (B', T, H_k, W_k, C), local time ``tau`` (B',) in [0, 1] (0 = stage start),
#: labels (B',) int32; ``v`` shaped like ``x`` (d x / d tau).
StageVelocityFn = Callable[[int, Array, Array, Array], Array]


@dataclasses.dataclass(frozen=True)
class PyramidalSchedule:
    """The stage windows and the re-noising constants (module docstring).

    Attributes:
      num_stages: K >= 2.
      boundaries: ``(b_1, ..., b_(K-1))`` increasing inside (0, 1), the uncorrected data
        fraction at which stage k - 1 ends and stage k starts; None: equal windows k / K.
      gamma: the block-noise correlation, in (0, 1/3] (code and paper: 1/3).
    """

    num_stages: int
    boundaries: tuple[float, ...] | None = None
    gamma: float = 1.0 / 3.0

    def __post_init__(self):
        k = self.num_stages
        if not isinstance(k, int) or k < 2:
            raise ValueError(f"num_stages must be an int >= 2, got {k!r}")
        bounds = self.boundaries
        if bounds is None:
            bounds = tuple(i / k for i in range(1, k))
        bounds = tuple(float(b) for b in bounds)
        if len(bounds) != k - 1:
            raise ValueError(f"boundaries: {k} stages need {k - 1} boundaries, got {bounds}")
        edges = (0.0, *bounds, 1.0)
        if any(not (a < b) for a, b in itertools.pairwise(edges)):
            raise ValueError(f"boundaries must increase strictly inside (0, 1), got {bounds}")
        object.__setattr__(self, "boundaries", bounds)
        if not 0.0 < self.gamma <= 1.0 / 3.0 + 1e-12:
            raise ValueError(
                f"gamma must lie in (0, 1/3] (the 2x2 block covariance (1 + gamma) I - gamma "
                f"11^T is positive semidefinite only there), got {self.gamma}"
            )

    def start(self, k: int) -> float:
        """``s_k``, the uncorrected data fraction at the start of stage k (0 for k = 0)."""
        return 0.0 if k == 0 else self.boundaries[k - 1]

    def end(self, k: int) -> float:
        """``e_k``, the data fraction at the end of stage k (1 for the last stage)."""
        return 1.0 if k == self.num_stages - 1 else self.boundaries[k]

    def alpha(self, k: int) -> float:
        """``1 / (sqrt(1 + 1/gamma) (1 - s_k) + s_k)``, the jump's signal gain into stage k."""
        s = self.start(k)
        return 1.0 / (math.sqrt(1.0 + 1.0 / self.gamma) * (1.0 - s) + s)

    def beta(self, k: int) -> float:
        """``alpha (1 - s_k) / sqrt(gamma)``, the jump's block-noise gain into stage k."""
        return self.alpha(k) * (1.0 - self.start(k)) / math.sqrt(self.gamma)

    def corrected_start(self, k: int) -> float:
        """``s'_k = alpha_k s_k``: the data fraction of stage k's training start point."""
        return self.alpha(k) * self.start(k)

    def model_time_edges(self) -> np.ndarray:
        """``(c_0 = 0, ..., c_K = 1)``: stage k's window of model time (float64)."""
        lengths = [self.end(k) - self.corrected_start(k) for k in range(self.num_stages)]
        edges = np.concatenate([[0.0], np.cumsum(lengths)]) / sum(lengths)
        edges[-1] = 1.0
        return edges

    def model_time(self, k: int, tau):
        """``c_k + tau (c_(k+1) - c_k)``: the network's time input at local time tau."""
        edges = self.model_time_edges()
        return edges[k] + tau * (edges[k + 1] - edges[k])


# ------------------------------------------------------------------------------ resizing


def nearest_up(x: Array) -> Array:
    """x2 nearest-neighbour upsampling of the spatial axes of ``(..., H, W, C)``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)


def bilinear_down(x: Array) -> Array:
    """x2 bilinear downsampling (half-pixel centres, no antialias: the 2x2 mean)."""
    return pyramid.resize_bilinear(x, x.shape[-3] // 2, x.shape[-2] // 2)


def _levels(x: Array, num_stages: int, gain: float) -> list[Array]:
    levels = [x]
    for _ in range(num_stages - 1):
        levels.insert(0, gain * bilinear_down(levels[0]))
    return levels


def clean_pyramid(x: Array, num_stages: int) -> list[Array]:
    """``[x_0, ..., x_(K-1) = x]``, coarsest first: successive x2 bilinear downsamplings."""
    return _levels(x, num_stages, 1.0)


def noise_pyramid(noise: Array, num_stages: int) -> list[Array]:
    """``[n_0, ..., n_(K-1) = noise]``: each level ``2 x bilinear_down`` of the next."""
    return _levels(noise, num_stages, 2.0)


def stage_shapes(shape: Sequence[int], num_stages: int) -> list[tuple[int, ...]]:
    """Shapes of the K stages for a full-resolution ``shape`` ``(..., H, W, C)``."""
    *lead, h, w, c = shape
    scale = 2 ** (num_stages - 1)
    if h % scale or w % scale:
        raise ValueError(
            f"spatial size {h}x{w} is not divisible by {scale}, needed by {num_stages} "
            "Pyramidal Flow stages (x2 per stage)"
        )
    return [
        (*lead, h // 2 ** (num_stages - 1 - k), w // 2 ** (num_stages - 1 - k), c)
        for k in range(num_stages)
    ]


# ------------------------------------------------------------------------------ noise


def block_noise(key: Array, shape: Sequence[int], gamma: float, dtype=jnp.float32) -> Array:
    """Noise whose every 2x2 spatial block is ``N(0, (1 + gamma) I - gamma 11^T)``.

    With ``w`` white and ``m`` its 2x2 block mean (broadcast back), the square root of the
    covariance gives ``sqrt(1 + gamma) (w - m) + sqrt(1 - 3 gamma) m``: unit variance,
    correlation ``-gamma`` within a block, independent blocks. ``shape`` ``(..., H, W, C)``
    with even H and W.
    """
    w = jax.random.normal(key, tuple(shape), dtype)
    m = nearest_up(bilinear_down(w))
    return math.sqrt(1.0 + gamma) * (w - m) + math.sqrt(max(1.0 - 3.0 * gamma, 0.0)) * m


def initial_noise(
    key: Array, full_shape: Sequence[int], schedule: PyramidalSchedule
) -> list[Array]:
    """``[n_0, n'_1, ..., n'_(K-1)]``: white noise at the coarsest resolution, then the
    block noise of every jump (``fold_in(key, k)`` for entry k), stage shapes of
    ``full_shape`` ``(B, ..., H, W, C)``."""
    shapes = stage_shapes(full_shape, schedule.num_stages)
    noise = [jax.random.normal(jax.random.fold_in(key, 0), shapes[0], jnp.float32)]
    for k in range(1, schedule.num_stages):
        noise.append(block_noise(jax.random.fold_in(key, k), shapes[k], schedule.gamma))
    return noise


# ------------------------------------------------------------------------------ training


def training_points(
    k: int,
    clean: Array,
    coarser: Array | None,
    noise: Array,
    schedule: PyramidalSchedule,
) -> tuple[Array, Array]:
    """Stage k's start and end points ``(x_start, x_end)`` (module docstring).

    Args:
      k: the stage.
      clean: ``x_k`` (B, ..., H_k, W_k, C); coarser: ``x_(k-1)`` at half the resolution
        (ignored, may be None, for k = 0).
      noise: ``n_k``, shaped like ``clean``.
    """
    if k == 0:
        start = noise
    else:
        s = schedule.corrected_start(k)
        start = (1.0 - s) * noise + s * nearest_up(coarser)
    e = schedule.end(k)
    end = clean if k == schedule.num_stages - 1 else (1.0 - e) * noise + e * clean
    return start, end


def interpolate(start: Array, end: Array, tau: Array) -> Array:
    """``(1 - tau) x_start + tau x_end`` with per-example ``tau`` (B,)."""
    tau = tau.reshape(tau.shape + (1,) * (start.ndim - 1)).astype(start.dtype)
    return (1.0 - tau) * start + tau * end


def jump(x: Array, block: Array, k: int, schedule: PyramidalSchedule) -> Array:
    """Into stage k: ``alpha_k up_nearest(x) + beta_k n'`` (``block``: ``n'`` at stage k)."""
    return schedule.alpha(k) * nearest_up(x) + schedule.beta(k) * block


# ------------------------------------------------------------------------------ sampling


def _stage_inputs(
    k: int, steps: int, last: bool, settings: SamplerSettings, schedule: PyramidalSchedule
) -> dict[str, np.ndarray]:
    """The scanned per-step inputs of stage k (``solvers`` and ``guidance`` layout, S = 1)."""
    tau = np.arange(steps + 1, dtype=np.float64) / steps
    model_t = schedule.model_time(k, tau)
    low, high = settings.guidance_interval
    guided = (settings.cfg_scale != 1.0) & (model_t >= low - 1e-9) & (model_t <= high + 1e-9)
    correct = np.full(steps, settings.solver == "heun")
    if last:
        correct[-1] = False  # never evaluate the network at t = 1 (as the DFM sampler)
    return {
        "t": tau[:-1, None].astype(np.float32),
        "t_next": tau[1:, None].astype(np.float32),
        "dt": np.full((steps, 1), 1.0 / steps, np.float32),
        "mask": np.ones((steps, 1), np.float32),
        "active": np.ones((steps, 1), bool),
        "guide": guided[:-1, None],
        "guide_next": guided[1:, None],
        "need": guided[:-1],
        "need_next": guided[1:],
        "correct": correct,
    }


def _run_stage(
    velocity_fn: StageVelocityFn,
    k: int,
    x: Array,
    labels: Array,
    settings: SamplerSettings,
    schedule: PyramidalSchedule,
    null_label: int | None,
) -> Array:
    """Integrates stage k from tau = 0 to 1 with ``settings.solver``: one ``lax.scan``."""
    inputs = _stage_inputs(
        k, settings.steps_per_stage[k], k == schedule.num_stages - 1, settings, schedule
    )

    def network(scales, t, mask, y):
        del mask
        return (velocity_fn(k, scales[0], t[:, 0], y),)

    evaluate, evaluate_next = guidance.make_evaluators(
        network,
        labels,
        (inputs["need"], inputs["need_next"][inputs["correct"]]),
        cfg_scale=settings.cfg_scale,
        null_label=null_label,
        batching=settings.guidance_batching,
    )
    step = solvers.SOLVERS[settings.solver if inputs["correct"].any() else "euler"]

    def body(state, inp):
        def bound(s, corrector):
            if corrector:
                return evaluate_next(
                    s, inp["t_next"], inp["mask"], inp["guide_next"], inp["need_next"]
                )
            return evaluate(s, inp["t"], inp["mask"], inp["guide"], inp["need"])

        new, _ = step(bound, state, inp)
        return new, None

    (x,), _ = jax.lax.scan(body, (x,), jax.tree.map(jnp.asarray, inputs))
    return x


def sample(
    velocity_fn: StageVelocityFn,
    noise: Sequence[Array],
    labels: Array,
    settings: SamplerSettings,
    schedule: PyramidalSchedule,
    *,
    null_label: int | None = None,
) -> list[Array]:
    """Pyramidal Flow sampling: stage 0 from ``noise[0]``, a jump with ``noise[k]`` before
    every later stage k, ``settings.steps_per_stage[k]`` equal steps per stage.

    Args:
      velocity_fn: ``StageVelocityFn``.
      noise: ``initial_noise(...)``: ``n_0`` (B, ..., H_0, W_0, C), then the block noises.
      labels: (B,) int32.
      settings: steps per stage (K entries), solver, cfg scale, guidance interval (on the
        model time); its thresholds are not read here (``check_thresholds``).
      schedule: the stage windows.
      null_label: the null class; required iff ``settings.cfg_scale != 1``.

    Returns:
      The K end-of-stage states, coarsest first; the last is the sample (float32).
    """
    settings.check_num_scales(schedule.num_stages, what="the Pyramidal Flow schedule")
    if len(noise) != schedule.num_stages:
        raise ValueError(f"noise: need {schedule.num_stages} arrays, got {len(noise)}")
    if settings.cfg_scale != 1.0 and null_label is None:
        raise ValueError(f"cfg_scale = {settings.cfg_scale} needs null_label")
    labels = jnp.asarray(labels, jnp.int32)
    x = jnp.asarray(noise[0], jnp.float32)
    ends = []
    for k in range(schedule.num_stages):
        if k:
            x = jump(x, jnp.asarray(noise[k], jnp.float32), k, schedule)
        x = _run_stage(velocity_fn, k, x, labels, settings, schedule, null_label)
        ends.append(x)
    return ends


def check_thresholds(settings: SamplerSettings, schedule: PyramidalSchedule) -> None:
    """Raises ``ValueError`` unless ``settings.thresholds`` are the trained boundaries.

    The stage windows are fixed in training; a sampler asking for other thresholds (e.g.
    an evaluation sweep over tau) would silently sample another process.
    """
    if not np.allclose(settings.thresholds, schedule.boundaries, rtol=0, atol=1e-6):
        raise ValueError(
            f"thresholds {settings.thresholds}: Pyramidal Flow's stage boundaries are fixed "
            f"in training to {schedule.boundaries}; set sampling.thresholds to them"
        )


# ------------------------------------------------------------------------------ the method


@dataclasses.dataclass(frozen=True)
class PyramidalFlow:
    """Pyramidal Flow behind the ``methods.Method`` interface (registered there).

    Attributes:
      model: a single-scale DiT (``patch_sizes == (p,)``), applied at every stage's
        resolution (a token grid of ``H_k / p``).
      schedule: the stage windows and gamma.
      example_shape: one example at full resolution, ``(H, W, C)`` or ``(T, H, W, C)``.
      num_classes: class count; label ``num_classes`` is the null class.
      label_dropout: probability of the null label in training (classifier-free guidance).
    """

    name = "pyramidal"
    model: dit.DiT
    schedule: PyramidalSchedule
    example_shape: tuple[int, ...]
    num_classes: int
    label_dropout: float = 0.1

    def __post_init__(self):
        if self.model.config.num_scales != 1:
            raise ValueError(
                f"Pyramidal Flow uses one single-scale DiT for every stage; got patch sizes "
                f"{self.model.config.patch_sizes}"
            )
        for shape in self.scale_shapes:  # every stage's token grid must be valid
            dit.token_grid(self.model.config, [shape])

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages

    @property
    def scale_shapes(self) -> list[tuple[int, ...]]:
        """Per-example shapes of the K stages, coarsest first."""
        return stage_shapes(self.example_shape, self.num_stages)

    def apply(self, params, k: int, x: Array, tau: Array, labels: Array) -> Array:
        """The network's velocity ``d x / d tau`` at stage k (``StageVelocityFn`` at params)."""
        t = jnp.asarray(self.schedule.model_time(k, tau), jnp.float32)[:, None]
        mask = jnp.ones_like(t)
        return self.model.apply({"params": params}, (x,), t, mask, labels)[0]

    def init(self, key: Array):
        inputs = dit.dummy_inputs(self.model.config, [self.scale_shapes[0]], batch_size=1)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), inputs)
        return self.model.init(key, *zeros)["params"]

    def loss(self, params, images: Array, labels: Array, key: Array):
        """The batch split into K equal parts, part k trained at stage k (module docstring).

        Metrics: ``loss_stage{k}`` (k = 1..K), the MSE of each part.
        """
        batch, stages = images.shape[0], self.num_stages
        if batch % stages:
            raise ValueError(f"batch {batch} must be divisible by the {stages} stages")
        key_noise, key_tau, key_labels = jax.random.split(key, 3)
        images = images.astype(jnp.float32)
        clean = clean_pyramid(images, stages)
        noise = noise_pyramid(jax.random.normal(key_noise, images.shape, jnp.float32), stages)
        labels = objective.drop_labels(key_labels, labels, self.label_dropout, self.num_classes)
        part, losses, metrics = batch // stages, [], {}
        for k in range(stages):
            rows = slice(k * part, (k + 1) * part)
            coarser = clean[k - 1][rows] if k else None
            start, end = training_points(k, clean[k][rows], coarser, noise[k][rows], self.schedule)
            tau = jax.random.uniform(jax.random.fold_in(key_tau, k), (part,), jnp.float32)
            prediction = self.apply(params, k, interpolate(start, end, tau), tau, labels[rows])
            error = jnp.square(prediction - (end - start)).reshape(part, -1).mean(axis=1)
            losses.append(error)
            metrics[f"loss_stage{k + 1}"] = error.mean()
        return jnp.concatenate(losses).mean(), metrics

    def generate(
        self, params, key: Array, labels: Array, sampler: SamplerSettings, *, previews: bool = False
    ):
        """Samples ``(B, *example_shape)``; previews: the K end-of-stage states, coarsest
        first (still partly noisy for k < K - 1: stage k ends at t = e_k), last = sample."""
        sampler.check_num_scales(self.num_stages, what="the Pyramidal Flow model")
        check_thresholds(sampler, self.schedule)
        noise = initial_noise(key, (labels.shape[0], *self.example_shape), self.schedule)
        ends = sample(
            functools.partial(self.apply, params),
            noise,
            labels,
            sampler,
            self.schedule,
            null_label=self.num_classes,
        )
        return (ends[-1], ends) if previews else ends[-1]

    def forward_flops(self) -> int:
        """The mean over stages of one forward pass at that stage's resolution: the expected
        FLOPs per training example (the batch is split equally over the stages)."""
        total = sum(dit.forward_flops(self.model.config, [s]) for s in self.scale_shapes)
        return total // self.num_stages
