"""The product catalogue as a TensorFlow Datasets builder (manual dir, array_record).

Written without TensorFlow: images are stored as JPEG bytes (re-encoded with
the shorter side <= `store_size`), read back through `tfds.data_source` and
decoded with PIL. Splits (train / validation / test) are fixed, seeded and
stratified, keep twin products together (m6jax.data.twins), and are recorded both
as TFDS splits and in `split.csv` (with each product's twin group).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from m6jax import console, files
from m6jax.data import catalogue, images, twins

log = logging.getLogger(__name__)

_SPLITS = ("train", "validation", "test")
# (CatalogueConfig has a field named `images`, which hides the module there.)
_MAX_PIXELS, _MAX_SIDE = images.DEFAULT_MAX_PIXELS, images.DEFAULT_MAX_SIDE


@dataclasses.dataclass(eq=False)
class CatalogueConfig(tfds.core.BuilderConfig):
  """Everything that changes the built dataset; its hash names the config."""
  csv: str = "products.csv"
  images: str = "images"
  columns: tuple = ()              # ((role, column), ...)
  label_depth: int = 1
  class_names: tuple = ()
  split_seed: int = 0
  fractions: tuple = ()            # ((split, fraction), ...)
  max_image_pixels: int = _MAX_PIXELS
  max_image_side: int = _MAX_SIDE
  store_size: int = 256


class ProductCatalogue(tfds.core.GeneratorBasedBuilder):
  """Products with text, image and category (first level of the category tree)."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the catalogue CSV and its image folder in the manual dir "
      "(default: the bundled data/flipkart).")
  BUILDER_CONFIGS = []

  def __init__(self, *, rows_by_split=None, **kwargs):
    # Rows validated by `prepare` before building, so nothing is read twice.
    self._rows_by_split = rows_by_split
    super().__init__(**kwargs)

  def _info(self):
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description="Product catalogue: name + description, photo, category.",
        features=tfds.features.FeaturesDict({
            "uniq_id": tfds.features.Text(),
            "text": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "image_file": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(cfg.class_names)),
            "line": tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=None,
        metadata=tfds.core.MetadataDict(config=_config_dict(cfg)),
    )

  def _split_generators(self, dl_manager):
    if self._rows_by_split is None:
      raise RuntimeError("build the dataset with m6jax.data.tfds_builder.prepare()")
    image_dir = os.path.join(dl_manager.manual_dir, self.builder_config.images)
    return {s: self._generate_examples(self._rows_by_split[s], image_dir) for s in _SPLITS}

  def _generate_examples(self, rows, image_dir):
    cfg = self.builder_config
    names = list(cfg.class_names)
    limits = images.Limits(cfg.max_image_pixels, cfg.max_image_side)
    for r in rows:
      try:
        img = images.load_image(r.image_path, limits, cfg.store_size)
      except images.ImageError as e:
        raise catalogue.DataError(f"{r.image_path} (line {r.line}, uniq_id={r.uniq_id}) "
                                  f"passed validation but now fails: {e}; was it changed "
                                  "during the build?") from None
      yield r.uniq_id, {
          "uniq_id": r.uniq_id, "text": r.text, "image": images.encode_jpeg(img),
          "image_file": os.path.relpath(r.image_path, image_dir),
          "label": names.index(r.category), "line": r.line,
      }


def _config_dict(cfg: CatalogueConfig) -> dict:
  d = dataclasses.asdict(cfg)
  return {k: d[k] for k in ("csv", "images", "columns", "label_depth", "class_names",
                            "split_seed", "fractions", "max_image_pixels", "max_image_side",
                            "store_size")}


def _fingerprint(csv_path: str, image_dir: str, image_column: str, encoding: str) -> str:
  """Content hash of the CSV, and (name, size, mtime_ns) of every image file it
  references (subfolders included), so a changed photo changes the dataset."""
  h = hashlib.sha1()
  with open(csv_path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  try:
    header, records = catalogue.read_records(csv_path, encoding)
  except catalogue.DataError:
    return h.hexdigest()                  # unreadable header: validation names it
  if image_column in header:
    names = sorted({(r.fields.get(image_column) or "").strip() for r in records} - {""})
    for name in names:
      try:
        st = os.stat(images.confined_path(image_dir, name))
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "replace"))
      except (images.ImageError, OSError):
        h.update(f"{name}\0-\n".encode("utf-8", "replace"))
  return h.hexdigest()


