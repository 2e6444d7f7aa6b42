"""AutoencoderKL (SD-VAE / FLUX AE) and its diffusers importer, against diffusers itself.

diffusers' PyTorch ``AutoencoderKL`` gets random weights (GroupNorm affine and all
biases randomised too, so that no parameter keeps a neutral default), is saved as
``diffusion_pytorch_model.safetensors``, imported, and both run on the same inputs
(torch in float64, so the differences measure our float32 computation). Two tiny
architectures: the "tiny" preset (SD-like: quant convs, 1 resnet per block) and a
FLUX-like one (no quant convs, 16 latent channels, 2 resnets per block, shift factor,
chunked attention with a padded last chunk).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dfm_jax.models import autoencoder as ae
from dfm_jax.weights import autoencoder as ae_weights

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

WEIGHTS = "diffusion_pytorch_model.safetensors"

#: name -> (our config, image side). "sd" is the "tiny" preset, so Codec.load can read it.
CONFIGS = {
    "sd": (ae.autoencoder_config("tiny"), 16),
    "flux": (
        ae.AutoencoderConfig(
            name="flux-tiny",
            latent_channels=16,
            block_out_channels=(8, 16, 16),
            layers_per_block=2,
            norm_num_groups=4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            attention_chunk=24,  # 8x8 = 64 positions: chunks 24, 24, 16 (+8 padding)
        ),
        32,
    ),
}


def _torch_model(cfg: ae.AutoencoderConfig, seed: int):
    n = len(cfg.block_out_channels)
    model = diffusers.AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor,
        use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_post_quant_conv,
    ).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
    return model


class Ref(NamedTuple):
    cfg: ae.AutoencoderConfig
    side: int
    model: object  # the diffusers model (float64)
    state: dict  # its state dict as numpy float32
    dir: object  # directory holding diffusion_pytorch_model.safetensors
    params: dict  # imported from the file


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict:
    """name -> Ref, built on first use."""
    cache = {}

    def get(name: str) -> Ref:
        if name not in cache:
            cfg, side = CONFIGS[name]
            model = _torch_model(cfg, seed=len(name))
            folder = tmp_path_factory.mktemp(name)
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            safetensors_torch.save_file(state, str(folder / WEIGHTS))
            params = ae_weights.load_autoencoder_params(folder / WEIGHTS, cfg)
            numpy_state = {k: v.numpy() for k, v in state.items()}
            cache[name] = Ref(cfg, side, model.double(), numpy_state, folder, params)
        return cache[name]

    return get


@pytest.fixture(params=sorted(CONFIGS))
def ref(request, refs) -> Ref:
    return refs(request.param)


def _pixels(batch: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, side, side, 3)).astype("f4")


def _nchw(x: np.ndarray):
    return torch.from_numpy(x).permute(0, 3, 1, 2).double()


def _nhwc(t) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def test_encode_decode_match_diffusers(ref):
    cfg, model = ref.cfg, ref.model
    x = _pixels(2, ref.side)
    f = cfg.downsample_factor
    z = np.random.default_rng(1).normal(size=(2, ref.side // f, ref.side // f, cfg.latent_channels))
    z = z.astype("f4")
    with torch.no_grad():
        dist = model.encode(_nchw(x)).latent_dist
        want_mean, want_logvar = _nhwc(dist.mean), _nhwc(dist.logvar)
        want_pixels = _nhwc(model.decode(_nchw(z)).sample)

    module = ae.AutoencoderKL(cfg)
    variables = {"params": ref.params}
    mean, logvar = jax.jit(functools.partial(module.apply, method="encode"))(variables, x)
    pixels = jax.jit(functools.partial(module.apply, method="decode"))(variables, z)
    assert mean.shape == logvar.shape == want_mean.shape == (2, *z.shape[1:])
    assert mean.dtype == logvar.dtype == pixels.dtype == jnp.float32
    assert pixels.shape == x.shape
    # Random weights give O(1) outputs, so an error in any layer would show.
    assert np.abs(want_mean).mean() > 0.1 and np.abs(want_pixels).mean() > 0.1
    diffs = {
        "mean": np.abs(mean - want_mean).max(),
        "logvar": np.abs(logvar - want_logvar).max(),
        "decode": np.abs(pixels - want_pixels).max(),
    }
    print(cfg.name, {k: f"{v:.1e}" for k, v in diffs.items()})
    for name, diff in diffs.items():
        assert diff <= 1e-4, (name, diff)


def test_variable_layout(ref):
    """Conv kernels are HWIO, linear kernels (in, out); one Flax leaf per torch tensor."""
    params, state = ref.params, ref.state
    np.testing.assert_array_equal(
        params["encoder"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"],
        state["encoder.down_blocks.0.resnets.0.conv1.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        params["decoder"]["mid_block"]["attentions_0"]["to_out_0"]["kernel"],
        state["decoder.mid_block.attentions.0.to_out.0.weight"].T,
    )
    np.testing.assert_array_equal(
        params["decoder"]["conv_norm_out"]["scale"], state["decoder.conv_norm_out.weight"]
    )
    assert len(jax.tree.leaves(params)) == len(state)
    assert sum(p.size for p in jax.tree.leaves(params)) == sum(v.size for v in state.values())
    assert ("quant_conv" in params) == ref.cfg.use_quant_conv


def test_legacy_attention_names_and_1x1_conv_weights_are_accepted(ref):
    legacy = {}
    for k, v in ref.state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value")):
            k = k.replace(f".{new}.", f".{old}.")
        k = k.replace(".to_out.0.", ".proj_attn.")
        if k.endswith("proj_attn.weight"):
            v = v[:, :, None, None]  # the original LDM checkpoints' 1x1 conv shape
        legacy[k] = v
    assert any(".query." in k for k in legacy)
    params = ae_weights.params_from_state_dict(legacy, ref.cfg)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref.params)):
        np.testing.assert_array_equal(a, b)


def test_mismatched_state_dicts_are_rejected(ref, tmp_path):
    bad = dict(ref.state)
    del bad["decoder.conv_in.bias"]
    bad["extra.weight"] = np.zeros(3, np.float32)
    bad["encoder.conv_out.weight"] = np.zeros((2, 16, 3, 3), np.float32)
    path = tmp_path / WEIGHTS
    safetensors_torch.save_file({k: torch.from_numpy(v) for k, v in bad.items()}, str(path))
    with pytest.raises(ValueError) as e:
        ae_weights.load_autoencoder_params(path, ref.cfg)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing: decoder.conv_in.bias" in msg
    assert "unexpected: extra.weight" in msg
    assert "bad shape: encoder.conv_out.weight" in msg
    # An SD-like file does not load as a FLUX-like model and vice versa.
    other = CONFIGS["flux" if ref.cfg.use_quant_conv else "sd"][0]
    with pytest.raises(ValueError, match=r"missing|unexpected"):
        ae_weights.params_from_state_dict(ref.state, other)
    # The original BFL / LDM layout (FLUX's ae.safetensors) is named as such.
    original = {"encoder.down.0.block.0.norm1.weight": np.ones(8, np.float32)}
    with pytest.raises(ValueError, match=r"original .*layout.*diffusers"):
        ae_weights.params_from_state_dict(original, ae.autoencoder_config("flux-ae"))


def test_codec_load_from_file_directory_and_pipeline(refs, tmp_path):
    ref = refs("sd")  # the "tiny" preset's architecture, so Codec.load("tiny") reads it
    pipe = tmp_path / "pipeline" / "vae"
    pipe.mkdir(parents=True)
    (pipe / WEIGHTS).write_bytes((ref.dir / WEIGHTS).read_bytes())
    for weights in (ref.dir / WEIGHTS, ref.dir, tmp_path / "pipeline"):
        codec = ae.Codec.load("tiny", weights=str(weights))
        for a, b in zip(jax.tree.leaves(codec.params), jax.tree.leaves(ref.params)):
            np.testing.assert_array_equal(a, b)
    # Codec's model space: (z - shift) * scale; decode undoes it and clips.
    x = _pixels(2, ref.side, seed=3)
    mean, std = codec.encode_moments(x)
    with torch.no_grad():
        dist = ref.model.encode(_nchw(x)).latent_dist
    np.testing.assert_allclose(std, _nhwc(dist.std), rtol=1e-4, atol=1e-5)
    z = codec.encode(x)
    np.testing.assert_allclose(z, (mean - 0.1) * 0.5, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        want = _nhwc(ref.model.decode(_nchw(np.asarray(mean))).sample)
    np.testing.assert_allclose(codec.decode(z), np.clip(want, -1, 1), rtol=0, atol=1e-4)


def test_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"huggingface\.co/stabilityai/sd-vae-ft-ema"):
        ae.Codec.load("sd-vae-ft-ema")
    with pytest.raises(FileNotFoundError, match=r"vae/diffusion_pytorch_model\.safetensors"):
        ae.Codec.load("flux-ae")
    with pytest.raises(FileNotFoundError, match="nope"):
        ae.Codec.load("sd-vae-ft-mse", weights=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        ae.Codec.load("flux-ae", weights=str(tmp_path))  # an empty directory


def test_presets_and_bad_names():
    sd, flux = ae.autoencoder_config("sd-vae-ft-ema"), ae.autoencoder_config("flux-ae")
    assert sd.downsample_factor == flux.downsample_factor == 8
    assert (sd.latent_channels, sd.scaling_factor, sd.shift_factor) == (4, 0.18215, 0.0)
    assert (flux.latent_channels, flux.scaling_factor, flux.shift_factor) == (16, 0.3611, 0.1159)
    assert sd.use_quant_conv and not flux.use_quant_conv and not flux.use_post_quant_conv
    assert ae.autoencoder_config("tiny").downsample_factor == 2
    assert ae.autoencoder_config("flux-ae", dtype="bfloat16").dtype == "bfloat16"
    # The released models have 83.7M parameters (diffusers' count).
    n_sd = sum(x.size for x in jax.tree.leaves(ae.abstract_params(sd)))
    n_flux = sum(x.size for x in jax.tree.leaves(ae.abstract_params(flux)))
    assert n_sd == 83_653_863 and n_flux == 83_819_683
    with pytest.raises(ValueError, match=r"'flux-ae', 'sd-vae-ft-ema', 'sd-vae-ft-mse', 'tiny'"):
        ae.autoencoder_config("sd-vae")
    with pytest.raises(ValueError, match="norm_num_groups"):
        ae.autoencoder_config("tiny", norm_num_groups=3)


def test_latent_space_helpers():
    cfg = ae.autoencoder_config("flux-ae")
    z = jnp.linspace(-3, 3, 24).reshape(1, 2, 3, 4)
    np.testing.assert_allclose(ae.to_model_space(z, cfg), (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(ae.from_model_space(ae.to_model_space(z, cfg), cfg), z, atol=1e-6)
    logvar = jnp.array([-100.0, -2.0, 0.0, 50.0])
    np.testing.assert_allclose(
        ae.posterior_std(logvar), np.exp(0.5 * np.array([-30.0, -2.0, 0.0, 20.0])), rtol=1e-6
    )
    mean = jnp.zeros((4096,))
    s = ae.sample_latent(mean, jnp.full_like(mean, np.log(4.0)), jax.random.key(0))
    assert abs(float(s.std()) - 2.0) < 0.1 and abs(float(s.mean())) < 0.1


@pytest.fixture(scope="module")
def tiny():
    return ae.Codec.load("tiny", seed=0)


def test_codec_round_trip_and_sampling(tiny):
    x = _pixels(2, 16, seed=5)
    z = tiny.encode(x)
    assert z.shape == (2, 8, 8, 4) == (2, *tiny.latent_shape(16, 16)) and z.dtype == jnp.float32
    zs = tiny.encode(x, key=jax.random.key(1))
    _, std = tiny.encode_moments(x)
    np.testing.assert_allclose(zs, tiny.encode(x, key=jax.random.key(1)))  # deterministic
    assert np.abs(zs - z).max() > 1e-3  # a sample, not the mean
    np.testing.assert_allclose(
        (zs - z) / 0.5, std * jax.random.normal(jax.random.key(1), z.shape), rtol=1e-4, atol=1e-5
    )
    y = tiny.decode(z)
    assert y.shape == x.shape and y.dtype == jnp.float32
    assert float(y.min()) >= -1.0 and float(y.max()) <= 1.0 and float(y.std()) > 0
    # decode_fn is pure: usable under an outer jit (closed over here; see the sharded
    # test for the Codec passed as an argument). Constant folding reorders float sums.
    np.testing.assert_allclose(jax.jit(tiny.decode_fn)(z), y, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the autoencoder's downsampling factor 2"):
        tiny.encode(_pixels(1, 15))


def test_bfloat16_compute_is_close_to_float32(tiny):
    bf16 = ae.Codec(ae.autoencoder_config("tiny", dtype="bfloat16"), tiny.params)
    x = _pixels(2, 16, seed=6)
    z32, z16 = tiny.encode(x), bf16.encode(x)
    assert z16.dtype == jnp.float32
    err = float(jnp.abs(z16 - z32).max() / jnp.abs(z32).max())
    print(f"bf16 encode: max |diff| / max |z| = {err:.1e}")
    assert 0 < err < 0.05


def _local_decode(z):
    """A decoder without cross-position interactions: nearest x4 and a channel map."""
    up = jnp.repeat(jnp.repeat(z, 4, axis=1), 4, axis=2)
    return jnp.tanh(up @ jnp.arange(1.0, 1.0 + 3 * z.shape[-1]).reshape(z.shape[-1], 3) / 10)


@pytest.mark.parametrize("shape", [(2, 20, 13, 3), (1, 9, 5, 2)])
def test_tiled_decode_blends_a_local_decoder_exactly(shape):
    z = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype("f4"))
    whole = _local_decode(z)
    for tile, overlap in ((8, 2), (6, 0), (4, 3)):
        tiled = ae.decode_tiled(_local_decode, z, tile, overlap)
        assert tiled.shape == whole.shape
        np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6)
    # A tile covering the latent, or tile 0, is a plain decode.
    calls = []
    for tile in (0, max(shape[1:3]), 100):
        ae.decode_tiled(lambda t: calls.append(t.shape) or _local_decode(t), z, tile, 1)
    assert calls == [shape] * 3
    with pytest.raises(ValueError, match="overlap < tile"):
        ae.decode_tiled(_local_decode, z, 4, 4)


def test_tiled_decode_with_the_model(tiny):
    """2 x 2 tiles of 12 (overlap 4) over a 20 x 20 latent stay close to the whole decode.

    Not equal: tiles see only their own latents, and GroupNorm normalises with
    per-tile statistics. The error is compared with the distance to the decode of an
    unrelated latent, which a misplaced or mis-weighted tile would approach.
    """
    z = np.random.default_rng(8).normal(size=(2, 20, 20, 4)).astype("f4")  # model space
    tiled = ae.Codec(tiny.config, tiny.params, decode_tile=12, decode_overlap=4)
    both = jax.jit(
        lambda c, z: (c.decode_fn(z[:1]), ae.decode_model_latents(c.config, c.params, z))
    )
    y, (whole, unrelated) = both(tiled, z)
    assert y.shape == (1, 40, 40, 3)
    np.testing.assert_allclose(tiled.decode(z[:1]), y, rtol=0, atol=1e-6)
    err, baseline = np.abs(y[0] - whole).mean(), np.abs(unrelated - whole).mean()
    print(f"tiled decode: mean |diff| {err:.2e}; unrelated image {baseline:.2e}")
    assert 0 < err < 0.2 * baseline


def test_batch_sharded_encode_and_decode_equal_unsharded(tiny):
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    x = _pixels(8, 16, seed=9)
    xs = jax.device_put(x, sharding)
    z, zs = tiny.encode(x), tiny.encode(xs)
    assert zs.sharding.is_equivalent_to(sharding, 4)
    np.testing.assert_allclose(zs, z, rtol=0, atol=1e-5)  # equal up to float32 rounding
    # The Codec as a jit argument (a pytree): batch-sharded latents, replicated params.
    decode = jax.jit(lambda c, z: c.decode_fn(z))
    replicated = tiny.replicated(mesh)
    assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(replicated.params))
    ys = decode(replicated, jax.device_put(z, sharding))
    assert ys.sharding.is_equivalent_to(sharding, 4)
    np.testing.assert_allclose(ys, decode(tiny, z), rtol=0, atol=1e-5)
