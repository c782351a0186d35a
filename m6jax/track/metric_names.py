"""results.json and epoch records -> MLflow metric names and values.

Metric names (step = epoch for per-epoch series, 0 for final values):
  <split>/<metric>             mean over seeds (train/loss, val/macro_f1, test/accuracy, ...)
  <split>/<metric>/seed_<s>    one seed (s is the seed value, cfg.seed + k)
  <split>/<metric>/<stat>      std, ci95_low, ci95_high (seed spread: t interval over seeds,
                               clipped to [0, 1])
  test/ensemble/<metric>       the seed ensemble (mean of probabilities)
  test/bootstrap/<metric>[_low|_high]  the ensemble's score and its 95 % percentile-bootstrap
                               interval over test products (.../per_seed_mean/...: the
                               mean over seeds); metric: accuracy, macro_f1
  val/best_<metric>            the values at each seed's selected epoch (TrainState.best_epoch)
  feasibility/<emb>/{ari,nmi}, gradcam/stability, importance/<modality>/{drop,without},
  explain/text/deletion/top<k>/{attributed,random}, explain/image/deletion/{attributed,random},
  time/<phase>_s               analysis and timings, when the results have them
"""

from __future__ import annotations

from m6jax.evaluate import metrics as metrics_lib

EPOCH_KEYS = {"loss": "train/loss", "grad_norm": "train/grad_norm",
              "val_macro_f1": "val/macro_f1", "val_accuracy": "val/accuracy"}
TEST_METRICS = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall")
STATS = ("std", "ci95_low", "ci95_high")


def _seed_keys(prefix, vals, seeds) -> dict:
  """Per-seed names; replicas that are not one per seed (folds x seeds) by their index."""
  if len(vals) == len(seeds):
    return {f"{prefix}/seed_{s}": float(v) for s, v in zip(seeds, vals)}
  return {f"{prefix}/replica_{i}": float(v) for i, v in enumerate(vals)}


def epoch_metrics(record: dict, seeds) -> dict:
  """One epoch record -> {name: value}: per-seed values and their mean."""
  out = {}
  for key, name in EPOCH_KEYS.items():
    vals = [float(v) for v in record.get(key) or ()]
    if vals:
      out[name] = sum(vals) / len(vals)
      out |= _seed_keys(name, vals, seeds)
  if "seconds" in record:
    out["time/epoch_s"] = float(record["seconds"])
  return out


def _stats(prefix, st) -> dict:
  out = {prefix: st["mean"]}
  out |= {f"{prefix}/{s}": st[s] for s in STATS if isinstance(st.get(s), (int, float))}
  return out


def final_metrics(results: dict) -> dict:
  """results.json -> {name: value} of the final scores and analyses (see module doc)."""
  test = results.get("test", {})
  per_seed = test.get("per_seed", {})
  seeds = results.get("seeds") or list(range(len(per_seed.get("accuracy", []))))
  out = {}
  for k in TEST_METRICS:
    if k in test.get("summary", {}):
      out |= _stats(f"test/{k}", test["summary"][k])
      out |= _seed_keys(f"test/{k}", per_seed.get(k, []), seeds)
    if isinstance(test.get("ensemble", {}).get(k), (int, float)):
      out[f"test/ensemble/{k}"] = test["ensemble"][k]
  out |= bootstrap_metrics(test.get("bootstrap") or {})
  for name, vals in best_val(results).items():
    bounds = None if name == "log_loss" else (0.0, 1.0)
    out |= _stats(f"val/best_{name}", metrics_lib.seed_stats(vals, bounds))
    out |= _seed_keys(f"val/best_{name}", vals, seeds)
  for emb, r in (results.get("feasibility") or {}).items():
    if isinstance(r, dict):
      out |= {f"feasibility/{emb}/{m}": r[m] for m in ("ari", "nmi") if m in r}
  if isinstance((results.get("gradcam") or {}).get("stability"), (int, float)):
    out["gradcam/stability"] = results["gradcam"]["stability"]
  for k, v in (results.get("modality_importance") or {}).items():
    kind, _, mod = k.partition("_")
    if kind in ("drop", "without") and mod:
      out[f"importance/{mod}/{kind}"] = v
  ex = results.get("explain") or {}   # deletion curves (m6jax.explain.faithfulness)
  for k, d in ((ex.get("text") or {}).get("deletion") or {}).items():
    out |= {f"explain/text/deletion/top{k}/{w}": d[w] for w in ("attributed", "random")}
  d = (ex.get("image") or {}).get("deletion") or {}
  out |= {f"explain/image/deletion/{w}": d[w] for w in ("attributed", "random") if w in d}
  timings = results.get("timings") or results.get("timing_s") or {}
  out |= {f"time/{k}_s": v for k, v in timings.items()}
  return {k: float(v) for k, v in out.items()}


def bootstrap_metrics(boot: dict, prefix: str = "test/bootstrap") -> dict:
  """results.json's test.bootstrap -> {'test/bootstrap/accuracy', '..._low', '..._high', ...}."""
  out = {}
  for k in ("accuracy", "macro_f1"):
    ci = boot.get(k) or {}
    if ci:
      out |= {f"{prefix}/{k}": ci["point"], f"{prefix}/{k}_low": ci["low"],
              f"{prefix}/{k}_high": ci["high"]}
  if boot.get("per_seed_mean"):
    out |= bootstrap_metrics(boot["per_seed_mean"], prefix + "/per_seed_mean")
  return out


def best_val(results: dict) -> dict:
  """Per-seed validation scores at the epoch training selected (results['validation'],
  read from each replica's TrainState.best_epoch): {'macro_f1': [K], 'accuracy': [K],
  'log_loss': [K]}; replicas never selected are left out. Older results without it:
  their stored 'best_val_macro_f1' only (no epoch is recomputed here)."""
  val = results.get("validation") or {}
  if val.get("best_epoch") is not None:
    return {k: [float(v) for v in val[k] if v is not None]
            for k in ("macro_f1", "accuracy", "log_loss")
            if any(v is not None for v in val.get(k) or ())}
  if results.get("best_val_macro_f1"):
    return {"macro_f1": [float(v) for v in results["best_val_macro_f1"]]}
  return {}
