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

import jax
import jax.numpy as jnp
from absl import flags, logging
from ml_collections import config_flags

from dfm_jax import config as config_lib
from dfm_jax.peers import client
from dfm_jax.training import perf
from dfm_jax.training.benchmark import (
    attention_errors,
    benchmark,
    benchmark_data,
    benchmark_sampling,
    markdown,
    method_configs,
    sampling_markdown,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per model (>= 20 for reporting).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Interleaved timing rounds (FM, DFM, FM, ...).")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
_DATA = flags.DEFINE_bool("data", False, "Time the input pipeline instead of the train step.")
_PEER = flags.DEFINE_enum(
    "peer", "none", ["none", "torch"], "Also time the PyTorch DFM-SiT peer (dev dependency)."
)
_PEER_MODE = flags.DEFINE_enum(
    "peer_mode", "auto", ["auto", "eager", "compile"],
    "The peer's execution: auto times eager and torch.compile and keeps the faster.",
)  # fmt: skip
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


def main_data(settings: config_lib.Settings) -> None:
    result = benchmark_data(settings, _STEPS.value)
    print(f"\nInput pipeline of {settings.data.source} ({settings.data.dir or 'generated'}):")
    for name, value in result.items():
        print(f"  {name}: {value:.2f}" if isinstance(value, float) else f"  {name}: {value}")
    if _JSON.value:
        _write_json(_JSON.value, result)


def start_peer(settings: config_lib.Settings) -> client.TorchPeer:
    """Starts the PyTorch peer for the DFM config (warning where its network differs)."""
    for difference in client.architecture_differences(settings):
        logging.warning("The PyTorch peer is the DFM-SiT of this size; the config has %s",
                        difference)  # fmt: skip
    logging.info("Starting the PyTorch peer (it picks eager or torch.compile first)")
    spec = client.spec_from_settings(settings)
    return client.TorchPeer({**spec, "mode": _PEER_MODE.value})


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


def _write_json(path: str, rows: list[dict] | dict) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)
    logging.info("Wrote %s", path)


if __name__ == "__main__":
    console.run(main)
