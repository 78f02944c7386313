"""BERT masked-language-model pre-training from scratch: the baseline a student must beat.

MiniLM (Wang et al., 2020, Table 3) judges its students against a BERT of the same
shape pre-trained from scratch with the masked LM objective on the same corpus. This
module is that objective, trained by `step.make_train_step` like a distillation (same
data pipeline, micro-batching, sharding, checkpoints) and exported like any student.

Masking follows BERT's `create_pretraining_data.py` (Devlin et al., 2019, section 3.1):
in each row, round(15%) of the maskable tokens (every real token but [CLS], [SEP] and
[PAD]), at least one, are drawn uniformly without replacement; of those, 80% become
[MASK], 10% a uniformly random vocabulary id and 10% stay as they are. The loss is the
cross-entropy of the original token at the drawn positions, averaged over them:

    L = -1/|M| sum_{(b, t) in M} log softmax(W_E LN(gelu(W h_bt + c)) + b_V)[x_bt]

The head (`MaskedLMHead`) is Hugging Face's `BertLMPredictionHead`: dense + activation +
LayerNorm, then a decoder tied to the word embeddings plus a per-token bias. As in
BERT's `masked_lm_positions`, only the drawn positions (ceil(0.15 T) slots per row)
go through the head, which spares the [T, V] decoder product at the other 85%.

Parameters are `{"encoder": <model params>, "head": <head params>}`; `exports` names what
the run writes: a `BertForMaskedLM` directory, and the encoder alone (`encoder_params`,
what fine-tuning starts from).
"""

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import tokenizers
from flax import nnx

from minilm_jax import hf_names, tokenization
from minilm_jax import model as model_lib

MASK_RATE = 0.15           # fraction of maskable tokens predicted per row (BERT)
REPLACE_RATES = (0.8, 0.1)  # of those: -> [MASK], -> random id; the rest stay unchanged


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """The ids masking needs: what to write, what never to touch, how many ids to draw from."""
  mask_id: int                # [MASK]
  special_ids: tuple[int, ...]  # never masked: [CLS], [SEP], [PAD]
  vocab_size: int             # random replacements are drawn from 0 .. vocab_size - 1


def masking_spec(tokenizer: tuple[tokenizers.Tokenizer, tokenization.SpecialIds],
                 config: model_lib.ModelConfig) -> MaskingSpec:
  """The teacher tokenizer's [MASK] and special ids (`<mask>` for RoBERTa / XLM-R);
  `tokenizer` as `tokenization.for_pretraining` reads it."""
  tok, special = tokenizer
  for token in ("[MASK]", "<mask>"):
    if tok.token_to_id(token) is not None:
      return MaskingSpec(tok.token_to_id(token), (special.cls, special.sep, special.pad),
                         config.vocab_size)
  raise ValueError("the teacher's tokenizer has no [MASK] or <mask> token: masked LM "
                   "pre-training needs one; use a BERT / RoBERTa / XLM-R tokenizer")


@flax.struct.dataclass
class Masked:
  """One masked batch: the corrupted inputs and, per row, K prediction slots."""
  input_ids: jax.Array   # [B, T] with the drawn positions corrupted (80/10/10)
  positions: jax.Array   # [B, K] int32 drawn positions; slots past `weights` point anywhere
  labels: jax.Array      # [B, K] the original ids at `positions`
  weights: jax.Array     # [B, K] float32, 1 for a real prediction, 0 for an unused slot


def prediction_slots(seq_len: int) -> int:
  """K: slots per row, enough for round(15%) of any row of `seq_len` tokens."""
  return max(1, math.ceil(MASK_RATE * seq_len))


def mask_tokens(key: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                spec: MaskingSpec) -> Masked:
  """BERT's masking of `input_ids` [B, T]; a pure function of `key` (same key, same mask)."""
  input_ids = jnp.asarray(input_ids)
  b, t = input_ids.shape
  k = prediction_slots(t)
  choose_key, kind_key, random_key = jax.random.split(key, 3)
  maskable = attention_mask.astype(bool) & ~jnp.isin(input_ids, jnp.array(spec.special_ids))
  # A uniformly random order of each row's maskable tokens: the first n are a uniform draw.
  scores = jnp.where(maskable, jax.random.uniform(choose_key, (b, t)), 2.0)
  positions = jnp.argsort(scores, axis=1)[:, :k].astype(jnp.int32)
  count = jnp.sum(maskable, axis=1)
  n = jnp.where(count > 0, jnp.clip(jnp.round(MASK_RATE * count), 1, k), 0)
  weights = (jnp.arange(k)[None] < n[:, None]).astype(jnp.float32)
  labels = jnp.take_along_axis(input_ids, positions, axis=1)
  kind = jax.random.uniform(kind_key, (b, k))
  random_ids = jax.random.randint(random_key, (b, k), 0, spec.vocab_size, dtype=input_ids.dtype)
  corrupted = jnp.where(kind < REPLACE_RATES[0], jnp.asarray(spec.mask_id, input_ids.dtype),
                        jnp.where(kind < sum(REPLACE_RATES), random_ids, labels))
  corrupted = jnp.where(weights > 0, corrupted, labels)  # unused slots write back the original
  rows = jnp.arange(b)[:, None]
  return Masked(input_ids.at[rows, positions].set(corrupted), positions, labels, weights)


