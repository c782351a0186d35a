"""The fine-tune input pipeline's threads / worker processes and device augmentation."""

import jax
import numpy as np
import pytest

from m6jax.data import pipeline, tfds_builder
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def train_source(tiny_catalogue, tmp_path_factory):
  cfg = tiny_config(tiny_catalogue, str(tmp_path_factory.mktemp("tfds")))
  builder, _ = tfds_builder.prepare(cfg.data)
  return builder.as_data_source("train")


def _all(source, **kw):
  return list(pipeline.batches(source, 4, 16, shuffle_seed=3, augment_seed=5, **kw))


def _assert_same(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert set(g) == set(w)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_threads_give_the_sequential_batches(train_source):
  want = _all(train_source)
  assert len(want) == pipeline.num_batches(len(train_source), 4)
  _assert_same(_all(train_source, threads=3, prefetch=2), want)


@pytest.mark.slow
def test_worker_processes_give_the_sequential_batches(train_source):
  _assert_same(_all(train_source, workers=2), _all(train_source))


def test_device_augment_crops_and_flips_each_image():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (16, 10, 12, 3), dtype=np.uint8)
  out = np.asarray(jax.jit(pipeline.device_augment, static_argnums=2)(
      images, jax.random.key(0), 8))
  assert out.shape == (16, 8, 8, 3) and out.dtype == np.uint8
  flips = []
  for img, crop in zip(images, out):
    found = [(t, lft, f) for f in (False, True) for t in range(3) for lft in range(5)
             if np.array_equal((crop[:, ::-1] if f else crop), img[t:t + 8, lft:lft + 8])]
    assert found, "output is not a (flipped) crop of its input"
    flips.append(found[0][2])
  assert 0 < sum(flips) < len(flips)   # both kinds drawn over 16 images
