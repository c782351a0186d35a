"""The predict CLI on products outside the training data."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from m6jax import experiment, predict
from tests.conftest import new_products_csv, tiny_config


@pytest.fixture(scope="module")
def trained(tiny_catalogue, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("pred")
  cfg = tiny_config(tiny_catalogue, str(tmp / "tfds"), **{"train.epochs": 3})
  wd = str(tmp / "run")
  experiment.train_and_evaluate(cfg, wd)
  return wd, tmp


def _new_catalogue(trained_dir, tiny_catalogue, tmp):
  """The run's test products as a new CSV without the category column, plus one bad row."""
  with open(os.path.join(trained_dir, "predictions_test.csv")) as f:
    expected = {r["uniq_id"]: r for r in csv.DictReader(f)}
  path = os.path.join(tmp, "new.csv")
  new_products_csv(tiny_catalogue, expected, path)
  return path, expected


def test_predict_matches_the_runs_test_predictions(trained, tiny_catalogue):
  wd, tmp = trained
  path, expected = _new_catalogue(wd, tiny_catalogue, str(tmp))
  out = str(tmp / "out" / "pred.csv")
  res = predict.predict(wd, path, os.path.join(tiny_catalogue, "images"), out)
  with open(out) as f:
    got = list(csv.DictReader(f))
  assert len(got) == len(expected)
  classes = res["classes"]
  assert list(got[0]) == ["uniq_id", "predicted"] + [f"p_{c}" for c in classes]
  for row in got:
    ref = expected[row["uniq_id"]]
    p = np.array([float(row[f"p_{c}"]) for c in classes])
    q = np.array([float(ref[f"p_{c}"]) for c in classes])
    np.testing.assert_allclose(p, q, atol=1e-5)
    assert row["predicted"] == ref["predicted"]
  assert [b.uniq_id for b in res["report"].bad] == ["no_photo"]
  assert os.path.isfile(tmp / "out" / "data_report.txt")


def test_predict_cli_fail_policy(trained, tiny_catalogue):
  wd, tmp = trained
  path, _ = _new_catalogue(wd, tiny_catalogue, str(tmp))
  r = subprocess.run([sys.executable, "-m", "m6jax.predict", "--workdir", wd, "--csv", path,
                      "--images", os.path.join(tiny_catalogue, "images"),
                      "--out", str(tmp / "cli.csv"), "--on_bad_row=fail"],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0
  assert "no_photo" in r.stderr and "missing image" in r.stderr
  assert not os.path.exists(tmp / "cli.csv")
