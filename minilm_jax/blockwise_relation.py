"""The relation KL of `losses.relation_loss`, block by block: no [B, R, T, S] tensor is kept.

For one query row of one relation head, with teacher logits l_t = a_t b_t^T / sqrt(d_t),
student logits l_s (padded keys at the same large negative `MASKED`) and p = softmax(l),

    KL(p_t || p_s) = sum_j p_t,j (l_t,j - l_s,j) - lse(l_t) + lse(l_s),

so one pass over the keys suffices: per block of queries, a scan over blocks of keys keeps
both models' running maxima m and sums of exp(l - m), and the running
sum_j exp(l_t,j - m_t) (l_t,j - l_s,j), rescaled whenever m_t grows (the online
log-sum-exp of flash attention). The backward pass (`jax.custom_vjp`) recomputes each
block's logits from the saved log-sum-exps instead of storing them:
d KL / d l_s,j = p_s,j - p_t,j; the teacher, frozen, gets a zero gradient. Memory is
O(B R Q K) for blocks of Q queries and K keys, where the direct form keeps several
[B, R, T, S] float32 tensors and their saved copies (3.2 GB each at BERT-base v2 shapes,
64 x 512 with R = 48). Blocks of 64 queries and up to 512 keys: XLA's plan for the v2
loss + gradient at those shapes drops from 42 to 2.2 GiB (at 256 x 128, from 10.6 to
2.2 GiB), in 8 sequential blocks; `experiments/scripts/relation_memory.py` measures it.
"""

import math

import jax
import jax.numpy as jnp

from minilm_jax import loops, relation_kernel, sharding
from minilm_jax.relation_kernel import MASKED

QUERY_BLOCK = 64   # queries per block (at most)
KEY_BLOCK = 512    # keys per block (at most; a multiple of QUERY_BLOCK)


