"""Word and modality explanations of a trained tiny run: explain_run's results
and `predict --explain`'s columns for every row (TF-IDF + linear head, frozen)."""

import csv
import json
import os

import numpy as np
import pytest

from m6jax.explain import run as explain_lib
from m6jax.inference import predict
from tests.trained import trained_run


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
  # A linear head (hidden 0) on TF-IDF + tiny image embeddings: exact term contributions.
  return trained_run(tmp_path_factory, "linear_early", **{"model.hidden": 0})


def test_explain_run_reports_words_modalities_and_deletion(linear):
  res = explain_lib.explain_run(linear["workdir"], n_per_class=1)
  ex = res["explain"]
  assert ex["text"]["method"] == "TfidfText"
  assert set(ex["text"]["deletion"]) == {"1", "3", "5"}
  for d in list(ex["text"]["deletion"].values()) + [ex["image"]["deletion"]]:
    assert set(d) >= {"attributed", "random"}
    assert all(-1 <= d[w] <= 1 for w in ("attributed", "random"))
  assert ex["modality"]["efficiency_max_abs_error"] < 1e-9
  with open(os.path.join(os.path.dirname(res["gallery"]), "explanations.json")) as f:
    products = json.load(f)["products"]
  assert [p["uniq_id"] for p in products] == list(res["uniq_id"])
  for p in products:
    assert p["top_words"] and p["pred"]
    v = p["values"]
    assert p["phi_text"] + p["phi_image"] == pytest.approx(v["both"] - v["none"], abs=1e-9)


def _read(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_predict_explain_columns_for_every_row(linear, tmp_path):
  src = {r["uniq_id"]: r for r in _read(linear["new_csv"])}
  a, b = linear["test_ids"][:2]
  rows = [  # uniq_id, name, description, image -> explained from
      ((a, src[a]["product_name"], src[a]["description"], src[a]["image"]), "text+image"),
      (("no_photo", src[a]["product_name"], src[a]["description"], "missing.jpg"), "text"),
      (("no_text", " ", "", src[b]["image"]), "image"),
      (("nothing", "", "", "missing.jpg"), ""),
  ]
  path = str(tmp_path / "new.csv")
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["uniq_id", "product_name", "description", "image"])
    w.writerows(r for r, _ in rows)
  out = str(tmp_path / "pred.csv")
  predict.predict(linear["workdir"], path, linear["new_images"], out, explain=True)
  got = _read(out + ".explain.csv")
  assert [g["uniq_id"] for g in got] == [r[0] for r, _ in rows]
  cols = {"uniq_id", "predicted", "top_words", "phi_text", "phi_image", "share_text",
          "share_image", "explained_from"}
  for g, (_, source) in zip(got, rows):
    assert set(g) == cols
    assert g["explained_from"] == source
    if not source:                      # not predicted: empty columns
      assert g["predicted"] == g["top_words"] == g["phi_text"] == ""
      continue
    assert g["predicted"] and g["phi_text"] and g["phi_image"] and g["share_text"]
    assert bool(g["top_words"]) == ("text" in source)
    if source == "text":                # the missing image contributes nothing
      assert float(g["phi_image"]) == 0.0 and float(g["share_text"]) == 1.0
    if source == "image":
      assert float(g["phi_text"]) == 0.0
  preds = {r["uniq_id"]: r["predicted"] for r in _read(out)}
  assert all(preds[g["uniq_id"]] == g["predicted"] for g in got)
  assert np.isclose(sum(float(g["share_text"]) + float(g["share_image"])
                        for g in got if g["explained_from"]), 3.0)


def test_predict_heatmaps_one_png_per_row_with_a_photo(linear, tmp_path):
  from PIL import Image

  from m6jax.data import pipeline
  from m6jax.inference import restore
  src = {r["uniq_id"]: r for r in _read(linear["new_csv"])}
  a = linear["test_ids"][0]
  rows = [(a, src[a]["product_name"], src[a]["description"], src[a]["image"]),
          ("no/photo", src[a]["product_name"], src[a]["description"], "missing.jpg")]
  path = str(tmp_path / "new.csv")
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["uniq_id", "product_name", "description", "image"])
    w.writerows(rows)
  out = str(tmp_path / "pred.csv")
  predict.predict(linear["workdir"], path, linear["new_images"], out, explain="heatmaps")
  got = _read(out + ".explain.csv")
  assert got[1]["heatmap"] == "" and got[1]["predicted"]   # predicted from its text alone
  png = got[0]["heatmap"]
  assert png == os.path.join(out + ".heatmaps", f"1-{a}.png") and os.listdir(
      out + ".heatmaps") == [f"1-{a}.png"]
  cfg = restore.load_config(linear["workdir"])
  photo = pipeline.image_from_file(os.path.join(linear["new_images"], src[a]["image"]), cfg.data)
  heat = np.asarray(Image.open(png).convert("RGB"))
  assert heat.shape == photo.shape and np.abs(heat.astype(int) - photo).mean() > 5
