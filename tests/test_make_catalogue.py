"""benchmarks/make_catalogue.py: K copies of the bundled catalogue, every product distinct
where the dataset build and the feature cache look (stored JPEG bytes, text, uniq_id)."""

import csv
import hashlib
import os

from benchmarks import make_catalogue
from m6jax import defaults
from m6jax.data import catalogue, images


def test_copies_are_distinct_after_the_dataset_builds_shrink(tmp_path):
  src = defaults.base_config().data.manual_dir
  n = make_catalogue.generate(src, str(tmp_path), times=3, fraction=4 / 840,
                              progress=lambda s: None)
  rows = list(csv.DictReader(open(tmp_path / "products.csv", encoding="utf-8")))
  assert n == len(rows) == 12
  orig = {r["uniq_id"]: r for r in csv.DictReader(open(os.path.join(src, "products.csv"),
                                                       encoding="utf-8"))}
  # What the build stores (shorter side <= 256, JPEG) and the cache hashes.
  stored = [hashlib.sha1(images.encode_jpeg(images.load_image(
      str(tmp_path / "images" / r["image"]), images.Limits(), 256))).hexdigest() for r in rows]
  texts = [r["product_name"] + r["description"] for r in rows]
  assert len(set(stored)) == len(set(texts)) == len({r["uniq_id"] for r in rows}) == 12
  for r in rows:
    src_row = orig[r["uniq_id"][:-5]]
    assert (catalogue.category_label(r["product_category_tree"])
            == catalogue.category_label(src_row["product_category_tree"]))
    assert r["product_name"].startswith(src_row["product_name"] + " copy ")


def test_copy_words():
  assert [make_catalogue.copy_word(c) for c in (0, 19, 20, 42, 100, 1234)] == [
      "zero", "nineteen", "twenty", "forty two", "one hundred",
      "one thousand two hundred thirty four"]
