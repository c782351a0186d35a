"""Batches from the built dataset, with grain.

Images come out as uint8 RGB (B, S, S, 3): each model family normalises them
itself (inside the jitted model), so the pipeline stays model-agnostic and
the same cached dataset serves every backbone.
"""

from __future__ import annotations

import io
from typing import Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image

from m6jax.data import images


def square_image(img: np.ndarray, size: int, rng: np.random.Generator | None = None
                 ) -> np.ndarray:
  """(H, W, 3) uint8 -> (size, size, 3) uint8.

  Eval: shorter side resized to `size`, centre crop. Train (rng given): shorter
  side resized to a random 1.0-1.25 x size, random crop, random horizontal flip.
  An extreme aspect ratio (resized area > 16 crops) resamples only the crop
  (equal up to +-1 rounding), so a 40000x2 strip costs (size, size), not
  (size, 20000 x size); other images are resized whole, then cropped.
  """
  pil = Image.fromarray(img)
  w, h = pil.size
  scale = 1.0 if rng is None else rng.uniform(1.0, 1.25)
  short = max(size, int(round(size * scale)))
  nw, nh = (short, max(short, round(h * short / w))) if w <= h else (
      max(short, round(w * short / h)), short)
  if rng is None:
    left, top = (nw - size) // 2, (nh - size) // 2
  else:
    left, top = rng.integers(0, nw - size + 1), rng.integers(0, nh - size + 1)
  if nw * nh <= 16 * size * size:
    pil = pil.resize((nw, nh), Image.BILINEAR).crop((left, top, left + size, top + size))
  else:
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    pil = pil.resize((size, size), Image.BILINEAR, box=box)
  out = np.asarray(pil, dtype=np.uint8)
  if rng is not None and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def image_from_file(path: str | bytes, data_cfg) -> np.ndarray:
  """A new product's photo (file path, or the file's bytes) -> uint8 (S, S, 3), exactly
  as a stored training image.

  Stored images were checked, converted (images.load_image), shrunk to
  `store_size` and JPEG re-encoded; doing the same here keeps prediction
  inputs identical in distribution. Raises images.ImageError.
  """
  img = images.load_image(path, images.Limits.from_config(data_cfg), data_cfg.store_size)
  img = Image.open(io.BytesIO(images.encode_jpeg(img))).convert("RGB")
  return square_image(np.asarray(img), data_cfg.image_size)


def row_batches(rows, data_cfg, batch_size: int) -> Iterator[dict]:
  """Batches (as `batches`) from catalogue rows read outside the dataset."""
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    yield _collate([{"image": image_from_file(r.image_path, data_cfg), "text": r.text,
                     "label": np.int32(0), "uniq_id": r.uniq_id, "mask": np.bool_(True)}
                    for r in chunk], batch_size)


def image_batch(images, batch_size: int) -> dict:
  """n <= B uint8 images (S, S, 3) -> {'image': (B, S, S, 3), 'mask': (B,)}, padded
  with zero images (mask False) so shapes stay static."""
  return _collate([{"image": np.asarray(x), "mask": np.bool_(True)} for x in images],
                  batch_size)


def _example(rec: dict, size: int, rng=None) -> dict:
  return {
      "image": square_image(rec["image"], size, rng),
      "text": _str(rec["text"]),
      "label": np.int32(rec["label"]),
      "uniq_id": _str(rec["uniq_id"]),
      "mask": np.bool_(True),
  }


def _str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _collate(examples: list, batch_size: int) -> dict:
  """Stacks examples; pads to `batch_size` with mask=False so shapes stay static."""
  n = len(examples)
  out = {}
  for k in examples[0]:
    vals = [e[k] for e in examples]
    if isinstance(vals[0], str):
      out[k] = np.array(vals + [""] * (batch_size - n), dtype=object)
    else:
      arr = np.stack(vals)
      if n < batch_size:
        arr = np.concatenate([arr, np.zeros((batch_size - n,) + arr.shape[1:], arr.dtype)])
      out[k] = arr
  return out


