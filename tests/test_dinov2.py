"""DINOv2 for FDD: parity with transformers' Dinov2Model, importers, bicubic resampling.

References are PyTorch: ``F.interpolate`` for the resize, transformers' ``Dinov2Model``
/ ``Dinov2WithRegistersModel`` (random weights, tiny sizes) for the network, with
the official dinov2 ``interpolate_pos_encoding`` (scale-factor offset 0.1) patched
in where the official models are meant.
"""

import functools
import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

from safetensors.numpy import save_file as save_numpy  # noqa: E402
from safetensors.torch import save_file as save_torch  # noqa: E402

from dfm_jax.models import dinov2 as dv  # noqa: E402
from dfm_jax.weights import dinov2 as dw  # noqa: E402

TOL = 1e-4
TINY = dict(
    hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=56, patch_size=14
)


def _randomize(model, seed=0):
    """Random weights whose every part matters (layer scales, norms, positions)."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(shape, generator=g)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(rand(p.shape, 0.2, 1.0))
            elif name.startswith("embeddings.") and "patch" not in name:
                p.copy_(rand(p.shape, 0.5))  # cls, mask, register, position tables
            else:
                p.copy_(rand(p.shape, 0.1))
    return model.eval()


def _hf_model(swiglu=False, registers=0, seed=0):
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=registers)
        return _randomize(transformers.Dinov2WithRegistersModel(cfg), seed)
    cfg = transformers.Dinov2Config(**TINY, use_swiglu_ffn=swiglu)
    return _randomize(transformers.Dinov2Model(cfg), seed)


def _official_interpolate(self, embeddings, height, width):
    """facebookresearch/dinov2 ``interpolate_pos_encoding`` (offset 0.1, no antialias)."""
    pos = self.position_embeddings
    npatch, n = embeddings.shape[1] - 1, pos.shape[1] - 1
    if npatch == n and height == width:
        return pos
    m, dim, p = int(math.sqrt(n)), embeddings.shape[-1], self.config.patch_size
    sh, sw = (height // p + 0.1) / m, (width // p + 0.1) / m
    table = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2).float()
    table = F.interpolate(table, scale_factor=(sh, sw), mode="bicubic", antialias=False)
    assert table.shape[-2:] == (height // p, width // p)
    return torch.cat([pos[:, :1], table.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def _official_reference(model):
    """Patch a transformers model to interpolate positions as the official models do."""
    emb = model.embeddings
    emb.interpolate_pos_encoding = _official_interpolate.__get__(emb)
    return model


def _hf_tokens(model, x):
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2))
    return out.last_hidden_state.numpy()


def _jax_tokens(module, params, x):
    return np.asarray(jax.jit(module.apply)({"params": params}, x))


def _compare(model, module, params, sizes, seed=1):
    """Max |diff| of the CLS token and of all tokens at each (H, W)."""
    rng = np.random.default_rng(seed)
    diffs = {}
    for h, w in sizes:
        x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
        ref, out = _hf_tokens(model, x), _jax_tokens(module, params, x)
        assert out.shape == ref.shape
        diffs[(h, w)] = (np.abs(out[:, 0] - ref[:, 0]).max(), np.abs(out - ref).max())
    print("max |diff| (CLS, all tokens):", diffs)
    return diffs


def _to_official(model):
    """Independent transformers (>= 5 names) -> official key mapping."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {
        "cls_token": sd.pop("embeddings.cls_token"),
        "mask_token": sd.pop("embeddings.mask_token"),
        "pos_embed": sd.pop("embeddings.position_embeddings"),
        "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": sd.pop("layernorm.weight"),
        "norm.bias": sd.pop("layernorm.bias"),
    }
    for i in range(model.config.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            out[dst + f"norm1.{t}"] = sd.pop(src + f"norm1.{t}")
            out[dst + f"norm2.{t}"] = sd.pop(src + f"norm2.{t}")
            qkv = [sd.pop(src + f"attention.{n}_proj.{t}") for n in "qkv"]
            out[dst + f"attn.qkv.{t}"] = torch.cat(qkv)
            out[dst + f"attn.proj.{t}"] = sd.pop(src + f"attention.o_proj.{t}")
            if model.config.use_swiglu_ffn:
                gate_up = [sd.pop(src + f"mlp.{n}_proj.{t}") for n in ("gate", "up")]
                out[dst + f"mlp.w12.{t}"] = torch.cat(gate_up)
                out[dst + f"mlp.w3.{t}"] = sd.pop(src + f"mlp.down_proj.{t}")
            else:
                out[dst + f"mlp.fc1.{t}"] = sd.pop(src + f"mlp.fc1.{t}")
                out[dst + f"mlp.fc2.{t}"] = sd.pop(src + f"mlp.fc2.{t}")
        out[dst + "ls1.gamma"] = sd.pop(src + "layer_scale1.lambda1")
        out[dst + "ls2.gamma"] = sd.pop(src + "layer_scale2.lambda1")
    assert not sd, sorted(sd)
    return out


# ----------------------------------------------------------------------------
# Bicubic resampling
# ----------------------------------------------------------------------------


def test_bicubic_resize_matches_torch():
    rng = np.random.default_rng(0)
    cases = [
        (16, 16, 37, 37),
        (37, 37, 16, 16),
        (50, 23, 31, 64),
        (7, 9, 29, 5),
        (256, 256, 224, 224),
    ]
    cases += [(32, 32, 224, 224), (3, 4, 1, 1)]
    worst = 0.0
    for h, w, oh, ow in cases:
        x = rng.standard_normal((2, h, w, 3)).astype(np.float32)
        for aa in (False, True):
            ref = F.interpolate(
                torch.from_numpy(x).permute(0, 3, 1, 2),
                size=(oh, ow),
                mode="bicubic",
                align_corners=False,
                antialias=aa,
            ).permute(0, 2, 3, 1)
            out = np.asarray(dv.bicubic_resize(x, (oh, ow), antialias=aa))
            diff = np.abs(out - ref.numpy()).max()
            assert diff < 1e-5, (h, w, oh, ow, aa, diff)
            worst = max(worst, diff)
    print("bicubic resize max |diff| vs torch:", worst)


@pytest.mark.parametrize("m,g", [(37, 16), (37, 12), (37, 64), (4, 7)])
def test_bicubic_weights_scale_factor_matches_torch(m, g):
    """The official position interpolation passes scale_factor = (g + 0.1) / M."""
    sf = (g + 0.1) / m
    eye = torch.eye(m).reshape(1, m, m, 1)  # channel c: impulse at row c
    ref = F.interpolate(eye, scale_factor=(sf, 1.0), mode="bicubic", align_corners=False)
    ref = ref[0, :, :, 0].numpy().T  # (g, m)
    ours = dv.bicubic_weights(m, g, scale_factor=sf)
    assert ours.shape == (g, m)
    assert np.abs(ours - ref).max() < 2e-6
    # The offset changes the sampling positions: not the same as size=g.
    assert np.abs(ours - dv.bicubic_weights(m, g)).max() > 1e-3


def test_fdd_preprocess_matches_pil():
    """Antialiased resize ~ torchvision Resize(BICUBIC) on PIL images (dgm-eval)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    mean, std = np.asarray(dv.IMAGENET_MEAN), np.asarray(dv.IMAGENET_STD)

    def both(u8, antialias):
        pil = Image.fromarray(u8).resize((224, 224), Image.BICUBIC)
        x = u8[None].astype(np.float32) / 127.5 - 1.0
        out = np.asarray(dv.fdd_preprocess(x, antialias=antialias))[0] * std + mean
        return np.abs(out - np.asarray(pil, np.float32) / 255) * 255  # grey levels

    for size in (256, 48):  # down and up
        yy, xx = np.mgrid[0:size, 0:size] / size
        waves = [np.sin(2 * np.pi * (a * xx + b * yy) + c) for a, b, c in rng.uniform(0, 6, (3, 3))]
        smooth = np.round(127.5 + 100 * np.stack(waves, -1)).astype(np.uint8)
        # PIL rounds to uint8 after each 1-D pass: at most ~1 grey level apart.
        assert both(smooth, True).max() < 1.5
    noise = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    # (PIL also clips its intermediate pass, so only the mean is close on noise.)
    assert both(noise, True).mean() < 0.5
    assert both(noise, False).mean() > 5  # PyTorch's plain bicubic aliases: not PIL's


# ----------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_transformers_safetensors_parity(tmp_path, swiglu):
    """Hub layout (save_pretrained: model.safetensors + config.json), size interpolation."""
    model = _hf_model(swiglu=swiglu)
    model.save_pretrained(tmp_path)
    module, params = dw.load_dinov2(tmp_path, interpolate_offset=0.0)
    cfg = module.config
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.pos_grid) == (48, 2, 3, 4)
    assert cfg.ffn == ("swiglu" if swiglu else "mlp")
    diffs = _compare(model, module, params, [(56, 56), (42, 70), (84, 84)])
    for cls_diff, all_diff in diffs.values():
        assert cls_diff < TOL and all_diff < TOL


def test_transformers_state_dict_names_parity(tmp_path):
    """transformers >= 5 names (q/k/v/o_proj, gate/up/down_proj) in a bare file."""
    model = _hf_model(swiglu=True, seed=3)
    path = tmp_path / "weights.safetensors"
    save_torch({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    module, params = dw.load_dinov2(path, num_heads=3, interpolate_offset=0.0)
    for cls_diff, all_diff in _compare(model, module, params, [(56, 56), (70, 42)]).values():
        assert cls_diff < TOL and all_diff < TOL


def test_registers_parity(tmp_path):
    """Register tokens; default interpolation of register models: size + antialias."""
    model = _hf_model(registers=2, seed=4)
    model.save_pretrained(tmp_path)
    module, params = dw.load_dinov2(tmp_path)
    cfg = module.config
    assert cfg.num_register_tokens == 2 and cfg.interpolate_antialias
    assert cfg.interpolate_offset == 0.0
    for cls_diff, all_diff in _compare(
        model, module, params, [(56, 56), (42, 42), (84, 70)]
    ).values():
        assert cls_diff < TOL and all_diff < TOL


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_official_pth_parity(tmp_path, swiglu):
    """Official keys in a torch file; default interpolation = the official offset 0.1."""
    model = _official_reference(_hf_model(swiglu=swiglu, seed=5))
    path = tmp_path / "dinov2_vitt14_pretrain.pth"
    torch.save(_to_official(model), path)
    module, params = dw.load_dinov2(path, num_heads=3)
    assert module.config.interpolate_offset == pytest.approx(0.1)
    sizes = [(56, 56), (42, 70), (98, 98)]
    for cls_diff, all_diff in _compare(model, module, params, sizes).values():
        assert cls_diff < TOL and all_diff < TOL
    # The offset matters: transformers >= 5 interpolation differs at other grids.
    x = np.random.default_rng(2).standard_normal((1, 98, 98, 3)).astype(np.float32)
    plain = dv.DINOv2(dv.DINOv2Config(**{**vars(module.config), "interpolate_offset": 0.0}))
    moved = np.abs(_jax_tokens(plain, params, x) - _jax_tokens(module, params, x)).max()
    assert moved > 100 * TOL


def test_fdd_features_end_to_end(tmp_path):
    """[-1, 1] images -> 224 (antialiased bicubic, clip, ImageNet norm) -> CLS token."""
    model = _official_reference(_hf_model(seed=6))
    path = tmp_path / "official.pth"
    torch.save(_to_official(model), path)
    module, params = dw.load_dinov2(path, num_heads=3)
    rng = np.random.default_rng(0)
    images = np.tanh(rng.standard_normal((2, 64, 48, 3))).astype(np.float32)

    x = (torch.from_numpy(images).permute(0, 3, 1, 2) + 1) / 2
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(dv.IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(dv.IMAGENET_STD).reshape(1, 3, 1, 1)
    x = (x.clamp(0, 1) - mean) / std
    with torch.no_grad():
        ref = model(pixel_values=x).pooler_output.numpy()

    feats = jax.jit(functools.partial(dv.fdd_features, module))(params, images)
    assert feats.shape == (2, 48) and feats.dtype == np.float32
    diff = np.abs(np.asarray(feats) - ref).max()
    print("FDD feature max |diff|:", diff)
    assert diff < TOL


# ----------------------------------------------------------------------------
# Sizes and errors
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vits14", "vitb14", "vitl14", "vitg14"])
def test_released_sizes_match_transformers(name):
    cfg = dv.dinov2_config(name)
    x = jax.ShapeDtypeStruct((1, 14, 14, 3), np.float32)
    shapes = jax.eval_shape(dv.DINOv2(cfg).init, jax.random.key(0), x)["params"]
    ours = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    hf_cfg = transformers.Dinov2Config(
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        image_size=518,
        use_swiglu_ffn=cfg.ffn == "swiglu",
    )
    with torch.device("meta"):
        ref = sum(p.numel() for p in transformers.Dinov2Model(hf_cfg).parameters())
    assert ours + cfg.width == ref  # + the unused mask token


def test_missing_file_names_file_and_source(tmp_path):
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    with pytest.raises(FileNotFoundError) as e:
        dw.load_dinov2(path)
    msg = str(e.value)
    assert str(path) in msg and dw.OFFICIAL_URL in msg and dw.HF_URL in msg
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        dw.load_dinov2(tmp_path)  # a directory without model.safetensors


def test_bad_state_dicts_are_rejected(tmp_path):
    """Official keys in a safetensors file (no torch): unexpected/missing tensors fail."""
    state = {k: v.numpy() for k, v in _to_official(_hf_model()).items()}
    path = tmp_path / "official.safetensors"
    save_numpy(state, str(path))
    module, _ = dw.load_dinov2(path, num_heads=3)
    assert module.config.depth == 2
    save_numpy({**state, "head.weight": np.zeros((2, 2), np.float32)}, str(path))
    with pytest.raises(ValueError, match=r"head\.weight"):
        dw.load_dinov2(path, num_heads=3)
    save_numpy({k: v for k, v in state.items() if k != "blocks.1.ls2.gamma"}, str(path))
    with pytest.raises(ValueError, match=r"blocks\.1\.ls2\.gamma"):
        dw.load_dinov2(path, num_heads=3)
    save_numpy(state, str(path))
    with pytest.raises(ValueError, match="pass num_heads"):  # width 48 is not a released size
        dw.load_dinov2(path)
