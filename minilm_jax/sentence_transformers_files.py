"""A teacher's sentence-transformers module files, carried over to the models made from it.

A sentence-transformers model is a Hugging Face directory plus `modules.json` (the pipeline:
the Transformer at path "", then e.g. `1_Pooling/`, `2_Normalize/`), each module's folder of
settings, `sentence_bert_config.json` (the Transformer's `max_seq_length`) and
`config_sentence_transformers.json`. A student exported without them is loaded by
`SentenceTransformer` with default mean pooling and no normalisation, so its embeddings are
not comparable to its teacher's. `copy` writes the teacher's files beside the student's
weights, fitted to the student where a setting names the teacher's shape: Pooling's
`word_embedding_dimension` becomes the student's width, and `max_seq_length` is capped at the
positions the student has. A module whose weights need the teacher's width (a `Dense` whose
`in_features` is not the student's) cannot be fitted: then no file is copied, and a warning
says why.
"""

import json
import logging
import pathlib

from minilm_jax import atomic
from minilm_jax import model as model_lib

MODULES_FILE = "modules.json"
# Beside modules.json at the top of the directory.
TOP_FILES = (MODULES_FILE, "sentence_bert_config.json", "config_sentence_transformers.json")


def _read_json(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}): restore the teacher's sentence-transformers "
                     "files, or delete modules.json to export plain Hugging Face models") from e


def modules(model_dir: str | pathlib.Path) -> list[dict]:
  """The module list of `modules.json` ([] when the directory is no sentence-transformers model)."""
  path = pathlib.Path(model_dir) / MODULES_FILE
  if not path.is_file():
    return []
  listed = _read_json(path)
  if not isinstance(listed, list) or not all(isinstance(m, dict) and "path" in m for m in listed):
    raise ValueError(f"{path} is not a list of modules with a 'path' each: restore the teacher's "
                     "sentence-transformers files, or delete modules.json")
  return listed


def fitted_files(src: pathlib.Path, config: model_lib.ModelConfig) -> dict[str, bytes] | None:
  """{relative path: bytes} of the files `copy` writes; {} without `modules.json`, None
  when a module cannot serve the student's width."""
  files = {}
  for name in TOP_FILES:
    if (src / name).is_file():
      files[name] = (src / name).read_bytes()
  if "sentence_bert_config.json" in files:
    settings = _read_json(src / "sentence_bert_config.json")
    positions = config.max_position_embeddings - (0 if config.model_type == "bert"
                                                  else config.pad_token_id + 1)
    if settings.get("max_seq_length", 0) > positions:
      settings["max_seq_length"] = positions
      files["sentence_bert_config.json"] = _dumps(settings)
  for module in modules(src):
    folder = src / module["path"]
    if not module["path"] or not folder.is_dir():
      continue  # the Transformer (the weights themselves) or a module without settings
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
      files[str(path.relative_to(src))] = path.read_bytes()
    settings_path = folder / "config.json"
    if not settings_path.is_file():
      continue
    settings = _read_json(settings_path)
    if "word_embedding_dimension" in settings:  # Pooling
      settings["word_embedding_dimension"] = config.hidden_size
      files[str(settings_path.relative_to(src))] = _dumps(settings)
    elif settings.get("in_features", config.hidden_size) != config.hidden_size:
      logging.warning("%s: module %s takes width %d, the student has %d: the export gets no "
                      "sentence-transformers files", src / MODULES_FILE, module["path"],
                      settings["in_features"], config.hidden_size)
      return None
  return files


def copy(src: str | pathlib.Path, dst: str | pathlib.Path, config: model_lib.ModelConfig) -> None:
  """Writes the sentence-transformers files of `src` (if any) into `dst`, fitted to `config`."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if src.resolve() == dst.resolve():
    return
  for name, data in (fitted_files(src, config) or {}).items():
    (dst / name).parent.mkdir(parents=True, exist_ok=True)
    atomic.write_file(dst / name, data)


def _dumps(settings: dict) -> bytes:
  return (json.dumps(settings, indent=2) + "\n").encode()
