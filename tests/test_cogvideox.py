"""The CogVideoX video autoencoder and its importer, against diffusers' PyTorch model.

diffusers' ``AutoencoderKLCogVideoX`` at the "tiny-video" architecture (spatial /4,
temporal /4) gets random weights (GroupNorm affine and every bias too), is saved with
``save_pretrained`` (``config.json`` + safetensors), imported through
:mod:`dfm_jax.weights.cogvideox`, and both run on the same clips (torch in float64).
17 frames encode in diffusers' chunks of 9 + 8 frames to 5 latent frames; 7 latent
frames decode in chunks of 3 + 2 + 2 (a scan of two steps carrying the conv cache).
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from dfm_jax.models import autoencoder as ae
from dfm_jax.models import cogvideox as cv
from dfm_jax.weights import cogvideox as cw

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

CFG = cv.video_autoencoder_config("tiny-video")
SIDE = 16
FRAMES = 17  # encoder chunks 9 + 8 -> 3 + 2 latent frames
LATENT_FRAMES = 7  # decoder chunks 3 + 2 + 2 -> 9 + 8 + 8 = 25 frames


def _torch_model(cfg: cv.CogVideoXConfig, seed: int = 0):
    n = len(cfg.block_out_channels)
    model = diffusers.AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * n,
        up_block_types=("CogVideoXUpBlock3D",) * n,
        block_out_channels=cfg.block_out_channels,
        latent_channels=cfg.latent_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        temporal_compression_ratio=cfg.temporal_compression_ratio,
        scaling_factor=0.7,
    ).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
    return model


@functools.lru_cache(maxsize=1)
def _reference(tmp: str):
    model = _torch_model(CFG)
    model.save_pretrained(f"{tmp}/vae", safe_serialization=True)
    config, params = cw.load_cogvideox(tmp, "tiny-video")
    return model.double(), config, params


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return _reference(str(tmp_path_factory.mktemp("cogvideox")))


def _clip(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _ncthw(x: np.ndarray):
    return torch.from_numpy(x).double().permute(0, 4, 1, 2, 3)


def _nthwc(t) -> np.ndarray:
    return t.permute(0, 2, 3, 4, 1).numpy()


def test_config_json_sets_architecture_and_scaling(ref):
    _, config, _ = ref
    assert config.scaling_factor == 0.7  # from config.json, not the preset's 0.5
    assert config.block_out_channels == CFG.block_out_channels
    assert config.shift_factor == 0.0
    assert cv.VIDEO_PRESETS["cogvideox-2b"]["scaling_factor"] == 1.15258426
    assert cv.VIDEO_PRESETS["cogvideox-5b"]["scaling_factor"] == 0.7
    big = cv.video_autoencoder_config("cogvideox-2b")
    assert big.latent_frames(49) == 13 and big.decoded_frames(13) == 49
    assert [CFG.decoded_frames(t) for t in (1, 2, 3, 4, 7)] == [1, 8, 9, 16, 25]


def test_encode_matches_diffusers(ref):
    model, config, params = ref
    x = _clip(0, (1, FRAMES, SIDE, SIDE, 3))
    mean, logvar = jax.jit(functools.partial(cv.encode_video, config))(params, x)
    with torch.no_grad():
        dist = model.encode(_ncthw(x)).latent_dist
    assert mean.shape == (1, 5, SIDE // 4, SIDE // 4, config.latent_channels)
    np.testing.assert_allclose(mean, _nthwc(dist.mean), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logvar, _nthwc(dist.logvar), atol=1e-4, rtol=0)


def test_decode_matches_diffusers_and_bf16(ref):
    model, config, params = ref
    z = _clip(1, (1, LATENT_FRAMES, 4, 4, config.latent_channels)) * 2
    decode = jax.jit(cv.decode_video, static_argnums=0)
    out = decode(config, params, z)
    with torch.no_grad():
        want = _nthwc(model.decode(_ncthw(z)).sample)
    assert out.shape == (1, 25, SIDE, SIDE, 3)
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=0)
    bf16 = decode(dataclasses.replace(config, dtype="bfloat16"), params, z)
    rel = float(jnp.linalg.norm(bf16 - out) / jnp.linalg.norm(out))
    assert bf16.dtype == jnp.float32 and 0 < rel < 0.03, rel


def test_causal_conv_cache_is_chunk_invariant():
    """A causal conv over a whole clip == over chunks carrying the cache."""
    conv = cv.CausalConv3d(CFG, 6)
    x = jnp.asarray(_clip(2, (2, 7, 5, 5, 3)))
    params = conv.init(jax.random.key(0), x)
    whole, _ = conv.apply(params, x)
    y0, cache = conv.apply(params, x[:, :3])
    y1, cache = conv.apply(params, x[:, 3:5], cache)
    y2, _ = conv.apply(params, x[:, 5:], cache)
    np.testing.assert_allclose(jnp.concatenate([y0, y1, y2], 1), whole, atol=1e-6)
    # without the cache the second chunk would see its own first frame repeated
    y1_fresh, _ = conv.apply(params, x[:, 3:5])
    assert float(jnp.abs(y1_fresh - y1).max()) > 1e-2


def test_chunk_schedule_and_whole_decode(ref):
    """The scan's chunks follow diffusers (3 + 2 + 2). Decoding all latent frames at
    once (chunk size 0) is a different function -- GroupNorm statistics are per chunk --
    and matches diffusers run with one chunk."""
    model, config, params = ref
    z = _clip(3, (1, LATENT_FRAMES, 4, 4, config.latent_channels))
    seen = []

    def step(zc, cache):
        seen.append((zc.shape[1], cache is None))
        return zc[:, :1] * 0 + zc.shape[1], cache or {"c": zc[:, :1]}

    jax.eval_shape(lambda z: cv._chunked(step, z, 2), z)
    assert seen == [(3, True), (2, False)]  # the scan traces its body once
    assert cv._schedule(13, 2) == [3, 2, 2, 2, 2, 2] and cv._schedule(49, 8) == [9] + [8] * 5
    decode = jax.jit(cv.decode_video, static_argnums=0)
    whole = decode(dataclasses.replace(config, decode_chunk_latents=0), params, z)
    model.num_latent_frames_batch_size = LATENT_FRAMES
    try:
        with torch.no_grad():
            want = _nthwc(model.decode(_ncthw(z)).sample)
    finally:
        model.num_latent_frames_batch_size = 2
    np.testing.assert_allclose(whole, want, atol=1e-4, rtol=0)
    assert float(jnp.abs(whole - decode(config, params, z)).max()) > 0.1


def test_video_codec_tiny_preset_and_tiling(ref):
    codec = ae.Codec.load("tiny-video", seed=0)
    assert isinstance(codec, cv.VideoCodec)
    assert codec.latent_shape(9, 16, 24) == (3, 4, 6, 4)
    x = jnp.asarray(_clip(4, (2, 9, 16, 24, 3)))  # one chunk each way: a cheap compile
    z = codec.encode(x)
    assert z.shape == (2, 3, 4, 6, 4)
    mean, std = codec.encode_moments(x)
    np.testing.assert_allclose(z, mean * codec.config.scaling_factor, atol=1e-6)
    assert float(std.min()) > 0
    # the codec as a jit argument, replicated; __call__ is decode
    pixels = jax.jit(lambda c, z: c(z))(codec.replicated(Mesh(jax.devices(), ("d",))), z)
    assert pixels.shape == x.shape and float(jnp.abs(pixels).max()) <= 1.0
    tiled = cv.VideoCodec(codec.config, codec.params, decode_tile=4, decode_overlap=2).decode(z)
    assert tiled.shape == pixels.shape and float(jnp.abs(tiled).max()) <= 1.0
    diff = float(jnp.abs(tiled - pixels).mean())
    assert 0 < diff < 0.1, diff  # per-tile GroupNorm statistics: close, not equal
    whole = cv.VideoCodec(codec.config, codec.params, decode_tile=8).decode(z)  # tile >= side
    np.testing.assert_allclose(whole, pixels, atol=1e-5)


def test_importer_errors(ref, tmp_path):
    model, config, _ = ref
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    cw.params_from_state_dict(state, config)
    broken = dict(state)
    del broken["decoder.conv_out.conv.weight"]
    broken["encoder.extra.weight"] = np.zeros(1, np.float32)
    broken["encoder.conv_in.conv.weight"] = np.zeros((8, 3, 3, 3, 1), np.float32)
    with pytest.raises(ValueError, match=r"missing: decoder\.conv_out\.conv\.weight") as e:
        cw.params_from_state_dict(broken, config, source="'x.safetensors'")
    assert "unexpected: encoder.extra.weight" in str(e.value)
    assert "bad shape: encoder.conv_in.conv.weight" in str(e.value)
    assert "'x.safetensors'" in str(e.value)
    with pytest.raises(FileNotFoundError, match="THUDM/CogVideoX-2b"):
        cw.load_cogvideox(tmp_path, "cogvideox-2b")
    with pytest.raises(FileNotFoundError, match="THUDM/CogVideoX-2b"):
        ae.Codec.load("cogvideox-2b")
    (tmp_path / "config.json").write_text(json.dumps({"use_quant_conv": True}))
    with pytest.raises(ValueError, match="use_quant_conv"):
        cw.config_from_diffusers(json.loads((tmp_path / "config.json").read_text()))
