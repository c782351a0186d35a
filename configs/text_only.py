"""Text only: frozen MiniLM sentence embeddings + MLP head, 5 seeds.

`--config configs/text_only.py:tfidf` runs the TF-IDF (1-2 gram, SVD 256) baseline.
"""

from configs.base import base_config


def get_config(tower: str = "minilm"):
  c = base_config()
  c.name = f"text_only_{tower}"
  c.model.fusion = "text"
  c.model.text.name = tower
  if tower == "tfidf":
    c.model.text.weights = "none"
  return c
