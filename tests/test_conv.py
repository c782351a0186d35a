"""Fast CPU convolutions (m6jax.models.conv) against lax.conv_general_dilated.

Forward: float32, agreement to rounding (relative 1e-5 of the output scale).
Gradients: float64 (jax x64 inside the test only), per conv within 1e-12 and
per model within 1e-12 of the largest gradient (observed 1e-13; per gradient
leaf 1e-8, observed 3e-10 in train mode, 4e-15 in inference), in inference mode
and in train mode (BatchNorm batch statistics): the two forms compute the same
function, so float32 differences between them are rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from m6jax.models import conv, mobilenet
from m6jax.models import efficientnet as E

DN = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # NHWC, HWIO

# (name, H, Cin, Cout, k, stride, groups, padding): every conv the mobile
# backbones have (odd and even sizes for the stride-2 'SAME' cases), plus one
# conv the fast form hands back to lax.
CASES = [
    ("dw3_s1", 9, 8, 8, 3, 1, 8, "SAME"),
    ("dw3_s2_odd", 9, 8, 8, 3, 2, 8, "SAME"),
    ("dw5_s2_even", 10, 8, 8, 5, 2, 8, "SAME"),
    ("dw3_s2_correct_pad", 8, 8, 8, 3, 2, 8, ((0, 1), (0, 1))),
    ("pw", 7, 8, 16, 1, 1, 1, "SAME"),
    ("pw_1x1_map", 1, 8, 4, 1, 1, 1, "SAME"),  # squeeze-excite
    ("stem_s2_odd", 9, 3, 16, 3, 2, 1, "SAME"),
    ("stem_s2_even", 10, 3, 16, 3, 2, 1, "SAME"),
    ("fallback_3x3_8ch", 6, 8, 16, 3, 1, 1, "SAME"),
]


def _conv_case(case, dtype, seed=0):
  _, h, cin, cout, k, s, g, pad = case
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(size=(2, h, h + 1, cin)), dtype)
  w = jnp.asarray(r.normal(size=(k, k, cin // g, cout)), dtype)
  kw = {"window_strides": (s, s), "padding": pad, "dimension_numbers": DN,
        "feature_group_count": g, "lhs_dilation": (1, 1), "rhs_dilation": (1, 1)}
  return x, w, kw


def _rel(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conv_forward_and_grads_match_lax(case):
  x, w, kw = _conv_case(case, jnp.float32)
  ref = lax.conv_general_dilated(x, w, **kw)
  out = conv.fast_conv_general_dilated(x, w, **kw)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  assert _rel(out, ref) <= 1e-5
  with jax.enable_x64(True):
    x, w, kw = _conv_case(case, jnp.float64)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=ref.shape))

    def grads(fn):
      return jax.grad(lambda x, w: jnp.sum(fn(x, w, **kw) * ct), argnums=(0, 1))(x, w)

    for g_fast, g_lax in zip(grads(conv.fast_conv_general_dilated),
                             grads(lax.conv_general_dilated)):
      assert g_fast.dtype == jnp.float64
      assert _rel(g_fast, g_lax) <= 1e-12


def test_resolve():
  assert conv.resolve("lax") == "lax" and conv.resolve("fast") == "fast"
  assert conv.resolve("auto") == ("fast" if jax.default_backend() == "cpu" else "lax")
  assert conv.conv_fn("lax") is None
  with pytest.raises(ValueError, match="unknown conv_impl 'nope'"):
    conv.resolve("nope")


MODELS = {
    "lite0": lambda impl, dtype=jnp.float32: E.EfficientNet(
        "lite0", dtype=dtype, conv_impl=impl, drop_connect_rate=0.0),
    "b0": lambda impl, dtype=jnp.float32: E.EfficientNet(
        "b0", dtype=dtype, conv_impl=impl, drop_connect_rate=0.0),
    "mobilenetv2": lambda impl, dtype=jnp.float32: mobilenet.MobileNetV2(
        dtype=dtype, conv_impl=impl),
}


def _variables(name, size, dtype):
  """Random params; BN statistics away from 0/1 so inference mode uses them."""
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  v = MODELS[name]("lax").init(jax.random.key(0), x)
  v = {k: c for k, c in v.items() if k != "perturbations"}
  leaves, tree = jax.tree.flatten(v["batch_stats"])
  r = np.random.default_rng(0)
  stats = [r.uniform(0.5, 1.5, a.shape) if i % 2 else r.normal(0, 0.1, a.shape)
           for i, a in enumerate(leaves)]  # (mean, var) pairs in key order
  v["batch_stats"] = jax.tree.unflatten(tree, stats)
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), v)


def _images(size, dtype):
  return jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, size, size, 3)), dtype)


@pytest.mark.parametrize("name", [
    "lite0", pytest.param("b0", marks=pytest.mark.slow),
    pytest.param("mobilenetv2", marks=pytest.mark.slow)])
def test_model_forward_fast_matches_lax(name):
  # Same variables, both forms; float32 rounding only (observed ~5e-7).
  size = 48
  v, x = _variables(name, size, jnp.float32), _images(size, jnp.float32)
  outs = {impl: jax.jit(MODELS[name](impl).apply)(v, x)["feature_map"]
          for impl in ("lax", "fast")}
  assert _rel(outs["fast"], outs["lax"]) <= 1e-5


def _grad_fn(name, impl):
  """jit: (params, stats, x, ct) -> (inference grads, train grads) of sum(feature_map * ct)."""
  model = MODELS[name](impl, jnp.float64)

  def loss(params, stats, x, ct, train):
    v = {"params": params, "batch_stats": stats}
    if train:
      out, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
    else:
      out = model.apply(v, x)
    # The feature map, not the (float32) embedding: the whole path stays float64.
    return jnp.sum(out["feature_map"] * ct)

  g = jax.grad(loss, argnums=(0, 2))
  return jax.jit(lambda *a: (g(*a, False), g(*a, True)))


@pytest.mark.parametrize("name", [
    "lite0", pytest.param("mobilenetv2", marks=pytest.mark.slow)])
def test_model_gradients_equal_in_float64(name):
  # 64 px, batch 2: the last stages' train-mode BN normalises over 2*2*2 = 8
  # values per channel. At 32 px (1x1 maps, 2 values per channel) train-mode BN
  # is so ill-conditioned that even float64 gradients of the two forms differ
  # by ~1e-6 (benchmarks/bench_efficientnet.md, "Gradients").
  size = 64
  with jax.enable_x64(True):
    v, x = _variables(name, size, jnp.float64), _images(size, jnp.float64)
    ct = jnp.asarray(np.random.default_rng(3).normal(size=(2, 2, 2, 1280)))
    g = {impl: _grad_fn(name, impl)(v["params"], v["batch_stats"], x, ct)
         for impl in ("lax", "fast")}
    for mode, i in (("inference", 0), ("train", 1)):
      leaves = {impl: jax.tree.leaves(gi[i]) for impl, gi in g.items()}
      assert len(leaves["fast"]) == len(leaves["lax"]) > 50
      # (a) The measure: difference / the largest gradient of the model.
      # (b) Per gradient, relative to its own largest entry; in train mode some
      # exact gradients are 0 (a BN shift cancelled by the next BN's batch mean)
      # and hold only rounding, so that scale is at least 1e-6 of the largest.
      big = max(float(np.abs(b).max()) for b in leaves["lax"])
      worst_abs = worst_rel = 0.0
      for a, b in zip(leaves["fast"], leaves["lax"]):
        assert a.dtype == jnp.float64
        d = float(np.abs(np.asarray(a) - np.asarray(b)).max())
        worst_abs = max(worst_abs, d)
        worst_rel = max(worst_rel, d / max(float(np.abs(b).max()), 1e-6 * big))
      print(f"{name} {mode} float64 fast vs lax: max |d| / largest gradient "
            f"{worst_abs / big:.1e}; per gradient {worst_rel:.1e}")
      assert worst_abs / big <= 1e-12, mode  # observed 1e-13 (lite0, train)
      assert worst_rel <= 1e-8, mode  # observed 2.6e-10 (lite0, train), 4e-15 inference
