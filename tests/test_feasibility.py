"""Tests for m6jax.evaluate.feasibility (KMeans ARI study + projection plots)."""

import json
import os

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from threadpoolctl import threadpool_limits

from m6jax.evaluate import feasibility as fz
from m6jax.evaluate import sampling

N_CLASSES = 3
N = 90
CLASS_NAMES = ["shoes", "phones", "books"]


def _blobs(dim, seed, spread=0.05):
  """Well-separated Gaussian blobs: (N, dim) points, (N,) labels."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(N_CLASSES, dim))
  labels = np.repeat(np.arange(N_CLASSES), N // N_CLASSES)
  x = centers[labels] + spread * rng.normal(size=(N, dim))
  return x.astype(np.float32), labels


def test_separated_blobs_high_ari():
  x, y = _blobs(16, 0)
  r = fz.kmeans_ari(x, y, N_CLASSES)
  assert r["ari"] > 0.9 and r["nmi"] > 0.9
  assert sorted(r["cluster_sizes"]) == [30, 30, 30]
  assert r["cluster_sizes"] == sorted(r["cluster_sizes"], reverse=True)
  assert isinstance(r["ari"], float) and isinstance(r["nmi"], float)


def test_random_labels_ari_near_zero():
  x, _ = _blobs(16, 0)
  y = np.random.default_rng(1).integers(0, N_CLASSES, size=N)
  assert abs(fz.kmeans_ari(x, y, N_CLASSES)["ari"]) < 0.1


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_direct_sklearn(normalize):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(N, 8)) * rng.uniform(0.5, 3.0, size=(N, 1))
  y = rng.integers(0, N_CLASSES, size=N)
  feats = x / np.linalg.norm(x, axis=1, keepdims=True) if normalize else x
  with threadpool_limits(limits=1):
    pred = KMeans(n_clusters=N_CLASSES, n_init=10,
                  random_state=7).fit_predict(feats)
  r = fz.kmeans_ari(x, y, N_CLASSES, seed=7, normalize=normalize)
  assert r["ari"] == pytest.approx(adjusted_rand_score(y, pred), abs=1e-12)
  assert r["nmi"] == pytest.approx(normalized_mutual_info_score(y, pred),
                                   abs=1e-12)


def test_fuse_normalises_each_modality():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(N, 5)), rng.normal(size=(N, 7))
  out = fz.fuse({"text": a, "image": b})
  assert out.shape == (N, 12)
  np.testing.assert_allclose(np.linalg.norm(out[:, :5], axis=1), 1.0)
  np.testing.assert_allclose(np.linalg.norm(out[:, 5:], axis=1), 1.0)
  np.testing.assert_allclose(fz.fuse({"text": a, "image": 1000.0 * b}), out,
                             rtol=1e-10, atol=1e-12)
  with pytest.raises(ValueError):
    fz.fuse({"text": a, "image": b[:10]})


def test_normalise_in_blocks_equals_whole_matrix(monkeypatch):
  # Rows normalised a block at a time (a bounded temporary) and written into a
  # fused matrix's column blocks are, bit for bit, the whole-matrix formula's.
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(N, 5)).astype(np.float32), rng.normal(size=(N, 7))
  a[3] = 0.0   # an all-zero row stays zero
  monkeypatch.setattr(fz, "NORMALIZE_ROWS", 16)   # N = 90: six blocks, the last short
  whole = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
  np.testing.assert_array_equal(fz.l2_normalize(a, dtype=np.float32), whole(a))
  np.testing.assert_array_equal(fz.fuse({"text": a, "image": b}, np.float32),
                                np.concatenate([whole(a), whole(b.astype(np.float32))], 1))
  assert not fz.l2_normalize(a, dtype=np.float32)[3].any()
  with pytest.raises(ValueError, match="out is"):
    fz.l2_normalize(a, dtype=np.float32, out=np.empty((N, 5), np.float64))


def test_project_2d_shapes():
  x, _ = _blobs(16, 4)
  assert fz.project_2d(x, method="pca").shape == (N, 2)
  p = fz.project_2d(x, method="tsne", max_iter=250)
  assert p.shape == (N, 2) and np.isfinite(p).all()
  with pytest.raises(ValueError):
    fz.project_2d(x, method="umap")


def _png_ok(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image as mpimg
  img = mpimg.imread(path)
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
  # Not blank: many distinct colours (scatter points, text, legend).
  rgb = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
  assert len(np.unique(rgb, axis=0)) > 10
  assert img[..., :3].std() > 0.01


def test_plot_projection_writes_png(tmp_path):
  x, y = _blobs(2, 5, spread=0.3)
  path = fz.plot_projection(x, y, CLASS_NAMES, tmp_path / "sub" / "p.png",
                            title="blobs")
  _png_ok(path)


def _study_inputs():
  text, y = _blobs(24, 10)
  image, _ = _blobs(12, 11)
  # Image carries no class signal: shuffle its rows relative to the labels.
  image = image[np.random.default_rng(12).permutation(N)]
  return {"text": text, "image": image}, y


def test_feasibility_study_outputs(tmp_path):
  embs, y = _study_inputs()
  res = fz.feasibility_study(embs, y, CLASS_NAMES, tmp_path)
  _png_ok(res["plot"])
  with open(tmp_path / "feasibility.json") as f:
    data = json.load(f)
  assert list(data) == ["text", "image", "fused", "kmeans", "projection"]
  # N = 90 rows: full KMeans and every row projected unless told otherwise.
  assert data.pop("kmeans") == res["kmeans"] == {"algorithm": "full", "rows": N, "n_init": 10,
                                                  "batch_size": None}
  assert data.pop("projection") == res["projection"] == {
      "method": "tsne", "rows": N, "of": N, "seed": 0, "stratified_by": None}
  for name, r in data.items():
    assert set(r) == {"ari", "nmi", "cluster_sizes"}
    assert sum(r["cluster_sizes"]) == N
    assert r == res[name]
  assert data["text"]["ari"] > 0.9
  assert abs(data["image"]["ari"]) < 0.1
  with pytest.raises(ValueError):
    fz.feasibility_study({"fused": embs["text"]}, y, CLASS_NAMES, tmp_path)


def test_single_set_has_no_fused(tmp_path):
  embs, y = _study_inputs()
  res = fz.feasibility_study({"text": embs["text"]}, y, CLASS_NAMES,
                             tmp_path, method="pca")
  assert set(res) == {"text", "kmeans", "projection", "plot", "timings"}


def test_deterministic_whatever_the_workers(tmp_path):
  embs, y = _study_inputs()
  a = fz.feasibility_study(embs, y, CLASS_NAMES, tmp_path / "a", seed=3, workers=1)
  b = fz.feasibility_study(embs, y, CLASS_NAMES, tmp_path / "b", seed=3, workers=3)
  # Sets studied in parallel threads: same scores, same t-SNE points (same picture).
  with open(a.pop("plot"), "rb") as fa, open(b.pop("plot"), "rb") as fb:
    assert fa.read() == fb.read()
  ta, tb = a.pop("timings"), b.pop("timings")
  assert set(ta) == set(tb) == {"kmeans", "projection", "plot", "total"}
  assert all(v > 0 for v in ta.values()) and ta["plot"] <= ta["total"]
  assert a == b
  x = embs["text"]
  np.testing.assert_allclose(fz.project_2d(x, seed=3), fz.project_2d(x, seed=3),
                             rtol=1e-6, atol=1e-6)


def test_study_read_back_from_the_cache(tmp_path, monkeypatch):
  from m6jax.features import cache
  embs, y = _study_inputs()
  root = tmp_path / "cache"
  a = fz.feasibility_study(embs, y, CLASS_NAMES, tmp_path / "a", method="pca", cache_dir=root)
  assert "cached" not in a["timings"]
  [info] = cache.summary(root)          # listed (and cleared) like the feature caches
  assert info["tower"] == "feasibility"
  computed = []
  monkeypatch.setattr(fz, "_study_one", lambda *a, **k: computed.append(1))
  b = fz.feasibility_study(embs, y, CLASS_NAMES, tmp_path / "b", method="pca", cache_dir=root)
  assert computed == [] and b["timings"]["cached"] == 1.0
  # The same scores, and the same picture from the stored projections.
  with open(a.pop("plot"), "rb") as fa, open(b.pop("plot"), "rb") as fb:
    assert fa.read() == fb.read()
  a.pop("timings"), b.pop("timings")
  assert a == b
  # Other labels, another seed: another study, computed.
  monkeypatch.undo()
  c = fz.feasibility_study(embs, y[::-1].copy(), CLASS_NAMES, tmp_path / "c", method="pca",
                           cache_dir=root)
  d = fz.feasibility_study(embs, y, CLASS_NAMES, tmp_path / "d", method="pca", seed=1,
                           cache_dir=root)
  assert "cached" not in c["timings"] and "cached" not in d["timings"]
  # Three studies stored (each its results and projections, in shards of its own): clear
  # removes every stored file of the tower, and a study afterwards is computed again.
  [info] = cache.summary(root)
  stored = [f for f in os.listdir(info["dir"]) if f != "tower.json"]
  assert len(stored) >= 3
  assert cache.clear(root, tower="feasibility")["files"] == len(stored)
  assert cache.summary(root) == []
  e = fz.feasibility_study(embs, y, CLASS_NAMES, tmp_path / "e", method="pca", cache_dir=root)
  assert "cached" not in e["timings"]


# --- scale: stratified projection sample, MiniBatchKMeans past a size ----------------

def _skewed_labels(seed=0):
  """10,000 labels over 5 classes of very different sizes (one of 3 rows), shuffled."""
  counts = [6000, 2500, 1300, 197, 3]
  y = np.repeat(np.arange(len(counts)), counts)
  return np.random.default_rng(seed).permutation(y), np.asarray(counts)


@pytest.mark.parametrize("size", [100, 500, 2001])
def test_stratified_sample_is_proportional_and_keeps_every_class(size):
  y, counts = _skewed_labels()
  idx = sampling.stratified_sample(y, size, seed=4)
  assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)   # sorted, no repeats
  got = np.bincount(y[idx], minlength=len(counts))
  floors = np.minimum(counts, sampling.MIN_PER_CLASS)
  assert np.all(got >= floors) and got[4] == 3                 # every class, small ones whole
  assert len(idx) == max(size, floors.sum())
  # Classes above their floor: within one row of their share of what the floored
  # classes leave (the floored ones take min(count, 5) rows each).
  floored = size * counts / counts.sum() < floors
  share = (len(idx) - got[floored].sum()) * counts / counts[~floored].sum()
  assert np.all(np.abs(got - share)[~floored] < 1.0), (got, share)


def test_stratified_sample_is_deterministic_and_all_rows_when_small():
  y, _ = _skewed_labels()
  a, b = sampling.stratified_sample(y, 300, seed=1), sampling.stratified_sample(y, 300, seed=1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, sampling.stratified_sample(y, 300, seed=2))
  np.testing.assert_array_equal(sampling.stratified_sample(y[:50], 50), np.arange(50))
  np.testing.assert_array_equal(sampling.stratified_sample(y[:50], 10**6), np.arange(50))
  with pytest.raises(ValueError, match="size"):
    sampling.stratified_sample(y, 0)


def test_study_projects_a_recorded_sample_and_switches_to_minibatch(tmp_path):
  embs, y = _study_inputs()
  res = fz.feasibility_study(embs, y, CLASS_NAMES, tmp_path, method="pca", tsne_max=30,
                             kmeans_minibatch_from=50, kmeans_batch_size=16)
  assert res["kmeans"] == {"algorithm": "minibatch", "rows": N,
                           "n_init": fz.MINIBATCH_N_INIT, "batch_size": 16}
  assert res["projection"] == {"method": "pca", "rows": 30, "of": N, "seed": 0,
                               "stratified_by": "label"}
  with open(tmp_path / "feasibility.json") as f:
    data = json.load(f)
  assert data["kmeans"] == res["kmeans"] and data["projection"] == res["projection"]
  assert sum(data["text"]["cluster_sizes"]) == N   # KMeans still clusters every row
  assert data["text"]["ari"] > 0.9
  _png_ok(res["plot"])


def test_minibatch_kmeans_ari_close_to_full_on_separated_blobs():
  # 7 well-separated blobs, 3,500 rows: past the threshold MiniBatchKMeans (batches
  # of 256) finds the same clustering as full KMeans, up to 0.02 ARI (both ~1).
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(7, 32))
  y = rng.integers(0, 7, size=3500)
  x = centers[y] + 0.05 * rng.normal(size=(3500, 32))
  full = fz.kmeans_ari(x, y, 7, kmeans=fz.kmeans_method(len(y), 10_000))
  mini_rec = fz.kmeans_method(len(y), 1000, batch_size=256)
  assert mini_rec["algorithm"] == "minibatch"
  mini = fz.kmeans_ari(x, y, 7, kmeans=mini_rec)
  # The reference: sklearn's adjusted_rand_score of sklearn's MiniBatchKMeans itself.
  from sklearn.cluster import MiniBatchKMeans
  feats = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  with threadpool_limits(limits=1):
    pred = MiniBatchKMeans(7, batch_size=256, n_init=fz.MINIBATCH_N_INIT,
                           random_state=0).fit_predict(feats)
  assert mini["ari"] == pytest.approx(adjusted_rand_score(y, pred), abs=1e-12)
  assert full["ari"] > 0.98
  assert abs(mini["ari"] - full["ari"]) <= 0.02
