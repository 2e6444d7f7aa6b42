"""Throughput accounting: model FLOPs per step and a device's matmul FLOP/s.

MFU (model FLOPs utilisation) = the analytic model FLOP/s of training divided by
a reference peak. Published peaks are for dense bf16 matmuls on accelerators; on
other devices (and for honest comparisons on any device) the reference is the
dense-matmul FLOP/s measured on the same device by ``measure_matmul_flops``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip from vendor data sheets (no sparsity).
PUBLISHED_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}

# Training = forward + backward, and the backward pass costs twice the forward.
TRAIN_FLOPS_PER_FORWARD = 3


def published_peak_flops(device: jax.Device | None = None) -> float | None:
    """The data-sheet bf16 peak of ``device`` (default: the first device), if known."""
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PUBLISHED_PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    return None


def measure_matmul_flops(
    size: int = 1024, dtype: jnp.dtype = jnp.float32, repeats: int = 10, device=None
) -> float:
    """Measured FLOP/s of a dense ``size x size`` matmul on one device (median of repeats)."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * size**3 / times[len(times) // 2]