def dataset(source, image_size: int, *, shuffle_seed: int | None = None,
            augment_seed: int | None = None) -> grain.MapDataset:
  """Random-access dataset of examples {image, text, label, uniq_id, mask}.

  `shuffle_seed` None keeps the stored order; `augment_seed` None means no
  augmentation. Both are explicit so every epoch and replica is reproducible.
  """
  ds = grain.MapDataset.source(source)
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  if augment_seed is None:
    return ds.map(lambda r: _example(r, image_size))
  return ds.random_map(lambda r, rng: _example(r, image_size, rng), seed=augment_seed)


def batches(source, batch_size: int, image_size: int, *, shuffle_seed: int | None = None,
            augment_seed: int | None = None, drop_remainder: bool = False,
            threads: int = 0, workers: int = 0, prefetch: int = 2) -> Iterator[dict]:
  """Yields batches: image uint8 (B, S, S, 3), label int32 (B,), mask bool (B,),
  text and uniq_id object arrays (B,). The last batch is padded (mask False)
  unless `drop_remainder`.

  threads > 0: batches are made (read, decoded, augmented) by that many threads
  (PIL releases the GIL while decoding and resizing), up to max(prefetch,
  threads) batches ahead. workers > 0: batches are made in that many grain
  worker processes (mp_prefetch; batch i by worker i % workers), `prefetch`
  batches ahead each. Every setting yields the same batches in the same order
  (augmentation draws depend on the example index, not on the reader).
  """
  ds = dataset(source, image_size, shuffle_seed=shuffle_seed, augment_seed=augment_seed)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder,
                batch_fn=lambda ex: _collate(list(ex), batch_size))
  if not threads and not workers:
    for i in range(len(ds)):
      yield ds[i]
    return
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1),
                                            prefetch_buffer_size=max(prefetch, threads, 1)))
  if workers:
    if not flags.FLAGS.is_parsed():   # grain's workers read absl flags: outside an absl
      flags.FLAGS.mark_as_parsed()    # app (tests, notebooks) use their defaults
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=max(1, prefetch)))
  yield from it


def device_augment(images: jax.Array, key: jax.Array, size: int) -> jax.Array:
  """Train-time crop and flip on the accelerator (jit it; the host only decodes).

  images: uint8 (B, S', S', 3) with S' >= size, e.g. from `batches(...,
  image_size=round(1.14 * size))` without augment_seed; key: one PRNG key for
  the batch. Returns uint8 (B, size, size, 3): per image a random size x size
  crop, horizontally flipped with probability 1/2. (The host path, square_image,
  also draws a random scale; here the scale is fixed by S'.)
  """
  b, h, w, c = images.shape
  ky, kx, kf = jax.random.split(key, 3)
  top = jax.random.randint(ky, (b,), 0, h - size + 1)
  left = jax.random.randint(kx, (b,), 0, w - size + 1)
  flip = jax.random.bernoulli(kf, 0.5, (b,))

  def one(img, t, l, f):
    crop = jax.lax.dynamic_slice(img, (t, l, 0), (size, size, c))
    return jnp.where(f, crop[:, ::-1], crop)

  return jax.vmap(one)(images, top, left, flip)


def overlapped(items, dispatch, consume) -> int:
  """consume(item, dispatch(item)) for every item, each dispatch started before the
  previous item's consume: JAX returns from dispatch before the device has finished,
  so the host work of batch i (copying out, statistics) and the building of batch i+1
  overlap the device work of batch i+1. Returns the number of items."""
  pending, count = None, 0
  for item in items:
    result = dispatch(item)
    if pending is not None:
      consume(*pending)
    pending, count = (item, result), count + 1
  if pending is not None:
    consume(*pending)
  return count


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
  return n // batch_size if drop_remainder else -(-n // batch_size)


def columns(source) -> dict:
  """Label, uniq_id and text of every example, in stored order (no image decode)."""
  labels, ids, texts = [], [], []
  for i in range(len(source)):
    rec = source[i]
    labels.append(rec["label"])
    ids.append(_str(rec["uniq_id"]))
    texts.append(_str(rec["text"]))
  return {"label": np.asarray(labels, np.int32), "uniq_id": ids, "text": texts}
