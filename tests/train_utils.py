"""Shared pieces of the trainer tests (not a test module).

* ``tiny_config``: ``configs/demo.py`` shrunk to a model and data that train in
  milliseconds per step (as a ConfigDict; ``tiny_settings`` reads it into
  ``dfm_jax.config.Settings``); the subprocess tests pass the same overrides as
  ``--config.*`` flags (``cli_flags``), so every test compiles the same programs.
* ``persistent_compile_cache``: one XLA compilation cache directory per pytest
  session, shared with the subprocesses (``subprocess_env``). Compiling the train
  step of even the tiny model takes 10-20 s on a CPU; with the cache every later
  build of the same program (another ``loop.run``, a resumed run, a subprocess)
  loads it instead.
* ``random_params``: a method's parameters drawn at random in one compiled program.
* Tree helpers: host copies and bitwise / tolerance comparisons that name the
  first differing leaf.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental.compilation_cache import compilation_cache
from xla_flags import xla_flags

from dfm_jax import config as config_lib
from dfm_jax.training import setup as setup_lib

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.py"

#: Overrides of configs/demo.py: 8x8 one-channel synthetic data, a one-block width-32
#: DiT, batch 8 (one example per device of the 8-device test mesh), 2 + 2 sampling steps
#: and a 2x2 sample grid. warmup_steps=2 makes step 0 a zero-learning-rate step.
TINY = {
    "batch_size": 8,
    "data.source": "synthetic",
    "data.resolution": 8,
    "data.channels": 1,
    "data.num_classes": 4,
    "model.patch_sizes": (1, 2),
    "model.depth": 1,
    "model.width": 32,
    "model.num_heads": 2,
    "optimizer.warmup_steps": 2,
    "optimizer.ema_decay": 0.9,
    "sampling.steps_per_stage": (2, 2),
    "sampling.grid_classes": 2,
    "sampling.samples_per_class": 2,
    "sampling.preview_examples": 2,
    "evals.fd_fmnist.every": 0,  # no FD-FMNIST classifier in every trainer test
}


def demo_config() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("demo_config", DEMO_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(overrides: dict | None = None) -> ml_collections.ConfigDict:
    """configs/demo.py with ``TINY`` and then ``overrides`` ({"a.b": value}) applied."""
    config = demo_config()
    for name, value in {**TINY, **(overrides or {})}.items():
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def tiny_settings(overrides: dict | None = None) -> config_lib.Settings:
    """``tiny_config(overrides)`` read into validated settings."""
    return config_lib.read(tiny_config(overrides))


def data_parallel_setup(settings: config_lib.Settings):
    """``setup.build(settings)`` on the default layout, checked: mesh {"data": 8}
    (parameters replicated)."""
    setup = setup_lib.build(settings)
    assert dict(setup.mesh.shape) == {"data": 8, "fsdp": 1, "model": 1}
    return setup


def cli_flags(overrides: dict | None = None) -> list[str]:
    """``--config.<name>=<value>`` flags giving ``tiny_config(overrides)`` from demo.py."""
    return [f"--config.{name}={value}" for name, value in {**TINY, **(overrides or {})}.items()]


_cache_dir: str | None = None


def compile_cache_dir() -> str:
    """This session's compilation cache directory (created once, removed at exit)."""
    global _cache_dir
    if _cache_dir is None:
        _cache_dir = tempfile.mkdtemp(prefix="dfm_jax_tests_xla_cache_")
        atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    return _cache_dir


