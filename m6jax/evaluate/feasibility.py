"""Unsupervised feasibility study: do the embeddings cluster by category?

For each embedding set (text, image, and their fusion) run KMeans with k equal
to the number of classes and score the clustering against the true labels with
the Adjusted Rand Index (0 = chance, 1 = perfect), plus a 2-D projection plot.

Scale: KMeans clusters every row, with full (Lloyd) KMeans up to `kmeans_minibatch_from`
rows and sklearn's MiniBatchKMeans past it (in float32 there: a 10^6 x 1664 fused
matrix is 6.7 GB, not 13); the 2-D projection (t-SNE is O(N log N) per iteration and
dominates) runs on a stratified sample of at most `tsne_max` rows
(m6jax.evaluate.sampling). Both choices are recorded in the study's output.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits

from m6jax import files
from m6jax.evaluate import sampling
from m6jax.features import cache as cache_lib

log = logging.getLogger(__name__)

FUSED = "fused"
# Part of the cache key: bump when the study's maths or defaults change.
STUDY_VERSION = 2
MINIBATCH_N_INIT = 10  # MiniBatchKMeans initialisations tried (on a subset; one run)


def _as_2d(embeddings, dtype=np.float64):
  """Any array-like (N, D) (numpy, jax) -> numpy (N, D) of `dtype`."""
  x = np.asarray(embeddings, dtype=dtype)
  if x.ndim != 2:
    raise ValueError(f"expected (N, D) embeddings, got shape {x.shape}")
  return x


NORMALIZE_ROWS = 8192   # rows normalised at a time: np.linalg.norm's x*x temporary stays
                        # (8192, D), not (N, D)


def l2_normalize(x, eps=1e-12, dtype=np.float64, out=None):
  """Row-wise L2 normalisation, (N, D) -> (N, D) of `dtype`; all-zero rows stay zero.

  out: an (N, D) array of `dtype` to write into (a column block of a wider matrix:
  `fuse`); None: a new array. Done NORMALIZE_ROWS rows at a time, each row exactly as
  one whole-matrix call computes it.
  """
  x = _as_2d(x, dtype)
  if out is None:
    out = np.empty(x.shape, dtype)
  elif out.shape != x.shape or out.dtype != dtype:
    raise ValueError(f"out is {out.dtype} {out.shape}, expected {np.dtype(dtype)} {x.shape}")
  for lo in range(0, x.shape[0], NORMALIZE_ROWS):
    rows = x[lo:lo + NORMALIZE_ROWS]
    np.divide(rows, np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), eps),
              out=out[lo:lo + NORMALIZE_ROWS])
  return out


def kmeans_method(n: int, minibatch_from=None, batch_size: int = 1024) -> dict:
  """How KMeans clusters n rows: {'algorithm': 'full' | 'minibatch', 'rows': n,
  'n_init', 'batch_size' (None for full)}. Full KMeans up to `minibatch_from` rows
  (None: always), sklearn's MiniBatchKMeans past it."""
  if minibatch_from is None or n <= minibatch_from:
    return {"algorithm": "full", "rows": int(n), "n_init": 10, "batch_size": None}
  return {"algorithm": "minibatch", "rows": int(n), "n_init": MINIBATCH_N_INIT,
          "batch_size": int(batch_size)}


