"""The XLA flags of every test process (this one and the subprocesses it starts).

Not a test module, and free of JAX imports: ``conftest.py`` reads it before JAX is
imported, because XLA reads ``XLA_FLAGS`` once, when the CPU client starts.

* ``--xla_force_host_platform_device_count``: the simulated CPU devices of a mesh.
* ``--xla_backend_optimization_level=0``: LLVM code generation without its optimisation
  passes. Compiling is most of the suite's time (thousands of small programs, most run
  once), and level 0 cuts it by about a third (docs/testing.md, "Suite time"); it changes
  how fast a program runs, not what it computes (XLA's own HLO passes, fusion and
  layout, are unaffected). The benchmarks
  (``python -m dfm_jax.bench``) and every real run use XLA's default level.
"""

TEST_ONLY_FLAGS = ("--xla_backend_optimization_level=0",)


def xla_flags(num_devices: int, inherited: str = "") -> str:
    """``XLA_FLAGS`` for a test process with ``num_devices`` CPU devices.

    ``inherited`` (the caller's own ``XLA_FLAGS``) comes first, so a developer's flags are
    kept; the device count and the test-only flags are appended.
    """
    flags = [inherited.strip(), f"--xla_force_host_platform_device_count={num_devices}"]
    return " ".join(filter(None, [*flags, *TEST_ONLY_FLAGS]))