def _blocks(x_BTD: jax.Array, relation_heads: int, block: int, length: int) -> jax.Array:
  """[B, T, D] -> [n, B, R, block, D/R]: relation heads, T zero-padded to `length` and cut
  in n = length / block blocks."""
  b, t, d = x_BTD.shape
  x = jnp.pad(x_BTD, ((0, 0), (0, length - t), (0, 0)))
  x = x.reshape(b, length // block, block, relation_heads, d // relation_heads)
  return x.transpose(1, 0, 3, 2, 4)


def _logits(a_BRQH: jax.Array, b_BRKH: jax.Array, keep_BK: jax.Array) -> jax.Array:
  scale = 1 / math.sqrt(a_BRQH.shape[-1])
  logits = jnp.einsum("BRQH,BRKH->BRQK", a_BRQH, b_BRKH, preferred_element_type=jnp.float32) * scale
  return jnp.where(keep_BK[:, None, None, :], logits, MASKED)


def _scan(f, init, xs):
  """`lax.scan(f, init, xs)` (`loops.scan`), or one call of `f` where xs holds a single block."""
  if jax.tree.leaves(xs)[0].shape[0] > 1:
    return loops.scan(f, init, xs)
  carry, y = f(init, jax.tree.map(lambda x: x[0], xs))
  return carry, jax.tree.map(lambda x: x[None], y)


def _forward_rows(ta, tb, sa, sb, keep):
  """Per query row: (KL, lse_t, lse_s), each [n, B, R, Q]."""
  def per_query(_, q):
    qt, qs = q
    rows = qt.shape[:3]
    init = (jnp.full(rows, MASKED), jnp.zeros(rows), jnp.full(rows, MASKED), jnp.zeros(rows), jnp.zeros(rows))

    def per_key(carry, k):
      m_t, s_t, m_s, s_s, w = carry
      kt, ks, kk = k
      lt, ls = _logits(qt, kt, kk), _logits(qs, ks, kk)
      new_t, new_s = jnp.maximum(m_t, lt.max(-1)), jnp.maximum(m_s, ls.max(-1))
      e_t, rescale = jnp.exp(lt - new_t[..., None]), jnp.exp(m_t - new_t)
      s_t = s_t * rescale + e_t.sum(-1)
      w = w * rescale + jnp.sum(e_t * (lt - ls), axis=-1)
      s_s = s_s * jnp.exp(m_s - new_s) + jnp.exp(ls - new_s[..., None]).sum(-1)
      return (new_t, s_t, new_s, s_s, w), None

    (m_t, s_t, m_s, s_s, w), _ = _scan(per_key, init, (tb, sb, keep))
    lse_t, lse_s = m_t + jnp.log(s_t), m_s + jnp.log(s_s)
    return None, (w / s_t - lse_t + lse_s, lse_t, lse_s)
  return _scan(per_query, None, (ta, sa))[1]


@jax.custom_vjp
def _relation_kl_rows(ta, tb, sa, sb, keep):
  """KL(Rel(a_t, b_t) || Rel(a_s, b_s)) per query row, [n, B, R, Q], of blocked inputs."""
  return _forward_rows(ta, tb, sa, sb, keep)[0]


def _fwd(ta, tb, sa, sb, keep):
  kl, lse_t, lse_s = _forward_rows(ta, tb, sa, sb, keep)
  return kl, (ta, tb, sa, sb, keep, lse_t, lse_s)


def _bwd(res, g):
  ta, tb, sa, sb, keep, lse_t, lse_s = res
  scale = 1 / math.sqrt(sa.shape[-1])

  def per_query(dsb, q):
    qt, qs, lse_t_q, lse_s_q, g_q = q

    def per_key(dqs, k):
      kt, ks, kk = k
      p_t = jnp.exp(_logits(qt, kt, kk) - lse_t_q[..., None])
      p_s = jnp.exp(_logits(qs, ks, kk) - lse_s_q[..., None])
      dl = jnp.where(kk[:, None, None, :], g_q[..., None] * (p_s - p_t) * scale, 0.0).astype(sa.dtype)
      dqs = dqs + jnp.einsum("BRQK,BRKH->BRQH", dl, ks, preferred_element_type=jnp.float32)
      return dqs, jnp.einsum("BRQK,BRQH->BRKH", dl, qs, preferred_element_type=jnp.float32)

    dqs, dks = _scan(per_key, jnp.zeros(qs.shape, jnp.float32), (tb, sb, keep))
    return dsb + dks, dqs

  dsb, dsa = _scan(per_query, jnp.zeros(sb.shape, jnp.float32), (ta, sa, lse_t, lse_s, g))
  return (jnp.zeros_like(ta), jnp.zeros_like(tb), dsa.astype(sa.dtype), dsb.astype(sb.dtype), None)


_relation_kl_rows.defvjp(_fwd, _bwd)


def blockwise_relation_loss(teacher_a: jax.Array, teacher_b: jax.Array, student_a: jax.Array,
                            student_b: jax.Array, mask: jax.Array, relation_heads: int) -> jax.Array:
  """`losses.relation_loss` in blocks: the same arguments (documented there), value and
  student gradients, without a [B, R, T, S] tensor in either pass."""
  for x in (teacher_a, student_a):
    if x.shape[-1] % relation_heads:
      raise ValueError(f"{relation_heads} relation heads do not divide the hidden size "
                       f"{x.shape[-1]}: choose relation_heads that divides both teacher and "
                       "student widths")
  if sharding.target_platform() == "tpu" and relation_kernel.supported(teacher_a, student_a, mask,
                                                                     relation_heads):
    kl_BRT = relation_kernel.relation_kl_rows(teacher_a, teacher_b, student_a, student_b, mask, relation_heads,
                                              per_device=sharding.per_data_shard)
  else:
    kl_BRT = _xla_kl_rows(teacher_a, teacher_b, student_a, student_b, mask, relation_heads)
  queries = mask.astype(jnp.float32)
  per_query = jnp.sum(kl_BRT * queries[:, None, :]) / relation_heads
  return per_query / jnp.maximum(jnp.sum(queries), 1.0)


def _xla_kl_rows(teacher_a, teacher_b, student_a, student_b, mask, relation_heads):
  """The per-row KL [B, R, T] in XLA: blocks of queries and keys, `_relation_kl_rows`."""
  b, t = mask.shape
  q_block = min(t, QUERY_BLOCK)
  k_block = min(KEY_BLOCK, q_block * -(-t // q_block))  # a multiple of q_block
  length = k_block * -(-t // k_block)
  queries = lambda x: _blocks(x, relation_heads, q_block, length)
  keys = lambda x: _blocks(x, relation_heads, k_block, length)
  keep = jnp.pad(mask.astype(bool), ((0, 0), (0, length - t))).reshape(b, length // k_block, k_block).swapaxes(0, 1)
  ta, tb = jax.lax.stop_gradient(teacher_a), jax.lax.stop_gradient(teacher_b)
  kl = _relation_kl_rows(queries(ta), keys(tb), queries(student_a), keys(student_b), keep)  # [n, B, R, Q]
  return kl.transpose(1, 2, 0, 3).reshape(b, relation_heads, length)[:, :, :t]
