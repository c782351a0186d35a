"""Read a product catalogue (CSV + image folder) into validated rows.

Every row that cannot be used is named in a :class:`DataReport` with its CSV
line, `uniq_id`, file and reason. Nothing is dropped silently and no image is
ever substituted.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import warnings
from typing import Iterable

import numpy as np
from PIL import Image

# Category trees look like '["Home Furnishing >> Curtains >> ..."]'.
_TREE = re.compile(r'^\s*\[\s*"(?P<tree>.*)"\s*\]\s*$', re.S)


class DataError(ValueError):
  """Raised for bad catalogue input when `on_bad_row='fail'`, or when nothing is usable."""


@dataclasses.dataclass
class Row:
  line: int           # 1-based line in the CSV (header is line 1)
  uniq_id: str
  text: str           # name + ' ' + description
  category: str       # label at the configured depth
  image_path: str


@dataclasses.dataclass
class BadRow:
  row: int            # 1-based data row (the header is not counted)
  line: int           # CSV line where the record ends (descriptions span lines)
  uniq_id: str
  field: str
  file: str
  reason: str

  def __str__(self):
    where = f" file={self.file}" if self.file else ""
    return (f"row {self.row} (line {self.line}) uniq_id={self.uniq_id or '?'} "
            f"field={self.field}{where}: {self.reason}")


@dataclasses.dataclass
class DataReport:
  csv: str
  total_rows: int = 0
  bad: list = dataclasses.field(default_factory=list)
  class_counts: dict = dataclasses.field(default_factory=dict)
  split_counts: dict = dataclasses.field(default_factory=dict)

  @property
  def used_rows(self) -> int:
    return self.total_rows - len(self.bad)

  def to_dict(self) -> dict:
    return {
        "csv": self.csv, "total_rows": self.total_rows, "used_rows": self.used_rows,
        "skipped_rows": len(self.bad),
        "skipped_by_reason": _count_reasons(self.bad),
        "class_counts": self.class_counts, "split_counts": self.split_counts,
        "skipped": [dataclasses.asdict(b) for b in self.bad],
    }

  def summary(self) -> str:
    lines = [f"{self.csv}: {self.total_rows} rows, {self.used_rows} used, "
             f"{len(self.bad)} skipped"]
    lines += [f"  skipped: {b}" for b in self.bad]
    return "\n".join(lines)

  def write(self, directory: str) -> None:
    """Writes data_report.json and data_report.txt into `directory`."""
    os.makedirs(directory, exist_ok=True)
    _atomic_write(os.path.join(directory, "data_report.json"),
                  json.dumps(self.to_dict(), indent=2))
    _atomic_write(os.path.join(directory, "data_report.txt"), self.summary() + "\n")


def _count_reasons(bad: Iterable[BadRow]) -> dict:
  out: dict = {}
  for b in bad:
    key = b.reason.split(":")[0]
    out[key] = out.get(key, 0) + 1
  return out


def _atomic_write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def category_label(tree: str, depth: int = 1) -> str:
  """'["A >> B >> C"]' -> 'A' (depth 1) or 'A >> B' (depth 2).

  Raises ValueError when `tree` is not in that format or is too shallow.
  """
  m = _TREE.match(tree or "")
  if not m:
    raise ValueError(f"not a category tree of the form [\"A >> B\"]: {tree[:60]!r}")
  parts = [p.strip() for p in m.group("tree").split(">>")]
  if len(parts) < depth or not all(parts[:depth]):
    raise ValueError(f"category tree has fewer than {depth} levels: {tree[:60]!r}")
  return " >> ".join(parts[:depth])


def load_image(path: str, max_pixels: int, max_side: int | None = None) -> Image.Image:
  """Opens and fully decodes an RGB image; shrinks it so its shorter side is <= max_side.

  Raises ValueError (missing, unreadable, corrupt, too large) with the reason.
  JPEG draft mode decodes huge photos at reduced size, so a 93 MP image costs
  a fraction of its full decode.
  """
  if not os.path.isfile(path):
    raise ValueError("missing image: no such file")
  try:
    with warnings.catch_warnings():
      # Our own cap below decides; PIL's global one would only warn here.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      img = Image.open(path)
      w, h = img.size
      if w * h > max_pixels:
        raise ValueError(f"image too large: {w}x{h} = {w * h} pixels > {max_pixels}")
      if max_side and img.format == "JPEG":
        img.draft("RGB", _scaled(w, h, max_side))
      img = img.convert("RGB")
      img.load()
  except ValueError:
    raise
  except Image.DecompressionBombError as e:
    raise ValueError(f"image too large: {e}") from None
  except (OSError, SyntaxError) as e:
    raise ValueError(f"corrupt image: {type(e).__name__}: {e}") from None
  if max_side and min(img.size) > max_side:
    img = img.resize(_scaled(*img.size, max_side), Image.BICUBIC)
  return img


def _scaled(w: int, h: int, max_side: int) -> tuple[int, int]:
  s = max_side / min(w, h)
  return (max(1, round(w * s)), max(1, round(h * s))) if s < 1 else (w, h)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def read_catalogue(csv_path: str, image_dir: str, columns: dict, label_depth: int = 1,
                   classes: Iterable[str] = (), max_image_pixels: int = 150_000_000,
                   check_images: bool = True, require_label: bool = True):
  """CSV + image folder -> (rows, report).

  Args:
    csv_path: the catalogue CSV; `columns` maps the roles id / name /
      description / category_tree / image to its column names.
    classes: allowed categories; empty means every category found.
    check_images: fully decode each image to catch corrupt files.
    require_label: False for new products (prediction): the category column
      may be absent or empty, and `Row.category` is then ''.
  Returns:
    (list[Row], DataReport); bad rows are in `report.bad`, not in rows.
  """
  report = DataReport(csv=csv_path)
  rows: list[Row] = []
  seen: dict[str, int] = {}
  allowed = set(classes)
  with open(csv_path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    needed = [c for role, c in columns.items() if require_label or role != "category_tree"]
    missing_cols = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing_cols:
      raise DataError(f"{csv_path}: missing column(s) {missing_cols}; "
                      f"found {reader.fieldnames}")
    for rec in reader:
      report.total_rows += 1
      line = reader.line_num
      uid = (rec.get(columns["id"]) or "").strip()

      def bad(field, reason, file=""):
        report.bad.append(BadRow(report.total_rows, line, uid, field, file, reason))

      if None in rec or any(v is None for v in rec.values()):
        n = len(rec) - (1 if None in rec else 0) + len(rec.get(None) or [])
        bad("*", f"malformed CSV row: {n} fields, expected {len(reader.fieldnames)}")
        continue
      if not uid:
        bad(columns["id"], "empty id")
        continue
      if uid in seen:
        bad(columns["id"], f"duplicate uniq_id: first seen on line {seen[uid]}")
        continue
      seen[uid] = line
      text = " ".join(s for s in (rec[columns["name"]].strip(),
                                  rec[columns["description"]].strip()) if s)
      if not text:
        bad(f"{columns['name']}+{columns['description']}", "empty text")
        continue
      tree = rec.get(columns["category_tree"]) or ""
      try:
        category = category_label(tree, label_depth) if (require_label or tree.strip()) else ""
      except ValueError as e:
        if require_label:
          bad(columns["category_tree"], f"bad label: {e}")
          continue
        category = ""
      if require_label and allowed and category not in allowed:
        bad(columns["category_tree"], f"unknown label: {category!r}")
        continue
      image_name = rec[columns["image"]].strip()
      image_path = os.path.join(image_dir, image_name)
      if not image_name:
        bad(columns["image"], "missing image: empty file name")
        continue
      if check_images:
        try:
          load_image(image_path, max_image_pixels, max_side=64)
        except ValueError as e:
          bad(columns["image"], str(e), image_path)
          continue
      elif not os.path.isfile(image_path):
        bad(columns["image"], "missing image: no such file", image_path)
        continue
      rows.append(Row(line, uid, text, category, image_path))
  for r in rows:
    report.class_counts[r.category] = report.class_counts.get(r.category, 0) + 1
  return rows, report


def stratified_split(rows: list[Row], fractions: dict, seed: int) -> dict[str, list[Row]]:
  """Fixed, seeded split with the class proportions of `rows` in every part.

  Rows are ordered by uniq_id inside each class before shuffling, so the split
  depends only on (ids, labels, seed), not on the CSV order.
  """
  names = list(fractions)
  fr = np.array([fractions[n] for n in names], dtype=np.float64)
  if np.any(fr < 0) or not np.isclose(fr.sum(), 1.0):
    raise DataError(f"split fractions must be >= 0 and sum to 1: {dict(fractions)}")
  out: dict[str, list[Row]] = {n: [] for n in names}
  rng = np.random.default_rng(seed)
  for cat in sorted({r.category for r in rows}):
    members = sorted((r for r in rows if r.category == cat), key=lambda r: r.uniq_id)
    order = rng.permutation(len(members))
    # Largest-remainder rounding keeps every class's total exact.
    raw = fr * len(members)
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: len(members) - counts.sum()]:
      counts[i] += 1
    start = 0
    for name, n in zip(names, counts):
      out[name].extend(members[i] for i in order[start:start + n])
      start += n
  for name in names:
    out[name].sort(key=lambda r: r.uniq_id)
  return out
