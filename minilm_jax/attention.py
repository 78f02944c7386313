"""Scaled dot-product attention and the route it takes: cuDNN, Pallas splash or XLA.

    Attention(q, k, v) = dropout(softmax(q k^T / sqrt(H))) v, per head, over unpadded keys.

`fused_attention` is every encoder layer's attention: one function
(`attention_implementation`) picks, for the platform the step is compiled for
(`sharding.target_platform`), cuDNN flash attention on a GPU in bf16/fp16, in training with the
attention-probability dropout fused into the kernel when `cudnn_dropout` is set (opt-in:
those masks do not follow the JAX key); Pallas splash attention (`splash_attention`) on a
TPU for every layer without attention dropout; XLA elsewhere. The fused routes keep no
[T, S] tensor; on XLA a layer whose probabilities are dropped out computes them
explicitly (`explicit_attention`, [B, N, T, S] float32), and `attention_dropout=0` keeps
every layer fused in training too.

Dimension legend: B batch, T query positions, S key positions, N heads, H head size.
"""

import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from minilm_jax import sharding
from minilm_jax.dropout import drop


LANES = 128  # a TPU vector register's lanes: splash tiles sequences by multiples of it


def _splash_modules():
  """Pallas's splash attention kernel and masks, imported when a TPU route needs them."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
      splash_attention_kernel, splash_attention_mask)
  return splash_attention_kernel, splash_attention_mask


def attention_probs(logits: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """softmax over keys of `logits` [B, N, T, S] with padded keys ([B, S] == 0) removed."""
  keep = attention_mask[:, None, None, :].astype(bool)
  return jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1, where=keep)


@functools.cache
def attention_implementation(dtype: Any, head_dim: int, dropout: bool = False,
                             platform: str | None = None, seq_len: int | None = None) -> str:
  """The route `fused_attention` takes on `platform` (default: this host's backend):
  "cudnn", "splash" or "xla".

  "cudnn" (flash attention, no [T, S] tensor in memory, dropout fused when `dropout`) on a
  GPU for bf16/fp16 inputs whose shape cuDNN takes (head size a multiple of 8, at most 128,
  or 256 from Hopper on, on a recent enough cuDNN; JAX checks these when tracing).
  "splash" (Pallas flash attention, the Mosaic kernel) on a TPU without dropout, which
  the kernel does not draw, for any head size (32 and 64 compile, bf16 and float32) and a
  `seq_len` it tiles (a multiple of 128; None: not checked); other lengths warn once and
  take XLA. "xla" otherwise, with dropout on a TPU too. JAX's own default (None) is XLA
  everywhere, which on a GPU writes the whole [B, N, T, S] probability tensor.
  """
  platform = platform or jax.default_backend()
  if platform == "tpu" and not dropout:
    try:
      _splash_modules()
    except ImportError as e:  # a jax without Pallas's TPU ops
      warnings.warn(f"splash attention is unavailable ({e}); using XLA's attention", stacklevel=2)
      return "xla"
    if seq_len is None or _block_size(seq_len):
      return "splash"
    warnings.warn(f"splash attention tiles sequences by {LANES}, not {seq_len}; using "
                  "XLA's attention", stacklevel=2)
    return "xla"
  if platform != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return "xla"
  x = jax.ShapeDtypeStruct((1, 8, 1, head_dim), jnp.dtype(dtype))
  lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
  try:
    jax.eval_shape(functools.partial(_cudnn_attention, dropout_rate=0.1 if dropout else 0.0, seed=0),
                   x, x, x, lengths)
  except Exception as e:  # noqa: BLE001 - any refusal (cuDNN version, GPU generation, shape)
    warnings.warn(f"cuDNN attention{' with dropout' if dropout else ''} is unavailable for "
                  f"{jnp.dtype(dtype)} heads of {head_dim} ({type(e).__name__}: {e}); using XLA's "
                  "attention", stacklevel=2)
    return "xla"
  return "cudnn"


def _block_size(seq_len: int) -> int | None:
  """Splash's tile along a sequence of `seq_len`: all of it up to 512, else the largest of
  512, 256, 128 that divides it (tiles are whole multiples of 128 lanes); None if none."""
  if seq_len % LANES:
    return None
  return seq_len if seq_len <= 512 else next(b for b in (512, 256, 128) if seq_len % b == 0)


def splash_attention(q_BTNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array,
                     attention_mask_BS: jax.Array, *, interpret: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v per head over the unpadded keys, in the splash kernel: [B, T, N, H].

  Exactly XLA's route (`jax.nn.dot_product_attention` with the key mask), at every
  position and in the gradients: every query, padded or not, attends to the unpadded keys
  of its row, as segment ids (queries 1, keys the mask). A row with no unpadded key (only
  filler) gets XLA's uniform average of all its values, with no gradient to its q and k:
  its queries enter as 0 and its keys all count, since the kernel's own fully masked row
  has a backward pass inconsistent with its forward (its log-sum-exp loses the log S).
  The kernel does not scale, so q is scaled by 1/sqrt(H) first (in q's dtype).

  q, k and v enter the kernel sequence-minor ([N, H, T] in memory, `QKVLayout.SEQ_MINOR`):
  a head of 32 or 64 lanes then fills whole (8, 128) tiles with 128 positions instead of
  padding its head dimension to 128 lanes, and the projections' outputs reach the kernel
  without a transpose to heads-first (BERT-base -> L6-H384 at 64 x 128 on v5e: XLA's bytes
  18.9 -> 16.5 GB per step).

  T and S must be multiples of 128. Under an abstract mesh with a `data` axis the kernel
  runs per device in `jax.shard_map` (Mosaic calls are not partitioned automatically);
  without one it runs on the whole batch. `interpret` runs it in Pallas's interpreter
  (tests on a CPU).
  """
  splash, splash_mask = _splash_modules()
  (_, t, n, h), s = q_BTNH.shape, k_BSNH.shape[1]
  block_q, block_kv = _block_size(t), _block_size(s)
  if not (block_q and block_kv):
    raise ValueError(f"splash attention needs sequence lengths that are multiples of "
                     f"{LANES}, not {t} queries and {s} keys")
  seq_minor = splash.QKVLayout.SEQ_MINOR
  blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_q_dkv=block_q,
                             block_kv_dkv=block_kv, use_fused_bwd_kernel=True,
                             q_layout=seq_minor, k_layout=seq_minor, v_layout=seq_minor)

  def attend(q_BTNH, k_BSNH, v_BSNH, attention_mask_BS):
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((t, s))] * n)
    kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    real_B = attention_mask_BS.any(axis=-1)
    q_BTNH = jnp.where(real_B[:, None, None, None], q_BTNH * (1 / math.sqrt(h)), 0)
    kv_ids_BS = jnp.where(real_B[:, None], attention_mask_BS, 1).astype(jnp.int32)
    ids = splash.SegmentIds(q=jnp.ones(q_BTNH.shape[:2], jnp.int32), kv=kv_ids_BS)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, N, H] <-> [B, N, T, H]
    out_BNTH = jax.vmap(kernel)(heads_first(q_BTNH), heads_first(k_BSNH), heads_first(v_BSNH),
                                segment_ids=ids)
    return heads_first(out_BNTH)

  return sharding.per_data_shard(attend)(q_BTNH, k_BSNH, v_BSNH, attention_mask_BS)


