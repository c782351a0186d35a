"""m6jax.workdir: the exclusive workdir lock and the run fingerprint that guards resume."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from configs import base
from m6jax import experiment
from m6jax import workdir as workdir_lib
from tests.conftest import REPO, tiny_config

HOLDER = """
import sys, time
from m6jax import workdir
with workdir.lock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(120)
"""


def test_lock_is_exclusive_and_a_dead_owners_lock_is_replaced(tmp_path, caplog):
  wd = str(tmp_path / "run")
  p = subprocess.Popen([sys.executable, "-c", HOLDER, wd], stdout=subprocess.PIPE, text=True,
                       cwd=REPO)
  try:
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"in use by another run \\(pid={p.pid} "):
      with workdir_lib.lock(wd):
        pass
  finally:
    p.kill()   # SIGKILL: no cleanup, the lock file keeps its pid
    p.wait()
  assert f"pid={p.pid}" in open(os.path.join(wd, workdir_lib.LOCK)).read()
  with workdir_lib.lock(wd):
    with workdir_lib.lock(wd):   # re-entrant in the owning process
      pass
    assert f"pid={os.getpid()}" in open(os.path.join(wd, workdir_lib.LOCK)).read()
  assert f"replacing the stale lock of pid={p.pid}" in caplog.text
  assert "(process not running)" in caplog.text
  assert open(os.path.join(wd, workdir_lib.LOCK)).read() == ""   # released cleanly


def test_fingerprint_differences_name_keys_dataset_and_code():
  cfg = tiny_config("a", "b")
  a = workdir_lib.fingerprint(cfg, "c123/1.0.0")
  cfg.train.learning_rate = 0.5
  cfg.track.experiment = "other"   # cosmetic
  cfg.data.manual_dir = "/moved"   # where the catalogue lives: its content is the dataset id
  b = workdir_lib.fingerprint(cfg, "c456/1.0.0")
  lr = base.base_config().train.learning_rate
  assert workdir_lib.differences(a, b) == [f"train.learning_rate: {lr} -> 0.5",
                                           "dataset: 'c123/1.0.0' -> 'c456/1.0.0'"]
  assert workdir_lib.differences(a, dict(a, dataset=None)) == []   # not known yet: not compared
  assert workdir_lib.differences(a, dict(a, code="9.9")) == [f"code: {a['code']!r} -> '9.9'"]


def test_code_version_hashes_the_package_source(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "a.py").write_text("x = 1\n")
  (pkg / "sub" / "b.py").write_text("y = 2\n")
  (pkg / "notes.txt").write_text("not code")
  v = workdir_lib.code_version(str(pkg))
  assert v.startswith("src-") and v == workdir_lib.code_version(str(pkg))
  (pkg / "notes.txt").write_text("changed")      # not source: same version
  workdir_lib.code_version.cache_clear()
  assert workdir_lib.code_version(str(pkg)) == v
  (pkg / "sub" / "b.py").write_text("y = 3\n")   # one source byte: another version
  workdir_lib.code_version.cache_clear()
  assert workdir_lib.code_version(str(pkg)) != v
  assert workdir_lib.code_version() == workdir_lib.fingerprint(tiny_config("a", "b"))["code"]


def test_reusing_a_workdir_resumes_only_the_same_run(tiny_catalogue, tmp_path):
  tfds = str(tmp_path / "tfds")
  wd = str(tmp_path / "run")
  cfg = tiny_config(tiny_catalogue, tfds, **{"train.epochs": 1, "track.enabled": False})
  first = experiment.train_and_evaluate(cfg, wd)
  assert os.path.isfile(os.path.join(wd, workdir_lib.FINGERPRINT))

  # Cosmetic changes resume the finished run: same scores, nothing retrained.
  same = tiny_config(tiny_catalogue, tfds, **{"train.epochs": 1, "track.experiment": "x",
                                              "name": "renamed"})
  again = experiment.train_and_evaluate(same, wd)
  assert again["test"]["per_seed"] == first["test"]["per_seed"]
  assert again["history"] == first["history"]

  # Another learning rate: refused before any data work, nothing rewritten.
  other = tiny_config(tiny_catalogue, tfds, **{"train.epochs": 1, "train.learning_rate": 0.5,
                                               "track.enabled": False})
  config_before = open(os.path.join(wd, "config.json")).read()
  with pytest.raises(workdir_lib.WorkdirMismatch) as e:
    experiment.run(other, wd)
  msg = str(e.value)
  lr = base.base_config().train.learning_rate
  assert f"train.learning_rate: {lr} -> 0.5" in msg and "--restart" in msg
  assert open(os.path.join(wd, "config.json")).read() == config_before

  # --restart: a fresh run with the new config.
  res = experiment.run(other, wd, restart=True)
  assert len(res["history"]) == 1
  saved = json.load(open(os.path.join(wd, workdir_lib.FINGERPRINT)))
  assert saved["config"]["train.learning_rate"] == 0.5
  assert saved["dataset"] and saved["code"]


def tree_digest(root) -> dict:
  """{relative path: sha256 of the content} of every file and folder under `root`."""
  out = {}
  for d, dirs, names in os.walk(root):
    for n in dirs:
      out[os.path.relpath(os.path.join(d, n), root) + "/"] = "dir"
    for n in names:
      with open(os.path.join(d, n), "rb") as f:
        out[os.path.relpath(os.path.join(d, n), root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_refusals_leave_the_workdir_byte_identical(tiny_catalogue, tmp_path, monkeypatch):
  tfds = str(tmp_path / "tfds")
  wd = str(tmp_path / "run")
  conf = {"train.epochs": 1, "track.enabled": False}
  experiment.run(tiny_config(tiny_catalogue, tfds, **conf), wd)
  before = tree_digest(wd)
  assert "config.json" in before and "results.json" in before

  other_cat = str(tmp_path / "catalogue2")
  shutil.copytree(tiny_catalogue, other_cat)
  with open(os.path.join(other_cat, "products.csv"), "a") as f:
    f.write("extra001,Extra item,\"[\"\"Alpha Goods >> Sub\"\"]\",An extra product,,"
            "ok_extra.jpg\n")
  cases = {
      "config": (tiny_config(tiny_catalogue, tfds, **conf, **{"train.learning_rate": 0.5}),
                 "train.learning_rate"),
      "catalogue": (tiny_config(other_cat, tfds, **conf), "dataset: "),
      "code": (tiny_config(tiny_catalogue, tfds, **conf), "code: "),
  }
  for kind, (cfg, named) in cases.items():
    if kind == "code":
      monkeypatch.setattr(workdir_lib, "code_version", lambda: "src-0000000000000000")
    for entry in (experiment.run, experiment.train_and_evaluate):
      with pytest.raises(workdir_lib.WorkdirMismatch, match=named) as e:
        entry(cfg, wd)
      assert "--restart" in str(e.value)
      assert tree_digest(wd) == before, (kind, entry.__name__)
  assert "allow_code_change=True" in str(e.value)

  # A code change declared harmless resumes the finished run (and records the new code).
  cfg = tiny_config(tiny_catalogue, tfds, **conf, **{"train.allow_code_change": True})
  res = experiment.train_and_evaluate(cfg, wd)
  assert res["history"] == json.load(open(os.path.join(wd, "results.json")))["history"]
  saved = json.load(open(os.path.join(wd, workdir_lib.FINGERPRINT)))
  assert saved["code"] == "src-0000000000000000"


@pytest.mark.slow
def test_a_code_change_in_a_copied_checkout_is_refused_on_resume(tiny_catalogue, tmp_path):
  checkout = tmp_path / "checkout"
  for d in ("m6jax", "configs"):
    shutil.copytree(os.path.join(REPO, d), checkout / d,
                    ignore=shutil.ignore_patterns("__pycache__"))
  wd = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "m6jax.main", "--config", "configs/smoke.py", "--workdir", wd,
         f"--config.data.manual_dir={tiny_catalogue}",
         f"--config.data.tfds_dir={tmp_path / 'tfds'}", "--config.data.max_image_pixels=500000",
         "--config.data.image_size=16", "--config.train.epochs=2", "--config.track.enabled=False"]
  env = dict(os.environ, PYTHONPATH=str(checkout))

  def main(*extra):
    return subprocess.run(cmd + list(extra), cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=600)

  r = main()
  assert r.returncode == 0, r.stderr[-3000:]
  before = tree_digest(wd)
  with open(checkout / "m6jax" / "models" / "fusion.py", "a") as f:
    f.write("\n# a harmless-looking edit is still other code\n")
  r = main()
  assert r.returncode == 2, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"m6jax.main: error: workdir {wd} holds a checkpoint of a different "
                         "run (code: 'src-"), last
  assert "--restart" in last and "allow_code_change=True" in last
  assert tree_digest(wd) == before
  r = main("--config.train.allow_code_change=True")   # declared harmless: resumed
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from epoch 1" in r.stderr and "train.allow_code_change=True" in r.stderr


def test_a_run_without_checkpoints_runs_end_to_end(tiny_catalogue, tmp_path):
  cfg = tiny_config(tiny_catalogue, str(tmp_path / "tfds"),
                    **{"train.checkpoint": False, "track.enabled": False,
                       "explain.enabled": True, "explain.n_per_class": 1})
  res = experiment.run(cfg, str(tmp_path / "run"))
  assert res["checkpoint_step"] is None and len(res["history"]) == 1
  assert os.path.isfile(tmp_path / "run" / res["gradcam"]["gallery"])   # in-memory states
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  with open(tmp_path / "run" / "bundle" / "bundle.json") as f:
    assert json.load(f)["checkpoint_step"] is None
