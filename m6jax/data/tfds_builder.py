"""The product catalogue as a TensorFlow Datasets builder (manual dir, array_record).

Written without TensorFlow: images are stored as JPEG bytes (re-encoded with
the shorter side <= `store_size`), read back through `tfds.data_source` and
decoded with PIL. Splits (train / validation / test) are fixed, seeded and
stratified, and recorded both as TFDS splits and in `split.csv`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from m6jax.data import catalogue

log = logging.getLogger(__name__)

_SPLITS = ("train", "validation", "test")


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
  max_image_pixels: int = 150_000_000
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
    return {s: self._generate_examples(self._rows_by_split[s]) for s in _SPLITS}

  def _generate_examples(self, rows):
    cfg = self.builder_config
    names = list(cfg.class_names)
    for r in rows:
      img = catalogue.load_image(r.image_path, cfg.max_image_pixels, cfg.store_size)
      yield r.uniq_id, {
          "uniq_id": r.uniq_id, "text": r.text, "image": catalogue.encode_jpeg(img),
          "image_file": os.path.basename(r.image_path),
          "label": names.index(r.category), "line": r.line,
      }


def _config_dict(cfg: CatalogueConfig) -> dict:
  d = dataclasses.asdict(cfg)
  return {k: d[k] for k in ("csv", "images", "columns", "label_depth", "class_names",
                            "split_seed", "fractions", "max_image_pixels", "store_size")}


def _fingerprint(csv_path: str, image_dir: str) -> str:
  """Content hash of the CSV and (name, size, mtime) of the images."""
  h = hashlib.sha1()
  with open(csv_path, "rb") as f:
    h.update(f.read())
  if os.path.isdir(image_dir):
    for e in sorted(os.scandir(image_dir), key=lambda e: e.name):
      st = e.stat()
      h.update(f"{e.name}:{st.st_size}:{int(st.st_mtime)}".encode())
  return h.hexdigest()


def prepare(data_cfg):
  """Builds (once) and returns (read-only builder, report) for `data_cfg`.

  Reads the CSV and checks every row first. With `on_bad_row='fail'` any bad
  row raises DataError naming each one, before anything is written. With
  'skip', bad rows are counted and listed in `data_report.{json,txt}` beside
  the dataset. A built dataset is reused when nothing it depends on changed.
  """
  if data_cfg.on_bad_row not in ("skip", "fail"):
    raise ValueError(f"data.on_bad_row must be 'skip' or 'fail', got {data_cfg.on_bad_row!r}")
  manual_dir = os.path.abspath(data_cfg.manual_dir)
  csv_path = os.path.join(manual_dir, data_cfg.csv)
  image_dir = os.path.join(manual_dir, data_cfg.images)
  if not os.path.isfile(csv_path):
    raise catalogue.DataError(f"catalogue CSV not found: {csv_path}")
  columns = dict(data_cfg.columns)
  key = json.dumps(dict(
      fp=_fingerprint(csv_path, image_dir), columns=columns, depth=data_cfg.label_depth,
      classes=list(data_cfg.classes), seed=data_cfg.split_seed,
      split=dict(data_cfg.split), maxpix=data_cfg.max_image_pixels,
      store=data_cfg.store_size, policy=data_cfg.on_bad_row), sort_keys=True)
  name = "c" + hashlib.sha1(key.encode()).hexdigest()[:12]
  data_dir = os.path.abspath(data_cfg.tfds_dir)
  built = os.path.join(data_dir, "product_catalogue", name, ProductCatalogue.VERSION.__str__())
  if os.path.isfile(os.path.join(built, "dataset_info.json")) and os.path.isfile(
      os.path.join(built, "data_report.json")):
    log.info("reusing dataset %s", built)
    with open(os.path.join(built, "data_report.json")) as f:
      return tfds.builder_from_directory(built), _report_from_dict(json.load(f))

  rows, report = catalogue.read_catalogue(
      csv_path, image_dir, columns, data_cfg.label_depth, data_cfg.classes,
      data_cfg.max_image_pixels)
  if report.bad:
    log.warning("%d of %d rows skipped:\n%s", len(report.bad), report.total_rows,
                report.summary())
    if data_cfg.on_bad_row == "fail":
      raise catalogue.DataError(
          f"{len(report.bad)} bad row(s) in {csv_path} (data.on_bad_row='fail'):\n"
          + "\n".join(str(b) for b in report.bad))
  if not rows:
    raise catalogue.DataError(f"no usable rows in {csv_path}:\n{report.summary()}")
  class_names = tuple(data_cfg.classes) or tuple(sorted({r.category for r in rows}))
  parts = catalogue.stratified_split(rows, dict(data_cfg.split), data_cfg.split_seed)
  for s in _SPLITS:
    parts.setdefault(s, [])
  report.split_counts = {s: len(parts[s]) for s in _SPLITS}
  cfg = CatalogueConfig(
      name=name, version=ProductCatalogue.VERSION, csv=data_cfg.csv, images=data_cfg.images,
      columns=tuple(sorted(columns.items())), label_depth=data_cfg.label_depth,
      class_names=class_names, split_seed=data_cfg.split_seed,
      fractions=tuple(dict(data_cfg.split).items()),
      max_image_pixels=data_cfg.max_image_pixels, store_size=data_cfg.store_size)
  builder = ProductCatalogue(data_dir=data_dir, config=cfg, file_format="array_record",
                             rows_by_split=parts)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  report.write(builder.data_dir)
  with open(os.path.join(builder.data_dir, "split.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["uniq_id", "split", "category", "line"])
    for s in _SPLITS:
      for r in parts[s]:
        w.writerow([r.uniq_id, s, r.category, r.line])
  log.info("built %s: %s", builder.data_dir, report.split_counts)
  return tfds.builder_from_directory(builder.data_dir), report


def _report_from_dict(d: dict) -> catalogue.DataReport:
  rep = catalogue.DataReport(csv=d["csv"], total_rows=d["total_rows"],
                             class_counts=d["class_counts"], split_counts=d["split_counts"])
  rep.bad = [catalogue.BadRow(**b) for b in d["skipped"]]
  return rep


def class_names(builder) -> list[str]:
  return list(builder.info.features["label"].names)
