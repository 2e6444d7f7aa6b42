"""The train-step, sampling and input-pipeline benchmarks behind ``python -m dfm_jax.bench``.

Library half of the CLI (``dfm_jax/bench.py`` parses the flags and prints): every model
is built with the real ``setup``, its step compiled and timed on a fixed synthetic batch
in interleaved rounds (``benchmark``), optionally beside the PyTorch peer
(``dfm_jax.peers.client``); ``benchmark_sampling`` times the sampler unguided and
guided; ``benchmark_data`` the Grain input pipeline; ``attention_errors`` compares cuDNN
with XLA attention. Results are dataclasses (``Result``, ``SamplingResult``) and
Markdown tables (``markdown``, ``sampling_markdown``).
"""

from __future__ import annotations

import dataclasses
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from dfm_jax import config as config_lib
from dfm_jax import data, parallel
from dfm_jax.method import generation
from dfm_jax.peers import client
from dfm_jax.training import perf
from dfm_jax.training import setup as setup_lib


@dataclasses.dataclass
class Result:
    name: str
    params_millions: float
    forward_gflops_per_example: float
    step_seconds: float
    examples_per_second: float
    model_tflops_per_device: float
    matmul_tflops_per_device: float
    mfu_measured: float
    mfu_published: float | None
    compiled_bytes: int
    peak_bytes_in_use: int | None
    total_steps: int
    peak_rss_bytes: int | None = None  # the process's peak resident memory (CPU)


def _compiled_bytes(compiled) -> int:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return 0
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def _peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_bytes_in_use() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


@dataclasses.dataclass
class _Runner:
    """One model's compiled step, its state and batch, and the step times so far."""

    name: str
    settings: config_lib.Settings
    setup: setup_lib.Setup
    step_fn: setup_lib.MeshBound
    state: object
    batch: object
    key: jax.Array
    compiled_bytes: int
    times: list[float] = dataclasses.field(default_factory=list)

    def run(self, steps: int) -> None:
        """Timed steps, each waited for (so the times do not overlap)."""
        for _ in range(steps):
            start = time.perf_counter()
            self.state, metrics = self.step_fn(self.state, self.batch, self.key)
            jax.block_until_ready((self.state, metrics))
            self.times.append(time.perf_counter() - start)


def prepare(settings: config_lib.Settings, name: str, warmup: int) -> _Runner:
    """Builds, compiles and warms up the real train step on a fixed synthetic batch."""
    synthetic = dataclasses.replace(
        settings.data, source="synthetic", num_examples=max(settings.batch_size, 64)
    )
    settings = dataclasses.replace(settings, data=synthetic)
    setup = setup_lib.build(settings)
    init_key, train_key = jax.random.split(jax.random.key(settings.seed))
    state = setup_lib.initial_state(setup, init_key)
    iterator = data.make_train_iterator(
        setup.source, global_batch_size=settings.batch_size, seed=settings.seed
    )
    batch = parallel.make_global_batch(next(iterator), setup.mesh, parallel.BATCH_AXES)
    step_fn = setup_lib.compile_train_step(setup)
    compiled_bytes = _compiled_bytes(step_fn.lower(state, batch, train_key).compile())
    runner = _Runner(name, settings, setup, step_fn, state, batch, train_key, compiled_bytes)
    runner.run(1 + warmup)  # the first call compiles
    runner.times.clear()
    return runner


def summarize(runner: _Runner, matmul_flops: float) -> Result:
    settings, setup = runner.settings, runner.setup
    step_seconds = float(np.median(runner.times))
    forward = setup.method.forward_flops()
    model_flops = perf.TRAIN_FLOPS_PER_FORWARD * forward * settings.batch_size / step_seconds
    model_flops /= jax.device_count()
    published = perf.published_peak_flops()
    return Result(
        name=runner.name,
        params_millions=sum(x.size for x in jax.tree.leaves(runner.state.params)) / 1e6,
        forward_gflops_per_example=forward / 1e9,
        step_seconds=step_seconds,
        examples_per_second=settings.batch_size / step_seconds,
        model_tflops_per_device=model_flops / 1e12,
        matmul_tflops_per_device=matmul_flops / 1e12,
        mfu_measured=model_flops / matmul_flops,
        mfu_published=model_flops / published if published else None,
        compiled_bytes=runner.compiled_bytes,
        peak_bytes_in_use=_peak_bytes_in_use(),
        total_steps=settings.total_steps,
        peak_rss_bytes=_peak_rss_bytes(),
    )


