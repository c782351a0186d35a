"""VGG16: Keras weight import and parity with keras.applications.VGG16."""

import os

os.environ["KERAS_BACKEND"] = "jax"  # must precede the first keras import

import types

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from m6jax.models import vgg  # noqa: E402
from m6jax.models.vgg import read_keras_h5, write_keras_h5_legacy  # noqa: E402

S = 64  # small input: 64 -> 2x2 final map
S_TOP = 32  # the Keras head flattens (S/32)^2 * 512 values: keep fc1 small


def _randomise(model, seed=0):
  """Random biases: Keras's zero init hides kernel/bias mapping bugs."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if not layer.weights:
      continue
    vals = []
    for w in layer.weights:
      v, kind = np.asarray(w.numpy()), w.path.split("/")[-1]
      if kind == "bias":
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
  d = tmp_path_factory.mktemp("vgg16")
  notop = keras.applications.VGG16(weights=None, include_top=False, input_shape=(S, S, 3))
  _randomise(notop)
  top = keras.applications.VGG16(weights=None, include_top=True, classes=1000,
                                 classifier_activation=None, input_shape=(S_TOP, S_TOP, 3))
  _randomise(top, seed=1)
  rng = np.random.default_rng(1)
  x = np.asarray(vgg.preprocess(rng.uniform(0, 255, (2, S, S, 3)).astype(np.float32)))
  xt = np.asarray(vgg.preprocess(rng.uniform(0, 255, (2, S_TOP, S_TOP, 3)).astype(np.float32)))
  return types.SimpleNamespace(
      x=x, xt=xt, files=_save_all(notop, d, "notop"),
      top_file=_save_keras3(top, d / "top.weights.h5"),
      fmap=notop.predict(x, verbose=0), logits=top.predict(xt, verbose=0), dir=d)


def _forward(model, variables, x, **kw):
  return jax.jit(lambda v, x: model.apply(v, x, **kw))(variables, x)


def test_preprocess_is_keras_caffe():
  from keras.applications import vgg16
  x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(vgg.preprocess(x), vgg16.preprocess_input(x.copy()), atol=1e-4)


@pytest.mark.parity
def test_notop_parity_all_formats(ref):
  loaded = {fmt: vgg.load_keras(p) for fmt, p in ref.files.items()}
  base = loaded["keras3"]
  for fmt, v in loaded.items():  # every format gives identical variables
    jax.tree.map(np.testing.assert_array_equal, v, base)
  assert set(base) == {"params"}
  out = _forward(vgg.VGG16(), base, ref.x)
  assert out["feature_map"].shape == ref.fmap.shape == (2, 2, 2, vgg.FEATURE_DIM)
  d_map = float(np.abs(np.asarray(out["feature_map"]) - ref.fmap).max())
  d_emb = float(np.abs(np.asarray(out["embedding"]) - ref.fmap.mean(axis=(1, 2))).max())
  print(f"vgg16 notop |d| feature_map {d_map:.2e} embedding {d_emb:.2e} "
        f"(max |ref| {np.abs(ref.fmap).max():.1f})")
  assert d_map <= 1e-4 and d_emb <= 1e-4
  assert out["block5_conv3"].shape == (2, 4, 4, 512)
  assert out["block4"].shape == (2, 4, 4, 512)


@pytest.mark.parity
def test_top_parity(ref):
  v = vgg.load_keras(ref.top_file, num_classes=1000)
  p = v["params"]
  assert p["fc1"]["kernel"].shape == (512, 4096)
  assert p["classifier"]["kernel"].shape == (4096, 1000)
  assert not {"fc1", "classifier"} & set(vgg.load_keras(ref.top_file)["params"])
  out = _forward(vgg.VGG16(num_classes=1000), v, ref.xt)
  d = float(np.abs(np.asarray(out["logits"]) - ref.logits).max())
  print(f"vgg16 top |d| logits {d:.2e} (max |ref| {np.abs(ref.logits).max():.1f})")
  assert d <= 1e-4 * max(1.0, float(np.abs(ref.logits).max()))


def test_train_flag_and_perturb_gradient(ref):
  v = vgg.load_keras(ref.files["keras3"])
  model = vgg.VGG16()
  # No BatchNorm/dropout: train=True is the same function, nothing to update.
  out, upd = _forward(model, v, ref.x, train=True, mutable=["batch_stats"])
  assert not upd
  np.testing.assert_allclose(out["feature_map"], ref.fmap, atol=1e-4)
  pert = {"feature_map": jnp.zeros((2, 2, 2, vgg.FEATURE_DIM))}

  @jax.jit
  def grad(p):
    return jax.grad(lambda p: model.apply({**v, "perturbations": p}, ref.x)
                    ["embedding"].sum())(p)

  g = grad(pert)["feature_map"]
  assert g.shape == (2, 2, 2, vgg.FEATURE_DIM)
  np.testing.assert_allclose(g, 0.25)  # d sum(mean over 2x2) / d cell


def test_bf16_compute_keeps_f32_params():
  model = vgg.VGG16(num_classes=3, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  v = {k: c for k, c in v.items() if k != "perturbations"}
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(v))
  out = jax.eval_shape(lambda v, x: model.apply(v, x), v, x)
  assert out["feature_map"].dtype == jnp.bfloat16
  assert out["embedding"].dtype == out["logits"].dtype == jnp.float32


def test_param_paths_match_keras_names():
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  p = jax.eval_shape(lambda x: vgg.VGG16().init(jax.random.key(0), x), x)["params"]
  assert set(p) == {f"block{b}_conv{i}" for b, n in enumerate((2, 2, 3, 3, 3), 1)
                    for i in range(1, n + 1)}


def test_load_errors_name_the_layer(ref):
  layers = read_keras_h5(ref.files["keras3"])
  names = list(layers)

  missing = dict(layers)
  del missing["block4_conv2"]
  write_keras_h5_legacy(ref.dir / "missing.h5", missing)
  with pytest.raises(ValueError, match="'block4_conv2' is missing"):
    vgg.load_keras(ref.dir / "missing.h5")

  bad = dict(layers)
  bad["block3_conv1"] = [layers["block3_conv1"][0], np.zeros((255,), np.float32)]
  write_keras_h5_legacy(ref.dir / "bad.h5", bad, names)
  with pytest.raises(ValueError, match=r"'block3_conv1' weight 'bias' has shape "
                                       r"\(255,\), the model expects \(256,\)"):
    vgg.load_keras(ref.dir / "bad.h5")

  extra = dict(layers, mystery_conv=[np.zeros((3, 3, 3, 8), np.float32)])
  write_keras_h5_legacy(ref.dir / "extra.h5", extra)
  with pytest.raises(ValueError, match="layers the model does not: \\['mystery_conv'\\]"):
    vgg.load_keras(ref.dir / "extra.h5")

  with pytest.raises(ValueError, match="no 'predictions' layer"):
    vgg.load_keras(ref.files["keras3"], num_classes=1000)
  with pytest.raises(ValueError, match="asked for a 10-class head, the file has 1000"):
    vgg.load_keras(ref.top_file, num_classes=10)
  with pytest.raises(FileNotFoundError):
    vgg.load_keras(ref.dir / "nope.h5")
