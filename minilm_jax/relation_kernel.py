"""The relation KL of `blockwise_relation`, fused in a Pallas TPU kernel: no logits in HBM.

Per relation head and query row, with l_t = a_t b_t^T / sqrt(d_t), l_s likewise, padded
keys at `MASKED` and p = softmax(l), the same one-pass form as `blockwise_relation`:

    KL(p_t || p_s) = sum_j p_t,j (l_t,j - l_s,j) - lse(l_t) + lse(l_s).

XLA writes every block's [B, R, Q, K] float32 logits, exponentials and products to HBM;
here a grid step holds one head's Q queries of one example in VMEM and loops over its
keys in blocks of K with an online log-sum-exp (flash attention's), so the kernel reads
its inputs once and writes three [B, R, 1, T] rows (KL, lse_t, lse_s). The backward kernel
(`jax.custom_vjp`) recomputes each block's logits from the saved log-sum-exps:
d KL / d l_s,j = p_s,j - p_t,j; the frozen teacher gets a zero gradient. A self relation
Rel(x, x) (v1's values, every v2 relation) reads x once, its queries being the grid step's
block of its keys, and sums its query- and key-side gradients in the kernel: one
[B, R, H, T] result where Rel(a, b) writes one for a and one for b.

Layout: heads' features on sublanes, positions on lanes, [B, R, H, T] (a head of 8 or 16
features would fill 8 or 16 of a vector's 128 lanes in [T, H]), so each block's logits
are [K, Q], keys on sublanes: per-query reductions over keys give lane rows [1, Q], stored
as they are. The key mask enters as [B, 8, S] and is transposed in VMEM to a [K, 1] column.

Dimension legend: B batch, R relation heads, H head size, T query positions, S key
positions, Q queries and K keys of a block.
"""

import functools
import math

import jax
import jax.numpy as jnp

MASKED = -1e9  # logit of a padded key: exp underflows to exactly 0, yet stays finite.

LANES = 128        # a vector register's lanes: sequences are tiled by multiples of it
SUBLANES = 8       # its sublanes: the key mask is sent as 8 equal rows, one f32 tile
QUERY_BLOCK = 256  # queries per grid step (at most)
KEY_BLOCK = 512    # keys per step of the loop inside the kernel (at most)
# `resident_bytes` allowed: compiled for a v5e, the largest estimate that fit was 24.5 MiB,
# the smallest that ran out of scoped VMEM 29 MiB; 16 MiB is 29k positions of 64 / 32 bf16 heads.
VMEM_BUDGET = 16 * 2**20
TN = (((0,), (0,)), ((), ()))  # dot_general contracting the first dims: [H, K] x [H, Q] -> [K, Q]
NT = (((1,), (1,)), ((), ()))  # contracting the last dims: [H, Q] x [K, Q] -> [H, K]


def _pallas():
  """Pallas and its TPU module, imported when a kernel is built (not by a CPU-only step)."""
  from jax.experimental import pallas as pl  # noqa: PLC0415
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  return pl, pltpu


def _block(length: int, most: int) -> int:
  """The largest of most, most / 2, ... (down to 128) that divides `length`."""
  block = most
  while length % block:
    block //= 2
  return block


