"""Fine-tune input pipeline: images/s delivered vs images/s a train step consumes.

  python -m benchmarks.bench_input                   # 224 px, batch 128, ResNet50 step
  python -m benchmarks.bench_input --smoke           # tiny shapes (CPU check of the script)

The source holds real JPEGs (random photos-like noise, shorter side 256, quality
90: the stored catalogue's format) and decodes them on read, as the TFDS
array_record source does, so every setting pays decode + resize + crop + flip.
Settings: in this thread (the trainer's path before prefetch), `threads` decode
threads, grain worker processes (`workers`), and the host-decode-only path whose
crop and flip run on the device (pipeline.device_augment, timed separately).
The consumer is one jitted train step (benchmarks/bench_gpu.py's, K=1).
"""

from __future__ import annotations

import argparse
import io
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from m6jax.data import pipeline


class JpegSource:
  """Random-access source of {image (H, W, 3) uint8 decoded on read, text, label, uniq_id}."""

  def __init__(self, n: int, short_side: int = 256, seed: int = 0, distinct: int = 64):
    rng = np.random.default_rng(seed)
    self.jpegs = []
    for i in range(min(n, distinct)):   # distinct files, cycled: decode cost is what counts
      h, w = short_side, int(short_side * rng.uniform(1.0, 1.5))
      base = rng.integers(0, 255, (1, 1, 3))
      img = np.clip(base + rng.normal(0, 40, (h, w, 3)).cumsum(1) / 8, 0, 255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(img if i % 2 else img.transpose(1, 0, 2)).save(buf, "JPEG", quality=90)
      self.jpegs.append(buf.getvalue())
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    img = np.asarray(Image.open(io.BytesIO(self.jpegs[i % len(self.jpegs)])).convert("RGB"))
    return {"image": img, "text": b"a product", "label": i % 7, "uniq_id": str(i).encode()}


def delivered(source, batch: int, size: int, seconds: float, **kw) -> float:
  """Images/s from pipeline.batches (shuffled, augmented on the host unless
  augment=False), after the first batch (worker start-up) is out."""
  augment = kw.pop("augment", True)
  it = pipeline.batches(source, batch, size, shuffle_seed=0,
                        augment_seed=1 if augment else None, drop_remainder=True, **kw)
  next(it)
  n, t0 = 0, time.perf_counter()
  for b in it:
    n += len(b["label"])
    if time.perf_counter() - t0 > seconds:
      break
  return n / (time.perf_counter() - t0)


def device_augment_rate(batch: int, size: int, iters: int = 10) -> float:
  """Images/s of pipeline.device_augment alone (jitted, on the default device)."""
  pad = round(size * 1.14)
  x = jax.device_put(np.zeros((batch, pad, pad, 3), np.uint8))
  fn = jax.jit(pipeline.device_augment, static_argnums=2)
  jax.block_until_ready(fn(x, jax.random.key(0), size))
  t0 = time.perf_counter()
  for i in range(iters):
    out = fn(x, jax.random.key(i), size)
  jax.block_until_ready(out)
  return iters * batch / (time.perf_counter() - t0)


def settings(cpus: int) -> list[tuple[str, dict]]:
  """(label, batches kwargs) to measure on a machine with `cpus` cores."""
  threads = max(2, min(32, cpus))
  workers = max(1, min(16, cpus - 1))
  return [("in this thread", {}),
          (f"threads={threads}", {"threads": threads, "prefetch": 2 * threads}),
          (f"workers={workers}", {"workers": workers, "prefetch": 2}),
          (f"workers={workers}, crop+flip on device",
           {"workers": workers, "prefetch": 2, "augment": False, "pad": True})]


def measure(batch: int, size: int, seconds: float, n: int | None = None) -> list[dict]:
  """Delivered images/s for each setting of `settings`."""
  cpus = len(os.sched_getaffinity(0))
  source = JpegSource(n or max(64, 12 * batch))
  rows = []
  for label, kw in settings(cpus):
    kw = dict(kw)
    out_size = round(size * 1.14) if kw.pop("pad", False) else size
    rows.append({"setting": label, "img_s": delivered(source, batch, out_size, seconds, **kw)})
  return rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--seconds", type=float, default=10.0, help="per setting")
  ap.add_argument("--model", default="resnet50", help="consumer step (bench_gpu.build)")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check)")
  a = ap.parse_args()
  if a.smoke:
    a.batch, a.size, a.seconds, a.model, a.dtype = 8, 64, 2.0, "resnet50", "float32"
  from benchmarks import bench_gpu
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}), {len(os.sched_getaffinity(0))} CPUs, "
        f"batch {a.batch}, {a.size} px\n")
  step = bench_gpu.bench(a.model, 1, a.batch, a.size, jnp.dtype(a.dtype), 2 if a.smoke else 10)
  aug = device_augment_rate(a.batch, a.size)
  print(f"train step ({a.model}, K=1, {a.dtype}) consumes {step['img_s']:.0f} images/s; "
        f"device crop+flip alone {aug:.0f} images/s\n")
  print("| pipeline setting | images/s delivered | / step consumption |")
  print("|---|---|---|")
  for r in measure(a.batch, a.size, a.seconds):
    print(f"| {r['setting']} | {r['img_s']:.0f} | {r['img_s'] / step['img_s']:.2f}x |",
          flush=True)


if __name__ == "__main__":
  main()
