"""Rebuild a finished run for inference: config -> setup -> checkpoint -> parameters.

m6jax.predict and m6jax.explain depend on this module, not on the trainer's
run loop. The checkpoint holds each replica's own best-validation parameters
(`TrainState.best_*`), the ones results.json scored.
"""

from __future__ import annotations

import json
import os

import ml_collections

from m6jax import checkpoint, features

WHICH = ("best", "latest")


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict a run saved in `workdir/config.json`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not a training run")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore(workdir: str, which: str = "best"):
  """A finished run -> (cfg, Setup, params, batch_stats).

  which: 'best' (each replica's best-validation parameters, what results.json
  scored) or 'latest' (the parameters after the last trained epoch).
  Parameters carry the leading replica axis K.
  """
  if which not in WHICH:
    raise ValueError(f"which must be one of {WHICH}, got {which!r}")
  cfg = load_config(workdir)
  run = features.setup(cfg, workdir)
  with checkpoint.Checkpoints(workdir, read_only=True) as ckpt:
    restored = ckpt.restore_latest(run.trainer.init_states())
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoint.directory(workdir)}")
  states, _ = restored
  if which == "best":
    return cfg, run, states.best_params, states.best_batch_stats
  return cfg, run, states.params, states.batch_stats
