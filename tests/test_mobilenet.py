"""MobileNetV2: Keras weight import and parity with keras.applications.MobileNetV2."""

import os

os.environ["KERAS_BACKEND"] = "jax"  # must precede the first keras import

import types

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from m6jax.models import mobilenet  # noqa: E402
from m6jax.models.vgg import read_keras_h5, write_keras_h5_legacy  # noqa: E402

# 72 -> 36, 18, 9, 5, 3: the strided depthwise convs see even (asymmetric
# correct_pad) and odd sizes.
S = 72
LAST = "out_relu"


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
  d = tmp_path_factory.mktemp("mobilenetv2")
  # One include_top model; its sub-model up to the last block is exactly
  # MobileNetV2(include_top=False) (same layers), and saves as a notop file.
  top = keras.applications.MobileNetV2(weights=None, include_top=True, classes=1000,
                                       classifier_activation=None,
                                       input_shape=(S, S, 3))
  _randomise(top)
  notop = keras.Model(top.inputs, top.get_layer(LAST).output)
  x = np.random.default_rng(1).uniform(0, 255, (2, S, S, 3)).astype(np.float32)
  xp = np.asarray(mobilenet.preprocess(x))
  return types.SimpleNamespace(
      x=xp, notop=notop, files=_save_all(notop, d, "notop"),
      top_file=_save_keras3(top, d / "top.weights.h5"),
      fmap=notop.predict(xp, verbose=0), logits=top.predict(xp, verbose=0), dir=d)


def _forward(model, variables, x, **kw):
  return jax.jit(lambda v, x: model.apply(v, x, **kw))(variables, x)


def test_preprocess_is_keras_tf_mode():
  from keras.applications import mobilenet_v2
  x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(mobilenet.preprocess(x), mobilenet_v2.preprocess_input(x.copy()),
                             atol=1e-6)


@pytest.mark.parity
def test_notop_parity_all_formats(ref):
  loaded = {fmt: mobilenet.load_keras(p) for fmt, p in ref.files.items()}
  base = loaded["keras3"]
  for fmt, v in loaded.items():  # every format gives identical variables
    jax.tree.map(np.testing.assert_array_equal, v, base)
  assert set(base) == {"params", "batch_stats"}
  out = _forward(mobilenet.MobileNetV2(), base, ref.x)
  assert out["feature_map"].shape == ref.fmap.shape == (2, 3, 3, mobilenet.FEATURE_DIM)
  d_map = float(np.abs(np.asarray(out["feature_map"]) - ref.fmap).max())
  d_emb = float(np.abs(np.asarray(out["embedding"]) - ref.fmap.mean(axis=(1, 2))).max())
  print(f"mobilenetv2 notop |d| feature_map {d_map:.2e} embedding {d_emb:.2e} "
        f"(max |ref| {np.abs(ref.fmap).max():.1f})")
  assert d_map <= 1e-4 and d_emb <= 1e-4
  assert out["stage3"].shape == (2, 9, 9, 32) and out["stage7"].shape == (2, 3, 3, 320)


@pytest.mark.parity
def test_top_parity(ref):
  v = mobilenet.load_keras(ref.top_file, num_classes=1000)
  assert v["params"]["classifier"]["kernel"].shape == (1280, 1000)
  assert "classifier" not in mobilenet.load_keras(ref.top_file)["params"]  # default: backbone
  assert "classifier" in mobilenet.load_keras(ref.top_file, num_classes=None)["params"]
  out = _forward(mobilenet.MobileNetV2(num_classes=1000), v, ref.x)
  d = float(np.abs(np.asarray(out["logits"]) - ref.logits).max())
  print(f"mobilenetv2 top |d| logits {d:.2e}")
  assert d <= 1e-4


