"""Run one experiment: python -m m6jax.main --config configs/default.py --workdir runs/default

Any config field can be overridden: --config.train.epochs=5 --config.seeds=3
The run is tracked in MLflow (m6jax.track.tracker; store: runs/mlflow.db for runs/<name>),
or not with --config.track.enabled=False.

The console shows one line per phase, warnings and the final summary
(m6jax.console); --verbosity=0 (absl's flag: -1 warnings, 0 info, 1 debug) shows
every library's log as well.

Rerunning into a workdir resumes its checkpoint when the config, dataset and
code version match; otherwise it refuses, naming what differs (--restart
discards the old checkpoint). Config and workdir errors print one line and
exit with status 2, before any data work. SIGTERM or Ctrl-C stops training at
the next epoch boundary, saves the state and exits with 128 + the signal number
after one line saying how to resume.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from m6jax import config as config_lib
from m6jax import console, experiment, files, memory, workdir
from m6jax.train import preemption

config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "output folder for this run")
flags.DEFINE_bool("restart", False, "discard the workdir's checkpoint and results; train anew")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _fail(message: str) -> None:
  print(f"m6jax.main: error: {message}", file=sys.stderr)
  sys.exit(2)


def _unknown_override(argv, error: Exception) -> str:
  """The --config.<key> argument an unknown-key error came from, as one line."""
  missing = str(error).strip("\"'")
  for arg in argv[1:]:
    if arg.startswith("--config.") and missing in arg.split("=", 1)[0].split("."):
      return f"{arg.split('=', 1)[0][len('--config.'):]}: unknown config key (from {arg})"
  return f"unknown config key {missing!r}"


def parse_flags(argv):
  """absl flag parsing with one-line errors (exit 2) instead of tracebacks."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except (AttributeError, KeyError) as e:   # ml_collections: --config.<unknown key>
    _fail(_unknown_override(argv, e))


def main(argv):
  del argv
  memory.return_large_frees_to_os()
  console.setup(FLAGS.verbosity if FLAGS["verbosity"].present else None)
  try:   # experiment.run validates the config first, then starts multi-host JAX
    experiment.run(FLAGS.config, FLAGS.workdir, restart=FLAGS.restart,
                   overrides=config_flags.get_override_values(FLAGS["config"]))
  except (config_lib.ConfigError, workdir.WorkdirError) as e:
    _fail(str(e))
  except preemption.Preempted as e:   # SIGTERM/SIGINT: stopped at an epoch boundary
    print(f"m6jax.main: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except OSError as e:
    if e.errno not in files.DISK_FULL:
      raise
    # Disk full: one line naming the file (files.WriteError says what is still intact).
    if not isinstance(e, files.WriteError):
      e = files.WriteError(e.filename or "?", e.errno)
    print(f"m6jax.main: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
