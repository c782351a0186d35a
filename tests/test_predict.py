"""The predict CLI on products outside the training data: bundle + checkpoint only,
every input row accounted for."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from m6jax.data import tfds_builder
from m6jax.features import embed, prepare
from m6jax.inference import predict, restore
from m6jax.inference import products as products_lib
from m6jax.models import fusion
from m6jax.train import predictions
from tests.conftest import REPO
from tests.trained import trained_run


@pytest.fixture(scope="module")
def early(tmp_path_factory):
  return trained_run(tmp_path_factory, "early")


def _read(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _snapshot(folder):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(folder) for f in files}


def _assert_same_as_test_predictions(wd, out_rows):
  want = _read(os.path.join(wd, "predictions_test.csv"))
  assert [r["uniq_id"] for r in out_rows] == [r["uniq_id"] for r in want]
  for got, ref in zip(out_rows, want):
    assert got["note"] == ""
    assert {k: v for k, v in got.items() if k.startswith("p_") or k == "predicted"} == \
        {k: v for k, v in ref.items() if k.startswith("p_") or k == "predicted"}


def test_predict_reproduces_the_runs_test_predictions_without_its_data(early, tmp_path,
                                                                       monkeypatch):
  wd = early["workdir"]
  # Nothing of the training data is needed: catalogue, built dataset, embeddings.
  for gone in (early["catalogue"], os.path.join(early["root"], "tfds")):
    shutil.rmtree(gone)

  def refuse(*a, **k):
    raise AssertionError("prediction must not rebuild the dataset or re-embed it")

  for mod, fn in ((tfds_builder, "prepare"), (prepare, "setup"),
                  (embed, "image_embeddings"), (embed, "text_embeddings")):
    monkeypatch.setattr(mod, fn, refuse)
  before = _snapshot(wd)
  out = str(tmp_path / "out" / "pred.csv")
  res = predict.predict(wd, early["new_csv"], early["new_images"], out)
  _assert_same_as_test_predictions(wd, _read(out))
  assert res.classes == early["results"]["classes"]
  assert _snapshot(wd) == before                       # nothing written into the run
  # The report goes beside --out, under its name.
  with open(out + ".data_report.json") as f:
    rep = json.load(f)
  assert rep["total_rows"] == rep["predicted"] == len(early["test_ids"]) and not rep["noted"]
  assert os.path.isfile(out + ".data_report.txt")
  assert sorted(os.listdir(tmp_path / "out")) == ["pred.csv", "pred.csv.data_report.json",
                                                   "pred.csv.data_report.txt"]


def _hostile_csv(early, path):
  """One row of each case, with what the output must say about it."""
  src = {r["uniq_id"]: r for r in _read(early["new_csv"])}
  a, b = early["test_ids"][:2]
  img = early["new_images"]
  with open(os.path.join(img, "corrupt.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 not a jpeg" + bytes(range(100)))
  outside = os.path.join(os.path.dirname(img), "outside.jpg")
  shutil.copy(os.path.join(img, src[a]["image"]), outside)
  ra, rb = src[a], src[b]
  rows = [
      # (uniq_id, name, description, brand, image), expected note, predicted?
      ((a, ra["product_name"], ra["description"], "", ra["image"]), "", True),
      (("no_photo", ra["product_name"], ra["description"], "", "missing.jpg"),
       "missing image: no such file: text only", True),
      (("corrupt", ra["product_name"], ra["description"], "", "corrupt.jpg"),
       "corrupt image", True),
      (("escapes", ra["product_name"], ra["description"], "", "../outside.jpg"),
       "image path outside the image folder", True),
      (("no_image_name", ra["product_name"], ra["description"], "", ""),
       "missing image: empty file name: text only", True),
      (("no_text", " ", "", "", rb["image"]), "empty text: image only", True),
      (("nothing", "", "", "", "missing.jpg"), "not predicted: no usable input", False),
      ((a, rb["product_name"], rb["description"], "", rb["image"]),
       "duplicate uniq_id: first seen on row 1", True),
      (("", rb["product_name"], rb["description"], "", rb["image"]), "empty id", True),
      (("malformed", "x", "y", "", rb["image"], "EXTRA"), "not predicted: malformed CSV row",
       False),
  ]
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["uniq_id", "product_name", "description", "brand", "image"])
    w.writerows(r for r, _, _ in rows)
  return rows


def test_every_row_is_in_the_output_with_its_note(early, tmp_path):
  wd = early["workdir"]
  path = str(tmp_path / "hostile.csv")
  rows = _hostile_csv(early, path)
  out = str(tmp_path / "pred.csv")
  res = predict.predict(wd, path, early["new_images"], out)
  got = _read(out)
  assert len(got) == len(rows)
  for (fields, note, ok), g in zip(rows, got):
    assert g["uniq_id"] == fields[0]
    assert g["note"].startswith(note), (g["note"], note)
    probs = [g[f"p_{c}"] for c in res.classes]
    if ok:
      p = np.array([float(v) for v in probs])
      assert g["predicted"] == res.classes[p.argmax()] and abs(p.sum() - 1) < 1e-4
    else:
      assert g["predicted"] == "" and probs == [""] * len(res.classes)
  # The image-less rows are the text-only prediction: the image embedding zeroed,
  # as modality dropout trained it (l2 keeps a zero embedding zero).
  _, run, params, _ = restore.restore(wd)
  text = run.text_features_for([f"{rows[1][0][1]} {rows[1][0][2]}"])
  zero = np.zeros((1, run.feature_dims["image"]), np.float32)
  want = run.ensemble(run.predict_features(params, {"image": zero, "text": text})[0])[0]
  for i in (1, 2, 3, 4):
    np.testing.assert_allclose(res.probs[i], want, rtol=1e-6, atol=1e-7)
  assert not np.array_equal(res.probs[0], want)        # the full row did use its image
  # The report lists every noted row with its file, and says which were not predicted.
  with open(out + ".data_report.json") as f:
    rep = json.load(f)
  assert rep["total_rows"] == len(rows) and rep["not_predicted"] == 2
  noted = {(n["row"], n["field"]): n for n in rep["noted"]}
  assert noted[(2, "image")]["file"].endswith("missing.jpg")
  assert not noted[(7, "image")]["predicted"] and noted[(2, "image")]["predicted"]
  assert {n["row"] for n in rep["noted"]} == {i + 1 for i, r in enumerate(rows) if r[1]}


def test_predict_cli_fail_policy(early, tmp_path):
  path = str(tmp_path / "new.csv")
  _hostile_csv(early, path)
  r = subprocess.run([sys.executable, "-m", "m6jax.inference.predict",
                      "--workdir", early["workdir"],
                      "--csv", path, "--images", early["new_images"],
                      "--out", str(tmp_path / "cli.csv"), "--on_bad_row=fail"],
                     capture_output=True, text=True, timeout=300, cwd=REPO)
  assert r.returncode != 0
  assert "no_photo" in r.stderr and "missing image" in r.stderr
  assert not os.path.exists(tmp_path / "cli.csv")
  assert not os.path.exists(tmp_path / "cli.csv.data_report.txt")


def test_text_only_model_never_reads_images(tmp_path_factory, tmp_path):
  run = trained_run(tmp_path_factory, "text", **{"model.fusion": "text", "train.epochs": 2})
  rows = _read(run["new_csv"])
  path = str(tmp_path / "no_images.csv")
  with open(path, "w", newline="") as f:   # no image column at all
    w = csv.writer(f)
    w.writerow(["uniq_id", "product_name", "description"])
    w.writerows([r["uniq_id"], r["product_name"], r["description"]] for r in rows)
    w.writerow(["blank", "", " "])
  out = str(tmp_path / "pred.csv")
  predict.predict(run["workdir"], path, None, out)
  got = _read(out)
  _assert_same_as_test_predictions(run["workdir"], got[:-1])
  assert got[-1]["predicted"] == "" and got[-1]["note"].startswith(
      "not predicted: no usable input: empty text")


def test_cross_validation_run_predicts_its_fold_ensembles_as_scored(tmp_path_factory,
                                                                   tmp_path):
  run = trained_run(tmp_path_factory, "folds", **{"train.folds": 2, "train.epochs": 2})
  _, inf, params, _ = restore.restore(run["workdir"])
  assert inf.bundle.folds == 2 and inf.num_replicas == 2 * run["cfg"].seeds
  out = str(tmp_path / "pred.csv")
  predict.predict(run["workdir"], run["new_csv"], run["new_images"], out)
  _assert_same_as_test_predictions(run["workdir"], _read(out))


@pytest.mark.slow
def test_finetune_run_predicts_as_scored(tmp_path_factory, tmp_path):
  run = trained_run(tmp_path_factory, "finetune", **{"train.mode": "finetune",
                                                     "train.epochs": 1})
  out = str(tmp_path / "pred.csv")
  predict.predict(run["workdir"], run["new_csv"], run["new_images"], out)
  _assert_same_as_test_predictions(run["workdir"], _read(out))
  # An image-less row goes through the head with a zero image embedding.
  path = str(tmp_path / "no_photo.csv")
  first = _read(run["new_csv"])[0]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, list(first))
    w.writeheader()
    w.writerows([first, dict(first, uniq_id="no_photo", image="missing.jpg")])
  res = predict.predict(run["workdir"], path, run["new_images"], out)
  assert res.notes == ["", "missing image: no such file: text only"]
  assert np.isfinite(res.probs).all() and not np.array_equal(res.probs[0], res.probs[1])


def test_the_prediction_path_of_predict_is_the_trainers_on_the_same_states(tiny_catalogue,
                                                                           tmp_path):
  """m6jax.train.predictions is the one path: the trainer's test ensemble (as scored)
  equals what predict / serve (predict_products) and a split of the restored run give
  with the same in-memory states, fold ensembles included."""
  import jax

  from m6jax.inference import bundle
  from tests.conftest import tiny_config
  from tests.trained import new_products
  cfg = tiny_config(tiny_catalogue, str(tmp_path / "tfds"),
                    **{"train.epochs": 2, "train.folds": 2, "train.checkpoint": False})
  wd = str(tmp_path / "run")
  run = prepare.setup(cfg, wd)
  states, _ = run.trainer.fit(run.cols["validation"]["label"], progress=False)
  bundle.save(wd, run, states)
  params = jax.tree.map(np.asarray, states.best_params)
  want = run.trainer.ensemble(run.trainer.predict(params, None, "test"))
  assert run.trainer.folds == 2 and want.shape == (len(run.cols["test"]["label"]), 3)
  inf = restore.Inference(bundle.load(bundle.directory(wd)))
  np.testing.assert_allclose(inf.ensemble(inf.predict(params, None, "test")), want, atol=1e-6)
  new_csv, images = str(tmp_path / "new.csv"), str(tmp_path / "img")
  new_products(tiny_catalogue, run.cols["test"]["uniq_id"], new_csv, images)
  got = predict.predict_products(inf, params, {}, products_lib.read_csv(inf, new_csv, images))
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_frozen_prediction_in_windows_equals_the_whole():
  """Past `chunk` rows the frozen head runs on fixed windows (the last one moved back
  to end at row N): the same probabilities and weights as one call on all rows."""
  rng = np.random.default_rng(0)
  feats = {"image": rng.normal(size=(50, 6)).astype(np.float32),
           "text": rng.normal(size=(50, 5)).astype(np.float32)}
  head = fusion.FusionHead(mode="early", num_classes=3, hidden=0, modality_weights=(0.5, 1.0))
  params = jax.vmap(lambda k: head.init(k, {m: f[:1] for m, f in feats.items()})["params"])(
      jax.random.split(jax.random.key(0), 2))
  whole = predictions.replica_predict(head.apply, frozen=True)(params, feats)
  windows = predictions.replica_predict(head.apply, frozen=True, chunk=8)(params, feats)
  assert isinstance(windows[0], np.ndarray) and windows[0].shape == (2, 50, 3)
  # Equal to float32 rounding: XLA may block the matmul differently per shape.
  for a, b in zip(windows, whole):
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-6, atol=1e-7)
