"""Benchmark the train step of a DFM config against its Flow Matching twin.

    python -m dfm_jax.bench --config=configs/demo.py
    python -m dfm_jax.bench --config=configs/imagenet512.py --config.batch_size=32
    python -m dfm_jax.bench --config=configs/demo.py --methods=fm,dfm,pyramidal,cascaded

For the config's model and its single-scale Flow Matching twin
(``config_lib.flow_matching_twin``: same backbone, token grid, batch and
optimizer), and with ``--methods`` its Pyramidal Flow and Cascaded twins
(``config_lib.pyramidal_twin`` / ``cascaded_twin``: same backbone and batch,
``total_steps`` scaled to equal training FLOPs), measured in the same process on
the same devices:

* step time: median over ``--steps`` (at least 20) timed steps after warm-up,
  taken in interleaved rounds (FM, DFM, FM, ...) so that drift of the machine's
  speed affects both alike;
* examples/s; analytic model FLOP/s (3 x forward FLOPs x batch / step time);
* the same device's measured dense-matmul FLOP/s in the model's compute dtype,
  and MFU against it (and against the data-sheet peak where one is known);
* memory: XLA's compiled footprint (arguments + outputs + temporaries) and the
  device's peak bytes in use where the runtime reports it (GPU, TPU);
* the wall time of the whole equal-FLOPs run (step time x ``total_steps``) as a
  ratio to FM's: a Pyramidal step is cheaper, but it takes more steps.

The train step is the real one (decomposition, objective, model, AdamW, EMA) on
a fixed synthetic batch already on the devices, so data loading is excluded.
Results print as a Markdown table; ``--json`` also writes them to a file.

``--peer=torch`` also times the PyTorch DFM-SiT of the same sizes, objective, optimizer
and batch (``dfm_jax.peers``: SDPA attention, fused AdamW, threads = cores, eager or
``torch.compile``, whichever is faster), in its own process, in the same interleaved
rounds; its row's "ratio to FM" column and ours give the ratio to it. ``--sample`` adds
sampling (images/s at the config's sampler, unguided and at ``--guidance``; the peer's
official Euler sampler at the same NFE). ``--json=F`` writes the step results (each with
``name`` and ``step_seconds``; the peer's names start with "PyTorch") and, with
``--sample``, ``F.sampling.json``.

``--data`` times the input pipeline instead: ``config.data`` through the trainer's
Grain iterator (``config.batch_size``, ``data.worker_count`` worker processes), the
first batch (start-up) apart, then ``--steps`` batches: examples (clips) per second;
for a video source also one clip at a time in this thread (decoding alone)::

    python -m dfm_jax.bench --config=configs/demo_video.py --data \
        --config.data.source=video_folder --config.data.dir=/data/videos \
        --config.data.resolution=128 --config.data.frames=16 --config.data.worker_count=2
"""

from __future__ import annotations

from dfm_jax import console  # first: it sets TensorFlow's environment

# isort: split
import dataclasses
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from dfm_jax import config as config_lib
from dfm_jax import data, parallel
from dfm_jax.method import generation
from dfm_jax.peers import client
from dfm_jax.training import perf
from dfm_jax.training import setup as setup_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per model (>= 20 for reporting).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Interleaved timing rounds (FM, DFM, FM, ...).")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
_DATA = flags.DEFINE_bool("data", False, "Time the input pipeline instead of the train step.")
_PEER = flags.DEFINE_enum(
    "peer", "none", ["none", "torch"], "Also time the PyTorch DFM-SiT peer (dev dependency)."
)
_SAMPLE = flags.DEFINE_bool(
    "sample", False, "Also time sampling, unguided and guided, (and the peer's) in images/s."
)
_SAMPLE_IMAGES = flags.DEFINE_integer("sample_images", 16, "Images per timed sampling run.")
_GUIDANCE = flags.DEFINE_float("guidance", 1.5, "cfg scale of the guided sampling runs.")
_CHECK_ATTENTION = flags.DEFINE_bool(
    "check_attention", False, "Compare cuDNN with XLA attention (bf16, forward and gradients)."
)
_METHODS = flags.DEFINE_list(
    "methods", ["fm", "dfm"], "Which of fm, dfm, pyramidal, cascaded to time (fm is the baseline)."
)
flags.mark_flags_as_required(["config"])


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


