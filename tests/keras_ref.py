"""Shared helpers for the Keras-parity backbone tests (vgg, resnet, mobilenet).

Not a test module. keras is imported lazily: the test modules set
KERAS_BACKEND and importorskip it first.
"""

import types

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6jax.models.weights.keras_h5 import read_keras_h5, write_keras_h5_legacy


def seeded_keras():
  """keras (jax backend) with a deterministic kernel init; skips on another backend."""
  import keras
  if keras.backend.backend() != "jax":
    pytest.skip("keras was imported with another backend before this module")
  keras.utils.set_random_seed(0)  # deterministic Keras kernel init
  return keras


def randomise(model, seed=0):
  """Random biases/BN params and stats: Keras's 0/1 inits hide mapping bugs."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if not layer.weights:
      continue
    vals = []
    for w in layer.weights:
      v, kind = np.asarray(w.numpy()), w.path.split("/")[-1]
      if kind == "moving_variance":
        v = rng.uniform(0.5, 2.0, v.shape)
      elif kind == "moving_mean":
        v = rng.normal(0.0, 0.5, v.shape)
      elif kind == "gamma":
        v = rng.uniform(0.5, 1.5, v.shape)
      elif kind in ("beta", "bias"):
        v = rng.normal(0.0, 0.1, v.shape)
      vals.append(v.astype(np.float32))
    layer.set_weights(vals)


def save_all(model, d, stem):
  """Saves `model` as Keras 3 .weights.h5, Keras's own legacy .h5 and a
  keras-2-style .h5 (names 'layer/kernel:0', like the cached ImageNet files)."""
  files = {"keras3": d / f"{stem}.weights.h5"}
  model.save_weights(files["keras3"])
  try:
    from keras.src.legacy.saving import legacy_h5_format
    files["legacy"] = d / f"{stem}.h5"
    with h5py.File(files["legacy"], "w") as f:
      legacy_h5_format.save_weights_to_hdf5_group(f, model)
  except ImportError:  # keras dropped its legacy writer: the keras-2 file still covers it
    files.pop("legacy", None)
  files["keras2"] = d / f"{stem}_k2.h5"
  layers = {l.name: [np.asarray(w.numpy()) for w in l.weights] for l in model.layers}
  write_keras_h5_legacy(files["keras2"], layers, [l.name for l in model.layers])
  model.load_weights(files["keras2"])  # Keras accepts our legacy layout
  return files


def save_keras3(model, path):
  model.save_weights(path)
  return path


def top_and_notop(top, last, preprocess, size, d):
  """Reference data from a randomised include_top model: its sub-model up to
  layer `last` is exactly the include_top=False model (same layers) and is
  saved in every format; `top` as a .weights.h5."""
  import keras
  notop = keras.Model(top.inputs, top.get_layer(last).output)
  x = np.random.default_rng(1).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
  xp = np.asarray(preprocess(x))
  return types.SimpleNamespace(
      x=xp, notop=notop, files=save_all(notop, d, "notop"),
      top_file=save_keras3(top, d / "top.weights.h5"),
      fmap=notop.predict(xp, verbose=0), logits=top.predict(xp, verbose=0), dir=d)


def forward(model, variables, x, **kw):
  return jax.jit(lambda v, x: model.apply(v, x, **kw))(variables, x)


def max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def check_notop_parity(load_keras, model, ref, shape, collections, name):
  """Every saved format loads to identical variables whose forward pass
  matches Keras's notop output (and its average); returns the outputs."""
  loaded = {fmt: load_keras(p) for fmt, p in ref.files.items()}
  base = loaded["keras3"]
  for fmt, v in loaded.items():  # every format gives identical variables
    jax.tree.map(np.testing.assert_array_equal, v, base)
  assert set(base) == collections
  out = forward(model, base, ref.x)
  assert out["feature_map"].shape == ref.fmap.shape == shape
  d_map = max_diff(out["feature_map"], ref.fmap)
  d_emb = max_diff(out["embedding"], ref.fmap.mean(axis=(1, 2)))
  print(f"{name} notop |d| feature_map {d_map:.2e} embedding {d_emb:.2e} "
        f"(max |ref| {np.abs(ref.fmap).max():.1f})")
  assert d_map <= 1e-4 and d_emb <= 1e-4
  return out


def check_top_parity(load_keras, model_cls, ref, feature_dim, name):
  """The 1000-class 'predictions' head: loaded only when asked, logits match."""
  v = load_keras(ref.top_file, num_classes=1000)
  assert v["params"]["classifier"]["kernel"].shape == (feature_dim, 1000)
  assert "classifier" not in load_keras(ref.top_file)["params"]  # default: backbone
  assert "classifier" in load_keras(ref.top_file, num_classes=None)["params"]
  out = forward(model_cls(num_classes=1000), v, ref.x)
  d = max_diff(out["logits"], ref.logits)
  print(f"{name} top |d| logits {d:.2e}")
  assert d <= 1e-4


