"""The notebook's comparison: text only, image only and fused, 5 seeds each.

  ./launch.sh sweep experiments/ablation.py          -> runs/ablation/<cell>/
  .venv/bin/python -m m6jax.compare --root runs/ablation --out experiments/ablation

Each cell keeps its base config's defaults (frozen towers, 30 epochs, 5 seeds
as one vmapped program); only the model differs.
"""


def get_sweep():
  return {
      "name": "ablation",
      "base": "configs/default.py",
      # One embedding cache for all cells: each tower is computed once.
      "overrides": {"train.cache_dir": "runs/ablation/cache"},
      "cells": [
          {"name": "text_minilm", "base": "configs/text_only.py:minilm"},
          {"name": "text_tfidf", "base": "configs/text_only.py:tfidf"},
          {"name": "image_lite0", "base": "configs/image_only.py:efficientnet-lite0"},
          {"name": "image_lite1", "base": "configs/image_only.py:efficientnet-lite1"},
          {"name": "image_lite2", "base": "configs/image_only.py:efficientnet-lite2"},
          {"name": "fusion_early", "base": "configs/fusion.py:early"},
          {"name": "fusion_late", "base": "configs/fusion.py:late"},
          {"name": "fusion_gated", "base": "configs/fusion.py:gated"},
      ],
  }
