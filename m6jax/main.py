"""Run one experiment: python -m m6jax.main --config configs/default.py --workdir runs/default

Any config field can be overridden: --config.train.epochs=5 --config.seeds=3
The run is tracked in MLflow (m6jax.track; store: runs/mlflow.db for runs/<name>),
or not with --config.track.enabled=False.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Config files import `configs.base`; make the repo root importable from anywhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", None, "output folder for this run")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from m6jax import experiment, mesh
  logging.set_verbosity(logging.INFO)
  mesh.initialize_distributed(FLAGS.config.get("mesh"))
  experiment.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
