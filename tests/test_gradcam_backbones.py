"""Grad-CAM works on every conv backbone (random weights, small inputs).

The formula itself is checked against PyTorch and finite differences in
test_explain.py; this checks each family's perturb hook is wired to the
feature map the gradient must flow through.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6jax.explain import gradcam
from m6jax.models import towers


@pytest.mark.parametrize("name", [n for n in towers.IMAGE_TOWERS if n != "efficientnet-lite2"])
def test_grad_cam_on_backbone(name):
  size = 64
  tower = towers.image_tower(name, "none", size, seed=0)
  w = jax.random.normal(jax.random.key(1), (tower.feature_dim, 5)) * 0.1
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)), jnp.float32)
  fn = gradcam.image_logits_fn(tower, lambda emb, _: emb @ w)
  x_pre = tower.preprocess(x)
  pert = gradcam.zero_perturbations(tower.module, tower.variables, x_pre, train=False)
  out = gradcam.grad_cam(fn, pert, x, details=True)
  cams, grads, fmap = np.asarray(out["cams"]), np.asarray(out["grads"]), np.asarray(out["fmap"])
  assert cams.shape == (2, size, size)
  assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
  assert grads.shape == fmap.shape and fmap.shape[-1] == tower.feature_dim
  # Through the global average pool, d(score)/d(fmap) is w[:, target] / (h * w) everywhere.
  h, wd = fmap.shape[1:3]
  t = np.asarray(out["targets"])
  want = np.asarray(w)[:, t].T[:, None, None, :] / (h * wd)
  np.testing.assert_allclose(grads, np.broadcast_to(want, grads.shape), rtol=1e-4, atol=1e-7)
  # Split form (m6jax.explain.run, frozen runs): the tower's feature map first, then the
  # head on tower.pool of it; pool is the backbone's own embedding, so both agree
  # (to float rounding: the feature map comes from a program of its own).
  feats = tower.module.apply(tower.variables, x_pre, train=False)
  np.testing.assert_array_equal(tower.pool(feats["feature_map"]), feats["embedding"])
  fm = tower.feature_map(tower.variables, x)
  split = gradcam.grad_cam(gradcam.pooled_logits_fn(tower, lambda emb, _: emb @ w),
                           jnp.zeros_like(fm), {"image": x, "feature_map": fm}, details=True)
  for key in ("cams", "grads", "fmap", "logits"):
    np.testing.assert_allclose(split[key], out[key], rtol=1e-5, atol=1e-5, err_msg=key)