def main_data(settings: config_lib.Settings) -> None:
    result = benchmark_data(settings, _STEPS.value)
    print(f"\nInput pipeline of {settings.data.source} ({settings.data.dir or 'generated'}):")
    for name, value in result.items():
        print(f"  {name}: {value:.2f}" if isinstance(value, float) else f"  {name}: {value}")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(result, f, indent=2)


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


def start_peer(settings: config_lib.Settings) -> client.TorchPeer:
    """Starts the PyTorch peer for the DFM config (warning where its network differs)."""
    for difference in client.architecture_differences(settings):
        logging.warning("The PyTorch peer is the DFM-SiT of this size; the config has %s",
                        difference)  # fmt: skip
    data_spec = data.data_spec(settings.data)
    architecture = settings.model.architecture(
        in_channels=data_spec.example_shape[-1], num_classes=data_spec.num_classes,
        scale_stds=None,
    )  # fmt: skip
    logging.info("Starting the PyTorch peer (it picks eager or torch.compile first)")
    return client.TorchPeer(client.spec_from_settings(settings, architecture))


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


def main_check_attention() -> None:
    """Prints the errors; exits 1 when cuDNN is further from float32 than 2x XLA bf16 is."""
    errors = attention_errors()
    for name, value in errors.items():
        print(f"  {name}: {value:.2e}")
    for name in ("out", "dq", "dk", "dv"):
        if errors[f"{name} cudnn-xla"] > 2 * errors[f"{name} xla_bf16-f32"] + 1e-2:
            raise SystemExit(f"cuDNN attention disagrees with XLA on {name}")
    print("cuDNN attention matches XLA attention within bfloat16 rounding")


def main(argv):
    del argv
    if _CHECK_ATTENTION.value:
        main_check_attention()
        return
    if _DATA.value:
        main_data(config_lib.read(_CONFIG.value))
        return
    if _STEPS.value < 20:
        logging.warning("--steps=%d: reported figures should use at least 20", _STEPS.value)
    config = _CONFIG.value
    settings = config_lib.read(config)
    configs = method_configs(config, _METHODS.value)
    dtype = jnp.dtype(settings.model.dtype)
    peer = start_peer(settings) if _PEER.value == "torch" else None
    try:
        matmul_flops = perf.measure_matmul_flops(size=2048, dtype=dtype)
        results, runners = benchmark(
            configs, _STEPS.value, _WARMUP.value, _ROUNDS.value, matmul_flops, peer
        )
        sampling = []
        if _SAMPLE.value:
            dfm = next(r for r in runners if r.name.startswith("DFM"))
            sampling = benchmark_sampling(dfm, peer, _SAMPLE_IMAGES.value, _ROUNDS.value,
                                          _GUIDANCE.value)  # fmt: skip
    finally:
        if peer is not None:
            peer.close()
    device = jax.devices()[0]
    print(
        f"\nDevice: {device.device_kind} x {jax.device_count()} ({jax.default_backend()}); "
        f"batch {settings.batch_size}; compute {dtype.name}; median of {_STEPS.value} steps "
        f"per model in {_ROUNDS.value} interleaved rounds\n"
    )
    print(markdown(results, baseline=results[0]))
    for peer_row in (r for r in results if r.name.startswith("PyTorch")):
        for ours in (r for r in results if not r.name.startswith("PyTorch")):
            print(f"{ours.name} step / {peer_row.name} step: "
                  f"{ours.step_seconds / peer_row.step_seconds:.3f}")  # fmt: skip
    if sampling:
        print(f"\nSampling {_SAMPLE_IMAGES.value} images (median of {_ROUNDS.value} rounds):\n")
        print(sampling_markdown(sampling))
    if _JSON.value:
        _write_json(_JSON.value, [dataclasses.asdict(r) for r in results])
        if sampling:
            path = _JSON.value.removesuffix(".json") + ".sampling.json"
            _write_json(path, [dataclasses.asdict(r) for r in sampling])


def _write_json(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
    logging.info("Wrote %s", path)


if __name__ == "__main__":
    console.run(main)
