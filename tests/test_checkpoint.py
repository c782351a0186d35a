"""m6jax.checkpoint: round trips, retention of latest/best, atomicity, disabled mode."""

import os
import signal
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m6jax.checkpoint import Checkpoints

K = 3  # seed replicas


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  opt_state: object
  rng: jax.Array


def make_state(seed=0, step=7):
  """A TrainState-like dataclass: K-replica params, vmapped adam state, typed keys."""
  tx = optax.adam(1e-3)
  r = np.random.default_rng(seed)
  params = {"params": {"dense": {"kernel": jnp.asarray(r.normal(size=(K, 4, 3)), jnp.float32),
                                 "bias": jnp.asarray(r.normal(size=(K, 3)), jnp.float32)}}}
  opt_state = jax.vmap(tx.init)(params)
  # Make the adam moments non-trivial so a mix-up would show.
  opt_state = jax.tree.map(lambda x: x + seed if x.dtype == jnp.float32 else x + step, opt_state)
  rng = jax.vmap(jax.random.key)(jnp.arange(K) + seed)
  return State(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state, rng=rng)


def assert_same(a, b):
  """Same pytree structure/classes and bitwise-equal leaves (typed keys via key_data)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jax.random.key_impl(x) == jax.random.key_impl(y)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def steps_on_disk(d):
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def test_round_trip_dataclass_adam_typed_keys(tmp_path):
  state = make_state(seed=1, step=11)
  extra = {"epoch": 3, "history": [{"loss": np.float32(0.5), "f1": 0.25}],
           "data_pos": np.int64(40)}
  with Checkpoints(tmp_path) as ck:
    assert ck.is_primary
    assert ck.save_latest(11, state, extra) is True
    ck.wait()
    target = make_state(seed=9, step=0)  # same structure, different values
    restored, got_extra = ck.restore_latest(target)
  assert isinstance(restored, State)
  assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
  assert isinstance(restored.params["params"]["dense"]["kernel"], jax.Array)
  assert restored.rng.dtype == state.rng.dtype  # typed key<fry> again
  assert restored.params["params"]["dense"]["kernel"].sharding == \
      target.params["params"]["dense"]["kernel"].sharding
  assert_same(restored, state)
  assert got_extra == {"epoch": 3, "history": [{"loss": 0.5, "f1": 0.25}], "data_pos": 40}

  # A fresh instance (a resumed process) sees and restores the same step,
  # here from an abstract target (ShapeDtypeStructs, typed key dtype included).
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          target)
  with Checkpoints(tmp_path) as ck:
    assert ck.latest_step() == 11 and ck.best_step() is None
    restored2, _ = ck.restore_latest(abstract)
  assert_same(restored2, state)


def test_latest_and_best_retention_are_independent(tmp_path):
  state = make_state()
  metrics = {1: 0.9, 2: 0.5, 3: 0.6, 4: 0.7, 5: 0.8}
  with Checkpoints(tmp_path, keep_latest=2, keep_best=1) as ck:
    for s in range(1, 6):
      ck.save_latest(s, make_state(seed=s, step=s), {"epoch": s})
      saved = ck.save_best(s, make_state(seed=s, step=s), metrics[s], {"epoch": s})
      assert saved is (s == 1)  # later, worse metrics never enter the top 1
    ck.wait()
    assert ck.best_step() == 1 and ck.best_metric() == pytest.approx(0.9)
    assert ck.latest_step() == 5
    best_state, best_extra = ck.restore_best(state)
    latest_state, latest_extra = ck.restore_latest(state)
  assert steps_on_disk(tmp_path / "checkpoints" / "latest") == [4, 5]
  assert steps_on_disk(tmp_path / "checkpoints" / "best") == [1]
  assert_same(best_state, make_state(seed=1, step=1)) and best_extra == {"epoch": 1}
  assert_same(latest_state, make_state(seed=5, step=5)) and latest_extra == {"epoch": 5}

  # A better metric later replaces the best; a resumed instance knows the kept metric.
  with Checkpoints(tmp_path, keep_latest=2, keep_best=1) as ck:
    assert ck.best_step() == 1 and ck.best_metric() == pytest.approx(0.9)
    assert ck.save_best(6, state, 0.85) is False
    assert ck.save_best(6, state, float("nan")) is False
    assert ck.save_best(7, state, 0.95) is True
    ck.wait()
    assert ck.best_step() == 7
  assert steps_on_disk(tmp_path / "checkpoints" / "best") == [7]
  assert steps_on_disk(tmp_path / "checkpoints" / "latest") == [4, 5]


def test_best_min_mode_keep_two(tmp_path):
  state = make_state()
  with Checkpoints(tmp_path, keep_best=2, best_mode="min") as ck:
    for s, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0), (5, 1.5)]:
      ck.save_best(s, state, loss)
    ck.wait()
    assert ck.best_step() == 2
  assert steps_on_disk(tmp_path / "checkpoints" / "best") == [2, 5]


def test_nothing_saved_restores_none(tmp_path):
  with Checkpoints(tmp_path) as ck:
    assert ck.latest_step() is None and ck.best_step() is None
    assert ck.restore_latest(make_state()) is None
    assert ck.restore_best(make_state()) is None


def test_in_progress_tmp_dir_is_never_restored(tmp_path):
  state = make_state(seed=2, step=2)
  with Checkpoints(tmp_path) as ck:
    ck.save_latest(2, state)
  latest = tmp_path / "checkpoints" / "latest"
  # What a process killed mid-save leaves: orbax's in-progress naming.
  fake = latest / "3.orbax-checkpoint-tmp-1700000000000000"
  (fake / "state").mkdir(parents=True)
  (fake / "state" / "garbage").write_bytes(b"half written")
  with Checkpoints(tmp_path) as ck:
    assert ck.latest_step() == 2
    restored, _ = ck.restore_latest(make_state())
  assert_same(restored, state)
  assert not fake.exists()  # cleaned up on construction


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from m6jax.checkpoint import Checkpoints
    ck = Checkpoints({workdir!r})
    ck.save_latest(1, {{"w": jnp.ones((64, 64))}}, {{"epoch": 1}})
    ck.wait()
    async def die(self, *a, **k):  # everything written, not yet committed
      os.kill(os.getpid(), signal.SIGKILL)
    atomicity.AtomicRenameTemporaryPath.finalize = die
    ck.save_latest(2, {{"w": jnp.full((64, 64), 2.0)}}, {{"epoch": 2}})
    ck.wait()
    print("NOT KILLED")
""")


def test_process_killed_mid_save(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = CHILD.format(repo=repo, workdir=str(tmp_path))
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
  latest = tmp_path / "checkpoints" / "latest"
  names = os.listdir(latest)
  assert "1" in names and "2" not in names
  assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names
  with Checkpoints(tmp_path) as ck:
    assert ck.latest_step() == 1
    state, extra = ck.restore_latest({"w": jnp.zeros((64, 64))})
  np.testing.assert_array_equal(np.asarray(state["w"]), 1.0)
  assert extra == {"epoch": 1}


def test_disabled_is_a_no_op(tmp_path):
  ck = Checkpoints(tmp_path / "run", enabled=False)
  state = make_state()
  assert ck.save_latest(1, state, {"a": 1}) is None
  assert ck.save_best(1, state, 1.0) is None
  assert ck.latest_step() is None and ck.best_step() is None
  assert ck.restore_latest(state) is None and ck.restore_best(state) is None
  assert ck.wait() is None and ck.close() is None
  assert os.listdir(tmp_path) == []


def test_closed_instance_raises(tmp_path):
  ck = Checkpoints(tmp_path)
  ck.close()
  ck.close()  # idempotent
  with pytest.raises(RuntimeError):
    ck.save_latest(1, make_state())
