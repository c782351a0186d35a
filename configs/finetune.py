"""Fine-tune the image tower end to end, fused with cached MiniLM text embeddings.

  --config configs/finetune.py                    EfficientNet-Lite0, 3 seeds
  --config configs/finetune.py:tiny               the tiny CNN (tests, first runs)
  --config configs/finetune.py:mobilenetv2        torchvision's MobileNetV2 (PyPI, offline)

Discriminative learning rates by layer group (configs.base.finetune_groups):
head x1, last stage x0.1, earlier layers x0.01 unfrozen after one epoch.
BatchNorm statistics stay fixed (small data). On one GPU add
--config.train.replica_loop=map: vmapped replicas make grouped convolutions,
3.3x slower there (benchmarks/bench_gpu.md).
"""

from configs.base import base_config, finetune_groups
from configs.image_only import image_tower


def get_config(backbone: str = "efficientnet-lite0"):
  c = base_config()
  c.name = f"finetune_{backbone}"
  c.train.mode = "finetune"
  c.model.image.name, c.model.image.weights = image_tower(backbone)
  c.data.augment = True
  c.data.image_size = 224 if backbone != "tiny" else 32
  c.train.epochs = 6
  c.train.checkpoint_every = 1           # epochs are minutes long here: save each one
  c.train.batch_size = 32
  c.train.learning_rate = 1e-3
  # The towers move: an MLP head on LayerNormed embeddings with dropout, as before the
  # frozen-head recipe (configs/base.py) was tuned.
  c.model.norm, c.model.hidden, c.model.dropout, c.model.modality_dropout = (
      "layernorm", 256, 0.2, 0.3)
  c.model.modality_weights.image = 1.0
  c.train.select_by = "macro_f1"
  c.train.bn = "fixed"
  c.train.data_order = "shared"   # one decoded batch feeds every replica
  # Early layers start after one epoch (steps per epoch come from the data at run time).
  c.train.groups = finetune_groups(c.model.image.name, unfreeze_early_at_epoch=1)
  c.seeds = 3
  return c
