"""Fine-tuning throughput on an accelerator: images/s and model FLOPs utilisation.

  python benchmarks/bench_gpu.py                      # ResNet50 + EfficientNet-B0, bf16, K in 1,4
  python benchmarks/bench_gpu.py --small              # a CPU smoke run of the script itself

For each backbone and K (seed replicas vmapped in one program, sharing the
batch), one jitted train step (forward + backward + AdamW on every parameter)
is timed after warm-up. "loop" runs K solo replicas one after another (the
obvious alternative to vmapping) for comparison.

MFU = model FLOPs / step time / the chip's dense bf16 peak, with model FLOPs
= 3 x the published forward cost (2 FLOPs per multiply-add: ResNet50 4.09
GMAC, EfficientNet-B0 0.39 GMAC at 224 px, scaled by area). XLA's own
cost_analysis is not used: on GPU it does not count the cuDNN convolutions.
"""

import argparse
import sys
import time


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from m6jax.models import efficientnet, resnet  # noqa: E402

FWD_GMAC_224 = {"resnet50": 4.09, "efficientnetb0": 0.39}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "v5e": 197e12, "v4": 275e12}


def peak_flops(device) -> float | None:
  kind = device.device_kind
  for k, v in PEAK_BF16.items():
    if k.lower() in kind.lower():
      return v
  return None


def build(name, dtype, num_classes=7):
  if name == "resnet50":
    return resnet.ResNet50(num_classes=num_classes, dtype=dtype)
  return efficientnet.EfficientNet(variant="b0", num_classes=num_classes, dtype=dtype)


def make_step(model, tx):
  def loss_fn(params, stats, x, y, key):
    out, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                           mutable=["batch_stats"], rngs={"dropout": key})
    logits = out["logits"].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

  def step(params, stats, opt, x, y, key):
    (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, key)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), upd["batch_stats"], opt, loss

  return step


def train_flops_per_image(name: str, size: int) -> float:
  return 3 * 2 * FWD_GMAC_224[name] * 1e9 * (size / 224) ** 2


def bench(name, k, batch, size, dtype, iters, mode="vmap"):
  model = build(name, dtype)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
  y = jnp.asarray(np.arange(batch) % 7, jnp.int32)
  v = jax.jit(model.init)(jax.random.key(0), x[:1])
  tx = optax.adamw(1e-4)
  step = make_step(model, tx)
  reps = 1 if mode == "loop" else k
  params = jax.tree.map(lambda a: jnp.stack([a] * reps), v["params"])
  stats = jax.tree.map(lambda a: jnp.stack([a] * reps), v["batch_stats"])
  opt = jax.vmap(tx.init)(params)
  keys = jax.vmap(jax.random.key)(jnp.arange(reps))
  if mode == "map":   # one program, replicas in sequence (lax.map): dense convolutions
    def mapped(p, s, o, x, y, ks):
      return jax.lax.map(lambda a: step(a[0], a[1], a[2], x, y, a[3]), (p, s, o, ks))
    fn = jax.jit(mapped, donate_argnums=(0, 1, 2))
  else:
    fn = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, None, None, 0)), donate_argnums=(0, 1, 2))
  t0 = time.perf_counter()
  compiled = fn.lower(params, stats, opt, x, y, keys).compile()
  compile_s = time.perf_counter() - t0
  calls = k if mode == "loop" else 1   # a loop of K solo steps per "step"
  for _ in range(3):
    for _ in range(calls):
      params, stats, opt, loss = compiled(params, stats, opt, x, y, keys)
  jax.block_until_ready(loss)
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    for _ in range(calls):
      params, stats, opt, loss = compiled(params, stats, opt, x, y, keys)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t)
  dt = float(np.median(times))
  return {"model": name, "mode": mode, "K": k, "batch": batch, "compile_s": compile_s,
          "step_ms": dt * 1e3, "img_s": k * batch / dt, "dt": dt,
          "tflops": k * batch * train_flops_per_image(name, size) / dt / 1e12}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", default="resnet50,efficientnetb0")
  ap.add_argument("--ks", default="1,4")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--modes", default="vmap,map,loop", help="for K > 1")
  ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
  a = ap.parse_args()
  # The loop rows reuse the K=1 program: let the persistent cache find it.
  jax.config.update("jax_compilation_cache_dir", "/tmp/m6jax_xla_cache")
  if a.small:
    a.batch, a.size, a.iters, a.ks = 4, 64, 2, "1,2"
  dev = jax.devices()[0]
  peak = peak_flops(dev)
  print(f"$ python benchmarks/bench_gpu.py {' '.join(sys.argv[1:])}")
  print(f"device: {dev.device_kind} ({dev.platform}) x{jax.device_count()}, jax {jax.__version__}, "
        f"compute {a.dtype}, params/optimizer f32, batch {a.batch} per replica, {a.size}px\n")
  print("| model | K | mode | compile s | step ms | replica-images/s | TFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  for name in a.models.split(","):
    for k in map(int, a.ks.split(",")):
      for mode in ((a.modes.split(",")) if k > 1 else ("vmap",)):
        r = bench(name, k, a.batch, a.size, jnp.dtype(a.dtype), a.iters, mode)
        tf = r["tflops"]
        mfu = f"{tf * 1e12 / peak:.1%}" if peak else "n/a"
        print(f"| {name} | {k} | {mode} | {r['compile_s']:.1f} | {r['step_ms']:.1f} | "
              f"{r['img_s']:.0f} | {tf:.1f} | {mfu} |", flush=True)
        rows.append(r)
  by = {(r["model"], r["K"], r["mode"]): r for r in rows}
  for (m, k, mode), r in by.items():
    if mode != "loop" and k > 1 and (m, k, "loop") in by:
      print(f"{m} K={k}: {mode} runs at {r['img_s'] / by[(m, k, 'loop')]['img_s']:.2f}x "
            f"the speed of a loop of {k} solo steps")


if __name__ == "__main__":
  main()
