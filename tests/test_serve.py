"""The served model (m6jax.inference.serve) through MLflow's scoring server code in process
(mlflow.pyfunc.scoring_server.invocations, what `mlflow models serve` runs per request):
confined image paths, strict JSON, named missing columns, limits, predict-CLI parity,
and the tower weights the logged model carries."""

import base64
import json
import os
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from m6jax.inference import bundle, predict, serve
from m6jax.inference import products as products_lib
from tests.trained import trained_run


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
  run = trained_run(tmp_path_factory, "early")
  tmp = tmp_path_factory.mktemp("serve")
  uri = f"sqlite:///{tmp}/mlflow.db"
  with _use_tracking_uri(uri):
    exp = mlflow.create_experiment("serve", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
      info = serve.log_model(run["workdir"])
  return dict(run, uri=uri, model_uri=info.model_uri, tmp=tmp)


class Server:
  """A loaded model answering JSON bodies as the scoring server does: (status, body)."""

  def __init__(self, logged, **model_config):
    with _use_tracking_uri(logged["uri"]):
      self.model = mlflow.pyfunc.load_model(logged["model_uri"], model_config=model_config)
    self.schema = self.model.metadata.get_input_schema()

  def post(self, records):
    body = json.dumps({"dataframe_records": records})
    try:
      r = scoring_server.invocations(body, "application/json", self.model, self.schema)
    except MlflowException as e:   # the app answers these with e's HTTP status
      return e.get_http_status_code(), json.loads(e.serialize_as_json())
    return r.status, r.response


def _strict(text: str):
  def refuse(name):
    raise ValueError(f"not JSON: {name}")
  return json.loads(text, parse_constant=refuse)["predictions"]


@pytest.fixture(scope="module")
def with_folder(logged):
  return Server(logged, image_dir=logged["new_images"])


@pytest.fixture(scope="module")
def no_folder(logged):
  return Server(logged)


def _records(logged, n=None):
  frame = pd.read_csv(logged["new_csv"], dtype=str, keep_default_na=False)
  return frame.iloc[:n].to_dict("records")


def test_paths_outside_the_folder_get_one_answer_whether_or_not_the_file_exists(
    logged, with_folder, no_folder):
  first = _records(logged, 1)[0]
  outside = os.path.join(os.path.dirname(logged["new_images"]), "outside.jpg")
  shutil.copy(os.path.join(logged["new_images"], first["image"]), outside)
  names = {"up_exists": "../outside.jpg", "up_missing": "../absent.jpg",
           "abs_exists": outside, "abs_missing": outside + ".absent"}
  rows = [dict(first, uniq_id=k, image=v) for k, v in names.items()] + [first]
  status, body = with_folder.post(rows)
  assert status == 200
  notes = {r["uniq_id"]: r["note"] for r in _strict(body)}
  for kind in ("up", "abs"):   # the same note, but for the name the client sent
    have, absent = f"{kind}_exists", f"{kind}_missing"
    assert notes[have].replace(repr(names[have]), repr(names[absent])) == notes[absent]
  assert "outside the image folder" in notes["up_exists"] and notes[first["uniq_id"]] == ""
  # Without a folder every name is refused alike, even one that exists beside the server.
  status, body = no_folder.post([dict(r, image=r["image"]) for r in rows])
  assert status == 200
  got = _strict(body)
  assert {r["note"] for r in got} == {products_lib.PATHS_REFUSED + ": text only"}
  assert all(r["predicted"] for r in got)   # from the text, as modality dropout trained it


def test_an_unpredictable_row_is_strict_json_with_null_probabilities(logged, no_folder):
  good = _records(logged, 1)[0]
  bad = dict(good, uniq_id="nothing", product_name="", description="", image="")
  status, body = no_folder.post([good, bad])
  assert status == 200
  got = _strict(body)                      # no NaN / Infinity anywhere
  assert got[1]["predicted"] == "" and got[1]["note"].startswith("not predicted")
  probs = {k: v for k, v in got[1].items() if k.startswith("p_")}
  assert probs and all(v is None for v in probs.values())
  assert all(isinstance(v, float) for k, v in got[0].items() if k.startswith("p_"))


def test_a_missing_column_answers_400_naming_it(logged, with_folder):
  rows = _records(logged, 2)
  status, body = with_folder.post([{k: v for k, v in r.items() if k != "description"}
                                   for r in rows])
  assert status == 400 and "description" in body["message"]
  status, body = with_folder.post([{k: v for k, v in r.items() if k != "image"} for r in rows])
  assert status == 400 and "image (or image_b64)" in body["message"]


def test_limits_answer_400_before_any_work(logged, monkeypatch):
  small = Server(logged, image_dir=logged["new_images"], max_rows=2, max_text_chars=50,
                 max_image_bytes=100)

  def no_work(*args, **kwargs):
    raise AssertionError("predicted a request over a limit")

  monkeypatch.setattr(serve.predict, "predict_products", no_work)
  rows = _records(logged, 3)
  status, body = small.post(rows)
  assert status == 400 and "3 rows" in body["message"] and "max_rows" in body["message"]
  long = [rows[0], dict(rows[1], description="x" * 51)]
  status, body = small.post(long)
  assert status == 400 and "row 2: description" in body["message"]
  photo = [dict(rows[0], image="", image_b64=base64.b64encode(b"\xff" * 200).decode())]
  status, body = small.post(photo)
  assert status == 400 and "image_b64" in body["message"] and "max_image_bytes" in body[
      "message"]


def test_served_predictions_equal_the_predict_cli(logged, with_folder, tmp_path):
  rows = _records(logged)
  want = predict.predict(logged["workdir"], logged["new_csv"], logged["new_images"],
                         str(tmp_path / "pred.csv"))
  # Photos by name (in the server's folder) and as base64 bytes give the same answer.
  by_bytes = []
  for r in rows:
    with open(os.path.join(logged["new_images"], r["image"]), "rb") as f:
      by_bytes.append(dict(r, image="", image_b64=base64.b64encode(f.read()).decode()))
  for records in (rows, by_bytes):
    status, body = with_folder.post(records)
    assert status == 200
    got = _strict(body)
    assert [g["uniq_id"] for g in got] == want.uniq_id
    assert [g["predicted"] for g in got] == want.predicted
    assert [g["note"] for g in got] == want.notes
    probs = np.array([[g[f"p_{c}"] for c in want.classes] for g in got])
    np.testing.assert_array_equal(probs, want.probs.astype(np.float64))


def test_the_logged_model_carries_the_tower_weights(tmp_path):
  """Staged weights are verified against the training fingerprint from the model's own
  copy: the original files (site-packages in real runs) are not needed."""
  src = tmp_path / "pkg"
  (src / "text" / "1_Pooling").mkdir(parents=True)
  (src / "text" / "model.safetensors").write_bytes(b"bert" * 10)
  (src / "text" / "1_Pooling" / "config.json").write_text("{}")
  (src / "lite0.pth").write_bytes(b"lite" * 10)
  towers = {m: {"name": n, "weights": str(p),
                "fingerprint": bundle.weights_fingerprint(str(p), n)}
            for m, n, p in (("text", "minilm", src / "text"),
                            ("image", "efficientnet-lite0", src / "lite0.pth"))}
  meta = {"mode": "frozen", "towers": towers,
          "config": {"model": {m: {"weights": t["weights"]} for m, t in towers.items()}}}
  b = bundle.Bundle(str(tmp_path), meta)
  artifacts = serve.stage_weights(b, str(tmp_path / "model" / "weights"))
  shutil.rmtree(src)
  moved = b.with_weights(serve.shipped_weights(artifacts))
  moved.verify_weights()
  assert moved.config.model.image.weights.endswith(os.path.join("image", "lite0.pth"))
  assert moved.meta["towers"]["text"]["weights"] == artifacts["weights_text"]
  with open(os.path.join(artifacts["weights_text"], "model.safetensors"), "ab") as f:
    f.write(b"!")
  with pytest.raises(bundle.BundleError, match="model.safetensors"):
    moved.verify_weights()
