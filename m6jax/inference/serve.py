"""The trained model as an MLflow pyfunc model: bundle + checkpoint, predict's output.

  serve.log_model(workdir)          # inside an active MLflow run
  serve.log_to(tracker, workdir)    # or through m6jax.track.tracker.Tracker.log_pyfunc
  model = mlflow.pyfunc.load_model(uri)
  model.predict(frame, params={"images": "new_images/"})

The logged model holds two artifacts: `bundle` (the run's inference bundle,
m6jax.inference.bundle) and `run` (the checkpoint step the run scored, as
`checkpoints/latest/<step>`), plus the m6jax code, so it loads on a machine that has neither the
workdir nor the training catalogue. `predict` takes a DataFrame of new
products with the catalogue's columns (`image`: a file path, relative to the
`images` param when given, else as is) and returns what the predict CLI
writes: one row per input row, uniq_id, predicted, p_<class> and note
(m6jax.inference.predict.Predictions.to_frame).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import tempfile
import warnings

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from m6jax import workdir as workdir_lib
from m6jax.inference import bundle as bundle_lib
from m6jax.inference import predict, restore
from m6jax.train import checkpoint

NAME = "model"


class Model(mlflow.pyfunc.PythonModel):
  """pyfunc around a run's inference bundle and checkpoint (see the module docstring)."""

  def load_context(self, context):
    self._run, self._params, self._stats = restore.load(context.artifacts["bundle"],
                                                        context.artifacts["run"])

  def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
    """DataFrame of new products -> DataFrame (uniq_id, predicted, p_<class>, note)."""
    del context
    images = (params or {}).get("images") or None
    products = predict.read_frame(self._run, model_input, images)
    probs = predict.predict_products(self._run, self._params, self._stats, products)
    return predict.Predictions(self._run.class_names, products, probs).to_frame()


def signature(b: bundle_lib.Bundle) -> ModelSignature:
  """Inputs: the catalogue columns the model reads (strings); outputs: predict's columns."""
  cols = b.preprocessing["columns"]
  roles = ["id"]
  if "text" in b.modalities:
    roles += b.preprocessing["text_fields"]
  if "image" in b.modalities:
    roles.append("image")
  inputs = Schema([ColSpec("string", cols[r], required=(r == "id")) for r in roles])
  outputs = Schema([ColSpec("string", "uniq_id"), ColSpec("string", "predicted")]
                   + [ColSpec("double", f"p_{c}") for c in b.class_names]
                   + [ColSpec("string", "note")])
  return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("images", "string", "")]))


def _requirements() -> list[str]:
  """m6jax's dependencies pinned to the installed versions (m6jax itself ships as code)."""
  from packaging.requirements import Requirement
  try:
    reqs = importlib.metadata.requires("m6jax") or []
  except importlib.metadata.PackageNotFoundError:
    reqs = ["jax", "flax", "optax", "orbax-checkpoint", "ml_collections", "numpy", "pillow",
            "scikit-learn", "tensorflow-datasets", "grain", "transformers", "mlflow"]
  out = []
  for line in reqs:
    req = Requirement(line)
    if req.marker is not None and "extra" in str(req.marker):
      continue
    try:
      out.append(f"{req.name}=={importlib.metadata.version(req.name)}")
    except importlib.metadata.PackageNotFoundError:
      out.append(str(req))
  return out


@contextlib.contextmanager
def pyfunc_args(workdir: str):
  """Yields (python_model, save_kwargs) of the run in `workdir` for mlflow.pyfunc.log_model
  or m6jax.track.tracker.Tracker.log_pyfunc; the staged checkpoint lives until the block exits."""
  b = bundle_lib.load(bundle_lib.directory(workdir))
  with checkpoint.Checkpoints(workdir, read_only=True) as ckpt:
    steps = ckpt.all_steps()
  step = b.checkpoint_step if b.checkpoint_step is not None else max(steps, default=None)
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoint.directory(workdir)}")
  if step not in steps:   # the scored step or nothing: never another one
    raise checkpoint.CheckpointError(
        f"the run scored checkpoint step {step}, but {checkpoint.directory(workdir)} holds "
        f"step(s) {steps or 'none'}: rerun the experiment to rescore before serving")
  src = os.path.join(checkpoint.directory(workdir), "latest", str(step))
  with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
    # The signature is explicit; an input example would need a product photo.
    warnings.filterwarnings("ignore", ".*An input example was not provided")
    run = os.path.join(tmp, "run")
    shutil.copytree(src, os.path.join(run, "checkpoints", "latest", str(step)))
    fingerprint = os.path.join(workdir, workdir_lib.FINGERPRINT)
    if os.path.isfile(fingerprint):
      shutil.copy(fingerprint, os.path.join(run, workdir_lib.FINGERPRINT))
    yield Model(), {"artifacts": {"bundle": b.path, "run": run},
                    "code_paths": [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))],
                    "signature": signature(b), "pip_requirements": _requirements()}


def log_model(workdir: str, name: str = NAME, **kwargs):
  """Logs the run in `workdir` as a pyfunc model to the active MLflow run.

  kwargs go to mlflow.pyfunc.log_model. Returns its ModelInfo.
  """
  with pyfunc_args(workdir) as (model, save_kwargs):
    return mlflow.pyfunc.log_model(name=name, python_model=model, **save_kwargs, **kwargs)


def log_to(tracker, workdir: str, name: str = NAME):
  """Logs the run in `workdir` through a m6jax.track.tracker.Tracker (its run and store); the
  model URI, or None when the tracker does not log (see Tracker.log_pyfunc)."""
  with pyfunc_args(workdir) as (model, save_kwargs):
    return tracker.log_pyfunc(model, name, **save_kwargs)
