"""Shared fixtures: a tiny generated catalogue with one of each bad row."""

import csv
import glob
import os
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from configs import smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_TRACKING_URI", "")

# Many tests build the same small programs in new trainer objects; XLA's
# persistent cache turns those repeat compiles into lookups.
XLA_CACHE = os.path.join(REPO, ".pytest_cache", "xla")
jax.config.update("jax_compilation_cache_dir", os.environ.get("M6JAX_TEST_XLA_CACHE", XLA_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

CLASSES = ("Alpha Goods", "Beta Things", "Gamma Stuff")
PER_CLASS = 10
HEADER = ["uniq_id", "product_name", "product_category_tree", "description", "brand", "image"]
# The bad rows, each with the reason the report must give.
BAD = {
    "missing_image": "missing image",
    "corrupt_image": "corrupt image",
    "huge_image": "image too large",
    "empty_text": "empty text",
    "bad_tree": "bad label",
    "malformed": "malformed CSV row",
    "dup": "duplicate uniq_id",
}
MAX_PIXELS = 500_000


def _img(path, color, size=(40, 30)):
  rng = np.random.default_rng(zlib.crc32(os.path.basename(path).encode()))   # same every run
  arr = np.clip(np.array(color)[None, None] + rng.integers(-20, 20, (size[1], size[0], 3)),
                0, 255).astype(np.uint8)
  Image.fromarray(arr).save(path, "JPEG", quality=90)


def make_catalogue(root, classes=CLASSES, per_class=PER_CLASS, bad=True):
  """Writes root/products.csv + root/images/*.jpg; returns the list of bad ids."""
  img_dir = os.path.join(root, "images")
  os.makedirs(img_dir, exist_ok=True)
  rows = []
  for c, cat in enumerate(classes):
    color = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)][c % 4]
    for i in range(per_class):
      uid = f"{c}{i:03d}" + "a" * 8
      _img(os.path.join(img_dir, uid + ".jpg"), color)
      rows.append([uid, f"{cat.split()[0]} item {i}", f'["{cat} >> Sub {i % 2} >> Leaf"]',
                   f"A {cat.lower()} product number {i}, very {cat.split()[1].lower()}.",
                   "", uid + ".jpg"])
  bad_ids = []
  if bad:
    good_tree = f'["{classes[0]} >> Sub"]'
    _img(os.path.join(img_dir, "huge.jpg"), (90, 90, 90), size=(800, 700))
    with open(os.path.join(img_dir, "corrupt.jpg"), "wb") as f:
      f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg" + bytes(range(200)))
    _img(os.path.join(img_dir, "ok_extra.jpg"), (10, 10, 10))
    rows += [
        ["missing_image", "Thing", good_tree, "desc", "", "nope.jpg"],
        ["corrupt_image", "Thing", good_tree, "desc", "", "corrupt.jpg"],
        ["huge_image", "Thing", good_tree, "desc", "", "huge.jpg"],
        ["empty_text", "  ", good_tree, "", "", "ok_extra.jpg"],
        ["bad_tree", "Thing", "Alpha Goods > Sub", "desc", "", "ok_extra.jpg"],
        ["malformed", "Thing", good_tree, "desc", "", "ok_extra.jpg", "EXTRA", "FIELDS"],
        [rows[0][0], "Dup", good_tree, "desc", "", "ok_extra.jpg"],
    ]
    bad_ids = list(BAD)
  with open(os.path.join(root, "products.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(HEADER)
    w.writerows(rows)
  return bad_ids


def new_products_csv(catalogue_dir, ids, path):
  """Writes the products `ids` of a catalogue as a new CSV without the category
  column, plus one row whose photo is missing ('no_photo'); returns the rows kept."""
  with open(os.path.join(catalogue_dir, "products.csv")) as f:
    src = [r for r in csv.DictReader(f) if r["uniq_id"] in ids]
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["uniq_id", "product_name", "description", "image"])
    for r in src:
      w.writerow([r["uniq_id"], r["product_name"], r["description"], r["image"]])
    w.writerow(["no_photo", "Thing", "desc", "missing.jpg"])
  return src


@pytest.fixture(scope="session", autouse=True)
def _feature_cache(tmp_path_factory):
  """Runs' frozen-tower features go to a per-session folder, not the user's cache."""
  os.environ["M6JAX_FEATURE_CACHE"] = str(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="session")
def tiny_catalogue(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("catalogue"))
  make_catalogue(root)
  return root


def learnable_features(n, num_classes, dims=(("image", 6), ("text", 5)), seed=0,
                       splits=("train", "validation", "test")):
  """Synthetic embeddings a head can learn: ({split: {modality: (n, d)}}, {split: (n,)}).

  Each class has a random prototype direction per modality (the signal survives
  the head's per-modality LayerNorm, unlike a constant shift); unit noise on top.
  """
  rng = np.random.default_rng(seed)
  protos = {m: 1.5 * rng.normal(size=(num_classes, d)) for m, d in dims}
  labels = {s: rng.integers(0, num_classes, n).astype(np.int32) for s in splits}
  feats = {s: {m: (protos[m][labels[s]] + rng.normal(size=(n, d))).astype(np.float32)
               for m, d in dims} for s in splits}
  return feats, labels


def tiny_config(catalogue_dir, tfds_dir, **overrides):
  """The smoke config pointed at a tiny catalogue."""
  cfg = smoke.get_config()
  cfg.data.manual_dir = catalogue_dir
  cfg.data.tfds_dir = tfds_dir
  cfg.data.max_image_pixels = MAX_PIXELS
  cfg.data.image_size = 16
  cfg.data.batch_size = 8
  cfg.data.columns.name = "product_name"
  cfg.train.batch_size = 8
  cfg.train.epochs = 1
  cfg.model.text.tfidf_dim = 16
  for k, v in overrides.items():
    node = cfg
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return cfg


def bundled_photos(n: int, size: int) -> np.ndarray:
  """(n, size, size, 3) float32 RGB of the first n bundled product photos (sorted by
  name), bilinear-resized; skips the test when the bundled images are absent."""
  files = sorted(glob.glob(os.path.join(REPO, "data", "flipkart", "images", "*.jpg")))[:n]
  if len(files) < n:
    pytest.skip("bundled product images not found")
  return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size),
                                                                 Image.BILINEAR), np.float32)
                   for f in files])
