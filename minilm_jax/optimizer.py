"""The optimizer of every run: AdamW, BERT's decay mask, clipping, warmup then linear decay.

Distillation, masked-LM pre-training and fine-tuning share it, as the MiniLM papers
and BERT do: AdamW (b1 0.9, b2 0.999, eps 1e-6, decoupled weight decay 0.01 on
matrices and embeddings only), global-norm clipping, a learning rate that rises
linearly from 0 to its peak and falls linearly to 0 at the last step. A distillation
run also zeroes the updates of the parameters its loss never reaches (`untrained_mask`),
so that weight decay cannot shrink them.
"""

from typing import Any, Callable

import jax
import optax


def warmup_linear_decay(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """0 -> `peak` over `warmup_steps` (at most `total_steps`), then linearly to 0 at `total_steps`."""
  warmup = min(warmup_steps, total_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup, 1)),
       optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))], [warmup])


def decay_mask(params) -> Any:
  """Weight decay on matrices and embeddings only: not on biases or LayerNorm."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-2].key in ("kernel", "embedding"), params)


def _keys(path) -> tuple:
  return tuple(getattr(p, "key", getattr(p, "name", None)) for p in path)


def untrained_mask(cfg, params) -> Any:
  """True for the parameters a distillation run's loss never reaches (their gradient is 0).

  `cfg` is the run's `config.DistillConfig`. A distillation loss reads only queries, keys
  and values (and logits made of them) of the captured student layers (the last one, or
  `loss_student_layers`), so the topmost captured layer's attention output, feed-forward
  and LayerNorms, every layer above it, and the pooler get no gradient; masked LM
  pre-training (`objective="mlm"`) uses every layer but not the pooler. AdamW's
  decoupled weight decay would still shrink them towards 0 at every step (by
  lr * weight_decay * w): a student exported after 400k steps would carry those layers
  decayed to almost nothing instead of at their init. The mask is structural: an
  `internals_loss` that reads less (TinyBERT's attention MSE reads no values) leaves the
  rest of its zero-gradient parameters to AdamW as usual.
  """
  top = max(cfg.loss_student_layers or (cfg.student_layers,)) - 1  # 0-based

  def untrained(path, _):
    keys = _keys(path)
    keys = keys[1:] if keys[0] == "encoder" else keys  # MLM: {"encoder": ..., "head": ...}
    if keys[0] == "pooler":
      return True
    if cfg.objective == "mlm" or keys[0] != "layers":
      return False
    return keys[1] > top or (keys[1] == top and keys[2] not in ("query", "key", "value"))

  return jax.tree_util.tree_map_with_path(untrained, params)


def adamw(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float, clip_grad_norm: float,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
          frozen: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
  """Clipping (`clip_grad_norm` 0 = off), AdamW with `decay_mask`, then zero updates where
  `frozen(params)` is True (none when `frozen` is None)."""
  clip = [optax.clip_by_global_norm(clip_grad_norm)] if clip_grad_norm else []
  zero = [optax.masked(optax.set_to_zero(), frozen)] if frozen is not None else []
  return optax.chain(*clip, optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                        mask=decay_mask), *zero)


def for_distillation(cfg, learning_rate: optax.ScalarOrSchedule | None = None
                     ) -> optax.GradientTransformation:
  """`adamw` with a `config.DistillConfig`'s settings, freezing its `untrained_mask`;
  `learning_rate` defaults to the run's `warmup_linear_decay` schedule."""
  if learning_rate is None:
    learning_rate = warmup_linear_decay(cfg.learning_rate, cfg.warmup_steps, cfg.max_steps)
  return adamw(learning_rate, weight_decay=cfg.weight_decay, clip_grad_norm=cfg.clip_grad_norm,
               b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
               frozen=lambda p: untrained_mask(cfg, p))