class MaskedLMHead(nnx.Module):
  """BertLMPredictionHead: dense -> activation -> LayerNorm -> tied decoder + bias."""

  def __init__(self, config: model_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    d = config.hidden_size
    self.transform = nnx.Linear(d, d, dtype=jnp.dtype(config.dtype),
                                kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs)
    self.layer_norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, dtype=jnp.dtype(config.dtype),
                                    use_fast_variance=False, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((config.vocab_size,), jnp.float32))

  def __call__(self, hidden, word_embeddings_VD):
    """[..., D] hidden states -> [..., V] float32 logits."""
    h = self.layer_norm(model_lib.ACTIVATIONS[self.config.hidden_act](self.transform(hidden)))
    logits = jnp.einsum("...D,VD->...V", h, word_embeddings_VD.astype(h.dtype),
                        preferred_element_type=jnp.float32)
    return logits + self.bias.value


def init_params(config: model_lib.ModelConfig, seed: int = 0) -> dict:
  """Fresh encoder and head parameters, `{"encoder": ..., "head": ...}`."""
  head = nnx.state(MaskedLMHead(config, rngs=nnx.Rngs(seed + 1)), nnx.Param)
  return {"encoder": model_lib.init_params(config, seed), "head": head}


@functools.lru_cache(maxsize=16)
def _head_graphdef(config: model_lib.ModelConfig):
  return model_lib.shapes_only(nnx.split(nnx.eval_shape(lambda: MaskedLMHead(config, rngs=nnx.Rngs(0))),
                                         nnx.Param))


def abstract_params(config: model_lib.ModelConfig) -> dict:
  """Shapes and dtypes of `init_params(config)` (to restore a checkpoint into)."""
  return {"encoder": model_lib.abstract_params(config),
          "head": jax.tree.map(lambda x: x, _head_graphdef(config)[1])}


def head_logits(config: model_lib.ModelConfig, params: dict, hidden) -> jax.Array:
  """The head on [..., D] hidden states: [..., V] float32 logits."""
  head = nnx.merge(_head_graphdef(config)[0], params["head"])
  return head(hidden, params["encoder"]["embeddings"]["word_embeddings"]["embedding"][...])


def logits(config: model_lib.ModelConfig, params: dict, input_ids, attention_mask=None,
           token_type_ids=None) -> jax.Array:
  """Eval-mode prediction scores at every position, [B, T, V] (as BertForMaskedLM)."""
  hidden = model_lib.apply(config, params["encoder"], input_ids, attention_mask,
                           token_type_ids).last_hidden_state
  return head_logits(config, params, hidden)


def mlm_loss(params, teacher_params, batch, rng, *, config: model_lib.ModelConfig,
             spec: MaskingSpec):
  """The masked LM loss of one (micro-)batch, mean over its predicted tokens.

  A `step.make_train_step` loss: `teacher_params` is unused (there is no teacher);
  `rng` draws the mask and the dropout. `terms["tokens"]` is the number of predicted
  tokens, so the step weights micro-batches by it and accumulates the exact mean.
  """
  del teacher_params
  mask_key, dropout_key = jax.random.split(rng)
  masked = mask_tokens(mask_key, batch["input_ids"], batch["attention_mask"], spec)
  hidden = model_lib.apply(config, params["encoder"], masked.input_ids, batch["attention_mask"],
                           batch["token_type_ids"], dropout_rng=dropout_key).last_hidden_state
  picked = jnp.take_along_axis(hidden, masked.positions[..., None], axis=1)  # [B, K, D]
  scores = head_logits(config, params, picked)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(scores), masked.labels[..., None], axis=-1)[..., 0]
  tokens = jnp.sum(masked.weights)
  total = jnp.sum(nll * masked.weights) / jnp.maximum(tokens, 1.0)
  return total, {"total": total, "tokens": tokens}


def make_loss(config: model_lib.ModelConfig, tokenizer: tuple[tokenizers.Tokenizer, tokenization.SpecialIds]):
  """`mlm_loss` bound to a student config and the tokenizer's ids (`masking_spec`)."""
  return functools.partial(mlm_loss, config=config, spec=masking_spec(tokenizer, config))


def encoder_params(params: dict):
  """The encoder alone: what fine-tuning and `convert.save_hf` take."""
  return params["encoder"]


def exports(config: model_lib.ModelConfig, params: dict) -> dict[str, tuple[model_lib.ModelConfig, dict, str | None]]:
  """What a masked-LM run exports, by directory: (config, parameters, `hf_names` head) of
  `hf-mlm`, a `BertForMaskedLM` (BERT only: RoBERTa / XLM-R have another LM head; the
  decoder is tied, so not stored), and of `hf`, the encoder alone (`encoder_params`)."""
  out = {"hf-mlm": (config.replace(use_pooler=False), params, hf_names.MASKED_LM)} if config.model_type == "bert" else {}
  return out | {"hf": (config, encoder_params(params), None)}
