"""Self-attention distillation losses of MiniLM (v1) and MiniLMv2, as one function.

Both papers compare *relations*: for a pair of [B, T, D] tensors (a, b) of one layer,
split into R heads of size d_r = D / R, the relation is

    Rel(a, b) = softmax(a_r b_r^T / sqrt(d_r))                      [B, R, T, S]

and the loss is the KL divergence from the teacher's relation to the student's,
averaged over relation heads and over all the batch's real (unpadded) query tokens:

    L = 1 / (n_real * R) * sum_{b, r, t real} KL(Rel_T[b, r, t] || Rel_S[b, r, t]),
    n_real = sum_{b, t} mask[b, t].

This is not the papers' mean per example (each sequence's tokens averaged, then the
examples): here every real token weighs the same, whatever its sequence's length, so a
batch split into micro-batches whose token-weighted losses are added gives exactly the
whole batch's loss (`step.make_train_step`), and padding changes nothing.

MiniLM (Wang et al., 2020, Eq. 7-9): attention transfer KL(A_T || A_S) with
A = Rel(q, k), plus value relation KL(Rel(v_T, v_T) || Rel(v_S, v_S)), R = the number
of attention heads, which teacher and student must share.
MiniLMv2 (Wang et al., 2021, Eq. 2-3): the Q-Q, K-K and V-V relations summed, with R
relation heads chosen independently of the attention heads, so teacher and student may
have any head counts (and widths), as long as R divides both widths.

Softmax and KL always run in float32, whatever the compute dtype; padded keys are
removed with a large finite negative (not -inf), so a fully padded row gives a finite
uniform distribution and neither NaN values nor NaN gradients.

`minilm_loss` is the loss the step trains with (both papers, any subset of their terms);
it computes each relation with `blockwise_relation.blockwise_relation_loss`, which never
holds a T x S tensor. `relation_loss` writes the definition out with the [B, R, T, S]
relations in memory: the reference the tests check both against.
"""

import difflib
import math
from typing import Protocol

import jax
import jax.numpy as jnp

from minilm_jax.blockwise_relation import MASKED, blockwise_relation_loss


class QueryKeyValue(Protocol):
  """What the losses read of one layer: its queries, keys and values, [B, T, D] each with
  the heads concatenated (before any dropout). The model's `AttentionInternals` is one, so
  the step passes its captured layers as they are; this file needs no model."""
  query: jax.Array
  key: jax.Array
  value: jax.Array


def _relation_log_probs(a_BTD: jax.Array, b_BSD: jax.Array, mask_BS: jax.Array,
                       relation_heads: int) -> jax.Array:
  """log Rel(a, b): [B, R, T, S] float32 log-softmax over keys, padded keys removed."""
  b, t, d = a_BTD.shape
  if d % relation_heads:
    raise ValueError(f"{relation_heads} relation heads do not divide the hidden size {d}: "
                     "choose relation_heads that divides both teacher and student widths")
  h = d // relation_heads
  a = a_BTD.reshape(b, t, relation_heads, h)
  k = b_BSD.reshape(b, b_BSD.shape[1], relation_heads, h)
  logits = jnp.einsum("BTRH,BSRH->BRTS", a, k, preferred_element_type=jnp.float32) / math.sqrt(h)
  logits = jnp.where(mask_BS[:, None, None, :].astype(bool), logits, MASKED)
  return jax.nn.log_softmax(logits, axis=-1)


