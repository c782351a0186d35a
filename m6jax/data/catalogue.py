"""Read a product catalogue (CSV + image folder) into validated rows.

Every row that cannot be used is named in a :class:`DataReport` with its CSV
line, `uniq_id`, file and reason. Nothing is dropped silently and no image is
ever substituted.
"""

from __future__ import annotations

import codecs
import collections
import csv
import dataclasses
import hashlib
import itertools
import json
import os
import re
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from m6jax import files
from m6jax.data import images

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
  row: int = 0        # 1-based data row (as BadRow.row)
  photo: tuple = ()   # (bytes digest, dHash) of the image when checked (m6jax.data.twins)


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
  # Classes left out (too few products for every split): {class: usable products}.
  dropped_classes: dict = dataclasses.field(default_factory=dict)
  # Twin groups kept in one split each (m6jax.data.twins): {key, ids, reasons, categories}.
  twin_groups: list = dataclasses.field(default_factory=list)

  @property
  def used_rows(self) -> int:
    return self.total_rows - len(self.bad)

  def to_dict(self) -> dict:
    return {
        "csv": self.csv, "total_rows": self.total_rows, "used_rows": self.used_rows,
        "skipped_rows": len(self.bad),
        "skipped_by_reason": _count_reasons(self.bad),
        "class_counts": self.class_counts, "split_counts": self.split_counts,
        "dropped_classes": self.dropped_classes,
        "twin_groups": self.twin_groups,
        "skipped": [dataclasses.asdict(b) for b in self.bad],
    }

  def summary(self) -> str:
    lines = [f"{self.csv}: {self.total_rows} rows, {self.used_rows} used, "
             f"{len(self.bad)} skipped"]
    if self.dropped_classes:
      lines.append(f"  classes left out (too few products for every split): "
                   f"{self.dropped_classes}")
    lines += [f"  skipped: {b}" for b in self.bad]
    if self.twin_groups:
      lines.append(f"  {len(self.twin_groups)} twin groups "
                   f"({sum(len(g['ids']) for g in self.twin_groups)} products), each kept in "
                   "one split:")
      lines += [f"    {'+'.join(g['reasons'])}: {' '.join(g['ids'])}" for g in self.twin_groups]
    return "\n".join(lines)

  def write(self, directory: str) -> None:
    """Writes data_report.txt, then data_report.json (last: it marks a finished build)."""
    os.makedirs(directory, exist_ok=True)
    files.write_text(os.path.join(directory, "data_report.txt"), self.summary() + "\n")
    files.write_text(os.path.join(directory, "data_report.json"),
                  json.dumps(self.to_dict(), indent=2))


def _count_reasons(bad: Iterable[BadRow]) -> dict:
  out: dict = {}
  for b in bad:
    key = b.reason.split(":")[0]
    out[key] = out.get(key, 0) + 1
  return out


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


