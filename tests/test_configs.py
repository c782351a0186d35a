"""Every experiment config loads, and fine-tuning groups cover each backbone exactly."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import base, smoke
from m6jax import config as config_lib
from m6jax import defaults
from m6jax.models import efficientnet, fusion, mobilenet, resnet, tiny, towers, vgg
from m6jax.train import optim

CONFIGS = [("default", None), ("smoke", None), ("text_only", None), ("text_only", "tfidf"),
           ("fusion", "early"), ("fusion", "late"), ("fusion", "gated"),
           ("finetune", None), ("finetune", "tiny")] + [
               ("image_only", b) for b in towers.IMAGE_TOWERS]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_loads(name, arg):
  mod = importlib.import_module(f"configs.{name}")
  cfg = mod.get_config(arg) if arg is not None else mod.get_config()
  assert cfg.model.fusion in fusion.MODES
  assert cfg.train.mode in ("frozen", "finetune")
  assert cfg.seeds >= 1 and cfg.data.image_size > 0
  config_lib.validate(cfg)


@pytest.mark.parametrize("key,value,message", [
    ("model.fusion", "mid", "model.fusion='mid': must be one of text, image, early, late"),
    ("train.mode", "frozn", "train.mode='frozn': must be one of frozen, finetune"),
    ("train.bn", "frozen", "train.bn='frozen' was renamed: use 'fixed' (allowed: fixed, update)"),
    ("train.bn", "none", "train.bn='none': must be one of fixed, update"),
    ("train.data_order", "random", "train.data_order='random': must be one of per_seed, shared"),
    ("train.replica_loop", "scan", "train.replica_loop='scan': must be one of auto, vmap, map"),
    ("data.on_bad_row", "drop", "data.on_bad_row='drop': must be one of skip, fail"),
    ("explain.method", "cam", "explain.method='cam': must be one of gradcam, gradcam++"),
    ("model.dtype", "float64", "model.dtype='float64': must be one of float32, bfloat16"),
    ("model.image.name", "effnet", "model.image.name='effnet': must be one of tiny, vgg16"),
    ("model.text.name", "gpt", "model.text.name='gpt': must be one of minilm, bert, tfidf"),
    ("model.norm", "batch", "model.norm='batch': must be one of none, layernorm, l2"),
    ("data.rare_classes", "keep", "data.rare_classes='keep': must be one of drop, fail"),
    ("data.encoding", "utf-9", "data.encoding='utf-9': not a codec Python knows"),
    ("model.modality_weights.text", 0.0, "model.modality_weights.text=0.0: must be a number > 0"),
    ("seeds", 0, "seeds=0: must be an integer >= 1"),
    ("train.epochs", 0, "train.epochs=0: must be an integer >= 1"),
    ("model.dropout", 1.5, "model.dropout=1.5: must be a number in [0, 1)"),
    ("train.learning_rate", 0.0, "train.learning_rate=0.0: must be > 0"),
    ("explain.sample", 0, "explain.sample=0: must be an integer >= 1"),
    ("feasibility_opts.tsne_max", 1, "feasibility_opts.tsne_max=1: must be an integer >= 2"),
    ("feasibility_opts.kmeans_minibatch_from", 0,
     "feasibility_opts.kmeans_minibatch_from=0: must be an integer >= 1"),
    ("feasibility_opts.kmeans_batch_size", 0,
     "feasibility_opts.kmeans_batch_size=0: must be an integer >= 1"),
])
def test_bad_values_are_named_with_the_allowed_values(key, value, message):
  cfg = smoke.get_config()
  *path, last = key.split(".")
  node = cfg
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_keys_and_bad_groups():
  cfg = smoke.get_config()
  cfg.data.nonexistent = 1
  with pytest.raises(config_lib.ConfigError, match=r"data.nonexistent: unknown key \(known in "
                     r"data: (\w+, )*augment, batch_size"):
    config_lib.validate(cfg)
  cfg = smoke.get_config()
  cfg.train.groups = {"head": {"regex": "fusion/(.*"}, "rest": {"regex": ".*", "lr": 1}}
  msg = "; ".join(config_lib.problems(cfg))
  assert "train.groups.head.regex='fusion/(.*': not a regular expression" in msg
  assert "train.groups.rest: unknown field(s) ['lr']" in msg
  cfg.data.split.train = 0.9
  assert any(p.startswith("data.split=") for p in config_lib.problems(cfg))


def test_no_checkpoint_with_explain_is_accepted():
  # Grad-CAM explains the in-memory states that were scored (m6jax.evaluate.evals), so a
  # run without checkpoints needs none (test_workdir runs one end to end).
  cfg = smoke.get_config()
  cfg.train.checkpoint = False
  cfg.explain.enabled = True
  config_lib.validate(cfg)


def test_finetune_groups_has_no_silent_fallback():
  with pytest.raises(ValueError, match="no layer groups for backbone 'effnet'"):
    base.finetune_groups("effnet")
  assert set(defaults._LATE) == set(towers.IMAGE_TOWERS)   # every backbone has its own entry


def _families():
  return {"tiny": tiny.TinyCNN(), "vgg16": vgg.VGG16(), "resnet50": resnet.ResNet50(),
          "mobilenetv2": mobilenet.MobileNetV2(),
          "efficientnetb0": efficientnet.EfficientNet(variant="b0"),
          "efficientnet-lite0": efficientnet.EfficientNet(variant="lite0")}


class _Model(nn.Module):
  image: nn.Module

  @nn.compact
  def __call__(self, x):
    emb = self.image(x)["embedding"]
    text = nn.Dense(4, name="text")(emb)
    return fusion.FusionHead("early", 7, 8, name="fusion")({"image": emb, "text": text})


@pytest.mark.parametrize("backbone", list(_families()))
def test_finetune_groups_cover_every_parameter_once(backbone):
  model = _Model(_families()[backbone])
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 64, 64, 3))))["params"]
  groups = base.finetune_groups(backbone).to_dict()
  _, members = optim.group_labels(shapes, groups)   # raises on gaps and overlaps
  assert members["head"] and members["image_late"] and members["image_early"]
  first = STEM[backbone]   # the input layer is 'early', never 'late'
  assert any(p.startswith(first) for p in members["image_early"])
  assert not any(p.startswith(first) for p in members["image_late"])


STEM = {"tiny": "image/conv0", "vgg16": "image/block1_conv1", "resnet50": "image/stem/",
        "mobilenetv2": "image/stem_conv", "efficientnetb0": "image/stem/",
        "efficientnet-lite0": "image/stem/"}


def test_the_library_does_not_import_the_configs_package():
  """configs/ builds on m6jax.defaults, never the other way round."""
  import ast
  import pathlib
  root = pathlib.Path(defaults.__file__).parent
  bad = []
  for p in root.rglob("*.py"):
    for n in ast.walk(ast.parse(p.read_text())):
      names = ([a.name for a in n.names] if isinstance(n, ast.Import)
               else [n.module or ""] if isinstance(n, ast.ImportFrom) else [])
      bad += [f"{p}: {x}" for x in names if x == "configs" or x.startswith("configs.")]
  assert not bad, bad


def test_a_saved_config_gets_new_knobs_from_the_defaults_and_keeps_its_own():
  cfg = smoke.get_config()
  cfg.train.groups = defaults.finetune_groups("tiny")
  cfg.explain.ig_steps = 7
  saved = cfg.to_dict()
  del saved["explain"]["sample"], saved["feasibility_opts"]   # knobs added after the run
  restored = defaults.saved_config(saved)
  assert restored.explain.sample == defaults.base_config().explain.sample
  assert restored.feasibility_opts.tsne_max == defaults.base_config().feasibility_opts.tsne_max
  assert restored.explain.ig_steps == 7 and restored.model.fusion == cfg.model.fusion
  # Free dicts are the run's own, not merged with the defaults' names.
  assert set(restored.train.groups) == set(cfg.train.groups)
  assert config_lib.problems(restored) == []
