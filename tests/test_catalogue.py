import os

import numpy as np
import pytest

from m6jax.data import catalogue, images
from tests.conftest import BAD, CLASSES, MAX_PIXELS, PER_CLASS, make_catalogue

COLUMNS = dict(id="uniq_id", name="product_name", description="description",
               category_tree="product_category_tree", image="image")


def _read(root, **kw):
  return catalogue.read_catalogue(os.path.join(root, "products.csv"),
                                  os.path.join(root, "images"), COLUMNS,
                                  max_image_pixels=MAX_PIXELS, **kw)


def test_every_bad_row_is_named_with_reason(tiny_catalogue):
  rows, report = _read(tiny_catalogue)
  assert len(rows) == len(CLASSES) * PER_CLASS
  assert report.total_rows == len(rows) + len(BAD)
  by_id = {}
  for b in report.bad:
    by_id.setdefault(b.uniq_id, []).append(b)
  dup_id = rows[0].uniq_id
  for uid, reason in BAD.items():
    key = dup_id if uid == "dup" else uid
    matches = [b for b in by_id.get(key, []) if b.reason.startswith(reason)]
    assert matches, f"{uid}: expected a bad row with reason {reason!r}, got {report.bad}"
    assert matches[0].row > 0 and matches[0].line > 1
  missing = next(b for b in report.bad if b.uniq_id == "missing_image")
  assert missing.file.endswith("nope.jpg") and missing.field == "image"
  assert "line" in str(missing) and "missing_image" in str(missing)
  counts = report.to_dict()["skipped_by_reason"]
  assert sum(counts.values()) == len(BAD)


def test_good_rows_text_and_label(tiny_catalogue):
  rows, _ = _read(tiny_catalogue)
  r = rows[0]
  assert r.category == CLASSES[0]
  assert r.text.startswith("Alpha item 0 A alpha goods")
  assert os.path.isfile(r.image_path)


def test_category_label_depth():
  assert catalogue.category_label('["A >> B >> C"]') == "A"
  assert catalogue.category_label('["A >> B >> C"]', 2) == "A >> B"
  with pytest.raises(ValueError, match="fewer than 3"):
    catalogue.category_label('["A >> B"]', 3)
  with pytest.raises(ValueError, match="not a category tree"):
    catalogue.category_label("A >> B")


def test_unknown_label_with_fixed_classes(tiny_catalogue):
  rows, report = _read(tiny_catalogue, classes=CLASSES[:2])
  assert {r.category for r in rows} == set(CLASSES[:2])
  unknown = [b for b in report.bad if b.reason.startswith("unknown label")]
  assert len(unknown) == PER_CLASS


def test_missing_column_is_a_clear_error(tiny_catalogue):
  with pytest.raises(catalogue.DataError, match="missing column"):
    catalogue.read_catalogue(os.path.join(tiny_catalogue, "products.csv"),
                             tiny_catalogue, dict(COLUMNS, name="title"))


def test_stratified_split_is_fixed_and_stratified(tmp_path):
  make_catalogue(str(tmp_path), per_class=20, bad=False)
  rows, _ = _read(str(tmp_path))
  fr = dict(train=0.7, validation=0.15, test=0.15)
  a = catalogue.stratified_split(rows, fr, seed=3)
  b = catalogue.stratified_split(list(reversed(rows)), fr, seed=3)
  c = catalogue.stratified_split(rows, fr, seed=4)
  ids = lambda s: {k: [r.uniq_id for r in v] for k, v in s.items()}
  assert ids(a) == ids(b)                    # independent of CSV order
  assert ids(a) != ids(c)                    # depends on the seed
  for part, n in (("train", 14), ("validation", 3), ("test", 3)):
    cats = [r.category for r in a[part]]
    assert all(cats.count(cat) == n for cat in CLASSES), (part, cats)
  all_ids = sum(ids(a).values(), [])
  assert sorted(all_ids) == sorted(r.uniq_id for r in rows)


def test_load_image_shrinks_and_rejects(tmp_path):
  from PIL import Image
  p = str(tmp_path / "big.jpg")
  Image.fromarray(np.zeros((600, 900, 3), np.uint8)).save(p)
  img = images.load_image(p, images.Limits(max_pixels=10**7), short_side=100)
  assert min(img.size) == 100 and img.mode == "RGB"
  with pytest.raises(ValueError, match="image too large"):
    images.load_image(p, images.Limits(max_pixels=1000))
  with pytest.raises(ValueError, match="image too large"):
    images.load_image(p, images.Limits(max_side=800))
  with pytest.raises(ValueError, match="missing image"):
    images.load_image(str(tmp_path / "nope.jpg"), images.Limits(max_pixels=1000))
