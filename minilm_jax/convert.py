"""Hugging Face <-> Flax conversion of BERT-family encoders and task models.

Tensors are named by `hf_names`, the one table used both ways. Import reads any local Hugging Face BERT / RoBERTa / XLM-R directory (`config.json`,
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
from collections.abc import Mapping

import numpy as np
import safetensors.numpy
from flax import nnx

from minilm_jax import atomic, hf_names, sentence_transformers_files, tokenization
from minilm_jax import model as model_lib
from minilm_jax.teachers import resolve_model_dir


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


def hf_to_params(config: model_lib.ModelConfig, tensors: Mapping[str, np.ndarray],
                 path: pathlib.Path) -> nnx.State:
  """Maps Hugging Face tensors onto our parameter pytree, checking names and shapes."""
  abstract = model_lib.abstract_params(config)
  table = hf_names.encoder(config, hf_names.encoder_prefix(tensors, path))
  nnx.replace_by_pure_dict(abstract, hf_names.from_hf(table, tensors, abstract.to_pure_dict(), path))
  return abstract


def load_hf(name_or_dir: str | os.PathLike) -> tuple[model_lib.ModelConfig, nnx.State]:
  """(config, float32 parameters) of a packaged teacher name or a local Hugging Face
  BERT-family directory (a door: the name is resolved here; the readers take directories).
  Non-finite weights and a tokenizer that does not fit the embedding table are refused."""
  model_dir = resolve_model_dir(name_or_dir)
  config, params = read_hf(model_dir)
  tokenization.check_fits(model_dir, config.vocab_size)
  return config, params


def read_hf(model_dir: str | os.PathLike) -> tuple[model_lib.ModelConfig, nnx.State]:
  """(config, float32 parameters) of a Hugging Face BERT-family directory; non-finite weights
  are refused. Its tokenizer is the caller's to read and check (`load_hf` checks it)."""
  config, _ = read_hf_config(model_dir)
  tensors, path = read_hf_tensors(model_dir)
  _check_finite(tensors, path)
  return config, hf_to_params(config, tensors, path)


def _check_finite(tensors: Mapping[str, np.ndarray], path: pathlib.Path) -> None:
  """A NaN or inf weight would poison every output (a teacher's, every loss): refuse it."""
  if bad := [name for name, x in tensors.items() if not np.isfinite(x).all()]:
    raise FloatingPointError(f"{path} has non-finite weights in {len(bad)} tensors, e.g. {bad[0]}: "
                             "the weights file is corrupt; restore it")


# ---------------------------------------------------------------------------------- writing


def params_to_hf(config: model_lib.ModelConfig, params: Mapping,
                 head: str | None = None) -> dict[str, np.ndarray]:
  """Our parameters as Hugging Face tensors: the encoder's, or with `head` (an `hf_names`
  head) a task model's, whose `params` hold the encoder under "encoder" beside the head."""
  table = hf_names.encoder(config) if head is None else hf_names.task(config, head)
  return hf_names.to_hf(table, _pure(params))


def save_hf(out_dir: str | os.PathLike, config: model_lib.ModelConfig, params: Mapping,
            tokenizer_dir: str | os.PathLike, *, head: str | None = None,
            extra_config: Mapping | None = None, card: str | None = None,
            overwrite: bool = False) -> pathlib.Path:
  """Writes config.json, model.safetensors and the tokenizer files as one directory; an
  encoder also the sentence-transformers files of `tokenizer_dir` (`sentence_transformers_files`),
  and `card` (see `model_card`) as README.md. The tokenizer is the one its reader checked
  against the model (`load_hf`, `checkpoint.restore_params`).

  `head` and `extra_config` serve task models (e.g. `hf_names.SEQUENCE_CLASSIFICATION`
  and the labels): `params` then hold the encoder and the head, named by
  `hf_names.task`, and config.json names the task architecture.
  """
  out_dir, tokenizer_dir = pathlib.Path(out_dir), pathlib.Path(tokenizer_dir)
  tensors = params_to_hf(config, params, head)
  hf_config = (config.to_hf() | {"architectures": [hf_names.architecture(config.model_type, head)]}
               | dict(extra_config or {}))

  def write(tmp: pathlib.Path):
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    safetensors.numpy.save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    for name in tokenization.TOKENIZER_FILES:
      if (tokenizer_dir / name).is_file():
        shutil.copy2(tokenizer_dir / name, tmp / name)
    if head is None:
      sentence_transformers_files.copy(tokenizer_dir, tmp, config)
    if card is not None:
      (tmp / "README.md").write_text(card)

  return atomic.write_dir(out_dir, write, overwrite=overwrite, sources=(tokenizer_dir,))


def _pure(params: Mapping) -> dict:
  """Parameters as nested dicts of arrays, whether given as `nnx.State`s, dicts or a mix."""
  if isinstance(params, nnx.State):
    return params.to_pure_dict()
  return {k: _pure(v) if isinstance(v, Mapping) else v for k, v in params.items()}
