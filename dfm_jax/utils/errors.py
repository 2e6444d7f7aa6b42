"""``RunFault``: a fault a run detected and reports in one line, without a traceback.

Raised for faults of the environment rather than bugs: no readable checkpoint left, a
workdir held by another trainer, a read-only workdir or a full disk during a save, a
corrupt data record. The command-line tools print ``error: <message>`` and exit with
status 2 (``dfm_jax.console``), as for a user's mistake.
"""

from __future__ import annotations


class RunFault(RuntimeError):
    """A detected fault of the run's files or environment; the message says what to do."""
