"""Fine-tuning throughput on an accelerator: images/s and model FLOPs utilisation.

  python benchmarks/bench_gpu.py                      # ResNet50 + EfficientNet-B0, bf16, K in 1,4
  python benchmarks/bench_gpu.py --small              # a CPU smoke run of the script itself
  python benchmarks/bench_gpu.py --against-torch      # issue 17: one run, one markdown table
  python benchmarks/bench_gpu.py --against-torch --smoke   # the same on CPU, tiny shapes

--against-torch times, in one process on one device: the Flax ResNet50 train
step (bf16 compute, f32 params + AdamW, donated state) at batch B and 2B; the
same step in PyTorch (timm's resnet50 when installed, else the torchvision-style
ResNet50 below; bf16 autocast, channels_last, AdamW) eager and under
torch.compile; K=4 replicas with `lax.map` vs a loop of 4 solo steps; and the
fine-tune input pipeline (benchmarks/bench_input.py) against the step's rate.
`--xla-flags "..."` adds a Flax row run in a subprocess with those XLA_FLAGS.

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
import json
import os
import subprocess
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


# --- PyTorch reference ------------------------------------------------------------------


def torch_resnet50(num_classes: int):
  """(model, name): timm's resnet50 when importable, else the same architecture
  (torchvision/timm ResNet50 v1.5: stride on the 3x3 conv, no conv bias) here."""
  try:
    import timm
    return timm.create_model("resnet50", num_classes=num_classes), "timm resnet50"
  except ImportError:
    pass
  from torch import nn

  class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
      super().__init__()
      cout = width * 4
      self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
      self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
      self.relu = nn.ReLU(inplace=True)
      self.down = None if stride == 1 and cin == cout else nn.Sequential(
          nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      y = self.relu(self.bn1(self.conv1(x)))
      y = self.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return self.relu(y + (x if self.down is None else self.down(x)))

  layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1)]
  cin = 64
  for i, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
    for b in range(blocks):
      layers.append(Bottleneck(cin, width, 2 if b == 0 and i > 0 else 1))
      cin = width * 4
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
  return nn.Sequential(*layers), "ResNet50 v1.5 in plain torch (timm not installed)"


def bench_torch(batch, size, iters, compiled: bool, backend: str = "inductor"):
  """The PyTorch train step's images/s (None when torch is missing)."""
  try:
    import torch
  except ImportError:
    return None
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  model, name = torch_resnet50(7)
  model = model.to(dev).to(memory_format=torch.channels_last).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
  y = torch.arange(batch, device=dev) % 7
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16):
      loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  fn = torch.compile(step, backend=backend) if compiled else step
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  t0 = time.perf_counter()
  for _ in range(3):
    fn()
  sync()
  warm_s = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - t)
  dt = float(np.median(times))
  return {"name": name, "torch": torch.__version__, "device": dev, "warm_s": warm_s,
          "step_ms": dt * 1e3, "img_s": batch / dt}


def flax_with_flags(flags: str, batch, size, dtype, iters):
  """The K=1 Flax row in a subprocess started with XLA_FLAGS=flags."""
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
  cmd = [sys.executable, os.path.abspath(__file__), "--one-row", "--batch", str(batch),
         "--size", str(size), "--dtype", dtype, "--iters", str(iters)]
  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  if r.returncode:
    return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}
  return json.loads(r.stdout.strip().splitlines()[-1])


