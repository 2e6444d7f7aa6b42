"""Drives the PyTorch peer process (``torch_peer``) from ``dfm_jax.bench``; imports no torch.

``spec_from_settings(settings)`` gives the peer the same architecture sizes, objective,
optimizer and batch as a DFM config; ``TorchPeer(spec)`` starts the peer in its own
process (so the two frameworks never share a thread pool), waits until it has chosen
eager or ``torch.compile`` and warmed up, and then times steps or sampling on request,
so that the bench can interleave its rounds with ours.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from absl import app

from dfm_jax import config as config_lib
from dfm_jax import data

INSTALL_HINT = (
    "--peer=torch needs PyTorch, a development dependency: "
    "pip install -r requirements-dev.txt (torch==2.13.0, CPU)"
)


def architecture_differences(settings: config_lib.Settings) -> list[str]:
    """How the config's model differs from the peer's DFM-SiT (empty: the same network)."""
    model, differences = settings.model, []
    if settings.method != "dfm":
        differences.append(f"method {settings.method!r} (the peer trains DFM)")
    if model.positions != "sincos":
        differences.append(f"positions {model.positions!r} (the peer: fixed sin-cos)")
    if model.stage_embedding:
        differences.append("a stage embedding (the peer has none)")
    if model.preconditioning:
        differences.append("preconditioning (the peer has none)")
    if settings.pyramid.kind != "laplacian" or settings.pyramid.standardize:
        differences.append("a pyramid other than the plain Laplacian")
    if settings.is_video:
        differences.append("video clips (the peer is 2-D)")
    return differences


def spec_from_settings(settings: config_lib.Settings) -> dict:
    """The peer's spec (JSON-able) for a DFM config: its network's sizes, the objective,
    the optimizer, the batch and the sampler."""
    data_spec = data.data_spec(settings.data)
    dit_config = settings.model.architecture(
        in_channels=data_spec.example_shape[-1], num_classes=data_spec.num_classes,
        scale_stds=None,
    )  # fmt: skip
    objective, optimizer, sampler = settings.objective, settings.optimizer, settings.sampling
    return {
        "width": dit_config.width,
        "heads": dit_config.num_heads,
        "depth": dit_config.depth,
        "patch_sizes": list(dit_config.patch_sizes),
        "channels": dit_config.in_channels,
        "num_classes": dit_config.num_classes,
        "input_size": settings.data.resolution,
        "batch_size": settings.batch_size,
        "stage_probs": list(objective.stage_probs),
        "current_location": objective.current_location,
        "current_scale": objective.current_scale,
        "earlier_location": objective.earlier_location,
        "earlier_scale": objective.earlier_scale,
        "stage_sampling": objective.stage_sampling,
        "label_dropout": objective.label_dropout,
        "learning_rate": optimizer.learning_rate,
        "b1": optimizer.b1,
        "b2": optimizer.b2,
        "eps": optimizer.eps,
        "weight_decay": optimizer.weight_decay,
        "grad_clip": optimizer.grad_clip,
        "ema_decay": optimizer.ema_decay,
        "steps_per_stage": list(sampler.steps_per_stage),
        "thresholds": list(sampler.thresholds),
        "seed": settings.seed,
        "threads": os.cpu_count() or 1,
        "mode": "auto",
    }


class TorchPeer:
    """The peer process; ``train(n)`` and ``sample(...)`` block until it answers."""

    def __init__(self, spec: dict):
        if importlib.util.find_spec("torch") is None:
            raise app.UsageError(INSTALL_HINT)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dfm_jax.peers.torch_peer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._ask(spec)
        self.peak_rss_bytes = self.info["peak_rss_bytes"]

    def _ask(self, message: dict) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"the PyTorch peer exited (status {code}); its log is above")
        answer = json.loads(line)
        self.peak_rss_bytes = answer["peak_rss_bytes"]
        return answer

    def train(self, steps: int) -> list[float]:
        """Seconds of each of ``steps`` train steps."""
        return self._ask({"train": steps})["times"]

    def sample(self, num: int, batch: int, cfg: float) -> float:
        """Seconds to draw ``num`` samples in batches of ``batch`` at guidance ``cfg``."""
        return self._ask({"sample": {"num": num, "batch": batch, "cfg": cfg}})["seconds"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"quit": True}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)
