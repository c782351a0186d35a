"""Flax (jit) vs Keras 3 (JAX backend, predict_on_batch) forward speed.

Per backbone (VGG16, ResNet50, MobileNetV2; include_top=False, random weights
copied Keras -> Flax so both compute the same function): compile time and
images/s at --size (224) batch --batch (8), plus the max |diff| of the outputs.

  KERAS_BACKEND=jax python benchmarks/bench_backbones_keras.py [--models resnet50]
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported

import argparse
import shlex
import sys
import tempfile
import time

import jax
import numpy as np


def _families():
  import keras
  from m6jax.models import mobilenet, resnet, vgg
  return {
      "vgg16": (vgg, vgg.VGG16, keras.applications.VGG16),
      "resnet50": (resnet, resnet.ResNet50, keras.applications.ResNet50),
      "mobilenetv2": (mobilenet, mobilenet.MobileNetV2, keras.applications.MobileNetV2),
  }


def _time(fn, iters):
  """Seconds per call of fn() (already warm), median of `iters` runs."""
  ts = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def bench(name, size, batch, iters, tmp):
  fam, flax_cls, keras_fn = _families()[name]
  kmodel = keras_fn(weights=None, include_top=False, input_shape=(size, size, 3))
  path = os.path.join(tmp, f"{name}.weights.h5")
  kmodel.save_weights(path)
  variables = fam.load_keras(path)
  x = np.asarray(fam.preprocess(
      np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)))

  model = flax_cls()
  t = time.perf_counter()
  fwd = jax.jit(lambda v, x: model.apply(v, x)["feature_map"]).lower(variables, x).compile()
  flax_compile = time.perf_counter() - t
  y_flax = jax.block_until_ready(fwd(variables, x))
  flax_s = _time(lambda: fwd(variables, x), iters)

  t = time.perf_counter()
  y_keras = kmodel.predict_on_batch(x)  # first call traces + compiles
  keras_first = time.perf_counter() - t
  keras_s = _time(lambda: kmodel.predict_on_batch(x), iters)
  keras_compile = max(keras_first - keras_s, 0.0)

  diff = float(np.abs(np.asarray(y_flax) - np.asarray(y_keras)).max())
  return dict(model=name, flax_compile=flax_compile, keras_compile=keras_compile,
              flax_ips=batch / flax_s, keras_ips=batch / keras_s, diff=diff)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=["vgg16", "resnet50", "mobilenetv2"])
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--iters", type=int, default=3, help="timed calls per framework")
  args = ap.parse_args(argv)
  print("$ " + " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} "
        f"({os.cpu_count()} CPUs); input {args.batch}x{args.size}x{args.size}x3 f32")
  hdr = (f"{'model':<12} {'flax compile s':>14} {'keras compile s':>15} "
         f"{'flax img/s':>10} {'keras img/s':>11} {'flax/keras':>10} {'max|d|':>9}")
  print(hdr)
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models:
      r = bench(name, args.size, args.batch, args.iters, tmp)
      print(f"{r['model']:<12} {r['flax_compile']:>14.2f} {r['keras_compile']:>15.2f} "
            f"{r['flax_ips']:>10.1f} {r['keras_ips']:>11.1f} "
            f"{r['flax_ips'] / r['keras_ips']:>10.2f} {r['diff']:>9.1e}", flush=True)


if __name__ == "__main__":
  main()
