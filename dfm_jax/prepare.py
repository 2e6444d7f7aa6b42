"""Encode an image or video dataset into a latent dataset (ArrayRecord shards + metadata.json).

    # ImageNet from TFDS (prepared from the official archives: put ILSVRC2012_img_train.tar
    # and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual and run
    # `tfds build imagenet2012 --data_dir=<data_dir> --file_format=array_record`)
    python -m dfm_jax.prepare --source=tfds --tfds_name=imagenet2012 --split=train \\
        --data_dir=/data/tfds --resolution=512 --autoencoder=flux-ae \\
        --autoencoder_weights=/weights/flux-vae/diffusion_pytorch_model.safetensors \\
        --autoencoder_dtype=bfloat16 --out=/data/in512_flux --flip

    # An image folder with one subfolder per class (e.g. ImageNet's train/)
    python -m dfm_jax.prepare --source=image_folder --data_dir=/data/imagenet/train \\
        --resolution=256 --autoencoder=sd-vae-ft-ema --autoencoder_weights=/weights/sd-vae-ft-ema \\
        --out=/data/in256_sd

    # Kinetics-700-2020 as distributed (<root>/train/<class>/<ytid>_<start>_<end>.mp4 and
    # <root>/[annotations/]train.csv): the centre clip of 17 frames at 8 fps of every video,
    # encoded by the CogVideoX-2b autoencoder into 5 x 64 x 64 x 16 latents
    python -m dfm_jax.prepare --source=kinetics --data_dir=/data/kinetics700 --split=train \\
        --frames=17 --fps=8 --resolution=512 --autoencoder=cogvideox-2b \\
        --autoencoder_weights=/weights/CogVideoX-2b/vae --autoencoder_dtype=bfloat16 \\
        --out=/data/k700_512_cogvideox

Train on the result with ``--config.data.source=array_record --config.data.dir=<out>``.
Videos (``--source=video_folder`` or ``kinetics``) give one record per video: its centre
clip (``--frames`` every ``--frame_stride`` frames, or at ``--fps``), every frame
ADM-centre-cropped; unreadable, truncated and too-short videos are skipped and counted.

Images get the ADM centre crop; with ``--flip`` every image is followed by its
horizontal flip (a separate record). Records hold raw latents (``--store=moments``:
the posterior mean and std, a latent is drawn per read; ``mean``; ``sample``) in
``--dtype``; ``metadata.json`` holds the autoencoder's scaling and shift factors, class
names, provenance, and per-scale latent stds (model space) for every ``--pyramids``
name, measured on ``--stats_examples`` random records.

Running the same command again resumes: finished shards are kept, the rest are
(re)written, then the metadata is rewritten (to add pyramids, rerun with a longer
``--pyramids``). An output directory holding a different preparation is refused
unless ``--overwrite``. Unreadable images are skipped and counted (summary line and
``metadata.json``). On several hosts run the same command on every host with ``--out``
on a shared file system; each process encodes its own shards on its own devices.
The library behind this command is ``dfm_jax.preparation``.
"""

from dfm_jax import console  # first: it sets TensorFlow's environment

# isort: split
from absl import app, flags, logging

from dfm_jax import parallel

