"""Hugging Face <-> Flax conversion of BERT-family encoders: one name table, both ways.

Import reads any local Hugging Face BERT / RoBERTa / XLM-R directory (`config.json`,
`model.safetensors` or `pytorch_model.bin` loaded with `weights_only=True`, tokenizer
files); export writes a directory that `transformers.AutoModel.from_pretrained` and
`AutoTokenizer.from_pretrained` load with no missing or unexpected weights. Nothing is
downloaded, and an existing output directory is replaced only whole (write to a
temporary directory, then rename).
"""

import json
import os
import pathlib
import shutil
from collections.abc import Iterator, Mapping

import numpy as np
import safetensors.numpy
from flax import nnx

from minilm_jax import atomic, tokenization
from minilm_jax import model as model_lib
from minilm_jax.teachers import resolve_model_dir

# Prefixes of the encoder inside task models (BertForMaskedLM: "bert.", RobertaFor*: "roberta.").
ENCODER_PREFIXES = ("", "bert.", "roberta.", "xlm_roberta.", "model.")

# (Hugging Face module, our module, kind). The kind says how tensors map:
#   linear: weight [out, in] <-> kernel [in, out]; bias <-> bias
#   norm:   weight <-> scale; bias <-> bias
#   embed:  weight <-> embedding
_EMBEDDINGS = [
    ("embeddings.word_embeddings", ("embeddings", "word_embeddings"), "embed"),
    ("embeddings.position_embeddings", ("embeddings", "position_embeddings"), "embed"),
    ("embeddings.token_type_embeddings", ("embeddings", "token_type_embeddings"), "embed"),
    ("embeddings.LayerNorm", ("embeddings", "layer_norm"), "norm"),
]
_LAYER = [
    ("attention.self.query", "query", "linear"),
    ("attention.self.key", "key", "linear"),
    ("attention.self.value", "value", "linear"),
    ("attention.output.dense", "attention_out", "linear"),
    ("attention.output.LayerNorm", "attention_norm", "norm"),
    ("intermediate.dense", "intermediate", "linear"),
    ("output.dense", "output", "linear"),
    ("output.LayerNorm", "output_norm", "norm"),
]
_TENSORS = {"linear": (("weight", "kernel"), ("bias", "bias")),
            "norm": (("weight", "scale"), ("bias", "bias")),
            "embed": (("weight", "embedding"),)}


def _modules(config: model_lib.ModelConfig) -> Iterator[tuple[str, tuple, str]]:
  yield from _EMBEDDINGS
  for i in range(config.num_layers):
    for hf, ours, kind in _LAYER:
      yield f"encoder.layer.{i}.{hf}", ("layers", i, ours), kind
  if config.use_pooler:
    yield "pooler.dense", ("pooler",), "linear"


def name_table(config: model_lib.ModelConfig) -> Iterator[tuple[str, tuple, bool]]:
  """Yields (Hugging Face tensor name, our parameter path, transposed?) for every tensor."""
  for hf, ours, kind in _modules(config):
    for hf_leaf, our_leaf in _TENSORS[kind]:
      yield f"{hf}.{hf_leaf}", ours + (our_leaf,), kind == "linear" and hf_leaf == "weight"


# ---------------------------------------------------------------------------------- reading


def read_hf_config(model_dir: str | os.PathLike) -> tuple[model_lib.ModelConfig, dict]:
  """Reads `config.json` of a Hugging Face directory."""
  path = pathlib.Path(model_dir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: a Hugging Face model directory needs config.json "
                            "(save the model with save_pretrained)")
  text = path.read_text(errors="replace")
  try:
    hf = json.loads(text)
  except json.JSONDecodeError as e:
    what = "empty" if not text.strip() else f"not valid JSON ({e})"
    raise ValueError(f"{path} is {what}: restore it from the original model") from e
  if not isinstance(hf, dict):
    raise ValueError(f"{path} holds a JSON {type(hf).__name__}, not an object of model fields: "
                     "restore it from the original model")
  try:
    return model_lib.ModelConfig.from_hf(hf), hf
  except KeyError as e:
    raise ValueError(f"{path} lacks the field {e}: it is not a BERT-family config") from e
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}; restore it from the original model") from e


def read_hf_tensors(model_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], pathlib.Path]:
  """All tensors of `model.safetensors` (preferred) or `pytorch_model.bin`, as numpy."""
  model_dir = pathlib.Path(model_dir)
  st, pt = model_dir / "model.safetensors", model_dir / "pytorch_model.bin"
  if st.is_file():
    try:
      return safetensors.numpy.load_file(st), st
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
      raise ValueError(f"{st} is not a readable safetensors file ({e}): re-export the model "
                       "with save_pretrained(safe_serialization=True)") from e
  if pt.is_file():
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"{pt} needs PyTorch to read; install torch or convert it to "
                        "model.safetensors") from e
    try:
      state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:
      raise ValueError(f"{pt} could not be loaded with weights_only=True ({e}): re-export the "
                       "model as model.safetensors") from e
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}, pt
  raise FileNotFoundError(f"{model_dir} has neither model.safetensors nor pytorch_model.bin: "
                          "point at a Hugging Face directory written by save_pretrained")