def _cudnn_attention(q_BTNH, k_BSNH, v_BSNH, lengths_B, *, dropout_rate: float, seed: int):
  """cuDNN flash attention over the first `lengths_B` keys, dropout fused in the kernel.

  `jax.nn.dot_product_attention` takes no dropout, so a dropout rate goes to the function
  behind it (`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`), whose `seed`
  is a compile-time integer.
  """
  if not dropout_rate:
    return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, key_value_seq_lengths=lengths_B,
                                        implementation="cudnn")
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415 - GPU only
  b, t = q_BTNH.shape[:2]
  return cudnn.dot_product_attention(
      q_BTNH, k_BSNH, v_BSNH, q_seqlen=jnp.full((b,), t, jnp.int32), kv_seqlen=lengths_B,
      scale=1 / math.sqrt(q_BTNH.shape[-1]), mask_type=cudnn.MaskType.PADDING, seed=seed,
      dropout_rate=dropout_rate)


def fused_attention(q_BTNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array,
                    attention_mask_BS: jax.Array, *, dropout_rate: float = 0.0,
                    dropout_rng: jax.Array | None = None, cudnn_dropout: bool = False,
                    cudnn_seed: int = 0) -> jax.Array:
  """dropout(softmax(q k^T / sqrt(H))) v per head over the unpadded keys: [B, T, N, H].

  On a TPU without dropout it is `splash_attention` (padding as segment ids, XLA's numbers
  at every position). On cuDNN the padding goes in as key lengths (the count of 1s in each
  mask row, at least 1 so that an all-padding filler row stays finite), which equals the
  mask for right-padded rows, the only kind the tokenizers and packers here write; XLA
  takes the mask itself. Dropout on the probabilities (`dropout_rate > 0`, with
  `dropout_rng`) takes cuDNN only when `cudnn_dropout` is set, since only XLA's masks
  resume exactly (splash draws none):

  - XLA: the masks come from `dropout_rng`, so they are the same on every run, after an
    exact resume and on any device count (the step's keys are identical across shardings).
  - cuDNN: the kernel draws its masks from Philox with the compile-time `cudnn_seed` (the
    layer index) and an offset that XLA advances each time the compiled step runs on a
    device, from 0 in each process; `dropout_rng` is not used. A run is reproducible from
    step 0 in a fresh process, but a resumed run replays the masks of the first steps
    rather than continuing the uninterrupted run's (resume is exact except for these
    masks), every data-parallel device draws the same masks for its rows, and a
    recompilation restarts the sequence.
  """
  h = q_BTNH.shape[-1]
  dropout = dropout_rate > 0
  impl = "xla"
  if cudnn_dropout or not dropout:
    impl = attention_implementation(q_BTNH.dtype, h, dropout, sharding.target_platform(), q_BTNH.shape[1])
  if impl == "splash":
    return splash_attention(q_BTNH, k_BSNH, v_BSNH, attention_mask_BS)
  if impl == "cudnn":
    lengths = jnp.maximum(attention_mask_BS.sum(axis=-1, dtype=jnp.int32), 1)
    return _cudnn_attention(q_BTNH, k_BSNH, v_BSNH, lengths, dropout_rate=dropout_rate, seed=cudnn_seed)
  if dropout_rate > 0:
    logits = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH, preferred_element_type=jnp.float32) / math.sqrt(h)
    return explicit_attention(logits, v_BSNH, attention_mask_BS, dropout_rate, dropout_rng)
  mask = attention_mask_BS[:, None, None, :].astype(bool)
  return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask, implementation="xla")


def explicit_attention(logits_BNTS: jax.Array, v_BSNH: jax.Array, attention_mask_BS: jax.Array,
                       dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
  """dropout(softmax(logits)) v with the probabilities in memory: XLA's route with dropout."""
  probs = drop(attention_probs(logits_BNTS, attention_mask_BS), dropout_rate, dropout_rng)
  return jnp.einsum("BNTS,BSNH->BTNH", probs.astype(v_BSNH.dtype), v_BSNH)
