"""Convolutions that are fast on XLA:CPU, as a drop-in for ``lax.conv_general_dilated``.

On jax 0.10's CPU backend a depthwise convolution (``feature_group_count`` = C)
goes to a library kernel that makes EfficientNet-Lite0 ~6x slower than PyTorch.
:func:`fast_conv_general_dilated` writes the three conv shapes of the mobile
backbones with ops XLA:CPU runs well:

* depthwise k x k (one input channel per group, depth multiplier 1): the sum of
  k^2 shifted, strided slices of the zero-padded input times the per-channel
  kernel row;
* 1 x 1, stride 1, ungrouped: a matmul over the channel axis;
* ungrouped k x k with few input channels (the RGB stem): im2col (k^2 slices
  concatenated on the channel axis, (di, dj, c) order = the HWIO kernel's
  row-major order) and one matmul.

Anything else falls through to ``lax.conv_general_dilated``. The function has
``lax.conv_general_dilated``'s signature, so it is handed to ``flax.linen.Conv``
(``conv_general_dilated=``): parameter names, shapes, init and dtype promotion
stay those of ``nn.Conv``, and checkpoints/weight import are unchanged.

The maths is the same as the lax form, only the order of float additions
differs: float32 outputs agree to rounding (~1e-6 relative; Lite0 logits within
~1e-5), and in float64 the gradients of whole models agree to ~1e-13 of the
largest gradient, in inference and train mode (tests/test_conv.py). In float32
train mode (BatchNorm batch statistics) with random weights and batch 2 they
can differ by ~1 % of the largest gradient: that is rounding, amplified by
train-mode BN's nearly cancelling backward; each form is then ~2 % away from
the float64 gradient itself (benchmarks/bench_efficientnet.md, "Gradients").

Choice per backend (:func:`conv_fn`): 'fast' on CPU, where it is measured
faster (benchmarks/bench_backbones.md); 'lax' elsewhere (GPU/TPU have their
own depthwise kernels; not measured against this form).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "lax", "fast")
# im2col only where the patch matrix stays small: the stem (3 channels in).
IM2COL_MAX_IN = 4
# The layout flax.linen.Conv asks for: NHWC input/output, HWIO kernel.
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def resolve(impl: str = "auto") -> str:
  """'auto' | 'lax' | 'fast' -> 'lax' or 'fast'.

  'auto' reads the environment variable ``M6JAX_CONV_IMPL`` (if set) and else
  picks 'fast' on the CPU backend, 'lax' on any other.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"unknown conv_impl {impl!r}; choose from {CONV_IMPLS}")
  if impl == "auto":
    impl = os.environ.get("M6JAX_CONV_IMPL", "auto")
    if impl not in CONV_IMPLS:
      raise ValueError(f"M6JAX_CONV_IMPL={impl!r}; choose from {CONV_IMPLS}")
  if impl == "auto":
    impl = "fast" if jax.default_backend() == "cpu" else "lax"
  return impl


def conv_fn(impl: str = "auto") -> Callable | None:
  """The ``conv_general_dilated`` to give ``nn.Conv``: None (= lax) or the fast form."""
  return fast_conv_general_dilated if resolve(impl) == "fast" else None


def _pads(padding, in_hw: Sequence[int], kernel_hw: Sequence[int],
          strides: Sequence[int]) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    return [tuple(p) for p in lax.padtype_to_pads(in_hw, kernel_hw, strides, padding)]
  return [tuple(int(q) for q in p) for p in padding]


def _windows(x, kh: int, kw: int, strides: Sequence[int], out_hw: Sequence[int]):
  """Yields (di, dj, x[:, di::sh, dj::sw][:, :Ho, :Wo]) for every kernel tap."""
  (sh, sw), (ho, wo) = strides, out_hw
  b, _, _, c = x.shape
  for di in range(kh):
    for dj in range(kw):
      yield di, dj, lax.slice(x, (0, di, dj, 0),
                              (b, di + (ho - 1) * sh + 1, dj + (wo - 1) * sw + 1, c),
                              (1, sh, sw, 1))


def _dot_channels(x, w2d, precision):
  """(..., C) @ (C, D) -> (..., D)."""
  return lax.dot_general(x, w2d, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def fast_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                              rhs_dilation=None, dimension_numbers=None,
                              feature_group_count=1, batch_group_count=1,
                              precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` for NHWC x HWIO 2-D convs, fast on XLA:CPU.

  lhs (B, H, W, Cin), rhs (kh, kw, Cin / groups, Cout) -> (B, Ho, Wo, Cout).
  Depthwise, 1 x 1 and few-input-channel convs are rewritten (module
  docstring); other cases, dilations and other layouts call lax.
  """
  def fallback():
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)

  dn = dimension_numbers
  if (lhs.ndim != 4 or rhs.ndim != 4 or batch_group_count != 1
      or preferred_element_type is not None
      or any(d != 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
      or not isinstance(dn, lax.ConvDimensionNumbers) or dn != _NHWC):
    return fallback()
  kh, kw, cin_g, cout = rhs.shape
  cin = lhs.shape[-1]
  strides = tuple(window_strides)
  depthwise = feature_group_count == cin and cin_g == 1 and cout == cin
  pointwise = feature_group_count == 1 and (kh, kw) == (1, 1) and strides == (1, 1)
  im2col = feature_group_count == 1 and cin <= IM2COL_MAX_IN
  if not (depthwise or pointwise or im2col):
    return fallback()
  pads = _pads(padding, lhs.shape[1:3], (kh, kw), strides)
  if pointwise and pads == [(0, 0), (0, 0)]:
    return _dot_channels(lhs, rhs.reshape(cin, cout), precision)
  if any(p < 0 for pair in pads for p in pair):
    return fallback()
  x = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
  out_hw = [(x.shape[1 + i] - k) // s + 1 for i, (k, s) in enumerate(zip((kh, kw), strides))]
  if depthwise:
    w = rhs.reshape(kh, kw, cin)
    y = None
    for di, dj, win in _windows(x, kh, kw, strides, out_hw):
      t = win * w[di, dj]
      y = t if y is None else y + t
    return y
  patches = jnp.concatenate([win for _, _, win in _windows(x, kh, kw, strides, out_hw)],
                            axis=-1)
  return _dot_channels(patches, rhs.reshape(kh * kw * cin, cout), precision)
