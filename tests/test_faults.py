"""Fault injection: each case names the fault, the expected outcome, and checks that nothing
already written was lost (docs/reliability.md keeps the table of these cases).

In-process cases run ``loop.run`` on the tiny config (shared compile cache); the
subprocess cases run ``python -m dfm_jax.main`` (``train_utils.main_command``). The kill
-9 seeds and SIGTERM during a save are ``slow`` (``pytest -m slow tests/test_faults.py``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import train_utils

from dfm_jax import config as config_lib
from dfm_jax import data, parallel
from dfm_jax.data import latents
from dfm_jax.evaluation import runner
from dfm_jax.training import checkpoint, loop, workdir_lock
from dfm_jax.training import setup as setup_lib

#: Steps 2, 4, 6 checkpointed; samples and logs out of the way.
RUN = {"total_steps": 6, "log_every": 2, "checkpoint_every": 2, "sample_every": 1000}


@pytest.fixture(scope="module", autouse=True)
def _compile_cache():
    with train_utils.persistent_compile_cache():
        yield


@pytest.fixture(scope="module")
def settings():
    return train_utils.tiny_settings(RUN)


@pytest.fixture(scope="module")
def setup(settings):
    return setup_lib.build(settings)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, settings):
    """An uninterrupted run: its workdir (checkpoints 2, 4, 6) and its final host state."""
    workdir = tmp_path_factory.mktemp("straight")
    final = train_utils.to_host(loop.run(settings, str(workdir)))
    return workdir, final


@pytest.fixture(scope="module")
def step4(setup, straight):
    """The uninterrupted run's step-4 state on the host: what every fallback must restore."""
    return _restore(straight[0] / "checkpoints", setup, 4)


def _restore(directory, setup, step):
    manager = checkpoint.Checkpointer(directory, async_save=False)
    try:
        state, _ = manager.restore(setup.abstract_state, step=step)
        return train_utils.to_host(state)
    finally:
        manager.close()


