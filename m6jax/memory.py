"""Process memory: hand freed large blocks back to the OS (glibc's malloc).

glibc serves a block of at least its mmap threshold with its own mmap and unmaps it
on free, but after the first such free it raises the threshold to that block's size
(up to 32 MiB). From then on, blocks up to 32 MiB come from its heaps, whose freed
memory stays resident: numpy temporaries of the evaluations (Grad-CAM's rank arrays
for the replica stability, KMeans copies) pile up batch after batch. Measured on the
42,000-product catalogue (benchmarks/bench_scale.md): Grad-CAM of 256 products
peaked 1.77 GiB above its start with the dynamic threshold, 1.0 GiB with a fixed
4 MiB one, and kept 1.2 GiB against 0.2 GiB after it.

Called by the command-line entry points (training, predict, explain), not on
import: a library user's process is theirs to tune.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3                 # mallopt parameter (glibc malloc.h)
MMAP_THRESHOLD_BYTES = 4 * 1024 ** 2  # blocks of 4 MiB and more: mmap'd, unmapped on free


def return_large_frees_to_os(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
  """Fix glibc's mmap threshold at `threshold` bytes (which also stops its dynamic
  rise), so every freed block of that size or more leaves the process. Returns
  whether it was set: False off glibc (macOS, musl), where nothing is changed."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  ok = mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
  if not ok:
    log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", threshold)
  return ok
