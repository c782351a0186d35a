"""New products as prediction reads them: CSV records or DataFrame rows -> Products.

A row's text is its text fields joined, its photo a file name confined to the
images folder (or the photo's bytes, base64, for served requests); what is wrong
with a row (empty id or text, a duplicate id, an unusable image name) is noted on
its Product, not raised: m6jax.inference.predict predicts what it can and reports
the rest.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os

import numpy as np

from m6jax.data import catalogue, images


@dataclasses.dataclass
class Product:
  """One input row as prediction sees it."""
  row: int              # 1-based data row (the CSV header is not counted)
  line: int             # CSV line where the record ends (the row for a DataFrame)
  uniq_id: str
  text: str = ""        # the catalogue text ('' when empty or unused)
  image: str = ""       # image path ('' when missing or unused)
  image_bytes: bytes = b""   # the photo itself (served requests' base64 column), else b""
  problems: list = dataclasses.field(default_factory=list)   # [(field, file, reason)]
  error: str = ""       # why the row cannot be predicted at all
  missing: tuple = ()   # modalities predicted as zeros (missing input)


def _required_columns(bundle, mods) -> list[str]:
  cols = bundle.preprocessing["columns"]
  need = [cols["id"]]
  if "text" in mods:
    need += [cols[r] for r in bundle.preprocessing["text_fields"]]
  if "image" in mods:
    need.append(cols["image"])
  return need


def _image_path(image_dir: str | None, name: str) -> str:
  """A row's image name -> path: confined to `image_dir` when given, else as is."""
  if image_dir is not None:
    return images.confined_path(image_dir, name)
  if not name:
    raise images.ImageError("missing image: empty file name")
  return os.path.abspath(name)


PATHS_REFUSED = ("image path refused: this server reads no image files (it has no image "
                 "folder); send the photo itself, base64-encoded")


class _Reader:
  """Fields of one row -> Product; remembers ids to flag duplicates.

  image_dir: folder image names are confined to; None: names are used as given,
  or refused (every one, with the same note) when refuse_paths. b64_column: a
  column holding the photo's bytes (base64), used when a row fills it.
  """

  def __init__(self, run, image_dir: str | None, refuse_paths: bool = False,
               b64_column: str | None = None):
    self.pre = run.bundle.preprocessing
    self.cols = self.pre["columns"]
    self.mods = run.mods
    self.image_dir = image_dir
    self.refuse_paths = refuse_paths and image_dir is None
    self.b64_column = b64_column
    self.seen: dict[str, int] = {}

  def __call__(self, row: int, line: int, fields: dict, error: str = "") -> Product:
    cols = self.cols

    def get(role):
      v = fields.get(cols[role])
      return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip()

    p = Product(row, line, get("id"))
    if error:
      p.error = error
      p.problems.append(("*", "", error))
      return p
    if not p.uniq_id:
      p.problems.append((cols["id"], "", "empty id"))
    elif p.uniq_id in self.seen:
      p.problems.append((cols["id"], "", f"duplicate uniq_id: first seen on row "
                                           f"{self.seen[p.uniq_id]}"))
    else:
      self.seen[p.uniq_id] = row
    if "text" in self.mods:
      p.text = " ".join(s for s in (get(r) for r in self.pre["text_fields"]) if s)
      if not p.text:
        fields_ = "+".join(cols[r] for r in self.pre["text_fields"])
        p.problems.append((fields_, "", "empty text"))
    if "image" in self.mods:
      blob = fields.get(self.b64_column) if self.b64_column else None
      if isinstance(blob, str) and blob.strip():
        try:
          p.image_bytes = base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
          p.problems.append((self.b64_column, "", "corrupt image: not valid base64"))
      else:
        self._image(p, get("image"))
    return p

  def _image(self, p: Product, name: str) -> None:
    field = self.cols["image"]
    if self.refuse_paths and name:
      # One note for every name: nothing on this machine is looked at.
      p.problems.append((field, "", PATHS_REFUSED))
      return
    try:
      p.image = _image_path(self.image_dir, name)
    except images.ImageError as e:
      shown = os.path.join(self.image_dir, name) if self.image_dir and name else name
      p.problems.append((field, shown, str(e)))


def read_csv(run, csv_path: str, image_dir: str | None) -> list[Product]:
  """A CSV of new products -> one Product per record (bad records included)."""
  header, records = catalogue.read_records(csv_path, run.bundle.preprocessing["encoding"])
  missing = [c for c in _required_columns(run.bundle, run.mods) if c not in header]
  if missing:
    raise catalogue.DataError(f"{csv_path}: missing column(s) {missing}; found {header}")
  read = _Reader(run, image_dir)
  return [read(i, rec.line, rec.fields, rec.error) for i, rec in enumerate(records, 1)]


def read_frame(run, frame, image_dir: str | None = None, *, refuse_paths: bool = False,
               b64_column: str | None = None) -> list[Product]:
  """A pandas DataFrame of new products (the catalogue's columns) -> Products.

  With b64_column, a row may give its photo's bytes there (base64) instead of
  a file name, and the frame needs only one of the two columns; refuse_paths:
  see _Reader.
  """
  need = _required_columns(run.bundle, run.mods)
  if b64_column and "image" in run.mods and b64_column in frame.columns:
    need.remove(run.bundle.preprocessing["columns"]["image"])
  missing = [c for c in need if c not in frame.columns]
  if missing:
    raise catalogue.DataError(f"input: missing column(s) {missing}; found {list(frame.columns)}")
  read = _Reader(run, image_dir, refuse_paths, b64_column)
  return [read(i, i, rec) for i, rec in enumerate(frame.to_dict("records"), 1)]
