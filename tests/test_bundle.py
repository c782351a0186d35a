"""The inference bundle (m6jax.inference.bundle) and the logged MLflow model
(m6jax.inference.serve)."""

import csv
import json
import os
import types

import jax
import ml_collections
import numpy as np
import pandas as pd
import pytest

from m6jax.inference import bundle, predict, restore
from m6jax.models import tfidf
from tests.conftest import tiny_config
from tests.trained import trained_run

TEXTS = ["red leather shoes for men", "blue steel watch", "Red watch, cheap!",
         "baby cotton shirt \u00e9t\u00e9", "men shoes leather brown"] * 3
NEW = ["red shoes", "", "unknown words only", "Blue STEEL watch men", "baby \u00e9t\u00e9"]


@pytest.mark.parametrize("dim", [4, None])
def test_tfidf_arrays_give_the_same_features_bit_for_bit(tmp_path, dim):
  fitted = tfidf.TfidfFeatures(dim=dim, seed=3).fit(TEXTS)
  options, arrays = fitted.to_arrays()
  np.savez(tmp_path / "a.npz", **arrays)
  with np.load(tmp_path / "a.npz", allow_pickle=False) as z:   # plain arrays, no pickle
    back = tfidf.TfidfFeatures.from_arrays(json.loads(json.dumps(options)),
                                           {k: z[k] for k in z.files})
  np.testing.assert_array_equal(back.transform(NEW), fitted.transform(NEW))
  assert back.output_dim == fitted.output_dim


def test_weights_fingerprint_catches_changed_missing_and_extra_files(tmp_path):
  f = tmp_path / "w.bin"
  f.write_bytes(b"weights" * 100)
  tower = {"name": "tiny", "weights": str(f), "fingerprint": bundle.weights_fingerprint(str(f),
                                                                                      "tiny")}
  assert tower["fingerprint"]["files"]["w.bin"]["size"] == 700
  bundle.verify_weights("image", tower)                    # unchanged: fine
  f.write_bytes(b"weights" * 99 + b"WEIGHTS")
  with pytest.raises(bundle.BundleError, match=r"image tower 'tiny'.*w\.bin: size 700 sha256"):
    bundle.verify_weights("image", tower)
  f.unlink()
  with pytest.raises(bundle.BundleError, match="cannot be found here"):
    bundle.verify_weights("image", tower)

  d = tmp_path / "folder"
  (d / "1_Pooling").mkdir(parents=True)
  (d / "model.safetensors").write_bytes(b"abc")
  (d / "1_Pooling" / "config.json").write_text("{}")
  (d / ".gitattributes").write_text("ignored")
  tower = {"name": "minilm", "weights": str(d), "fingerprint": bundle.weights_fingerprint(str(d),
                                                                                        "minilm")}
  assert sorted(tower["fingerprint"]["files"]) == ["1_Pooling/config.json", "model.safetensors"]
  (d / "extra.txt").write_text("x")
  (d / "model.safetensors").unlink()
  with pytest.raises(bundle.BundleError, match="extra.txt: not in the trained weights; "
                                               "model.safetensors: missing"):
    bundle.verify_weights("text", tower)
  assert bundle.weights_fingerprint("none", "tiny") == {"random": True}


def _fake_run(tmp_path, classes):
  cfg = tiny_config(str(tmp_path / "cat"), str(tmp_path / "tfds"))
  feats = tfidf.TfidfFeatures(dim=4).fit(TEXTS)
  return types.SimpleNamespace(
      cfg=cfg, class_names=classes, text_features=feats, trainer=types.SimpleNamespace(folds=1),
      feats={"image": {"train": np.zeros((2, 32))}, "text": {"train": np.zeros((2, 4))}},
      builder=types.SimpleNamespace(data_dir=str(tmp_path / "tfds" / "x" / "1.0.0")),
      dataset_id=lambda: "x/1.0.0")


