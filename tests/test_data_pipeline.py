import json
import os

import numpy as np
import pytest

from m6jax.data import catalogue, pipeline, tfds_builder
from tests.conftest import BAD, CLASSES, PER_CLASS, tiny_config


@pytest.fixture(scope="module")
def built(tiny_catalogue, tmp_path_factory):
  cfg = tiny_config(tiny_catalogue, str(tmp_path_factory.mktemp("tfds")))
  builder, report = tfds_builder.prepare(cfg.data)
  return cfg, builder, report


def test_builds_splits_and_report(built):
  cfg, builder, report = built
  assert tfds_builder.class_names(builder) == sorted(CLASSES)
  sizes = {s: len(builder.as_data_source(s)) for s in ("train", "validation", "test")}
  assert sum(sizes.values()) == len(CLASSES) * PER_CLASS
  assert sizes == report.split_counts
  with open(os.path.join(builder.data_dir, "data_report.json")) as f:
    rep = json.load(f)
  assert rep["skipped_rows"] == len(BAD)
  assert {b["reason"].split(":")[0] for b in rep["skipped"]} >= {
      "missing image", "corrupt image", "image too large", "empty text",
      "malformed CSV row", "duplicate uniq_id"}
  assert os.path.isfile(os.path.join(builder.data_dir, "split.csv"))
  assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(builder.data_dir))


def test_splits_are_stratified_and_disjoint(built):
  _, builder, _ = built
  seen = set()
  for s in ("train", "validation", "test"):
    cols = pipeline.columns(builder.as_data_source(s))
    counts = np.bincount(cols["label"], minlength=len(CLASSES))
    assert counts.max() - counts.min() <= 1, (s, counts)
    assert not seen & set(cols["uniq_id"])
    seen |= set(cols["uniq_id"])


def test_rebuild_is_reused_and_deterministic(built, tmp_path):
  cfg, builder, _ = built
  again, _ = tfds_builder.prepare(cfg.data)
  assert again.data_dir == builder.data_dir
  cfg2 = cfg.copy_and_resolve_references()
  cfg2.data.tfds_dir = str(tmp_path)
  other, _ = tfds_builder.prepare(cfg2.data)
  for s in ("train", "test"):
    a = pipeline.columns(builder.as_data_source(s))
    b = pipeline.columns(other.as_data_source(s))
    assert a["uniq_id"] == b["uniq_id"]
    np.testing.assert_array_equal(a["label"], b["label"])


def test_fail_policy_raises_before_writing(tiny_catalogue, tmp_path):
  cfg = tiny_config(tiny_catalogue, str(tmp_path / "tfds"))
  cfg.data.on_bad_row = "fail"
  with pytest.raises(catalogue.DataError) as e:
    tfds_builder.prepare(cfg.data)
  msg = str(e.value)
  assert f"{len(BAD)} bad row(s)" in msg and "missing_image" in msg and "nope.jpg" in msg
  assert not os.path.exists(tmp_path / "tfds")


def test_batches_shapes_dtypes_and_padding(built):
  cfg, builder, _ = built
  src = builder.as_data_source("train")
  bs = list(pipeline.batches(src, 8, 16))
  assert len(bs) == pipeline.num_batches(len(src), 8)
  b = bs[0]
  assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.uint8
  assert b["label"].dtype == np.int32 and b["mask"].dtype == np.bool_
  assert b["text"].shape == (8,) and isinstance(b["text"][0], str)
  assert sum(int(x["mask"].sum()) for x in bs) == len(src)
  last = bs[-1]
  assert last["image"].shape[0] == 8
  assert bool(last["mask"][-1]) == (len(src) % 8 == 0)


def test_shuffle_and_augment_are_seeded(built):
  _, builder, _ = built
  src = builder.as_data_source("train")
  a = next(pipeline.batches(src, 8, 16, shuffle_seed=1, augment_seed=2))
  b = next(pipeline.batches(src, 8, 16, shuffle_seed=1, augment_seed=2))
  c = next(pipeline.batches(src, 8, 16, shuffle_seed=5))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert list(a["uniq_id"]) == list(b["uniq_id"])
  assert list(a["uniq_id"]) != list(c["uniq_id"])


def test_square_image_eval_is_centre_crop():
  img = np.zeros((20, 40, 3), np.uint8)
  img[:, 10:30] = 255
  out = pipeline.square_image(img, 10)
  assert out.shape == (10, 10, 3)
  assert out.mean() > 200           # the bright centre survives the crop


def test_square_image_extreme_aspect_resamples_only_the_crop():
  strip = np.zeros((2, 40000, 3), np.uint8)
  strip[:, 20000:] = 255                          # right half white
  out = pipeline.square_image(strip, 16)
  assert out.shape == (16, 16, 3)
  # The centre crop straddles the black/white edge: left columns dark, right bright.
  assert out[:, :4].mean() < 60 and out[:, -4:].mean() > 195
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
  from PIL import Image
  whole = np.asarray(Image.fromarray(img).resize((27, 16), Image.BILINEAR))[:, 5:21]
  np.testing.assert_array_equal(pipeline.square_image(img, 16), whole)  # usual path unchanged


def test_image_from_file_uses_the_image_policy(tmp_path, tiny_catalogue):
  from PIL import Image
  p = str(tmp_path / "g16.png")
  Image.fromarray(np.full((20, 30), 0x4040, np.uint16)).save(p)
  cfg = tiny_config(tiny_catalogue, str(tmp_path))
  out = pipeline.image_from_file(p, cfg.data)
  assert out.shape == (16, 16, 3) and abs(float(out.mean()) - 64) < 3   # not white
  cfg.data.max_image_side = 25
  with pytest.raises(ValueError, match="image too large"):
    pipeline.image_from_file(p, cfg.data)


def test_overlapped_dispatches_next_before_consuming_previous():
  log = []
  n = pipeline.overlapped(iter("abc"), lambda x: log.append(f"d{x}") or x.upper(),
                          lambda x, r: log.append(f"c{x}{r}"))
  assert n == 3
  assert log == ["da", "db", "caA", "dc", "cbB", "ccC"]
  assert pipeline.overlapped([], None, None) == 0
