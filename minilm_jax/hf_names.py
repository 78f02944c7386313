"""Hugging Face tensor names of the encoder and every head: one table, read and written alike.

A table lists, per tensor, (Hugging Face name, our parameter path, transposed?). It is
built from modules and their kind, which says how the tensors map:

    linear   weight [out, in] <-> kernel [in, out] (transposed); bias <-> bias
    norm     weight <-> scale; bias <-> bias
    embed    weight <-> embedding
    bias     bias <-> bias (a bare parameter)

`encoder` is the table of `{Bert,Roberta,XLMRoberta}Model`, with which `convert` imports
teachers and exports students. `task` adds a head: the encoder then sits under "bert."
(BERT) or "roberta." (RoBERTa, XLM-R) in Hugging Face's names and under "encoder" in
ours, and the head's modules map (Hugging Face -> ours)

    *ForSequenceClassification  BERT: classifier -> classifier
                                RoBERTa, XLM-R: classifier.dense -> classifier_dense,
                                                classifier.out_proj -> classifier
    *ForQuestionAnswering       qa_outputs -> qa_outputs
    BertForMaskedLM             cls.predictions.transform.dense -> head.transform,
                                cls.predictions.transform.LayerNorm -> head.layer_norm,
                                cls.predictions.bias -> head.bias

A regression model is a sequence classifier with one label (config.json's `problem_type`
tells them apart); the masked LM's decoder is tied to the word embeddings, so not stored.
`to_hf` and `from_hf` apply a table in either direction, checking names and shapes. The
module reads a config's fields but imports nothing of the package, so the model itself
takes its architecture names from here.
"""

import os
from collections.abc import Iterator, Mapping

import numpy as np

SEQUENCE_CLASSIFICATION = "ForSequenceClassification"  # a head: its architectures' suffix
QUESTION_ANSWERING = "ForQuestionAnswering"
MASKED_LM = "ForMaskedLM"
# Prefixes of the encoder inside task models read (BertForMaskedLM: "bert.", RobertaFor*: "roberta.").
ENCODER_PREFIXES = ("", "bert.", "roberta.", "xlm_roberta.", "model.")
# model_type -> the encoder-only architecture.
ARCHITECTURES = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}
# model_type -> the encoder's module in its task models (XLM-R reuses RoBERTa's code), which
# also says whose head names it uses.
ENCODER_NAMES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta"}

_KINDS = {"linear": (("weight", "kernel"), ("bias", "bias")),
          "norm": (("weight", "scale"), ("bias", "bias")),
          "embed": (("weight", "embedding"),),
          "bias": (("bias", "bias"),)}
# (Hugging Face module, our module path, kind)
_EMBEDDINGS = (
    ("embeddings.word_embeddings", ("embeddings", "word_embeddings"), "embed"),
    ("embeddings.position_embeddings", ("embeddings", "position_embeddings"), "embed"),
    ("embeddings.token_type_embeddings", ("embeddings", "token_type_embeddings"), "embed"),
    ("embeddings.LayerNorm", ("embeddings", "layer_norm"), "norm"),
)
_LAYER = (
    ("attention.self.query", "query", "linear"),
    ("attention.self.key", "key", "linear"),
    ("attention.self.value", "value", "linear"),
    ("attention.output.dense", "attention_out", "linear"),
    ("attention.output.LayerNorm", "attention_norm", "norm"),
    ("intermediate.dense", "intermediate", "linear"),
    ("output.dense", "output", "linear"),
    ("output.LayerNorm", "output_norm", "norm"),
)
# (head, encoder name) -> its modules, our paths from the task model's root.
_HEADS = {
    (SEQUENCE_CLASSIFICATION, "bert"): (("classifier", ("classifier",), "linear"),),
    (SEQUENCE_CLASSIFICATION, "roberta"): (
        ("classifier.dense", ("classifier_dense",), "linear"),
        ("classifier.out_proj", ("classifier",), "linear")),
    (QUESTION_ANSWERING, "bert"): (("qa_outputs", ("qa_outputs",), "linear"),),
    (QUESTION_ANSWERING, "roberta"): (("qa_outputs", ("qa_outputs",), "linear"),),
    (MASKED_LM, "bert"): (
        ("cls.predictions.transform.dense", ("head", "transform"), "linear"),
        ("cls.predictions.transform.LayerNorm", ("head", "layer_norm"), "norm"),
        ("cls.predictions", ("head",), "bias")),
}

# Tensors a file may hold beside a table's: buffers transformers saves with the encoder, and,
# when the encoder alone is read (a teacher saved as BertForMaskedLM), its task model's head.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_HEAD_MODULES = ("cls.", "lm_head.", "classifier.", "qa_outputs.")
_WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"

Table = list[tuple[str, tuple, bool]]


def _tensors(modules, prefix: str = "", under: tuple = ()) -> Table:
  return [(f"{prefix}{hf}.{hf_leaf}", under + ours + (our_leaf,), kind == "linear" and hf_leaf == "weight")
          for hf, ours, kind in modules for hf_leaf, our_leaf in _KINDS[kind]]


def _encoder_modules(config) -> Iterator[tuple[str, tuple, str]]:
  yield from _EMBEDDINGS
  for i in range(config.num_layers):
    for hf, ours, kind in _LAYER:
      yield f"encoder.layer.{i}.{hf}", ("layers", i, ours), kind
  if config.use_pooler:
    yield "pooler.dense", ("pooler",), "linear"