def test_save_writes_a_complete_bundle_atomically(tmp_path):
  wd = str(tmp_path / "run")
  states = types.SimpleNamespace(best_params={"head": {"w": np.zeros((3, 5, 2))}},
                                 step=np.full(3, 42, np.int32))
  path = bundle.save(wd, _fake_run(tmp_path, ["a", "b"]), states)
  b = bundle.load(path)
  assert b.class_names == ["a", "b"] and b.num_replicas == 3 and b.modalities == ("image", "text")
  assert b.checkpoint_step == 42   # the step whose parameters were scored
  pre = b.preprocessing
  assert pre["image_size"] == 16 and pre["columns"]["name"] == "product_name"
  assert pre["text_fields"] == ["name", "description"] and pre["max_image_pixels"] == 500_000
  assert b.meta["towers"]["image"] == {"name": "tiny", "weights": "none", "feature_dim": 32,
                                       "fingerprint": {"random": True}}
  assert b.meta["towers"]["text"]["feature_dim"] == 4
  assert b.meta["model"]["fusion"] == "early" and b.config.model.hidden == 32
  np.testing.assert_array_equal(b.text_features().transform(NEW),
                                _fake_run(tmp_path, []).text_features.transform(NEW))
  # A second save replaces the folder whole, leaving no temporary folders behind.
  bundle.save(wd, _fake_run(tmp_path, ["c", "d", "e"]), states)
  assert bundle.load(path).class_names == ["c", "d", "e"]
  assert sorted(os.listdir(wd)) == ["bundle"]
  assert sorted(os.listdir(path)) == ["bundle.json", "text_features.npz"]


def test_load_names_what_is_wrong(tmp_path):
  with pytest.raises(bundle.BundleError, match="no inference bundle"):
    bundle.load(str(tmp_path))
  (tmp_path / "bundle.json").write_text("")
  with pytest.raises(bundle.BundleError, match="bundle.json cannot be read"):
    bundle.load(str(tmp_path))
  (tmp_path / "bundle.json").write_text('{"format": 99}')
  with pytest.raises(bundle.BundleError, match="expected bundle format 1, got 99"):
    bundle.load(str(tmp_path))


def test_trained_run_bundle_matches_its_checkpoint(tmp_path_factory):
  run = trained_run(tmp_path_factory, "early")
  b = bundle.load(bundle.directory(run["workdir"]))
  assert b.class_names == run["results"]["classes"]
  _, inf, params, _ = restore.restore(run["workdir"])
  assert {np.asarray(x).shape[0] for x in jax.tree.leaves(params)} == {b.num_replicas} == {
      run["cfg"].seeds}
  assert b.meta["dataset"]["dir"].endswith(b.meta["dataset"]["id"])
  assert inf.feature_dims == {"image": 32, "text": run["cfg"].model.text.tfidf_dim}


def test_logged_mlflow_model_predicts_as_the_predict_cli(tmp_path_factory, tmp_path):
  import mlflow
  from mlflow.tracking._tracking_service.utils import _use_tracking_uri

  from m6jax.inference import serve
  from m6jax.track import tracker as tracker_lib
  run = trained_run(tmp_path_factory, "early")
  wd = run["workdir"]
  # A scoped tracking URI: a global one would leak into the other tests' stores.
  with _use_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db"):
    exp = mlflow.create_experiment("serve", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
      info = serve.log_model(wd)
    model = mlflow.pyfunc.load_model(info.model_uri,
                                     model_config={"image_dir": run["new_images"]})
  # The same model logged through the tracker's seam (its own run and store).
  cfg = ml_collections.ConfigDict({"name": "m"})
  with tracker_lib.Tracker(cfg, str(tmp_path / "t" / "m")) as t:
    uri = serve.log_to(t, wd)
  with _use_tracking_uri(t.uri):
    tracked = mlflow.pyfunc.load_model(uri, model_config={"image_dir": run["new_images"]})
  # New products: the run's test products plus a row without a photo and one with nothing.
  frame = pd.read_csv(run["new_csv"], dtype=str, keep_default_na=False)
  extra = dict(frame.iloc[0], uniq_id="no_photo", image="missing.jpg")
  frame = pd.concat([frame, pd.DataFrame([extra, dict(extra, uniq_id="nothing",
                                                      product_name="", description="")])],
                    ignore_index=True)
  got = model.predict(frame)
  path = str(tmp_path / "new.csv")
  frame.to_csv(path, index=False)
  want = predict.predict(wd, path, run["new_images"], str(tmp_path / "pred.csv"))
  pd.testing.assert_frame_equal(got, serve.json_safe(want.to_frame()))
  pd.testing.assert_frame_equal(tracked.predict(frame), got)
  assert got["note"].iloc[-2] == "missing image: no such file: text only"
  assert got["predicted"].iloc[-1] == "" and got.iloc[-1].filter(like="p_").isna().all()
  assert all(v is None for v in got.iloc[-1].filter(like="p_"))   # JSON null, not NaN
  with open(tmp_path / "pred.csv") as f:
    rows = list(csv.DictReader(f))
  for r, (_, g) in zip(rows, got.iterrows()):
    assert r["predicted"] == g["predicted"] and r["note"] == g["note"]
    assert [r[f"p_{c}"] for c in want.classes] == [
        "" if pd.isna(g[f"p_{c}"]) else f"{g[f'p_{c}']:.6f}" for c in want.classes]
