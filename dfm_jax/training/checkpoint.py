"""Orbax checkpoints of the train state, the data-iterator state and the config.

A checkpoint step directory ``<workdir>/checkpoints/<step>/`` holds three items:

* ``state``:  the sharded ``TrainState`` pytree (params, EMA, optimizer, step);
* ``data``:   the Grain iterator state, so a resumed run sees the same batches;
* ``config``: the run's config as JSON (for reading, never for resuming logic).

Saves are asynchronous (training continues while the arrays are written) and
atomic (Orbax writes to a temporary directory and renames it when complete), so
a ``kill -9`` at any moment leaves the last complete checkpoint readable.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for one training run.

    Args:
      directory: where step directories live (local path, relative or absolute, or
        ``gs://``).
      max_to_keep: number of most recent checkpoints kept.
      async_save: write in a background thread.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        directory = os.fspath(directory)
        # Orbax needs absolute paths; remote paths (gs://...) are absolute already.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "data", "config"),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any | None = None,
        config: dict | None = None,
    ) -> bool:
        """Starts saving ``state`` (and the iterator state and config) at ``step``.

        Returns whether a save was started (False when that step already exists).
        """
        if step in self._manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(json.dumps(config, default=str)))
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            logging.info("Saving checkpoint of step %d to %s", step, self.directory)
        return saved

    def restore(
        self, abstract_state: Any, data_iterator: Any | None = None, step: int | None = None
    ) -> tuple[Any, int]:
        """Restores the state into the shardings of ``abstract_state``.

        Args:
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding``
            set (e.g. from ``jax.eval_shape`` plus the run's shardings); the
            restored arrays are placed directly with those shardings.
          data_iterator: a Grain iterator whose state is restored in place.
          step: which step; defaults to the latest.

        Returns:
          ``(state, step)``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        logging.info("Restored checkpoint of step %d from %s", step, self.directory)
        return restored["state"], step

    def restore_fields(self, abstract_fields: dict[str, Any], step: int) -> dict[str, Any]:
        """Restores only some top-level fields of the saved state, e.g. the EMA parameters.

        ``abstract_fields`` maps field names of the saved ``TrainState`` (e.g.
        ``{"ema_params": abstract_state.ema_params}``) to abstract pytrees with shardings;
        nothing else is read, so evaluating a big model does not hold its optimizer state.
        """
        path = os.path.join(self.directory, str(step), "state")
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_fields)
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            restored = reader.restore(
                path,
                args=ocp.args.PyTreeRestore(
                    item=abstract_fields, restore_args=restore_args, partial_restore=True
                ),
            )
        logging.info("Restored %s of step %d from %s", sorted(abstract_fields), step, path)
        return restored

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` leaves carrying the given shardings (restore targets)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree,
        shardings,
    )
