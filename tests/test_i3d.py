"""FVD I3D and its TF-Hub importer, against a PyTorch reference and TensorFlow ops.

The reference below is written independently from deepmind/kinetics-i3d's
``InceptionI3d`` (RGB stream, Sonnet 1): Unit3D = conv3d (no bias) with its own
TensorFlow "SAME" padding (``F.pad``, extra at the end; -inf for max pools) ->
inference BatchNorm with beta only (no gamma), eps 1e-3 -> ReLU; Mixed blocks of
four branches; logits by a (2, 7, 7) VALID average pool and a 1x1x1 conv with bias,
averaged over time. Its state dict is renamed to the TF-Hub variable names here
(``RGB/inception_i3d/.../conv_3d/w`` etc.), goes through the importer, and both
networks see the same clips. The frames fed to the reference are resized by
TensorFlow's own ``tf.compat.v1.image.resize_bilinear``, the op the FVD code uses.
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfm_jax.models import i3d
from dfm_jax.weights import i3d as i3d_weights

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
nn = torch.nn
F = torch.nn.functional

NARROW = 0.125  # every channel count of the published network divides by 8

# (name, (b0, b1a, b1b, b2a, b2b, b3)) from the published InceptionI3d.
REF_MIXED = [
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
]


def ref_same(size, k, s):
    """TF SAME (before, after) for one axis, written from TF's documented rule."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def ref_pad(x, kernel, stride, value):
    """Pad an NCDHW tensor TF-"SAME"-style (F.pad lists the last axis first)."""
    pads = []
    for n, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):
        pads.extend(ref_same(n, k, s))
    return F.pad(x, pads, value=value)


def ref_max_pool(x, k, s):
    return F.max_pool3d(ref_pad(x, k, s, -math.inf), k, s)


class RefUnit(nn.Module):
    def __init__(self, cin, cout, k=1, s=1, bn=True, bias=False, relu=True):
        super().__init__()
        self.k, self.s, self.bn_on, self.relu = (k,) * 3, (s,) * 3, bn, relu
        self.conv = nn.Conv3d(cin, cout, k, s, bias=bias)
        if bn:
            self.beta = nn.Parameter(torch.zeros(cout))
            self.register_buffer("mean", torch.zeros(cout))
            self.register_buffer("var", torch.ones(cout))

    def forward(self, x):
        x = self.conv(ref_pad(x, self.k, self.s, 0.0))
        if self.bn_on:
            x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3)
        return F.relu(x) if self.relu else x


class RefMixed(nn.Module):
    def __init__(self, cin, c, conv2_name):
        super().__init__()
        self.Branch_0 = nn.ModuleDict({"Conv3d_0a_1x1": RefUnit(cin, c[0])})
        self.Branch_1 = nn.ModuleDict(
            {"Conv3d_0a_1x1": RefUnit(cin, c[1]), "Conv3d_0b_3x3": RefUnit(c[1], c[2], 3)}
        )
        self.Branch_2 = nn.ModuleDict(
            {"Conv3d_0a_1x1": RefUnit(cin, c[3]), conv2_name: RefUnit(c[3], c[4], 3)}
        )
        self.Branch_3 = nn.ModuleDict({"Conv3d_0b_1x1": RefUnit(cin, c[5])})
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x):
        b1 = list(self.Branch_1.values())
        b2 = list(self.Branch_2.values())
        return torch.cat(
            [
                self.Branch_0["Conv3d_0a_1x1"](x),
                b1[1](b1[0](x)),
                b2[1](b2[0](x)),
                self.Branch_3["Conv3d_0b_1x1"](ref_max_pool(x, (3, 3, 3), (1, 1, 1))),
            ],
            1,
        )


