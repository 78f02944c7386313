"""The blockwise relation KL against `losses.relation_loss` (itself checked against numpy in
losses_test.py): values and gradients, and the temporary memory XLA plans for them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minilm_jax import blockwise_relation, losses
from minilm_jax.model import AttentionInternals

B, T = 3, 11
LENGTHS = [[11, 6, 1], [11, 0, 4]]  # padded rows, a single-token row, a fully padded row


def tensors(seed, width):
  rng = np.random.default_rng(seed)
  return [2 * rng.normal(size=(B, T, width)).astype(np.float32) for _ in range(2)]


# Several query and key blocks (online log-sum-exp), ragged last blocks, the default (one block).
@pytest.mark.parametrize("blocks", [(4, 4), (4, 8), (5, 10), (64, 512)])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("same", [False, True])  # Rel(q, k) (v1) or Rel(x, x) (v1 values, v2)
def test_value_and_gradients_equal_relation_loss(monkeypatch, blocks, lengths, same):
  """float32 on CPU: the loss to 1e-6 relative, gradients (entries up to ~0.05) to 1e-6
  absolute; the frozen teacher's gradient is zero in both."""
  monkeypatch.setattr(blockwise_relation, "QUERY_BLOCK", blocks[0])
  monkeypatch.setattr(blockwise_relation, "KEY_BLOCK", blocks[1])
  mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.int32)
  ta, tb = tensors(sum(blocks) + sum(lengths), 48)
  sa, sb = tensors(blocks[0], 24)
  if same:
    tb, sb = ta, sa
  args = lambda f: (lambda ta, tb, sa, sb: f(ta, tb, sa, sb, mask, 6))
  want, want_grads = jax.value_and_grad(args(losses.relation_loss), argnums=(0, 1, 2, 3))(ta, tb, sa, sb)
  got, got_grads = jax.value_and_grad(args(blockwise_relation.blockwise_relation_loss),
                                      argnums=(0, 1, 2, 3))(ta, tb, sa, sb)
  assert float(want) > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  assert not np.any(got_grads[0]) and not np.any(got_grads[1])
  assert np.abs(got_grads[2]).max() > 1e-3


def test_no_tokens_and_bad_heads():
  ta, tb = tensors(0, 48)
  no_tokens = np.zeros((B, T), np.int32)
  loss, grads = jax.value_and_grad(blockwise_relation.blockwise_relation_loss, argnums=2)(
      ta, tb, ta[..., :24], tb[..., :24], no_tokens, 6)
  assert float(loss) == 0.0 and np.all(np.isfinite(grads)) and not np.any(grads)
  with pytest.raises(ValueError, match="16 relation heads do not divide the hidden size 24"):
    blockwise_relation.blockwise_relation_loss(ta, tb, ta[..., :24], tb[..., :24], no_tokens, 16)


def test_temporary_memory_drops_4x_at_bert_base_v2_shapes():
  """XLA's plan (compiled, never run) for the MiniLMv2 loss + gradient on the captured q/k/v
  of a BERT-base teacher (768) and an L6-H384 student at 64 x 512 with 48 relation heads
  (float32): the direct form keeps [64, 48, 512, 512] float32 tensors (3.2 GB each), the
  blockwise one [64, 48, 64, 512] blocks. Measured on CPU: 42.1 GiB -> 2.2 GiB."""
  batch, seq, heads = 64, 512, 48
  internals = lambda d: AttentionInternals(*(jax.ShapeDtypeStruct((batch, seq, d), jnp.float32) for _ in range(3)))
  mask = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

  def temp_bytes(relation):
    def loss(student, teacher, mask):
      return sum(relation(getattr(teacher, n), getattr(teacher, n), getattr(student, n), getattr(student, n),
                          mask, heads) for n in ("query", "key", "value"))
    compiled = jax.jit(jax.value_and_grad(loss)).lower(internals(384), internals(768), mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  direct, blockwise = temp_bytes(losses.relation_loss), temp_bytes(blockwise_relation.blockwise_relation_loss)
  assert direct >= 4 * blockwise, (direct, blockwise)
