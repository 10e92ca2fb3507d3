"""Training that keeps its best model on a validation split (FedDF's server).

`public_training` trains on the public data, validated or not.

`guard` wraps a `clients.loss_step`-style step, whose carry is `(params,
opt_state)`: every `eval_every` steps, and after the last, it scores the
parameters (`score(params)`, higher is better) and keeps the best, the
starting parameters included (`start` scores them). At an evaluation that
finds `patience` or more steps since the best one, it stops: later steps
change nothing and report nothing (the scan still runs them, at the cost of
their arithmetic). The first of equal scores is kept.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedkd import clients
from fedkd.clients import tree_where
from fedkd.typing import Array, Params


class Tracker(NamedTuple):
  best: Params  # the best-scoring parameters so far
  best_score: Array
  best_step: Array  # 0: the starting parameters
  step: Array  # steps taken
  stopped: Array


def start(params: Params, score: Callable[[Params], Array]) -> Tracker:
  """The tracker before the first step: the starting parameters are best."""
  return Tracker(params, score(params), jnp.zeros((), jnp.int32),
                 jnp.zeros((), jnp.int32), jnp.zeros((), bool))


def guard(step, score: Callable[[Params], Array], *, total_steps: int,
          eval_every: int, patience: int):
  """`step` over the carry `(inner, Tracker)`; see the module docstring.

  The wrapped step also reports `steps` (1 while running) and `examples`
  (the batch's real examples while running), so means cover the steps run;
  both float32: the examples of fewer than 2^31 steps (validated) can pass
  2^31, where an int32 sum would wrap.
  """

  def guarded(carry, batch):
    inner, tracker = carry
    new_inner, metrics = step(inner, batch)
    running = ~tracker.stopped
    inner = tree_where(running, new_inner, inner)
    t = tracker.step + 1
    evaluate = running & ((t % eval_every == 0) | (t == total_steps))
    score_t = jax.lax.cond(evaluate, lambda: score(inner[0]).astype(
        tracker.best_score.dtype), lambda: tracker.best_score)
    better = evaluate & (score_t > tracker.best_score)
    best_step = jnp.where(better, t, tracker.best_step)
    tracker = Tracker(
        best=tree_where(better, inner[0], tracker.best),
        best_score=jnp.where(better, score_t, tracker.best_score),
        best_step=best_step, step=t,
        stopped=tracker.stopped | (evaluate & (t - best_step >= patience)))
    metrics = jax.tree.map(lambda m: m * running, metrics)
    # float32: the steps' sum of examples may pass 2^31, past int32.
    return (inner, tracker), dict(
        metrics, steps=running.astype(jnp.float32),
        examples=jnp.sum(batch.example_mask, dtype=jnp.float32) * running)

  return guarded


def public_training(step, params: Params, tx, public_x: Array,
                    rng: Array, *, score: Callable[[Params], Array] | None,
                    epochs: int, batch_size: int, eval_every: int,
                    patience: int) -> tuple[Params, dict[str, Array]]:
  """`clients.public_training` of `(params, tx state)` by `step`.

  With `score`, guarded: the best parameters are kept (module docstring).

  Returns:
    The kept parameters and the step metrics' sums, with `examples`: the
    real examples of the steps run (float32: distill_epochs x the public
    examples may pass 2^31, which int32 cannot hold).
  """
  carry = (params, tx.init(params))
  if score is None:
    (params, _), sums = clients.public_training(
        step, carry, public_x, rng, epochs=epochs, batch_size=batch_size)
    return params, dict(sums, examples=jnp.float32(
        epochs * public_x.shape[0]))
  total = clients.num_steps(public_x.shape[0], epochs=epochs,
                            batch_size=batch_size)
  (_, tracker), sums = clients.public_training(
      guard(step, score, total_steps=total, eval_every=eval_every,
            patience=patience), (carry, start(params, score)), public_x, rng,
      epochs=epochs, batch_size=batch_size)
  return tracker.best, sums