def peer_result(peer: client.TorchPeer, times: list[float], dfm: Result) -> Result:
    """The PyTorch peer's figures; its FLOPs are the DFM model's (the same network)."""
    step_seconds = float(np.median(times))
    model_flops = dfm.model_tflops_per_device * 1e12 * dfm.step_seconds / step_seconds
    matmul = dfm.matmul_tflops_per_device * 1e12
    return Result(
        name=f"PyTorch DFM-SiT ({peer.info['mode']}, {peer.info['threads']} threads)",
        params_millions=peer.info["params"] / 1e6,
        forward_gflops_per_example=dfm.forward_gflops_per_example,
        step_seconds=step_seconds,
        examples_per_second=dfm.examples_per_second * dfm.step_seconds / step_seconds,
        model_tflops_per_device=model_flops / 1e12,
        matmul_tflops_per_device=dfm.matmul_tflops_per_device,
        mfu_measured=model_flops / matmul,
        mfu_published=None,
        compiled_bytes=0,
        peak_bytes_in_use=None,
        total_steps=dfm.total_steps,
        peak_rss_bytes=peer.peak_rss_bytes,
    )


#: ``--methods`` names: the table's label and the twin of a DFM config.
METHODS = {
    "fm": lambda settings: "FM (1 scale)",
    "dfm": lambda settings: f"DFM ({settings.num_scales} scales)",
    "pyramidal": lambda settings: f"Pyramidal ({settings.num_scales} stages)",
    "cascaded": lambda settings: "Cascaded (2 models)",
}
_TWINS = {
    "fm": config_lib.flow_matching_twin,
    "dfm": lambda config: config,
    "pyramidal": lambda config: config_lib.pyramidal_twin(
        config, ratios=tuple(config.pyramid.ratios)
    ),
    "cascaded": config_lib.cascaded_twin,
}


def method_configs(config, methods: list[str]) -> dict[str, config_lib.Settings]:
    """{table label: settings} of ``methods`` (FM first: the baseline) for a DFM config."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    configs = {}
    for method in ["fm", *(m for m in dict.fromkeys(methods) if m != "fm")]:
        settings = config_lib.read(_TWINS[method](config))
        configs[METHODS[method](settings)] = settings
    return configs


def benchmark(
    configs: dict,
    steps: int,
    warmup: int,
    rounds: int,
    matmul_flops: float,
    peer: client.TorchPeer | None = None,
) -> tuple[list[Result], list[_Runner]]:
    """Times every model's step (and the peer's) in interleaved rounds, so drift hits all
    alike; the peer's result, timed as the DFM model's peer, comes last.

    Args:
      configs: name -> settings, in the order of the table.
      steps: timed steps per model in all (split over ``rounds``).
    """
    runners = [prepare(settings, name, warmup) for name, settings in configs.items()]
    per_round, peer_times = -(-steps // rounds), []
    for _ in range(rounds):
        for runner in runners:
            runner.run(per_round)
        if peer is not None:
            peer_times += peer.train(per_round)
    results = [summarize(runner, matmul_flops) for runner in runners]
    if peer is not None:
        dfm = next(r for r in results if r.name.startswith("DFM"))
        results.append(peer_result(peer, peer_times, dfm))
    return results, runners


def markdown(results: list[Result], baseline: Result) -> str:
    header = (
        "| model | params (M) | fwd GFLOP/ex | step (ms) | ratio to FM | ex/s | model TFLOP/s/dev "
        "| matmul TFLOP/s/dev | MFU (measured) | MFU (data sheet) | XLA memory (MiB) "
        "| peak in use (MiB) | peak RSS (MiB) | run at equal FLOPs / FM |\n" + "|---" * 14 + "|"
    )
    rows = [header]
    for r in results:
        published = f"{100 * r.mfu_published:.1f} %" if r.mfu_published is not None else "n/a"
        peak = f"{r.peak_bytes_in_use / 2**20:.0f}" if r.peak_bytes_in_use else "n/a"
        rss = f"{r.peak_rss_bytes / 2**20:.0f}" if r.peak_rss_bytes else "n/a"
        run_ratio = r.step_seconds * r.total_steps / (baseline.step_seconds * baseline.total_steps)
        rows.append(
            f"| {r.name} | {r.params_millions:.3f} | {r.forward_gflops_per_example:.3f} "
            f"| {1e3 * r.step_seconds:.1f} | {r.step_seconds / baseline.step_seconds:.3f} "
            f"| {r.examples_per_second:.1f} | {r.model_tflops_per_device:.4f} "
            f"| {r.matmul_tflops_per_device:.4f} | {100 * r.mfu_measured:.1f} % | {published} "
            f"| {r.compiled_bytes / 2**20:.0f} | {peak} | {rss} | {run_ratio:.3f} |"
        )
    return "\n".join(rows)


def benchmark_data(settings: config_lib.Settings, batches: int) -> dict[str, float]:
    """Examples/s of ``settings.data`` through the trainer's Grain iterator (the first
    batch, which starts workers and opens files, timed apart), and for a video source
    clips/s decoded one at a time in this thread."""
    source = data.make_source(settings.data)
    start = time.perf_counter()
    iterator = data.make_train_iterator(
        source,
        global_batch_size=settings.batch_size,
        seed=settings.seed,
        worker_count=settings.data.worker_count,
    )
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    local_batch = data.local_batch_size(settings.batch_size, jax.process_count())
    result = {
        "first_batch_seconds": first,
        # Grain reads ahead while the first batch is built: only long runs are steady.
        "examples_per_second": batches * local_batch / seconds,
        "examples_per_second_with_first": (batches + 1) * local_batch / (first + seconds),
        "batch_size": local_batch,
        "worker_count": settings.data.worker_count,
    }
    if hasattr(source, "load"):  # a video source
        result["single_thread_clips_per_second"] = data.measure_decoding(source, 2 * local_batch)
    return result


@dataclasses.dataclass
class SamplingResult:
    name: str
    cfg_scale: float
    nfe: int
    images: int
    seconds: float
    images_per_second: float


def benchmark_sampling(
    runner: _Runner, peer: client.TorchPeer | None, images: int, rounds: int, guidance: float
) -> list[SamplingResult]:
    """Images/s of the DFM model's sampler (the config's steps) unguided and at
    ``guidance``, and the peer's official Euler sampler at the same NFE, interleaved."""
    settings = runner.settings
    unguided = dataclasses.replace(settings.sampling.sampler(), cfg_scale=1.0)
    samplers = {1.0: unguided, guidance: dataclasses.replace(unguided, cfg_scale=guidance)}
    fns = {cfg: generation.make_generate_fn(runner.setup.method, s) for cfg, s in samplers.items()}
    labels = jnp.arange(images, dtype=jnp.int32) % settings.data.num_classes
    params, key = runner.state.ema_params, jax.random.key(settings.seed)
    for cfg, fn in fns.items():  # compile, and warm the peer
        jax.block_until_ready(fn(params, key, labels))
        if peer is not None:
            peer.sample(images, images, cfg)
    times = {(who, cfg): [] for who in ("ours", "peer") for cfg in fns}
    for _ in range(rounds):
        for cfg, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, key, labels))
            times["ours", cfg].append(time.perf_counter() - start)
            if peer is not None:
                times["peer", cfg].append(peer.sample(images, images, cfg))
    names = {"ours": runner.name, "peer": "PyTorch DFM-SiT (official Euler sampler, eager)"}
    return [
        SamplingResult(names[who], cfg, samplers[cfg].nfe, images, float(np.median(t)),
                       images / float(np.median(t)))
        for (who, cfg), t in times.items()
        if t
    ]  # fmt: skip


