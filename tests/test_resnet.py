"""ResNet50: Keras weight import and parity with keras.applications.ResNet50."""

import os

os.environ["KERAS_BACKEND"] = "jax"  # must precede the first keras import

import types

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from m6jax.models import resnet  # noqa: E402
from m6jax.models.vgg import read_keras_h5, write_keras_h5_legacy  # noqa: E402

S = 64  # small input: 64 -> 2x2 final map
LAST = "conv5_block3_out"


def _randomise(model, seed=0):
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


def _save_all(model, d, stem):
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


def _save_keras3(model, path):
  model.save_weights(path)
  return path


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  if keras.backend.backend() != "jax":
    pytest.skip("keras was imported with another backend before this module")
  keras.utils.set_random_seed(0)  # deterministic Keras kernel init
  d = tmp_path_factory.mktemp("resnet50")
  # One include_top model; its sub-model up to the last block is exactly
  # ResNet50(include_top=False) (same layers), and saves as a notop file.
  top = keras.applications.ResNet50(weights=None, include_top=True, classes=1000,
                                    classifier_activation=None, input_shape=(S, S, 3))
  _randomise(top)
  # conv1_bn sees caffe-range (+-128) inputs: a realistic moving variance keeps
  # activations O(10) instead of O(100), so 1e-4 is a float32-sized tolerance.
  bn = top.get_layer("conv1_bn")
  w = bn.get_weights()
  bn.set_weights(w[:3] + [w[3] * 1e4])
  notop = keras.Model(top.inputs, top.get_layer(LAST).output)
  x = np.random.default_rng(1).uniform(0, 255, (2, S, S, 3)).astype(np.float32)
  xp = np.asarray(resnet.preprocess(x))
  return types.SimpleNamespace(
      x=xp, notop=notop, files=_save_all(notop, d, "notop"),
      top_file=_save_keras3(top, d / "top.weights.h5"),
      fmap=notop.predict(xp, verbose=0), logits=top.predict(xp, verbose=0), dir=d)


def _forward(model, variables, x, **kw):
  return jax.jit(lambda v, x: model.apply(v, x, **kw))(variables, x)


def test_preprocess_is_keras_caffe():
  from keras.applications import resnet50
  x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(resnet.preprocess(x), resnet50.preprocess_input(x.copy()),
                             atol=1e-4)


@pytest.mark.parity
def test_notop_parity_all_formats(ref):
  loaded = {fmt: resnet.load_keras(p) for fmt, p in ref.files.items()}
  base = loaded["keras3"]
  for fmt, v in loaded.items():  # every format gives identical variables
    jax.tree.map(np.testing.assert_array_equal, v, base)
  assert set(base) == {"params", "batch_stats"}
  out = _forward(resnet.ResNet50(), base, ref.x)
  assert out["feature_map"].shape == ref.fmap.shape == (2, 2, 2, resnet.FEATURE_DIM)
  d_map = float(np.abs(np.asarray(out["feature_map"]) - ref.fmap).max())
  d_emb = float(np.abs(np.asarray(out["embedding"]) - ref.fmap.mean(axis=(1, 2))).max())
  print(f"resnet50 notop |d| feature_map {d_map:.2e} embedding {d_emb:.2e} "
        f"(max |ref| {np.abs(ref.fmap).max():.1f})")
  assert d_map <= 1e-4 and d_emb <= 1e-4
  assert out["stage3"].shape == (2, 4, 4, 1024)


@pytest.mark.parity
def test_top_parity(ref):
  v = resnet.load_keras(ref.top_file, num_classes=1000)
  assert v["params"]["classifier"]["kernel"].shape == (2048, 1000)
  assert "classifier" not in resnet.load_keras(ref.top_file)["params"]  # default: backbone
  assert "classifier" in resnet.load_keras(ref.top_file, num_classes=None)["params"]
  out = _forward(resnet.ResNet50(num_classes=1000), v, ref.x)
  d = float(np.abs(np.asarray(out["logits"]) - ref.logits).max())
  print(f"resnet50 top |d| logits {d:.2e}")
  assert d <= 1e-4


