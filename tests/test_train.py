"""The training engine: replicas vs solo runs, determinism, compiles, finetuning."""

import jax
import numpy as np
import pytest

from m6jax.data import tfds_builder
from m6jax.models import towers
from m6jax.train import finetune
from m6jax.train import trainer as trainer_lib
from tests.conftest import learnable_features, tiny_config


def _frozen_problem(seeds, seed=0, epochs=3, order="per_seed", fusion="early", **train_cfg):
  c = 3
  feats, labels = learnable_features(60, c)
  cfg = tiny_config("unused", "unused", **{f"train.{k}": v for k, v in train_cfg.items()})
  cfg.seeds, cfg.seed = seeds, seed
  cfg.train.epochs, cfg.train.batch_size = epochs, 16
  cfg.train.data_order = order
  cfg.model.fusion = fusion
  cfg.model.hidden = 8
  return trainer_lib.FrozenTrainer(cfg, c, feats, labels), labels


def _fit(seeds, seed=0, **kw):
  trainer, labels = _frozen_problem(seeds, seed, **kw)
  states, hist = trainer.fit(labels["validation"], progress=False)
  return trainer, states, hist


@pytest.mark.parametrize("fusion", ["early", "image", "gated"])
def test_frozen_trainer_learns(fusion):
  trainer, states, hist = _fit(2, epochs=12, fusion=fusion, learning_rate=3e-2,
                               warmup_steps=0)
  acc = np.asarray(hist[-1]["val_accuracy"])
  assert (acc > 0.8).all(), acc     # chance is 1/3
  assert np.mean(hist[-1]["loss"]) < 0.6 * np.mean(hist[0]["loss"])
  probs = np.asarray(trainer.predict(states.best_params, None, "test")).mean(0)
  assert (probs.argmax(-1) == np.asarray(trainer.labels["test"])).mean() > 0.8


def test_replica_k_equals_solo_run_with_seed_k():
  _, many, _ = _fit(3, seed=10)
  for k in range(3):
    _, solo, _ = _fit(1, seed=10 + k)
    for a, b in zip(jax.tree.leaves(many.params), jax.tree.leaves(solo.params)):
      # vmapped and unbatched matmuls may round differently: 1e-5 absolute.
      np.testing.assert_allclose(np.asarray(a)[k], np.asarray(b)[0], atol=1e-5, rtol=0)


def test_same_config_twice_is_bit_identical():
  _, a, ha = _fit(2)
  _, b, hb = _fit(2)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


def test_replicas_differ_and_shared_order_is_shared():
  _, s, _ = _fit(2)
  w = jax.tree.leaves(s.params)[0]
  assert not np.allclose(w[0], w[1])
  trainer, _ = _frozen_problem(3, order="shared")
  keys = trainer.order_keys()
  assert (jax.random.key_data(keys[0]) == jax.random.key_data(keys[2])).all()


def test_one_compile_for_all_epochs():
  trainer, labels = _frozen_problem(2, epochs=4)
  trainer.fit(labels["validation"], progress=False)
  assert trainer._epoch._cache_size() == 1
  assert trainer._predict._cache_size() == 1


@pytest.mark.parametrize("fusion", ["text", "image", "late", "gated"])
def test_fusion_modes_train(fusion):
  trainer, states, hist = _fit(2, fusion=fusion, epochs=2)
  probs, weights = trainer.predict(states.best_params, None, "test", with_weights=True)
  assert probs.shape == (2, 60, 3)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
  assert weights.shape[-1] == (1 if fusion in ("text", "image") else 2)
  if fusion == "gated":
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-5)
  assert np.isfinite(hist[-1]["loss"]).all()


def test_best_epoch_is_kept_per_replica():
  _, states, hist = _fit(2, epochs=4, select_by="macro_f1")
  f1 = np.array([h["val_macro_f1"] for h in hist])   # (epochs, K)
  np.testing.assert_allclose(np.asarray(states.best_score), f1.max(0), atol=1e-6)
  # The state's epoch is the first best one (strict improvement only).
  np.testing.assert_array_equal(np.asarray(states.best_epoch), f1.argmax(0))


