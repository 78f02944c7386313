"""Held-out evaluation during distillation: the loss terms over whole documents never trained on.

Every `eval_every` steps and at the last, a run computes its loss terms over the held-out
set (`data.hold_out`) with the student in eval mode: the loss function the step trains with
(`step.Objective.loss`), given no dropout key. The set is cut into global batches of the
step's micro-batch shape (one that fits in memory) and the training batch's sharding, in
corpus order, the last filled with padding rows (attention mask 0, which no loss counts);
each process builds only its own block of rows of each, as in training. Each term is a
mean over the set's real tokens, the batches weighted by their tokens as the step weights
micro-batches (`step.make_train_step`): the loss of all held-out examples as one batch,
whatever the batch size or device count. The values are logged as `eval/<term>` in the
step's record, beside the training terms, with the evaluation's wall time as
`eval_seconds` (left out of the record's tokens/s).
"""

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import data, sharding

PREFIX = "eval/"


def batches(examples: data.PackedExamples, global_batch_size: int, process_index: int,
            process_count: int) -> list[dict[str, np.ndarray]]:
  """This process's rows of each global batch of `examples`, in order, padding rows last."""
  per_process, n = global_batch_size // process_count, len(examples)
  out = []
  for first in range(0, n, global_batch_size):  # every process builds every batch, maybe all padding
    lo = first + process_index * per_process
    rows = np.arange(min(lo, n), min(lo + per_process, n))
    batch = examples.gather(rows)
    fill = per_process - len(rows)
    out.append({k: np.pad(v, ((0, fill), (0, 0)), constant_values=examples.special.pad
                          if k == "input_ids" else 0) for k, v in batch.items()})
  return out


def make_weighted_loss(loss_fn: Callable, mesh) -> Callable:
  """Jitted `(params, teacher_params, batch) -> ({term: value * tokens}, tokens)` of one
  batch in eval mode; `tokens` is the count the loss means are over, as in the step."""

  def weighted(params, teacher_params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # attention routes see the target
      _, terms = loss_fn(params, teacher_params, batch, None)  # no dropout key: no dropout
    terms = dict(terms)
    tokens = terms.pop("tokens", jnp.sum(batch["attention_mask"])).astype(jnp.float32)
    return {k: v * tokens for k, v in terms.items()}, tokens

  replicated = sharding.replicated(mesh)
  return jax.jit(weighted, in_shardings=(replicated, replicated, sharding.batch_sharded(mesh)),
                 out_shardings=replicated)


class Evaluation:
  """A run's held-out loss terms at its evaluation steps; `last` holds the latest as floats."""

  def __init__(self, loss_fn: Callable, mesh, examples: data.PackedExamples | None, *,
               batch_size: int, eval_every: int, max_steps: int):
    """`batch_size`: examples per evaluation batch over all processes (a multiple of the
    mesh size); `examples` may be None when `eval_every` is 0 (no evaluation)."""
    self.mesh, self.every, self.max_steps = mesh, eval_every, max_steps
    self.batches = [] if not eval_every else batches(
        examples, batch_size, jax.process_index(), jax.process_count())
    self.weighted = make_weighted_loss(loss_fn, mesh)
    self.last = None  # {"step": s, <term>: mean} of the latest evaluation

  def due(self, step: int) -> bool:
    return self.every > 0 and (step % self.every == 0 or step == self.max_steps)

  def __call__(self, step: int, params, teacher_params) -> dict:
    """`{"eval/<term>": mean over the held-out set, "eval_seconds": its wall time}` after step
    `step` if it is an evaluation step, else {}. It waits for the values, so the next step
    may reuse `params`' buffers."""
    if not self.due(step):
      return {}
    start, sums = time.perf_counter(), None
    for local in self.batches:
      out = self.weighted(params, teacher_params, sharding.global_batch(local, self.mesh))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    terms, tokens = sums
    means = jax.block_until_ready({PREFIX + k: v / jnp.maximum(tokens, 1.0) for k, v in terms.items()})
    self.last = {"step": step} | {k.removeprefix(PREFIX): float(v) for k, v in means.items()}
    return means | {"eval_seconds": time.perf_counter() - start}