def encoder(config, prefix: str = "", under: tuple = ()) -> Table:
  """Every tensor of the encoder of `config` (a `model.ModelConfig`: its layers and pooler),
  its Hugging Face names under `prefix`, ours under `under`."""
  return _tensors(_encoder_modules(config), prefix, under)


def task(config, head: str, prefix: str | None = None) -> Table:
  """A task model's tensors: the encoder (ours under "encoder") and `head`'s, named as
  `config.model_type` names them.

  `prefix` is the encoder's in Hugging Face's names: by default the one the family
  writes; on import, the one the file uses (`encoder_prefix`).
  """
  name = ENCODER_NAMES[config.model_type]
  prefix = f"{name}." if prefix is None else prefix
  return encoder(config, prefix, ("encoder",)) + _tensors(_HEADS[head, name])


def architecture(model_type: str, head: str | None = None) -> str:
  """`BertModel` for the encoder alone, `XLMRobertaForQuestionAnswering` for a head, ..."""
  base = ARCHITECTURES[model_type]
  return base if head is None else base.removesuffix("Model") + head


def encoder_prefix(tensors: Mapping[str, np.ndarray], path: os.PathLike) -> str:
  """The prefix of the encoder's tensors in a file (any of `ENCODER_PREFIXES`)."""
  for prefix in ENCODER_PREFIXES:
    if prefix + _WORD_EMBEDDINGS in tensors:
      return prefix
  raise ValueError(f"{path} has no embeddings.word_embeddings.weight (under any of the prefixes "
                   f"{[p for p in ENCODER_PREFIXES if p]}): it is not a BERT-family encoder")


def to_hf(table: Table, params: Mapping) -> dict[str, np.ndarray]:
  """Our parameters (a nested dict of arrays) as Hugging Face tensors, in table order."""
  flat = dict(_flatten(params))
  out = {}
  for hf, ours, transposed in table:
    value = np.asarray(flat[ours], dtype=np.float32)
    out[hf] = np.ascontiguousarray(value.T if transposed else value)
  return out


def check_names(table: Table, tensors: Mapping[str, np.ndarray], path: os.PathLike) -> None:
  """The file's tensors are the table's, both ways: none missing (the encoder's and the task
  head's named apart) and none that config.json does not imply (an extra layer, a pooler
  config.json says is absent, a stray tensor), except `_BUFFERS` and, when the table is the
  encoder alone, the tensors of the head the file's task model has (`_HEAD_MODULES`)."""
  task = any(ours[0] == "encoder" for _, ours, _ in table)
  head = [hf for hf, ours, _ in table if task and ours[0] != "encoder"]
  missing = [hf for hf, _, _ in table if hf not in tensors and hf not in head]
  if missing:
    raise ValueError(f"{path} lacks {len(missing)} tensors that config.json implies, e.g. "
                     f"{missing[:3]}: the weights do not match config.json (num_hidden_layers, "
                     "add_pooling_layer); fix config.json or export the model again")
  if missing_head := [hf for hf in head if hf not in tensors]:
    raise ValueError(f"{path} lacks the task head's {', '.join(missing_head)}: it holds an encoder "
                     "without its complete head; export the task model again (finetune writes "
                     "DIR/seed-N/best)")
  names = {hf for hf, _, _ in table}
  prefix = next(hf for hf, _, _ in table if hf.endswith(_WORD_EMBEDDINGS)).removesuffix(_WORD_EMBEDDINGS)
  unread = {prefix + buffer for buffer in _BUFFERS}
  extra = [k for k in tensors if k not in names and k not in unread
           and (task or not k.startswith(_HEAD_MODULES))]
  if extra:
    raise ValueError(f"{path} holds {len(extra)} tensors that config.json does not imply: "
                     f"{', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}; the weights do not "
                     "match config.json (num_hidden_layers, add_pooling_layer, architectures): fix "
                     "config.json or export the model again")


def from_hf(table: Table, tensors: Mapping[str, np.ndarray], abstract: Mapping,
            path: os.PathLike) -> dict:
  """Hugging Face tensors as our parameters, shaped like `abstract` (a nested dict of
  arrays or shapes), float32; the file's tensors must be the table's (`check_names`), each
  in its shape."""
  # Old TensorFlow-era checkpoints name LayerNorm parameters gamma / beta.
  tensors = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
             for k, v in tensors.items()}
  check_names(table, tensors, path)
  shapes = {ours: x.shape for ours, x in _flatten(abstract)}
  out = {}
  for hf, ours, transposed in table:
    value = np.asarray(tensors[hf], dtype=np.float32)
    value = value.T if transposed else value
    if value.shape != shapes[ours]:
      raise ValueError(f"{path}: {hf} has shape {tuple(tensors[hf].shape)}, but config.json implies "
                       f"{shapes[ours][::-1] if transposed else shapes[ours]}: the weights "
                       "and config.json disagree")
    out[ours] = value
  return _unflatten(out)


def _flatten(tree: Mapping, prefix: tuple = ()) -> Iterator[tuple[tuple, np.ndarray]]:
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _unflatten(flat: Mapping[tuple, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree
