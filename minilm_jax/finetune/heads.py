"""Task models on the shared encoder: classification / regression and QA heads.

The modules mirror Hugging Face's `BertForSequenceClassification` (pooled [CLS] ->
dropout -> dense), its RoBERTa / XLM-R counterpart `RobertaForSequenceClassification`
(no pooler: the <s> hidden state -> dropout -> dense -> tanh -> dropout -> dense) and
`*ForQuestionAnswering` (last hidden states -> dense(2) = start and end logits), so
`export_hf` writes a directory that transformers loads with no missing or unexpected
weights. `load_encoder` reads the pre-trained encoder from a Hugging Face directory, a
packaged teacher name or a minilm_jax checkpoint / distill workdir, and `task_model`
puts it under a fresh head; `from_hf` reads an exported task model back, both named by
`hf_names`.
"""

import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minilm_jax import checkpoint, convert, hf_names, tokenization
from minilm_jax import model as model_lib
from minilm_jax.teachers import resolve_model_dir


class SequenceClassifier(nnx.Module):
  """BertForSequenceClassification: pooler output -> dropout -> dense(num_labels).

  RoBERTa / XLM-R (RobertaClassificationHead): no pooler; the first (<s>) hidden state ->
  dropout -> `classifier_dense` -> tanh -> dropout -> `classifier` (HF's out_proj).
  """

  def __init__(self, config: model_lib.ModelConfig, num_labels: int, *, rngs: nnx.Rngs):
    roberta = config.model_type in model_lib.ROBERTA_FAMILY
    self.dropout = nnx.Dropout(config.hidden_dropout)
    self.encoder = model_lib.Encoder(config.replace(use_pooler=not roberta), rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.classifier_dense = (nnx.Linear(config.hidden_size, config.hidden_size, kernel_init=init,
                                        rngs=rngs) if roberta else None)
    self.classifier = nnx.Linear(config.hidden_size, num_labels, kernel_init=init, rngs=rngs)

  def __call__(self, input_ids, attention_mask, token_type_ids, *, dropout_rng=None):
    rngs = (None,) * 3 if dropout_rng is None else jax.random.split(dropout_rng, 3)
    out = self.encoder(input_ids, attention_mask, token_type_ids, dropout_rng=rngs[0])
    if self.classifier_dense is None:
      x = out.pooled_output
    else:
      x = jnp.tanh(self.classifier_dense(model_lib.dropout(self.dropout, out.last_hidden_state[:, 0],
                                                           rngs[2])))
    return self.classifier(model_lib.dropout(self.dropout, x, rngs[1])).astype(jnp.float32)


class QuestionAnswerer(nnx.Module):
  """BertForQuestionAnswering: last hidden states -> dense(2) -> (start, end) logits."""

  def __init__(self, config: model_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.encoder = model_lib.Encoder(config.replace(use_pooler=False), rngs=rngs)
    self.qa_outputs = nnx.Linear(config.hidden_size, 2,
                                 kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

  def __call__(self, input_ids, attention_mask, token_type_ids, *, dropout_rng=None):
    hidden = self.encoder(input_ids, attention_mask, token_type_ids,
                          dropout_rng=dropout_rng).last_hidden_state
    logits = self.qa_outputs(hidden).astype(jnp.float32)
    return logits[..., 0], logits[..., 1]


def load_encoder(model: str, use_pooler: bool) -> tuple[model_lib.ModelConfig, Any, pathlib.Path]:
  """(config, float32 encoder parameters, tokenizer directory) of a HF dir or checkpoint.

  A checkpoint without a pooler gets a freshly initialised one when a classifier needs
  it (as `from_pretrained` does); a QA model drops the pooler.
  """
  path = pathlib.Path(model).expanduser()
  if path.is_dir() and ((path / checkpoint.MODEL_FILE).is_file()
                        or (path / "checkpoints" / checkpoint.MODEL_FILE).is_file()):
    config, params, tokenizer_dir, _ = checkpoint.restore_params(path)
    pure = checkpoint.to_host(params).to_pure_dict()
  else:
    model_dir = resolve_model_dir(model)  # a packaged name or an HF directory: resolved once, here
    config, _ = convert.read_hf_config(model_dir)
    tensors, source = convert.read_hf_tensors(model_dir)
    tokenizer_dir = tokenization.check_fits(model_dir, config.vocab_size).parent
    has_pooler = any(k.endswith("pooler.dense.weight") for k in tensors)
    pure = convert.hf_to_params(config.replace(use_pooler=has_pooler), tensors,
                                source).to_pure_dict()
  # RoBERTa's classifier reads the <s> hidden state: its task models have no pooler.
  use_pooler = use_pooler and config.model_type not in model_lib.ROBERTA_FAMILY
  config = config.replace(use_pooler=use_pooler)
  if use_pooler and "pooler" not in pure:
    logging.warning("%s has no pooler: initialising one (train it on the task)", model)
    pure["pooler"] = model_lib.init_params(config).to_pure_dict()["pooler"]
  if not use_pooler:
    pure.pop("pooler", None)
  return config, pure, pathlib.Path(tokenizer_dir)


def _module(config: model_lib.ModelConfig, num_labels: int | None, rngs: nnx.Rngs) -> nnx.Module:
  return (QuestionAnswerer(config, rngs=rngs) if num_labels is None
          else SequenceClassifier(config, num_labels, rngs=rngs))


def task_model(config: model_lib.ModelConfig, encoder_params: dict, num_labels: int | None,
               seed: int = 0) -> nnx.Module:
  """A `SequenceClassifier` (`num_labels` wide) or, for None, a `QuestionAnswerer`, holding
  the encoder parameters of `load_encoder` and a head initialised from `seed`."""
  module = _module(config, num_labels, nnx.Rngs(seed))
  encoder_state = nnx.state(module.encoder, nnx.Param)
  nnx.replace_by_pure_dict(encoder_state, jax.tree.map(jnp.asarray, encoder_params))
  nnx.update(module.encoder, encoder_state)
  return module


def export_hf(out_dir: str | pathlib.Path, module, tokenizer_dir: str | pathlib.Path, *,
              labels: tuple[str, ...] | None = None, regression: bool = False,
              card: str | None = None, overwrite: bool = False) -> pathlib.Path:
  """Writes a fine-tuned model as a Hugging Face `{Bert,Roberta,XLMRoberta}ForSequenceClassification`
  or `...ForQuestionAnswering` directory (config, model.safetensors, tokenizer, README.md `card`)."""
  config = module.encoder.config.replace(dtype="float32")
  pure = checkpoint.to_host(nnx.state(module, nnx.Param)).to_pure_dict()
  if isinstance(module, QuestionAnswerer):
    head, extra_config = hf_names.QUESTION_ANSWERING, {}
  else:
    head = hf_names.SEQUENCE_CLASSIFICATION
    width = module.classifier.out_features
    names = list(labels) if labels else [f"LABEL_{i}" for i in range(width)]
    extra_config = {"id2label": dict(enumerate(names)),
                    "label2id": {name: i for i, name in enumerate(names)},
                    "problem_type": "regression" if regression else "single_label_classification"}
  return convert.save_hf(out_dir, config, pure, tokenizer_dir, head=head, extra_config=extra_config,
                         card=card, overwrite=overwrite)


def from_hf(config: model_lib.ModelConfig, num_labels: int | None, tensors: dict[str, np.ndarray],
            path: pathlib.Path) -> nnx.Module:
  """The task model (`num_labels` as in `task_model`) that a Hugging Face directory's
  `tensors` hold, encoder and head: the inverse of `export_hf`."""
  module = nnx.eval_shape(lambda: _module(config, num_labels, nnx.Rngs(0)))
  head = hf_names.QUESTION_ANSWERING if num_labels is None else hf_names.SEQUENCE_CLASSIFICATION
  params = nnx.state(module, nnx.Param)
  table = hf_names.task(module.encoder.config, head, hf_names.encoder_prefix(tensors, path))
  loaded = hf_names.from_hf(table, tensors, params.to_pure_dict(), path)
  nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, loaded))
  nnx.update(module, params)
  return module


def count_params(module) -> int:
  """Encoder parameters (embeddings, layers, pooler), the size the MiniLM tables report."""
  return int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(module.encoder, nnx.Param))))
