"""A full disk (EFBIG under a low RLIMIT_FSIZE in a child process; Python ignores
SIGXFSZ): writes fail with one line naming the file, and what was there stays intact."""

import os
import resource
import subprocess
import sys

import numpy as np

from m6jax.train.checkpoint import Checkpoints
from tests.conftest import REPO

LIMIT = 64 * 1024


def _limited(limit=LIMIT):
  return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _child(code, *args):
  return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                        text=True, timeout=300, cwd=REPO, preexec_fn=_limited(),
                        env=dict(os.environ, PYTHONPATH=REPO))


_WRITE = """
import sys
from m6jax import files
try:
  files.write_json(sys.argv[1], {"rows": ["x" * 100] * int(sys.argv[2])})
except files.WriteError as e:
  print(e)
"""


def test_an_output_too_big_for_the_disk_names_the_file_and_keeps_the_old(tmp_path):
  path = tmp_path / "results.json"
  r = _child(_WRITE, path, 10)
  assert r.returncode == 0 and r.stdout == "" and path.stat().st_size < LIMIT, r.stderr
  old = path.read_bytes()
  r = _child(_WRITE, path, 10_000)   # ~1 MB
  assert r.stdout.strip() == (f"cannot write {path}: File too large (EFBIG); the previous "
                              "results.json is unchanged"), r.stderr[-2000:]
  assert path.read_bytes() == old and os.listdir(tmp_path) == ["results.json"]   # no temp


_SAVE = """
import sys
import numpy as np
from m6jax import files
from m6jax.train.checkpoint import Checkpoints
with Checkpoints(sys.argv[1]) as ck:
  ck.save_latest(1, {"w": np.zeros(10, np.float32)}, {"epoch": 0})
  ck.wait()
  try:
    big = np.random.default_rng(0).random(100_000).astype(np.float32)   # 400 KB
    ck.save_latest(2, {"w": big}, {"epoch": 1})
    ck.wait()
  except files.WriteError as e:
    print(e)
"""


def test_a_checkpoint_too_big_for_the_disk_keeps_the_previous_step(tmp_path):
  r = _child(_SAVE, tmp_path)
  latest = tmp_path / "checkpoints" / "latest"
  line = r.stdout.strip()
  assert "\n" not in line and line.startswith(f"cannot write {latest}/2.orbax-checkpoint-tmp/"), \
      r.stdout + r.stderr[-2000:]
  assert line.endswith(f": File too large (EFBIG); checkpoint step 2 not saved; step 1 in "
                       f"{latest} is intact: free space and rerun the same command to resume "
                       "from it")
  with Checkpoints(tmp_path) as ck:   # the next run: the tmp step is cleaned up, 1 resumes
    state, extra = ck.restore_latest({"w": np.ones(10, np.float32)})
    assert ck.all_steps() == [1] and extra == {"epoch": 0}
    np.testing.assert_array_equal(state["w"], np.zeros(10, np.float32))
  assert sorted(os.listdir(latest)) == ["1"]