def _decoded_lines(f, encoding: str, errors: dict) -> Iterator[str]:
  """Lines of a binary file as csv reads them (split at LF, CRLF or CR), decoded.

  Records the first undecodable byte of line k (1-based) as
  errors[k] = (byte offset in the file, the bad bytes); such a line is decoded
  with U+FFFD in place of the bad bytes. A UTF-8 byte-order mark is skipped.
  """
  offset, k = 0, 0
  first = True
  for chunk in iter(f.readline, b""):
    if first and encoding == "utf-8" and chunk.startswith(codecs.BOM_UTF8):
      chunk, offset = chunk[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
    first = False
    for raw in chunk.splitlines(keepends=True):
      k += 1
      try:
        yield raw.decode(encoding)
      except UnicodeDecodeError as e:
        errors[k] = (offset + e.start, raw[e.start:e.end])
        yield raw.decode(encoding, "replace")
      offset += len(raw)


def _check_encoding(encoding: str) -> str:
  """Codec name of `encoding`; raises DataError unless it is ASCII-compatible."""
  try:
    name = codecs.lookup(encoding).name
  except LookupError:
    raise DataError(f"data.encoding: unknown encoding {encoding!r}") from None
  name = "utf-8" if name == "utf-8-sig" else name
  probe = '\r\n,"azAZ09 '
  if probe.encode(name, "replace") != probe.encode("ascii"):
    raise DataError(f"data.encoding={encoding!r} is not ASCII-compatible; convert the CSV "
                    "to UTF-8 (or latin-1, cp1252, ...) first")
  return name


@dataclasses.dataclass
class Record:
  """One CSV record: its fields, or why it could not be read."""
  line: int                    # CSV line where the record ends
  fields: dict                 # column -> value (what could be read when `error` is set)
  error: str = ""              # decode or csv error; names line and byte offset


def read_records(csv_path: str, encoding: str = "utf-8") -> tuple[list[str], Iterator[Record]]:
  """(header, records) of a CSV; a record with an undecodable byte or a csv error
  carries the reason instead of raising, so one bad row never stops the rest.

  Raises DataError when the header itself cannot be read.
  """
  enc = _check_encoding(encoding)
  errors: dict = {}
  pending: list = []                     # text lines of the record being parsed

  def tap(lines):
    for text in lines:
      pending.append(text)
      yield text

  f = open(csv_path, "rb")
  reader = csv.reader(tap(_decoded_lines(f, enc, errors)))
  try:
    header = next(reader)
  except (StopIteration, csv.Error) as e:
    f.close()
    raise DataError(f"{csv_path}: cannot read the CSV header: {e or 'empty file'}") from None
  if errors:
    f.close()
    off, bad = errors[min(errors)]
    raise DataError(f"{csv_path}: header (line {min(errors)}): byte {bad!r} at byte offset "
                    f"{off} is not valid {encoding} (data.encoding)")

  def records():
    prev = reader.line_num
    with f:
      while True:
        pending.clear()
        try:
          values = next(reader)
        except StopIteration:
          return
        except csv.Error as e:
          # Best effort for the report: the leading fields of the record's first line.
          head = next(csv.reader([pending[0][:4096]]), []) if pending else []
          yield Record(reader.line_num, dict(zip(header, head)), f"malformed CSV row: {e}")
          prev = reader.line_num
          continue
        line, lines = reader.line_num, range(prev + 1, reader.line_num + 1)
        prev = line
        if not values:                       # blank line, as csv.DictReader skips
          continue
        fields = dict(zip(header, values))
        bad = [k for k in lines if k in errors]
        if bad:
          off, raw = errors[bad[0]]
          yield Record(line, fields, f"decode error: byte {raw!r} at byte offset {off} "
                                   f"(line {bad[0]}) is not valid {encoding} (data.encoding)")
          continue
        if len(values) != len(header):
          yield Record(line, fields, f"malformed CSV row: {len(values)} fields, "
                                     f"expected {len(header)}")
          continue
        yield Record(line, fields)

  return header, records()


def _checked_image(image_dir: str, name: str, limits, check_images: bool
                   ) -> tuple[str, tuple, str]:
  """A row's image file name -> (its path inside `image_dir`, photo, '') or ('', (), why it
  is unusable). photo: (file digest, dHash of a 64-px thumbnail) when the image is decoded
  (check_images), else () (m6jax.data.twins groups rows by it)."""
  try:
    path = images.confined_path(image_dir, name)
    if not check_images:
      with Image.open(path) as img:   # header only: the size caps
        images.check_size(*img.size, limits)
      return path, (), ""
    thumb = images.load_image(path, limits, short_side=64)
    return path, (images.file_digest(path), images.photo_hash(thumb)), ""
  except images.ImageError as e:
    return "", (), str(e)
  except Exception as e:  # noqa: BLE001  (header unreadable with check_images=False)
    return "", (), f"corrupt image: {type(e).__name__}: {e}"


def read_catalogue(csv_path: str, image_dir: str, columns: dict, label_depth: int = 1,
                   classes: Iterable[str] = (), max_image_pixels: int = images.DEFAULT_MAX_PIXELS,
                   check_images: bool = True, require_label: bool = True,
                   max_image_side: int = images.DEFAULT_MAX_SIDE, encoding: str = "utf-8"):
  """CSV + image folder -> (rows, report).

  Args:
    csv_path: the catalogue CSV, read with `encoding` (a UTF-8 BOM is
      accepted); `columns` maps the roles id / name / description /
      category_tree / image to its column names.
    classes: allowed categories; empty means every category found.
    check_images: fully decode each image (at reduced size) to catch corrupt
      files; the size caps are always checked from the header.
    require_label: False for new products (prediction): the category column
      may be absent or empty, and `Row.category` is then ''.
    max_image_pixels, max_image_side: caps checked before decoding.
  Returns:
    (list[Row], DataReport); bad rows are in `report.bad`, not in rows.
  """
  report = DataReport(csv=csv_path)
  rows: list[Row] = []
  seen: dict[str, int] = {}
  allowed = set(classes)
  limits = images.Limits(max_image_pixels, max_image_side)
  header, records = read_records(csv_path, encoding)
  needed = [c for role, c in columns.items() if require_label or role != "category_tree"]
  missing_cols = [c for c in needed if c not in header]
  if missing_cols:
    raise DataError(f"{csv_path}: missing column(s) {missing_cols}; found {header}")
  for rec in records:
    report.total_rows += 1
    line = rec.line
    uid = (rec.fields.get(columns["id"]) or "").strip()

    def bad(field, reason, file=""):
      report.bad.append(BadRow(report.total_rows, line, uid, field, file, reason))

    if rec.error:
      bad("*", rec.error, csv_path)
      continue
    fields = rec.fields
    if not uid:
      bad(columns["id"], "empty id")
      continue
    if uid in seen:
      bad(columns["id"], f"duplicate uniq_id: first seen on line {seen[uid]}")
      continue
    seen[uid] = line
    text = " ".join(s for s in (fields[columns["name"]].strip(),
                                fields[columns["description"]].strip()) if s)
    if not text:
      bad(f"{columns['name']}+{columns['description']}", "empty text")
      continue
    tree = fields.get(columns["category_tree"]) or ""
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
    image_name = fields[columns["image"]].strip()
    shown = os.path.join(image_dir, image_name) if image_name else ""
    image_path, photo, problem = _checked_image(image_dir, image_name, limits, check_images)
    if problem:
      bad(columns["image"], problem, shown)
      continue
    rows.append(Row(line, uid, text, category, image_path, report.total_rows, photo))
  for r in rows:
    report.class_counts[r.category] = report.class_counts.get(r.category, 0) + 1
  return rows, report


def split_sizes(n: int, fractions: dict) -> dict[str, int]:
  """n items -> {split: size}, fractions rounded by largest remainder (sizes sum to n)."""
  names = list(fractions)
  fr = np.array([fractions[k] for k in names], dtype=np.float64)
  raw = fr * n
  counts = np.floor(raw).astype(int)
  for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
    counts[i] += 1
  return dict(zip(names, (int(c) for c in counts)))


def min_products_per_class(fractions: dict, min_count: int = 0) -> int:
  """Smallest class size with >= 1 product in every split of positive fraction
  (and >= min_count)."""
  need = [k for k, v in fractions.items() if v > 0]
  n = max(1, min_count)
  while any(split_sizes(n, fractions)[k] == 0 for k in need):
    n += 1
  return n


def rare_classes(class_counts: dict, fractions: dict, min_count: int = 0) -> dict[str, int]:
  """{class: count} of the classes with fewer than `min_products_per_class` products."""
  need = min_products_per_class(fractions, min_count)
  return {c: n for c, n in sorted(class_counts.items()) if n < need}


def group_hash(key: str, seed: int) -> bytes:
  """The seeded rank of a group: blake2b of (seed, group key)."""
  return hashlib.blake2b(key.encode(), digest_size=8, key=str(int(seed)).encode()).digest()


def stratified_split(rows: list[Row], fractions: dict, seed: int,
                     groups: dict | None = None) -> dict[str, list[Row]]:
  """Fixed, seeded, stratified split that keeps each group of rows in one split.

  groups: {uniq_id: group key} (m6jax.data.twins: the group's smallest uniq_id);
  a row not in it is a group of its own. A group counts for the class of most
  of its rows (ties: the first class name). Within each class the groups are
  ranked by `group_hash(key, seed)` and cut into contiguous runs, one per split,
  at the group edges that keep every split's row count nearest its target
  (largest-remainder sizes; exact for single rows, within +-1 for pairs).

  The split depends only on (ids, labels, groups, seed), never on the CSV order
  or on other classes. Adding or fixing one row moves its group and at most one
  group at each cut of its class (no rule can do better and keep the counts
  within +-1: an assignment that never moves another row is a per-row coin).
  """
  names = list(fractions)
  fr = np.array([fractions[n] for n in names], dtype=np.float64)
  if np.any(fr < 0) or not np.isclose(fr.sum(), 1.0):
    raise DataError(f"split fractions must be >= 0 and sum to 1: {dict(fractions)}")
  groups = groups or {}
  members: dict[str, list[Row]] = {}
  for r in rows:
    members.setdefault(groups.get(r.uniq_id, r.uniq_id), []).append(r)
  by_class: dict[str, list[str]] = {}
  for key, rs in members.items():
    counts = collections.Counter(r.category for r in rs)
    top = max(counts.values())
    by_class.setdefault(min(c for c, n in counts.items() if n == top), []).append(key)
  out: dict[str, list[Row]] = {n: [] for n in names}
  for cat in sorted(by_class):
    keys = sorted(by_class[cat], key=lambda k: (group_hash(k, seed), k))
    sizes = [len(members[k]) for k in keys]
    cuts = _best_cuts(np.cumsum([0] + sizes), list(split_sizes(sum(sizes), fractions).values()))
    part = np.searchsorted(cuts, np.cumsum([0] + sizes)[:-1], side="right")
    for k, j in zip(keys, part):
      out[names[j]].extend(members[k])
  for name in names:
    out[name].sort(key=lambda r: r.uniq_id)
  return out


def _best_cuts(edges: np.ndarray, targets: list) -> np.ndarray:
  """Group edges (cumulative sizes, 0 first) and per-split target sizes -> the S-1
  cut positions, each the edge just below or above its target boundary, that
  minimise (largest |count - target|, summed |count - target|)."""
  bounds = np.cumsum(targets)[:-1]
  options = [sorted({int(edges[edges <= b].max()), int(edges[edges >= b].min())})
             for b in bounds]
  best, best_cost = None, None
  for cuts in itertools.product(*options):
    if any(a > b for a, b in zip(cuts, cuts[1:])):
      continue
    counts = np.diff([0, *cuts, int(edges[-1])])
    dev = np.abs(counts - np.asarray(targets))
    cost = (int(dev.max()), int(dev.sum()))
    if best_cost is None or cost < best_cost:
      best, best_cost = cuts, cost
  return np.asarray(best, np.int64)