def kmeans_ari(embeddings, labels, num_classes, seed=0, n_init=10,
               normalize=True, num_threads=1, kmeans=None):
  """KMeans(k=num_classes) on (N, D) embeddings vs true (N,) int labels.

  Returns {'ari': float, 'nmi': float, 'cluster_sizes': list[int]} where
  cluster_sizes is sorted largest first (cluster ids are arbitrary, so only
  the size profile is meaningful; one huge cluster = collapsed embeddings).
  num_threads caps OpenMP/BLAS threads (None = library default).
  kmeans: a `kmeans_method` record; None: full KMeans with `n_init` restarts.
  MiniBatchKMeans clusters float32 rows (full KMeans float64).
  """
  minibatch = kmeans is not None and kmeans["algorithm"] == "minibatch"
  dtype = np.float32 if minibatch else np.float64
  x = _as_2d(embeddings, dtype)
  labels = np.asarray(labels).reshape(-1)
  if x.shape[0] != labels.shape[0]:
    raise ValueError(f"{x.shape[0]} embeddings but {labels.shape[0]} labels")
  if normalize:
    # Encoders' embedding norms carry little semantic signal (and vary with
    # e.g. text length); cosine geometry is what the classifier head sees.
    x = l2_normalize(x, dtype=dtype)
  from sklearn.cluster import KMeans, MiniBatchKMeans
  from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
  if minibatch:
    km = MiniBatchKMeans(n_clusters=num_classes, batch_size=kmeans["batch_size"],
                         n_init=kmeans["n_init"], random_state=seed)
  else:
    km = KMeans(n_clusters=num_classes, n_init=n_init if kmeans is None else kmeans["n_init"],
                random_state=seed)
  with threadpool_limits(limits=num_threads):
    pred = km.fit_predict(x)
  sizes = np.bincount(pred, minlength=num_classes)
  return {
      "ari": float(adjusted_rand_score(labels, pred)),
      "nmi": float(normalized_mutual_info_score(labels, pred)),
      "cluster_sizes": sorted((int(s) for s in sizes), reverse=True),
  }


def fuse(embs, dtype=np.float64):
  """{name: (N, Di)} -> (N, sum Di) of `dtype`: L2-normalise each modality, concatenate.

  Per-modality normalisation keeps one modality from dominating the
  distances just because its features live on a larger scale.
  """
  if not embs:
    raise ValueError("fuse needs at least one embedding set")
  parts = [_as_2d(e, dtype) for e in embs.values()]
  n = {p.shape[0] for p in parts}
  if len(n) != 1:
    raise ValueError(f"embedding sets disagree on N: {sorted(n)}")
  # Each set normalised straight into its column block: no normalised copies.
  fused = np.empty((n.pop(), sum(p.shape[1] for p in parts)), dtype)
  lo = 0
  for p in parts:
    l2_normalize(p, dtype=dtype, out=fused[:, lo:lo + p.shape[1]])
    lo += p.shape[1]
  return fused


def project_2d(embeddings, method="tsne", seed=0, max_iter=500, num_threads=1):
  """(N, D) -> (N, 2) with t-SNE (default) or PCA.

  num_threads caps OpenMP/BLAS threads (None = library default).
  """
  x = _as_2d(embeddings)
  n = x.shape[0]
  if method == "pca":
    from sklearn.decomposition import PCA
    with threadpool_limits(limits=num_threads):
      return PCA(n_components=2, random_state=seed).fit_transform(x)
  if method != "tsne":
    raise ValueError(f"unknown projection method {method!r}")
  # sklearn requires perplexity < N; (N-1)/3 keeps ~3 perplexities of
  # neighbours available for small N.
  perplexity = max(1.0, min(30.0, (n - 1) / 3.0))
  from sklearn.manifold import TSNE
  tsne = TSNE(n_components=2, init="pca", perplexity=perplexity,
              random_state=seed, max_iter=max_iter)
  with threadpool_limits(limits=num_threads):
    return tsne.fit_transform(x)


def _class_colors(num_classes):
  """num_classes distinct RGBA colours (tab10 / tab20, else a smooth map)."""
  from matplotlib import colormaps
  if num_classes <= 10:
    cmap = colormaps["tab10"]
    return [cmap(i) for i in range(num_classes)]
  if num_classes <= 20:
    cmap = colormaps["tab20"]
    return [cmap(i) for i in range(num_classes)]
  cmap = colormaps["turbo"]
  return [cmap(i / max(1, num_classes - 1)) for i in range(num_classes)]


