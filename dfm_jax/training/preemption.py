"""Preemption: SIGTERM becomes a flag the training loop checks between steps."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """Turns SIGTERM into a flag that the loop checks between steps.

    With several processes the flag is combined across all of them, so every
    process saves the same step and leaves together.
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint at the next step and exiting")
        self._event.set()

    def requested(self) -> bool:
        flag = self._event.is_set()
        if jax.process_count() > 1:
            flag = bool(multihost_utils.process_allgather(np.int32(flag)).max())
        return flag

    def close(self) -> None:
        """Restores the previous SIGTERM handler."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def __enter__(self) -> PreemptionWatcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
