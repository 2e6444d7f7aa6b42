"""A minimal PyTorch DFM-SiT and its Euler sampler: the parity reference and the bench peer.

Written from the published architecture (snap-research/elit ``models/sit_dfm.py``
``DFMSiT`` on ``models/sit.py``, sampler ``dfm_utils/samplers_dfm.py``) for the
parity tests of ``dfm_jax.weights.dfm_sit`` and ``dfm_jax.models.dit``, and timed as
the PyTorch peer of ``python -m dfm_jax.bench --peer=torch`` (``torch_peer``). Module
names reproduce the official state-dict layout, so ``reference.state_dict()`` has
exactly the official tensor names and shapes. Everything is in the official SiT
convention: ``t_code = 1 - t`` (1 is noise), the network predicts
``v_code = noise - data``, masked scales are zeroed before their patch embedder and
fed ``t_code = 1``. ``drop_mask`` is ONE (S,) mask for the whole batch as in the
official code, or a (N, S) mask per example (DFM's per-example stages). Attention is
``F.scaled_dot_product_attention`` (the fused kernel PyTorch picks); ``sdpa=False``
writes the softmax out.

torch is a development dependency (``requirements-dev.txt``), not a runtime one.

Parameters keep PyTorch's default (random, non-zero) initialisation instead of
DiT's zero-initialised adaLN and output layers, so every weight matters.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def mae_2d_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE / DiT ``get_2d_sincos_pos_embed`` (square grid, no cls token), float64 (L, D)."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0):
    """SiT ``TimestepEmbedder.positional_embedding``: ``[cos(t f), sin(t f)]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, sdpa: bool = True):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads), dim=-1)
            out = attn @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _Block(nn.Module):
    """SiTBlock: adaLN-Zero, chunks (shift_msa, scale_msa, gate_msa, shift_mlp, ...)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, sdpa: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(width, heads, sdpa)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = _Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        sm, cm, gm, sf, cf, gf = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gm.unsqueeze(1) * self.attn(modulate(self.norm1(x), sm, cm))
        return x + gf.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sf, cf))


class _FinalLayer(nn.Module):
    def __init__(self, width: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class _PatchEmbed(nn.Module):
    """timm PatchEmbed: Conv2d (kernel = stride = p), flattened to (N, L, D)."""

    def __init__(self, channels: int, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_features(t, self.freq_dim))


class _Embedders(nn.Module):
    """``MultiScalePatchEmbed`` / ``MultiScaleTimestepEmbedder``: a list ``embedders``."""

    def __init__(self, modules):
        super().__init__()
        self.embedders = nn.ModuleList(modules)


class _Projections(nn.Module):
    """``MultiScaleFinalLayer``: a list ``projections``."""

    def __init__(self, modules):
        super().__init__()
        self.projections = nn.ModuleList(modules)


class _LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)  # + the null class


class DFMSiTReference(nn.Module):
    """``DFMSiT`` (official layout) with the given sizes; ``forward`` as the official one.

    Args:
      width, heads, depth, mlp_ratio: transformer sizes.
      patch_sizes: per scale, coarsest first; the scale s latent has side
        ``input_size // 2 ** (S - 1 - s)``.
      channels: latent channels C. out_channels: C (DFMSiT), or 2C for a SiT-style
        learn_sigma head.
      num_classes: K; the label table has K + 1 rows.
      input_size: side of the finest scale.
      sdpa: attention through ``F.scaled_dot_product_attention``.
    """

    def __init__(
        self,
        *,
        width: int,
        heads: int,
        depth: int,
        patch_sizes,
        channels: int,
        num_classes: int,
        input_size: int,
        out_channels: int | None = None,
        mlp_ratio: float = 4.0,
        sdpa: bool = True,
    ):
        super().__init__()
        self.patch_sizes = tuple(patch_sizes)
        self.out_channels = out_channels or channels
        num_scales = len(self.patch_sizes)
        grid = input_size // self.patch_sizes[-1]
        for s, p in enumerate(self.patch_sizes):
            assert (input_size // 2 ** (num_scales - 1 - s)) // p == grid, "unequal token grids"
        self.grid = grid
        self.x_embedder = _Embedders([_PatchEmbed(channels, width, p) for p in self.patch_sizes])
        self.t_embedder = _Embedders([_TimestepEmbedder(width) for _ in self.patch_sizes])
        self.y_embedder = _LabelEmbedder(num_classes, width)
        pos = torch.from_numpy(mae_2d_sincos(width, grid)).float()[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # in the state dict
        self.blocks = nn.ModuleList([_Block(width, heads, mlp_ratio, sdpa) for _ in range(depth)])
        self.final_layer = _Projections(
            [_FinalLayer(width, p, self.out_channels) for p in self.patch_sizes]
        )

    def unpatchify(self, x, p):
        n, c, g = x.shape[0], self.out_channels, self.grid
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(n, g, g, p, p, c))
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x: dict, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor):
        """x: {s: (N, C, H_s, W_s)}; t: (N, S) t_code; y: (N,); drop_mask: (S,) for the
        batch or (N, S) per example, true for the active scales."""
        tokens = 0
        for s, embedder in enumerate(self.x_embedder.embedders):
            if drop_mask.ndim == 2:
                xs = x[s] * drop_mask[:, s].to(x[s].dtype).view(-1, 1, 1, 1)
            else:
                xs = x[s] if bool(drop_mask[s]) else x[s] * 0.0
            tokens = tokens + embedder(xs)
        tokens = tokens + self.pos_embed
        c = sum(e(t[..., s]) for s, e in enumerate(self.t_embedder.embedders))
        c = c + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return {
            s: self.unpatchify(head(tokens, c), p)
            for s, (head, p) in enumerate(
                zip(self.final_layer.projections, self.patch_sizes, strict=True)
            )
        }


def official_schedule(steps_per_scale, thresholds_code):
    """The official multiscale schedule: t_code per step (N + 1, S) and drop masks (N, S).

    ``thresholds_code`` are the official ``stage_sampling_thresholds`` (``1 - tau``).
    Stage k runs t_code from 1 down to its threshold in T_k equal steps, then every
    earlier stage is mapped linearly through the later stages' chunks; t_code = 1
    until a stage starts; all scales reach 0 at the end. A step updates the scales up
    to the rightmost one whose t_code decreases.
    """
    ends = [*thresholds_code, 0.0]
    num_scales, total = len(steps_per_scale), sum(steps_per_scale)
    times = np.ones((total + 1, num_scales))
    start = 0
    for k, steps in enumerate(steps_per_scale):
        chunk = ends[k] + (1.0 - ends[k]) * np.arange(steps, 0, -1) / steps  # 1 .. > end
        times[start : start + steps, k] = chunk
        for j in range(k):
            times[start : start + steps, j] = chunk * (ends[j] - ends[j + 1]) + ends[j + 1]
        start += steps
    times[-1] = 0.0
    times = times.astype(np.float32)  # the official table is a float32 tensor
    delta = times[1:] - times[:-1]
    masks = np.zeros((total, num_scales), bool)
    for n in range(total):
        last = max(np.nonzero(delta[n] < 0)[0], default=-1)
        masks[n, : last + 1] = True
    return times, masks


@torch.no_grad()
def official_euler_sample(
    model, noise: dict, y, steps_per_scale, thresholds_code, cfg_scale=1.0, null_label=None
):
    """The official DFM Euler sampler (float64 state, default guidance window [0, 1]).

    Guidance, when ``cfg_scale > 1``: every evaluation runs ``[x; x]`` with labels
    ``[y; null]`` and every updated scale takes ``v_u + w (v_c - v_u)`` on all channels.
    """
    times, masks = official_schedule(steps_per_scale, thresholds_code)
    x = {s: v.to(torch.float64) for s, v in noise.items()}
    guided = cfg_scale > 1.0
    labels = torch.cat([y, torch.full_like(y, null_label)]) if guided else y
    for n in range(len(masks)):
        rep = 2 if guided else 1
        inputs = {s: torch.cat([v] * rep).float() for s, v in x.items()}
        t = torch.tensor(times[n], dtype=torch.float32)[None].repeat(labels.shape[0], 1)
        drop_mask = torch.tensor(masks[n])
        out = model(inputs, t, labels, drop_mask)
        for s in x:
            if not masks[n, s]:
                continue
            d = out[s].to(torch.float64)
            if guided:
                cond, uncond = d.chunk(2)
                d = uncond + cfg_scale * (cond - uncond)
            x[s] = x[s] + (times[n + 1, s] - times[n, s]) * d
    return x
