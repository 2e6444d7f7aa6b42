"""Dataset preparation: images -> autoencoder latents in ArrayRecord shards + metadata.

The library behind ``python -m dfm_jax.prepare`` (see ``dfm_jax/prepare.py`` for the CLI):
``run(PrepareOptions(...))`` returns a ``PrepareResult``.

Modules: ``readers`` (image folder and TFDS readers with the ADM centre crop; unreadable
images raise ``ReadError``), ``shards`` (shard plan, resume state, output-directory checks),
``encoding`` (batch-sharded encoding on the mesh), ``stats`` (per-scale stds under named
pyramids), ``runner`` (the pipeline and the metadata).
"""

from dfm_jax.preparation.encoding import STORES, Encoder
from dfm_jax.preparation.readers import (
    SOURCES,
    ImageFolderReader,
    ReadError,
    TfdsReader,
    make_reader,
)
from dfm_jax.preparation.runner import PrepareOptions, PrepareResult, run
from dfm_jax.preparation.shards import Shard, ShardState, plan_shards
from dfm_jax.preparation.stats import DEFAULT_PYRAMIDS, measure_scale_stds, pyramid_from_name

__all__ = [
    "DEFAULT_PYRAMIDS",
    "SOURCES",
    "STORES",
    "Encoder",
    "ImageFolderReader",
    "PrepareOptions",
    "PrepareResult",
    "ReadError",
    "Shard",
    "ShardState",
    "TfdsReader",
    "make_reader",
    "measure_scale_stds",
    "plan_shards",
    "pyramid_from_name",
    "run",
]
