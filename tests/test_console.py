"""m6jax.console: the default console keeps m6jax's lines and drops libraries' chatter."""

import logging
import os

from m6jax import console, experiment


def _record(path, level, msg="hello"):
  return logging.LogRecord("absl", level, path, 1, msg, None, None)


def test_quiet_filter_keeps_m6jax_info_and_only_errors_of_libraries():
  keep = console._QuietFilter().filter
  ours = experiment.__file__
  lib = os.path.join(os.path.dirname(logging.__file__), "tfds_or_orbax.py")
  assert keep(_record(ours, logging.INFO)) and keep(_record(ours, logging.WARNING))
  assert not keep(_record(ours, logging.DEBUG))
  assert not keep(_record(lib, logging.INFO)) and not keep(_record(lib, logging.WARNING))
  assert keep(_record(lib, logging.ERROR))
  # A sibling folder whose name starts like the package's is not the package.
  assert not keep(_record(console.PACKAGE_DIR.rstrip(os.sep) + "x" + os.sep + "m.py",
                          logging.INFO))


def test_short_format_and_library_warnings(capsys):
  fmt = console._ShortFormatter()
  assert fmt.format(_record(experiment.__file__, logging.INFO, "built")) == "built"
  assert fmt.format(_record(experiment.__file__, logging.WARNING, "odd")) == "warning: odd"
  shown = []
  show = console._show_warning(lambda *a: shown.append(a[2]))
  show("x", UserWarning, experiment.__file__, 1)
  show("y", UserWarning, logging.__file__, 1)
  assert shown == [experiment.__file__]
