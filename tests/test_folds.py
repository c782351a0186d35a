"""k-fold cross-validation: stratified folds, fold x seed replicas, out-of-fold scores."""

import functools

import jax
import numpy as np
import pytest

from m6jax import config as config_lib
from m6jax.evaluate import evals
from m6jax.train import folds
from m6jax.train import trainer as trainer_lib
from tests.conftest import learnable_features, tiny_config


def test_stratified_folds_are_disjoint_balanced_and_cover_every_row():
  labels = np.repeat(np.arange(4), [23, 17, 9, 31])
  fid = folds.stratified_folds(labels, 5, seed=3)
  assert fid.shape == labels.shape and set(np.unique(fid)) == set(range(5))
  sizes = np.bincount(fid, minlength=5)
  assert sizes.max() - sizes.min() <= 1
  for c in range(4):
    per = np.bincount(fid[labels == c], minlength=5)
    assert per.max() - per.min() <= 1, (c, per)
  np.testing.assert_array_equal(fid, folds.stratified_folds(labels, 5, seed=3))
  assert not np.array_equal(fid, folds.stratified_folds(labels, 5, seed=4))
  with pytest.raises(ValueError, match="k >= 2"):
    folds.stratified_folds(labels, 1)


def test_fold_plan_trains_outside_the_fold_and_validates_inside():
  labels = np.repeat(np.arange(3), 10)
  fid = folds.stratified_folds(labels, 3)
  plan = folds.fold_plan(fid, num_seeds=2)
  assert plan.num_replicas == 6
  np.testing.assert_array_equal(plan.fold_of_replica, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(plan.seed_of_replica, [0, 1, 0, 1, 0, 1])
  for r in range(6):
    rows = plan.train_idx[r][plan.train_idx[r] >= 0]
    val = np.flatnonzero(plan.val_mask[r])
    assert not set(rows) & set(val)
    assert sorted(set(rows) | set(val)) == list(range(30))
  # Every row is out-of-fold for exactly one fold (for each seed).
  np.testing.assert_array_equal(plan.val_mask[::2].sum(0), 1)


def test_out_of_fold_averages_only_the_replicas_that_did_not_train_on_a_row():
  fid = np.array([0, 1, 0, 1])
  plan = folds.fold_plan(fid, num_seeds=1)
  probs = np.zeros((2, 4, 2))
  probs[0, :, 0] = 1.0      # replica 0 (validates fold 0) says class 0 everywhere
  probs[1, :, 1] = 1.0      # replica 1 (validates fold 1) says class 1 everywhere
  oof = folds.out_of_fold(probs, plan)
  np.testing.assert_array_equal(oof.argmax(1), [0, 1, 0, 1])


def _cv_trainer(plan, seed=0, epochs=4):
  c = 3
  feats, labels = learnable_features(30, c, splits=("train", "validation", "test"))
  cfg = tiny_config("unused", "unused")
  cfg.seed, cfg.seeds = seed, int(plan.seed_of_replica.max()) + 1
  cfg.train.epochs, cfg.train.batch_size = epochs, 8
  cfg.train.learning_rate, cfg.train.warmup_steps = 3e-2, 0
  cfg.model.fusion, cfg.model.hidden = "early", 8
  return trainer_lib.FrozenTrainer(cfg, c, feats, labels, plan=plan), labels


def _plan():
  # 60 pooled rows, 20 per class: every fold has 12 rows, so every replica takes the
  # same number of steps per epoch as a solo run on its own fold.
  _, labels = learnable_features(30, 3)
  pooled = np.concatenate([labels["train"], labels["validation"]])
  sizes = np.bincount(folds.stratified_folds(pooled, 5), minlength=5)
  return folds.fold_plan(folds.stratified_folds(pooled, 5), num_seeds=2), sizes


def test_fold_replica_equals_a_solo_run_on_that_fold():
  plan, sizes = _plan()
  trainer, labels = _cv_trainer(plan)
  many, _ = trainer.fit(labels["validation"], progress=False)
  assert trainer.steps_per_epoch == (60 - sizes.max()) // 8
  for r in (0, 3, 9):
    one = folds.ReplicaPlan(plan.fold_of_replica[r:r + 1], plan.seed_of_replica[r:r + 1],
                            plan.train_idx[r:r + 1], plan.val_mask[r:r + 1])
    solo_trainer, _ = _cv_trainer(one)
    if solo_trainer.steps_per_epoch != trainer.steps_per_epoch:
      pytest.skip("fold sizes give different step counts")
    solo, _ = solo_trainer.fit(labels["validation"], progress=False)
    for a, b in zip(jax.tree.leaves(many.params), jax.tree.leaves(solo.params)):
      # vmapped and unbatched matmuls may round differently: 1e-5 absolute.
      np.testing.assert_allclose(np.asarray(a)[r], np.asarray(b)[0], atol=1e-5, rtol=0)


def test_cross_validated_trainer_learns_and_scores_out_of_fold():
  plan, _ = _plan()
  trainer, labels = _cv_trainer(plan, epochs=10)
  states, hist = trainer.fit(labels["validation"], progress=False)
  assert len(hist[-1]["val_accuracy"]) == 10
  cv = evals.out_of_fold_scores(trainer, states.best_params)
  assert cv["folds"] == 5 and cv["rows"] == 60
  assert cv["accuracy"] > 0.8, cv          # chance is 1/3
  # Per fold: the folds' rows add up, and their row-weighted mean is the pooled accuracy.
  assert sum(cv["fold_rows"]) == 60 and len(cv["per_fold_accuracy"]) == 5
  np.testing.assert_allclose(np.dot(cv["per_fold_accuracy"], cv["fold_rows"]) / 60,
                             cv["accuracy"], atol=1e-12)
  test = trainer.seed_models(trainer.predict(states.best_params, None, "test"))
  assert test.shape == (2, 30, 3)
  assert (test.mean(0).argmax(-1) == labels["test"]).mean() > 0.8


def _pooled():
  _, labels = learnable_features(30, 3)
  return np.concatenate([labels["train"], labels["validation"]])


def test_cv_plan_shapes_and_disjoint_train_select_scored_rows():
  labels = _pooled()
  k, reps, seeds = 3, 2, 2
  plan = folds.cv_plan(labels, k, seeds, seed=5, repeats=reps)
  assert plan.num_replicas == k * reps * seeds == plan.val_mask.shape[0]
  assert (plan.num_folds, plan.num_repeats, plan.models_per_seed) == (k, reps, k * reps)
  # Replica i = (repeat * k + fold) * seeds + seed.
  np.testing.assert_array_equal(plan.repeat_of_replica, np.repeat(np.arange(reps), k * seeds))
  np.testing.assert_array_equal(plan.fold_of_replica, np.tile(np.repeat(np.arange(k), seeds),
                                                              reps))
  np.testing.assert_array_equal(plan.seed_of_replica, np.tile(np.arange(seeds), k * reps))
  n = len(labels)
  for r in range(plan.num_replicas):
    train = set(plan.train_idx[r][plan.train_idx[r] >= 0])
    select, scored = set(np.flatnonzero(plan.select_mask[r])), set(np.flatnonzero(
        plan.val_mask[r]))
    assert not train & select and not train & scored and not select & scored, r
    assert train | select | scored == set(range(n))
    # The inner slice is a stratified 1/k of the training part.
    assert abs(len(select) - (n - len(scored)) / k) <= 3
    assert set(labels[list(select)]) == set(labels)
  # In each repeat every row is scored exactly once (per seed); the repeats differ.
  for rep in range(reps):
    np.testing.assert_array_equal(plan.val_mask[(plan.repeat_of_replica == rep)
                                                & (plan.seed_of_replica == 0)].sum(0), 1)
  assert not np.array_equal(plan.val_mask[:k * seeds], plan.val_mask[k * seeds:])
  # Repeat 0 is the single-partition fold assignment of the same seed.
  np.testing.assert_array_equal(folds.repeated_folds(labels, k, 1, seed=5)[0],
                                folds.stratified_folds(labels, k, seed=5))


def test_group_aware_folds_keep_twins_together():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 40)
  groups = np.arange(120)
  for g in rng.choice(120, 30, replace=False):     # 30 rows join another row of their class
    groups[g] = groups[(g // 40) * 40 + rng.integers(40)]
  fid = folds.stratified_folds(labels, 4, seed=1, groups=groups)
  for g in np.unique(groups):
    assert len(set(fid[groups == g])) == 1
  sizes = np.bincount(fid, minlength=4)
  assert sizes.max() - sizes.min() <= 4, sizes
  plan = folds.cv_plan(labels, 4, 1, seed=1, repeats=2, groups=groups)
  for r in range(plan.num_replicas):
    role = np.zeros(120, int)                       # 0 train, 1 select, 2 scored
    role[plan.select_mask[r]] = 1
    role[plan.val_mask[r]] = 2
    for g in np.unique(groups):
      assert len(set(role[groups == g])) == 1, (r, g)


def test_repeated_cv_learns_and_each_replica_equals_a_solo_run_on_its_partition():
  plan = folds.cv_plan(_pooled(), 5, 2, seed=0, repeats=2)
  trainer, labels = _cv_trainer(plan, epochs=10)
  assert trainer.num_replicas == 20
  many, _ = trainer.fit(labels["validation"], progress=False)
  cv = evals.out_of_fold_scores(trainer, many.best_params)
  assert cv["repeats"] == 2 and len(cv["per_repeat"]["accuracy"]) == 2
  assert min(cv["per_repeat"]["accuracy"]) > 0.8, cv          # chance is 1/3
  test = trainer.seed_models(trainer.predict(many.best_params, None, "test"))
  assert test.shape == (2, 30, 3)
  assert (test.mean(0).argmax(-1) == labels["test"]).mean() > 0.8
  for r in (6, 19):               # repeat 0 fold 3 seed 0; repeat 1 fold 4 seed 1
    solo_trainer, _ = _cv_trainer(plan.take([r]), epochs=10)
    assert solo_trainer.steps_per_epoch == trainer.steps_per_epoch
    solo, _ = solo_trainer.fit(labels["validation"], progress=False)
    for leaf in ("params", "best_params"):
      for a, b in zip(jax.tree.leaves(getattr(many, leaf)), jax.tree.leaves(getattr(solo, leaf))):
        # vmapped and unbatched matmuls may round differently: 1e-5 absolute.
        np.testing.assert_allclose(np.asarray(a)[r], np.asarray(b)[0], atol=1e-5, rtol=0)


def test_cv_scores_per_repeat_mean_std_and_per_fold():
  labels = _pooled()
  plan = folds.cv_plan(labels, 3, 2, seed=0, repeats=3)
  probs = np.random.default_rng(0).dirichlet(np.ones(3), (plan.num_replicas, len(labels)))
  cv = folds.cv_scores(probs, labels, plan, functools.partial(trainer_lib.validation_scores,
                                                              num_classes=3))
  assert (cv["folds"], cv["repeats"], cv["rows"]) == (3, 3, len(labels))
  acc = []
  for rep in range(3):             # plain numpy reference: average the scoring replicas
    w = plan.val_mask & (plan.repeat_of_replica == rep)[:, None]
    oof = (probs * w[..., None]).sum(0) / w.sum(0)[:, None]
    acc.append((oof.argmax(1) == labels).mean())
  # (the metrics are float32: 1e-6)
  np.testing.assert_allclose(cv["per_repeat"]["accuracy"], acc, atol=1e-6)
  assert cv["accuracy"] == pytest.approx(np.mean(acc), abs=1e-6)
  assert cv["accuracy_std"] == pytest.approx(np.std(acc, ddof=1), abs=1e-6)
  assert np.asarray(cv["per_fold"]["macro_f1"]).shape == (3, 3)
  # Repeat 1, fold 1 (fold model 1 * 3 + 1, replicas 8 and 9): its seed ensemble on its rows.
  ens = probs[(plan.repeat_of_replica == 1) & (plan.fold_of_replica == 1)].mean(0)
  rows = plan.val_mask[(1 * 3 + 1) * 2]
  assert cv["per_fold"]["accuracy"][1][1] == pytest.approx(
      (ens[rows].argmax(1) == labels[rows]).mean(), abs=1e-6)


def test_repeats_are_validated():
  cfg = tiny_config("unused", "unused")
  cfg.train.repeats = 0
  assert any("train.repeats=0" in e for e in config_lib.problems(cfg))
  cfg.train.repeats, cfg.train.folds = 2, 0
  assert any("need train.folds" in e for e in config_lib.problems(cfg))
  cfg.train.folds = 3
  assert not config_lib.problems(cfg)
