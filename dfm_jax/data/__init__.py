"""Data for dfm_jax: Grain sources, pipelines and global batches.

Every source yields examples `{"image": float32 (H, W, C) or (T, H, W, C), "label": int32}`;
"image" holds pixels in [-1, 1] for pixel sources and model-space latents for the latent
source (same key, so the trainer does not care which).

    source = make_source(config.data)                  # num_classes, example_shape, len()
    iterator = make_train_iterator(source, global_batch_size=..., seed=config.seed)
    batch = parallel.make_global_batch(next(iterator), mesh, ("data", "fsdp"))

Modules: `common` (base class, errors, image helpers), `idx` (IDX files), `fashion_mnist`,
`synthetic`, `image_folder`, `tfds_source`, `record_format` + `latents` (ArrayRecord latent
datasets: writer, metadata, reader), `video` (PyAV decoding and clip sampling) +
`video_folder` (`VideoFolderSource`: root/<class>/<video>.mp4; `KineticsSource`:
Kinetics-700-2020 clips + annotation CSVs; clips decoded by the `DecodeClip` operation),
`pipeline` (Grain dataset pipeline), `factory` (`make_source` from a config).
"""

from dfm_jax.data.common import IMAGE_KEY, LABEL_KEY, DataNotFoundError, Source
from dfm_jax.data.factory import SOURCES, DataSpec, data_spec, make_source
from dfm_jax.data.fashion_mnist import FashionMnistSource
from dfm_jax.data.idx import IdxFormatError, read_idx, write_idx
from dfm_jax.data.image_folder import ImageFolderSource
from dfm_jax.data.latents import (
    ArrayRecordLatentSource,
    LatentMetadata,
    SampleLatent,
    read_metadata,
    shard_filename,
    shard_paths,
    write_metadata,
    write_shard,
)
from dfm_jax.data.moving_fashion_mnist import MovingFashionMnistSource
from dfm_jax.data.pipeline import local_batch_size, make_dataset, make_train_iterator
from dfm_jax.data.record_format import RecordFormatError
from dfm_jax.data.synthetic import SyntheticSource
from dfm_jax.data.tfds_source import TfdsSource
from dfm_jax.data.video import (
    VideoReadError,
    VideoTooShortError,
    VideoTruncatedError,
    measure_decoding,
)
from dfm_jax.data.video_folder import (
    DecodeClip,
    KineticsSource,
    TooManyBadVideosError,
    VideoFolderSource,
)

__all__ = [
    "IMAGE_KEY",
    "LABEL_KEY",
    "SOURCES",
    "ArrayRecordLatentSource",
    "DataNotFoundError",
    "DataSpec",
    "DecodeClip",
    "FashionMnistSource",
    "IdxFormatError",
    "ImageFolderSource",
    "KineticsSource",
    "LatentMetadata",
    "MovingFashionMnistSource",
    "RecordFormatError",
    "SampleLatent",
    "Source",
    "SyntheticSource",
    "TfdsSource",
    "TooManyBadVideosError",
    "VideoFolderSource",
    "VideoReadError",
    "VideoTooShortError",
    "VideoTruncatedError",
    "data_spec",
    "local_batch_size",
    "make_dataset",
    "make_source",
    "make_train_iterator",
    "measure_decoding",
    "read_idx",
    "read_metadata",
    "shard_filename",
    "shard_paths",
    "write_idx",
    "write_metadata",
    "write_shard",
]