def _draw_panel(ax, points, labels, class_names, colors, title):
  """Scatter (N, 2) points coloured by true class into ax."""
  points = np.asarray(points)
  labels = np.asarray(labels).reshape(-1)
  for c, name in enumerate(class_names):
    m = labels == c
    if m.any():
      ax.scatter(points[m, 0], points[m, 1], s=8, color=colors[c],
                 label=str(name), alpha=0.8, linewidths=0)
  ax.set_title(title)
  ax.set_xticks([])
  ax.set_yticks([])


def _save(fig, path):
  d = os.path.dirname(os.fspath(path))
  if d:
    os.makedirs(d, exist_ok=True)
  FigureCanvasAgg(fig)  # attaches an Agg canvas; no global pyplot state.
  # bbox_inches="tight" keeps long class names in the legend from clipping.
  fig.savefig(path, dpi=100, bbox_inches="tight")
  return os.fspath(path)


def _legend_kwargs(num_classes):
  return dict(fontsize="small", markerscale=2,
              ncol=max(1, (num_classes + 14) // 15))


def plot_projection(points, labels, class_names, path, title=""):
  """Single-panel scatter of (N, 2) points coloured by label; writes PNG."""
  colors = _class_colors(len(class_names))
  fig = Figure(figsize=(7, 6))
  ax = fig.add_subplot(1, 1, 1)
  _draw_panel(ax, points, labels, class_names, colors, title)
  ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5),
            **_legend_kwargs(len(class_names)))
  fig.tight_layout()
  return _save(fig, path)


def plot_study(projections, labels, class_names, path, aris, title=""):
  """One PNG, one panel per {name: (N, 2)} projection, ARI in each title."""
  names = list(projections)
  colors = _class_colors(len(class_names))
  fig = Figure(figsize=(5 * len(names), 5.2))
  axes = [fig.add_subplot(1, len(names), i + 1) for i in range(len(names))]
  for ax, name in zip(axes, names):
    ari = aris.get(name)
    panel = name if ari is None else f"{name}  (ARI={ari:.3f})"
    _draw_panel(ax, projections[name], labels, class_names, colors, panel)
  # One shared legend: the colour -> class mapping is the same in every panel.
  handles, texts = axes[0].get_legend_handles_labels()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  # Anchored just outside the right edge; bbox_inches="tight" in _save grows
  # the canvas to fit it, however long the class names are.
  fig.legend(handles, texts, loc="center left", bbox_to_anchor=(1.0, 0.5),
             **_legend_kwargs(len(class_names)))
  return _save(fig, path)


def plan(labels, seed=0, method="tsne", tsne_max=None, kmeans_minibatch_from=None,
         kmeans_batch_size=1024) -> dict:
  """What a study of (N,) labels does: {'kmeans': kmeans_method record (every row),
  'projection': {'method', 'rows', 'of', 'seed', 'stratified_by'}, 'sample': sorted
  (n,) indices of the projected rows (a stratified sample of at most `tsne_max`, None:
  every row; m6jax.evaluate.sampling)}."""
  n = len(labels)
  idx = (np.arange(n) if tsne_max is None or tsne_max >= n
         else sampling.stratified_sample(labels, tsne_max, seed))
  return {"kmeans": kmeans_method(n, kmeans_minibatch_from, kmeans_batch_size),
          "projection": {"method": method, **sampling.describe(len(idx), n, seed)},
          "sample": idx}


def _study_one(x, labels, num_classes, seed, method, num_threads, p):
  """One embedding set -> (KMeans scores, (n, 2) projection of the plan's sample,
  {phase: seconds})."""
  t0 = time.perf_counter()
  scores = kmeans_ari(x, labels, num_classes, seed=seed, num_threads=num_threads,
                      kmeans=p["kmeans"])
  t1 = time.perf_counter()
  # Project the same normalised geometry that KMeans clustered.
  points = project_2d(l2_normalize(x[p["sample"]]), method=method, seed=seed,
                      num_threads=num_threads)
  return scores, points, {"kmeans": t1 - t0, "projection": time.perf_counter() - t1}


