"""Text-tower throughput: Flax BertEncoder (jit, length buckets) vs torch BertModel.

Embeds the whole bundled catalogue (name + ' ' + description) with
all-MiniLM-L6-v2 and prints a markdown table of embeddings/s, with jit compile
time reported apart from the steady-state runs. Flax BertEncoder
(jit, fixed bucket shapes, the batches embed_texts builds) and torch
BertModel (no_grad) run on exactly the same padded batches, interleaved batch
by batch; with --torch-plain torch also runs on plain batches in catalogue
order padded to their longest text. Tokenization is timed once, apart.

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_text.py [--max-length 128]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import pathlib
import platform
import shlex
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


def _bucket_arrays(ids_list, batches, batch_size, pad_id):
  """Same fixed-shape arrays embed_texts builds: (idx, ids, mask) per batch."""
  out = []
  for idx, size in batches:
    ids = np.full((batch_size, size), pad_id, np.int32)
    mask = np.zeros((batch_size, size), np.int32)
    for r, i in enumerate(idx):
      ids[r, :len(ids_list[i])] = ids_list[i]
      mask[r, :len(ids_list[i])] = 1
    ids[len(idx):], mask[len(idx):] = ids[0], mask[0]
    out.append((idx, ids, mask))
  return out


def _plain_arrays(ids_list, batch_size, pad_id):
  """Catalogue order, each batch padded to its longest text."""
  out = []
  for s in range(0, len(ids_list), batch_size):
    idx = np.arange(s, min(s + batch_size, len(ids_list)))
    size = max(len(ids_list[i]) for i in idx)
    ids = np.full((len(idx), size), pad_id, np.int32)
    mask = np.zeros((len(idx), size), np.int32)
    for r, i in enumerate(idx):
      ids[r, :len(ids_list[i])] = ids_list[i]
      mask[r, :len(ids_list[i])] = 1
    out.append((idx, ids, mask))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--max-length", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--buckets", default="32,64,128,256",
                 help="bucket lengths (capped at --max-length)")
  p.add_argument("--repeats", type=int, default=1, help="timed passes (mean shown)")
  p.add_argument("--torch-attn", default="sdpa", choices=["sdpa", "eager"],
                 help="torch attention implementation (parity tests use eager)")
  p.add_argument("--torch-plain", action="store_true",
                 help="also time torch on plain batches (catalogue order, pad to longest)")
  p.add_argument("--csv", default=str(ROOT / "data" / "flipkart" / "products.csv"))
  p.add_argument("--spec", default="pypi:all-minilm-l6-v2")
  p.add_argument("--limit", type=int, default=0, help="only the first N texts (0: all)")
  args = p.parse_args(argv)

  cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT)] + sys.argv)
  print(f"$ HF_HUB_OFFLINE=1 {cmd}\n")

  import jax
  import torch
  from transformers import BertModel

  from m6jax import weights
  from m6jax.data import tokenize
  from m6jax.models import bert

  load_start = os.getloadavg()[0]
  texts = _texts(args.csv)
  if args.limit:
    texts = texts[:args.limit]
  n, bs, L = len(texts), args.batch_size, args.max_length
  folder = weights.resolve(args.spec)
  tok = tokenize.load_tokenizer(folder)
  t = time.perf_counter()
  ids_list = tok(texts, truncation=True, max_length=L, padding=False)["input_ids"]
  t_tok = time.perf_counter() - t
  lengths = np.array([len(x) for x in ids_list])
  pad_id = tok.pad_token_id or 0
  sizes = tokenize._bucket_sizes_for(L, [int(b) for b in args.buckets.split(",")])
  batches = tokenize.length_buckets(lengths, bs, sizes)
  bucketed = _bucket_arrays(ids_list, batches, bs, pad_id)
  plain = _plain_arrays(ids_list, bs, pad_id)
  real = int(lengths.sum())
  fill_b = real / sum(ids.size for _, ids, _ in bucketed)
  fill_p = real / sum(ids.size for _, ids, _ in plain)
  shapes = sorted({ids.shape for _, ids, _ in bucketed})

  # --- Flax ---
  cfg, params = bert.load_pretrained(args.spec)
  fn = bert.make_embed_fn(bert.BertEncoder(cfg), params)
  t = time.perf_counter()
  for shape in shapes:  # compile each bucket shape once (plus one execution)
    jax.block_until_ready(fn(np.zeros(shape, np.int32), np.ones(shape, np.int32)))
  t_compile = time.perf_counter() - t
  one_batch = {}
  for shape in shapes:  # a compiled execution per shape, to subtract
    z = np.zeros(shape, np.int32)
    t = time.perf_counter()
    jax.block_until_ready(fn(z, np.ones(shape, np.int32)))
    one_batch[shape] = time.perf_counter() - t
  t_compile -= sum(one_batch.values())

  # --- torch ---
  torch.set_num_threads(os.cpu_count() or 1)
  ref = BertModel.from_pretrained(str(folder), attn_implementation=args.torch_attn,
                                  add_pooling_layer=False).eval()

  def torch_batch(ids, mask):
    with torch.no_grad():
      m = torch.from_numpy(mask).long()
      h = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=m).last_hidden_state
      mf = m[..., None].float()
      # sentence-transformers Pooling(mean) + Normalize
      return torch.nn.functional.normalize((h * mf).sum(1) / mf.sum(1).clamp(min=1e-9),
                                           dim=1).numpy()

  torch_batch(*bucketed[0][1:])  # warm-up (allocator, thread pool)

  # Interleave the two frameworks batch by batch: on a shared machine the load
  # from other jobs then falls on both alike, so the ratio stays meaningful.
  t_flax = t_torch = 0.0
  f_emb = np.zeros((n, cfg.hidden_size), np.float32)
  tb_emb = np.zeros_like(f_emb)
  for _ in range(args.repeats):
    for idx, ids, mask in bucketed:
      t0 = time.perf_counter()
      out = np.asarray(fn(ids, mask))  # includes the device -> host copy
      t1 = time.perf_counter()
      ref_out = torch_batch(ids, mask)
      t2 = time.perf_counter()
      t_flax, t_torch = t_flax + t1 - t0, t_torch + t2 - t1
      f_emb[idx], tb_emb[idx] = out[:len(idx)], ref_out[:len(idx)]
  t_flax, t_torch = t_flax / args.repeats, t_torch / args.repeats
  d_b = float(np.abs(f_emb - tb_emb).max())
  if args.torch_plain:
    t = time.perf_counter()
    tp_emb = np.zeros_like(f_emb)
    for _ in range(args.repeats):
      for idx, ids, mask in plain:
        tp_emb[idx] = torch_batch(ids, mask)
    t_plain = (time.perf_counter() - t) / args.repeats

  print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
  print(f"machine: {os.cpu_count()} CPU cores ({_cpu_name()}), {platform.platform()}")
  print(f"1-min load average: {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end "
        f"(other processes on the machine slow both frameworks)")
  print(f"versions: jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
        f"python {platform.python_version()}")
  print(f"data: {n} texts (name + ' ' + description), max_length {L}, batch {bs}, "
        f"{int((lengths >= L).sum())} texts truncated; tokenization {t_tok:.2f} s "
        f"({n / t_tok:.0f} texts/s, shared by both)")
  print(f"buckets: {sizes} -> {len(bucketed)} batches, shapes {shapes}; real-token fill "
        f"{fill_b:.0%} bucketed vs {fill_p:.0%} plain (catalogue order, pad to longest)")
  print(f"Flax jit compile: {t_compile:.2f} s for {len(shapes)} shapes "
        f"(first call per shape minus one compiled execution; not in the rates below)")
  print(f"timing: {args.repeats} pass(es), Flax and torch interleaved batch by batch; "
        f"XLA and torch ({torch.get_num_threads()} threads) both use all cores\n")
  rows = [("Flax BertEncoder, jit, bucketed (fixed shapes)", t_flax),
          (f"torch BertModel ({args.torch_attn}), no_grad, same batches", t_torch)]
  if args.torch_plain:
    rows.append((f"torch BertModel ({args.torch_attn}), no_grad, plain batches "
                 f"(not interleaved)", t_plain))
  print("| run | s / pass | embeddings/s | throughput vs Flax |")
  print("|---|---|---|---|")
  for name, sec in rows:
    print(f"| {name} | {sec:.2f} | {n / sec:.1f} | {t_flax / sec:.2f}x |")
  print(f"\nFlax / torch throughput ratio: {t_torch / t_flax:.2f}x (same batches)"
        + (f", {t_plain / t_flax:.2f}x vs torch plain batches" if args.torch_plain else ""))
  print(f"max |Δ| of normalised embeddings, Flax vs torch (all {n} texts): {d_b:.1e}"
        + (f" (plain batches: {float(np.abs(f_emb - tp_emb).max()):.1e})"
           if args.torch_plain else ""))

if __name__ == "__main__":
  main()