def check_train_mode(model, v, ref, bn_paths, name):
  """Flax train=True vs Keras training=True: the feature map (within 1e-3 of
  its scale) and the BN moving-average updates ({Keras layer: Flax path})."""
  out, upd = forward(model, v, ref.x, train=True, mutable=["batch_stats"])
  # Keras training=True: batch statistics and moving-average update.
  nt = ref.notop
  fn = jax.jit(lambda tv, ntv, x: nt.stateless_call(tv, ntv, x, training=True))
  y, new_ntv = fn([w.value for w in nt.trainable_variables],
                  [w.value for w in nt.non_trainable_variables], ref.x)
  new = {w.path: np.asarray(a) for w, a in zip(nt.non_trainable_variables, new_ntv)}
  d = max_diff(out["feature_map"], y)
  print(f"{name} train-mode |d| feature_map {d:.2e} (max |ref| "
        f"{np.abs(np.asarray(y)).max():.1f})")
  # Looser than inference: with the tiny test maps the last stages normalise
  # over a few values per channel, which amplifies float rounding.
  assert d <= 1e-3 * max(1.0, float(np.abs(np.asarray(y)).max()))
  bs, old = upd["batch_stats"], v["batch_stats"]
  for kpath, fpath in bn_paths.items():
    got_m, got_v = (jax.tree.map(np.asarray, get(bs, fpath)[k]) for k in ("mean", "var"))
    assert not np.allclose(got_m, get(old, fpath)["mean"])
    np.testing.assert_allclose(got_m, new[f"{kpath}/moving_mean"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_v, new[f"{kpath}/moving_variance"], rtol=1e-3, atol=1e-3)


def check_perturb_gradient(model, v, x, shape, cell_grad, **tol):
  """d sum(embedding) / d feature_map perturbation = 1/(H*W) in every cell."""
  pert = {"feature_map": jnp.zeros(shape)}

  @jax.jit
  def grad(p):
    return jax.grad(lambda p: model.apply({**v, "perturbations": p}, x)
                    ["embedding"].sum())(p)

  g = grad(pert)["feature_map"]
  assert g.shape == shape
  np.testing.assert_allclose(g, cell_grad, **tol)


def check_bf16_keeps_f32_params(model):
  """`model` built with dtype=bfloat16 and a head: f32 variables, bf16 map,
  f32 embedding and logits."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  v = {k: c for k, c in v.items() if k != "perturbations"}
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(v))
  out = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
  assert out["feature_map"].dtype == jnp.bfloat16
  assert out["embedding"].dtype == out["logits"].dtype == jnp.float32


def param_shapes(model):
  """`model`'s 'params' shapes for a (1, 32, 32, 3) input, no compute."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]


def check_load_errors(load_keras, ref, missing, bad, bad_match):
  """Loading names the layer: `missing` dropped from the file, the layers
  `bad(layers)` returns swapped in (error matching `bad_match`), a head asked
  of a notop file, a file that does not exist. Returns the file's layers."""
  layers = read_keras_h5(ref.files["keras3"])
  names = list(layers)

  without = dict(layers)
  del without[missing]
  write_keras_h5_legacy(ref.dir / "missing.h5", without)
  with pytest.raises(ValueError, match=f"'{missing}' is missing"):
    load_keras(ref.dir / "missing.h5")

  write_keras_h5_legacy(ref.dir / "bad.h5", {**layers, **bad(layers)}, names)
  with pytest.raises(ValueError, match=bad_match):
    load_keras(ref.dir / "bad.h5")

  with pytest.raises(ValueError, match="no 'predictions' layer"):
    load_keras(ref.files["keras3"], num_classes=1000)
  with pytest.raises(FileNotFoundError):
    load_keras(ref.dir / "nope.h5")
  return layers


def strip_layer_names(src, dst):
  """Copy of a Keras 3 .weights.h5 without the layers' 'name' attributes, as
  Keras 3 versions before those attributes wrote it (automatic group names only)."""
  import shutil
  shutil.copy(src, dst)
  n = 0
  with h5py.File(dst, "r+") as f:
    def visit(_, obj):
      nonlocal n
      if isinstance(obj, h5py.Group) and obj.name.endswith("/vars") and "name" in obj.attrs:
        del obj.attrs["name"]
        n += 1
    f.visititems(visit)
  assert n > 0
  return dst
