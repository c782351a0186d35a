"""m6jax.train.checkpoint: round trips, retention, atomicity, unreadable steps, disabled mode."""

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

from m6jax.train.checkpoint import CheckpointError, Checkpoints

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
    assert ck.latest_step() == 11 and ck.all_steps() == [11]
    restored2, _ = ck.restore_latest(abstract)
  assert_same(restored2, state)


def test_latest_retention(tmp_path):
  with Checkpoints(tmp_path, keep_latest=2) as ck:
    for s in range(1, 6):
      assert ck.save_latest(s, make_state(seed=s, step=s), {"epoch": s}) is True
    assert ck.save_latest(5, make_state(), {"epoch": 99}) is False   # never overwritten
    ck.wait()
    assert ck.latest_step() == 5
    latest_state, latest_extra = ck.restore_latest(make_state())
  assert steps_on_disk(tmp_path / "checkpoints" / "latest") == [4, 5]
  assert_same(latest_state, make_state(seed=5, step=5)) and latest_extra == {"epoch": 5}


def _two_steps(tmp_path):
  with Checkpoints(tmp_path) as ck:
    ck.save_latest(1, make_state(seed=1, step=1), {"epoch": 1})
    ck.save_latest(2, make_state(seed=2, step=2), {"epoch": 2})
  return tmp_path / "checkpoints" / "latest"


def test_truncated_latest_step_falls_back_and_is_moved_aside(tmp_path, caplog):
  latest = _two_steps(tmp_path)
  data = [p for p in (latest / "2" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data
  for p in data:   # what a full disk or a killed copy leaves
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  with Checkpoints(tmp_path) as ck:
    state, extra = ck.restore_latest(make_state())
    assert extra == {"epoch": 1}
    assert_same(state, make_state(seed=1, step=1))
    assert "step 2" in caplog.text and str(latest) in caplog.text
    # Training goes on from epoch 1: step 2 is written again, the bad copy kept aside.
    assert ck.save_latest(2, make_state(seed=7, step=2), {"epoch": 2}) is True
    ck.wait()
    state, extra = ck.restore_latest(make_state())
  assert extra == {"epoch": 2} and steps_on_disk(latest) == [1, 2]
  corrupt = os.listdir(tmp_path / "checkpoints" / "corrupt")
  assert len(corrupt) == 1 and corrupt[0].startswith("2-")


def test_restore_step_reads_exactly_that_step_or_refuses(tmp_path):
  latest = _two_steps(tmp_path)
  with Checkpoints(tmp_path, read_only=True) as ck:
    state, extra = ck.restore_step(1, make_state())
    assert extra == {"epoch": 1}
    assert_same(state, make_state(seed=1, step=1))
    with pytest.raises(CheckpointError, match=r"scored checkpoint step 3, but .* holds "
                       r"step\(s\) \[1, 2\] \(newest 2\)"):
      ck.restore_step(3, make_state())
  for p in (latest / "2" / "state").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  with Checkpoints(tmp_path, read_only=True) as ck:   # no fallback to step 1
    with pytest.raises(CheckpointError, match=r"scored checkpoint step 2, which cannot be read"
                       r".*other step\(s\) \[1\] are not what was scored"):
      ck.restore_step(2, make_state())


def test_no_readable_step_names_the_folder_to_delete(tmp_path):
  with Checkpoints(tmp_path) as ck:
    ck.save_latest(1, make_state(), {"epoch": 1})
  (tmp_path / "checkpoints" / "latest" / "1" / "meta" / "metadata").write_text("")
  with Checkpoints(tmp_path) as ck:
    with pytest.raises(CheckpointError) as e:
      ck.restore_latest(make_state())
  msg = str(e.value)
  assert "empty files: meta/metadata" in msg
  assert f"Delete {tmp_path / 'checkpoints'}" in msg
  assert "JSONDecodeError" in msg.split("(", 1)[1]   # the cause, as one line, not a traceback


def test_read_only_writes_nothing(tmp_path):
  with Checkpoints(tmp_path / "none", read_only=True) as ck:
    assert ck.restore_latest(make_state()) is None
  assert not (tmp_path / "none").exists()
  latest = _two_steps(tmp_path)
  (latest / "2" / "meta" / "metadata").write_text("")
  with Checkpoints(tmp_path, read_only=True) as ck:
    _, extra = ck.restore_latest(make_state())
    with pytest.raises(RuntimeError, match="read-only"):
      ck.save_latest(3, make_state())
  assert extra == {"epoch": 1} and steps_on_disk(latest) == [1, 2]
  assert not (tmp_path / "checkpoints" / "corrupt").exists()


def test_nothing_saved_restores_none(tmp_path):
  with Checkpoints(tmp_path) as ck:
    assert ck.latest_step() is None and ck.all_steps() == []
    assert ck.restore_latest(make_state()) is None


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
    import os, signal
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from m6jax.train.checkpoint import Checkpoints
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
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     cwd=repo)
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
  assert ck.latest_step() is None and ck.all_steps() == []
  assert ck.restore_latest(state) is None
  assert ck.wait() is None and ck.close() is None
  assert os.listdir(tmp_path) == []


def test_closed_instance_raises(tmp_path):
  ck = Checkpoints(tmp_path)
  ck.close()
  ck.close()  # idempotent
  with pytest.raises(RuntimeError):
    ck.save_latest(1, make_state())


def test_train_state_selected_epoch_round_trips(tmp_path):
  from m6jax.train import steps
  tx = optax.adam(1e-3)
  init = jax.vmap(lambda w: steps.new_state({"w": w}, {}, tx))
  state = init(jnp.zeros((K, 2)))
  assert np.asarray(state.best_epoch).tolist() == [-1] * K     # nothing selected yet
  keep = jax.vmap(steps.keep_best, in_axes=(0, 0, None))
  state = keep(state, jnp.asarray([0.5, -jnp.inf, 0.2]), 4)   # replica 1 does not improve
  with Checkpoints(tmp_path) as ck:
    ck.save_latest(1, state, {"epoch": 4})
    ck.wait()
    restored, _ = ck.restore_latest(init(jnp.ones((K, 2))))
  assert np.asarray(restored.best_epoch).tolist() == [4, -1, 4]
  assert_same(restored, state)