def _length(seq_len: int) -> int:
  """`seq_len` padded to a whole number of 128-lane tiles."""
  return LANES * -(-seq_len // LANES)


def resident_bytes(teacher_a: jax.Array, student_a: jax.Array, mask: jax.Array, relation_heads: int) -> int:
  """VMEM a grid step keeps for one head's whole key sequence: double-buffered teacher and
  student keys (heads of fewer than a tile's rows padded to 8 or 16), the mask's 8 rows and
  the backward pass's float32 student key gradient (a [H_s, S] accumulator)."""
  def rows(x):  # bytes of one position's head: H rows, padded to whole (8 or 16)-row tiles
    size = jnp.dtype(x.dtype).itemsize
    return -(-x.shape[-1] // relation_heads // (32 // size)) * 32
  h_s = student_a.shape[-1] // relation_heads
  return _length(mask.shape[1]) * (2 * (rows(teacher_a) + rows(student_a)) + 2 * SUBLANES * 4 + h_s * 4)


def supported(teacher_a: jax.Array, student_a: jax.Array, mask: jax.Array, relation_heads: int) -> bool:
  """Whether the kernels take these shapes: `relation_heads` divides both widths and one head's keys
  fit in VMEM (`resident_bytes` at most `VMEM_BUDGET`). Any length: it is padded to 128s."""
  return (mask.shape[1] > 0 and all(x.shape[-1] % relation_heads == 0 for x in (teacher_a, student_a))
          and resident_bytes(teacher_a, student_a, mask, relation_heads) <= VMEM_BUDGET)


def _logits(k_HK, q_HQ, keep_K1, scale):
  """[K, Q] float32 logits a b^T / sqrt(d), padded keys at MASKED (as `blockwise_relation`)."""
  logits = jax.lax.dot_general(k_HK, q_HQ, TN, preferred_element_type=jnp.float32) * scale
  return jnp.where(keep_K1, logits, MASKED)


def _keep_column(keep_ref, keys):
  """The key mask of `keys` as a [K, 1] bool column, from its [8, K] float32 rows."""
  return jnp.transpose(keep_ref[0, :, keys])[:, :1] > 0


def _query_block(q: int):
  """This grid step's Q positions."""
  pl, _ = _pallas()
  return pl.ds(pl.multiple_of(pl.program_id(2) * q, q), q)


def _unpack(refs, same: bool):
  """(queries of teacher and student, [H_t, Q] and [H_s, Q], then the refs of tb, sb, keep
  and the rest): a self relation's queries are this step's block of its keys."""
  if same:
    tb_ref, sb_ref, keep_ref, *rest = refs
    block = _query_block(rest[0].shape[-1])  # rest[0] is a [1, 1, 1, Q] row block
    return tb_ref[0, 0, :, block], sb_ref[0, 0, :, block], tb_ref, sb_ref, keep_ref, rest
  ta_ref, tb_ref, sa_ref, sb_ref, keep_ref, *rest = refs
  return ta_ref[0, 0], sa_ref[0, 0], tb_ref, sb_ref, keep_ref, rest


def _forward_kernel(*refs, scales, key_block, same):
  pl, _ = _pallas()
  qt, qs, tb_ref, sb_ref, keep_ref, (kl_ref, lse_t_ref, lse_s_ref) = _unpack(refs, same)
  row = jnp.zeros((1, qt.shape[-1]), jnp.float32)

  def per_key(i, carry):
    m_t, s_t, m_s, s_s, w = carry  # [1, Q] each: maxima, sums of exp(l - m), sum exp(l_t - m_t)(l_t - l_s)
    keys = pl.ds(pl.multiple_of(i * key_block, key_block), key_block)
    keep = _keep_column(keep_ref, keys)
    lt = _logits(tb_ref[0, 0, :, keys], qt, keep, scales[0])
    ls = _logits(sb_ref[0, 0, :, keys], qs, keep, scales[1])
    new_t = jnp.maximum(m_t, lt.max(0, keepdims=True))
    new_s = jnp.maximum(m_s, ls.max(0, keepdims=True))
    e_t, rescale = jnp.exp(lt - new_t), jnp.exp(m_t - new_t)
    s_t = s_t * rescale + e_t.sum(0, keepdims=True)
    w = w * rescale + jnp.sum(e_t * (lt - ls), axis=0, keepdims=True)
    s_s = s_s * jnp.exp(m_s - new_s) + jnp.exp(ls - new_s).sum(0, keepdims=True)
    return new_t, s_t, new_s, s_s, w

  n = tb_ref.shape[-1] // key_block
  m_t, s_t, m_s, s_s, w = jax.lax.fori_loop(0, n, per_key, (row + MASKED, row, row + MASKED, row, row))
  lse_t, lse_s = m_t + jnp.log(s_t), m_s + jnp.log(s_s)
  kl_ref[0, 0] = w / s_t - lse_t + lse_s
  lse_t_ref[0, 0] = lse_t
  lse_s_ref[0, 0] = lse_s


def _backward_kernel(*refs, scales, key_block, same):
  pl, _ = _pallas()
  qt, qs, tb_ref, sb_ref, keep_ref, (lse_t_ref, lse_s_ref, g_ref, *ds_refs, dsb_acc) = _unpack(refs, same)
  lse_t, lse_s, g = lse_t_ref[0, 0], lse_s_ref[0, 0], g_ref[0, 0]  # [1, Q] each

  @pl.when(pl.program_id(2) == 0)
  def _():
    dsb_acc[...] = jnp.zeros(dsb_acc.shape, dsb_acc.dtype)

  def per_key(i, dqs):
    keys = pl.ds(pl.multiple_of(i * key_block, key_block), key_block)
    keep = _keep_column(keep_ref, keys)
    ks = sb_ref[0, 0, :, keys]  # [H_s, K]
    p_t = jnp.exp(_logits(tb_ref[0, 0, :, keys], qt, keep, scales[0]) - lse_t)
    p_s = jnp.exp(_logits(ks, qs, keep, scales[1]) - lse_s)
    dl = jnp.where(keep, g * (p_s - p_t) * scales[1], 0.0).astype(qs.dtype)  # [K, Q]
    dsb_acc[:, keys] += jax.lax.dot_general(qs, dl, NT, preferred_element_type=jnp.float32)
    return dqs + jnp.dot(ks, dl, preferred_element_type=jnp.float32)

  n = tb_ref.shape[-1] // key_block
  dsa = jax.lax.fori_loop(0, n, per_key, jnp.zeros(qs.shape, jnp.float32))
  if same:  # d Rel(x, x) / dx: the query side's gradient joins the key side's
    dsb_acc[:, _query_block(qs.shape[-1])] += dsa
  else:
    ds_refs[0][0, 0] = dsa.astype(ds_refs[0].dtype)

  @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
  def _():
    ds_refs[-1][0, 0] = dsb_acc[...].astype(ds_refs[-1].dtype)


def _inputs(ta, tb, sa, sb, keep, query_block, same):
  """The kernel's inputs, (ta, tb, sa, sb, keep) or a self relation's (tb, sb, keep), and
  their block specs: one head's queries, all its keys, the mask."""
  pl, _ = _pallas()
  (_, _, h_t, s), h_s = ta.shape, sa.shape[2]
  queries = lambda h: pl.BlockSpec((1, 1, h, query_block), lambda b, r, q: (b, r, 0, q))
  keys = lambda h: pl.BlockSpec((1, 1, h, s), lambda b, r, q: (b, r, 0, 0))
  keep_spec = pl.BlockSpec((1, SUBLANES, s), lambda b, r, q: (b, 0, 0))
  if same:
    return (tb, sb, keep), [keys(h_t), keys(h_s), keep_spec]
  return (ta, tb, sa, sb, keep), [queries(h_t), keys(h_t), queries(h_s), keys(h_s), keep_spec]


def _call(kernel, ins, in_specs, out_specs, out_shape, *, query_block, semantics, interpret, per_pair,
          scratch=()):
  """`kernel` over the grid (B, R, T / Q). XLA's cost analysis counts neither bytes nor FLOPs
  of a Mosaic call unless told: each block is read once, so its bytes are its operands' and
  results'; `per_pair` gives its (FLOPs, exps) per query-key pair."""
  pl, pltpu = _pallas()
  b, r, _, t = ins[0].shape
  nbytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in (*ins, *out_shape))
  cost = pl.CostEstimate(flops=b * r * t * t * per_pair[0], transcendentals=b * r * t * t * per_pair[1],
                         bytes_accessed=nbytes)
  return pl.pallas_call(
      kernel, out_shape=out_shape, interpret=interpret, cost_estimate=cost,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=0, grid=(b, r, t // query_block),
                                             in_specs=in_specs, out_specs=out_specs,
                                             scratch_shapes=list(scratch)),
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))(*ins)


