"""What a command prints: one setup for every m6jax entry point.

  console.setup(verbosity)      # m6jax.main, sweep, predict, ... once flags are parsed

verbosity None (the default; absl's --verbosity / -v not given): m6jax's own log
records at INFO and above, one short line each, warnings as "warning: ...";
third-party log records only at ERROR and above, their Python warnings, banners
and progress bars off (m6jax's own progress bars stay). verbosity given: every
library logs at that absl level (-1 warnings, 0 info, 1 debug) in absl's format,
as before this module existed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

from absl import flags
from absl import logging as absl_logging

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Environment read by libraries when they first log: set before they are imported.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
# Libraries with their own logger handlers (not absl's root handler).
OWN_HANDLERS = ("mlflow", "alembic", "transformers", "huggingface_hub")

_state = {"quiet": False}


def _ours(path: str | None) -> bool:
  return bool(path) and os.path.abspath(path).startswith(PACKAGE_DIR)


class _QuietFilter(logging.Filter):
  """m6jax's records from INFO, everyone else's from ERROR."""

  def filter(self, record):
    return record.levelno >= (logging.INFO if _ours(record.pathname) else logging.ERROR)


class _ShortFormatter(logging.Formatter):
  def format(self, record):
    msg = record.getMessage()
    if record.exc_info:
      msg += "\n" + self.formatException(record.exc_info)
    return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def _show_warning(orig):
  def show(message, category, filename, lineno, file=None, line=None):
    if _ours(filename):
      orig(message, category, filename, lineno, file, line)
  return show


def setup(verbosity: int | None = None) -> None:
  """Configures logging for a command (see the module docstring)."""
  if not flags.FLAGS.is_parsed():   # argparse CLIs: absl would warn "before flag parsing"
    flags.FLAGS.mark_as_parsed()
  absl_logging.use_absl_handler()
  handler = absl_logging.get_absl_handler()
  if verbosity is not None:
    absl_logging.set_verbosity(verbosity)
    return
  _state["quiet"] = True
  for k, v in QUIET_ENV.items():
    os.environ.setdefault(k, v)
  absl_logging.set_verbosity(absl_logging.INFO)
  if not any(isinstance(f, _QuietFilter) for f in handler.filters):
    handler.addFilter(_QuietFilter())
  handler.setFormatter(_ShortFormatter())
  quiet_libraries()
  if "transformers" in sys.modules:   # imported already: its env was read
    sys.modules["transformers"].logging.set_verbosity_error()
  warnings.showwarning = _show_warning(warnings.showwarning)


def quiet_libraries() -> None:
  """Libraries' own loggers at ERROR. Called again after a library that configures its
  logging on import (mlflow) is imported, since that import resets the level."""
  for name in OWN_HANDLERS:
    logging.getLogger(name).setLevel(logging.ERROR)


def quiet() -> bool:
  """True when setup() ran without a verbosity (third-party chatter is off)."""
  return _state["quiet"]


@contextlib.contextmanager
def third_party_output():
  """Silences what a library prints to stdout/stderr itself (banners, progress
  bars) while quiet; passes it through otherwise."""
  if not quiet():
    yield
    return
  sink = io.StringIO()
  with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
    yield
