"""The trained model as an MLflow pyfunc model: bundle + checkpoint, predict's output.

  serve.log_model(workdir)          # inside an active MLflow run
  serve.log_to(tracker, workdir)    # or through m6jax.track.tracker.Tracker.log_pyfunc
  model = mlflow.pyfunc.load_model(uri, model_config={"image_dir": "new_images/"})
  model.predict(frame)
  ./launch.sh serve RUN [PORT]      # mlflow models serve of a run's logged model

The logged model holds the artifacts `bundle` (the run's inference bundle,
m6jax.inference.bundle), `run` (the checkpoint step the run scored, as
`checkpoints/latest/<step>`) and `weights/<modality>` (the pretrained tower files inference reads),
plus the m6jax code, so it loads on a machine that has neither the workdir, the
training catalogue nor the weight packages.

`predict` takes a DataFrame of new products with the catalogue's columns and
returns what the predict CLI writes: one row per input row, uniq_id,
predicted, p_<class> and note (m6jax.inference.predict.Predictions.to_frame),
with None, not NaN, for the probabilities of a row that cannot be predicted
(JSON clients get null; the note says why). A photo arrives as its bytes,
base64-encoded in the column `image_b64`, or as a file name in the `image`
column, read only from the image folder fixed when the model is loaded
(model_config `image_dir`, else $M6JAX_SERVE_IMAGES): absolute names and names
leaving the folder are refused, and without a folder every name is, each with
the same note whether or not such a file exists.

Limits, checked before any work (a request over one gets HTTP 400 naming it):
rows per request, characters per text field and bytes per photo; model_config
`max_rows` / `max_text_chars` / `max_image_bytes`, else the environment
variables in LIMIT_ENV, else DEFAULT_LIMITS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import shutil
import tempfile
import warnings

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from PIL import Image

from m6jax import workdir as workdir_lib
from m6jax.data import catalogue, images
from m6jax.inference import bundle as bundle_lib
from m6jax.inference import predict, restore
from m6jax.inference import products as products_lib
from m6jax.models.weights import sources as weights_lib
from m6jax.train import checkpoint

NAME = "model"
B64_COLUMN = "image_b64"
IMAGES_ENV = "M6JAX_SERVE_IMAGES"
DEFAULT_LIMITS = {"max_rows": 256, "max_text_chars": 20_000, "max_image_bytes": 10 * 2**20}
LIMIT_ENV = {"max_rows": "M6JAX_SERVE_MAX_ROWS", "max_text_chars": "M6JAX_SERVE_MAX_TEXT_CHARS",
             "max_image_bytes": "M6JAX_SERVE_MAX_IMAGE_BYTES"}


class RequestError(MlflowException):
  """A request the model refuses as a whole: the scoring server answers HTTP 400."""

  def __init__(self, message: str):
    super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the operator fixes when the model is loaded (see the module docstring)."""
  image_dir: str | None
  max_rows: int
  max_text_chars: int
  max_image_bytes: int

  @classmethod
  def resolve(cls, model_config: dict | None, environ=os.environ) -> "Settings":
    conf = dict(model_config or {})
    image_dir = conf.get("image_dir") or environ.get(IMAGES_ENV) or None
    if image_dir is not None and not os.path.isdir(image_dir):
      raise ValueError(f"image folder {image_dir!r} (image_dir / ${IMAGES_ENV}) is not a folder")
    limits = {}
    for key, default in DEFAULT_LIMITS.items():
      raw = conf.get(key)
      raw = environ.get(LIMIT_ENV[key], default) if raw is None else raw
      try:
        limits[key] = int(raw)
      except (TypeError, ValueError):
        raise ValueError(f"{key} (${LIMIT_ENV[key]}) must be an integer, got {raw!r}") from None
      if limits[key] <= 0:
        raise ValueError(f"{key} (${LIMIT_ENV[key]}) must be > 0, got {raw!r}")
    return cls(image_dir and os.path.abspath(image_dir), **limits)


