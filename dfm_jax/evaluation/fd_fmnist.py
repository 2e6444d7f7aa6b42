"""FD-FMNIST: the Frechet distance on features of a classifier trained on Fashion-MNIST.

The demo's stand-in for FID (Inception weights cannot be downloaded offline).
The classifier (``models.classifier.SmallConvNet``) is trained by this module on
the Fashion-MNIST train split, deterministically (fixed seed, fixed data order,
one device), and must reach ``MIN_TEST_ACCURACY`` on the test split. Its
parameters, its test accuracy and the feature statistics of the test split are
cached; the metric of a set of images is the Frechet distance between their
feature statistics and the test split's:

    fd = FdFmnist.load_or_train()              # trains once (about a minute), then cached
    fd.distance(images)                        # images (N, 32, 32, 1) in [-1, 1]

Images are 32x32 (28x28 padded with the background, as in the demo); the
distance of the test images to themselves is 0 and of noise is large, which the
demo prints next to the model's score so the number means something.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from dfm_jax.data.fashion_mnist import FashionMnistSource
from dfm_jax.evaluation import classifier_cache, metrics
from dfm_jax.models.classifier import SmallConvNet

RESOLUTION = 32
MIN_TEST_ACCURACY = 0.90
CACHE_VERSION = 1  # bump when the classifier or its training changes


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """The classifier and how it is trained (all part of the cache key)."""

    channels: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 128
    epochs: int = 6
    batch_size: int = 128
    learning_rate: float = 3e-3
    seed: int = 0

    def model(self) -> SmallConvNet:
        return SmallConvNet(channels=tuple(self.channels), feature_dim=self.feature_dim)

    def cache_name(self) -> str:
        channels = "-".join(str(c) for c in self.channels)
        return (
            f"fd_fmnist_v{CACHE_VERSION}_c{channels}_f{self.feature_dim}_e{self.epochs}"
            f"_b{self.batch_size}_lr{self.learning_rate:g}_s{self.seed}"
        )


def default_cache_dir() -> str:
    """``$DFM_JAX_CACHE`` or ``~/.cache/dfm_jax``."""
    return os.environ.get(
        "DFM_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dfm_jax")
    )


def load_split(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` as (float32 (N, 32, 32, 1) in [-1, 1], int32 (N,))."""
    source = FashionMnistSource(data_dir or None, split=split, resolution=RESOLUTION)
    examples = [source[i] for i in range(len(source))]
    images = np.stack([e["image"] for e in examples])
    labels = np.asarray([e["label"] for e in examples], np.int32)
    return images, labels


def train_classifier(
    images: np.ndarray, labels: np.ndarray, settings: TrainingSettings = TrainingSettings()
):
    """Trains ``SmallConvNet`` with Adam; deterministic for fixed inputs and settings.

    Returns:
      The parameters.
    """
    model = settings.model()
    params = model.init(jax.random.key(settings.seed), jnp.zeros((1, *images.shape[1:])))
    steps_per_epoch = len(images) // settings.batch_size
    tx = optax.adam(
        optax.cosine_decay_schedule(settings.learning_rate, settings.epochs * steps_per_epoch)
    )
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits, _ = model.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(settings.seed)
    for epoch in range(settings.epochs):
        order = rng.permutation(len(images))
        for i in range(steps_per_epoch):
            batch = order[i * settings.batch_size : (i + 1) * settings.batch_size]
            params, opt_state, loss = step(params, opt_state, images[batch], labels[batch])
        logging.info("FD-FMNIST classifier: epoch %d, last loss %.4f", epoch + 1, float(loss))
    return params


def _batched_apply(model: SmallConvNet, params, images: np.ndarray, batch_size: int = 1000):
    """Logits and features of all images, computed in batches on one device."""
    return classifier_cache.batched_apply(model, params, images, batch_size)