@pytest.mark.parity
def test_train_mode_matches_keras_and_updates_stats(ref):
  v = resnet.load_keras(ref.files["keras3"])
  model = resnet.ResNet50()
  out, upd = _forward(model, v, ref.x, train=True, mutable=["batch_stats"])
  # Keras training=True: batch statistics and moving-average update.
  nt = ref.notop
  fn = jax.jit(lambda tv, ntv, x: nt.stateless_call(tv, ntv, x, training=True))
  y, new_ntv = fn([w.value for w in nt.trainable_variables],
                  [w.value for w in nt.non_trainable_variables], ref.x)
  new = {w.path: np.asarray(a) for w, a in zip(nt.non_trainable_variables, new_ntv)}
  d = float(np.abs(np.asarray(out["feature_map"]) - np.asarray(y)).max())
  print(f"resnet50 train-mode |d| feature_map {d:.2e} (max |ref| "
        f"{np.abs(np.asarray(y)).max():.1f})")
  # Looser than inference: with 2x2 maps the last stages normalise over 8
  # values per channel, which amplifies float rounding (relative ~1e-4).
  assert d <= 1e-3 * max(1.0, float(np.abs(np.asarray(y)).max()))
  bs, old = upd["batch_stats"], v["batch_stats"]
  for kpath, fpath in [("conv1_bn", ("stem", "bn")),
                       ("conv4_block2_2_bn", ("stage3_block1", "bn2"))]:
    got_m, got_v = bs[fpath[0]][fpath[1]]["mean"], bs[fpath[0]][fpath[1]]["var"]
    assert not np.allclose(got_m, old[fpath[0]][fpath[1]]["mean"])
    np.testing.assert_allclose(got_m, new[f"{kpath}/moving_mean"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_v, new[f"{kpath}/moving_variance"], rtol=1e-3, atol=1e-3)


def test_perturb_gradient(ref):
  v = resnet.load_keras(ref.files["keras3"])
  model = resnet.ResNet50()
  pert = {"feature_map": jnp.zeros((2, 2, 2, resnet.FEATURE_DIM))}

  @jax.jit
  def grad(p):
    return jax.grad(lambda p: model.apply({**v, "perturbations": p}, ref.x)
                    ["embedding"].sum())(p)

  g = grad(pert)["feature_map"]
  assert g.shape == (2, 2, 2, resnet.FEATURE_DIM)
  np.testing.assert_allclose(g, 0.25)  # d sum(mean over 2x2) / d cell


def test_bf16_compute_keeps_f32_params():
  model = resnet.ResNet50(num_classes=3, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  v = {k: c for k, c in v.items() if k != "perturbations"}
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(v))
  out = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
  assert out["feature_map"].dtype == jnp.bfloat16
  assert out["embedding"].dtype == out["logits"].dtype == jnp.float32


def test_param_paths_are_regex_friendly():
  model = resnet.ResNet50()
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  p = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
  assert set(p) == {"stem"} | {f"stage{s}_block{b}" for s, n in
                               enumerate((3, 4, 6, 3), 1) for b in range(n)}
  assert set(p["stage1_block0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                     "proj_conv", "proj_bn"}


def test_load_errors_name_the_layer(ref):
  layers = read_keras_h5(ref.files["keras3"])
  names = list(layers)

  missing = dict(layers)
  del missing["conv4_block2_2_bn"]
  write_keras_h5_legacy(ref.dir / "missing.h5", missing)
  with pytest.raises(ValueError, match="'conv4_block2_2_bn' is missing"):
    resnet.load_keras(ref.dir / "missing.h5")

  bad = dict(layers)
  bad["conv3_block1_1_conv"] = [np.zeros((1, 1, 256, 64), np.float32),
                                layers["conv3_block1_1_conv"][1]]
  write_keras_h5_legacy(ref.dir / "bad.h5", bad, names)
  with pytest.raises(ValueError, match=r"'conv3_block1_1_conv' weight 'kernel' has "
                                       r"shape \(1, 1, 256, 64\).*\(1, 1, 256, 128\)"):
    resnet.load_keras(ref.dir / "bad.h5")

  with pytest.raises(ValueError, match="no 'predictions' layer"):
    resnet.load_keras(ref.files["keras3"], num_classes=1000)
  with pytest.raises(FileNotFoundError):
    resnet.load_keras(ref.dir / "nope.h5")
