"""The command-line tools' console: our log lines, library warnings, user errors in one line.

Each CLI module (``dfm_jax.main``, ``eval``, ``prepare``, ``bench``) imports this module
before anything else and ends with ``console.run(main)`` instead of ``app.run(main)``:

* Importing it sets TensorFlow's environment (TensorFlow is imported by clu and TFDS):
  ``TF_ENABLE_ONEDNN_OPTS=0`` (no oneDNN banner; TensorFlow only feeds data and writes
  TensorBoard events here) and ``TF_CPP_MIN_LOG_LEVEL=1`` (no C++ INFO lines; warnings
  stay), each only where the variable is not set already.
* Orbax, Grain, clu, TensorFlow, JAX and the rest log through Python's (absl's) root
  logger like our modules do, so the console keeps a record by its origin: INFO and
  above from the ``dfm_jax`` package, WARNING and above from everything else. That also
  drops clu's ``LoggingWriter`` copy of every step line (``metric_writers`` still writes
  the TensorBoard events). ``--log_file=PATH`` writes every record, library INFO
  included, to a file as well.
* A user's mistake (a bad config field or value, a missing file, a wrong flag) ends the
  process with ``error: <message>`` on stderr and exit status 2, without a traceback;
  ``--traceback`` shows it. An unknown ``--config.<field>`` override names the closest
  valid fields.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import traceback

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections.config_flags import config_flags  # is_config_flag is not re-exported

from dfm_jax.utils import errors
from dfm_jax.utils import names as names_lib

# absl and ml_collections do not import TensorFlow; the CLIs import this module first.
_ENVIRONMENT = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "1"}
for _name, _value in _ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)

_LOG_FILE = flags.DEFINE_string(
    "log_file", None, "Also write every log record (library INFO included) to this file."
)
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the Python traceback of a user error (bad config, missing file)."
)

#: Exceptions that report a user's mistake: config and data validation raise ValueError
#: naming the field; missing or unreadable files; absl's usage errors; and the faults a
#: run detects itself (``errors.RunFault``: no readable checkpoint, a held workdir, a
#: full disk, a corrupt data record).
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    app.UsageError,
    errors.RunFault,
)

#: Exit status of a user error (as argparse's).
EXIT_USER_ERROR = 2

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


@functools.cache
def _is_ours(pathname: str) -> bool:
    return os.path.abspath(pathname).startswith(_PACKAGE_DIR)


def console_filter(record: logging.LogRecord) -> bool:
    """Whether a record reaches the console: ours from INFO, the libraries' from WARNING."""
    return record.levelno >= logging.WARNING or _is_ours(record.pathname)


def run(main) -> None:
    """``absl.app.run(main)`` with the console set up and user errors reported in one line."""
    handler = absl_logging.get_absl_handler()
    if console_filter not in handler.filters:
        handler.addFilter(console_filter)
    app.run(functools.partial(_main, main), flags_parser=parse_flags)


def _main(main, argv):
    if _LOG_FILE.value:
        _add_log_file(_LOG_FILE.value)
    try:
        return main(argv)
    except USER_ERRORS as error:
        if _TRACEBACK.value:
            raise
        message = str(error) or type(error).__name__
        if isinstance(error, app.UsageError):
            message += " (--helpshort lists the flags)"
        fail(message, hint=True)