@pytest.mark.parity
def test_train_mode_matches_keras_and_updates_stats(ref):
  v = mobilenet.load_keras(ref.files["keras3"])
  model = mobilenet.MobileNetV2()
  out, upd = _forward(model, v, ref.x, train=True, mutable=["batch_stats"])
  # Keras training=True: batch statistics and moving-average update.
  nt = ref.notop
  fn = jax.jit(lambda tv, ntv, x: nt.stateless_call(tv, ntv, x, training=True))
  y, new_ntv = fn([w.value for w in nt.trainable_variables],
                  [w.value for w in nt.non_trainable_variables], ref.x)
  new = {w.path: np.asarray(a) for w, a in zip(nt.non_trainable_variables, new_ntv)}
  d = float(np.abs(np.asarray(out["feature_map"]) - np.asarray(y)).max())
  print(f"mobilenetv2 train-mode |d| feature_map {d:.2e} (max |ref| "
        f"{np.abs(np.asarray(y)).max():.1f})")
  # Looser than inference: with 3x3 maps the last stages normalise over 18
  # values per channel, which amplifies float rounding.
  assert d <= 1e-3 * max(1.0, float(np.abs(np.asarray(y)).max()))
  bs, old = upd["batch_stats"], v["batch_stats"]
  for kpath, fpath in [("bn_Conv1", ("stem_bn",)),
                       ("block_13_depthwise_BN", ("stage6_block0", "depthwise_bn")),
                       ("Conv_1_bn", ("head_bn",))]:
    got_m, got_v = (jax.tree.map(np.asarray, _get(bs, fpath)[k]) for k in ("mean", "var"))
    assert not np.allclose(got_m, _get(old, fpath)["mean"])
    np.testing.assert_allclose(got_m, new[f"{kpath}/moving_mean"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_v, new[f"{kpath}/moving_variance"], rtol=1e-3, atol=1e-3)


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def test_perturb_gradient(ref):
  v = mobilenet.load_keras(ref.files["keras3"])
  model = mobilenet.MobileNetV2()
  pert = {"feature_map": jnp.zeros((2, 3, 3, mobilenet.FEATURE_DIM))}

  @jax.jit
  def grad(p):
    return jax.grad(lambda p: model.apply({**v, "perturbations": p}, ref.x)
                    ["embedding"].sum())(p)

  g = grad(pert)["feature_map"]
  assert g.shape == (2, 3, 3, mobilenet.FEATURE_DIM)
  np.testing.assert_allclose(g, 1 / 9, rtol=1e-6)  # d sum(mean over 3x3) / d cell


def test_bf16_compute_keeps_f32_params():
  model = mobilenet.MobileNetV2(num_classes=3, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  v = {k: c for k, c in v.items() if k != "perturbations"}
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(v))
  out = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
  assert out["feature_map"].dtype == jnp.bfloat16
  assert out["embedding"].dtype == out["logits"].dtype == jnp.float32


def test_param_paths_are_regex_friendly():
  model = mobilenet.MobileNetV2()
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  p = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
  blocks = {f"stage{s}_block{b}" for s, n in enumerate((1, 2, 3, 4, 3, 3, 1), 1)
            for b in range(n)}
  assert set(p) == {"stem_conv", "stem_bn", "head_conv", "head_bn"} | blocks
  assert set(p["stage1_block0"]) == {"depthwise", "depthwise_bn", "project", "project_bn"}
  assert p["stage2_block0"]["depthwise"]["kernel"].shape == (3, 3, 1, 96)


def test_load_errors_name_the_layer(ref):
  layers = read_keras_h5(ref.files["keras3"])
  names = list(layers)

  missing = dict(layers)
  del missing["block_7_expand_BN"]
  write_keras_h5_legacy(ref.dir / "missing.h5", missing)
  with pytest.raises(ValueError, match="'block_7_expand_BN' is missing"):
    mobilenet.load_keras(ref.dir / "missing.h5")

  bad = dict(layers)
  bad["block_3_depthwise"] = [np.zeros((3, 3, 144, 2), np.float32)]
  write_keras_h5_legacy(ref.dir / "bad.h5", bad, names)
  with pytest.raises(ValueError, match=r"'block_3_depthwise' weight 'kernel' has "
                                       r"shape \(3, 3, 144, 2\).*\(3, 3, 144, 1\)"):
    mobilenet.load_keras(ref.dir / "bad.h5")

  with pytest.raises(ValueError, match="no 'predictions' layer"):
    mobilenet.load_keras(ref.files["keras3"], num_classes=1000)
  with pytest.raises(ValueError, match=r"'Conv1' weight 'kernel' has shape "
                                       r"\(3, 3, 3, 32\), the model expects \(3, 3, 3, 16\)"):
    mobilenet.load_keras(ref.files["keras3"], alpha=0.5)  # width mismatch
  with pytest.raises(FileNotFoundError):
    mobilenet.load_keras(ref.dir / "nope.h5")
