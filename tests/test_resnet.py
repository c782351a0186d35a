"""ResNet50: Keras weight import and parity with keras.applications.ResNet50."""

import os

os.environ["KERAS_BACKEND"] = "jax"  # must precede the first keras import

import jax.numpy as jnp
import numpy as np
import pytest

keras = pytest.importorskip("keras")

import keras_ref as kr  # noqa: E402
from m6jax.models import resnet  # noqa: E402

S = 64  # small input: 64 -> 2x2 final map
LAST = "conv5_block3_out"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  keras = kr.seeded_keras()
  d = tmp_path_factory.mktemp("resnet50")
  top = keras.applications.ResNet50(weights=None, include_top=True, classes=1000,
                                    classifier_activation=None, input_shape=(S, S, 3))
  kr.randomise(top)
  # conv1_bn sees caffe-range (+-128) inputs: a realistic moving variance keeps
  # activations O(10) instead of O(100), so 1e-4 is a float32-sized tolerance.
  bn = top.get_layer("conv1_bn")
  w = bn.get_weights()
  bn.set_weights(w[:3] + [w[3] * 1e4])
  return kr.top_and_notop(top, LAST, resnet.preprocess, S, d)


def test_preprocess_is_keras_caffe():
  from keras.applications import resnet50
  x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(resnet.preprocess(x), resnet50.preprocess_input(x.copy()),
                             atol=1e-4)


@pytest.mark.parity
def test_notop_parity_all_formats(ref):
  out = kr.check_notop_parity(resnet.load_keras, resnet.ResNet50(), ref,
                              (2, 2, 2, resnet.FEATURE_DIM), {"params", "batch_stats"},
                              "resnet50")
  assert out["stage3"].shape == (2, 4, 4, 1024)


@pytest.mark.parity
def test_top_parity(ref):
  kr.check_top_parity(resnet.load_keras, resnet.ResNet50, ref, 2048, "resnet50")


@pytest.mark.parity
def test_train_mode_matches_keras_and_updates_stats(ref):
  # With 2x2 maps the last stages normalise over 8 values per channel
  # (relative rounding ~1e-4).
  kr.check_train_mode(resnet.ResNet50(), resnet.load_keras(ref.files["keras3"]), ref,
                      {"conv1_bn": ("stem", "bn"),
                       "conv4_block2_2_bn": ("stage3_block1", "bn2")}, "resnet50")


def test_perturb_gradient(ref):
  # d sum(mean over 2x2) / d cell
  kr.check_perturb_gradient(resnet.ResNet50(), resnet.load_keras(ref.files["keras3"]),
                            ref.x, (2, 2, 2, resnet.FEATURE_DIM), 0.25)


def test_bf16_compute_keeps_f32_params():
  kr.check_bf16_keeps_f32_params(resnet.ResNet50(num_classes=3, dtype=jnp.bfloat16))


def test_param_paths_are_regex_friendly():
  p = kr.param_shapes(resnet.ResNet50())
  assert set(p) == {"stem"} | {f"stage{s}_block{b}" for s, n in
                               enumerate((3, 4, 6, 3), 1) for b in range(n)}
  assert set(p["stage1_block0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                     "proj_conv", "proj_bn"}


def test_load_errors_name_the_layer(ref):
  kr.check_load_errors(
      resnet.load_keras, ref, "conv4_block2_2_bn",
      lambda l: {"conv3_block1_1_conv": [np.zeros((1, 1, 256, 64), np.float32),
                                         l["conv3_block1_1_conv"][1]]},
      r"'conv3_block1_1_conv' weight 'kernel' has shape \(1, 1, 256, 64\).*"
      r"\(1, 1, 256, 128\)")
