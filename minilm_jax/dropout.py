"""Inverted dropout of attention probabilities from 8 random bits per element.

    drop(p) = p * [bits < k] * 256 / k,    k = round((1 - rate) * 256),  bits ~ U{0..255}

An element is kept when its 8 random bits fall below k and kept elements are scaled by
256 / k, so the expectation is p exactly while the keep probability is rounded to a
multiple of 1/256 (rate 0.1 keeps 230/256: a rate of 0.1016). The bits are most of what
the dropout of a [B, N, T, S] probability tensor moves through memory: 8 per element
where `jax.random.bernoulli` draws 32. Hidden dropout ([B, T, D], `model.dropout`) keeps
`jax.random.bernoulli` and its exact rate: there, 8-bit masks made the compiled TPU step
move more bytes, not fewer (both measured in `experiments/results/tpu-compile.md`).
Every key implementation works: threefry on a CPU, rbg on a GPU or TPU.
"""

import jax
import jax.numpy as jnp

LEVELS = 256  # values of 8 random bits


def keep_level(rate: float) -> int:
  """k: an element is kept when its bits are below it (at least 1: some are kept)."""
  return max(1, round((1.0 - rate) * LEVELS))


def drop(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """`x` with each element dropped at `rate` (rounded to 1/256) and the rest rescaled;
  `x` itself at rate 0, or without a key (eval mode)."""
  k = keep_level(rate)
  if rng is None or k >= LEVELS:
    return x
  keep = jax.random.bits(rng, x.shape, jnp.uint8) < k
  return jnp.where(keep, x * (LEVELS / k), 0).astype(x.dtype)
