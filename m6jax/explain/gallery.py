"""Grad-CAM pictures: heat-map overlays and a gallery grid that reads at a glance.

With labels, one row per true class that has images: its correct predictions
(green frames) on the left, its wrong ones (red frames, titled with the
predicted class) on the right; a class without errors says "no errors" in
one cell instead of an empty row. Without labels, one row per predicted
class. Text is at least 10 pt at the saved dpi and class names wrap.
"""

from __future__ import annotations

import functools
import os
import textwrap

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CORRECT, WRONG, NEUTRAL = "#1b8a2f", "#c62828", "0.45"
FONT = 10          # pt: cell titles, notes, headers; row labels are 11 pt
CELL = 2.2         # inches per image cell (220 px at the default dpi)
LABEL_W = 1.7      # inches for the row-label column
TITLE_CHARS = 24   # characters per line of a cell title (fits CELL at FONT)


def overlay(image, cam, alpha: float = 0.45):
  """uint8 (H, W, 3) + cam (H, W) in [0, 1] -> uint8 (H, W, 3), jet heat map blended in."""
  heat = colormaps["jet"](np.clip(np.asarray(cam, np.float64), 0, 1))[..., :3] * 255.0
  out = (1.0 - alpha) * np.asarray(image, np.float64) + alpha * heat
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _wrap(s: str, width: int) -> str:
  return textwrap.fill(str(s), width, break_long_words=True) or str(s)


def _rows(labels, preds, num_classes: int, per_class: int):
  """-> [(class, correct indices, wrong indices)] for classes with images.

  labels None: grouped by predicted class, every image in the 'correct' slot.
  """
  preds = np.asarray(preds)
  rows = []
  for c in range(num_classes):
    if labels is None:
      ok, bad = np.flatnonzero(preds == c)[:per_class], np.array([], int)
    else:
      lab = np.asarray(labels)
      ok = np.flatnonzero((lab == c) & (preds == c))[:per_class]
      bad = np.flatnonzero((lab == c) & (preds != c))[:per_class]
    if len(ok) or len(bad):
      rows.append((c, ok, bad))
  return rows


def _frame(ax, color, width=4.0):
  ax.set_anchor("S")  # image at the bottom of its cell: the title gets the room above
  ax.set_xticks([])
  ax.set_yticks([])
  for s in ax.spines.values():
    s.set_edgecolor(color)
    s.set_linewidth(width)


def _note(ax, text, color="0.4"):
  ax.axis("off")
  ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=FONT, color=color,
          style="italic", transform=ax.transAxes)


def _header(fig, gs, cols, text, note, color) -> None:
  """A column group's header over grid columns `cols` (first grid row)."""
  ax = fig.add_subplot(gs[0, cols[0]:cols[-1] + 1])
  ax.axis("off")
  width = int(len(cols) * CELL * 72 / (FONT * 0.6))
  ax.text(0.5, 0.35, text + ("\n" + _wrap(note, width) if note else ""), ha="center",
          va="center", fontsize=FONT, color=color, transform=ax.transAxes, linespacing=1.3)


def _row_label(ax, name: str, count, has_labels: bool) -> None:
  """A class row's label cell: its name and, given (n_correct, n_wrong), the counts."""
  ax.axis("off")
  text = _wrap(name, 15)
  ax.text(0.04, 0.55, text, ha="left", va="center", fontsize=FONT + 1, weight="bold",
          transform=ax.transAxes)
  if count is not None:
    right, wrong = count
    note = f"{right}/{right + wrong} correct" if has_labels else f"{right} predicted"
    ax.text(0.04, 0.55 - 0.09 * (text.count("\n") + 1) - 0.06, note, ha="left",
            va="top", fontsize=FONT, color="0.3", transform=ax.transAxes)


def _caption(ax, text):
  """Under an image: its top words and modality split (m6jax.explain.multimodal.caption)."""
  if text:
    ax.set_anchor("C")   # room below the image as well as above
    lines = "\n".join(_wrap(t, TITLE_CHARS) for t in str(text).split("\n"))
    ax.text(0.5, -0.03, lines, ha="center", va="top", fontsize=FONT, color="0.15",
            transform=ax.transAxes, linespacing=1.1)


def _cell(ax, index, color, *, images, cams, alpha: float, captions) -> int:
  """One image's overlay in `ax`, framed in `color`, with its caption; returns its index."""
  i = int(index)
  ax.imshow(overlay(images[i], cams[i], alpha))
  _frame(ax, color)
  _caption(ax, None if captions is None else captions[i])
  return i


def gallery(images, cams, labels, preds, class_names, path: str, per_class: int = 3,
            title: str | None = None, alpha: float = 0.45, probs=None, counts=None,
            dpi: int = 100, captions=None) -> str:
  """Overlays grouped by class in a grid, saved as a PNG at `path`.

  images uint8 (N, H, W, 3), cams (N, H, W) in [0, 1], preds (N,) int, labels
  (N,) int or None. probs (N,): optional confidence of each prediction, shown in
  its cell. counts: optional {class: (n_correct, n_wrong)} over all explained
  images, shown under the row label. captions (N,): optional text under each
  image (top words, modality split). Only classes (rows) and columns that hold
  an image are drawn. Returns path.
  """
  preds = np.asarray(preds)
  rows = _rows(labels, preds, len(class_names), per_class)
  if not rows:
    raise ValueError("gallery: no images to draw")
  n_ok = max(len(r[1]) for r in rows)
  n_bad = max(len(r[2]) for r in rows)
  has_labels = labels is not None
  # Columns: row label | correct cells | gap | wrong cells (only those that exist).
  widths = [LABEL_W] + [CELL] * n_ok + ([0.25] + [CELL] * n_bad if n_bad else [])
  fig_w = sum(widths)
  if has_labels and not n_bad:
    title = (title + " " if title else "") + "(no wrong predictions)"
  title = _wrap(title, int(fig_w * 72 / (FONT * 0.6))) if title else None
  title_h = (0.22 * (title.count("\n") + 1) + 0.2) if title else 0.0
  header_h = 0.55  # two lines of header
  cell_h = CELL + 0.5  # room for a two-line cell title
  if captions is not None:
    cell_h += 0.8      # and for a three-line caption below (images centred in their cells)
  heights = [header_h] + [cell_h] * len(rows)
  fig = Figure(figsize=(fig_w, sum(heights) + title_h))
  FigureCanvasAgg(fig)
  top = 1.0 - title_h / (sum(heights) + title_h)
  gs = fig.add_gridspec(len(heights), len(widths), width_ratios=widths, height_ratios=heights,
                        left=0.005, right=0.995, bottom=0.005, top=top, wspace=0.06, hspace=0.0)
  ok_cols = list(range(1, 1 + n_ok))
  bad_cols = list(range(2 + n_ok, 2 + n_ok + n_bad))

  p_note = "p: ensemble probability" if probs is not None else ""
  if has_labels:
    _header(fig, gs, ok_cols, "CORRECT", p_note, CORRECT)
    if n_bad:
      _header(fig, gs, bad_cols, "WRONG", "title: predicted class", WRONG)
  else:
    _header(fig, gs, ok_cols, "BY PREDICTED CLASS", p_note, "0.2")

  for r, (c, ok, bad) in enumerate(rows, start=1):
    _row_label(fig.add_subplot(gs[r, 0]), class_names[c],
               None if counts is None else counts.get(c), has_labels)
    draw = functools.partial(_cell, images=images, cams=cams, alpha=alpha, captions=captions)
    for j, col in enumerate(ok_cols):
      ax = fig.add_subplot(gs[r, col])
      if j < len(ok):
        i = draw(ax, ok[j], CORRECT if has_labels else NEUTRAL)
        if probs is not None:
          ax.set_title(f"p = {float(probs[i]):.2f}", fontsize=FONT, color="0.2", pad=3)
      elif j == 0:
        _note(ax, "none correct" if has_labels else "")
      else:
        ax.axis("off")
    for j, col in enumerate(bad_cols):
      ax = fig.add_subplot(gs[r, col])
      if j < len(bad):
        i = draw(ax, bad[j], WRONG)
        t = class_names[int(preds[i])] + ("" if probs is None else f" ({float(probs[i]):.2f})")
        ax.set_title(_wrap(t, TITLE_CHARS), fontsize=FONT, color=WRONG, pad=3)
      elif j == 0:
        _note(ax, "no errors", CORRECT)
      else:
        ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=FONT + 1, y=1.0 - 0.08 / (sum(heights) + title_h), va="top")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi)
  return path