def _scales(ta, sa):
  """1 / sqrt(d) of teacher and student heads: [B, R, H, T] inputs."""
  return 1 / math.sqrt(ta.shape[2]), 1 / math.sqrt(sa.shape[2])


def _forward(ta, tb, sa, sb, keep, interpret, same):
  pl, _ = _pallas()
  b, r, _, t = ta.shape
  query_block, key_block = _block(t, QUERY_BLOCK), _block(t, KEY_BLOCK)
  row = jax.ShapeDtypeStruct((b, r, 1, t), jnp.float32)
  row_spec = pl.BlockSpec((1, 1, 1, query_block), lambda b, r, q: (b, r, 0, q))
  kernel = functools.partial(_forward_kernel, scales=_scales(ta, sa), key_block=key_block, same=same)
  flops = 2 * (ta.shape[2] + sa.shape[2]) + 12  # two [K, H] x [H, Q] products, then the online sums
  ins, in_specs = _inputs(ta, tb, sa, sb, keep, query_block, same)
  return _call(kernel, ins, in_specs, [row_spec] * 3, [row] * 3, query_block=query_block,
               semantics=("parallel", "parallel", "parallel"), interpret=interpret, per_pair=(flops, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kl_rows(ta, tb, sa, sb, keep, interpret, same):
  """KL per query row, [B, R, 1, T], of [B, R, H, T] inputs and the [B, 8, S] key mask;
  `same`: a self relation (ta is tb and sa is sb), whose gradient all goes to sa."""
  return _forward(ta, tb, sa, sb, keep, interpret, same)[0]


def _fwd(ta, tb, sa, sb, keep, interpret, same):
  kl, lse_t, lse_s = _forward(ta, tb, sa, sb, keep, interpret, same)
  return kl, (ta, tb, sa, sb, keep, lse_t, lse_s)


def _bwd(interpret, same, res, g):
  pl, pltpu = _pallas()
  ta, tb, sa, sb, keep, lse_t, lse_s = res
  b, r, h_s, t = sa.shape
  query_block, key_block = _block(t, QUERY_BLOCK), _block(t, KEY_BLOCK)
  row_spec = pl.BlockSpec((1, 1, 1, query_block), lambda b, r, q: (b, r, 0, q))
  out_specs = [pl.BlockSpec((1, 1, h_s, query_block), lambda b, r, q: (b, r, 0, q)),
               pl.BlockSpec((1, 1, h_s, t), lambda b, r, q: (b, r, 0, 0))][1 if same else 0:]
  kernel = functools.partial(_backward_kernel, scales=_scales(ta, sa), key_block=key_block, same=same)
  ins, in_specs = _inputs(ta, tb, sa, sb, keep, query_block, same)
  ds = _call(kernel, (*ins, lse_t, lse_s, g), in_specs + [row_spec] * 3, out_specs,
             [jax.ShapeDtypeStruct(sa.shape, sa.dtype)] * len(out_specs), query_block=query_block,
             semantics=("parallel", "parallel", "arbitrary"), interpret=interpret,
             per_pair=(2 * (ta.shape[2] + 3 * h_s) + 10, 2), scratch=[pltpu.VMEM((h_s, t), jnp.float32)])
  dsa, dsb = (ds[0], jnp.zeros_like(sb)) if same else ds
  return jnp.zeros_like(ta), jnp.zeros_like(tb), dsa, dsb, jnp.zeros_like(keep)


_kl_rows.defvjp(_fwd, _bwd)


def _heads(x_BTD: jax.Array, relation_heads: int, length: int) -> jax.Array:
  """[B, T, D] -> [B, R, D / R, length]: relation heads, positions zero-padded to `length`."""
  b, t, d = x_BTD.shape
  x = jnp.pad(x_BTD, ((0, 0), (0, length - t), (0, 0)))
  return x.reshape(b, length, relation_heads, d // relation_heads).transpose(0, 2, 3, 1)


def relation_kl_rows(teacher_a: jax.Array, teacher_b: jax.Array, student_a: jax.Array,
                     student_b: jax.Array, mask: jax.Array, relation_heads: int, *,
                     per_device=lambda rows: rows, interpret: bool = False) -> jax.Array:
  """KL(Rel(a_t, b_t) || Rel(a_s, b_s)) per relation head and query row: [B, R, T] float32.

  The arguments are `losses.relation_loss`'s; gradients flow to the student only. The
  sequence is padded to a multiple of 128 (padded keys masked, padded rows dropped).
  `per_device` turns the kernel's function of one device's rows into the function of the
  global batch (`sharding.per_data_shard` under a mesh: Mosaic calls are not partitioned
  automatically). `interpret` runs the kernels in Pallas's interpreter (tests on a CPU).
  """
  t = mask.shape[1]
  length = _length(t)
  heads = lambda x: _heads(x, relation_heads, length)
  same_t, same_s = teacher_a is teacher_b, student_a is student_b  # Rel(x, x): one copy each

  def rows(ta, tb, sa, sb, mask):
    keep = jnp.pad(mask.astype(bool).astype(jnp.float32), ((0, 0), (0, length - t)))
    keep = jnp.broadcast_to(keep[:, None, :], (keep.shape[0], SUBLANES, length))
    ta, sa = heads(ta), heads(sa)
    tb, sb = ta if same_t else heads(tb), sa if same_s else heads(sb)
    return _kl_rows(ta, tb, sa, sb, keep, interpret, same_t and same_s)[:, :, 0, :t]

  ta, tb = jax.lax.stop_gradient(teacher_a), jax.lax.stop_gradient(teacher_b)
  return per_device(rows)(ta, tb, student_a, student_b, mask)