_OUT = flags.DEFINE_string("out", None, "Output directory of the latent dataset.")
_SOURCE = flags.DEFINE_enum(
    "source",
    "image_folder",
    ["image_folder", "tfds", "video_folder", "kinetics"],
    "Images (a class folder, TFDS) or videos (a class folder, Kinetics-700).",
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "Image / video folder (<dir>/<class>/<file>), Kinetics root, or TFDS data dir."
)
_TFDS_NAME = flags.DEFINE_string("tfds_name", "imagenet2012", "TFDS dataset name.")
_SPLIT = flags.DEFINE_string(
    "split", "train", "TFDS split (e.g. train, validation, train[:1%]); Kinetics: train, validate."
)
_IMAGE_KEY = flags.DEFINE_string("image_key", "image", "TFDS image feature.")
_LABEL_KEY = flags.DEFINE_string("label_key", "label", "TFDS label feature ('' = unlabelled).")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "Centre-crop resolution in pixels.")
_FRAMES = flags.DEFINE_integer("frames", 0, "Videos: frames per clip (1 + 4k for CogVideoX).")
_FRAME_STRIDE = flags.DEFINE_integer("frame_stride", 1, "Videos: decoded frames per clip frame.")
_FPS = flags.DEFINE_float("fps", 0.0, "Videos: target frame rate (> 0 overrides --frame_stride).")
_AUTOENCODER = flags.DEFINE_string(
    "autoencoder",
    "sd-vae-ft-ema",
    "sd-vae-ft-ema | sd-vae-ft-mse | flux-ae | tiny; videos: cogvideox-2b | cogvideox-5b | "
    "tiny-video.",
)
_WEIGHTS = flags.DEFINE_string(
    "autoencoder_weights", "", "diffusers diffusion_pytorch_model.safetensors (or its dir)."
)
_AE_DTYPE = flags.DEFINE_enum(
    "autoencoder_dtype", "float32", ["float32", "bfloat16", "float16"], "Encoder compute dtype."
)
_FLIP = flags.DEFINE_bool("flip", False, "Also store every image's horizontal flip.")
_STORE = flags.DEFINE_enum(
    "store", "moments", ["moments", "mean", "sample"], "Posterior moments, mean or one sample."
)
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16", "float16"], "Storage dtype of the latents."
)
_IMAGES_PER_SHARD = flags.DEFINE_integer(
    "images_per_shard", None, "Source images per shard (default 1024; x2 records with --flip)."
)
_NUM_SHARDS = flags.DEFINE_integer("num_shards", None, "Number of shards (instead).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Images per encoder call per host (default 16 per local device)."
)
_PYRAMIDS = flags.DEFINE_list(
    "pyramids",
    "laplacian_1,laplacian_2,laplacian_4,laplacian_2x2,haar_2",
    "Pyramids (dfm_jax.method.pyramid.metadata_name) whose per-scale stds go into the metadata.",
)
_STATS_EXAMPLES = flags.DEFINE_integer(
    "stats_examples", 10_000, "Random records the per-scale stds are measured on."
)
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "Use only the first N images.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of --store=sample draws and the stats subset.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Image-decoding threads (0: 2 per CPU core).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a different dataset in --out.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["out"])


def options_from_flags():
    """The `PrepareOptions` of the parsed command-line flags."""
    from dfm_jax.preparation import PrepareOptions

    return PrepareOptions(
        out=_OUT.value,
        source=_SOURCE.value,
        data_dir=_DATA_DIR.value,
        tfds_name=_TFDS_NAME.value,
        split=_SPLIT.value,
        image_key=_IMAGE_KEY.value,
        label_key=_LABEL_KEY.value,
        resolution=_RESOLUTION.value,
        frames=_FRAMES.value,
        frame_stride=_FRAME_STRIDE.value,
        fps=_FPS.value,
        autoencoder=_AUTOENCODER.value,
        autoencoder_weights=_WEIGHTS.value,
        autoencoder_dtype=_AE_DTYPE.value,
        flip=_FLIP.value,
        store=_STORE.value,
        dtype=_DTYPE.value,
        images_per_shard=_IMAGES_PER_SHARD.value,
        num_shards=_NUM_SHARDS.value,
        batch_size=_BATCH_SIZE.value,
        pyramids=tuple(_PYRAMIDS.value),
        stats_examples=_STATS_EXAMPLES.value,
        max_examples=_MAX_EXAMPLES.value,
        seed=_SEED.value,
        workers=_WORKERS.value,
        overwrite=_OVERWRITE.value,
        progress=_PROGRESS.value,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.maybe_initialize_distributed()
    from dfm_jax import preparation

    options = options_from_flags()
    logging.info("prepare options: %s", options)
    result = preparation.run(options)
    print(result.summary(), flush=True)


if __name__ == "__main__":
    console.run(main)
