"""Peak memory of a dataset build with hostile images (issue 13), one subprocess per build.

  PYTHONPATH=$PWD python benchmarks/bench_hostile_build.py [--code DIR] [--out FILE]

Each build runs `tfds_builder.prepare` with the default data config in a fresh
Python process and reports that process's peak resident memory
(resource.getrusage ru_maxrss, and /proc VmHWM as a check; imports included),
wall time and the rows used and skipped. Catalogues, written once into a temporary folder:
- imports only: the same process without a build (the floor);
- bundled: data/flipkart (840 products, JPEG <= 1980 px);
- hostile: 18 good rows + one of each hostile input of
  tests/test_hostile_inputs.py (66000x1 and 40000x2 PNGs, 4 MP bomb, truncated
  JPEG/PNG, 16-bit, palette, RGBA, EXIF, CMYK, path escapes, bad byte, ...);
- hostile + big: the same plus a 196 MP PNG bomb (14000x14000, 1.1 MB file), a
  93 MP JPEG (11000x8500) and a 100 MP RGBA PNG, against the default caps
  (150 MP, longest side 20000).
`--code DIR` runs the builds with another checkout's m6jax (e.g. main, to see
the behaviour before the hardening); a crashed build prints its last error line.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, resource, sys, time
from configs.base import base_config
c = base_config()
c.data.manual_dir, c.data.tfds_dir = sys.argv[1], sys.argv[2]
out = {}
if sys.argv[1] != "-":
  from m6jax.data import tfds_builder
  t = time.perf_counter()
  _, report = tfds_builder.prepare(c.data)
  out = dict(seconds=round(time.perf_counter() - t, 1), used=report.used_rows,
             skipped=len(report.bad))
else:
  from m6jax.data import tfds_builder  # noqa: F401  (the imports of a build)
out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
with open("/proc/self/status") as f:   # this process only (ru_maxrss survives exec)
  out["vm_hwm_mb"] = next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) // 1024
print(json.dumps(out))
"""

WRITE = r"""
import sys
from tests.test_hostile_inputs import make_hostile_catalogue
make_hostile_catalogue(sys.argv[1])
print(len(make_hostile_catalogue(sys.argv[2], big=True)))
"""


def build(code: str, catalogue: str, tfds_dir: str) -> dict:
  env = dict(os.environ, PYTHONPATH=code, HF_HUB_OFFLINE="1")
  p = subprocess.run([sys.executable, "-c", CHILD, catalogue, tfds_dir], env=env, cwd=code,
                     capture_output=True, text=True)
  if p.returncode:
    last = [x for x in p.stderr.strip().splitlines() if x.strip()][-1:] or ["?"]
    return dict(error=last[0][:160], rc=p.returncode)
  return json.loads(p.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--code", default=REPO, help="checkout whose m6jax builds")
  ap.add_argument("--out", default="", help="also write the results as JSON here")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    small, big = os.path.join(tmp, "hostile"), os.path.join(tmp, "hostile_big")
    # Written by another process: this one stays small, and ru_maxrss (kept
    # across fork + exec) of each build below is the build's own.
    n = subprocess.run([sys.executable, "-c", WRITE, small, big], cwd=REPO, check=True,
                       env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                       text=True).stdout.split()[-1]
    print(f"catalogues written in {time.perf_counter() - t:.0f} s ({n} rows in the big one)",
          flush=True)
    cases = [("imports only", "-"), ("bundled (840 rows)", os.path.join(REPO, "data", "flipkart")),
             ("hostile", small), ("hostile + big", big)]
    results = {}
    for name, cat in cases:
      results[name] = build(os.path.abspath(args.code), cat, os.path.join(tmp, "tfds", name))
      print(f"{name:20s} {json.dumps(results[name])}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(code=os.path.abspath(args.code), results=results), f, indent=2)


if __name__ == "__main__":
  main()