@contextlib.contextmanager
def persistent_compile_cache():
    """Caches every compiled program of this process in ``compile_cache_dir()``."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", compile_cache_dir())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


_CLUSTER_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "SLURM_JOB_ID",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def subprocess_env(num_devices: int = 8, **extra: str) -> dict[str, str]:
    """Environment of a CPU-only JAX subprocess sharing this session's compilation cache.

    Variables that would make ``dfm_jax.main`` join a cluster (e.g. when the tests run
    inside a SLURM job) are removed; pass them in ``extra`` to start several processes.
    """
    env = {name: value for name, value in os.environ.items() if name not in _CLUSTER_VARIABLES}
    env.update(
        XLA_FLAGS=xla_flags(num_devices),
        JAX_PLATFORMS="cpu",
        JAX_DEFAULT_MATMUL_PRECISION="highest",  # as tests/conftest.py
        JAX_COMPILATION_CACHE_DIR=compile_cache_dir(),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    env.update(extra)
    return env


def main_command(workdir, overrides: dict | None = None, config=DEMO_CONFIG) -> list[str]:
    """``python -m dfm_jax.main`` on ``config`` with the tiny overrides."""
    return [
        sys.executable,
        "-m",
        "dfm_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *cli_flags(overrides),
    ]


def run_main(workdir, overrides: dict | None = None, timeout: float = 240, cwd=REPO) -> str:
    """Runs ``python -m dfm_jax.main`` to completion in ``cwd``; returns its log (stderr).

    Fails the test with the log's tail when the exit status is not 0.
    """
    result = subprocess.run(
        main_command(workdir, overrides),
        env=subprocess_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"dfm_jax.main exited with {result.returncode}:\n{tail(result.stderr)}"
        )
    return result.stderr


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def checkpoint_steps(directory) -> list[int]:
    """Steps of the complete checkpoints in ``directory`` (Orbax renames them into place)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def random_params(method, key: int = 0, scale: float = 0.1):
    """``method``'s parameter tree (unboxed), every leaf ``scale * N(0, 1)``.

    Random rather than initialised weights, because the DiT's output heads start at zero
    and would hide what a test checks. The shapes come from ``jax.eval_shape(method.init)``
    (which still runs the method's shape checks); one normal vector of every parameter,
    drawn from ``key(key + 1)``, is cut into the leaves in tree order inside one ``jit``:
    one small compilation instead of the hundreds that an eager Flax ``init`` and a draw
    per leaf cost on a CPU.
    """
    leaves, tree = jax.tree.flatten(nn.unbox(jax.eval_shape(method.init, jax.random.key(key))))
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    offsets = np.cumsum([0, *sizes])

    @jax.jit
    def draw(draw_key):
        flat = scale * jax.random.normal(draw_key, (int(offsets[-1]),))
        return tree.unflatten(
            [
                flat[start:stop].reshape(leaf.shape).astype(leaf.dtype)
                for start, stop, leaf in zip(offsets[:-1], offsets[1:], leaves, strict=True)
            ]
        )

    return draw(jax.random.key(key + 1))


def to_host(tree):
    """A numpy copy of a pytree of (possibly sharded, possibly donated later) arrays."""
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _pairs(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert jax.tree.structure(a) == jax.tree.structure(b), (tree_a, tree_b)
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        yield jax.tree_util.keystr(path), np.asarray(x), np.asarray(y)


def assert_trees_equal(a, b, what: str = "trees") -> None:
    """Bitwise equality of every leaf (same shapes and dtypes)."""
    for path, x, y in _pairs(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}{path}: {x.shape} vs {y.shape}"
        if not np.array_equal(x, y, equal_nan=True):
            diff = np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))
            raise AssertionError(f"{what}{path} differ (max abs difference {diff:.3g})")


def assert_trees_close(a, b, *, rtol: float, atol: float, what: str = "trees") -> None:
    for path, x, y in _pairs(a, b):
        assert x.shape == y.shape, f"{what}{path}: {x.shape} vs {y.shape}"
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"{what}{path}")


def max_abs_difference(a, b) -> float:
    return max(
        float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0))
        for _, x, y in _pairs(a, b)
    )


def trees_differ(a, b) -> bool:
    return any(not np.array_equal(x, y) for _, x, y in _pairs(a, b))


def grid_samples(setup, ema_params) -> np.ndarray:
    """The trainer's sample-grid images recomputed: ``method.generate`` from the sample
    key ``fold_in(key(seed), 2**31 - 1)`` on the grid labels, decoded to pixels."""
    import jax.numpy as jnp

    from dfm_jax.training import decoding

    sampling_settings = setup.settings.sampling
    labels = jnp.repeat(
        jnp.arange(sampling_settings.grid_classes, dtype=jnp.int32) % setup.num_classes,
        sampling_settings.samples_per_class,
    )
    key = jax.random.fold_in(jax.random.key(setup.settings.seed), 2**31 - 1)
    sampler = sampling_settings.sampler()
    with setup.context():
        images = jax.jit(lambda p: setup.method.generate(p, key, labels, sampler))(ema_params)
        codec = decoding.load_codec(setup.settings.autoencoder, setup.mesh, required=False)
        if codec is not None:
            images = codec.decode(images)
    return np.asarray(jax.device_get(images))


def assert_grid_holds(grid: np.ndarray, images: np.ndarray, columns: int, padding: int = 2):
    """Each cell of a ``viz.image_grid`` PNG (right of its label column) is its image in
    uint8, upscaled by the grid's integer factor (off by at most 1 for float rounding
    across programs), and the padding between cells is black."""
    from dfm_jax.utils import viz

    cells = viz.upscale(viz.to_uint8(images))
    count, height, width, channels = cells.shape
    rows = -(-count // columns)
    body_width = columns * (width + padding) + padding
    assert grid.shape[0] == rows * (height + padding) + padding, (grid.shape, cells.shape)
    body = grid.reshape(grid.shape[0], grid.shape[1], -1)[:, -body_width:]
    mask = np.ones(body.shape[:2], bool)
    for index, cell in enumerate(cells):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        got = body[top : top + height, left : left + width].astype(np.int32)
        difference = np.abs(got - cell.reshape(height, width, channels).astype(np.int32))
        assert difference.max() <= 1, f"cell {index}: max difference {difference.max()}"
        mask[top : top + height, left : left + width] = False
    assert not body[mask].any(), "the padding is not black"
