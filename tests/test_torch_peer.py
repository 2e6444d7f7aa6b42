"""The PyTorch peer of ``bench --peer=torch``: the same network, pyramid and protocol."""

import jax
import numpy as np
import pytest
from absl import app

torch = pytest.importorskip("torch")

from configs import demo as demo_config  # noqa: E402
from configs import imagenet512_dfm_sit  # noqa: E402
from dfm_jax import config as config_lib  # noqa: E402
from dfm_jax import data  # noqa: E402
from dfm_jax.method import pyramid  # noqa: E402
from dfm_jax.peers import client, torch_peer  # noqa: E402
from dfm_jax.training import setup as setup_lib  # noqa: E402


def _tiny_dfm_sit() -> config_lib.Settings:
    config = imagenet512_dfm_sit.get_config()
    config.model.size, config.model.depth, config.model.width = "S", 1, 64
    config.model.num_heads, config.model.dtype = 2, "float32"
    config.data.source, config.data.resolution, config.data.num_classes = "synthetic", 8, 10
    config.data.latent_sample = False
    config.batch_size = 8
    return config_lib.read(config)


@pytest.fixture(scope="module")
def tiny():
    settings = _tiny_dfm_sit()
    return settings, client.spec_from_settings(settings)


@pytest.mark.parametrize("num_scales", [2, 3])
def test_laplacian_matches_the_pyramid(num_scales):
    """The peer's pyramid (avg-pool down, bilinear up) equals ``pyramid.Laplacian``."""
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    ours = pyramid.Laplacian((2,) * (num_scales - 1)).decompose(jax.numpy.asarray(x))
    theirs = torch_peer.laplacian(torch.from_numpy(x).permute(0, 3, 1, 2), num_scales)
    assert len(theirs) == num_scales
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(np.asarray(a), b.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_peer_network_has_our_parameter_count(tiny):
    """Same sizes, same layers: the peer's trainable parameters number exactly ours."""
    settings, spec = tiny
    method = setup_lib.build_method(settings, data.data_spec(settings.data))
    params = jax.eval_shape(method.init, jax.random.key(0))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert torch_peer.PeerStep(spec).num_params == ours
    # A width the peer would not share changes the count (the check is not vacuous).
    assert torch_peer.PeerStep({**spec, "width": 32, "heads": 2}).num_params != ours


def test_architecture_differences_are_named():
    assert client.architecture_differences(_tiny_dfm_sit()) == []
    demo = config_lib.read(demo_config.get_config())
    found = " ".join(client.architecture_differences(demo))
    assert "positions 'rope'" in found and "stage embedding" in found


def test_peer_process_trains_samples_and_quits(tiny):
    """The pipe protocol: ready, timed steps, a timed sampling run, a clean exit."""
    _, spec = tiny
    peer = client.TorchPeer({**spec, "mode": "eager", "threads": 1})
    try:
        assert peer.info["mode"] == "eager" and peer.info["params"] > 0
        times = peer.train(2)
        assert len(times) == 2 and all(t > 0 for t in times)
        assert peer.sample(num=2, batch=2, cfg=1.5) > 0
        assert peer.peak_rss_bytes > 2**20
    finally:
        peer.close()
    assert peer.process.returncode == 0


def test_missing_torch_is_a_usage_error_with_the_install_line(monkeypatch, tiny):
    monkeypatch.setattr(client.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(app.UsageError, match=r"pip install -r requirements-dev\.txt"):
        client.TorchPeer(tiny[1])


def test_spec_carries_the_objective_and_optimizer(tiny):
    settings, spec = tiny
    objective, optimizer = settings.objective, settings.optimizer
    assert spec["stage_probs"] == list(objective.stage_probs)
    assert spec["stage_sampling"] == "per_batch" and spec["earlier_location"] == 2.0
    assert (spec["b2"], spec["weight_decay"]) == (optimizer.b2, optimizer.weight_decay)
    assert spec["steps_per_stage"] == list(settings.sampling.steps_per_stage)
