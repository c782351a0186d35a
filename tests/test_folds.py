"""k-fold cross-validation: stratified folds, fold x seed replicas, out-of-fold scores."""

import jax
import numpy as np
import pytest

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
  test = trainer.seed_models(trainer.predict(states.best_params, None, "test"))
  assert test.shape == (2, 30, 3)
  assert (test.mean(0).argmax(-1) == labels["test"]).mean() > 0.8