def _add_log_file(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(absl_logging.PythonFormatter())
    logging.getLogger().addHandler(handler)


def fail(message: str, hint: bool = False) -> None:
    """Prints ``error: <message>`` to stderr and exits with status 2."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    text = f"error: {message}\n"
    if hint:
        text += "(--traceback shows where it was raised)\n"
    sys.stderr.write(text)
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with unknown config fields and config-file errors in one line.

    Config files are loaded (and their overrides applied) while the flags are parsed.
    """
    try:
        remaining = flags.FLAGS(argv)
    except Exception as error:
        if _wants_traceback(argv):
            raise
        fail(_parse_error_message(error, argv))
    for name, flag in _config_flags():
        value = flag.value
        if value is None or isinstance(value, ml_collections.ConfigDict):
            continue
        try:  # ml_collections defers an unreadable file's error to the first access
            getattr(value, "keys")  # noqa: B009
        except OSError:
            fail(_unreadable_config_message(name, _config_argument(argv, name) or "?"))
    return remaining


def _wants_traceback(argv: list[str]) -> bool:
    wants = False
    for arg in argv[1:]:
        if arg == "--":
            break
        match = re.fullmatch(r"--?(no)?traceback(?:=(.*))?", arg)
        if match:
            negated, value = match.groups()
            wants = not negated and (value is None or value.lower() in ("1", "true", "t"))
    return wants


def _config_flags():
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if config_flags.is_config_flag(flag) and flag.name == name:
            yield name, flag


def _config_argument(argv: list[str], name: str) -> str | None:
    """The last ``--<name>=<value>`` (or ``--<name> <value>``) of ``argv``."""
    value = None
    for index, arg in enumerate(argv):
        match = re.fullmatch(rf"--?{re.escape(name)}(?:=(.*))?", arg)
        if match:
            value = match.group(1)
            if value is None and index + 1 < len(argv):
                value = argv[index + 1]
    return value


def _overrides(argv: list[str], name: str) -> list[str]:
    """The field paths of ``--<name>.<path>=...`` overrides, in order."""
    paths = []
    for arg in argv:
        match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
        if match and match.group(1) not in paths:
            paths.append(match.group(1))
    return paths


def _parse_error_message(error: Exception, argv: list[str]) -> str:
    """One line for an exception of flag parsing (a config file is loaded then)."""
    for name, flag in _config_flags():
        argument = _config_argument(argv, name)
        if argument is None:
            continue
        config = _load_config(flag, argument)
        if isinstance(config, ml_collections.ConfigDict):
            for path in _overrides(argv, name):
                message = unknown_field_message(config, path, name)
                if message:
                    return message
        elif config is None:
            return _unreadable_config_message(name, argument)
        if _raised_in(error, argument.split(":", 1)[0]) or "parsing config file" in str(error):
            return _config_raised_message(error, name, argument)
    if isinstance(error, flags.Error):
        return f"{error} (--helpshort lists the flags)"
    return f"{type(error).__name__}: {error}"


def _load_config(flag, argument: str):
    """The config of ``--<flag>=<argument>`` without overrides; None when unreadable."""
    try:
        config = flag.parser.parse(argument)
        if not isinstance(config, ml_collections.ConfigDict):
            getattr(config, "keys")  # noqa: B009
    except OSError:
        return None
    except Exception:  # the file itself raises: reported by the caller
        return False
    return config


def _frames(error: BaseException | None):
    """The traceback frames of ``error`` and of the exceptions it was raised from.

    A SyntaxError adds its own place (as a frame-like object with filename and lineno).
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield from traceback.extract_tb(error.__traceback__)
        if isinstance(error, SyntaxError) and error.filename:
            yield traceback.FrameSummary(error.filename, error.lineno or 0, "<module>")
        error = error.__cause__ or error.__context__


def _raised_in(error: BaseException, filename: str) -> bool:
    target = os.path.abspath(filename)
    return any(os.path.abspath(frame.filename) == target for frame in _frames(error))


def _unreadable_config_message(name: str, argument: str) -> str:
    path = argument.split(":", 1)[0]
    if not os.path.exists(path):
        return f"--{name}: no such config file: {path}"
    return f"--{name}: cannot read the config file {path}"


def _config_raised_message(error: BaseException, name: str, argument: str) -> str:
    path = argument.split(":", 1)[0]
    text = str(error)
    if "Traceback (most recent call last)" in text:  # absl folded the traceback into the text
        text = text.strip().splitlines()[-1]
    else:
        text = f"{type(error).__name__}: {text}"
    where = path
    target = os.path.abspath(path)
    for frame in _frames(error):
        if os.path.abspath(frame.filename) == target:
            where = f"{path}:{frame.lineno}"  # the innermost
    return f"--{name}={argument}: the config file raised {text} ({where}; --traceback shows it)"


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted names of every field of ``config``, nested ConfigDicts and their leaves."""
    names = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        names.append(name)
        if isinstance(value, ml_collections.ConfigDict):
            names.extend(field_names(value, f"{name}."))
    return names


def unknown_field_message(config: ml_collections.ConfigDict, path: str, name: str = "config"):
    """The error for an override of ``path`` when it is not a field of ``config``, else None.

    Suggests the fields next to the unknown one with a close name (``difflib``; the rest
    of the path kept where that makes a field), else fields of the same name elsewhere,
    else lists the fields next to the unknown one.
    """
    node, parts = config, path.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, ml_collections.ConfigDict) and part in node:
            node = node[part]
            continue
        parent = ".".join(parts[:depth])
        if not isinstance(node, ml_collections.ConfigDict):
            return f"--{name}.{path}: {name}.{parent} is a value, it has no field '{part}'"
        names = field_names(config)
        close = []
        for key in names_lib.closest(part, list(node)):
            renamed = ".".join([*parts[:depth], key, *parts[depth + 1 :]])
            close.append(renamed if renamed in names else ".".join([*parts[:depth], key]))
        if not close and depth == len(parts) - 1:
            close = [n for n in names if n.rsplit(".", 1)[-1] == part]
        message = f"unknown config field '{'.'.join(parts[: depth + 1])}'"
        if close:
            return f"{message}; did you mean {' or '.join(close)}?"
        where = f"{name}.{parent}" if parent else name
        return f"{message}; the fields of {where} are: {', '.join(sorted(node))}"
    return None
