"""Train a DFM (or Flow Matching) model.

    python -m dfm_jax.main --config=configs/demo.py --workdir=/tmp/dfm_demo
    python -m dfm_jax.main --config=configs/imagenet512.py --workdir=gs://bucket/run1 \
        --config.batch_size=512 --config.model.dtype=bfloat16

Any config field can be overridden with ``--config.<field>=<value>``. Running again
with the same workdir resumes from its newest checkpoint. On several hosts run
the same command on every host (see ``launch/``).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dfm_jax import parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.maybe_initialize_distributed()
    from dfm_jax.training import loop

    logging.info("Config:\n%s", _CONFIG.value)
    loop.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