def _copy_run(source, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def _flip_bits(path):
    """Flips every bit of the middle half of the file."""
    payload = bytearray(path.read_bytes())
    start, stop = len(payload) // 4, max(len(payload) * 3 // 4, len(payload) // 4 + 1)
    payload[start:stop] = bytes(b ^ 0xFF for b in payload[start:stop])
    path.write_bytes(bytes(payload))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _largest(directory):
    files = [p for p in directory.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


#: (case, which file of the step directory, how it is damaged). Each must make the step
#: unreadable, so the restore falls back to the next older step.
def _array_file(step_dir):
    return _largest(step_dir / "state" / "ocdbt.process_0")


def _array_files(step_dir):
    return sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir())


DAMAGE = {
    "bit flips in an array data file": (_array_file, _flip_bits),
    "truncated array data files": (_array_files, _truncate),
    "truncated state _METADATA": (lambda s: s / "state" / "_METADATA", _truncate),
    "bit flips in state _METADATA": (lambda s: s / "state" / "_METADATA", _flip_bits),
    "truncated OCDBT manifest": (lambda s: s / "state" / "manifest.ocdbt", _truncate),
    "truncated data-iterator state": (lambda s: s / "data" / "process_0-of-1.json", _truncate),
    "missing array data file": (_array_file, os.remove),
    "missing state directory": (lambda s: s / "state", shutil.rmtree),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_unreadable_newest_checkpoint_falls_back_to_the_previous(
    case, tmp_path, setup, straight, step4
):
    """Fault: one file of the newest checkpoint (step 6) damaged. Outcome: step 6 is
    renamed to 6.corrupt-<time> (its files kept), step 4 restored bitwise."""
    workdir = _copy_run(straight[0], tmp_path)
    directory = workdir / "checkpoints"
    pick, damage = DAMAGE[case]
    targets = pick(directory / "6")
    size_before = sum(p.stat().st_size for p in (directory / "6").rglob("*") if p.is_file())
    for target in targets if isinstance(targets, list) else [targets]:
        damage(target)
    iterator = data.make_train_iterator(setup.source, global_batch_size=8, seed=0)
    manager = checkpoint.Checkpointer(directory, async_save=False)
    try:
        state, step = manager.restore_newest(setup.abstract_state, iterator)
        assert step == 4
        assert manager.all_steps() == [2, 4]
    finally:
        manager.close()
    train_utils.assert_trees_equal(train_utils.to_host(state), step4, "step 4")
    aside = [p for p in directory.iterdir() if p.name.startswith("6.corrupt-")]
    assert len(aside) == 1, sorted(os.listdir(directory))
    assert sum(p.stat().st_size for p in aside[0].rglob("*") if p.is_file()) <= size_before
    assert any(aside[0].rglob("*")), "the unreadable checkpoint was emptied"


def test_corrupt_newest_then_rerun_equals_the_uninterrupted_run(tmp_path, settings, straight):
    """Fault: bit flips in step 6 of a finished run, rerun of the same command. Outcome: the
    run resumes from step 4, trains 2 steps, saves 6; the state equals the uninterrupted
    run's bitwise; the damaged step is kept aside."""
    workdir = _copy_run(straight[0], tmp_path)
    _flip_bits(_largest(workdir / "checkpoints" / "6" / "state" / "ocdbt.process_0"))
    resumed = train_utils.to_host(loop.run(settings, str(workdir)))
    assert int(resumed.step) == 6
    train_utils.assert_trees_equal(resumed, straight[1], "resumed vs straight")
    names = os.listdir(workdir / "checkpoints")
    assert train_utils.checkpoint_steps(workdir / "checkpoints") == [2, 4, 6]
    assert any(name.startswith("6.corrupt-") for name in names), names


def test_no_readable_checkpoint_stops_and_deletes_nothing(tmp_path, settings, straight):
    """Fault: every checkpoint damaged. Outcome: NoReadableCheckpointError listing each step
    and its reason; nothing deleted; a second try still refuses (no fresh start)."""
    workdir = _copy_run(straight[0], tmp_path)
    for step in (2, 4, 6):
        _truncate(workdir / "checkpoints" / str(step) / "state" / "_METADATA")
    with pytest.raises(checkpoint.NoReadableCheckpointError) as error:
        loop.run(settings, str(workdir))
    message = str(error.value)
    for step in (6, 4, 2):
        assert f"step {step}: " in message, message
    assert "Nothing was deleted" in message
    names = sorted(os.listdir(workdir / "checkpoints"))
    assert len([n for n in names if ".corrupt-" in n]) == 3, names
    with pytest.raises(checkpoint.NoReadableCheckpointError, match="set aside"):
        loop.run(settings, str(workdir))
    assert not (workdir / workdir_lock.LOCK_NAME).exists(), "the lock outlived the run"


def test_checkpoint_of_another_model_is_unreadable(tmp_path, straight):
    """Fault: a workdir trained with another model (width 32) restored as width 64.
    Outcome: each step reported and set aside, NoReadableCheckpointError, nothing deleted."""
    workdir = _copy_run(straight[0], tmp_path)
    other = setup_lib.build(train_utils.tiny_settings({**RUN, "model.width": 64}))
    manager = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        with pytest.raises(checkpoint.NoReadableCheckpointError, match="step 2: "):
            manager.restore_newest(other.abstract_state)
    finally:
        manager.close()
    assert len(os.listdir(workdir / "checkpoints")) == 3


def test_eval_skips_an_unreadable_newest_step_without_renaming(tmp_path, setup, straight, step4):
    """Fault: step 6 damaged, eval picks the newest. Outcome: the EMA of step 4, nothing
    renamed (eval is read-only); an explicit unreadable step is an error."""
    workdir = _copy_run(straight[0], tmp_path)
    _truncate(workdir / "checkpoints" / "6" / "state" / "_METADATA")
    newest = runner.resolve_step(str(workdir), None)
    params, step = runner.restore_newest_ema_params(setup, str(workdir), newest)
    assert (newest, step) == (6, 4)
    want = step4.ema_params
    train_utils.assert_trees_equal(train_utils.to_host(params), want, "EMA of step 4")
    assert train_utils.checkpoint_steps(workdir / "checkpoints") == [2, 4, 6]
    assert not [n for n in os.listdir(workdir / "checkpoints") if ".corrupt-" in n]
    with pytest.raises((ValueError, OSError)):  # an explicit step does not fall back
        runner.restore_ema_params(setup, str(workdir), 6)


# --- The workdir lock ---------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_held_lock_refuses_a_second_trainer(tmp_path, settings):
    """Fault: a second trainer on a workdir whose lock is held. Outcome: WorkdirLockedError
    naming the holder before anything is written; the holder's lock untouched."""
    holder = workdir_lock.WorkdirLock(str(tmp_path))
    holder.acquire()
    try:
        record = (tmp_path / workdir_lock.LOCK_NAME).read_text()
        with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()} on host"):
            loop.run(settings, str(tmp_path))
        assert (tmp_path / workdir_lock.LOCK_NAME).read_text() == record
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.release()
    assert not (tmp_path / workdir_lock.LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_and_another_hosts_is_not(tmp_path):
    """Fault: a lock left by a dead process on this host (taken over) or held on another
    host (refused: its liveness cannot be checked)."""
    path = tmp_path / workdir_lock.LOCK_NAME
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "x", "command": ["a"]}
    path.write_text(json.dumps(stale))
    lock = workdir_lock.WorkdirLock(str(tmp_path))
    lock.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()

    path.write_text(json.dumps({**stale, "host": "elsewhere-" + socket.gethostname()}))
    with pytest.raises(workdir_lock.WorkdirLockedError, match="another host"):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    assert json.loads(path.read_text())["host"].startswith("elsewhere-")
    path.write_text("{not json")
    with pytest.raises(workdir_lock.WorkdirLockedError, match="cannot be read"):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()


@pytest.mark.slow  # 15 s, two CLI processes; the in-process lock cases stay in make test
def test_two_trainers_on_one_workdir(tmp_path):
    """Fault: the same command started twice on one workdir. Outcome: the second exits at
    once (status 2) naming the first's pid; the first trains on, stops cleanly on
    SIGTERM with a checkpoint, and releases the lock."""
    workdir = tmp_path / "run"
    overrides = {**RUN, "total_steps": 100000, "checkpoint_every": 100000}
    lock = workdir / workdir_lock.LOCK_NAME
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            train_utils.main_command(workdir, overrides),
            env=train_utils.subprocess_env(),
            cwd=train_utils.REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while not lock.exists():
            assert first.poll() is None and time.monotonic() < deadline, train_utils.tail(
                (tmp_path / "first.log").read_text()
            )
            time.sleep(0.05)
        second = subprocess.run(
            train_utils.main_command(workdir, overrides),
            env=train_utils.subprocess_env(),
            cwd=train_utils.REPO,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert second.returncode == 2, train_utils.tail(second.stderr)
        assert f"error: another trainer uses the workdir {workdir}: pid {first.pid}" in (
            second.stderr
        ), train_utils.tail(second.stderr)
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first trainer died"
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=240) == 0, train_utils.tail((tmp_path / "first.log").read_text())
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
        first.wait()
    assert train_utils.checkpoint_steps(workdir / "checkpoints"), "no checkpoint at SIGTERM"
    assert not lock.exists()


# --- Read-only and full disks ---------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path, options):
    """A tmpfs mounted at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_workdir_is_refused_at_start(tmp_path, settings):
    """Fault: a read-only workdir. Outcome: UnwritableWorkdirError naming it at start."""
    workdir = tmp_path / "ro"
    if os.geteuid() == 0:  # root ignores permissions: a read-only mount
        context = _tmpfs(workdir, "ro,size=1m")
    else:
        workdir.mkdir()
        workdir.chmod(0o555)
        context = contextlib.nullcontext()
    with context, pytest.raises(workdir_lock.UnwritableWorkdirError, match=str(workdir)):
        loop.run(settings, str(workdir))


_MAKE_GLOBAL_BATCH = parallel.make_global_batch


def test_disk_full_during_a_save(tmp_path, monkeypatch, settings, setup, straight):
    """Fault: the checkpoint disk (an 8 MiB tmpfs) fills up before the save of step 4.
    Outcome: CheckpointSaveError naming the path and the space needed; step 2 intact;
    after freeing space the same command resumes from 2 and equals the uninterrupted run.
    (A checkpoint of the tiny model takes ~1.3 MiB on disk; 4 MiB left the resumed run's
    steps 2, 4 and 6 too little room on some machines.)"""
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    with _tmpfs(checkpoints, "size=8m"):
        filler = checkpoints / "filler"

        def fill_at_step_3(batch, mesh, axes):
            fill_at_step_3.calls += 1
            if fill_at_step_3.calls == 3:
                deadline = time.monotonic() + 120  # step 2's asynchronous save is complete
                while not (checkpoints / "2").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                # Unbuffered, and close() inside the suppress: a write that half-fits
                # must not leave bytes for close() to flush into the full disk.
                with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
                    while True:
                        f.write(b"\0" * 65536)
            return _MAKE_GLOBAL_BATCH(batch, mesh, axes)

        fill_at_step_3.calls = 0
        monkeypatch.setattr(parallel, "make_global_batch", fill_at_step_3)
        with pytest.raises(checkpoint.CheckpointSaveError) as error:
            loop.run(settings, str(workdir))
        message = str(error.value)
        assert str(checkpoints) in message and "MiB" in message, message
        assert os.strerror(errno.ENOSPC) in message, message
        assert "[2]" in message, message
        assert train_utils.checkpoint_steps(checkpoints) == [2]
        train_utils.assert_trees_equal(
            _restore(checkpoints, setup, 2),
            _restore(straight[0] / "checkpoints", setup, 2),
            "step 2 after the failed save",
        )
        assert not (workdir / workdir_lock.LOCK_NAME).exists()
        monkeypatch.setattr(parallel, "make_global_batch", _MAKE_GLOBAL_BATCH)
        filler.unlink()
        resumed = train_utils.to_host(loop.run(settings, str(workdir)))
        train_utils.assert_trees_equal(resumed, straight[1], "resumed vs straight")
        assert train_utils.checkpoint_steps(checkpoints) == [2, 4, 6]


# --- Non-finite losses ----------------------------------------------------------------


def test_nan_storm_stops_then_the_same_command_finishes(tmp_path, monkeypatch):
    """Fault: NaN batches from step 3 on, past max_consecutive_nonfinite=2. Outcome:
    NonFiniteLossError, checkpoints finite; the rerun (data fixed) finishes."""
    settings = train_utils.tiny_settings({**RUN, "max_consecutive_nonfinite": 2})

    def poison(batch, mesh, axes):
        poison.calls += 1
        if poison.calls >= 3:
            batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
        return _MAKE_GLOBAL_BATCH(batch, mesh, axes)

    poison.calls = 0
    monkeypatch.setattr(parallel, "make_global_batch", poison)
    with pytest.raises(loop.NonFiniteLossError):
        loop.run(settings, str(tmp_path))
    steps = train_utils.checkpoint_steps(tmp_path / "checkpoints")
    assert steps and steps[-1] < 6
    monkeypatch.setattr(parallel, "make_global_batch", _MAKE_GLOBAL_BATCH)
    final = train_utils.to_host(loop.run(settings, str(tmp_path)))
    assert int(final.step) == 6 and all(np.isfinite(x).all() for x in _leaves(final))


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree) if np.asarray(x).dtype.kind == "f"]


# --- Bad latent shards ----------------------------------------------------------------


def _latent_dataset(directory, shapes_per_shard):
    directory.mkdir()
    count = 0
    for index, shapes in enumerate(shapes_per_shard):
        examples = [{"latent": np.full(s, i, np.float32), "label": 0} for i, s in enumerate(shapes)]
        latents.write_shard(
            directory / latents.shard_filename(index, len(shapes_per_shard)), examples
        )
        count += len(shapes)
    latents.write_metadata(directory, latents.LatentMetadata(
        latent_shape=(2, 2, 1), dtype="float32", num_classes=1, num_examples=count))  # fmt: skip


def test_latent_record_of_the_wrong_shape(tmp_path):
    """Fault: record 1 of shard 1 has shape (3, 3, 1). Outcome: "stop" names the shard and
    index; "skip" returns the next record and counts it."""
    good, bad = (2, 2, 1), (3, 3, 1)
    _latent_dataset(tmp_path / "d", [[good, good], [good, bad, good]])
    source = latents.ArrayRecordLatentSource(tmp_path / "d")
    assert source[2]["image"].shape == good
    with pytest.raises(latents.BadRecordError) as error:
        source[3]
    message = str(error.value)
    assert "record 1 of shard latents-00001-of-00002.array_record" in message, message
    assert "bad_records='skip'" in message and "(3, 3, 1)" in message
    skipping = latents.ArrayRecordLatentSource(tmp_path / "d", bad_records="skip")
    np.testing.assert_array_equal(skipping[3]["image"], source[4]["image"])
    assert skipping.skipped == 1


def test_corrupt_latent_shard(tmp_path):
    """Fault: bit flips in record 0 of shard 1 (its chunk hash no longer matches).
    Outcome: "stop" names the shard and index; "skip" returns the next record, counted;
    the other records read as before. A shard whose footer is destroyed is named at open."""
    shape = (2, 2, 1)
    _latent_dataset(tmp_path / "d", [[shape] * 4, [shape] * 4])
    clean = latents.ArrayRecordLatentSource(tmp_path / "d")
    before = [clean[i]["image"] for i in range(8)]
    shard = tmp_path / "d" / latents.shard_filename(1, 2)
    pristine = shard.read_bytes()
    payload = bytearray(pristine)
    payload[140:160] = bytes(b ^ 0xFF for b in payload[140:160])
    shard.write_bytes(bytes(payload))
    source = latents.ArrayRecordLatentSource(tmp_path / "d")
    with pytest.raises(latents.BadRecordError) as error:
        source[4]
    message = str(error.value)
    assert "bad record 0 of shard latents-00001-of-00002.array_record" in message, message
    assert "hash mismatch" in message and "bad_records='skip'" in message
    for i in (*range(4), 5, 6, 7):
        np.testing.assert_array_equal(source[i]["image"], before[i])
    skipping = latents.ArrayRecordLatentSource(tmp_path / "d", bad_records="skip")
    np.testing.assert_array_equal(skipping[4]["image"], before[5])
    assert skipping.skipped == 1

    shard.write_bytes(pristine[:64] + bytes(len(pristine) - 64))  # footer gone too
    with pytest.raises(latents.BadRecordError, match=r"latents-00001-of-00002\.array_record"):
        latents.ArrayRecordLatentSource(tmp_path / "d")


def test_bad_records_choice_is_validated():
    with pytest.raises(config_lib.ConfigError, match=r"data\.bad_records"):
        train_utils.tiny_settings({"data.bad_records": "ignore"})
    assert train_utils.tiny_settings().data.bad_records == "stop"


# --- Slow: kill -9 and SIGTERM at random points of a save -----------------------------


def _kill_during_saves(tmp_path, seed, sig):
    """Starts the run, delivers ``sig`` at a seeded random moment after the first
    checkpoint, reruns the same command; returns the workdir."""
    overrides = {**RUN, "total_steps": 40, "checkpoint_every": 1, "log_every": 10}
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    delay = random.Random(seed).uniform(0.0, 1.5)
    with open(tmp_path / "log", "w") as log:
        process = subprocess.Popen(
            train_utils.main_command(workdir, overrides),
            env=train_utils.subprocess_env(),
            cwd=train_utils.REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while not train_utils.checkpoint_steps(checkpoints):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(delay)
        process.send_signal(sig)
        process.wait(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
    before = train_utils.checkpoint_steps(checkpoints)
    assert before, "no checkpoint survived"
    log = train_utils.run_main(workdir, overrides)
    assert f"Restored checkpoint of step {before[-1]} " in log or before[-1] == 40, (
        train_utils.tail(log)
    )
    assert train_utils.checkpoint_steps(checkpoints)[-1] == 40
    return workdir, overrides


@pytest.fixture(scope="module")
def straight40(tmp_path_factory):
    overrides = {**RUN, "total_steps": 40, "checkpoint_every": 1000, "log_every": 10}
    settings = train_utils.tiny_settings(overrides)
    return settings, train_utils.to_host(loop.run(settings, str(tmp_path_factory.mktemp("s40"))))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill9_at_random_points_of_saves(seed, tmp_path, straight40):
    """Fault: kill -9 at a random moment while a checkpoint is saved every step. Outcome: the
    newest complete checkpoint restores; the rerun finishes equal to an uninterrupted run."""
    workdir, _ = _kill_during_saves(tmp_path, seed, signal.SIGKILL)
    settings, want = straight40
    final = _restore(workdir / "checkpoints", setup_lib.build(settings), 40)
    train_utils.assert_trees_equal(final, want, "resumed vs straight")


@pytest.mark.slow
def test_sigterm_during_a_save(tmp_path, straight40):
    """Fault: SIGTERM while checkpoints are saved every step. Outcome: a clean exit with a
    checkpoint; the rerun finishes equal to an uninterrupted run."""
    workdir, _ = _kill_during_saves(tmp_path, 7, signal.SIGTERM)
    settings, want = straight40
    final = _restore(workdir / "checkpoints", setup_lib.build(settings), 40)
    train_utils.assert_trees_equal(final, want, "resumed vs straight")
