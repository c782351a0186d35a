"""Label-issue audit: planted label flips are found by confident learning on OOF probabilities."""

import csv
import multiprocessing
import os

import numpy as np
from cleanlab import filter as cl_filter
from cleanlab import rank as cl_rank

from m6jax import experiment
from m6jax.evaluate import audit_labels
from m6jax.train import folds
from m6jax.train import trainer as trainer_lib
from tests.conftest import learnable_features, tiny_config


def _oof_with_flips(n=100, classes=4, flips=10, seed=0):
  # Well separated classes (prototype scale 4 vs unit noise): a flip is the only reason a
  # product looks like another class.
  rng = np.random.default_rng(seed)
  protos = {m: 4.0 * rng.normal(size=(classes, 8)) for m in ("image", "text")}
  labels = {s: rng.integers(0, classes, n).astype(np.int32)
            for s in ("train", "validation", "test")}
  feats = {s: {m: (protos[m][labels[s]] + rng.normal(size=(n, 8))).astype(np.float32)
               for m in protos} for s in labels}
  pooled = np.concatenate([labels["train"], labels["validation"]])
  flipped = rng.choice(len(pooled), flips, replace=False)
  noisy = pooled.copy()
  noisy[flipped] = (pooled[flipped] + rng.integers(1, classes, flips)) % classes
  labels = dict(labels, train=noisy[:n], validation=noisy[n:])
  plan = folds.fold_plan(folds.stratified_folds(noisy, 5, seed=0), num_seeds=2)
  cfg = tiny_config("unused", "unused")
  cfg.seeds, cfg.train.epochs, cfg.train.batch_size = 2, 15, 16
  cfg.train.learning_rate, cfg.train.warmup_steps, cfg.train.select_by = 3e-2, 0, "log_loss"
  cfg.model.fusion, cfg.model.hidden = "early", 0
  trainer = trainer_lib.FrozenTrainer(cfg, classes, feats, labels, plan=plan)
  states, _ = trainer.fit(None, progress=False)
  oof = folds.out_of_fold(trainer.predict(states.best_params, None, "pool"), plan)
  return noisy, oof, set(flipped.tolist())


def test_audit_finds_planted_flips_and_matches_cleanlab():
  noisy, oof, flipped = _oof_with_flips()
  names = [f"product {i}" for i in range(len(noisy))]
  rows = audit_labels.suspect_rows(noisy, oof, ["a", "b", "c", "d"], names, names)
  top = {r["index"] for r in rows[:20]}
  assert len(top & flipped) >= 8, (sorted(top & flipped), sorted(flipped))
  # The ranking is cleanlab's label-quality order; the flags are its filter's.
  quality = cl_rank.get_label_quality_scores(noisy, oof / oof.sum(1, keepdims=True))
  idx = [r["index"] for r in rows]
  assert list(np.argsort(quality[idx], kind="stable")) == list(range(len(idx)))
  ref = cl_filter.find_label_issues(noisy, oof / oof.sum(1, keepdims=True))
  assert {r["index"] for r in rows if r["flagged"]} == set(np.flatnonzero(ref))
  assert set(np.flatnonzero(ref)) <= set(idx)
  # Rows carry what a reader needs, most suspicious (lowest given-label probability) first.
  probs = [r["given_label_probability"] for r in rows]
  assert probs == sorted(probs)
  assert all(r["given_label"] != r["suggested_label"] for r in rows[:5])


def test_csv_and_gallery_are_written(tmp_path):
  noisy, oof, _ = _oof_with_flips(n=40, flips=4)
  ids = [f"id{i}" for i in range(len(noisy))]
  rows = audit_labels.suspect_rows(noisy, oof, ["a", "b", "c", "d"], ids, ids)
  path = tmp_path / "label_issues.csv"
  audit_labels.write_csv(str(path), rows)
  lines = path.read_text().splitlines()
  assert lines[0].split(",")[:3] == ["rank", "uniq_id", "given_label"]
  assert len(lines) == len(rows) + 1
  img = np.zeros((16, 16, 3), np.uint8)
  audit_labels.plot_suspects(rows[:3], [img] * 3, ["some text"] * 3, str(tmp_path / "g.png"))
  assert (tmp_path / "g.png").stat().st_size > 1000


