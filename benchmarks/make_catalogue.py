"""A catalogue K x the bundled one, every product distinct, for scale benchmarks.

Copy c (0..K-1) of bundled product i keeps its label and gets
  uniq_id      the bundled id with the copy number appended (`<id>c0007`);
  name, text   a copy word appended (" copy seven"), so no text hash repeats;
  photo        the bundled photo with copy mark c drawn in, re-encoded as JPEG:
               a band along the top edge, 16 segments, segment b brightened by
               MARK levels where bit b of c + 1 is set (so copy 0 is marked too).
               The band is 1/64 of the height and 1/16 of the width, so it
               survives the dataset build's shrink to `data.store_size` (256) and
               the stored JPEGs, hence the feature cache's content keys, differ
               between copies.
Copies of one product stay twins (same dHash, near-identical text): the split
keeps them in one split (m6jax.data.twins), as a real catalogue's variants.

One photo is held at a time; rows are written as they are made.

  PYTHONPATH=. .venv/bin/python benchmarks/make_catalogue.py --times 10 --out /tmp/cat10
  python -m m6jax.main --config configs/default.py --config.data.manual_dir=/tmp/cat10 ...
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import numpy as np
from PIL import Image

from m6jax import defaults

MARK = 48          # brightness added to a set bit's segment (of 255)
BITS = 16          # copies up to 2^16 - 1
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
          "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def copy_word(c: int) -> str:
  """0 -> 'zero', 42 -> 'forty two', 123 -> 'one hundred twenty three' (c < 10^6)."""
  if c < 20:
    return _WORDS[c]
  if c < 100:
    return _TENS[c // 10 - 2] + ("" if c % 10 == 0 else " " + _WORDS[c % 10])
  if c < 1000:
    rest = c % 100
    return _WORDS[c // 100] + " hundred" + ("" if rest == 0 else " " + copy_word(rest))
  rest = c % 1000
  return copy_word(c // 1000) + " thousand" + ("" if rest == 0 else " " + copy_word(rest))


def marked(img: Image.Image, c: int) -> Image.Image:
  """The RGB photo with copy c's mark (module docstring) drawn along its top edge."""
  if not 0 <= c < 2**BITS - 1:
    raise ValueError(f"copy number {c} outside 0..{2**BITS - 2}")
  arr = np.asarray(img.convert("RGB"), np.int16).copy()
  h, w = arr.shape[:2]
  band = max(1, h // 64)
  code = c + 1
  for b in range(BITS):
    if code >> b & 1:
      lo, hi = b * w // BITS, max(b * w // BITS + 1, (b + 1) * w // BITS)
      seg = arr[:band, lo:hi]
      # Brighten, or darken where brightening would clip (a white background).
      arr[:band, lo:hi] = np.where(seg < 255 - MARK, seg + MARK, seg - MARK)
  return Image.fromarray(arr.astype(np.uint8))


def generate(src_dir: str, out_dir: str, times: int, csv_name: str = "products.csv",
             images: str = "images", fraction: float = 1.0, progress=print) -> int:
  """Writes out_dir/products.csv + out_dir/images/ with `times` copies of each of the first
  `fraction` of the bundled rows (every column kept; the id, name, description, image
  changed). Returns the number of rows written."""
  cols = defaults.base_config().data.columns
  with open(os.path.join(src_dir, csv_name), newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    fields, rows = reader.fieldnames, list(reader)
  rows = rows[: max(1, round(len(rows) * fraction))]
  os.makedirs(os.path.join(out_dir, images), exist_ok=True)
  n, total, t0 = 0, times * len(rows), time.time()
  tmp = os.path.join(out_dir, csv_name + ".tmp")
  with open(tmp, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for c in range(times):
      word = copy_word(c)
      for row in rows:
        uid = f"{row[cols.id]}c{c:04d}"
        with Image.open(os.path.join(src_dir, images, row[cols.image])) as img:
          marked(img, c).save(os.path.join(out_dir, images, uid + ".jpg"), "JPEG", quality=90)
        w.writerow(dict(row, **{cols.id: uid, cols.image: uid + ".jpg",
                                cols.name: f"{row[cols.name]} copy {word}",
                                cols.description: f"{row[cols.description]} Copy {word}."}))
        n += 1
        if n % 500 == 0 or n == total:
          progress(f"{n}/{total} products ({n / (time.time() - t0):.0f}/s)")
  os.replace(tmp, os.path.join(out_dir, csv_name))   # a complete CSV, or none
  return n


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--times", type=int, required=True, help="copies K of the catalogue")
  p.add_argument("--out", required=True, help="output folder (products.csv + images/)")
  p.add_argument("--src", default=defaults.base_config().data.manual_dir)
  p.add_argument("--fraction", type=float, default=1.0,
                 help="copy only the first fraction of the bundled rows (smoke runs)")
  args = p.parse_args(argv)
  if args.times < 1 or not 0 < args.fraction <= 1:
    p.error("--times must be >= 1 and --fraction in (0, 1]")
  n = generate(args.src, args.out, args.times, fraction=args.fraction,
               progress=lambda s: print(s, file=sys.stderr, flush=True))
  print(f"wrote {n} products to {args.out}")


if __name__ == "__main__":
  main()
