"""One image-decoding policy for the catalogue check, the dataset build and prediction.

Every product photo goes through :func:`load_image`:
1. the header is read lazily and the size is checked against a side-length cap
   and a pixel cap BEFORE any pixel is decoded (a 277-byte 66000x1 PNG or a
   decompression bomb costs nothing);
2. the whole data stream is decoded once (JPEG at reduced scale via `draft`
   when a smaller size is wanted), so truncated or broken files fail here;
3. 16-bit greyscale is scaled to 8 bits (not clipped to white); EXIF
   orientation is applied; palette, greyscale and CMYK become RGB;
   transparency (alpha channel or palette/greyscale transparency) is
   composited on white.
Failures raise ImageError (a ValueError) whose message starts with the reason
('missing image', 'image too large', 'corrupt image').
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

# JPEG cannot store a side longer than this; stored images are JPEG.
JPEG_MAX_SIDE = 65_500
# Defaults of the data config (configs/base.py), for configs saved before a knob existed.
DEFAULT_MAX_PIXELS = 150_000_000
DEFAULT_MAX_SIDE = 20_000

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
  """An unusable image; the message starts with the reason."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """Caps checked from the header: longest side and width * height."""
  max_pixels: int = DEFAULT_MAX_PIXELS
  max_side: int = DEFAULT_MAX_SIDE

  def __post_init__(self):
    if not 0 < self.max_side <= JPEG_MAX_SIDE:
      raise ValueError(f"data.max_image_side must be in 1..{JPEG_MAX_SIDE} (stored images "
                       f"are JPEG), got {self.max_side}")
    if self.max_pixels <= 0:
      raise ValueError(f"data.max_image_pixels must be > 0, got {self.max_pixels}")

  @classmethod
  def from_config(cls, data_cfg) -> "Limits":
    """The caps of a data config (older saved configs lack `max_image_side`)."""
    return cls(int(data_cfg.get("max_image_pixels", DEFAULT_MAX_PIXELS)),
               int(data_cfg.get("max_image_side", DEFAULT_MAX_SIDE)))


def check_size(w: int, h: int, limits: Limits) -> None:
  """Raises ImageError('image too large: ...') when (w, h) breaks a cap."""
  if max(w, h) > limits.max_side:
    raise ImageError(f"image too large: {w}x{h}, longest side > {limits.max_side} "
                     "(data.max_image_side)")
  if w * h > limits.max_pixels:
    raise ImageError(f"image too large: {w}x{h} = {w * h} pixels > {limits.max_pixels} "
                     "(data.max_image_pixels)")


def load_image(path: str | bytes, limits: Limits, short_side: int | None = None
               ) -> Image.Image:
  """Checks, fully decodes and converts an image file (or its bytes) to RGB (H, W),
  H, W >= 1.

  `short_side`: when given, the result is shrunk (never enlarged) so its shorter
  side is <= short_side. JPEGs are then decoded at reduced scale (`draft`), so
  a 93 MP photo costs a fraction of its full decode; other formats are decoded
  fully, then box-reduced to >= 2 x short_side before conversion.
  Raises ImageError (missing, too large, corrupt) with the reason.
  """
  if isinstance(path, bytes):
    if not path:
      raise ImageError("missing image: no bytes")
  elif not os.path.isfile(path):
    raise ImageError("missing image: " + ("not a file" if os.path.exists(path) else
                                          "no such file"))
  try:
    with warnings.catch_warnings():
      # `limits` decides; PIL's global bomb check would only warn or raise later.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:      # lazy: reads the header only
        check_size(*img.size, limits)
        if short_side and img.format == "JPEG":
          img.draft("RGB", _scaled(*img.size, short_side))
        img.load()                        # the whole data stream, exactly once
        out = _to_8bit(img)
        factor = min(out.size) // (2 * short_side) if short_side else 0
        if factor >= 2 and out.mode not in ("P", "PA", "1"):   # no averaging of indices
          out = _reduce(out, factor)
        out = to_rgb(out)
  except ImageError:
    raise
  except Image.DecompressionBombError as e:
    raise ImageError(f"image too large: {e}") from None
  except Exception as e:  # noqa: BLE001
    # PIL's decoders and EXIF parser signal truncated or malformed files with
    # OSError, SyntaxError, ValueError, struct.error, ...: all mean "corrupt".
    raise ImageError(f"corrupt image: {type(e).__name__}: {e}") from None
  if short_side and min(out.size) > short_side:
    out = out.resize(_scaled(*out.size, short_side), Image.BICUBIC)
  return out


def _reduce(img: Image.Image, factor: int) -> Image.Image:
  """Image.reduce (box average of factor x factor blocks), in bands of rows: for
  RGBA, PIL's own would first copy the whole image premultiplied."""
  w, h = img.size
  out = Image.new(img.mode, (-(-w // factor), -(-h // factor)))
  band = factor * max(1, (1 << 22) // max(w * factor, 1))
  for top in range(0, h, band):
    out.paste(img.crop((0, top, w, min(h, top + band))).reduce(factor), (0, top // factor))
  out.info = dict(img.info)
  return out


def _to_8bit(img: Image.Image) -> Image.Image:
  """16-bit ('I;16*', 'I': 0..65535 scaled by 255/65535) or float ('F': clipped to
  0..255) greyscale -> 'L', in bands of rows (no full-size wider copy); else `img`.

  A plain convert() would clip every 16-bit sample above 255 to white.
  """
  if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
    return img
  w, h = img.size
  out = np.empty((h, w), np.uint8)
  band = max(1, (1 << 22) // max(w, 1))
  for top in range(0, h, band):
    a = np.asarray(img.crop((0, top, w, min(h, top + band))))
    if img.mode == "F":
      out[top:top + band] = np.clip(np.rint(a), 0, 255)
    else:
      out[top:top + band] = (np.clip(a, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535
  res = Image.fromarray(out, "L")
  res.info = dict(img.info)              # EXIF orientation, transparency
  if isinstance(res.info.get("transparency"), int) and img.mode != "F":
    res.info["transparency"] = (min(res.info["transparency"], 65535) * 255 + 32767) // 65535
  return res


def to_rgb(img: Image.Image) -> Image.Image:
  """A loaded 8-bit image of any mode -> RGB, upright (EXIF orientation applied),
  transparency (alpha, or palette / greyscale `transparency`) composited on white."""
  img = ImageOps.exif_transpose(_to_8bit(img))
  if img.mode in _ALPHA_MODES or "transparency" in img.info:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img if img.mode == "RGB" else img.convert("RGB")


def _scaled(w: int, h: int, short_side: int) -> tuple[int, int]:
  s = short_side / min(w, h)
  return (max(1, round(w * s)), max(1, round(h * s))) if s < 1 else (w, h)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def confined_path(image_dir: str, name: str) -> str:
  """image_dir + a relative name from the CSV -> path inside image_dir.

  Raises ImageError for an empty name, an absolute path or one whose `..`
  parts leave the folder (checked on the path text; links placed inside the
  folder by its owner are followed).
  """
  if not name:
    raise ImageError("missing image: empty file name")
  if os.path.isabs(name):
    raise ImageError(f"image path outside the image folder: absolute path {name!r}")
  root = os.path.normpath(os.path.abspath(image_dir))
  path = os.path.normpath(os.path.join(root, name))
  if os.path.commonpath([root, path]) != root:
    raise ImageError(f"image path outside the image folder: {name!r} leaves {root}")
  return path


# A thumbnail with a grey range below this is flat: its dHash would be noise, not a picture.
MIN_HASH_GREY_RANGE = 8
# dHash bits whose two thumbnail cells differ by less than this (grey levels) may flip
# when the photo is re-encoded; up to HASH_UNSTABLE_BITS of them are marked "either".
HASH_MARGIN, HASH_UNSTABLE_BITS = 4.0, 6


def photo_hash(img: Image.Image) -> str:
  """Difference hash (dHash) of a picture: 64 bits (hex) of 'brighter than its left
  neighbour' on a 9x8 grey thumbnail, then '/' and the positions of its near-tie bits
  (the HASH_UNSTABLE_BITS closest under HASH_MARGIN), e.g. '7227a69619c6e673/5,40';
  '' for a flat picture. Two photos match when they agree outside those bits
  (m6jax.data.twins): a re-encoded, resized or recoloured copy of one photo."""
  grey = np.asarray(img.convert("L").resize((9, 8), Image.BOX), np.float32)
  if grey.max() - grey.min() < MIN_HASH_GREY_RANGE:
    return ""
  diff = (grey[:, 1:] - grey[:, :-1]).ravel()
  near = [int(i) for i in np.argsort(np.abs(diff), kind="stable")[:HASH_UNSTABLE_BITS]
          if abs(diff[i]) < HASH_MARGIN]
  bits = np.packbits(diff > 0).tobytes().hex()
  return bits + ("/" + ",".join(map(str, sorted(near))) if near else "")


def file_digest(path: str) -> str:
  """blake2b-128 of a file's bytes (hex)."""
  h = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
