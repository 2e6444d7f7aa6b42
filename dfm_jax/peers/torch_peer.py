"""The PyTorch DFM-SiT train step and sampler, served to ``dfm_jax.bench`` over a pipe.

    python -m dfm_jax.peers.torch_peer      # started by ``dfm_jax.peers.client.TorchPeer``

The first line on stdin is the spec (JSON, ``client.spec_from_settings``); the process
builds the model, times the eager step and the ``torch.compile`` one (``mode="auto"``
keeps the faster), answers ``{"ready": ...}`` and then one JSON line per command:
``{"train": n}`` -> ``{"times": [s, ...]}`` (n steps, each timed);
``{"sample": {"num": n, "batch": b, "cfg": w}}`` -> ``{"seconds": s}``;
``{"quit": true}``. Every answer carries ``peak_rss_bytes``. Nothing else is printed on
stdout (logs go to stderr).

The step is the DFM objective on a fixed synthetic batch, as ``dfm_jax.bench`` times
ours: a Laplacian pyramid (2x2 mean down, bilinear up), the stage Q per example or per
batch from ``stage_probs``, LogitNormal times (the current stage's and the earlier
ones'), masked scales zeroed, the velocity MSE summed over the active scales, label
dropout, then global-norm clipping, AdamW (fused where PyTorch has it, else foreach)
and an EMA of the weights (``torch._foreach_lerp_``). The network runs in the SiT
convention (``t_code = 1 - t``, output ``noise - data``), which costs the same. Threads:
``spec["threads"]`` (the bench passes the machine's cores).
"""

from __future__ import annotations

import copy
import json
import resource
import sys
import time

import torch
import torch.nn.functional as F

from dfm_jax.peers import torch_dfm_sit


def _log(message: str) -> None:
    print(f"[torch peer] {message}", file=sys.stderr, flush=True)


def laplacian(x: torch.Tensor, num_scales: int) -> list[torch.Tensor]:
    """Coarsest first: the x2^(S-1) mean-pooled image, then the bilinear residuals."""
    scales, current = [], x
    for _ in range(num_scales - 1):
        coarse = F.avg_pool2d(current, 2)
        up = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
        scales.append(current - up)
        current = coarse
    return [current, *reversed(scales)]


