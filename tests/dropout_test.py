"""Inverted dropout from 8 random bits: the kept share, the scale and the identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minilm_jax.dropout import drop, keep_level


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_the_kept_share_is_the_rate_rounded_to_a_256th_and_the_mean_is_kept(rate, impl):
  x = jnp.full((256, 1024), 3.0, jnp.float32)
  y = np.asarray(drop(x, rate, jax.random.key(7, impl=impl)))
  k = round((1 - rate) * 256)
  kept = y != 0
  np.testing.assert_array_equal(y[kept], np.float32(3.0 * 256 / k))  # every kept value, exactly
  # 262,144 draws: the kept share's standard error is under 0.001.
  assert abs(kept.mean() - k / 256) < 0.004
  assert abs(y.mean() - 3.0) < 3.0 * 0.006


def test_eval_mode_rate_zero_and_rates_under_half_a_level_are_the_identity():
  x = jnp.arange(12.0).reshape(3, 4)
  key = jax.random.key(0)
  for y in (drop(x, 0.1, None), drop(x, 0.0, key), drop(x, 0.001, key)):
    assert y is x
  assert keep_level(0.999) == 1  # a rate near 1 still keeps 1 in 256, never divides by 0
  np.testing.assert_array_equal(np.isfinite(np.asarray(drop(x, 0.999, key))), True)


def test_bf16_stays_bf16_and_the_masks_follow_the_key():
  x = jnp.ones((64, 64), jnp.bfloat16)
  a, b = drop(x, 0.1, jax.random.key(1)), drop(x, 0.1, jax.random.key(2))
  assert a.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(a), np.asarray(drop(x, 0.1, jax.random.key(1))))
  assert (np.asarray(a) != np.asarray(b)).any()
