"""``python -m dfm_jax.main`` as a subprocess: an end-to-end run, and resuming after kill -9."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import time

import numpy as np
import pytest
import train_utils
from PIL import Image

from dfm_jax.training import checkpoint, loop
from dfm_jax.training import setup as setup_lib


@pytest.fixture(scope="module", autouse=True)
def _compile_cache():
    with train_utils.persistent_compile_cache():
        yield


def test_demo_config_end_to_end(tmp_path):
    """configs/demo.py with tiny overrides: exit 0, checkpoints, TensorBoard events, PNGs.

    The workdir is given as a relative path, as ``make demo`` does.
    """
    workdir = tmp_path / "demo"
    log = train_utils.run_main(
        "demo",
        {"total_steps": 2, "log_every": 1, "checkpoint_every": 1, "sample_every": 2},
        cwd=tmp_path,
    )
    assert re.search(r"step 2/2 \| loss \d+\.\d+", log), train_utils.tail(log)
    assert train_utils.checkpoint_steps(workdir / "checkpoints") == [1, 2]
    events = glob.glob(str(workdir / "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 0, os.listdir(workdir)

    # A 2x2 grid of 8x8 one-channel samples upscaled to 64x64 with 2-pixel padding, after
    # a column of row labels (the synthetic source has no class names: ids); previews: 2
    # rows of stage 1 (upsampled) + final, with the same labels.
    cells = 2 * (64 + 2) + 2
    grid = np.asarray(Image.open(workdir / "samples" / "step_00000002_grid.png"))
    assert grid.shape[0] == cells and grid.shape[1] > cells, grid.shape
    assert grid[:, :-cells].any()  # the row labels
    previews = np.asarray(Image.open(workdir / "samples" / "step_00000002_previews.png"))
    assert previews.shape == grid.shape

    # The checkpoint carries the config as JSON and restores into the run's layout.
    config = train_utils.tiny_settings()
    manager = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        saved = manager.restore_config()
        assert saved["model"]["width"] == 32 and saved["data"]["source"] == "synthetic"
        setup = setup_lib.build(config)
        state, step = manager.restore(setup.abstract_state)
    finally:
        manager.close()
    assert step == 2 and int(state.step) == 2
    # The grid's cells are the samples of the checkpoint's EMA parameters.
    samples = train_utils.grid_samples(setup, state.ema_params)
    assert samples.shape == (4, 8, 8, 1)
    train_utils.assert_grid_holds(grid, samples, columns=2)


@pytest.mark.slow  # 21 s; SIGTERM and corrupt-checkpoint resumes stay in make test
def test_kill9_resumes_from_the_last_complete_checkpoint(tmp_path):
    """SIGKILL mid-run; the next run resumes from the newest complete checkpoint, ends at
    total_steps, and equals an uninterrupted run bitwise."""
    total, first = 20, 5
    run_overrides = {
        "total_steps": total,
        "log_every": 10,
        "checkpoint_every": 5,
        "sample_every": 1000,
    }
    workdir = tmp_path / "killed"
    checkpoints = workdir / "checkpoints"
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            train_utils.main_command(workdir, run_overrides),
            env=train_utils.subprocess_env(),
            cwd=train_utils.REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 240
            while not [s for s in train_utils.checkpoint_steps(checkpoints) if s >= first]:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = train_utils.tail(log_path.read_text())
                    pytest.fail(f"no checkpoint >= {first} appeared:\n{log}")
                time.sleep(0.02)
            process.kill()
        finally:
            process.kill()
            process.wait(timeout=60)
    assert process.returncode == -9, (
        f"the run ended ({process.returncode}) before it was killed; raise total_steps:\n"
        f"{train_utils.tail(log_path.read_text())}"
    )
    complete = train_utils.checkpoint_steps(checkpoints)
    resume_step = complete[-1]
    assert first <= resume_step < total, complete

    log = train_utils.run_main(workdir, run_overrides)
    assert f"Restored checkpoint of step {resume_step} " in log, train_utils.tail(log)
    assert f"start at step {resume_step}" in log
    assert train_utils.checkpoint_steps(checkpoints)[-1] == total

    # The uninterrupted run (checkpointing only at the end: saves do not change the state).
    config = train_utils.tiny_settings({**run_overrides, "checkpoint_every": 1000})
    manager = checkpoint.Checkpointer(checkpoints, async_save=False)
    try:
        resumed, step = manager.restore(setup_lib.build(config).abstract_state)
    finally:
        manager.close()
    assert step == total
    straight = loop.run(config, str(tmp_path / "straight"))
    train_utils.assert_trees_equal(
        train_utils.to_host(resumed), train_utils.to_host(straight), "resumed vs straight"
    )
