"""One Flax NNX Transformer encoder for the BERT family: teacher and student alike.

BERT (the MiniLM checkpoints included) and RoBERTa / XLM-R share one implementation;
they differ only in how position ids are made (RoBERTa counts from `pad_token_id + 1`
and skips padding) and in the size of the token-type table.

MiniLM distils the self-attention of one layer, so the encoder exposes, for the layers
named in `capture`, their queries, keys and values ([B, T, D], heads concatenated, taken
before any dropout), their output hidden states and on request the attention logits
(computed beside the layer's attention, which XLA merges with its own). Every layer's attention goes through
`attention.fused_attention` (cuDNN flash attention on a GPU in bf16/fp16, Pallas splash
attention on a TPU without attention dropout, XLA elsewhere;
`attention.py` says which route a layer takes and how its dropout works).

Dimension legend (einsums and shape names):
  B batch, T query positions, S key positions, N attention heads, H head size,
  D hidden width, F intermediate width, L layers, R relation heads.
"""

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from minilm_jax import hf_names
from minilm_jax.attention import fused_attention

ROBERTA_FAMILY = ("roberta", "xlm-roberta")
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and options of a BERT-family encoder; mirrors Hugging Face `BertConfig`."""
  model_type: str = "bert"             # "bert", "roberta" or "xlm-roberta"
  vocab_size: int = 30522              # rows of the word-embedding table
  hidden_size: int = 384               # D
  num_layers: int = 6                  # L
  num_heads: int = 12                  # N; D must be a multiple
  intermediate_size: int = 1536        # F, the feed-forward width
  max_position_embeddings: int = 512   # rows of the position table
  type_vocab_size: int = 2             # token-type (segment) table rows; 1 for RoBERTa
  pad_token_id: int = 0                # RoBERTa position ids skip it
  layer_norm_eps: float = 1e-12        # LayerNorm epsilon
  hidden_act: str = "gelu"             # feed-forward activation (erf GELU for BERT)
  hidden_dropout: float = 0.1          # dropout after embeddings and sublayers (training only)
  attention_dropout: float = 0.1       # dropout on attention probabilities (training only)
  use_pooler: bool = True              # BERT's tanh pooler over [CLS]
  dtype: str = "float32"               # compute dtype; parameters are always float32
  cudnn_dropout: bool = False          # GPU: attention dropout fused in cuDNN (fast; see fused_attention)
  remat_feed_forward: bool = False     # the backward pass recomputes the feed-forward (see Layer)

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} is {value!r}: it must be a positive integer")
    if self.model_type not in hf_names.ARCHITECTURES:
      raise ValueError(f"unknown model_type {self.model_type!r}: minilm_jax supports "
                       f"{', '.join(hf_names.ARCHITECTURES)} (BERT-family encoders)")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                       f"{self.num_heads}: choose heads that divide the width")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; use one of {list(ACTIVATIONS)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def position_offset(self) -> int:
    """First position id used: RoBERTa-family models start after the padding index."""
    return self.pad_token_id + 1 if self.model_type in ROBERTA_FAMILY else 0

  @property
  def max_seq_len(self) -> int:
    """Longest sequence the position table can encode."""
    return self.max_position_embeddings - self.position_offset

  def check_max_seq_len(self, max_seq_len: int, whose: str = "the model") -> None:
    """Raises unless sequences of `max_seq_len` tokens fit the position table."""
    if max_seq_len > self.max_seq_len:
      raise ValueError(
          f"max_seq_len {max_seq_len} exceeds {whose}'s position table ({self.max_position_embeddings} "
          f"positions, usable {self.max_seq_len}): a token beyond the position table has no position "
          f"embedding; pass max_seq_len {self.max_seq_len} or less")

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
    """Builds the config from a Hugging Face `config.json` dictionary."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"position_embedding_type {hf['position_embedding_type']!r} is not "
                       "supported: only absolute position embeddings (BERT, RoBERTa, XLM-R)")
    return cls(
        model_type=hf.get("model_type", "bert"),
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        pad_token_id=hf.get("pad_token_id") or 0,
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_act=hf.get("hidden_act", "gelu"),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        use_pooler=hf.get("add_pooling_layer", True),
    )

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face `config.json` dictionary that `transformers` loads."""
    hf = {
        "architectures": [hf_names.ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "intermediate_size": self.intermediate_size,
        "max_position_embeddings": self.max_position_embeddings,
        "type_vocab_size": self.type_vocab_size,
        "pad_token_id": self.pad_token_id,
        "layer_norm_eps": self.layer_norm_eps,
        "hidden_act": self.hidden_act,
        "hidden_dropout_prob": self.hidden_dropout,
        "attention_probs_dropout_prob": self.attention_dropout,
        "initializer_range": 0.02,
        "position_embedding_type": "absolute",
    }
    if self.model_type in ROBERTA_FAMILY:
      hf.update(bos_token_id=0, eos_token_id=2)
    return hf


@flax.struct.dataclass
class AttentionInternals:
  """What one captured layer exposes for distillation. Queries, keys and values are taken
  before any dropout of their layer; `hidden` is the layer's output, which the next layer
  reads (in training after the layer's own dropout, as in BERT)."""
  query: jax.Array                     # [B, T, D], heads concatenated
  key: jax.Array                       # [B, S, D]
  value: jax.Array                     # [B, S, D]
  logits: jax.Array | None = None      # [B, N, T, S] float32, q k^T / sqrt(H), unmasked
  hidden: jax.Array | None = None      # [B, T, D] the layer's output hidden states


@flax.struct.dataclass
class EncoderOutput:
  last_hidden_state: jax.Array                 # [B, T, D] output of the last layer run
  pooled_output: jax.Array | None              # [B, D] tanh(W h_[CLS]); None without pooler
  internals: dict[int, AttentionInternals]     # captured layer index -> its internals


def _init(stddev: float = 0.02):
  return nnx.initializers.truncated_normal(stddev)


def _dense(d_in: int, d_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, dtype=dtype, kernel_init=_init(), rngs=rngs)


def _merge_heads(linear: nnx.Linear, x_BTNH: jax.Array) -> jax.Array:
  """`linear` over the heads' concatenation, contracting heads and head size in one matmul
  (`linear.kernel` seen as [N, H, E]): XLA folds a transpose of `x_BTNH` into the matmul, so
  the splash kernel's heads-first output is not copied back to [B, T, D] first, as a reshape
  would make it (BERT-base -> L6-H384 at 64 x 128 on v5e: XLA's bytes 14.8 -> 14.1 GB)."""
  n, h = x_BTNH.shape[-2:]
  kernel = linear.kernel[...].astype(x_BTNH.dtype).reshape(n, h, -1)
  return jnp.einsum("BTNH,NHE->BTE", x_BTNH, kernel) + linear.bias[...].astype(x_BTNH.dtype)


def _layer_norm(config: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm with its statistics in float32, in one pass: var = E[x^2] - E[x]^2 (Flax's
  `use_fast_variance`), which XLA computes beside the producer of x, where the two-pass form
  (the mean, then E[(x - mean)^2]) reads x once more (BERT-base -> L6-H384 at 64 x 128 on v5e:
  0.4 GB of 13.5 GB of XLA's bytes). In float32 the cancellation costs ~1e-7 of E[x^2]; the
  encoders match PyTorch's two-pass LayerNorm to the tests' 1e-5."""
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=jnp.dtype(config.dtype),
                       use_fast_variance=True, rngs=rngs)


class Embeddings(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout.

  The three tables and their sum stay in float32 (the parameters' dtype); the LayerNorm
  casts to the compute dtype. Only the word embeddings are a lookup, whose gradient is a
  float32 scatter-add of one row per token. Where many tokens share a row ([PAD], [CLS],
  position 0, token type 0) a scatter serialises on a GPU (a bf16 one took 286 ms of a
  315 ms BERT-base distillation step on an H200, and rounded the sum to 8 bits), so the
  other two tables need none: BERT's positions 0..T-1 are a slice of the table broadcast
  over the batch and the K token types a `where` over the K rows, whose gradients are
  reductions. RoBERTa's positions skip padding wherever it sits, so they stay a lookup.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, f32 = config.hidden_size, jnp.float32
    self.word_embeddings = nnx.Embed(config.vocab_size, d, dtype=f32, embedding_init=_init(), rngs=rngs)
    self.position_embeddings = nnx.Embed(config.max_position_embeddings, d, dtype=f32,
                                         embedding_init=_init(), rngs=rngs)
    self.token_type_embeddings = nnx.Embed(config.type_vocab_size, d, dtype=f32,
                                           embedding_init=_init(), rngs=rngs)
    self.layer_norm = _layer_norm(config, rngs)
    self.dropout = nnx.Dropout(config.hidden_dropout)

  def position_ids(self, input_ids: jax.Array) -> jax.Array:
    if self.config.model_type in ROBERTA_FAMILY:
      # RoBERTa: real tokens count up from pad_token_id + 1; padding keeps pad_token_id.
      real = (input_ids != self.config.pad_token_id).astype(jnp.int32)
      return jnp.cumsum(real, axis=1) * real + self.config.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)

  def positions(self, input_ids: jax.Array) -> jax.Array:
    """Position embeddings, [B, T, D] or [1, T, D] (BERT: the same for every row)."""
    if self.config.model_type in ROBERTA_FAMILY:
      return _lookup(self.position_embeddings, self.position_ids(input_ids))
    return self.position_embeddings.embedding[:input_ids.shape[1]][None]

  def token_types(self, token_type_ids: jax.Array) -> jax.Array:
    """Token-type embeddings: row 0, replaced by row k where the id is k."""
    table = self.token_type_embeddings.embedding[...]
    x = jnp.broadcast_to(table[0], (*token_type_ids.shape, table.shape[1]))
    for k in range(1, table.shape[0]):
      x = jnp.where((token_type_ids == k)[..., None], table[k], x)
    return x

  def __call__(self, input_ids, token_type_ids, dropout_rng) -> jax.Array:
    x = _lookup(self.word_embeddings, input_ids) + self.positions(input_ids) + self.token_types(token_type_ids)
    return dropout(self.dropout, self.layer_norm(x), dropout_rng)


def _lookup(table: nnx.Embed, ids: jax.Array) -> jax.Array:
  """The rows of `table` at `ids`, in float32. The rows are gathered before they are cast:
  `nnx.Embed` casts the whole table first, every step, which for a bf16 teacher is a float32
  copy of its 30522 x 768 word table per step, where the batch reads a few thousand rows."""
  return jnp.take(table.embedding[...], ids, axis=0).astype(jnp.float32)


def dropout(layer: nnx.Dropout, x: jax.Array, rng: jax.Array | None) -> jax.Array:
  """`layer` in training mode with key `rng`; the identity in eval mode (`rng` None) or at rate 0."""
  return x if rng is None or layer.rate == 0 else layer(x, deterministic=False, rngs=rng)


class Layer(nnx.Module):
  """One post-LayerNorm Transformer layer (BERT): self-attention, then feed-forward.

  With `remat_feed_forward` the feed-forward keeps only its input for the backward pass,
  which recomputes the up-projection and GELU: the [B, T, F] activations (F = 4 D) and
  GELU's own residuals are never written to memory, for one more [D, F] matmul.
  """

  def __init__(self, config: ModelConfig, index: int = 0, *, rngs: nnx.Rngs):
    self.config = config
    self.index = index  # 0-based; seeds cuDNN's fused attention dropout
    d, f, dtype = config.hidden_size, config.intermediate_size, jnp.dtype(config.dtype)
    self.query = _dense(d, d, dtype, rngs)
    self.key = _dense(d, d, dtype, rngs)
    self.value = _dense(d, d, dtype, rngs)
    self.attention_out = _dense(d, d, dtype, rngs)
    self.attention_norm = _layer_norm(config, rngs)
    self.intermediate = _dense(d, f, dtype, rngs)
    self.output = _dense(f, d, dtype, rngs)
    self.output_norm = _layer_norm(config, rngs)
    self.hidden_dropout = nnx.Dropout(config.hidden_dropout)

  def __call__(self, x_BTD, attention_mask_BS, dropout_rng, *, capture: bool, return_logits: bool):
    c = self.config
    b, t, _ = x_BTD.shape
    q_BTD, k_BTD, v_BTD = self.query(x_BTD), self.key(x_BTD), self.value(x_BTD)
    split = lambda y: y.reshape(b, t, c.num_heads, c.head_dim)
    q, k, v = split(q_BTD), split(k_BTD), split(v_BTD)
    rngs = [None] * 3 if dropout_rng is None else list(jax.random.split(dropout_rng, 3))
    drop_rate = c.attention_dropout if rngs[0] is not None else 0.0
    logits = None
    if return_logits:
      logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32)
      logits = logits / math.sqrt(c.head_dim)
    ctx = fused_attention(q, k, v, attention_mask_BS, dropout_rate=drop_rate, dropout_rng=rngs[0],
                          cudnn_dropout=c.cudnn_dropout, cudnn_seed=self.index)  # XLA merges its logits with those above (CSE)
    h = _merge_heads(self.attention_out, ctx)
    h = self.attention_norm(dropout(self.hidden_dropout, h, rngs[1]) + x_BTD)
    feed_forward = lambda h: self.output(ACTIVATIONS[c.hidden_act](self.intermediate(h)))
    if c.remat_feed_forward:
      feed_forward = jax.checkpoint(feed_forward)
    y = self.output_norm(dropout(self.hidden_dropout, feed_forward(h), rngs[2]) + h)
    return y, (AttentionInternals(q_BTD, k_BTD, v_BTD, logits, y) if capture else None)


class Encoder(nnx.Module):
  """BERT-family encoder: embeddings, `num_layers` layers, optional pooler."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = Embeddings(config, rngs=rngs)
    self.layers = nnx.List([Layer(config, i, rngs=rngs) for i in range(config.num_layers)])
    self.pooler = _dense(config.hidden_size, config.hidden_size, jnp.dtype(config.dtype), rngs) if config.use_pooler else None

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
               dropout_rng: jax.Array | None = None, capture: tuple[int, ...] = (),
               return_logits: bool = False) -> EncoderOutput:
    """Runs the encoder.

    Args:
      input_ids: [B, T] int token ids.
      attention_mask: [B, T], 1 for real tokens, 0 for padding (default: all real).
      token_type_ids: [B, T] segment ids (default: all 0).
      dropout_rng: a PRNG key turns on training-mode dropout; None is eval mode.
      capture: indices (0-based) of the layers whose q, k, v, output (and logits) to return.
      return_logits: also return the captured layers' attention logits.
    """
    c = self.config
    if bad := [i for i in capture if not 0 <= i < c.num_layers]:
      raise ValueError(f"capture layers {bad} are outside the {c.num_layers} layers (0-based)")
    if input_ids.shape[1] > c.max_seq_len:
      raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the position table "
                       f"({c.max_position_embeddings} positions, {c.max_seq_len} usable): "
                       f"use max_seq_len <= {c.max_seq_len}")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    rngs = [None] * (c.num_layers + 1) if dropout_rng is None else list(jax.random.split(dropout_rng, c.num_layers + 1))
    x = self.embeddings(input_ids, token_type_ids, rngs[0])
    internals = {}
    for i in range(c.num_layers):
      x, captured = self.layers[i](x, attention_mask, rngs[i + 1], capture=i in capture,
                                   return_logits=return_logits)
      if captured is not None:
        internals[i] = captured
    pooled = None if self.pooler is None else jnp.tanh(self.pooler(x[:, 0]))
    return EncoderOutput(x, pooled, internals)


def init_params(config: ModelConfig, seed: int = 0) -> nnx.State:
  """Freshly initialised parameters (BERT's truncated normal, std 0.02) as a pytree."""
  return nnx.state(Encoder(config, rngs=nnx.Rngs(seed)), nnx.Param)


@functools.lru_cache(maxsize=64)
def _abstract(config: ModelConfig):
  return shapes_only(nnx.split(nnx.eval_shape(lambda: Encoder(config, rngs=nnx.Rngs(0))), nnx.Param))


def shapes_only(split: tuple) -> tuple:
  """(graphdef, state) with the state's leaves bare shapes and dtypes: traced inside a step
  (under its mesh) `eval_shape` also records that mesh's sharding, which a checkpoint
  restore of the cached result would then take for its own."""
  graphdef, state = split
  return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def graphdef(config: ModelConfig):
  """The static structure that `nnx.merge(graphdef, params)` turns back into a module."""
  return _abstract(config)[0]


def abstract_params(config: ModelConfig) -> nnx.State:
  """A fresh copy of the parameter pytree's shapes and dtypes (jax.ShapeDtypeStruct)."""
  return jax.tree.map(lambda x: x, _abstract(config)[1])


def apply(config: ModelConfig, params: nnx.State, *args, **kwargs) -> EncoderOutput:
  """Pure functional call: `Encoder(config)` with `params`, no state kept anywhere."""
  return nnx.merge(graphdef(config), params)(*args, **kwargs)
