"""Tiny trained runs shared by the prediction tests (trained once per session).

Each run has its own catalogue copy, so a test may delete the training data
of a run (the bundle must not need it) without breaking another test.
"""

import csv
import os
import shutil

from m6jax import experiment
from tests.conftest import HEADER, make_catalogue, tiny_config

_RUNS: dict = {}


def new_products(cat_dir, ids, path, image_dir):
  """Writes the catalogue products `ids`, in that order, as a new CSV without the
  category column, and copies their images to `image_dir`."""
  with open(os.path.join(cat_dir, "products.csv")) as f:
    src = {r["uniq_id"]: r for r in csv.DictReader(f)}
  os.makedirs(image_dir, exist_ok=True)
  cols = [c for c in HEADER if c != "product_category_tree"]
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for uid in ids:
      w.writerow([src[uid][c] for c in cols])
      shutil.copy(os.path.join(cat_dir, "images", src[uid]["image"]), image_dir)


def trained_run(tmp_path_factory, name: str, **overrides) -> dict:
  """{'root', 'workdir', 'cfg', 'results', 'new_csv', 'new_images', 'test_ids'}: a
  tiny run (smoke config, 3 epochs unless overridden) and its test products as
  new inputs outside the training catalogue."""
  if name not in _RUNS:
    root = str(tmp_path_factory.mktemp(f"run_{name}"))
    cat = os.path.join(root, "cat")
    make_catalogue(cat)
    cfg = tiny_config(cat, os.path.join(root, "tfds"), **{"train.epochs": 3, **overrides})
    wd = os.path.join(root, "run")
    res = experiment.train_and_evaluate(cfg, wd)
    with open(os.path.join(wd, "predictions_test.csv")) as f:
      ids = [r["uniq_id"] for r in csv.DictReader(f)]
    new_csv, new_images = os.path.join(root, "new", "new.csv"), os.path.join(root, "new", "img")
    new_products(cat, ids, new_csv, new_images)
    _RUNS[name] = dict(root=root, workdir=wd, cfg=cfg, results=res, new_csv=new_csv,
                       new_images=new_images, test_ids=ids, catalogue=cat)
  return _RUNS[name]
