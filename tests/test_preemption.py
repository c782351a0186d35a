"""Graceful stops (m6jax.train.preemption): SIGTERM/SIGINT end training at an epoch
boundary with the state saved, and the resumed run ends where an uninterrupted one does."""

import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import time

import pytest

from m6jax import experiment
from m6jax.train import preemption
from tests.conftest import tiny_config
from tests.test_resume import _cmd


def test_handler_sets_the_flag_and_a_second_signal_gets_the_old_handler():
  calls = []
  # Python's Ctrl-C handler, also where the suite runs as a background job (SIG_IGN there).
  old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
  old = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
  try:
    with preemption.handle_signals() as flag:
      assert not flag.requested
      os.kill(os.getpid(), signal.SIGTERM)
      assert flag.requested and flag.name == "SIGTERM" and calls == []
      os.kill(os.getpid(), signal.SIGTERM)      # asked twice: the previous handler
      assert calls == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # restored
    with pytest.raises(KeyboardInterrupt):   # Ctrl-C twice: interrupted at once
      with preemption.handle_signals() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.name == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)
  finally:
    signal.signal(signal.SIGTERM, old)
    signal.signal(signal.SIGINT, old_int)


def test_a_stop_saves_the_epoch_and_the_resumed_run_matches(tiny_catalogue, tmp_path):
  tfds = str(tmp_path / "tfds")
  conf = {"train.epochs": 6, "train.checkpoint_every": 10, "model.fusion": "late"}
  ref = experiment.train_and_evaluate(tiny_config(tiny_catalogue, tfds, **conf),
                                      str(tmp_path / "ref"))
  wd = str(tmp_path / "stopped")
  flag = preemption.StopFlag()

  def on_epoch(rec):
    if rec["epoch"] == 2:
      flag.request(signal.SIGTERM)   # what the handler does on a signal

  with pytest.raises(preemption.Preempted, match="stopped by SIGTERM after epoch 2") as e:
    experiment.train_and_evaluate(tiny_config(tiny_catalogue, tfds, **conf), wd,
                                  on_epoch=on_epoch, stop=flag)
  assert e.value.exit_code == 128 + signal.SIGTERM
  assert "rerun the same command" in str(e.value)
  assert not os.path.exists(os.path.join(wd, "results.json"))
  # Epoch 2 is saved although checkpoint_every is 10: nothing since the last save is lost.
  steps = os.listdir(os.path.join(wd, "checkpoints", "latest"))
  assert len([s for s in steps if s.isdigit()]) == 1
  res = experiment.train_and_evaluate(tiny_config(tiny_catalogue, tfds, **conf), wd)
  assert [h["loss"] for h in res["history"]] == [h["loss"] for h in ref["history"]]
  assert res["test"]["per_seed"] == ref["test"]["per_seed"]
  assert res["checkpoint_step"] == ref["checkpoint_step"]

  # A stop asked for before training starts: nothing trained, nothing written.
  flag = preemption.StopFlag()
  flag.request(signal.SIGINT)
  with pytest.raises(preemption.Preempted, match="stopped by SIGINT before the first epoch"):
    experiment.train_and_evaluate(tiny_config(tiny_catalogue, tfds, **conf),
                                  str(tmp_path / "early"), stop=flag)
  assert not os.path.exists(tmp_path / "early" / "checkpoints" / "latest" / "0")


def _lines(path):
  try:
    with open(path) as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


def _digest(folder) -> dict:
  out = {}
  for d, _, names in os.walk(folder):
    for n in names:
      with open(os.path.join(d, n), "rb") as f:
        out[os.path.relpath(os.path.join(d, n), folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _file_size_limit(limit):
  # Python ignores SIGXFSZ: writes past the limit fail with EFBIG, as on a full disk.
  return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_sigterm_then_a_full_disk_then_resume_gives_the_same_result(tiny_catalogue,
                                                                      tmp_path):
  """A real SIGTERM stops training with the epoch saved; a rerun whose checkpoint write
  fails (EFBIG) stops with one line and leaves that step intact; the next rerun
  resumes from it and ends at the uninterrupted run's parameters."""
  epochs = 120
  tfds = str(tmp_path / "tfds")
  ref = str(tmp_path / "ref")
  subprocess.run(_cmd(tiny_catalogue, tfds, ref, epochs) + ["--config.track.enabled=False"],
                 check=True, capture_output=True, timeout=600)
  wd = str(tmp_path / "stopped")
  cmd = _cmd(tiny_catalogue, tfds, wd, epochs) + ["--config.track.enabled=False"]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  deadline = time.time() + 300
  while _lines(os.path.join(wd, "metrics.jsonl")) < 3 and time.time() < deadline:
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGTERM)   # the process only, as a cluster's preemption notice
  err = proc.communicate(timeout=300)[1]
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  last = err.strip().splitlines()[-1]
  m = re.fullmatch(r"m6jax\.main: stopped by SIGTERM after epoch (\d+): state saved in "
                   r"(\S+) \(step (\d+)\); rerun the same command .*", last)
  assert m, last
  epoch, step = int(m.group(1)), int(m.group(3))
  assert epoch < epochs - 1 and not os.path.exists(os.path.join(wd, "results.json"))
  with open(os.path.join(wd, "checkpoints", "latest", str(step), "extra", "metadata")) as f:
    assert json.load(f)["epoch"] == epoch   # the stop epoch itself was saved

  # Disk full: the state files (~24 KB) no longer fit; config, fingerprint and reports do.
  latest = os.path.join(wd, "checkpoints", "latest")
  before = _digest(latest)
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                     preexec_fn=_file_size_limit(16 * 1024))
  assert r.returncode == 1, r.stderr[-3000:]
  # orbax's writer threads print their own traceback of the failed write, sometimes
  # after ours: the run's one line is the last line m6jax.main printed.
  ours = [ln for ln in r.stderr.splitlines() if ln.startswith("m6jax.main: ")]
  last = ours[-1] if ours else r.stderr.strip().splitlines()[-1]
  m = re.fullmatch(rf"m6jax\.main: error: cannot write {re.escape(latest)}/(\d+)"
                   r"\.orbax-checkpoint-tmp/\S+: File too large \(EFBIG\); checkpoint step "
                   rf"(\d+) not saved; step (\d+) in {re.escape(latest)} is intact: free "
                   r"space and rerun the same command to resume from it", last)
  assert m and m.group(1) == m.group(2), last
  # Usually the first save after the resume is the one that fails. OCDBT batches its
  # writes into files whose sizes vary from run to run, so a later save can be the
  # first to cross the limit: the step named intact is then a newer, complete one.
  intact = int(m.group(3))
  assert step <= intact < int(m.group(1)), last
  after = _digest(latest)
  assert any(k.split("/")[0] == str(intact) for k in after), sorted(after)
  if intact == step:
    assert {k: after.get(k) for k in before} == before   # the saved step: byte-identical
  assert all(k.split("/")[0].endswith(".orbax-checkpoint-tmp") or k.split("/")[0].isdigit()
             for k in set(after) - set(before))
  assert not os.path.exists(os.path.join(wd, "results.json"))

  r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"(step {intact})" in r.stderr and "resumed from epoch" in r.stderr
  a = json.load(open(os.path.join(ref, "results.json")))
  b = json.load(open(os.path.join(wd, "results.json")))
  assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
  assert a["test"]["per_seed"] == b["test"]["per_seed"]
  assert open(os.path.join(ref, "predictions_test.csv")).read() == \
      open(os.path.join(wd, "predictions_test.csv")).read()