@contextlib.contextmanager
def _build_lock(path: str):
  """Exclusive lock on `path` (created if needed); blocks while another process
  holds it. The kernel drops it when its holder dies, so no lock goes stale."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      log.info("waiting for another process building the same dataset (%s)", path)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _reuse(built: str):
  """(builder, report) of a finished build in `built`, or None."""
  if not (os.path.isfile(os.path.join(built, "dataset_info.json"))
          and os.path.isfile(os.path.join(built, "data_report.json"))):
    return None
  log.info("reusing dataset %s", built)
  with open(os.path.join(built, "data_report.json")) as f:
    return tfds.builder_from_directory(built), _report_from_dict(json.load(f))


def _drop_rare_classes(rows, report, data_cfg, csv_path, columns):
  """Rows of classes too small for every split: refused (DataError) or moved to
  the report (`rare_classes='drop'`). Returns the rows kept."""
  fractions = dict(data_cfg.split)
  min_count = int(data_cfg.get("min_class_count", 0))
  counts = {c: 0 for c in data_cfg.classes}
  counts.update(report.class_counts)
  rare = catalogue.rare_classes(counts, fractions, min_count)
  if not rare:
    return rows
  need = catalogue.min_products_per_class(fractions, min_count)
  why = (f"{need} needed for one in every split of {fractions}"
         + (f" and by data.min_class_count={min_count}" if min_count else ""))
  if data_cfg.get("rare_classes", "drop") == "fail":
    raise catalogue.DataError(
        f"{csv_path}: class(es) with too few usable products ({why}): {rare}. Add "
        "products, merge or remove these classes, or set data.rare_classes='drop'.")
  log.warning("classes left out, too few usable products (%s): %s", why, rare)
  for r in rows:
    if r.category in rare:
      report.bad.append(catalogue.BadRow(
          r.row, r.line, r.uniq_id, columns["category_tree"], "",
          f"rare class: {r.category!r} has {rare[r.category]} usable product(s); {why}"))
  report.bad.sort(key=lambda b: b.row)
  report.dropped_classes = rare
  report.class_counts = {c: n for c, n in report.class_counts.items() if c not in rare}
  return [r for r in rows if r.category not in rare]


def read_exclude_ids(path: str) -> set:
  """The uniq_ids listed in `path`: one per line, or a CSV with a `uniq_id` column
  (e.g. a trimmed label_issues.csv); blank lines and '#' comments are ignored."""
  if not os.path.isfile(path):
    raise catalogue.DataError(f"data.exclude_ids: file not found: {path}")
  with open(path, encoding="utf-8") as f:
    lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
  if lines and "uniq_id" in lines[0].split(","):
    col = lines[0].split(",").index("uniq_id")
    return {ln.split(",")[col].strip() for ln in lines[1:]}
  return set(lines)


EXCLUDED = "excluded by data.exclude_ids ({split} split)"   # the report's reason


def check_test_exclusion(data_cfg, report) -> None:
  """Refuses (DataError) an exclude_ids list naming test products unless
  data.allow_test_exclusion: dropping the test products a model gets wrong (e.g. from
  label_issues.csv) would let the test split decide what it is scored on."""
  if data_cfg.get("allow_test_exclusion", False):
    return
  reason = EXCLUDED.format(split="test")
  ids = sorted(b.uniq_id for b in report.bad if b.reason == reason)
  if ids:
    raise catalogue.DataError(
        f"data.exclude_ids={data_cfg.exclude_ids}: names {len(ids)} test product(s): "
        f"{', '.join(ids)}. Excluding test products changes what the run is scored on; "
        "remove them from the list (the label audit lists train + validation only), or "
        "set data.allow_test_exclusion=True to do it on purpose.")


def _exclude_fingerprint(data_cfg) -> str:
  path = data_cfg.get("exclude_ids", "")
  if not path:
    return ""
  return hashlib.sha1(",".join(sorted(read_exclude_ids(path))).encode()).hexdigest()


def dataset_name(data_cfg) -> str:
  """'c<12 hex>': the built dataset's name, a hash of the catalogue (CSV content, image
  files) and every data setting; computed without building anything."""
  encoding = data_cfg.get("encoding", "utf-8")
  limits = images.Limits.from_config(data_cfg)
  manual_dir = os.path.abspath(data_cfg.manual_dir)
  csv_path = os.path.join(manual_dir, data_cfg.csv)
  if not os.path.isfile(csv_path):
    raise catalogue.DataError(f"catalogue CSV not found: {csv_path}")
  columns = dict(data_cfg.columns)
  key = json.dumps(dict(
      fp=_fingerprint(csv_path, os.path.join(manual_dir, data_cfg.images), columns["image"],
                      encoding), columns=columns,
      depth=data_cfg.label_depth, classes=list(data_cfg.classes), seed=data_cfg.split_seed,
      split=dict(data_cfg.split), maxpix=limits.max_pixels, maxside=limits.max_side,
      store=data_cfg.store_size, policy=data_cfg.on_bad_row, encoding=encoding,
      rare=data_cfg.get("rare_classes", "drop"),
      min_class=int(data_cfg.get("min_class_count", 0)),
      exclude=_exclude_fingerprint(data_cfg), split_method=twins.METHOD), sort_keys=True)
  return "c" + hashlib.sha1(key.encode()).hexdigest()[:12]


def dataset_id(data_cfg) -> str:
  """'<name>/<version>' of the dataset `prepare(data_cfg)` builds or reuses (as
  m6jax.features.prepare.Setup.dataset_id reads it from the built folder)."""
  return f"{dataset_name(data_cfg)}/{ProductCatalogue.VERSION}"


def _exclude(parts: dict, report, exclude_path: str) -> None:
  """Takes the products listed in `exclude_path` out of their splits (in place),
  listing each in the report."""
  excluded = read_exclude_ids(exclude_path)
  for s in _SPLITS:
    keep = []
    for r in parts[s]:
      if r.uniq_id in excluded:
        report.bad.append(catalogue.BadRow(r.row, r.line, r.uniq_id, "uniq_id", exclude_path,
                                           EXCLUDED.format(split=s)))
      else:
        keep.append(r)
    parts[s] = keep


def _write_split_csv(data_dir: str, parts: dict, group_of: dict) -> None:
  """split.csv beside the built dataset: uniq_id, split, category, line and twin group
  (group_of: uniq_id -> group key) of every product."""
  buf = io.StringIO(newline="")
  w = csv.writer(buf)
  w.writerow(["uniq_id", "split", "category", "line", "group"])
  for s in _SPLITS:
    for r in parts[s]:
      w.writerow([r.uniq_id, s, r.category, r.line, group_of[r.uniq_id]])
  files.write_text(os.path.join(data_dir, "split.csv"), buf.getvalue())


def _split(rows, report, data_cfg):
  """Rows -> ({split: rows}, twins.find_twins result): the stratified group split, then
  the exclusions; twin groups and excluded rows go into the report."""
  # Twins (shared photo or near-identical text) never straddle splits.
  found = twins.find_twins(rows)
  report.twin_groups = found.groups
  parts = catalogue.stratified_split(rows, dict(data_cfg.split), data_cfg.split_seed,
                                     found.key_of)
  for s in _SPLITS:
    parts.setdefault(s, [])
  # Excluded products leave their split after it is drawn, so every other product
  # keeps its split and runs with and without an exclusion list stay comparable.
  exclude_path = data_cfg.get("exclude_ids", "")
  if exclude_path:
    _exclude(parts, report, exclude_path)
    check_test_exclusion(data_cfg, report)   # before anything is written
  return parts, found


def prepare(data_cfg):
  """Builds (once) and returns (read-only builder, report) for `data_cfg`.

  Reads the CSV and checks every row first. With `on_bad_row='fail'` any bad
  row raises DataError naming each one, before anything is written. With
  'skip', bad rows are counted and listed in `data_report.{json,txt}` beside
  the dataset. Classes with too few products for every split are refused or
  left out and named (`data.rare_classes`). A built dataset is reused when
  nothing it depends on changed (the CSV and every image it references);
  concurrent builds of one dataset wait for each other and reuse the result.
  """
  if data_cfg.on_bad_row not in ("skip", "fail"):
    raise ValueError(f"data.on_bad_row must be 'skip' or 'fail', got {data_cfg.on_bad_row!r}")
  rare_policy = data_cfg.get("rare_classes", "drop")
  if rare_policy not in ("drop", "fail"):
    raise ValueError(f"data.rare_classes must be 'drop' or 'fail', got {rare_policy!r}")
  encoding = data_cfg.get("encoding", "utf-8")
  limits = images.Limits.from_config(data_cfg)
  manual_dir = os.path.abspath(data_cfg.manual_dir)
  csv_path = os.path.join(manual_dir, data_cfg.csv)
  image_dir = os.path.join(manual_dir, data_cfg.images)
  columns = dict(data_cfg.columns)
  name = dataset_name(data_cfg)
  data_dir = os.path.abspath(data_cfg.tfds_dir)
  built = os.path.join(data_dir, "product_catalogue", name, str(ProductCatalogue.VERSION))
  done = _reuse(built)
  if done:
    check_test_exclusion(data_cfg, done[1])
    return done

  rows, report = catalogue.read_catalogue(
      csv_path, image_dir, columns, data_cfg.label_depth, data_cfg.classes,
      limits.max_pixels, max_image_side=limits.max_side, encoding=encoding)
  if report.bad:
    log.warning("%d of %d rows skipped:\n%s", len(report.bad), report.total_rows,
                report.summary())
    if data_cfg.on_bad_row == "fail":
      raise catalogue.DataError(
          f"{len(report.bad)} bad row(s) in {csv_path} (data.on_bad_row='fail'):\n"
          + "\n".join(str(b) for b in report.bad))
  rows = _drop_rare_classes(rows, report, data_cfg, csv_path, columns)
  if not rows:
    raise catalogue.DataError(f"no usable rows in {csv_path}:\n{report.summary()}")
  class_names = tuple(c for c in data_cfg.classes if c not in report.dropped_classes) or tuple(
      sorted({r.category for r in rows}))
  parts, found = _split(rows, report, data_cfg)
  report.split_counts = {s: len(parts[s]) for s in _SPLITS}
  cfg = CatalogueConfig(
      name=name, version=ProductCatalogue.VERSION, csv=data_cfg.csv, images=data_cfg.images,
      columns=tuple(sorted(columns.items())), label_depth=data_cfg.label_depth,
      class_names=class_names, split_seed=data_cfg.split_seed,
      fractions=tuple(dict(data_cfg.split).items()),
      max_image_pixels=limits.max_pixels, max_image_side=limits.max_side,
      store_size=data_cfg.store_size)
  # One build per dataset: a second process waits here, then reuses the first's.
  with _build_lock(os.path.join(data_dir, "product_catalogue", f".{name}.lock")):
    done = _reuse(built)
    if done:
      check_test_exclusion(data_cfg, done[1])
      return done
    builder = ProductCatalogue(data_dir=data_dir, config=cfg, file_format="array_record",
                               rows_by_split=parts)
    with console.third_party_output():   # TFDS's banner and per-split bars
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    _write_split_csv(builder.data_dir, parts, found.key_of)
    report.write(builder.data_dir)          # data_report.json last: marks the build done
  log.info("built %s: %s", builder.data_dir, report.split_counts)
  return tfds.builder_from_directory(builder.data_dir), report


def _report_from_dict(d: dict) -> catalogue.DataReport:
  rep = catalogue.DataReport(csv=d["csv"], total_rows=d["total_rows"],
                             class_counts=d["class_counts"], split_counts=d["split_counts"],
                             dropped_classes=d.get("dropped_classes", {}),
                             twin_groups=d.get("twin_groups", []))
  rep.bad = [catalogue.BadRow(**b) for b in d["skipped"]]
  return rep


def metadata_source(builder, split: str):
  """The split's records with each photo left as its JPEG bytes (tfds SkipDecoding), for
  reading labels, ids and texts (m6jax.data.pipeline.columns) without decoding every
  photo (1.5 ms a photo on the bundled train split, 0.08 ms a record without)."""
  return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})


def class_names(builder) -> list[str]:
  return list(builder.info.features["label"].names)