def check_tokenizer(config: model_lib.ModelConfig, model_dir: str | os.PathLike) -> pathlib.Path:
  """Checks that `tokenizer.json` exists and fits the embedding table; returns its path."""
  model_dir = pathlib.Path(model_dir)
  size = tokenization.load(model_dir).get_vocab_size(with_added_tokens=True)
  path = model_dir / "tokenizer.json"
  if size > config.vocab_size:
    raise ValueError(f"{path} has {size} tokens but config.json vocab_size is {config.vocab_size}: "
                     "the tokenizer does not belong to this model; use the model's own tokenizer")
  return path


def _strip_prefix(tensors: Mapping[str, np.ndarray], path: pathlib.Path) -> dict[str, np.ndarray]:
  for prefix in ENCODER_PREFIXES:
    if f"{prefix}embeddings.word_embeddings.weight" in tensors:
      renamed = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
      # Old TensorFlow-era checkpoints name LayerNorm parameters gamma / beta.
      return {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
              for k, v in renamed.items()}
  raise ValueError(f"{path} has no embeddings.word_embeddings.weight (under any of the prefixes "
                   f"{[p for p in ENCODER_PREFIXES if p]}): it is not a BERT-family encoder")


def hf_to_params(config: model_lib.ModelConfig, tensors: Mapping[str, np.ndarray],
                 path: pathlib.Path) -> nnx.State:
  """Maps Hugging Face tensors onto our parameter pytree, checking names and shapes."""
  tensors = _strip_prefix(tensors, path)
  abstract = model_lib.abstract_params(config)
  flat = dict(_flatten(abstract.to_pure_dict()))
  missing = [hf for hf, _, _ in name_table(config) if hf not in tensors]
  if missing:
    raise ValueError(f"{path} lacks {len(missing)} tensors that config.json implies, e.g. "
                     f"{missing[:3]}: the weights do not match config.json (layers, pooler)")
  out = {}
  for hf, ours, transposed in name_table(config):
    value = np.asarray(tensors[hf], dtype=np.float32)
    value = value.T if transposed else value
    if value.shape != flat[ours].shape:
      raise ValueError(f"{path}: {hf} has shape {tuple(tensors[hf].shape)}, but config.json implies "
                       f"{flat[ours].shape[::-1] if transposed else flat[ours].shape}: the weights "
                       "and config.json disagree")
    out[ours] = value
  nnx.replace_by_pure_dict(abstract, _unflatten(out))
  return abstract


def load_hf(name_or_dir: str | os.PathLike) -> tuple[model_lib.ModelConfig, nnx.State]:
  """(config, float32 parameters) of a packaged teacher name or a local Hugging Face
  BERT-family directory (a door: the name is resolved here; the readers take directories)."""
  model_dir = resolve_model_dir(name_or_dir)
  config, _ = read_hf_config(model_dir)
  check_tokenizer(config, model_dir)
  tensors, path = read_hf_tensors(model_dir)
  return config, hf_to_params(config, tensors, path)


# ---------------------------------------------------------------------------------- writing


def params_to_hf(config: model_lib.ModelConfig, params: nnx.State | dict,
                 prefix: str = "") -> dict[str, np.ndarray]:
  """Our parameters as Hugging Face tensors (`prefix` "bert." for task models)."""
  pure = params.to_pure_dict() if isinstance(params, nnx.State) else params
  flat = dict(_flatten(pure))
  out = {}
  for hf, ours, transposed in name_table(config):
    value = np.asarray(flat[ours], dtype=np.float32)
    out[prefix + hf] = np.ascontiguousarray(value.T if transposed else value)
  return out


def save_hf(out_dir: str | os.PathLike, config: model_lib.ModelConfig, params: nnx.State | dict,
            tokenizer_dir: str | os.PathLike, *, prefix: str = "",
            extra_tensors: Mapping[str, np.ndarray] | None = None,
            extra_config: Mapping | None = None, overwrite: bool = False) -> pathlib.Path:
  """Writes config.json, model.safetensors and the tokenizer files as one directory.

  `prefix`, `extra_tensors` and `extra_config` serve task models (e.g. "bert." plus
  "classifier.weight" and `architectures: ["BertForSequenceClassification"]`).
  """
  out_dir, tokenizer_dir = pathlib.Path(out_dir), pathlib.Path(tokenizer_dir)
  check_tokenizer(config, tokenizer_dir)
  tensors = params_to_hf(config, params, prefix) | dict(extra_tensors or {})
  hf_config = config.to_hf() | dict(extra_config or {})

  def write(tmp: pathlib.Path):
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    safetensors.numpy.save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    for name in tokenization.TOKENIZER_FILES:
      if (tokenizer_dir / name).is_file():
        shutil.copy2(tokenizer_dir / name, tmp / name)

  return atomic.write_dir(out_dir, write, overwrite=overwrite, sources=(tokenizer_dir,))


# ---------------------------------------------------------------------------------- pytrees


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
