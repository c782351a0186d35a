"""Train state, loss and the pure per-replica steps that the trainers bind.

Every function here works on ONE replica (no leading K axis): m6jax.train.trainer
binds the static parts with `functools.partial`, then `jax.vmap`s over the
replica axis and `jax.jit`s, as flax/examples/imagenet binds its
`train_step`. Adding another replica axis (e.g. cross-validation folds) is one
more `jax.vmap` around the same functions.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """One replica's state (a leading K axis on every leaf when vmapped).

  best_* hold the parameters of the epoch with the best validation score
  (`best_score`: macro-F1, or minus the log-loss with train.select_by='log_loss'),
  so each replica's selection travels with it through the checkpoint: what is
  saved, scored and served is the same thing. `best_epoch` is the epoch they come
  from (-1 until the first selection): the one definition of "the selected epoch"
  that results.json, the training curves and MLflow read.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  best_params: Any
  best_batch_stats: Any
  best_score: jax.Array
  best_epoch: jax.Array


def epoch_key(key, epoch, salt: int):
  """The key of one (replica, epoch) for one purpose (`salt`: 1 order, 2 dropout)."""
  return jax.random.fold_in(jax.random.fold_in(key, salt), epoch)


def new_state(params, batch_stats, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state: step 0, best_* = the initial parameters, best_score = -inf,
  best_epoch = -1 (nothing selected yet).

  -inf, not -1: with select_by=log_loss the score is -log_loss, which stays below
  -1 for a weak model; any finite first score must replace the initial parameters.
  """
  return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params),
                    params, batch_stats, jnp.full((), -jnp.inf, jnp.float32),
                    jnp.full((), -1, jnp.int32))


def keep_best(state: TrainState, score, epoch) -> TrainState:
  """Copies params/batch_stats into best_* and `epoch` into best_epoch where `score`
  beats best_score (strictly: ties keep the earlier epoch)."""
  better = score > state.best_score

  def pick(new, old):
    return jax.tree.map(lambda a, b: jnp.where(better, a, b), new, old)

  return state.replace(best_params=pick(state.params, state.best_params),
                       best_batch_stats=pick(state.batch_stats, state.best_batch_stats),
                       best_score=jnp.where(better, score, state.best_score),
                       best_epoch=jnp.where(better, jnp.asarray(epoch, jnp.int32),
                                            state.best_epoch))


def loss_fn(logits, labels, mask, num_classes: int, smoothing: float = 0.0):
  """Mean softmax cross-entropy over valid (mask) rows: logits (B, C), labels/mask (B,)."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  per = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  mask = mask.astype(per.dtype)
  return jnp.sum(per * mask) / jnp.maximum(mask.sum(), 1.0)


def _variables(params, batch_stats) -> dict:
  """Flax variables; an empty or absent batch_stats collection is left out."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def train_step(state: TrainState, batch: dict, rng, *, apply_fn: Callable,
               tx: optax.GradientTransformation, num_classes: int, smoothing: float = 0.0,
               update_batch_stats: bool = False) -> tuple[TrainState, dict]:
  """One optimizer step of one replica.

  batch: the model's inputs plus 'label' (B,) int and 'mask' (B,) bool (padding rows
  False). apply_fn: a flax `Module.apply` returning {'logits': (B, C), ...}.
  rng: the dropout key of this step. Returns (new state, {'loss', 'grad_norm'}).
  """
  mutable = ["batch_stats"] if update_batch_stats else []

  def loss_of(params):
    out, upd = apply_fn(_variables(params, state.batch_stats), batch, train=True,
                        rngs={"dropout": rng}, mutable=mutable)
    loss = loss_fn(out["logits"], batch["label"], batch["mask"], num_classes, smoothing)
    return loss, upd

  (loss, upd), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  state = state.replace(step=state.step + 1, opt_state=opt_state,
                        params=optax.apply_updates(state.params, updates),
                        batch_stats=upd.get("batch_stats", state.batch_stats))
  return state, {"loss": loss, "grad_norm": optax.global_norm(grads)}


def predict_step(params, batch_stats, batch: dict, *, apply_fn: Callable):
  """One replica's (B, C) class probabilities and (B, M) modality weights."""
  out = apply_fn(_variables(params, batch_stats), batch, train=False)
  return jax.nn.softmax(out["logits"]), out["weights"]


def scan_epoch(state: TrainState, data: dict, key, order_key, epoch, rows=None, *,
               step_fn: Callable, steps: int, batch_size: int,
               constrain: Callable | None = None):
  """A whole epoch over in-memory data as one `lax.scan` (frozen mode).

  data: {name: (N, ...)} with 'label' (N,); each step takes `batch_size` rows of a
  permutation drawn from `order_key` (the remainder is dropped); with `rows` (T,) (a
  cross-validation replica's training rows, padded with -1; steps * batch_size must not
  exceed its valid count) only those rows are drawn. step_fn(state, batch,
  rng) is a bound `train_step`; constrain(batch) may add sharding constraints.
  Returns (state, {'loss', 'grad_norm'} averaged over the steps).
  """
  if rows is None:
    perm = jax.random.permutation(epoch_key(order_key, epoch, 1), data["label"].shape[0])
  else:
    # A replica's own rows (padded with -1): a random order of the valid ones first.
    u = jax.random.uniform(epoch_key(order_key, epoch, 1), rows.shape)
    perm = rows[jnp.argsort(jnp.where(rows >= 0, u, 2.0))]
  idx = perm[: steps * batch_size].reshape(steps, batch_size)
  drop_key = epoch_key(key, epoch, 2)

  def body(state, batch_idx):
    batch = {k: v[batch_idx] for k, v in data.items()}
    if constrain is not None:
      batch = constrain(batch)
    batch["mask"] = jnp.ones_like(batch["label"], bool)
    return step_fn(state, batch, jax.random.fold_in(drop_key, state.step))

  state, metrics = jax.lax.scan(body, state, idx)
  return state, jax.tree.map(jnp.mean, metrics)
