"""Tests for dfm_jax.evaluation.metrics against closed forms and independent references."""

import os
import socket
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dfm_jax.evaluation import metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_covariance(rng, dim, scale=1.0):
    a = rng.normal(size=(dim, 2 * dim))
    return scale * (a @ a.T) / (2 * dim)


def _pytorch_fid_reference(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance, transcribed."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _eigen_reference(mu1, sigma1, mu2, sigma2):
    """tr sqrt(S1 S2) from the eigenvalues of sqrt(S1) S2 sqrt(S1) (symmetric PSD)."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


# ----------------------------------------------------------------- Frechet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    dim = 16
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert isinstance(got, float)
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_frechet_distance_commuting_closed_form():
    rng = np.random.default_rng(1)
    dim = 24
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a, b = rng.uniform(0.1, 4.0, dim), rng.uniform(0.1, 4.0, dim)
    sigma1, sigma2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim) + 1.0
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_frechet_distance_identical_is_zero():
    rng = np.random.default_rng(2)
    mu, sigma = rng.normal(size=32), _random_covariance(rng, 32)
    got = metrics.frechet_distance(mu, sigma, mu, sigma)
    assert abs(got) < 1e-8 * np.trace(sigma)


def test_frechet_distance_one_dimensional():
    # Scalars and (1,) / (1, 1) arrays: (mu1 - mu2)^2 + (s1 - s2)^2 with s the std.
    expected = (0.3 - (-1.2)) ** 2 + (2.0 - 0.5) ** 2
    np.testing.assert_allclose(metrics.frechet_distance(0.3, 4.0, -1.2, 0.25), expected, rtol=1e-8)
    got = metrics.frechet_distance(np.array([0.3]), np.array([[4.0]]), [-1.2], [[0.25]])
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_frechet_distance_matches_pytorch_fid_formula_on_features():
    rng = np.random.default_rng(3)
    dim, num = 64, 500
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    feats1 = rng.normal(size=(num, dim)) @ mix
    feats2 = rng.normal(size=(num, dim)) @ mix * 1.2 + 0.1
    mu1, sigma1 = feats1.mean(0), np.cov(feats1, rowvar=False)
    mu2, sigma2 = feats2.mean(0), np.cov(feats2, rowvar=False)
    got = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    np.testing.assert_allclose(got, _pytorch_fid_reference(mu1, sigma1, mu2, sigma2), rtol=1e-6)
    np.testing.assert_allclose(got, _eigen_reference(mu1, sigma1, mu2, sigma2), rtol=1e-6)
    # float32 inputs are promoted to float64 before anything is computed.
    got32 = metrics.frechet_distance(
        mu1.astype(np.float32), sigma1.astype(np.float32), mu2, sigma2.astype(np.float32)
    )
    ref32 = _pytorch_fid_reference(
        mu1.astype(np.float32).astype(np.float64),
        sigma1.astype(np.float32).astype(np.float64),
        mu2,
        sigma2.astype(np.float32).astype(np.float64),
    )
    np.testing.assert_allclose(got32, ref32, rtol=1e-6)


def test_frechet_distance_near_singular_features():
    # N < D: both covariances are rank N - 1.
    rng = np.random.default_rng(4)
    dim, num, eps = 64, 40, 1e-6
    feats1, feats2 = rng.normal(size=(num, dim)), rng.normal(size=(num, dim)) + 0.3
    mu1, sigma1 = feats1.mean(0), np.cov(feats1, rowvar=False)
    mu2, sigma2 = feats2.mean(0), np.cov(feats2, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        got = metrics.frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)
        offset = eps * np.eye(dim)
        regularised = _pytorch_fid_reference(mu1, sigma1 + offset, mu2, sigma2 + offset)
    assert np.isfinite(got) and got > 0
    # The eps-regularised value differs by O(D sqrt(eps)) in tr sqrt(S1 S2) at most.
    np.testing.assert_allclose(got, regularised, rtol=1e-4)
    np.testing.assert_allclose(got, _eigen_reference(mu1, sigma1, mu2, sigma2), rtol=1e-6)


def test_frechet_distance_retries_with_eps_when_sqrtm_is_not_finite(monkeypatch):
    # Older scipy returns NaN/inf for singular products; emulate that for the first call.
    rng = np.random.default_rng(5)
    dim, eps = 8, 1e-3
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def flaky_sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    with pytest.warns(RuntimeWarning, match="not finite"):
        got = metrics.frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)
    assert len(calls) == 2
    np.testing.assert_allclose(
        calls[1], (sigma1 + eps * np.eye(dim)) @ (sigma2 + eps * np.eye(dim))
    )
    diff = mu1 - mu2
    tr_covmean = np.trace(real_sqrtm(calls[1]).real)
    expected = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_rejects_large_imaginary_part():
    # sqrtm(diag(-1, 1)) = diag(i, 1): not a covariance product.
    with pytest.raises(ValueError, match=r"imaginary component, max \|imag\| = 1"):
        metrics.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


@pytest.mark.parametrize(
    ("mu1", "sigma1", "mu2", "sigma2", "match"),
    [
        (np.zeros(3), np.eye(4), np.zeros(3), np.eye(3), r"sigma1 must be \(3, 3\)"),
        (np.zeros(3), np.eye(3), np.zeros(4), np.eye(4), "different dimensions"),
        (np.zeros((2, 3)), np.eye(3), np.zeros(3), np.eye(3), "mu1 must be a vector"),
        (np.zeros(3), np.eye(3), np.full(3, np.nan), np.eye(3), "mu2 contains NaN"),
    ],
)
def test_frechet_distance_validates_inputs(mu1, sigma1, mu2, sigma2, match):
    with pytest.raises(ValueError, match=match):
        metrics.frechet_distance(mu1, sigma1, mu2, sigma2)


# --------------------------------------------------------------- RunningStatistics


def _features(seed, num, dim, offset=100.0):
    # A large common offset checks that the merge does not cancel catastrophically.
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num, dim)) @ rng.normal(size=(dim, dim)) + offset


def test_running_statistics_chunked_equals_numpy():
    feats = _features(0, 301, 12)
    stats = metrics.RunningStatistics(12)
    for lo, hi in [(0, 1), (1, 1), (1, 50), (50, 51), (51, 200), (200, 301)]:
        stats.update(feats[lo:hi])
    assert stats.count == 301
    np.testing.assert_allclose(stats.mean, feats.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats.covariance, np.cov(feats, rowvar=False), rtol=1e-10)
    single = metrics.RunningStatistics(12).update(feats)
    np.testing.assert_allclose(stats.covariance, single.covariance, rtol=1e-10)


def test_running_statistics_accepts_jax_arrays_of_any_dtype():
    feats = _features(1, 64, 8, offset=3.0)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(
        jnp.asarray(feats, jnp.float32), NamedSharding(mesh, PartitionSpec("data"))
    )
    stats = metrics.RunningStatistics(8).update(sharded)
    as_f32 = feats.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(stats.covariance, np.cov(as_f32, rowvar=False), rtol=1e-10)
    bf16 = jnp.asarray(feats, jnp.bfloat16)
    stats = metrics.RunningStatistics(8).update(bf16)
    np.testing.assert_allclose(
        stats.mean, np.asarray(bf16.astype(jnp.float32), np.float64).mean(0), rtol=1e-10
    )


def test_running_statistics_merge_equals_single_pass():
    feats = _features(2, 250, 10)
    parts = [feats[:7], feats[7:130], feats[130:]]
    merged = metrics.RunningStatistics(10)
    for part in parts[::-1]:
        merged.merge(metrics.RunningStatistics(10).update(part))
    merged.merge(metrics.RunningStatistics(10))  # merging an empty one changes nothing
    assert merged.count == 250
    np.testing.assert_allclose(merged.mean, feats.mean(0), rtol=1e-10)
    np.testing.assert_allclose(merged.covariance, np.cov(feats, rowvar=False), rtol=1e-10)


def test_running_statistics_npz_round_trip_and_resume(tmp_path):
    feats = _features(3, 120, 6)
    path = tmp_path / "stats" / "ref.npz"
    stats = metrics.RunningStatistics(6).update(feats[:80])
    stats.to_npz(path)
    stats.update(feats[80:]).to_npz(path)  # overwrite in place
    assert sorted(os.listdir(path.parent)) == ["ref.npz"]  # no temporary files left
    with np.load(path) as data:
        assert sorted(data.files) == ["mu", "num_samples", "sigma"]
        assert int(data["num_samples"]) == 120
        np.testing.assert_array_equal(data["mu"], stats.mean)
        np.testing.assert_array_equal(data["sigma"], stats.covariance)
    loaded = metrics.RunningStatistics.from_npz(path)
    assert (loaded.dim, loaded.count) == (6, 120)
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_allclose(loaded.covariance, stats.covariance, rtol=1e-14)
    # Resuming from a file and continuing equals one pass over everything.
    more = _features(4, 30, 6)
    loaded.update(more)
    everything = np.concatenate([feats, more])
    np.testing.assert_allclose(loaded.covariance, np.cov(everything, rowvar=False), rtol=1e-10)
    mu, sigma = metrics.load_reference_statistics(path)
    np.testing.assert_array_equal(mu, stats.mean)
    np.testing.assert_array_equal(sigma, stats.covariance)


def test_running_statistics_single_sample_round_trip(tmp_path):
    row = _features(5, 1, 4)
    stats = metrics.RunningStatistics(4).update(row)
    with pytest.raises(ValueError, match="at least 2 samples"):
        stats.covariance  # noqa: B018
    stats.to_npz(tmp_path / "one.npz")
    loaded = metrics.RunningStatistics.from_npz(tmp_path / "one.npz").update(row + 1.0)
    np.testing.assert_allclose(
        loaded.covariance, np.cov(np.concatenate([row, row + 1.0]), rowvar=False), rtol=1e-10
    )


def test_running_statistics_validates():
    stats = metrics.RunningStatistics(5)
    with pytest.raises(ValueError, match=r"must be \(N, 5\)"):
        stats.update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 5), np.nan))
    with pytest.raises(ValueError, match="dim 4 into dim 5"):
        stats.merge(metrics.RunningStatistics(4))
    assert stats.count == 0


def test_gather_across_processes_single_process_is_identity():
    stats = metrics.RunningStatistics(7).update(_features(6, 40, 7))
    gathered = metrics.gather_across_processes(stats)
    assert gathered is not stats and gathered.count == 40
    np.testing.assert_array_equal(gathered.mean, stats.mean)
    np.testing.assert_array_equal(gathered.covariance, stats.covariance)


_WORKER = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from dfm_jax.evaluation import metrics
    from tests.test_metrics import _features

    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    stats = metrics.RunningStatistics(5).update(_features(10 + pid, 30 + 20 * pid, 5))
    # A global array over both processes' devices, sharded along the batch axis.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    local = _features(20 + pid, 8, 5).astype(np.float32)
    stats.update(jax.make_array_from_process_local_data(sharding, local))
    total = metrics.gather_across_processes(stats)
    np.savez(out, mu=total.mean, sigma=total.covariance, count=total.count)
    """
)