def _study_key(sets, labels, class_names, seed, method, p) -> str:
  """sha1 of everything a study's numbers depend on (the arrays' bytes included)."""
  h = hashlib.sha1(json.dumps({"version": STUDY_VERSION, "seed": seed, "method": method,
                               "classes": list(class_names), "kmeans": p["kmeans"],
                               "projection_rows": p["projection"]["rows"],
                               "sets": {k: list(x.shape) for k, x in sets.items()}},
                              sort_keys=True).encode())
  for x in [*sets.values(), np.asarray(labels, np.int64)]:
    h.update(memoryview(np.ascontiguousarray(x)).cast("B"))   # the bytes, not a copy
  return h.hexdigest()


def _study_cache(cache_dir) -> cache_lib.FeatureCache:
  return cache_lib.FeatureCache(cache_dir, "feasibility", {"kind": "study",
                                                           "version": STUDY_VERSION})


def _cached_study(store, key, names):
  """(results, projections) of a stored study, or None."""
  want = [f"{key}.results"] + [f"{key}.{n}" for n in names]
  got = store.get_many(want)
  if len(got) < len(want):
    return None
  results = json.loads(got[want[0]].tobytes().decode("utf-8"))
  return results, {n: got[f"{key}.{n}"] for n in names}


def _store_study(store, key, results, projections):
  blob = np.frombuffer(json.dumps(results).encode("utf-8"), np.uint8)
  store.put_many({f"{key}.results": blob} | {f"{key}.{n}": p for n, p in projections.items()},
                 dtype=None)


def _study_all(sets, labels, num_classes, seed, method, num_threads, workers, p):
  """Every set's study, `workers` sets at once -> (results, projections, timings)."""
  # sklearn (1.6 s to import) only when a study is computed; imported here,
  # before the worker threads need it.
  for module in ("sklearn.cluster", "sklearn.decomposition", "sklearn.manifold",
                 "sklearn.metrics"):
    importlib.import_module(module)
  # One thread limit for the whole pool: the per-call limits inside then
  # set and restore the same value, whatever the threads' interleaving.
  with threadpool_limits(limits=num_threads), \
       ThreadPoolExecutor(max_workers=1 if num_threads is None else
                          max(1, min(workers, len(sets)))) as pool:
    futures = {name: pool.submit(_study_one, x, labels, num_classes, seed, method,
                                 num_threads, p) for name, x in sets.items()}
    done = {name: f.result() for name, f in futures.items()}
  results = {name: d[0] for name, d in done.items()}
  projections = {name: d[1] for name, d in done.items()}
  timings = {phase: sum(d[2][phase] for d in done.values())
             for phase in ("kmeans", "projection")}
  return results, projections, timings


def _plot_title(p) -> str:
  pr, km = p["projection"], p["kmeans"]
  rows = (f"all {pr['of']:,} rows" if pr["rows"] == pr["of"] else
          f"{pr['rows']:,} of {pr['of']:,} rows (stratified sample)")
  return f"{pr['method']} of {rows}; {km['algorithm']} KMeans on all {km['rows']:,} rows"