def check_request(frame: pd.DataFrame, b: bundle_lib.Bundle, settings: Settings) -> None:
  """Raises RequestError for a request over a limit or without a column the model
  reads; touches nothing else (cheap: runs before any decoding or model call)."""
  if len(frame) > settings.max_rows:
    raise RequestError(f"{len(frame)} rows in one request; this server takes at most "
                       f"{settings.max_rows} (max_rows, ${LIMIT_ENV['max_rows']})")
  cols = b.preprocessing["columns"]
  need = [cols["id"]] + ([cols[r] for r in b.preprocessing["text_fields"]]
                         if "text" in b.modalities else [])
  missing = [c for c in need if c not in frame.columns]
  if "image" in b.modalities and cols["image"] not in frame.columns \
      and B64_COLUMN not in frame.columns:
    missing.append(f"{cols['image']} (or {B64_COLUMN})")
  if missing:
    raise RequestError(f"missing column(s): {', '.join(missing)}; got {list(frame.columns)}")
  fields = need[1:] + ([cols["image"]] if "image" in b.modalities else [])
  for name, cap, what in [(c, settings.max_text_chars, "max_text_chars") for c in fields] + [
      (B64_COLUMN, 4 * -(-settings.max_image_bytes // 3), "max_image_bytes")]:
    if name not in frame.columns:
      continue
    lengths = frame[name].map(lambda v: len(v) if isinstance(v, str) else 0).to_numpy()
    if len(lengths) and lengths.max() > cap:
      row = int(np.argmax(lengths > cap))
      raise RequestError(f"row {row + 1}: {name} has {int(lengths[row])} characters; this "
                         f"server takes at most {cap} ({what}, ${LIMIT_ENV[what]})")


def json_safe(frame: pd.DataFrame) -> pd.DataFrame:
  """NaN / +-inf probabilities -> None (strict JSON parsers reject NaN)."""
  out = frame.copy()
  for c in out.columns:
    if out[c].dtype.kind == "f" and not np.isfinite(out[c].to_numpy()).all():
      vals = out[c].to_numpy()
      out[c] = pd.Series([float(v) if np.isfinite(v) else None for v in vals], index=out.index,
                         dtype=object)
  return out


class Model(mlflow.pyfunc.PythonModel):
  """pyfunc around a run's inference bundle and checkpoint (see the module docstring)."""

  def load_context(self, context):
    from m6jax import experiment  # not at the top: m6jax.experiment imports this module
    self.settings = Settings.resolve(getattr(context, "model_config", None))
    self._run, self._params, self._stats = restore.load(
        context.artifacts["bundle"], context.artifacts["run"],
        weights=shipped_weights(context.artifacts))
    experiment.use_xla_cache(self._run.cfg)   # a restarted server loads its programs
    self._warm_up()

  def _warm_up(self) -> None:
    """One blank product through the towers and the head, so the programs of a
    one-row request are compiled before the server answers its first request."""
    mods = self._run.mods
    blank = images.encode_jpeg(Image.new("RGB", (32, 32), (128, 128, 128)))
    # A text of max_text_length tokens or more: the row length most descriptions reach.
    text = " ".join(["warm"] * int(self._run.cfg.data.max_text_length))
    p = products_lib.Product(0, 0, "warm-up", text=text if "text" in mods else "",
                             image_bytes=blank if "image" in mods else b"")
    predict.predict_products(self._run, self._params, self._stats, [p])

  def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
    """DataFrame of new products -> DataFrame (uniq_id, predicted, p_<class>, note)."""
    del context, params
    check_request(model_input, self._run.bundle, self.settings)
    try:
      products = products_lib.read_frame(self._run, model_input, self.settings.image_dir,
                                         refuse_paths=True, b64_column=B64_COLUMN)
    except catalogue.DataError as e:
      raise RequestError(str(e)) from None
    probs = predict.predict_products(self._run, self._params, self._stats, products)
    return json_safe(predict.Predictions(self._run.class_names, products, probs).to_frame())


def signature(b: bundle_lib.Bundle) -> ModelSignature:
  """Inputs: the catalogue columns the model reads (strings; the id and text fields
  required, the photo as `image` or `image_b64`); outputs: predict's columns."""
  cols = b.preprocessing["columns"]
  inputs = [ColSpec("string", cols["id"])]
  if "text" in b.modalities:
    inputs += [ColSpec("string", cols[r]) for r in b.preprocessing["text_fields"]]
  if "image" in b.modalities:
    inputs += [ColSpec("string", cols["image"], required=False),
               ColSpec("string", B64_COLUMN, required=False)]
  outputs = Schema([ColSpec("string", "uniq_id"), ColSpec("string", "predicted")]
                   + [ColSpec("double", f"p_{c}", required=False) for c in b.class_names]
                   + [ColSpec("string", "note")])
  return ModelSignature(Schema(inputs), outputs)


# --- the tower weights the model carries ----------------------------------------

def _used_towers(b: bundle_lib.Bundle) -> list[str]:
  """The modalities whose pretrained weight files inference reads (as restore.load)."""
  return [m for m, t in b.meta["towers"].items()
          if t["name"] != "tfidf" and not t["fingerprint"].get("random")
          and (b.meta["mode"] == "frozen" or m == "text")]


def stage_weights(b: bundle_lib.Bundle, dest: str) -> dict[str, str]:
  """Copies the weight files of the towers inference reads into dest/<modality>/
  (a file keeps its name, a folder its tree); {artifact name: path}."""
  out = {}
  for m in _used_towers(b):
    t = b.meta["towers"][m]
    src = weights_lib.resolve(t["weights"], tower=t["name"])
    target = os.path.join(dest, m)
    if src.is_file():
      os.makedirs(target)
      shutil.copy(src, os.path.join(target, src.name))
    else:
      shutil.copytree(src, target, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    out[f"weights_{m}"] = target
  return out


def shipped_weights(artifacts: dict) -> dict[str, str]:
  """{modality: weight spec (a local path)} of the weights a logged model carries."""
  out = {}
  for name, path in artifacts.items():
    if name.startswith("weights_"):
      files = os.listdir(path)
      # A single-file weight source was staged as that file in its folder.
      one = len(files) == 1 and os.path.isfile(os.path.join(path, files[0]))
      out[name[len("weights_"):]] = os.path.join(path, files[0]) if one else path
  return out


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
    artifacts = {"bundle": b.path, "run": run} | stage_weights(b, os.path.join(tmp, "weights"))
    yield Model(), {"artifacts": artifacts,
                    "code_paths": [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))],
                    "signature": signature(b), "pip_requirements": _requirements(),
                    # The keys mlflow.pyfunc.load_model(model_config=...) may set; None:
                    # the environment variable, else the default (Settings.resolve).
                    "model_config": dict.fromkeys(["image_dir", *DEFAULT_LIMITS])}


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


# --- serving a run ----------------------------------------------------------------

def model_location(workdir: str) -> tuple[str, str]:
  """A run's (model URI, tracking URI), from its tracking.json (older runs: the
  store's logged models of the run). Raises FileNotFoundError saying why not."""
  from m6jax.track import mlflow_store
  state = mlflow_store.read_json(os.path.join(workdir, mlflow_store.STATE)) or {}
  if not state.get("run_id"):
    raise FileNotFoundError(f"{workdir}: no tracked MLflow run ({mlflow_store.STATE} missing "
                            "or empty): was it trained with track.enabled and log_model?")
  if state.get("model_uri"):
    return state["model_uri"], state["uri"]
  client = mlflow_store.client(state["uri"])
  run = client.get_run(state["run_id"])
  found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                      filter_string=f"source_run_id = '{state['run_id']}'")
  if not found:
    raise FileNotFoundError(f"{workdir}: MLflow run {state['run_id']} has no logged model")
  return f"models:/{found[0].model_id}", state["uri"]


def main(argv=None) -> None:
  import argparse
  import sys
  p = argparse.ArgumentParser(prog="python -m m6jax.inference.serve", description=(
      "Serve a run's logged model with `mlflow models serve` (this Python's environment)."))
  p.add_argument("workdir", help="a finished, tracked training run")
  p.add_argument("port", nargs="?", type=int, default=5001)
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--images", default=None, help=f"image folder (${IMAGES_ENV}): rows may "
                 "name files in it; without one, photos come as base64 in image_b64")
  p.add_argument("--workers", type=int, default=1)
  a = p.parse_args(argv)
  try:
    model_uri, tracking_uri = model_location(a.workdir)
  except (FileNotFoundError, MlflowException) as e:
    sys.exit(f"serve: {e}")
  bindir = os.path.dirname(sys.executable)
  # mlflow starts uvicorn by name: this environment's bin/ goes first on PATH.
  env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
             MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_DISABLE_TELEMETRY="true",
             MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
  env.setdefault("HF_HUB_OFFLINE", "1")
  if a.images:
    env[IMAGES_ENV] = os.path.abspath(a.images)
  print(f"serving {model_uri} at http://{a.host}:{a.port}/invocations (image folder: "
        f"{env.get(IMAGES_ENV) or 'none, photos as base64 in ' + B64_COLUMN})", flush=True)
  os.execve(os.path.join(bindir, "mlflow"),
            ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", a.host, "-p", str(a.port), "-w", str(a.workers)], env)


if __name__ == "__main__":
  main()