def accuracy(model: SmallConvNet, params, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the classifier."""
    logits, _ = _batched_apply(model, params, images)
    return float((logits.argmax(-1) == labels).mean())


def _check_gate(test_accuracy: float, cached: str | None = None) -> None:
    """Raises unless ``test_accuracy`` reaches ``MIN_TEST_ACCURACY``; ``cached``: the
    entry the accuracy was read from, if any."""
    if test_accuracy < MIN_TEST_ACCURACY:
        fix = "train longer (TrainingSettings.epochs)"
        if cached:
            fix = f"the cache entry {cached} predates the gate; move it away to retrain"
        raise RuntimeError(
            f"the FD-FMNIST classifier reached {test_accuracy:.4f} test accuracy, below "
            f"the required {MIN_TEST_ACCURACY}; {fix}"
        )


@dataclasses.dataclass
class FdFmnist:
    """A trained classifier and the test split's feature statistics.

    Attributes:
      settings: the classifier architecture and training settings.
      params: classifier parameters.
      test_accuracy: its top-1 accuracy on the test split.
      reference: feature statistics of the 10000 test images.
    """

    settings: TrainingSettings
    params: dict
    test_accuracy: float
    reference: metrics.RunningStatistics

    def features(self, images) -> np.ndarray:
        """``(N, feature_dim)`` float32 features of ``(N, 32, 32, 1)`` images in [-1, 1]."""
        images = np.asarray(images, np.float32)
        if images.shape[1:] != (RESOLUTION, RESOLUTION, 1):
            raise ValueError(
                f"FD-FMNIST takes (N, {RESOLUTION}, {RESOLUTION}, 1) images in [-1, 1], "
                f"got shape {images.shape}"
            )
        return _batched_apply(self.settings.model(), self.params, images)[1]

    def statistics(self, images) -> metrics.RunningStatistics:
        stats = metrics.RunningStatistics(self.reference.mean.shape[0])
        stats.update(self.features(images))
        return stats

    def distance(self, images) -> float:
        """FD-FMNIST of ``images`` against the test split (lower is better)."""
        stats = self.statistics(images)
        return metrics.frechet_distance(
            stats.mean, stats.covariance, self.reference.mean, self.reference.covariance
        )

    @classmethod
    def load_or_train(
        cls,
        cache_dir: str | None = None,
        data_dir: str | None = None,
        settings: TrainingSettings = TrainingSettings(),
    ) -> FdFmnist:
        """The cached classifier and statistics, trained and cached on first use.

        A corrupt cache entry is reported in the log and replaced by a retrained one.

        Raises:
          RuntimeError: if the classifier (trained now or loaded) misses
            ``MIN_TEST_ACCURACY``.
        """
        stem = os.path.join(cache_dir or default_cache_dir(), settings.cache_name())
        if os.path.exists(stem + classifier_cache.RECORD_SUFFIX):
            try:
                result = cls._load(stem, settings)
            except classifier_cache.CorruptCacheError as e:
                logging.warning("FD-FMNIST: %s; retraining", e)
            else:
                _check_gate(result.test_accuracy, stem + classifier_cache.RECORD_SUFFIX)
                return result
        logging.info("Training the FD-FMNIST classifier (once; cached under %s)", stem)
        result = cls.train(settings, data_dir)
        result._save(stem)
        logging.info("FD-FMNIST classifier: test accuracy %.4f", result.test_accuracy)
        return result

    @classmethod
    def train(cls, settings: TrainingSettings, data_dir: str | None = None) -> FdFmnist:
        """Trains the classifier, gates it and computes the reference (no cache)."""
        train_images, train_labels = load_split("train", data_dir)
        test_images, test_labels = load_split("test", data_dir)
        params = train_classifier(train_images, train_labels, settings)
        model = settings.model()
        test_accuracy = accuracy(model, params, test_images, test_labels)
        _check_gate(test_accuracy)
        reference = metrics.RunningStatistics(settings.feature_dim)
        reference.update(_batched_apply(model, params, test_images)[1])
        return cls(settings, params, test_accuracy, reference)

    def _save(self, stem: str) -> None:
        record = {
            "test_accuracy": self.test_accuracy,
            "settings": dataclasses.asdict(self.settings),
            "cache_version": CACHE_VERSION,
        }
        classifier_cache.save_entry(stem, self.params, self.reference, record)

    @classmethod
    def _load(cls, stem: str, settings: TrainingSettings) -> FdFmnist:
        template = settings.model().init(
            jax.random.key(0), jnp.zeros((1, RESOLUTION, RESOLUTION, 1))
        )
        params, reference, record = classifier_cache.load_entry(stem, template)
        return cls(settings, params, float(record["test_accuracy"]), reference)
