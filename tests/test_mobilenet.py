"""MobileNetV2: Keras weight import and parity with keras.applications.MobileNetV2."""

import os

os.environ["KERAS_BACKEND"] = "jax"  # must precede the first keras import

import jax
import jax.numpy as jnp
import numpy as np
import pytest

keras = pytest.importorskip("keras")

import keras_ref as kr  # noqa: E402
from m6jax.models import mobilenet  # noqa: E402

# 72 -> 36, 18, 9, 5, 3: the strided depthwise convs see even (asymmetric
# correct_pad) and odd sizes.
S = 72
LAST = "out_relu"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  keras = kr.seeded_keras()
  d = tmp_path_factory.mktemp("mobilenetv2")
  top = keras.applications.MobileNetV2(weights=None, include_top=True, classes=1000,
                                       classifier_activation=None,
                                       input_shape=(S, S, 3))
  kr.randomise(top)
  return kr.top_and_notop(top, LAST, mobilenet.preprocess, S, d)


def test_preprocess_is_keras_tf_mode():
  from keras.applications import mobilenet_v2
  x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(mobilenet.preprocess(x), mobilenet_v2.preprocess_input(x.copy()),
                             atol=1e-6)


@pytest.mark.parity
def test_notop_parity_all_formats(ref):
  out = kr.check_notop_parity(mobilenet.load_keras, mobilenet.MobileNetV2(), ref,
                              (2, 3, 3, mobilenet.FEATURE_DIM), {"params", "batch_stats"},
                              "mobilenetv2")
  assert out["stage3"].shape == (2, 9, 9, 32) and out["stage7"].shape == (2, 3, 3, 320)


@pytest.mark.parity
def test_top_parity(ref):
  kr.check_top_parity(mobilenet.load_keras, mobilenet.MobileNetV2, ref, 1280, "mobilenetv2")


@pytest.mark.parity
def test_train_mode_matches_keras_and_updates_stats(ref):
  # With 3x3 maps the last stages normalise over 18 values per channel.
  kr.check_train_mode(mobilenet.MobileNetV2(), mobilenet.load_keras(ref.files["keras3"]),
                      ref, {"bn_Conv1": ("stem_bn",),
                            "block_13_depthwise_BN": ("stage6_block0", "depthwise_bn"),
                            "Conv_1_bn": ("head_bn",)}, "mobilenetv2")


def test_perturb_gradient(ref):
  # d sum(mean over 3x3) / d cell
  kr.check_perturb_gradient(mobilenet.MobileNetV2(),
                            mobilenet.load_keras(ref.files["keras3"]), ref.x,
                            (2, 3, 3, mobilenet.FEATURE_DIM), 1 / 9, rtol=1e-6)


def test_bf16_compute_keeps_f32_params():
  kr.check_bf16_keeps_f32_params(mobilenet.MobileNetV2(num_classes=3, dtype=jnp.bfloat16))


def test_param_paths_are_regex_friendly():
  p = kr.param_shapes(mobilenet.MobileNetV2())
  blocks = {f"stage{s}_block{b}" for s, n in enumerate((1, 2, 3, 4, 3, 3, 1), 1)
            for b in range(n)}
  assert set(p) == {"stem_conv", "stem_bn", "head_conv", "head_bn"} | blocks
  assert set(p["stage1_block0"]) == {"depthwise", "depthwise_bn", "project", "project_bn"}
  assert p["stage2_block0"]["depthwise"]["kernel"].shape == (3, 3, 1, 96)


def test_load_errors_name_the_layer(ref):
  kr.check_load_errors(
      mobilenet.load_keras, ref, "block_7_expand_BN",
      lambda l: {"block_3_depthwise": [np.zeros((3, 3, 144, 2), np.float32)]},
      r"'block_3_depthwise' weight 'kernel' has shape \(3, 3, 144, 2\).*\(3, 3, 144, 1\)")
  with pytest.raises(ValueError, match=r"'Conv1' weight 'kernel' has shape "
                                       r"\(3, 3, 3, 32\), the model expects \(3, 3, 3, 16\)"):
    mobilenet.load_keras(ref.files["keras3"], alpha=0.5)  # width mismatch


def test_keras3_file_without_layer_names_loads_by_order(ref):
  # The shared reader maps automatic group names ('conv2d_3', ...) by table order.
  bare = kr.strip_layer_names(ref.files["keras3"], ref.dir / "bare.weights.h5")
  assert "Conv1" not in kr.read_keras_h5(bare)
  jax.tree.map(np.testing.assert_array_equal, mobilenet.load_keras(bare),
               mobilenet.load_keras(ref.files["keras3"]))
