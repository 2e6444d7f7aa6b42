"""The CLIs' console (``dfm_jax.console``): our lines only, each once; user errors in one line.

The subprocess runs use the tiny config of ``train_utils`` and share its compilation cache.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import ml_collections
import pytest
import train_utils

from dfm_jax import console

#: An absl log line: level, date, time, thread, ``file.py:line]``.
ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^:\s]+):\d+\] ")
#: What lines of Orbax, Grain, clu and TensorFlow carry (several share file names with ours,
#: e.g. Orbax's checkpoint.py).
LIBRARY_MARKERS = (
    "[process=",  # Orbax
    "Metadata",  # Orbax's checkpoint.py
    "orbax",
    "grain",
    "[Hyperparameters]",  # clu's LoggingWriter
    "Got images",
    "oneDNN",  # TensorFlow's C++ banner
    "absl::InitializeLog",
)
OUR_FILES = {path.name for path in (train_utils.REPO / "dfm_jax").rglob("*.py")}


def _run(args: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    environment = train_utils.subprocess_env(**env)
    # The CLI must quiet TensorFlow itself (subprocess_env sets TF_CPP_MIN_LOG_LEVEL).
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):
        environment.pop(name, None)
    return subprocess.run(
        args,
        env=environment,
        cwd=train_utils.REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _main(workdir, overrides: dict | None = None, *flags: str):
    return _run([*train_utils.main_command(workdir, overrides), *flags])


@pytest.mark.slow  # 21 s CLI run; test_train_cli runs the demo CLI end to end
def test_six_step_run_prints_our_lines_once_and_no_library_lines(tmp_path):
    log_file = tmp_path / "logs" / "run.log"
    result = _main(tmp_path / "run", {"total_steps": 6, "log_every": 2}, f"--log_file={log_file}")
    console_text = result.stdout + result.stderr
    assert result.returncode == 0, train_utils.tail(console_text)
    for line in console_text.splitlines():
        assert not any(marker in line for marker in LIBRARY_MARKERS), line
        match = ABSL_LINE.match(line)
        if match:
            assert match.group(2) in OUR_FILES, line
    steps = re.findall(r"step (\d+)/6 \| loss", console_text)
    assert steps == ["2", "4", "6"], train_utils.tail(console_text)
    assert not re.search(r"\] \[\d+\] \w+=", console_text), "clu's copy of a step line"
    assert "Saving checkpoint of step 6" in console_text
    assert "Wrote sample grid and previews of step 6" in console_text
    # --log_file keeps everything, the libraries' INFO lines and clu's copies included.
    logged = log_file.read_text()
    assert "checkpoint_manager.py" in logged and "logging_writer.py" in logged
    assert re.search(r"step 6/6 \| loss", logged)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.nonexistent=3", "unknown config field 'nonexistent'; the fields of config"),
        (
            "--config.data.resolutoin=8",
            "unknown config field 'data.resolutoin'; did you mean data.resolution?",
        ),
    ],
)
def test_unknown_config_field_names_the_closest(tmp_path, override, expected):
    result = _main(tmp_path / "run", None, override)
    assert result.returncode == console.EXIT_USER_ERROR, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"error: {expected}" in result.stderr
    if "nonexistent" in override:
        assert "batch_size" in result.stderr  # the valid top-level fields are listed


def test_config_file_errors_are_one_line(tmp_path):
    missing = _run(
        [sys.executable, "-m", "dfm_jax.main", f"--config={tmp_path}/none.py", "--workdir=x"]
    )
    assert missing.returncode == console.EXIT_USER_ERROR, missing.stderr
    assert "Traceback" not in missing.stderr
    assert f"error: --config: no such config file: {tmp_path}/none.py" in missing.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    raise ValueError('seed must be set')\n")
    raised = _run([sys.executable, "-m", "dfm_jax.main", f"--config={broken}", "--workdir=x"])
    assert raised.returncode == console.EXIT_USER_ERROR, raised.stderr
    assert "Traceback" not in raised.stderr
    assert "raised ValueError: seed must be set" in raised.stderr
    assert f"{broken}:2" in raised.stderr


def test_user_error_in_main_without_and_with_traceback(tmp_path):
    # 7 examples on 8 devices: the trainer refuses the batch size with a ValueError.
    result = _main(tmp_path / "run", {"batch_size": 7})
    assert result.returncode == console.EXIT_USER_ERROR, train_utils.tail(result.stderr)
    assert "Traceback" not in result.stderr, train_utils.tail(result.stderr)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "batch_size" in error_lines[0], result.stderr
    shown = _main(tmp_path / "run", {"batch_size": 7}, "--traceback")
    assert shown.returncode not in (0, console.EXIT_USER_ERROR)
    assert "Traceback (most recent call last)" in shown.stderr
    assert "batch_size" in shown.stderr.split("Traceback (most recent call last)")[-1]


def test_console_filter_keeps_our_info_and_library_warnings():
    def record(path: str, level: int) -> logging.LogRecord:
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    ours = str(train_utils.REPO / "dfm_jax" / "training" / "loop.py")
    library = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert console.console_filter(record(ours, logging.INFO))
    assert not console.console_filter(record(library, logging.INFO))
    assert console.console_filter(record(library, logging.WARNING))


def test_unknown_field_message():
    config = ml_collections.ConfigDict(
        {"batch_size": 8, "data": {"resolution": 32, "frames": 1}, "model": {"depth": 2}}
    )
    assert console.unknown_field_message(config, "data.resolution") is None
    message = console.unknown_field_message(config, "data.frame")
    assert message == "unknown config field 'data.frame'; did you mean data.frames?"
    message = console.unknown_field_message(config, "model.resolution")
    assert message.endswith("did you mean data.resolution?")
    message = console.unknown_field_message(config, "dat.resolution")
    assert message.endswith("did you mean data.resolution?")
    message = console.unknown_field_message(config, "model.width")
    assert message.endswith("the fields of config.model are: depth")
    assert "is a value" in console.unknown_field_message(config, "batch_size.x")
