"""A teacher's sentence-transformers module files, carried over to the models made from it.

A sentence-transformers model is a Hugging Face directory plus `modules.json` (the pipeline:
the Transformer at path "", then e.g. `1_Pooling/`, `2_Normalize/`), each module's folder of
settings, `sentence_bert_config.json` (the Transformer's `max_seq_length`) and
`config_sentence_transformers.json`. A student exported without them is loaded by
`SentenceTransformer` with default mean pooling and no normalisation, so its embeddings are
not comparable to its teacher's. `copy` writes the teacher's files beside the student's
weights, fitted to the student where a setting names the teacher's shape: Pooling's
`word_embedding_dimension` becomes the student's width, and `max_seq_length` is capped at the
positions the student has, and the Transformer module is the student's own weights at the
top of the directory. A module whose weights need the teacher's width (a `Dense` whose
`in_features` is not the student's) cannot be fitted: then no file is copied, and a warning
says why.
"""

import json
import logging
import pathlib

from minilm_jax import atomic

MODULES_FILE = "modules.json"
# Beside modules.json at the top of the directory.
TOP_FILES = (MODULES_FILE, "sentence_bert_config.json", "config_sentence_transformers.json")


def _read_json(path: pathlib.Path, data: bytes | None = None):
  """`path` parsed (or `data`, read from it before), or an error naming the file and the fix."""
  try:
    return json.loads(path.read_bytes() if data is None else data)
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


def fitted_files(src: pathlib.Path, config) -> dict[str, bytes] | None:
  """{relative path: bytes} of the files `copy` writes for a student of `config` (its
  `model.ModelConfig`); {} without `modules.json`, None when a module cannot serve the
  student's width.

  The Transformer module is the student itself, whose weights sit at the top of the export:
  a teacher that keeps its Transformer in a folder (`0_Transformer/`, older releases) has that
  module's path set to "" and its `sentence_bert_config.json` moved to the top.
  """
  listed = modules(src)
  if not listed:
    return {}
  files = {name: (src / name).read_bytes() for name in TOP_FILES if (src / name).is_file()}
  for module in listed:
    folder = src / module["path"]
    if module.get("type", "").endswith(".Transformer"):
      if module["path"] and (folder / "sentence_bert_config.json").is_file():
        files["sentence_bert_config.json"] = (folder / "sentence_bert_config.json").read_bytes()
      if module["path"]:
        module["path"] = ""
        files[MODULES_FILE] = _dumps(listed)
    elif module["path"] and folder.is_dir():
      module_files = _fitted_module(src, folder, config)
      if module_files is None:
        return None
      files |= module_files
  if "sentence_bert_config.json" in files:
    settings = _read_json(src / "sentence_bert_config.json", files["sentence_bert_config.json"])
    if settings.get("max_seq_length", 0) > config.max_seq_len:
      files["sentence_bert_config.json"] = _dumps(settings | {"max_seq_length": config.max_seq_len})
  return files


def _fitted_module(src: pathlib.Path, folder: pathlib.Path,
                   config) -> dict[str, bytes] | None:
  """A module folder's files, Pooling's width set to the student's; None for a module that
  needs another width."""
  files = {str(p.relative_to(src)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
  if not (folder / "config.json").is_file():
    return files  # e.g. Normalize: no settings
  settings = _read_json(folder / "config.json")
  if "word_embedding_dimension" in settings:  # Pooling
    files[str((folder / "config.json").relative_to(src))] = _dumps(
        settings | {"word_embedding_dimension": config.hidden_size})
  elif settings.get("in_features", config.hidden_size) != config.hidden_size:
    logging.warning("%s: module %s takes width %d, the student has %d: the export gets no "
                    "sentence-transformers files", src / MODULES_FILE, folder.name,
                    settings["in_features"], config.hidden_size)
    return None
  return files


def copy(src: str | pathlib.Path, dst: str | pathlib.Path, config) -> None:
  """Writes the sentence-transformers files of `src` (if any) into `dst`, fitted to `config`."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if src.resolve() == dst.resolve():
    return
  for name, data in (fitted_files(src, config) or {}).items():
    (dst / name).parent.mkdir(parents=True, exist_ok=True)
    atomic.write_file(dst / name, data)


def _dumps(settings: dict) -> bytes:
  return (json.dumps(settings, indent=2) + "\n").encode()
