"""Fusion heads: per-modality normalisation, modality weights, measured shares."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from m6jax.models import fusion


def _emb(b=6, di=40, dt=10, seed=0):
  r = np.random.default_rng(seed)
  return {"image": jnp.asarray(r.normal(3.0, 5.0, (b, di)), jnp.float32),
          "text": jnp.asarray(r.normal(0.0, 0.1, (b, dt)), jnp.float32)}


def _norm(kind, x):
  m = fusion.ModalityNorm(kind)
  v = m.init(jax.random.key(0), x)
  return np.asarray(m.apply(v, x))


def test_l2_gives_unit_length_whatever_the_width():
  e = _emb()
  for x in e.values():
    np.testing.assert_allclose(np.linalg.norm(_norm("l2", x), axis=1), 1.0, rtol=1e-5)


def test_layernorm_energy_grows_with_width_and_layernorm_unit_equalises_it():
  e = _emb()
  sq = {k: (np.square(_norm("layernorm", x)).sum(1)).mean() for k, x in e.items()}
  # LayerNorm: every unit ~unit scale, so squared length ~ D (40 vs 10).
  assert sq["image"] / sq["text"] == pytest.approx(4.0, rel=0.05)
  sq = {k: (np.square(_norm("layernorm_unit", x)).sum(1)).mean() for k, x in e.items()}
  assert sq["image"] == pytest.approx(1.0, rel=0.05)
  assert sq["text"] == pytest.approx(1.0, rel=0.05)


def test_l2_keeps_a_dropped_modality_zero():
  np.testing.assert_array_equal(_norm("l2", jnp.zeros((2, 5))), 0.0)


@pytest.mark.parametrize("w_image", [0.5, 1.0, 2.0])
def test_early_fusion_energy_share_follows_the_weights(w_image):
  head = fusion.FusionHead("early", 3, hidden=0, norm="l2", modality_weights=(w_image, 1.0))
  e = _emb()
  v = head.init(jax.random.key(0), e)
  share = np.asarray(head.apply(v, e)["weights"])
  # l2 makes each modality unit length: the energy share is w^2 / sum(w^2).
  expected = w_image**2 / (w_image**2 + 1.0)
  np.testing.assert_allclose(share[:, 0], expected, rtol=1e-5)
  np.testing.assert_allclose(share.sum(1), 1.0, rtol=1e-6)


def test_layernorm_early_fusion_gives_the_wider_modality_most_energy():
  head = fusion.FusionHead("early", 3, hidden=0, norm="layernorm")
  e = _emb(di=120, dt=40)
  share = np.asarray(head.apply(head.init(jax.random.key(0), e), e)["weights"])
  assert share[:, 0].mean() == pytest.approx(0.75, abs=0.02)


def test_learned_weights_are_parameters_and_fixed_ones_are_not():
  e = _emb()
  for mode in ("early", "late", "gated"):
    fixed = fusion.FusionHead(mode, 3, hidden=4, modality_weights=(0.5, 1.0))
    learned = fusion.FusionHead(mode, 3, hidden=4, modality_weights=(0.5, 1.0),
                                learn_weights=True)
    assert "log_modality_weights" not in fixed.init(jax.random.key(0), e)["params"]
    p = learned.init(jax.random.key(0), e)["params"]
    np.testing.assert_array_equal(p["log_modality_weights"], 0.0)


def test_late_fusion_mixes_with_the_normalised_fixed_weights():
  head = fusion.FusionHead("late", 3, hidden=0, modality_weights=(1.0, 3.0))
  e = _emb()
  v = head.init(jax.random.key(0), e)
  out = head.apply(v, e)
  np.testing.assert_allclose(np.asarray(out["weights"][0]), [0.25, 0.75], rtol=1e-6)
  # The mix is linear in the per-modality logits: zeroing the image head's output
  # weights leaves 0.75 x the text head's logits.
  params = jax.tree.map(lambda x: x, v["params"])
  params["head_image"]["out"]["kernel"] = jnp.zeros_like(params["head_image"]["out"]["kernel"])
  params["head_image"]["out"]["bias"] = jnp.zeros_like(params["head_image"]["out"]["bias"])
  text_only = fusion.FusionHead("text", 3, hidden=0)
  tv = {"params": {"head": params["head_text"]}}   # l2 norm has no parameters
  np.testing.assert_allclose(np.asarray(head.apply({"params": params}, e)["logits"]),
                             0.75 * np.asarray(text_only.apply(tv, e)["logits"]), rtol=1e-5,
                             atol=1e-6)


def test_bad_weights_and_norm_are_refused():
  e = _emb()
  with pytest.raises(ValueError, match="positive"):
    h = fusion.FusionHead("early", 3, modality_weights=(0.0, 1.0))
    h.init(jax.random.key(0), e)
  with pytest.raises(ValueError, match="norm"):
    h = fusion.FusionHead("early", 3, norm="batchnorm")
    h.init(jax.random.key(0), e)
  cfg = ml_collections.ConfigDict(dict(fusion="early", hidden=0, dropout=0.0,
                                       modality_dropout=0.0, norm="l2",
                                       modality_weights={"audio": 1.0}))
  with pytest.raises(ValueError, match="audio"):
    fusion.head_from_config(cfg, 3)


def test_head_from_config_orders_weights_as_the_head_reads_modalities():
  cfg = ml_collections.ConfigDict(dict(fusion="early", hidden=0, dropout=0.0,
                                       modality_dropout=0.0, norm="l2",
                                       modality_weights={"text": 1.0, "image": 0.5}))
  head = fusion.head_from_config(cfg, 3)
  assert fusion.modalities("early") == ("image", "text")
  assert head.modality_weights == (0.5, 1.0)