class RefI3D(nn.Module):
    """Takes (B, T, H, W, 3) clips like the TF network, returns (B, 400)."""

    def __init__(self, width=1.0):
        super().__init__()

        def ch(c):
            return int(c * width)

        self.Conv3d_1a_7x7 = RefUnit(3, ch(64), 7, 2)
        self.Conv3d_2b_1x1 = RefUnit(ch(64), ch(64))
        self.Conv3d_2c_3x3 = RefUnit(ch(64), ch(192), 3)
        cin, self.mixed = ch(192), nn.ModuleDict()
        for name, c in REF_MIXED:
            conv2 = "Conv3d_0a_3x3" if name == "Mixed_5b" else "Conv3d_0b_3x3"
            self.mixed[name] = RefMixed(cin, [ch(v) for v in c], conv2)
            cin = self.mixed[name].out_channels
        self.Logits = nn.ModuleDict(
            {"Conv3d_0c_1x1": RefUnit(cin, 400, bn=False, bias=True, relu=False)}
        )

    def forward(self, clips):
        x = clips.permute(0, 4, 1, 2, 3)
        x = ref_max_pool(self.Conv3d_1a_7x7(x), (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = ref_max_pool(x, (1, 3, 3), (1, 2, 2))
        for name, block in self.mixed.items():
            if name == "Mixed_4b":
                x = ref_max_pool(x, (3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                x = ref_max_pool(x, (2, 2, 2), (2, 2, 2))
            x = block(x)
        x = F.avg_pool3d(x, (2, 7, 7), 1)
        x = self.Logits["Conv3d_0c_1x1"](x)
        return x.squeeze(4).squeeze(3).mean(2)


def randomize(model, seed):
    """He-scaled conv weights, random beta / moving statistics / logits bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv.weight"):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            else:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model.eval()


def tf_names(model):
    """The reference's state as TF-Hub variables (DHWIO kernels, (1,1,1,1,C) BN)."""
    suffix = {
        "conv.weight": "conv_3d/w",
        "conv.bias": "conv_3d/b",
        "beta": "batch_norm/beta",
        "mean": "batch_norm/moving_mean",
        "var": "batch_norm/moving_variance",
    }
    out = {}
    for key, v in model.state_dict().items():
        key = key.removeprefix("mixed.")
        for end, tf_end in suffix.items():
            if key.endswith(end):
                name = "RGB/inception_i3d/" + key[: -len(end)].replace(".", "/") + tf_end
                break
        a = v.numpy().astype(np.float32)
        if a.ndim == 5:
            a = a.transpose(2, 3, 4, 1, 0)
        elif not tf_end.endswith("/b"):
            a = a.reshape(1, 1, 1, 1, -1)
        out[name] = a
    return out


def save_tf_checkpoint(variables, directory):
    """Write ``variables`` as a TF V2 checkpoint ``<directory>/variables/variables``."""
    prefix = directory / "variables" / "variables"
    prefix.parent.mkdir(parents=True)
    names = sorted(variables)
    tf.raw_ops.SaveV2(
        prefix=str(prefix),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(variables[n]) for n in names],
    )
    return directory


def tf_resize(videos, size=224):
    b, t, h, w, c = videos.shape
    frames = tf.compat.v1.image.resize_bilinear(videos.reshape(-1, h, w, c), (size, size))
    return frames.numpy().reshape(b, t, size, size, c)


def ref_forward(model, clips):
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(clips))).numpy()


@pytest.fixture(scope="module")
def narrow():
    model = randomize(RefI3D(NARROW), seed=0)
    tf_vars = tf_names(model)
    variables = i3d_weights.convert_tf_variables(tf_vars, i3d.InceptionI3d(width=NARROW))
    return model, tf_vars, variables


def test_tf_same_padding_facts():
    assert i3d.tf_same_padding(224, 7, 2) == (2, 3)
    assert i3d.tf_same_padding(7, 2, 2) == (0, 1)
    assert i3d.tf_same_padding(112, 3, 2) == (0, 1)
    assert i3d.tf_same_padding(8, 2, 2) == (0, 0)
    assert i3d.tf_same_padding(5, 3, 1) == (1, 1)


def test_conv_and_max_pool_match_tf_same():
    """Even kernels / strides on odd sizes: the asymmetric case of TF "SAME"."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 9, 8, 3)).astype(np.float32)
    w = rng.normal(size=(2, 3, 2, 3, 4)).astype(np.float32)
    want = tf.nn.conv3d(x, w, strides=[1, 2, 2, 2, 1], padding="SAME").numpy()
    unit = i3d.Unit3D(4, (2, 3, 2), 2, use_batch_norm=False, activation=False)
    got = unit.apply({"params": {"conv_3d": {"kernel": w}}}, x)
    assert got.shape == want.shape == (2, 4, 5, 4, 4)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)

    neg = x - 10.0  # zero padding would win the max at the borders
    for k, s in (((2, 2, 2), (2, 2, 2)), ((1, 3, 3), (1, 2, 2)), ((3, 3, 3), (1, 1, 1))):
        want = tf.nn.max_pool3d(neg, [1, *k, 1], [1, *s, 1], padding="SAME").numpy()
        got = np.asarray(i3d.max_pool_same(jnp.asarray(neg), k, s))
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(3, 17, 23, 3), (2, 300, 250, 3), (1, 224, 100, 1)])
def test_resize_matches_tf1_resize_bilinear(shape):
    rng = np.random.default_rng(1)
    frames = rng.uniform(-1, 1, size=shape).astype(np.float32)
    want = tf.compat.v1.image.resize_bilinear(frames, (224, 224)).numpy()
    got = np.asarray(i3d.resize_bilinear_tf1(frames, (224, 224)))
    np.testing.assert_allclose(got, want, atol=2e-6)
    # Half-pixel centres (jax.image.resize) would be a different op: the test can tell.
    half = jax.image.resize(frames, (shape[0], 224, 224, shape[-1]), "bilinear", antialias=False)
    assert np.abs(np.asarray(half) - want).max() > 1e-2


def test_preprocess_repeats_gray_and_keeps_range():
    rng = np.random.default_rng(2)
    gray = rng.uniform(-1, 1, size=(2, 3, 20, 28, 1)).astype(np.float32)
    out = np.asarray(i3d.preprocess(gray))
    assert out.shape == (2, 3, 224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, tf_resize(np.repeat(gray, 3, axis=-1)), atol=2e-6)
    assert out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 1 or 3\)"):
        i3d.preprocess(gray[..., 0])


def test_fvd_embedding_matches_reference(narrow):
    """Videos of any size -> TF resize + reference I3D vs fvd_embedding."""
    model, _, variables = narrow
    videos = np.random.default_rng(3).uniform(-1, 1, size=(2, 16, 48, 64, 3)).astype(np.float32)
    want = ref_forward(model, tf_resize(videos))
    got = np.asarray(
        jax.jit(i3d.fvd_embedding, static_argnames="width")(variables, videos, width=NARROW)
    )
    assert got.shape == (2, 400) and got.dtype == np.float32
    assert np.abs(want).max() > 0.1  # non-trivial features
    print(f"max |diff| {np.abs(got - want).max():.2e}, max |ref| {np.abs(want).max():.2f}")
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


def test_network_matches_reference_on_odd_sizes(narrow):
    """17 frames of 201 x 201: odd sizes at every stride (asymmetric SAME) and two
    time positions averaged by the logits."""
    model, _, variables = narrow
    clips = np.random.default_rng(4).uniform(-1, 1, size=(1, 17, 201, 201, 3)).astype(np.float32)
    want = ref_forward(model, clips)
    got = np.asarray(jax.jit(i3d.InceptionI3d(width=NARROW).apply)(variables, clips))
    print(f"max |diff| {np.abs(got - want).max():.2e}, max |ref| {np.abs(want).max():.2f}")
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()


def test_rejects_clips_too_small(narrow):
    _, _, variables = narrow
    with pytest.raises(ValueError, match="at least 2 x 7 x 7"):
        clips = jax.ShapeDtypeStruct((1, 8, 224, 224, 3), jnp.float32)
        jax.eval_shape(i3d.InceptionI3d(width=NARROW).apply, variables, clips)


def test_checkpoint_import_and_errors(narrow, tmp_path):
    _, tf_vars, variables = narrow
    gamma = "RGB/inception_i3d/Conv3d_2b_1x1/batch_norm/gamma"  # unit: ignored
    extra = {"global_step": np.array(7, np.int64), gamma: np.ones((1, 1, 1, 1, 8), np.float32)}
    directory = save_tf_checkpoint({**tf_vars, **extra}, tmp_path / "i3d-kinetics-400_1")
    read = i3d_weights.read_tf_variables(directory)
    assert set(read) == set(tf_vars) | set(extra)
    loaded = i3d_weights.convert_tf_variables(read, i3d.InceptionI3d(width=NARROW))
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
    assert "scale" not in loaded["params"]["Conv3d_1a_7x7"]["batch_norm"]

    name = "RGB/inception_i3d/Mixed_5b/Branch_2/Conv3d_0a_3x3/conv_3d/w"
    broken = {k: v for k, v in tf_vars.items() if k != name}
    broken["RGB/inception_i3d/Mixed_4c/Branch_0/Conv3d_0a_1x1/batch_norm/beta"] = np.zeros(5)
    broken[gamma] = np.full((1, 1, 1, 1, 8), 2.0, np.float32)
    with pytest.raises(ValueError) as err:
        i3d_weights.convert_tf_variables(broken, i3d.InceptionI3d(width=NARROW))
    assert f"missing: {name}" in str(err.value)
    assert "Mixed_4c/Branch_0/Conv3d_0a_1x1/batch_norm/beta: (5,)" in str(err.value)
    assert f"unexpected: {gamma}" in str(err.value)
    # The narrow checkpoint does not fit the published network: shapes named.
    with pytest.raises(ValueError, match="bad shape: RGB/inception_i3d/"):
        i3d_weights.load_i3d(directory)


def test_missing_module_names_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        i3d_weights.load_i3d(tmp_path / "nope")
    msg = str(err.value)
    assert "variables/variables.index" in msg
    assert "https://tfhub.dev/deepmind/i3d-kinetics-400/1" in msg and "Kaggle" in msg


def test_full_size_published_network(tmp_path):
    """The published widths at 16 x 224 x 224, through load_i3d (~10-20 s on 2 cores)."""
    start = time.perf_counter()
    model = randomize(RefI3D(1.0), seed=5)
    directory = save_tf_checkpoint(tf_names(model), tmp_path / "i3d")
    module, variables = i3d_weights.load_i3d(directory)
    clips = np.random.default_rng(6).uniform(-1, 1, size=(1, 16, 224, 224, 3)).astype(np.float32)
    want = ref_forward(model, clips)
    got = np.asarray(jax.jit(module.apply)(variables, clips))
    print(f"max |diff| {np.abs(got - want).max():.2e}, max |ref| {np.abs(want).max():.2f}")
    assert np.abs(got - want).max() <= 1e-4
    print(f"full-size I3D check took {time.perf_counter() - start:.1f}s")


def test_bfloat16_compute_gives_float32_embedding(narrow):
    """dtype=bfloat16 traces (convs in bf16); the embedding is float32. Shapes only:
    bf16 convolutions are slow on CPU."""
    _, _, variables = narrow
    videos = jax.ShapeDtypeStruct((2, 16, 32, 32, 1), jnp.float32)
    out = jax.eval_shape(
        lambda v, x: i3d.fvd_embedding(v, x, width=NARROW, dtype=jnp.bfloat16), variables, videos
    )
    assert out.shape == (2, 400) and out.dtype == jnp.float32
