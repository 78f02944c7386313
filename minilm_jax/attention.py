"""Scaled dot-product attention and the route it takes: cuDNN flash attention or XLA.

    Attention(q, k, v) = dropout(softmax(q k^T / sqrt(H))) v, per head, over unpadded keys.

`fused_attention` is every encoder layer's attention: one function
(`attention_implementation`) picks cuDNN flash attention on a GPU in bf16/fp16, in
training with the attention-probability dropout fused into the kernel when
`cudnn_dropout` is set (opt-in: those masks do not follow the JAX key), so no [T, S]
tensor is kept; XLA elsewhere, where a layer whose probabilities are dropped out
computes them explicitly (`explicit_attention`, [B, N, T, S] float32) and
`attention_dropout=0` keeps every layer fused in training too.

Dimension legend: B batch, T query positions, S key positions, N heads, H head size.
"""

import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp


def attention_probs(logits: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """softmax over keys of `logits` [B, N, T, S] with padded keys ([B, S] == 0) removed."""
  keep = attention_mask[:, None, None, :].astype(bool)
  return jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1, where=keep)


@functools.cache
def attention_implementation(dtype: Any, head_dim: int, dropout: bool = False) -> str:
  """The route `fused_attention` takes: "cudnn" or "xla".

  "cudnn" (flash attention, no [T, S] tensor in memory, dropout fused when `dropout`) on a
  GPU for bf16/fp16 inputs whose shape cuDNN takes (head size a multiple of 8, at most 128,
  or 256 from Hopper on, on a recent enough cuDNN; JAX checks these when tracing); "xla"
  otherwise. JAX's own default (None) is XLA everywhere, which on a GPU writes the whole
  [B, N, T, S] probability tensor.
  """
  if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
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

  On cuDNN the padding goes in as key lengths (the count of 1s in each mask row, at least
  1 so that an all-padding filler row stays finite), which equals the mask for
  right-padded rows, the only kind the tokenizers and packers here write; XLA takes the
  mask itself. Dropout on the probabilities (`dropout_rate > 0`, with `dropout_rng`) takes
  cuDNN only when `cudnn_dropout` is set, since only XLA's masks resume exactly:

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
  impl = attention_implementation(q_BTNH.dtype, h, dropout) if cudnn_dropout or not dropout else "xla"
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
  probs = attention_probs(logits_BNTS, attention_mask_BS)
  if dropout_rate > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("BNTS,BSNH->BTNH", probs.astype(v_BSNH.dtype), v_BSNH)
