"""Hostile catalogue inputs: bad bytes, image bombs, odd image modes, path escapes,
changed photos, concurrent builds, rare classes, and one of each at once."""

import csv
import io
import multiprocessing
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from m6jax.data import catalogue, images, pipeline, tfds_builder
from tests.conftest import CLASSES, HEADER, make_catalogue, tiny_config

COLUMNS = dict(id="uniq_id", name="product_name", description="description",
               category_tree="product_category_tree", image="image")
TREE = f'["{CLASSES[0]} >> Sub"]'


# --- fixture writers ----------------------------------------------------------------------

def write_png(path, w, h, value=0):
  """An 8-bit greyscale PNG of one value, written row by row: a 66000x1 or even a
  14000x14000 image takes a few hundred bytes to kilobytes and no big array."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  z = zlib.compressobj(9)
  row = b"\0" + bytes([value]) * w
  idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _noise(w, h, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_truncated(path, fmt):
  buf = io.BytesIO()
  Image.fromarray(_noise(64, 48)).save(buf, fmt)
  with open(path, "wb") as f:
    f.write(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])


def write_exif_rotated(path):
  """A 40x20 JPEG (left half black, right half white) tagged 'rotate 90 CW' (6)."""
  arr = np.zeros((20, 40, 3), np.uint8)
  arr[:, 20:] = 255
  img = Image.fromarray(arr)
  exif = img.getexif()
  exif[0x0112] = 6
  img.save(path, "JPEG", exif=exif, quality=95)


def write_palette_transparent(path):
  """16x16 palette PNG: left half red, right half index 0 = transparent black."""
  img = Image.new("P", (16, 16), 0)
  img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
  img.paste(1, (0, 0, 8, 16))
  img.save(path, transparency=0)


def write_rgba(path):
  """16x16 RGBA PNG: blue, top half fully transparent."""
  arr = np.zeros((16, 16, 4), np.uint8)
  arr[..., 2] = 255
  arr[8:, :, 3] = 255
  Image.fromarray(arr, "RGBA").save(path)


def write_16bit(path, value=0x8080):
  Image.fromarray(np.full((12, 16), value, np.uint16)).save(path)


def make_hostile_catalogue(root, per_class=6, big=False):
  """Good rows (per_class per class) + one row of each hostile input, CSV with a
  UTF-8 BOM. Returns {uniq_id: 'used' | reason prefix} for every row; the
  duplicate-id row is keyed 'dup'. `big`: add real-size bombs and large valid
  images for the default caps (benchmark only; they take seconds to write)."""
  make_catalogue(root, per_class=per_class, bad=False)
  img_dir = os.path.join(root, "images")
  with open(os.path.join(root, "products.csv"), newline="") as f:
    good = list(csv.reader(f))[1:]
  expect = {r[0]: "used" for r in good}
  os.makedirs(os.path.join(img_dir, "sub", "deep"), exist_ok=True)
  p = lambda name: os.path.join(img_dir, name)  # noqa: E731
  write_png(p("wide_66000x1.png"), 66000, 1)
  write_png(p("wide_40000x2.png"), 40000, 2)
  write_png(p("bomb_2000x2000.png"), 2000, 2000)            # > tiny_config's 500k-pixel cap
  write_truncated(p("truncated.jpg"), "JPEG")
  write_truncated(p("truncated.png"), "PNG")
  write_16bit(p("grey16.png"))
  write_palette_transparent(p("palette.png"))
  write_rgba(p("rgba.png"))
  write_exif_rotated(p("rotated.jpg"))
  Image.fromarray(_noise(24, 20)).convert("CMYK").save(p("cmyk.jpg"))
  Image.fromarray(_noise(24, 20)).save(p("sub/deep/nested.jpg"))
  Image.fromarray(_noise(24, 20)).save(os.path.join(root, "outside.jpg"))
  with open(p("text.jpg"), "w") as f:
    f.write("not an image at all\n")
  rows = {
      "wide_66000x1": ("image too large", "wide_66000x1.png"),
      "wide_40000x2": ("image too large", "wide_40000x2.png"),
      "bomb": ("image too large", "bomb_2000x2000.png"),
      "truncated_jpeg": ("corrupt image", "truncated.jpg"),
      "truncated_png": ("corrupt image", "truncated.png"),
      "not_an_image": ("corrupt image", "text.jpg"),
      "folder_as_image": ("missing image", "sub"),
      "missing_image": ("missing image", "nope.jpg"),
      "empty_image_name": ("missing image", ""),
      "absolute_path": ("image path outside", os.path.join(root, "outside.jpg")),
      "dotdot_path": ("image path outside", "../outside.jpg"),
      "grey16": ("used", "grey16.png"),
      "palette": ("used", "palette.png"),
      "rgba": ("used", "rgba.png"),
      "rotated": ("used", "rotated.jpg"),
      "cmyk": ("used", "cmyk.jpg"),
      "nested": ("used", "sub/deep/nested.jpg"),
  }
  if big:
    write_png(p("bomb_14000x14000.png"), 14000, 14000)      # 196 MP > the 150 MP default cap
    Image.new("RGB", (11000, 8500), (120, 80, 40)).save(p("photo_93mp.jpg"), quality=90)
    Image.new("RGBA", (10000, 10000), (10, 200, 10, 128)).save(p("rgba_100mp.png"))
    rows.update({
        "bomb_196mp": ("image too large", "bomb_14000x14000.png"),
        "photo_93mp": ("used", "photo_93mp.jpg"),
        "rgba_100mp": ("used", "rgba_100mp.png"),
    })
  lines = [[uid, "Thing", TREE, "desc", "", name] for uid, (_, name) in rows.items()]
  expect.update({uid: why for uid, (why, _) in rows.items()})
  lines += [
      ["empty_text", " ", TREE, "", "", good[0][5]],
      ["bad_tree", "Thing", "Alpha > Sub", "desc", "", good[0][5]],
      ["malformed", "Thing", TREE, "desc", "", good[0][5], "EXTRA"],
      [good[0][0], "Dup", TREE, "desc", "", good[0][5]],
      ["rare_class", "Thing", '["Zeta Rare >> Sub"]', "desc", "", good[0][5]],
      ["bad_byte", "Thing", TREE, "caf@BYTE@", "", good[0][5]],
      ["huge_field", "Thing", TREE, "x" * 140_000, "", good[0][5]],
      ["after_huge", "Thing", TREE, "still read", "", good[0][5]],
  ]
  expect.update({"empty_text": "empty text", "bad_tree": "bad label",
                 "malformed": "malformed CSV row", "dup": "duplicate uniq_id",
                 "rare_class": "rare class", "bad_byte": "decode error",
                 "huge_field": "malformed CSV row", "after_huge": "used"})
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(HEADER)
  w.writerows(good + lines)
  data = buf.getvalue().encode("utf-8").replace(b"@BYTE@", b"\xe9")
  with open(os.path.join(root, "products.csv"), "wb") as f:
    f.write(b"\xef\xbb\xbf" + data)
  return expect


def _read(root, **kw):
  kw.setdefault("max_image_pixels", 500_000)
  return catalogue.read_catalogue(os.path.join(root, "products.csv"),
                                  os.path.join(root, "images"), COLUMNS, **kw)


def _write_csv(root, rows, prefix=b"", bad_byte=None):
  buf = io.StringIO()
  csv.writer(buf).writerows([HEADER] + rows)
  data = buf.getvalue().encode("utf-8")
  if bad_byte:
    data = data.replace(b"@BYTE@", bad_byte)
  with open(os.path.join(root, "products.csv"), "wb") as f:
    f.write(prefix + data)
  return prefix + data


def _good_rows(root, per_class=2):
  make_catalogue(root, per_class=per_class, bad=False)
  with open(os.path.join(root, "products.csv"), newline="") as f:
    return list(csv.reader(f))[1:]


# --- CSV ------------------------------------------------------------------------------------

def test_decode_error_names_file_line_and_byte_offset(tmp_path):
  root = str(tmp_path)
  good = _good_rows(root)
  bad = ["bad_byte", "Thing", TREE, "multi\nline caf@BYTE@ au lait", "", good[0][5]]
  data = _write_csv(root, [good[0], bad, good[1]], bad_byte=b"\xe9")
  rows, report = _read(root)
  assert [r.uniq_id for r in rows] == [good[0][0], good[1][0]]
  (b,) = report.bad
  assert b.uniq_id == "bad_byte" and b.reason.startswith("decode error")
  assert b.file == os.path.join(root, "products.csv")
  offset = data.index(b"\xe9")
  line = data[:offset].count(b"\n") + 1          # 4: the record's second line
  assert f"byte offset {offset} (line {line})" in b.reason and "utf-8" in b.reason
  assert b.line == line and b.row == 2
  # The right encoding reads the row.
  rows, report = _read(root, encoding="latin-1")
  assert not report.bad and "café au lait" in rows[1].text


def test_decode_error_with_fail_policy_is_a_clear_error(tmp_path):
  root = str(tmp_path / "cat")
  os.makedirs(root)
  good = _good_rows(root, per_class=6)
  data = _write_csv(root, good + [["bad_byte", "Thing", TREE, "x@BYTE@", "", good[0][5]]],
                    bad_byte=b"\xff")
  cfg = tiny_config(root, str(tmp_path / "tfds"), **{"data.on_bad_row": "fail"})
  with pytest.raises(catalogue.DataError) as e:
    tfds_builder.prepare(cfg.data)
  msg = str(e.value)
  assert "products.csv" in msg and "bad_byte" in msg
  offset = data.index(b"\xff")
  assert f"byte offset {offset}" in msg
  assert not os.path.exists(tmp_path / "tfds")


def test_bom_is_accepted_and_offsets_count_it(tmp_path):
  root = str(tmp_path)
  good = _good_rows(root)
  data = _write_csv(root, good + [["bb", "T", TREE, "@BYTE@", "", good[0][5]]],
                    prefix=b"\xef\xbb\xbf", bad_byte=b"\x80")
  rows, report = _read(root)
  assert len(rows) == len(good)                   # 'uniq_id' header found despite the BOM
  offset = data.index(b"\x80")
  assert f"byte offset {offset}" in report.bad[0].reason


def test_bad_byte_in_header_is_a_clear_error(tmp_path):
  root = str(tmp_path)
  _good_rows(root)
  path = os.path.join(root, "products.csv")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(b"uniq\xffid" + data[len(b"uniq_id"):])
  with pytest.raises(catalogue.DataError, match=r"header \(line 1\).*byte offset 4"):
    _read(root)


def test_unknown_or_non_ascii_compatible_encoding_is_refused(tmp_path):
  root = str(tmp_path)
  _good_rows(root)
  for enc, msg in (("utf-16", "not ASCII-compatible"), ("nope-8", "unknown encoding")):
    with pytest.raises(catalogue.DataError, match=msg):
      _read(root, encoding=enc)


# --- images ---------------------------------------------------------------------------------

def test_size_caps_are_checked_from_the_header(tmp_path):
  limits = images.Limits(max_pixels=1_000_000, max_side=20_000)
  for w, h, max_bytes in ((66000, 1, 400), (40000, 2, 500)):
    path = str(tmp_path / f"{w}x{h}.png")
    write_png(path, w, h)
    assert os.path.getsize(path) < max_bytes
    with pytest.raises(images.ImageError, match="longest side > 20000"):
      images.load_image(path, limits)
  # A header promising 4 MP followed by no pixel data: the cap answers before any
  # decoding (decoding would report 'corrupt image').
  path = str(tmp_path / "bomb.png")
  write_png(path, 2000, 2000)
  with open(path, "r+b") as f:
    f.truncate(60)
  with pytest.raises(images.ImageError, match="image too large: 2000x2000 = 4000000"):
    images.load_image(path, limits)
  with pytest.raises(ValueError, match="max_image_side"):
    images.Limits(max_side=70_000)               # JPEG cannot store it
  # Without the full decode (check_images=False) the caps still apply.
  root = str(tmp_path / "cat")
  good = _good_rows(root)
  write_png(os.path.join(root, "images", "wide.png"), 66000, 1)
  _write_csv(root, good + [["wide", "T", TREE, "d", "", "wide.png"]])
  rows, report = _read(root, check_images=False)
  assert len(rows) == len(good) and report.bad[0].reason.startswith("image too large")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_stream_fails_validation_not_the_build(tmp_path, fmt):
  root = str(tmp_path)
  good = _good_rows(root)
  write_truncated(os.path.join(root, "images", "cut.img"), fmt)
  _write_csv(root, good + [["cut", "Thing", TREE, "d", "", "cut.img"]])
  rows, report = _read(root)
  assert len(rows) == len(good)
  assert report.bad[0].uniq_id == "cut" and report.bad[0].reason.startswith("corrupt image")


def test_16bit_palette_alpha_and_exif_are_converted(tmp_path):
  lim = images.Limits()
  p16 = str(tmp_path / "g16.png")
  write_16bit(p16, 0x8080)
  assert Image.open(p16).mode == "I;16"
  np.testing.assert_array_equal(np.asarray(images.load_image(p16, lim)), 128)  # not white
  pal = str(tmp_path / "pal.png")
  write_palette_transparent(pal)
  a = np.asarray(images.load_image(pal, lim))
  np.testing.assert_array_equal(a[:, :8], np.broadcast_to([255, 0, 0], (16, 8, 3)))
  np.testing.assert_array_equal(a[:, 8:], 255)   # transparent -> white, not black
  rgba = str(tmp_path / "rgba.png")
  write_rgba(rgba)
  a = np.asarray(images.load_image(rgba, lim))
  np.testing.assert_array_equal(a[:8], 255)
  np.testing.assert_array_equal(a[8:], np.broadcast_to([0, 0, 255], (8, 16, 3)))
  rot = str(tmp_path / "rot.jpg")
  write_exif_rotated(rot)
  img = images.load_image(rot, lim)
  assert img.size == (20, 40)                    # upright: 90 degrees clockwise
  a = np.asarray(img).mean(axis=(1, 2))
  assert a[:15].min() < 30 and a[-15:].max() > 225   # the left (black) half is now on top


def test_image_paths_are_confined_to_the_image_folder(tmp_path):
  root = str(tmp_path)
  good = _good_rows(root)
  Image.fromarray(_noise(8, 8)).save(os.path.join(root, "outside.jpg"))
  os.makedirs(os.path.join(root, "images", "sub"))
  Image.fromarray(_noise(8, 8)).save(os.path.join(root, "images", "sub", "in.jpg"))
  _write_csv(root, good + [
      ["abs", "T", TREE, "d", "", os.path.join(root, "outside.jpg")],
      ["up", "T", TREE, "d", "", "../outside.jpg"],
      ["updown", "T", TREE, "d", "", "sub/../../outside.jpg"],
      ["nested", "T", TREE, "d", "", "sub/in.jpg"]])
  rows, report = _read(root)
  assert {r.uniq_id for r in rows} == {g[0] for g in good} | {"nested"}
  assert {b.uniq_id for b in report.bad} == {"abs", "up", "updown"}
  assert all(b.reason.startswith("image path outside the image folder") for b in report.bad)


# --- dataset build ---------------------------------------------------------------------------

def test_changed_photo_in_subfolder_triggers_a_rebuild(tmp_path):
  root = str(tmp_path / "cat")
  os.makedirs(root)
  good = _good_rows(root, per_class=5)
  os.makedirs(os.path.join(root, "images", "sub"))
  photo = os.path.join(root, "images", "sub", "p.jpg")
  Image.fromarray(_noise(30, 20, seed=1)).save(photo)
  _write_csv(root, good + [["sub_photo", "T", TREE, "d", "", "sub/p.jpg"]])
  cfg = tiny_config(root, str(tmp_path / "tfds"))
  first, _ = tfds_builder.prepare(cfg.data)
  assert tfds_builder.prepare(cfg.data)[0].data_dir == first.data_dir     # reused
  Image.fromarray(_noise(30, 20, seed=2)).save(photo)                     # same size, new pixels
  second, _ = tfds_builder.prepare(cfg.data)
  assert second.data_dir != first.data_dir


def _build_after(barrier, root, tfds_dir, out):
  """Child process: wait for the sibling, then build the same dataset."""
  cfg = tiny_config(root, tfds_dir)
  barrier.wait()
  try:
    builder, report = tfds_builder.prepare(cfg.data)
    out.put(("ok", builder.data_dir, sum(report.split_counts.values())))
  except BaseException as e:  # noqa: BLE001  (reported to the parent)
    out.put(("error", f"{type(e).__name__}: {e}", 0))


@pytest.mark.slow
def test_two_processes_building_one_dataset(tmp_path):
  root = str(tmp_path / "cat")
  os.makedirs(root)
  good = _good_rows(root, per_class=5)
  tfds_dir = str(tmp_path / "tfds")
  ctx = multiprocessing.get_context("spawn")     # jax is threaded: no fork
  barrier, out = ctx.Barrier(2), ctx.Queue()
  procs = [ctx.Process(target=_build_after, args=(barrier, root, tfds_dir, out))
           for _ in range(2)]
  for p in procs:
    p.start()
  results = [out.get(timeout=300) for _ in procs]
  for p in procs:
    p.join(60)
  assert [r[0] for r in results] == ["ok", "ok"], results
  assert results[0][1] == results[1][1] and results[0][2] == len(good)
  built = os.listdir(os.path.join(tfds_dir, "product_catalogue"))
  assert len([d for d in built if not d.startswith(".")]) == 1, built


def _rare_catalogue(root):
  """3 classes of 6 products, plus 'Zeta Rare' with 2 (too few for 3 splits)."""
  good = _good_rows(root, per_class=6)
  rare = [[f"rare{i}", "T", '["Zeta Rare >> S"]', "d", "", good[0][5]] for i in range(2)]
  _write_csv(root, good + rare)
  return good


def test_rare_classes_are_dropped_and_named(tmp_path):
  root = str(tmp_path / "cat")
  os.makedirs(root)
  good = _rare_catalogue(root)
  cfg = tiny_config(root, str(tmp_path / "tfds"))
  builder, report = tfds_builder.prepare(cfg.data)
  assert tfds_builder.class_names(builder) == sorted(CLASSES)
  assert report.dropped_classes == {"Zeta Rare": 2}
  assert {b.uniq_id for b in report.bad} == {"rare0", "rare1"}
  assert all("rare class: 'Zeta Rare' has 2" in b.reason for b in report.bad)
  assert sum(report.split_counts.values()) == len(good)
  for s in ("train", "validation", "test"):    # every class left is in every split
    labels = pipeline.columns(builder.as_data_source(s))["label"]
    assert set(labels) == set(range(len(CLASSES))), s
  with open(os.path.join(builder.data_dir, "data_report.txt")) as f:
    assert "Zeta Rare" in f.read()


def test_rare_classes_refused_by_config(tmp_path):
  root = str(tmp_path / "cat")
  os.makedirs(root)
  _rare_catalogue(root)
  cfg = tiny_config(root, str(tmp_path / "tfds"), **{"data.rare_classes": "fail"})
  with pytest.raises(catalogue.DataError, match=r"too few usable products \(5 needed.*'Zeta Rare': 2"):
    tfds_builder.prepare(cfg.data)
  cfg.data.min_class_count = 7                   # 6 per class < 7: every class is rare
  with pytest.raises(catalogue.DataError, match=r"min_class_count=7.*'Alpha Goods': 6"):
    tfds_builder.prepare(cfg.data)
  assert not os.path.exists(tmp_path / "tfds")


def test_rare_class_counts_follow_the_split_rounding():
  fr = dict(train=0.7, validation=0.15, test=0.15)
  assert catalogue.min_products_per_class(fr) == 5
  assert catalogue.split_sizes(5, fr) == dict(train=3, validation=1, test=1)
  assert catalogue.split_sizes(4, fr)["test"] == 0
  assert catalogue.min_products_per_class(dict(train=0.8, validation=0.2, test=0.0)) == 3
  assert catalogue.rare_classes({"a": 4, "b": 5, "c": 9}, fr, min_count=9) == {"a": 4, "b": 5}


def test_fuzz_every_row_is_used_or_named(tmp_path):
  root = str(tmp_path / "cat")
  os.makedirs(root)
  expect = make_hostile_catalogue(root)
  cfg = tiny_config(root, str(tmp_path / "tfds"))
  builder, report = tfds_builder.prepare(cfg.data)
  used = []
  for s in ("train", "validation", "test"):
    used += pipeline.columns(builder.as_data_source(s))["uniq_id"]
  assert len(used) == len(set(used)) == report.used_rows
  assert report.total_rows == len(expect)
  assert report.used_rows + len(report.bad) == report.total_rows
  named = {}
  for b in report.bad:
    named.setdefault("dup" if b.reason.startswith("duplicate") else b.uniq_id, b.reason)
  for uid, why in expect.items():
    if why == "used":
      assert uid in used and uid not in named, (uid, named.get(uid))
    else:
      assert uid not in used or uid == "dup", uid
      assert named.get(uid, "").startswith(why), (uid, why, named.get(uid))
  # The odd modes arrive converted in the stored dataset.
  stored = {}
  for s in ("train", "validation", "test"):
    src = builder.as_data_source(s)
    for i in range(len(src)):
      rec = src[i]
      stored[pipeline._str(rec["uniq_id"])] = rec
  assert abs(float(stored["grey16"]["image"].mean()) - 128) < 3
  assert stored["rotated"]["image"].shape == (40, 20, 3)
  assert pipeline._str(stored["nested"]["image_file"]) == os.path.join("sub", "deep",
                                                                       "nested.jpg")


def test_large_non_jpeg_is_reduced_before_conversion(tmp_path):
  p = str(tmp_path / "big.png")
  arr = np.zeros((600, 1000, 4), np.uint8)
  arr[..., 0] = np.linspace(0, 255, 1000)[None, :]
  arr[..., 3] = 255
  Image.fromarray(arr, "RGBA").save(p)
  img = images.load_image(p, images.Limits(), short_side=100)
  assert img.size == (167, 100) and img.mode == "RGB"
  direct = Image.fromarray(arr[..., :3]).resize((167, 100), Image.BICUBIC)
  assert np.abs(np.asarray(img, float) - np.asarray(direct, float)).max() <= 3