def test_gather_across_processes_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    from xla_flags import xla_flags  # here: the workers import this module from the repo root

    env["XLA_FLAGS"] = xla_flags(2)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    outs = [tmp_path / f"out{pid}.npz" for pid in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(pid), port, str(outs[pid])],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for pid in range(2)
    ]
    logs = [p.communicate(timeout=120)[0].decode() for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    everything = np.concatenate(
        [_features(10, 30, 5), _features(11, 50, 5)]
        + [_features(20 + pid, 8, 5).astype(np.float32).astype(np.float64) for pid in range(2)]
    )
    results = [np.load(out) for out in outs]
    for r in results:
        assert int(r["count"]) == 96
        np.testing.assert_allclose(r["mu"], everything.mean(0), rtol=1e-10)
        np.testing.assert_allclose(r["sigma"], np.cov(everything, rowvar=False), rtol=1e-10)
    np.testing.assert_array_equal(results[0]["sigma"], results[1]["sigma"])


# ----------------------------------------------------------------- Inception Score


def _tf_inception_score(logits, splits):
    """The original TF code's split loop, on softmax probabilities."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(splits):
        part = preds[(i * preds.shape[0] // splits) : ((i + 1) * preds.shape[0] // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return np.mean(scores), np.std(scores)


def test_inception_score_uniform_is_one():
    mean, std = metrics.inception_score(np.zeros((100, 7)), splits=10)
    np.testing.assert_allclose([mean, std], [1.0, 0.0], atol=1e-12)


def test_inception_score_confident_and_even_is_num_classes():
    num_classes, splits = 13, 4
    labels = np.tile(np.arange(num_classes), 3 * splits)  # every split covers each class 3x
    onehot = np.eye(num_classes)[labels]
    mean, std = metrics.inception_score(onehot * 1000.0, splits=splits)
    np.testing.assert_allclose([mean, std], [num_classes, 0.0], rtol=1e-10, atol=1e-10)
    mean, _ = metrics.inception_score(onehot, splits=splits, from_logits=False)  # 0 log 0 = 0
    np.testing.assert_allclose(mean, num_classes, rtol=1e-10)


def test_inception_score_matches_reference_on_random_logits():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(1003, 50)) * 3.0  # 1003 does not divide into 10 splits
    expected = _tf_inception_score(logits, 10)
    np.testing.assert_allclose(metrics.inception_score(logits, splits=10), expected, rtol=1e-10)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = metrics.inception_score(probs.astype(np.float32), splits=10, from_logits=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    got = metrics.inception_score(jnp.asarray(logits, jnp.float32), splits=3)
    ref = _tf_inception_score(logits.astype(np.float32).astype(np.float64), 3)
    np.testing.assert_allclose(got, ref, rtol=1e-10)


def test_inception_score_validates():
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(np.zeros((5, 3)), splits=6)
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.inception_score(np.ones((5, 3)), splits=1, from_logits=False)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        metrics.inception_score(np.zeros(5), splits=1)


# --------------------------------------------------------------- precision / recall


def _brute_force_precision_recall(real, fake, k):
    def radii(x):
        d = scipy.spatial.distance.cdist(x, x)
        return np.sort(d, axis=1)[:, k]

    cross = scipy.spatial.distance.cdist(fake, real)
    precision = np.mean(np.any(cross <= radii(real)[None, :], axis=1))
    real_to_fake = cross.T
    recall = np.mean(np.any(real_to_fake <= radii(fake)[None, :], axis=1))
    return precision, recall


def test_precision_recall_identical_sets():
    feats = np.random.default_rng(8).normal(size=(60, 16))
    assert metrics.precision_recall(feats, feats.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_sets():
    rng = np.random.default_rng(9)
    real = rng.normal(size=(50, 8))
    fake = rng.normal(size=(40, 8)) + 100.0
    assert metrics.precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_toy_case():
    # k = 1.  Real radii: 1, 1, 1, 1, 4.  Fake radii: 2, 2, 1.1, 1.1, 0.5, 0.5.
    real = np.array([0.0, 1.0, 2.0, 3.0, 7.0])[:, None]
    fake = np.array([0.5, 2.9, 4.0, -1.5, 12.0, 12.5])[:, None]
    # Fakes inside the real manifold: 0.5, 2.9, 4.0 -> 3 / 6.
    # Reals inside the fake manifold: all but 7 -> 4 / 5.
    precision, recall = metrics.precision_recall(real, fake, k=1, batch_size=2)
    assert precision == pytest.approx(0.5) and recall == pytest.approx(0.8)
    # Boundary: a fake exactly at the k-th neighbour distance counts as inside.
    assert metrics.precision_recall(real[:4], np.array([[4.0], [4.5]]), k=1)[0] == 0.5


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(10)
    real = rng.normal(size=(80, 5))
    fake = rng.normal(size=(70, 5)) * 0.6 + 0.5
    expected = _brute_force_precision_recall(real, fake, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for batch_size in (7, 512):
        got = metrics.precision_recall(real, fake, k=3, batch_size=batch_size)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_precision_recall_validates():
    with pytest.raises(ValueError, match="k must be"):
        metrics.precision_recall(np.zeros((3, 2)), np.ones((5, 2)), k=3)
    with pytest.raises(ValueError, match="feature dims differ"):
        metrics.precision_recall(np.zeros((5, 2)), np.ones((5, 3)))


# ------------------------------------------------------------ reference statistics


def test_load_reference_statistics_adm_batch(tmp_path):
    rng = np.random.default_rng(11)
    mu, sigma = rng.normal(size=16).astype(np.float32), _random_covariance(rng, 16)
    mu_s, sigma_s = rng.normal(size=8), _random_covariance(rng, 8)
    path = tmp_path / "VIRTUAL_imagenet512.npz"
    images = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    got_mu, got_sigma = metrics.load_reference_statistics(path)
    assert got_mu.dtype == got_sigma.dtype == np.float64
    np.testing.assert_array_equal(got_mu, mu.astype(np.float64))
    np.testing.assert_array_equal(got_sigma, sigma)
    got_mu_s, got_sigma_s = metrics.load_reference_statistics(
        path, keys=metrics.SPATIAL_STATISTICS_KEYS
    )
    np.testing.assert_array_equal(got_mu_s, mu_s)
    np.testing.assert_array_equal(got_sigma_s, sigma_s)


def test_load_reference_statistics_errors(tmp_path):
    path = tmp_path / "images_only.npz"
    np.savez(path, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"no 'mu' or 'sigma'; its keys are \['arr_0'\]") as err:
        metrics.load_reference_statistics(path)
    assert "RunningStatistics" in str(err.value)
    with pytest.raises(ValueError, match="lacks"):
        metrics.RunningStatistics.from_npz(path)
    # Object arrays would need pickle; they are refused, not unpickled.
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(ValueError, match="allow_pickle"):
        metrics.load_reference_statistics(pickled)
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"sigma must be \(3, 3\)"):
        metrics.load_reference_statistics(bad)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match=r"not an \.npz archive"):
        metrics.load_reference_statistics(single)
