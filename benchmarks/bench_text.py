"""Text-tower throughput: Flax BertEncoder vs torch BertModel, all-MiniLM-L6-v2 on CPU.

Embeds the whole bundled catalogue (name + ' ' + description) four ways and
prints a markdown table of embeddings/s:

- Flax, packed rows: exactly the batches m6jax embeds with
  (tokenize.packed_batches: several texts per row, one shape);
- Flax, length buckets: batch_size texts per row-batch, padded to 32/64/128
  (what m6jax did before packing);
- torch BertModel on those same bucketed batches;
- torch BertModel the sentence-transformers way: texts sorted by length,
  each batch padded to its longest text (torch needs no fixed shapes).

Each pass embeds all texts; passes of the four run in rotating order,
--repeats times, and the median pass is reported, so load from other
processes falls on all alike. jit compile time is reported apart.
Tokenization is timed once, apart (shared by all). A roofline line gives
the float32 matmul rate of each framework on this machine and the least
time any exact float32 method needs for the dense layers of the real tokens.

  HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_text.py
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cpu_name() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "?"


def _texts(csv_path) -> list[str]:
  with open(csv_path, newline="", encoding="utf-8") as f:
    return [r["product_name"] + " " + r["description"] for r in csv.DictReader(f)]


def _padded(ids_list, groups, pad_id):
  """[(indices, padded length)] -> [(indices, ids (B, L), mask (B, L))]."""
  out = []
  for idx, size in groups:
    ids = np.full((len(idx), size), pad_id, np.int32)
    mask = np.zeros((len(idx), size), np.int32)
    for r, i in enumerate(idx):
      ids[r, :len(ids_list[i])] = ids_list[i]
      mask[r, :len(ids_list[i])] = 1
    out.append((np.asarray(idx), ids, mask))
  return out


def bucketed_batches(ids_list, batch_size, sizes, pad_id):
  """Each text to the smallest bucket length that holds it, batch_size texts
  per batch in length order; short batches are filled with copies of their
  first row, so only len(sizes) shapes occur (jit compiles once per shape)."""
  lengths = np.array([len(x) for x in ids_list])
  which = np.minimum(np.searchsorted(sizes, lengths, side="left"), len(sizes) - 1)
  groups = []
  for b, size in enumerate(sizes):
    idx = np.flatnonzero(which == b)
    idx = idx[np.argsort(lengths[idx], kind="stable")]
    groups += [(idx[s:s + batch_size], size) for s in range(0, len(idx), batch_size)]
  out = []
  for idx, ids, mask in _padded(ids_list, groups, pad_id):
    fill = batch_size - len(idx)
    out.append((idx, np.concatenate([ids, np.repeat(ids[:1], fill, 0)]),
                np.concatenate([mask, np.repeat(mask[:1], fill, 0)])))
  return out


def sorted_batches(ids_list, batch_size, pad_id):
  """sentence-transformers' encode(): longest texts first, each batch padded to its longest."""
  lengths = np.array([len(x) for x in ids_list])
  order = np.argsort(-lengths, kind="stable")
  groups = [(order[s:s + batch_size], int(lengths[order[s]]))
            for s in range(0, len(order), batch_size)]
  return _padded(ids_list, groups, pad_id)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--max-length", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--segments-per-row", type=int, default=16)
  p.add_argument("--buckets", default="32,64,128", help="bucket lengths for the bucketed runs")
  p.add_argument("--repeats", type=int, default=3, help="timed passes per method (median shown)")
  p.add_argument("--torch-attn", default="sdpa", choices=["sdpa", "eager"],
                 help="torch attention implementation (parity tests use eager)")
  p.add_argument("--csv", default=str(ROOT / "data" / "flipkart" / "products.csv"))
  p.add_argument("--spec", default="pypi:all-minilm-l6-v2")
  p.add_argument("--limit", type=int, default=0, help="only the first N texts (0: all)")
  args = p.parse_args(argv)

  cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT)] + sys.argv)
  print(f"$ HF_HUB_OFFLINE=1 PYTHONPATH=. {cmd}\n")

  import jax
  import jax.numpy as jnp
  import torch
  from transformers import BertModel

  from m6jax.models.weights import sources as weights_lib
  from m6jax.data import tokenize
  from m6jax.models import bert

  load_start = os.getloadavg()[0]
  texts = _texts(args.csv)
  if args.limit:
    texts = texts[:args.limit]
  n, bs, L = len(texts), args.batch_size, args.max_length
  folder = weights_lib.resolve(args.spec)
  tok = tokenize.load_tokenizer(folder)
  t = time.perf_counter()
  ids_list = tok(texts, truncation=True, max_length=L, padding=False)["input_ids"]
  t_tok = time.perf_counter() - t
  lengths = np.array([len(x) for x in ids_list])
  pad_id = tok.pad_token_id or 0
  sizes = sorted({min(int(b), L) for b in args.buckets.split(",")} | {L})

  packed = tokenize.packed_batches(ids_list, bs, args.segments_per_row, pad_id, row_length=L)
  bucketed = bucketed_batches(ids_list, bs, sizes, pad_id)
  by_length = sorted_batches(ids_list, bs, pad_id)
  slots = {"packed": sum(b[1].size for b in packed), "bucketed": sum(b[1].size for b in bucketed),
           "sorted": sum(b[1].size for b in by_length)}

  cfg, params = bert.load_pretrained(args.spec)
  model = bert.BertEncoder(cfg)
  packed_fn = bert.make_embed_fn(model, params, args.segments_per_row)
  padded_fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m)["embedding"])

  torch.set_num_threads(os.cpu_count() or 1)
  ref = BertModel.from_pretrained(str(folder), attn_implementation=args.torch_attn,
                                  add_pooling_layer=False).eval()

  def torch_embed(ids, mask):
    with torch.no_grad():
      m = torch.from_numpy(mask).long()
      h = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=m).last_hidden_state
      mf = m[..., None].float()
      # sentence-transformers Pooling(mean) + Normalize
      return torch.nn.functional.normalize((h * mf).sum(1) / mf.sum(1).clamp(min=1e-9),
                                           dim=1).numpy()

  def run_packed():
    out, pending = np.zeros((n, cfg.hidden_size), np.float32), []
    for index, *arrays in packed:
      pending.append((index, packed_fn(*arrays)))
    for index, emb in pending:
      out[index[index >= 0]] = np.asarray(emb)[index >= 0]
    return out

  def run_padded(embed, batches):
    out = np.zeros((n, cfg.hidden_size), np.float32)
    for idx, ids, mask in batches:
      out[idx] = np.asarray(embed(ids, mask))[:len(idx)]
    return out

  methods = {
      "flax_packed": run_packed,
      "flax_bucketed": lambda: run_padded(lambda i, m: padded_fn(params, i, m), bucketed),
      "torch_bucketed": lambda: run_padded(torch_embed, bucketed),
      "torch_sorted": lambda: run_padded(torch_embed, by_length),
  }
  # Compile (Flax) and warm up (torch allocator, thread pools): one call per shape.
  compile_s = {}
  for name, batches in (("flax_packed", packed[:1]), ("flax_bucketed", bucketed)):
    t = time.perf_counter()
    for shape in sorted({b[1].shape for b in batches}):
      z = np.zeros(shape, np.int32)
      if name == "flax_packed":
        jax.block_until_ready(packed_fn(z, z + 1, z))
      else:
        jax.block_until_ready(padded_fn(params, z, z + 1))
    compile_s[name] = time.perf_counter() - t
  torch_embed(*bucketed[-1][1:])

  times = {m: [] for m in methods}
  outputs = {}
  names = list(methods)
  for rep in range(args.repeats):
    for k in range(len(names)):
      name = names[(rep + k) % len(names)]
      t = time.perf_counter()
      outputs[name] = methods[name]()
      times[name].append(time.perf_counter() - t)
  sec = {m: statistics.median(v) for m, v in times.items()}

  # Roofline: float32 (4096, H) @ (H, I) matmul rate of each framework here.
  H, I, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
  a = np.random.default_rng(0).standard_normal((4096, H), np.float32)
  w = np.random.default_rng(1).standard_normal((H, I), np.float32)
  mm = jax.jit(jnp.matmul)
  ja, jw = jnp.asarray(a), jnp.asarray(w)
  jax.block_until_ready(mm(ja, jw))
  t = time.perf_counter()
  for _ in range(20):
    r = mm(ja, jw)
  jax.block_until_ready(r)
  xla_rate = 20 * 2 * 4096 * H * I / (time.perf_counter() - t)
  ta, tw = torch.from_numpy(a), torch.from_numpy(w)
  with torch.no_grad():
    torch.mm(ta, tw)
    t = time.perf_counter()
    for _ in range(20):
      torch.mm(ta, tw)
  torch_rate = 20 * 2 * 4096 * H * I / (time.perf_counter() - t)
  dense_per_token = 2 * layers * (4 * H * H + 2 * H * I)   # q, k, v, out; two FFN matmuls
  real = int(lengths.sum())
  floor = real * dense_per_token / xla_rate

  print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
  print(f"machine: {os.cpu_count()} CPU cores ({_cpu_name()}), {platform.platform()}")
  print(f"1-min load average: {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end "
        f"(other processes on the machine slow every method)")
  print(f"versions: jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
        f"python {platform.python_version()}")
  print(f"data: {n} texts (name + ' ' + description), max_length {L}, batch {bs} rows, "
        f"{int((lengths >= L).sum())} texts truncated, {real} real tokens; tokenization "
        f"{t_tok:.2f} s ({n / t_tok:.0f} texts/s, shared by all)")
  print(f"batches: packed {len(packed)} x {packed[0][1].shape} (<= {args.segments_per_row} texts "
        f"per row); bucketed {len(bucketed)} in shapes {sorted({b[1].shape for b in bucketed})}; "
        f"sorted {len(by_length)}")
  print("real-token fill: " + ", ".join(f"{k} {real / v:.0%}" for k, v in slots.items()))
  print(f"Flax jit compile (first call per shape, not in the rates): packed "
        f"{compile_s['flax_packed']:.1f} s for 1 shape, bucketed "
        f"{compile_s['flax_bucketed']:.1f} s for {len({b[1].shape for b in bucketed})} shapes")
  print(f"timing: median of {args.repeats} passes per method, methods rotated; XLA and torch "
        f"({torch.get_num_threads()} threads) both use all cores")
  print(f"roofline: float32 (4096, {H}) @ ({H}, {I}) matmul at {xla_rate / 1e9:.0f} GFLOP/s "
        f"in XLA, {torch_rate / 1e9:.0f} in torch; the dense layers of the {real} real tokens "
        f"({real * dense_per_token / 1e12:.2f} TFLOP) need >= {floor:.2f} s at XLA's rate\n")
  print("| run | s / pass | embeddings/s | Flax packed vs this |")
  print("|---|---|---|---|")
  rows = [("flax_packed", "Flax BertEncoder, packed rows (m6jax)"),
          ("flax_bucketed", "Flax BertEncoder, length buckets"),
          ("torch_bucketed", f"torch BertModel ({args.torch_attn}), same bucketed batches"),
          ("torch_sorted", f"torch BertModel ({args.torch_attn}), sorted by length "
                           f"(sentence-transformers)")]
  for key, label in rows:
    print(f"| {label} | {sec[key]:.2f} | {n / sec[key]:.1f} | "
          f"{sec[key] / sec['flax_packed']:.2f}x |")
  ref_emb = outputs["torch_sorted"]
  print("\nmax |Δ| of normalised embeddings vs torch (sorted): " + ", ".join(
      f"{k} {float(np.abs(v - ref_emb).max()):.1e}" for k, v in outputs.items()
      if k != "torch_sorted"))
  print("all passes (s): " + "; ".join(
      f"{k} " + " ".join(f"{x:.2f}" for x in v) for k, v in times.items()))


if __name__ == "__main__":
  main()