def sampling_markdown(results: list[SamplingResult]) -> str:
    """One row per sampler and cfg, with guided / unguided and ours / peer ratios."""
    by_key = {(r.name, r.cfg_scale): r for r in results}
    ours = results[0].name
    rows = [
        "| sampler | cfg | NFE | seconds | images/s | guided / unguided | seconds / peer's |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        unguided = by_key[r.name, 1.0]
        peer = [p for (name, cfg), p in by_key.items() if name != ours and cfg == r.cfg_scale]
        vs_peer = f"{r.seconds / peer[0].seconds:.3f}" if r.name == ours and peer else ""
        rows.append(
            f"| {r.name} | {r.cfg_scale:g} | {r.nfe} | {r.seconds:.2f} | "
            f"{r.images_per_second:.2f} | {r.seconds / unguided.seconds:.3f} | {vs_peer} |"
        )
    return "\n".join(rows)


def attention_errors(
    batch: int = 4, length: int = 1024, heads: int = 16, head_dim: int = 72, seed: int = 0
) -> dict[str, float]:
    """Max |cuDNN - XLA| of ``jax.nn.dot_product_attention`` in bfloat16 (DiT-XL/2's
    shapes at the paper layout): the output and the gradients of q, k, v, relative to the
    largest XLA value of each; and of XLA bfloat16 against float32 for scale."""
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (batch, length, heads, head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys[:3])
    cotangent = jax.random.normal(keys[3], shape, jnp.bfloat16)

    def outputs(implementation, dtype):
        def attend(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, implementation=implementation)

        args = tuple(x.astype(dtype) for x in (q, k, v))
        out, vjp = jax.vjp(attend, *args)
        return [out, *vjp(cotangent.astype(dtype))]

    xla, cudnn = outputs("xla", jnp.bfloat16), outputs("cudnn", jnp.bfloat16)
    exact = outputs("xla", jnp.float32)
    errors = {}
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), xla, cudnn, exact, strict=True):
        a, b, c = (np.asarray(x, np.float32) for x in (a, b, c))
        scale = float(np.abs(c).max())
        errors[f"{name} cudnn-xla"] = float(np.abs(b - a).max()) / scale
        errors[f"{name} xla_bf16-f32"] = float(np.abs(a - c).max()) / scale
    return errors