def test_audit_pools_train_and_validation_and_keeps_test_apart():
  feats, labels = learnable_features(30, 3)
  cfg = tiny_config("unused", "unused")
  cfg.seeds, cfg.train.epochs, cfg.train.batch_size = 1, 3, 8
  cfg.train.select_by, cfg.model.hidden = "log_loss", 0
  out = audit_labels.audit_probs(cfg, feats, labels, 3, num_folds=3)
  assert set(out) == {"pool"}                              # test only on request
  pooled, oof = out["pool"]
  np.testing.assert_array_equal(pooled, np.concatenate([labels["train"], labels["validation"]]))
  assert oof.shape == (60, 3)
  both = audit_labels.audit_probs(cfg, feats, labels, 3, num_folds=3, include_test=True)
  np.testing.assert_array_equal(both["pool"][1], oof)      # the test split changes nothing
  # Other test labels: the same test probabilities (no test label is trained on).
  flipped = dict(labels, test=(labels["test"] + 1) % 3)
  again = audit_labels.audit_probs(cfg, feats, flipped, 3, num_folds=3, include_test=True)
  np.testing.assert_array_equal(again["test"][1], both["test"][1])
  np.testing.assert_array_equal(again["test"][0], flipped["test"])
  assert both["test"][1].shape == (30, 3)


def test_audit_of_a_run_writes_train_validation_and_test_apart(tiny_catalogue, tmp_path):
  cfg = tiny_config(tiny_catalogue, str(tmp_path / "tfds"),
                    **{"model.fusion": "early", "model.hidden": 0})   # linear: TF-IDF words
  wd = str(tmp_path / "run")
  res = experiment.train_and_evaluate(cfg, wd)
  s = audit_labels.audit(wd, num_folds=2, top=2, include_test=True)
  counts = res["data"]["split_counts"]
  assert s["splits"] == ["train", "validation"]
  assert s["products"] == counts["train"] + counts["validation"]
  assert s["test"]["products"] == counts["test"] and s["test"]["splits"] == ["test"]
  with open(os.path.join(wd, "predictions_test.csv")) as f:
    test_ids = {r["uniq_id"] for r in csv.DictReader(f)}
  with open(s["csv"]) as f:
    main_ids = {r["uniq_id"] for r in csv.DictReader(f)}
  assert not main_ids & test_ids       # no test product among the train+validation suspects
  assert (tmp_path / "run" / "label_issues_test.csv").is_file()
  assert len(s["gallery_captions"]) == min(2, s["suspects"])
  # Captions of suspects (this tiny run may flag none): the modality split behind the
  # suggested label (early fusion reads both towers) and the words where the text is read.
  from m6jax.inference import restore
  _, run, _, _ = restore.restore(wd)
  src = run.builder.as_data_source("test")
  rows = [{"suggested_label": run.class_names[(int(run.cols["test"]["label"][i]) + 1) % 3]}
          for i in range(2)]
  caps = audit_labels.suspect_explanations(wd, rows, [np.asarray(src[i]["image"]) for i in
                                                      range(2)], run.cols["test"]["text"][:2])
  assert len(caps) == 2
  for cap in caps:
    text_share, image_share = (float(x.split()[-1]) for x in cap.splitlines()[-1].split("|"))
    assert abs(text_share + image_share - 1) < 1e-6
    assert cap.startswith("words: ") == ("\n" in cap)


def test_confident_learning_runs_in_this_process(monkeypatch):
  """cleanlab's default worker pool forks, and forking a multithreaded (JAX) process
  can deadlock: the audit asks for one job."""
  def no_pool(*args, **kwargs):
    raise AssertionError("cleanlab started a process pool")

  monkeypatch.setattr(multiprocessing, "Pool", no_pool)
  monkeypatch.setattr(multiprocessing, "cpu_count", lambda: 4)   # a pool would be used
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 20)
  probs = rng.dirichlet(np.ones(3), len(labels)) + 2.0 * np.eye(3)[labels]
  flagged = audit_labels.flagged_issues(labels, probs)
  assert set(flagged.tolist()) == set(np.flatnonzero(cl_filter.find_label_issues(
      labels, probs / probs.sum(1, keepdims=True), n_jobs=1)).tolist())
