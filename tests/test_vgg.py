"""VGG16: Keras weight import and parity with keras.applications.VGG16."""

import os

os.environ["KERAS_BACKEND"] = "jax"  # must precede the first keras import

import types

import jax.numpy as jnp
import numpy as np
import pytest

keras = pytest.importorskip("keras")

import keras_ref as kr  # noqa: E402
from m6jax.models import vgg  # noqa: E402
from m6jax.models.weights.keras_h5 import write_keras_h5_legacy  # noqa: E402

S = 64  # small input: 64 -> 2x2 final map
S_TOP = 32  # the Keras head flattens (S/32)^2 * 512 values: keep fc1 small


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  keras = kr.seeded_keras()
  d = tmp_path_factory.mktemp("vgg16")
  notop = keras.applications.VGG16(weights=None, include_top=False, input_shape=(S, S, 3))
  kr.randomise(notop)  # no BatchNorm: only the biases change
  top = keras.applications.VGG16(weights=None, include_top=True, classes=1000,
                                 classifier_activation=None, input_shape=(S_TOP, S_TOP, 3))
  kr.randomise(top, seed=1)
  rng = np.random.default_rng(1)
  x = np.asarray(vgg.preprocess(rng.uniform(0, 255, (2, S, S, 3)).astype(np.float32)))
  xt = np.asarray(vgg.preprocess(rng.uniform(0, 255, (2, S_TOP, S_TOP, 3)).astype(np.float32)))
  return types.SimpleNamespace(
      x=x, xt=xt, files=kr.save_all(notop, d, "notop"),
      top_file=kr.save_keras3(top, d / "top.weights.h5"),
      fmap=notop.predict(x, verbose=0), logits=top.predict(xt, verbose=0), dir=d)


def test_preprocess_is_keras_caffe():
  from keras.applications import vgg16
  x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(vgg.preprocess(x), vgg16.preprocess_input(x.copy()), atol=1e-4)


@pytest.mark.parity
def test_notop_parity_all_formats(ref):
  out = kr.check_notop_parity(vgg.load_keras, vgg.VGG16(), ref, (2, 2, 2, vgg.FEATURE_DIM),
                              {"params"}, "vgg16")
  assert out["block5_conv3"].shape == (2, 4, 4, 512)
  assert out["block4"].shape == (2, 4, 4, 512)


@pytest.mark.parity
def test_top_parity(ref):
  v = vgg.load_keras(ref.top_file, num_classes=1000)
  p = v["params"]
  assert p["fc1"]["kernel"].shape == (512, 4096)
  assert p["classifier"]["kernel"].shape == (4096, 1000)
  assert not {"fc1", "classifier"} & set(vgg.load_keras(ref.top_file)["params"])
  out = kr.forward(vgg.VGG16(num_classes=1000), v, ref.xt)
  d = kr.max_diff(out["logits"], ref.logits)
  print(f"vgg16 top |d| logits {d:.2e} (max |ref| {np.abs(ref.logits).max():.1f})")
  assert d <= 1e-4 * max(1.0, float(np.abs(ref.logits).max()))


def test_train_flag_and_perturb_gradient(ref):
  v = vgg.load_keras(ref.files["keras3"])
  model = vgg.VGG16()
  # No BatchNorm/dropout: train=True is the same function, nothing to update.
  out, upd = kr.forward(model, v, ref.x, train=True, mutable=["batch_stats"])
  assert not upd
  np.testing.assert_allclose(out["feature_map"], ref.fmap, atol=1e-4)
  # d sum(mean over 2x2) / d cell
  kr.check_perturb_gradient(model, v, ref.x, (2, 2, 2, vgg.FEATURE_DIM), 0.25)


def test_bf16_compute_keeps_f32_params():
  kr.check_bf16_keeps_f32_params(vgg.VGG16(num_classes=3, dtype=jnp.bfloat16))


def test_param_paths_match_keras_names():
  p = kr.param_shapes(vgg.VGG16())
  assert set(p) == {f"block{b}_conv{i}" for b, n in enumerate((2, 2, 3, 3, 3), 1)
                    for i in range(1, n + 1)}


def test_load_errors_name_the_layer(ref):
  layers = kr.check_load_errors(
      vgg.load_keras, ref, "block4_conv2",
      lambda l: {"block3_conv1": [l["block3_conv1"][0], np.zeros((255,), np.float32)]},
      r"'block3_conv1' weight 'bias' has shape \(255,\), the model expects \(256,\)")

  extra = dict(layers, mystery_conv=[np.zeros((3, 3, 3, 8), np.float32)])
  write_keras_h5_legacy(ref.dir / "extra.h5", extra)
  with pytest.raises(ValueError, match="layers the model does not: \\['mystery_conv'\\]"):
    vgg.load_keras(ref.dir / "extra.h5")

  with pytest.raises(ValueError, match="asked for a 10-class head, the file has 1000"):
    vgg.load_keras(ref.top_file, num_classes=10)