def test_weak_model_is_scored_with_its_selected_epoch_not_its_initial_parameters():
  # Labels independent of the features over 7 classes: validation log-loss stays near
  # ln 7 ~ 1.95 > 1, the case where a selection starting at -1 never replaced the init.
  c, n = 7, 70
  feats, _ = learnable_features(n, c)
  rng = np.random.default_rng(1)
  labels = {s: rng.integers(0, c, n).astype(np.int32) for s in feats}
  cfg = tiny_config("unused", "unused", **{"train.select_by": "log_loss"})
  cfg.seeds, cfg.train.epochs, cfg.train.batch_size, cfg.model.hidden = 2, 3, 16, 8
  trainer = trainer_lib.FrozenTrainer(cfg, c, feats, labels)
  states, hist = trainer.fit(labels["validation"], progress=False)
  loss = np.array([h["val_log_loss"] for h in hist])
  assert loss.min() > 1.0, loss
  np.testing.assert_array_equal(np.asarray(states.best_epoch), loss.argmin(0))
  assert (np.asarray(states.best_epoch) >= 0).all()
  init = trainer.init_states()
  for a, b in zip(jax.tree.leaves(states.best_params), jax.tree.leaves(init.params)):
    assert not np.allclose(np.asarray(a), np.asarray(b))
  scored = np.asarray(trainer.predict(states.best_params, None, "test"))
  untrained = np.asarray(trainer.predict(init.params, None, "test"))
  assert np.abs(scored - untrained).max() > 1e-3


def test_selection_by_log_loss_keeps_each_replicas_lowest_validation_loss():
  _, states, hist = _fit(2, epochs=4, select_by="log_loss")
  best = np.array([min(h["val_log_loss"][k] for h in hist) for k in range(2)])
  # best_score holds the selection score: minus the log-loss here.
  np.testing.assert_allclose(-np.asarray(states.best_score), best, rtol=1e-5)


def test_finetune_frozen_group_does_not_move(tiny_catalogue, tmp_path):
  cfg = tiny_config(tiny_catalogue, str(tmp_path / "tfds"), **{
      "train.mode": "finetune", "model.fusion": "image", "seeds": 2, "train.epochs": 1})
  cfg.train.groups = {"stem": {"regex": "image/(conv0|bn0)/.*", "lr_mult": 0.0},
                      "top": {"regex": "image/(conv1|bn1)/.*", "lr_mult": 0.1},
                      "head": {"regex": "fusion/.*"}}
  builder, _ = tfds_builder.prepare(cfg.data)
  tower = towers.image_tower("tiny", "none", cfg.data.image_size)
  trainer = finetune.FinetuneTrainer(cfg, 3, builder, image_tower=tower)
  s0 = trainer.init_states()
  before = jax.tree.map(np.asarray, s0.params)
  s1, stats = trainer.run_epoch(s0, 0)
  after = jax.tree.map(np.asarray, s1.params)
  np.testing.assert_array_equal(after["image"]["conv0"]["kernel"],
                                before["image"]["conv0"]["kernel"])
  assert not np.array_equal(after["image"]["conv1"]["kernel"], before["image"]["conv1"]["kernel"])
  assert not np.array_equal(after["fusion"]["head"]["out"]["kernel"],
                            before["fusion"]["head"]["out"]["kernel"])
  # Both replicas start from the same tower weights but different heads.
  np.testing.assert_array_equal(before["image"]["conv1"]["kernel"][0],
                                before["image"]["conv1"]["kernel"][1])
  assert not np.array_equal(before["fusion"]["head"]["out"]["kernel"][0],
                            before["fusion"]["head"]["out"]["kernel"][1])
  assert trainer._step._cache_size() == 1
  probs = trainer.predict(s1.params, s1.batch_stats, "validation")
  assert probs.shape[:2] == (2, len(builder.as_data_source("validation")))


def test_finetune_replica_loop_map_equals_vmap(tiny_catalogue, tmp_path):
  out = {}
  for how in ("vmap", "map"):
    cfg = tiny_config(tiny_catalogue, str(tmp_path / "tfds"), **{
        "train.mode": "finetune", "model.fusion": "image", "seeds": 2, "train.epochs": 1,
        "train.replica_loop": how})
    builder, _ = tfds_builder.prepare(cfg.data)
    tower = towers.image_tower("tiny", "none", cfg.data.image_size)
    trainer = finetune.FinetuneTrainer(cfg, 3, builder, image_tower=tower)
    states, _ = trainer.run_epoch(trainer.init_states(), 0)
    out[how] = jax.tree.map(np.asarray, states.params)
  for a, b in zip(jax.tree.leaves(out["vmap"]), jax.tree.leaves(out["map"])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
