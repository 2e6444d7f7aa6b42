"""The XLA flags of every test process (this one and the subprocesses it starts).

Not a test module, and free of JAX imports: ``conftest.py`` reads it before JAX is
imported, because XLA reads ``XLA_FLAGS`` once, when the CPU client starts.

* ``--xla_force_host_platform_device_count``: the simulated CPU devices of a mesh.
* ``--xla_backend_optimization_level=0``: LLVM code generation without its optimisation
  passes.
* ``--xla_cpu_use_fusion_emitters=false``: fused loops emitted by XLA's older elemental IR
  emitter instead of the MLIR fusion emitters, which compile about twice as slowly.
* ``--xla_cpu_parallel_codegen_split_count=1``: each program is code-generated as one
  LLVM module rather than split for parallel compilation (the suite's two workers
  already keep both cores busy).

Compiling is most of the suite's time (thousands of small programs, most run once);
together these flags cut XLA's backend compile time by more than half (docs/testing.md,
"Suite time"). They change how XLA turns a program into machine code, not the program:
results agree with XLA's defaults to float rounding (three train steps of the tiny DiT
give bitwise the same parameters with and without the last two flags; level 0 against
the default level differs in the last bits of the loss). The benchmarks
(``python -m dfm_jax.bench``) and every real run use XLA's defaults, and so does the
optimisation level of a test program compiled with ``optimized`` (one that runs many
times).
"""

from __future__ import annotations

TEST_ONLY_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)

#: XLA's default backend optimisation level, as per-program compiler options.
DEFAULT_LEVEL = {"xla_backend_optimization_level": 3}


def xla_flags(num_devices: int, inherited: str = "") -> str:
    """``XLA_FLAGS`` for a test process with ``num_devices`` CPU devices.

    ``inherited`` (the caller's own ``XLA_FLAGS``) comes first, so a developer's flags are
    kept; the device count and the test-only flags are appended.
    """
    flags = [inherited.strip(), f"--xla_force_host_platform_device_count={num_devices}"]
    return " ".join(filter(None, [*flags, *TEST_ONLY_FLAGS]))


def optimized(fun, **jit_kwargs):
    """``jax.jit(fun, **jit_kwargs)`` compiled at XLA's default optimisation level.

    For the few tests whose time goes to running one program many times rather than to
    compiling it: the tiny FVD classifier's 300 training steps take 19 ms each at the
    default level against 58 ms with the flags above (2-core machine, 2026-12-02).
    """
    import jax  # here, not at the top: conftest imports this module before JAX starts

    return jax.jit(fun, compiler_options=DEFAULT_LEVEL, **jit_kwargs)