class PeerStep:
    """The model, its EMA copy, the optimizer and a fixed batch; ``step()`` trains once."""

    def __init__(self, spec: dict):
        torch.manual_seed(int(spec["seed"]))
        self.spec = spec
        self.model = torch_dfm_sit.DFMSiTReference(
            width=spec["width"], heads=spec["heads"], depth=spec["depth"],
            patch_sizes=spec["patch_sizes"], channels=spec["channels"],
            num_classes=spec["num_classes"], input_size=spec["input_size"],
        )  # fmt: skip
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_params = [
            e for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True)
            if p.requires_grad
        ]  # fmt: skip
        self.optimizer = _adamw(self.params, spec)
        b, c, side = spec["batch_size"], spec["channels"], spec["input_size"]
        self.images = torch.randn(b, c, side, side)
        self.labels = torch.randint(0, spec["num_classes"], (b,))
        self.network = self.model

    @property
    def num_params(self) -> int:
        """Trainable parameters (the fixed sin-cos positions are a buffer-like Parameter)."""
        return sum(p.numel() for p in self.params)

    def _inputs(self):
        spec, num_scales = self.spec, len(self.spec["patch_sizes"])
        b = self.images.shape[0]
        scales = laplacian(self.images, num_scales)
        probs = torch.tensor(spec["stage_probs"])
        draws = b if spec["stage_sampling"] == "per_example" else 1
        stage = torch.multinomial(probs, draws, replacement=True).expand(b) + 1  # (B,) 1..S
        number = torch.arange(1, num_scales + 1)[None]
        current = _logit_normal(spec["current_location"], spec["current_scale"], (b, num_scales))
        earlier = _logit_normal(spec["earlier_location"], spec["earlier_scale"], (b, num_scales))
        stage = stage[:, None]
        t = torch.where(number < stage, earlier, torch.where(number == stage, current, 0.0))
        mask = number <= stage  # (B, S)
        noisy, targets = {}, []
        for s, data in enumerate(scales):
            noise = torch.randn_like(data)
            ts = t[:, s].view(-1, 1, 1, 1)
            noisy[s] = ts * data + (1 - ts) * noise
            targets.append(noise - data)  # the SiT-convention velocity
        drop = torch.rand(b) < spec["label_dropout"]
        labels = torch.where(drop, torch.full_like(self.labels, spec["num_classes"]), self.labels)
        return noisy, targets, 1.0 - t, mask, labels

    def step(self) -> float:
        noisy, targets, t_code, mask, labels = self._inputs()
        out = self.network(noisy, t_code, labels, mask)
        loss = 0.0
        for s, target in enumerate(targets):
            mse = (out[s] - target).square().flatten(1).mean(dim=1)
            loss = loss + torch.where(mask[:, s], mse, 0.0)
        loss = loss.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.spec["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec["grad_clip"], foreach=True)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - self.spec["ema_decay"])
        return float(loss.detach())

    def timed_steps(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - start)
        return times

    def sample_seconds(self, num: int, batch: int, cfg: float) -> float:
        """Wall time of ``num`` samples (the official Euler sampler on the EMA model)."""
        spec, start = self.spec, time.perf_counter()
        sides = [spec["input_size"] // 2 ** (len(spec["patch_sizes"]) - 1 - s)
                 for s in range(len(spec["patch_sizes"]))]  # fmt: skip
        for first in range(0, num, batch):
            n = min(batch, num - first)
            noise = {
                s: torch.randn(n, spec["channels"], side, side) for s, side in enumerate(sides)
            }
            y = torch.randint(0, spec["num_classes"], (n,))
            torch_dfm_sit.official_euler_sample(
                self.ema, noise, y, spec["steps_per_stage"],
                [1.0 - tau for tau in spec["thresholds"]], cfg_scale=cfg,
                null_label=spec["num_classes"],
            )  # fmt: skip
        return time.perf_counter() - start


def _logit_normal(location: float, scale: float, shape) -> torch.Tensor:
    return torch.sigmoid(location + scale * torch.randn(shape))


def _adamw(params, spec: dict) -> torch.optim.Optimizer:
    kwargs = dict(lr=spec["learning_rate"], betas=(spec["b1"], spec["b2"]), eps=spec["eps"],
                  weight_decay=spec["weight_decay"])  # fmt: skip
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def choose_mode(peer: PeerStep, mode: str, trial_steps: int = 3) -> tuple[str, dict]:
    """Eager or ``torch.compile`` (``mode="auto"``: the faster median over a few steps)."""
    timings = {}
    if mode in ("auto", "eager"):
        peer.timed_steps(1)
        timings["eager"] = _median(peer.timed_steps(trial_steps))
    if mode in ("auto", "compile"):
        try:
            peer.network = torch.compile(peer.model)
            start = time.perf_counter()
            peer.timed_steps(2)  # compiles
            _log(f"torch.compile took {time.perf_counter() - start:.1f} s")
            timings["compile"] = _median(peer.timed_steps(trial_steps))
        except Exception as error:  # no C++ compiler or an unsupported op: eager it is
            if mode == "compile":
                raise
            _log(f"torch.compile failed ({type(error).__name__}: {error}); eager")
    chosen = min(timings, key=timings.get)
    peer.network = torch.compile(peer.model) if chosen == "compile" else peer.model
    return chosen, timings


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _reply(message: dict) -> None:
    print(json.dumps({**message, "peak_rss_bytes": _peak_rss()}), flush=True)


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    torch.set_num_threads(int(spec["threads"]))
    torch.set_num_interop_threads(1)
    peer = PeerStep(spec)
    mode, trials = choose_mode(peer, spec.get("mode", "auto"))
    _log(f"mode {mode} (trial medians {json.dumps(trials)}), {torch.get_num_threads()} threads")
    _reply({"ready": True, "mode": mode, "trials": trials, "params": peer.num_params,
            "threads": torch.get_num_threads(), "torch": torch.__version__})  # fmt: skip
    for line in sys.stdin:
        command = json.loads(line)
        if "train" in command:
            _reply({"times": peer.timed_steps(int(command["train"]))})
        elif "sample" in command:
            args = command["sample"]
            _reply({"seconds": peer.sample_seconds(args["num"], args["batch"], args["cfg"])})
        else:
            break


if __name__ == "__main__":
    main()
