"""Train a DFM (or Flow Matching) model.

    python -m dfm_jax.main --config=configs/demo.py --workdir=/tmp/dfm_demo
    python -m dfm_jax.main --config=configs/imagenet512.py --workdir=gs://bucket/run1 \
        --config.batch_size=512 --config.model.dtype=bfloat16

Any config field can be overridden with ``--config.<field>=<value>``. Running again
with the same workdir resumes from its newest checkpoint. On several hosts run
the same command on every host (see ``launch/``).
"""

from dfm_jax import console  # first: it sets TensorFlow's environment

# isort: split
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dfm_jax import config as config_lib
from dfm_jax import parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    settings = config_lib.read(_CONFIG.value)  # the one read of the config
    parallel.maybe_initialize_distributed()
    from dfm_jax.training import loop  # imports JAX backends only after distributed start-up

    overrides = [arg for arg in sys.argv[1:] if arg.startswith("--config.")]
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    logging.info("Config %s%s", path, f" with {' '.join(overrides)}" if overrides else "")
    loop.run(settings, _WORKDIR.value)


if __name__ == "__main__":
    console.run(main)
