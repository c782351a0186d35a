"""data.exclude_ids: never a test product unless data.allow_test_exclusion."""

import csv
import os

import pytest

from m6jax.data import catalogue, tfds_builder
from tests.conftest import tiny_config


def _split_of(builder) -> dict:
  with open(os.path.join(builder.data_dir, "split.csv")) as f:
    return {r["uniq_id"]: r["split"] for r in csv.DictReader(f)}


def test_a_test_product_in_exclude_ids_is_refused_unless_allowed(tiny_catalogue, tmp_path):
  cfg = tiny_config(tiny_catalogue, str(tmp_path / "tfds"))
  split = _split_of(tfds_builder.prepare(cfg.data)[0])
  test_id = sorted(u for u, s in split.items() if s == "test")[0]
  train_id = sorted(u for u, s in split.items() if s == "train")[0]
  ids = tmp_path / "exclude.txt"
  ids.write_text(f"{train_id}\n{test_id}\n")
  cfg.data.exclude_ids = str(ids)
  built = tmp_path / "tfds" / "product_catalogue"
  before = sorted(os.listdir(built))
  with pytest.raises(catalogue.DataError, match=rf"1 test product\(s\): {test_id}\..*"
                     r"data.allow_test_exclusion=True"):
    tfds_builder.prepare(cfg.data)
  assert sorted(os.listdir(built)) == before          # refused before anything is written
  cfg.data.allow_test_exclusion = True
  builder, report = tfds_builder.prepare(cfg.data)
  assert test_id not in _split_of(builder) and train_id not in _split_of(builder)
  # The same dataset, now reused: still refused without the key.
  cfg.data.allow_test_exclusion = False
  with pytest.raises(catalogue.DataError, match=test_id):
    tfds_builder.prepare(cfg.data)
  # Train and validation products (what the label audit lists) are fine.
  ids.write_text(f"{train_id}\n")
  builder, report = tfds_builder.prepare(cfg.data)
  kept = _split_of(builder)
  assert train_id not in kept and kept == {u: s for u, s in split.items() if u != train_id}