def against_torch(a):
  """Issue 17's comparison: one markdown table and the ratios behind its targets."""
  dtype = jnp.dtype(a.dtype)
  b, size, it = a.batch, a.size, a.iters
  rows = []   # (what, compile/warm-up s, step ms, images/s)

  def add(what, r):
    rows.append((what, r.get("compile_s", r.get("warm_s", float("nan"))), r["step_ms"],
                 r["img_s"]))
    print(f"  {what}: {r['img_s']:.0f} images/s", file=sys.stderr, flush=True)

  solo = bench("resnet50", 1, b, size, dtype, it)
  add(f"Flax ResNet50, batch {b}", solo)
  add(f"Flax ResNet50, batch {2 * b}", bench("resnet50", 1, 2 * b, size, dtype, it))
  if a.xla_flags:
    r = flax_with_flags(a.xla_flags, b, size, a.dtype, it)
    if "error" in r:
      print(f"  XLA_FLAGS={a.xla_flags!r} failed: {r['error']}", file=sys.stderr)
    else:
      add(f"Flax ResNet50, batch {b}, XLA_FLAGS={a.xla_flags}", r)
  eager = bench_torch(b, size, it, compiled=False)
  compiled = bench_torch(b, size, it, compiled=True, backend=a.torch_backend)
  if eager is not None:
    add(f"PyTorch ({eager['name']}, torch {eager['torch']}) eager, batch {b}", eager)
    add(f"PyTorch torch.compile(backend={a.torch_backend!r}), batch {b}", compiled)
  k = a.k
  mapped = bench("resnet50", k, b, size, dtype, it, "map")
  loop = bench("resnet50", k, b, size, dtype, it, "loop")
  add(f"Flax ResNet50, K={k} replicas, lax.map (replica-images/s)", mapped)
  add(f"Flax ResNet50, K={k} replicas, loop of solo steps", loop)
  try:   # the pipeline needs grain + PIL, which an accelerator image may lack
    from benchmarks import bench_input
    pipe = bench_input.measure(b, size, a.pipeline_seconds)
  except ImportError as e:
    print(f"  input pipeline skipped: {e}", file=sys.stderr)
    pipe = []

  dev = jax.devices()[0]
  print(f"$ python benchmarks/bench_gpu.py {' '.join(sys.argv[1:])}")
  print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; compute {a.dtype}, "
        f"f32 params + AdamW; {size} px; {len(os.sched_getaffinity(0))} CPUs\n")
  print("| train step | compile/warm-up s | step ms | images/s |")
  print("|---|---|---|---|")
  for what, c, ms, ips in rows:
    print(f"| {what} | {c:.1f} | {ms:.1f} | {ips:.0f} |" if ips >= 100 else
          f"| {what} | {c:.1f} | {ms:.1f} | {ips:.2f} |")
  print("\n| input pipeline (batch %d, decode+crop+flip) | images/s | / Flax step |" % b)
  print("|---|---|---|")
  for r in pipe:
    print(f"| {r['setting']} | {r['img_s']:.0f} | {r['img_s'] / solo['img_s']:.2f}x |")
  print("\n| target (issue 17) | ratio |")
  print("|---|---|")
  if compiled is not None:
    best = max(solo["img_s"], rows[1][3])
    print(f"| Flax ResNet50 / torch.compile, same batch {b} (>= 1.0) | "
          f"{solo['img_s'] / compiled['img_s']:.2f} |")
    print(f"| best Flax batch / torch.compile batch {b} | {best / compiled['img_s']:.2f} |")
  print(f"| K={k} lax.map / loop of solo steps (>= 0.9) | {mapped['img_s'] / loop['img_s']:.2f} |")
  if pipe:
    print(f"| best input pipeline / Flax step (>= 1.5) | "
          f"{max(r['img_s'] for r in pipe) / solo['img_s']:.2f} |")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", default="resnet50,efficientnetb0")
  ap.add_argument("--ks", default="1,4")
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--modes", default="vmap,map,loop", help="for K > 1")
  ap.add_argument("--small", "--smoke", action="store_true",
                  help="tiny shapes (CPU smoke test)")
  ap.add_argument("--against-torch", action="store_true", help="issue 17's comparison table")
  ap.add_argument("--k", type=int, default=4, help="--against-torch: seed replicas")
  ap.add_argument("--torch-backend", default="inductor", help="torch.compile backend")
  ap.add_argument("--xla-flags", default="", help="--against-torch: one more Flax row")
  ap.add_argument("--pipeline-seconds", type=float, default=8.0)
  ap.add_argument("--one-row", action="store_true", help=argparse.SUPPRESS)
  a = ap.parse_args()
  # The loop rows reuse the K=1 program: let the persistent cache find it.
  jax.config.update("jax_compilation_cache_dir", "/tmp/m6jax_xla_cache")
  if a.small:
    a.batch, a.size, a.iters, a.ks, a.k, a.pipeline_seconds = 4, 64, 2, "1,2", 2, 2.0
    a.torch_backend = "aot_eager" if a.torch_backend == "inductor" else a.torch_backend
  if a.one_row:
    r = bench("resnet50", 1, a.batch, a.size, jnp.dtype(a.dtype), a.iters)
    print(json.dumps({k: r[k] for k in ("compile_s", "step_ms", "img_s")}))
    return
  if a.against_torch:
    against_torch(a)
    return
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
