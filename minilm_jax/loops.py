"""Loops whose cost XLA can count.

XLA's cost analysis (`compiled.cost_analysis()`) counts a while loop's body once, however
many times the loop runs: compiled for a TPU, the MiniLMv2 loss and its gradient at 16 x 512
per chip count 3.5 GB with the blockwise relation KL's 8 query blocks as a loop, and 34 GB
unrolled. `scan` is `jax.lax.scan`, fully unrolled inside `counting()`, so that
`minilm_jax.aot` can compile a step twice: as it runs (its memory) and unrolled (its FLOPs
and bytes). Training never unrolls.
"""

import contextlib

import jax

_unrolled = False


@contextlib.contextmanager
def counting():
  """Within: every `scan` traced is unrolled (for counting a program, not for running it)."""
  global _unrolled
  previous, _unrolled = _unrolled, True
  try:
    yield
  finally:
    _unrolled = previous


def scan(f, init, xs):
  """`jax.lax.scan(f, init, xs)`, unrolled inside `counting()`."""
  return jax.lax.scan(f, init, xs, unroll=True if _unrolled else 1)
