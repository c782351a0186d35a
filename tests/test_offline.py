"""The default (smoke) run needs no network: run as a user would (a fresh process,
no pytest or CI markers in its environment, tracking on) with every IP connect
and name lookup blocked and logged, it finishes and attempts none."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import MAX_PIXELS, REPO

# Installs the socket guard in the child, then runs `python -m m6jax.main ARGS`.
BOOT = r"""
import os, runpy, socket, sys
log = open(os.environ["M6JAX_TEST_NET_LOG"], "a")

def _block(what):
  log.write(repr(what) + "\n")
  log.flush()
  raise OSError(f"network blocked by tests/test_offline.py: {what}")

def _guard(real):
  def wrapped(self, address, *args):
    if self.family == socket.AF_UNIX:
      return real(self, address, *args)
    _block(("connect", address))
  return wrapped

socket.socket.connect = _guard(socket.socket.connect)
socket.socket.connect_ex = _guard(socket.socket.connect_ex)
socket.getaddrinfo = lambda host, *a, **k: _block(("getaddrinfo", host))
sys.argv = ["m6jax.main"] + sys.argv[1:]
runpy.run_module("m6jax.main", run_name="__main__", alter_sys=True)
"""

# Variables by which libraries (MLflow telemetry, ...) detect a test or CI run and
# go quiet: a user's run has none of them.
TEST_MARKERS = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL",
                "BUILDKITE", "TF_BUILD", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI")


@pytest.mark.slow
def test_smoke_run_needs_no_network(tiny_catalogue, tmp_path):
  net_log = tmp_path / "network_attempts.txt"
  env = {k: v for k, v in os.environ.items() if k not in TEST_MARKERS}
  env.update(M6JAX_TEST_NET_LOG=str(net_log), PYTHONPATH=REPO,
             M6JAX_CACHE=str(tmp_path / "cache"))
  args = [sys.executable, "-c", BOOT, "--config", os.path.join(REPO, "configs/smoke.py"),
          "--workdir", str(tmp_path / "runs" / "smoke"),
          f"--config.data.manual_dir={tiny_catalogue}",
          f"--config.data.tfds_dir={tmp_path / 'tfds'}",
          f"--config.data.max_image_pixels={MAX_PIXELS}", "--config.data.image_size=16",
          "--config.data.columns.name=product_name", "--config.train.epochs=1"]
  r = subprocess.run(args, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  attempts = net_log.read_text() if net_log.exists() else ""
  assert attempts == "", f"the smoke run tried the network:\n{attempts}"
  res = json.loads((tmp_path / "runs" / "smoke" / "results.json").read_text())
  assert len(res["test"]["per_seed"]["accuracy"]) == 2   # smoke: 2 seeds
  tracking = json.loads((tmp_path / "runs" / "smoke" / "tracking.json").read_text())
  assert tracking["uri"].startswith("sqlite:///")   # tracked, to a local store