def feasibility_study(embs, labels, class_names, out_dir, seed=0,
                      method="tsne", num_threads=1, workers=3, cache_dir=None,
                      tsne_max=None, kmeans_minibatch_from=None, kmeans_batch_size=1024):
  """KMeans ARI + 2-D projections for each {name: (N, D)} set (+ 'fused').

  Writes out_dir/feasibility.png and out_dir/feasibility.json and returns
  {name: {'ari', 'nmi', 'cluster_sizes'}, ..., 'kmeans': {'algorithm' ('full' |
  'minibatch'), 'rows', 'n_init', 'batch_size'}, 'projection': {'method', 'rows'
  (projected), 'of' (N), 'seed', 'stratified_by'}, 'plot': png path,
  'timings': {'kmeans', 'projection' (seconds summed over sets), 'plot',
  'total' (wall seconds)}}.
  tsne_max: the projection's rows, a stratified sample of the N (None: all);
  kmeans_minibatch_from: past this N, MiniBatchKMeans with batches of
  kmeans_batch_size (None: full KMeans always); see `plan`.
  num_threads caps BLAS/OpenMP threads for KMeans and t-SNE (None = library
  default). It defaults to 1 because at N ~ 1k the work is tiny and OpenMP
  spin-waiting on a shared 2-core box made the study 10-20x slower in wall
  time (66 s vs 8 s for N=840, D=1664, measured under load).
  workers: sets studied at once, in threads (KMeans and t-SNE release the GIL;
  each set's work is unchanged, so results do not depend on it). With
  num_threads None the sets run one at a time: sklearn's own thread limits
  inside KMeans would then race between threads.
  cache_dir: a feature cache root (m6jax.features.cache) where studies are kept by a
  hash of the embeddings, labels, classes, seed, method and plan: another
  experiment on the same features (another head, a sweep cell) reads the
  scores and projections back instead of recomputing them (timings then
  say 'cached': 1.0). None: always computed.
  """
  t0 = time.perf_counter()
  if not embs:
    raise ValueError("feasibility_study needs at least one embedding set")
  if FUSED in embs:
    raise ValueError(f"{FUSED!r} is reserved for the fused set")
  labels = np.asarray(labels).reshape(-1)
  num_classes = len(class_names)
  p = plan(labels, seed, method, tsne_max, kmeans_minibatch_from, kmeans_batch_size)
  dtype = np.float32 if p["kmeans"]["algorithm"] == "minibatch" else np.float64
  sets = {k: _as_2d(v, dtype) for k, v in embs.items()}
  if len(sets) >= 2:
    sets[FUSED] = fuse(sets, dtype)
  for name, x in sets.items():
    if x.shape[0] != labels.shape[0]:
      raise ValueError(f"{name}: {x.shape[0]} rows but {labels.shape[0]} "
                       "labels")

  store = key = hit = None
  if cache_dir is not None:
    store = _study_cache(cache_dir)
    key = _study_key(sets, labels, class_names, seed, method, p)
    hit = _cached_study(store, key, list(sets))
  if hit is not None:
    results, projections = hit
    timings = {"kmeans": 0.0, "projection": 0.0, "cached": 1.0}
  else:
    # Past the MiniBatchKMeans size one set at a time: each holds a normalised copy.
    results, projections, timings = _study_all(
        sets, labels, num_classes, seed, method, num_threads,
        1 if p["kmeans"]["algorithm"] == "minibatch" else workers, p)
    if store is not None:
      _store_study(store, key, results, projections)
  record = {"kmeans": p["kmeans"], "projection": p["projection"]}

  t_plot = time.perf_counter()
  os.makedirs(out_dir, exist_ok=True)
  png = plot_study(projections, labels[p["sample"]], class_names,
                   os.path.join(out_dir, "feasibility.png"),
                   {k: r["ari"] for k, r in results.items()}, title=_plot_title(p))
  files.write_json(os.path.join(out_dir, "feasibility.json"), {**results, **record})
  timings["plot"] = time.perf_counter() - t_plot
  timings["total"] = time.perf_counter() - t0

  lines = [f"{'set':<10} {'dim':>6} {'ARI':>7} {'NMI':>7}  cluster sizes"]
  for name, r in results.items():
    lines.append(f"{name:<10} {sets[name].shape[1]:>6} {r['ari']:>7.3f} "
                 f"{r['nmi']:>7.3f}  {r['cluster_sizes']}")
  log.info("feasibility (%s KMeans k=%d, N=%d, projected %d, %.1f s%s):\n%s",
           p["kmeans"]["algorithm"], num_classes, labels.shape[0], len(p["sample"]),
           timings["total"], ", from cache" if hit else "", "\n".join(lines))
  return {**results, **record, "plot": png, "timings": timings}
