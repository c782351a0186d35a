import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from m6jax.train import optim


def _params():
  return {"image": {"stage1": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
                    "stage2": {"kernel": jnp.ones((2, 2)), "scale": jnp.ones(2)}},
          "fusion": {"out": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}}


def _cfg(groups, lr=0.1, wd=0.1):
  return ml_collections.ConfigDict(dict(learning_rate=lr, warmup_steps=0, weight_decay=wd,
                                        groups=groups))


GROUPS = {"early": {"regex": "image/stage1/.*", "lr_mult": 0.0},
          "late": {"regex": "image/stage2/.*", "lr_mult": 0.5, "unfreeze_at": 3},
          "head": {"regex": "fusion/.*"}}


def test_every_parameter_in_exactly_one_group():
  labels, members = optim.group_labels(_params(), GROUPS)
  assert sorted(sum(members.values(), [])) == sorted(optim.param_paths(_params()))
  assert labels["image"]["stage2"]["scale"] == "late"
  with pytest.raises(ValueError, match="image/stage2/kernel: matches no group"):
    optim.group_labels(_params(), {k: v for k, v in GROUPS.items() if k != "late"})
  with pytest.raises(ValueError, match=r"fusion/out/bias: matches \['head', 'all'\]"):
    optim.group_labels(_params(), dict(GROUPS, all={"regex": ".*/bias|fusion/.*"}))


def _run(groups, steps, grads_scale=1.0):
  p = _params()
  tx = optim.make_optimizer(_cfg(groups), 10, p)
  s = tx.init(p)
  traj = [p]
  for _ in range(steps):
    g = jax.tree.map(lambda x: jnp.full_like(x, grads_scale), p)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    traj.append(p)
  return traj, s


def test_frozen_group_never_moves_and_unfreezing_is_a_schedule():
  traj, _ = _run(GROUPS, 6)
  for p in traj:
    np.testing.assert_array_equal(p["image"]["stage1"]["kernel"], 1.0)
  late = [float(p["image"]["stage2"]["kernel"][0, 0]) for p in traj]
  assert late[:4] == [1.0] * 4            # LR 0 for steps 0, 1, 2
  assert late[4] < 1.0 and late[5] < late[4]
  head = [float(p["fusion"]["out"]["kernel"][0, 0]) for p in traj]
  assert all(b < a for a, b in zip(head, head[1:]))


def test_adam_moments_accumulate_while_waiting_to_unfreeze():
  _, state = _run(GROUPS, 2)
  inner = state.inner_states
  assert isinstance(inner["early"].inner_state, optax.EmptyState) or \
      not jax.tree.leaves(inner["early"].inner_state)  # frozen: no Adam state
  adam = inner["late"].inner_state[0]
  mu = adam.mu["image"]["stage2"]["kernel"]
  # Gradients of 1 for two steps: mu = 1 - 0.9**2, although the group has not moved.
  np.testing.assert_allclose(mu, 1 - 0.9**2, rtol=1e-6)


def test_no_weight_decay_on_biases_and_norms():
  mask = optim.decay_mask(_params())
  assert mask["image"]["stage1"]["kernel"] and mask["fusion"]["out"]["kernel"]
  assert not mask["image"]["stage1"]["bias"] and not mask["image"]["stage2"]["scale"]
  # With zero gradients only decay moves parameters: biases must stay.
  traj, _ = _run({"all": {"regex": ".*"}}, 3, grads_scale=0.0)
  np.testing.assert_array_equal(traj[-1]["fusion"]["out"]["bias"], 0.0)
  np.testing.assert_array_equal(traj[-1]["image"]["stage2"]["scale"], 1.0)
  assert float(traj[-1]["fusion"]["out"]["kernel"][0, 0]) < 1.0


def test_schedule_warmup_cosine_and_start():
  s = optim.schedule(1.0, 100, 10, start=20)
  assert float(s(0)) == 0.0 and float(s(19)) == 0.0
  assert 0 < float(s(25)) < 1.0
  assert abs(float(s(30)) - 1.0) < 1e-6
  assert float(s(99)) < 0.01


def test_unfreeze_at_epoch_uses_the_runs_steps_per_epoch():
  groups = dict(GROUPS, late={"regex": "image/stage2/.*", "lr_mult": 0.5,
                              "unfreeze_at_epoch": 2})
  assert optim.unfreeze_step(groups["late"], steps_per_epoch=4) == 8
  assert optim.unfreeze_step(GROUPS["late"], steps_per_epoch=4) == 3   # steps stay steps
  p = _params()
  tx = optim.make_optimizer(_cfg(groups), 20, p, steps_per_epoch=2)   # late starts at step 4
  s, moved = tx.init(p), []
  for _ in range(6):
    u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
    moved.append(bool(np.any(np.asarray(u["image"]["stage2"]["kernel"]) != 0)))
  assert moved == [False] * 4 + [True] * 2
  assert "from step 4" in optim.describe_groups(p, groups, steps_per_epoch=2)
  with pytest.raises(ValueError, match="both unfreeze_at"):
    optim.unfreeze_step({"unfreeze_at": 1, "unfreeze_at_epoch": 1})
