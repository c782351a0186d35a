"""m6jax.memory: freed large blocks leave the process (glibc's fixed mmap threshold)."""

import subprocess
import sys

import pytest

# A child process frees one 24 MiB block (under glibc's default this lifts the mmap
# threshold to 24 MiB), then allocates twenty 8 MiB blocks, frees all but the last (it
# pins the heap's top, so the heap cannot shrink) and reports how much of the freed
# 152 MiB is still resident.
CHILD = """
import ctypes, sys
from m6jax import memory
if sys.argv[1] == "fixed":
  assert memory.return_large_frees_to_os()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096
def block(n):
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)   # touched: resident
  return p
libc.free(block(24 << 20))
before = rss()
blocks = [block(8 << 20) for _ in range(20)]
for p in blocks[:-1]:
  libc.free(p)
print((rss() - before) >> 20)
"""


def _retained_mib(mode: str) -> int:
  out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                       check=True)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_large_blocks_leave_the_process():
  default, fixed = _retained_mib("default"), _retained_mib("fixed")
  assert default > 100   # the pile-up the fixed threshold prevents (152 MiB freed)
  assert fixed < 20      # only the last 8 MiB block is still held