def relation_loss(teacher_a: jax.Array, teacher_b: jax.Array, student_a: jax.Array,
                  student_b: jax.Array, mask: jax.Array, relation_heads: int) -> jax.Array:
  """KL(teacher relation || student relation), averaged over heads and the batch's real queries.

  Args:
    teacher_a, teacher_b: [B, T, D_T] teacher tensors, heads concatenated (e.g. q and k).
    student_a, student_b: [B, T, D_S] the student's counterparts.
    mask: [B, T], 1 for real tokens, 0 for padding (keys and queries alike).
    relation_heads: R; each model is split into R heads of its own size D / R.
  """
  log_t = jax.lax.stop_gradient(_relation_log_probs(teacher_a, teacher_b, mask, relation_heads))
  log_s = _relation_log_probs(student_a, student_b, mask, relation_heads)
  keep = mask.astype(jnp.float32)
  kl_BRT = jnp.sum(jnp.exp(log_t) * (log_t - log_s) * keep[:, None, None, :], axis=-1)
  per_query = jnp.sum(kl_BRT * keep[:, None, :]) / relation_heads
  return per_query / jnp.maximum(jnp.sum(keep), 1.0)


# The terms each version can compute, paper order; a term list picks any non-empty subset
# (MiniLM's "-VR" ablation is ("attention_transfer",), MiniLMv2's single relations one each).
TERMS = {"v1": ("attention_transfer", "value_relation"),
         "v2": ("qq_relation", "kk_relation", "vv_relation")}


# Each term's (a, b) pair of fields of one layer: the relation Rel(a, b) it compares.
_PAIRS = {"attention_transfer": ("query", "key"), "value_relation": ("value", "value"),
          "qq_relation": ("query", "query"), "kk_relation": ("key", "key"),
          "vv_relation": ("value", "value")}


def check_terms(version: str, terms) -> tuple[str, ...]:
  """`terms` as a tuple if it is a non-empty list of `version`'s terms, else a clear error.

  An unknown name is answered with the closest valid one (difflib's similarity).
  """
  valid = TERMS[version]
  if isinstance(terms, str):
    raise ValueError(f"loss_terms {terms!r} is a string: give a tuple of terms, e.g. ({terms!r},)")
  terms = tuple(terms)
  if not terms:
    raise ValueError(f"loss_terms is empty: name at least one of {version}'s terms {valid}, "
                     "or leave loss_terms unset (None) for the paper's")
  for name in terms:
    if name not in valid:
      other = [v for v, names in TERMS.items() if name in names]
      hint = (f"it is a {other[0]} term: set version={other[0]!r}" if other else
              f"did you mean {difflib.get_close_matches(name, valid, n=1, cutoff=0)[0]!r}?")
      raise ValueError(f"unknown loss term {name!r} for version {version!r} ({hint}); "
                       f"{version}'s terms are {valid}")
  if len(set(terms)) != len(terms):
    raise ValueError(f"loss_terms {terms} names a term twice: list each term once")
  return terms


def minilm_loss(teacher: QueryKeyValue, student: QueryKeyValue, mask: jax.Array,
                relation_heads: int, terms: tuple[str, ...]) -> dict[str, jax.Array]:
  """The MiniLM / MiniLMv2 loss: the sum of the chosen relation `terms`; each term and the total.

  With Rel(a, b) = softmax(a_r b_r^T / sqrt(d_r)) over R = `relation_heads` heads and
  KL averaged over heads and real query tokens (module docstring):

    MiniLM (Eq. 7-9), R = the attention heads:
      attention_transfer = KL(Rel(q_T, k_T) || Rel(q_S, k_S))
      value_relation     = KL(Rel(v_T, v_T) || Rel(v_S, v_S))
    MiniLMv2 (Eq. 2-3), any R dividing both widths:
      qq_relation = KL(Rel(q_T, q_T) || Rel(q_S, q_S)), kk_relation and vv_relation alike

  Args:
    teacher, student: one layer's queries, keys and values each, [B, T, D_T] / [B, T, D_S].
    mask: [B, T], 1 for real tokens, 0 for padding.
    relation_heads: R.
    terms: names of `TERMS[version]` (`check_terms` checks a config's choice).
  """
  values = {}
  for name in terms:
    a, b = _PAIRS[name]
    values[name] = blockwise_relation_loss(getattr(teacher, a), getattr(teacher, b),
                                           getattr(student, a), getattr(student, b), mask,
                                           relation_heads)
  return values | {"total": sum(values.values())}
