"""FID InceptionV3 and its pytorch-fid weight importer, against a PyTorch reference.

The reference below is written independently from the architecture of
pytorch-fid's ``fid_inception_v3`` (TF 2015-12-05 graph): BasicConv2d (conv without
bias, BatchNorm eps 1e-3, ReLU), FID blocks A/C/E_1 with ``count_include_pad=False``
average pools, E_2 with a max pool, 1008 classes, bilinear resize to 299 with
``align_corners=False``. It gets random weights and random BatchNorm statistics,
its state dict goes through the importer, and both networks see the same images.
"""

import pathlib
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfm_jax.models import inception
from dfm_jax.weights import inception as inception_weights

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


class RefConv(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class RefA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = RefConv(cin, 64, 1)
        self.branch5x5_1 = RefConv(cin, 48, 1)
        self.branch5x5_2 = RefConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = RefConv(cin, 64, 1)
        self.branch3x3dbl_2 = RefConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = RefConv(96, 96, 3, padding=1)
        self.branch_pool = RefConv(cin, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class RefB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = RefConv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = RefConv(cin, 64, 1)
        self.branch3x3dbl_2 = RefConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = RefConv(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class RefC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = RefConv(cin, 192, 1)
        self.branch7x7_1 = RefConv(cin, c7, 1)
        self.branch7x7_2 = RefConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = RefConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = RefConv(cin, c7, 1)
        self.branch7x7dbl_2 = RefConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = RefConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = RefConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = RefConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = RefConv(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            c = layer(c)
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class RefD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = RefConv(cin, 192, 1)
        self.branch3x3_2 = RefConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = RefConv(cin, 192, 1)
        self.branch7x7x3_2 = RefConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = RefConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = RefConv(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = layer(b)
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class RefE(nn.Module):
    def __init__(self, cin, use_max_pool):
        super().__init__()
        self.use_max_pool = use_max_pool
        self.branch1x1 = RefConv(cin, 320, 1)
        self.branch3x3_1 = RefConv(cin, 384, 1)
        self.branch3x3_2a = RefConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = RefConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = RefConv(cin, 448, 1)
        self.branch3x3dbl_2 = RefConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = RefConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = RefConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = RefConv(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.use_max_pool else _avg3(x)
        return torch.cat([a, b, c, self.branch_pool(p)], 1)


class RefInception(nn.Module):
    """Returns (pool3, logits) of NCHW images in [-1, 1], resized to 299 first."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = RefConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = RefConv(32, 32, 3)
        self.Conv2d_2b_3x3 = RefConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = RefConv(64, 80, 1)
        self.Conv2d_4a_3x3 = RefConv(80, 192, 3)
        self.Mixed_5b = RefA(192, 32)
        self.Mixed_5c = RefA(256, 64)
        self.Mixed_5d = RefA(288, 64)
        self.Mixed_6a = RefB(288)
        self.Mixed_6b = RefC(768, 128)
        self.Mixed_6c = RefC(768, 160)
        self.Mixed_6d = RefC(768, 160)
        self.Mixed_6e = RefC(768, 192)
        self.Mixed_7a = RefD(768)
        self.Mixed_7b = RefE(1280, use_max_pool=False)
        self.Mixed_7c = RefE(2048, use_max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool3 = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pool3, self.fc(pool3)


#: (batch, height, width) of the parity inputs: an upsampled square and a non-square
#: downsample, both at non-integer ratios to 299.
PARITY_SHAPES = ((2, 64, 64), (1, 320, 240))


def _images(batch: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height).uniform(-1, 1, (batch, height, width, 3)).astype("f4")


def _random_reference() -> tuple[RefInception, list[tuple[np.ndarray, np.ndarray]]]:
    """Reference with random weights and random (but well-scaled) BatchNorm statistics.

    In one eval-mode pass over the parity images every BatchNorm sets its running
    statistics, just before it is applied, from its actual input x: mean
    ``0.3 * N(0, 1) * rms(x)``, variance ``mean(x^2) * U(0.5, 2)`` per channel. So
    activations stay O(1) through the 94 conv layers, every BN term matters, and
    no channel is normalised by a tiny spread around a large mean (which would
    amplify float32 rounding far beyond the tolerance in both implementations).
    The BN affine parameters and the classifier are random too.

    Each BN's statistics are final before it is first applied, so the outputs of
    this pass are the eval-mode outputs of the finished model on the parity
    images; they are returned (one (pool3, logits) pair per ``PARITY_SHAPES``
    entry) to save a second forward pass of the slow CPU reference.
    """
    torch.manual_seed(0)
    model = RefInception().eval()

    def calibrate(bn, inputs):
        (x,) = inputs
        c = bn.num_features
        ms = x.square().mean(dim=(0, 2, 3))
        bn.running_mean.copy_(0.3 * torch.randn(c) * ms.sqrt())
        bn.running_var.copy_(ms * torch.empty(c).uniform_(0.5, 2.0))

    hooks = []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                hooks.append(m.register_forward_pre_hook(calibrate))
        model.fc.weight.normal_(0.0, 0.05)
        model.fc.bias.normal_(0.0, 1.0)
        # pytorch-fid's resize, done per shape so that the shapes can share one batch.
        batch = torch.cat(
            [
                F.interpolate(
                    torch.from_numpy(_images(*shape)).permute(0, 3, 1, 2),
                    size=(299, 299),
                    mode="bilinear",
                    align_corners=False,
                )
                for shape in PARITY_SHAPES
            ]
        )
        pool3, logits = model(batch)
    for h in hooks:
        h.remove()
    splits = np.cumsum([shape[0] for shape in PARITY_SHAPES])[:-1]
    outputs = list(zip(np.split(pool3.numpy(), splits), np.split(logits.numpy(), splits)))
    return model, outputs


class Reference(NamedTuple):
    model: RefInception  # the torch reference
    outputs: list  # its (pool3, logits) per PARITY_SHAPES entry
    path: pathlib.Path  # its saved state dict
    module: inception.InceptionV3  # the imported Flax module ...
    variables: dict  # ... and variables


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    model, outputs = _random_reference()
    path = tmp_path_factory.mktemp("inception") / "ref_inception.pth"
    torch.save(model.state_dict(), path)
    module, variables = inception_weights.load_inception(path)
    return Reference(model, outputs, path, module, variables)


@pytest.mark.parametrize("index", range(len(PARITY_SHAPES)))
def test_matches_torch_reference(reference, index):
    """Pool3 features and logits equal the reference's after pytorch-fid's resize.

    The first shape goes through ``module.apply``, the second through the pure
    ``features_and_logits``; each is one compile of the full network.
    """
    batch, height, width = PARITY_SHAPES[index]
    ref_pool3, ref_logits = reference.outputs[index]
    images = jnp.asarray(_images(batch, height, width))
    fn = reference.module.apply if index == 0 else inception.features_and_logits
    out = jax.jit(fn)(reference.variables, images)
    assert out["pool3"].shape == (batch, 2048) and out["pool3"].dtype == jnp.float32
    assert out["logits"].shape == (batch, 1008) and out["logits"].dtype == jnp.float32
    # The random statistics keep the features O(1) and the logits spread out.
    assert 0.1 < np.abs(ref_pool3).mean() < 10.0 and np.abs(ref_logits).max() > 1.0
    print(
        f"{height}x{width}: max |diff| pool3 {np.abs(out['pool3'] - ref_pool3).max():.2e}, "
        f"logits {np.abs(out['logits'] - ref_logits).max():.2e}"
    )
    np.testing.assert_allclose(out["pool3"], ref_pool3, rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["logits"], ref_logits, rtol=0, atol=1e-4)
    bias = reference.model.fc.bias.detach().numpy()
    np.testing.assert_allclose(out["logits_unbiased"], ref_logits - bias, rtol=0, atol=1e-4)


def test_resize_matches_torch_interpolate():
    """The module's resize is pytorch-fid's bilinear, align_corners=False, no antialias."""
    rng = np.random.default_rng(0)
    for height, width in ((64, 64), (320, 240), (75, 600), (512, 512)):
        x = rng.uniform(-1, 1, (1, height, width, 3)).astype(np.float32)
        ref = F.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2),
            size=(299, 299),
            mode="bilinear",
            align_corners=False,
        ).permute(0, 2, 3, 1)
        ours = inception.resize_to_input(jnp.asarray(x))
        np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-6)


def test_rejects_bad_inputs(reference):
    variables = reference.variables
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        inception.InceptionV3().apply(variables, jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="at least 75x75"):
        inception.InceptionV3(resize=False).apply(variables, jnp.zeros((1, 64, 64, 3)))


def test_variable_layout(reference):
    model, variables = reference.model, reference.variables
    params, stats = variables["params"], variables["batch_stats"]
    w = model.Mixed_6b.branch7x7_2.conv.weight.detach().numpy()  # (O, I, 1, 7)
    np.testing.assert_array_equal(
        params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"], w.transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(params["fc"]["kernel"], model.fc.weight.detach().numpy().T)
    np.testing.assert_array_equal(
        stats["Mixed_7c"]["branch_pool"]["bn"]["var"],
        model.Mixed_7c.branch_pool.bn.running_var.numpy(),
    )
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_torch = sum(p.numel() for p in model.parameters())
    assert n_params == n_torch


def test_safetensors_file_gives_the_same_variables(reference, tmp_path):
    path, variables = reference.path, reference.variables
    st_path = tmp_path / "inception.safetensors"
    inception_weights.convert_to_safetensors(path, st_path)
    _, from_st = inception_weights.load_inception(st_path)
    assert jax.tree.structure(from_st) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(from_st), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)


def test_missing_file_names_the_weights_and_their_url(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        inception_weights.load_inception(tmp_path / "nope.pth")
    msg = str(e.value)
    assert "nope.pth" in msg and "pt_inception-2015-12-05-6726825d.pth" in msg
    assert "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" in msg


def test_torch_file_without_torch_says_how_to_fix(reference, monkeypatch):
    path = reference.path
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match="pip install torch"):
        inception_weights.load_state_dict(path)


def test_mismatched_state_dicts_are_rejected(reference):
    model = reference.model
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    # Ignored extras: BN counters and torchvision's auxiliary head.
    inception_weights.convert_state_dict({**state, "AuxLogits.fc.weight": np.zeros((1000, 768))})
    bad = dict(state)
    del bad["Mixed_5b.branch_pool.bn.running_var"]
    bad["fc.weight"] = np.zeros((1000, 2048), np.float32)  # torchvision's 1000 classes
    bad["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as e:
        inception_weights.convert_state_dict(bad)
    msg = str(e.value)
    assert "missing: Mixed_5b.branch_pool.bn.running_var" in msg
    assert "unexpected: extra.weight" in msg
    assert "bad shape: fc.weight" in msg
