"""What a `distill` workdir holds, and when a run may reuse it.

A directory is a distill run's when it is empty or new, or its `config.json` is a
`DistillConfig`. Reusing one resumes, so whatever fixes the checkpoints' contents or the
batches they continue with must be unchanged: the frozen config fields and the corpus
itself, recorded in `corpus.json` (file sizes, a SHA-256 of the tokenized examples and the
held-out documents).
Every check reads only; `write` runs after all of them passed, each file written whole
(a temporary file, then `os.replace`), so a refused run leaves the directory as it was.
"""

import dataclasses
import hashlib
import json
import pathlib

import jax
import numpy as np

from minilm_jax import atomic, data, documents
from minilm_jax.config import DistillConfig

CONFIG_FILE = "config.json"
CORPUS_FILE = "corpus.json"
# Fields that fix what the checkpoints contain or which batches follow them.
FROZEN_FIELDS = ("teacher", "teacher_layer", "version", "relation_heads", "student_layers",
                 "student_hidden", "student_heads", "student_intermediate", "max_seq_len",
                 "global_batch_size", "grad_accum_steps", "clip_grad_norm", "corpus", "data_dir",
                 "text_feature", "doc_per_line", "doc_per_file", "two_segments", "seed", "loss_terms",
                 "internals_loss", "loss_teacher_layers", "loss_student_layers", "objective",
                 "student_init", "heldout_documents")
_RUN_KEYS = ("teacher", "student_layers", "max_steps")  # a config.json with these is a run's
RENAMED_FIELDS = {"num_relation_heads": "relation_heads"}  # as runs of earlier versions saved them


def _as_json(cfg: DistillConfig) -> dict:
  """The config as config.json holds it (tuples as lists), to compare with a saved one."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _read_json(path: pathlib.Path):
  text = path.read_text(errors="replace")
  if not text.strip():
    raise ValueError(f"{path} is empty (a run killed while writing it?): restore it, or use a new "
                     "--workdir")
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}): restore it, or use a new --workdir") from e


def read_config(workdir: pathlib.Path) -> dict | None:
  """The config of the run in `workdir`; None for a new run. Refuses a non-run directory."""
  path = workdir / CONFIG_FILE
  if not path.is_file():
    found = [n for n in ("checkpoints", "metrics.jsonl", "hf") if (workdir / n).exists()]
    if found:
      raise ValueError(f"{workdir} holds {', '.join(found)} but no {CONFIG_FILE}: it is not a "
                       "distill run (or its config.json was lost); use a new --workdir")
    return None
  old = _read_json(path)
  if isinstance(old, dict):
    old = {RENAMED_FIELDS.get(k, k): v for k, v in old.items()}
  if not isinstance(old, dict) or not all(k in old for k in _RUN_KEYS):
    what = ("a Hugging Face model's config" if isinstance(old, dict) and "model_type" in old
            else f"not a distill config (a JSON {type(old).__name__} without {', '.join(_RUN_KEYS)})")
    raise ValueError(f"{workdir} holds something other than a distill run ({path} is {what}), "
                     "which distill would overwrite: use a new or empty --workdir")
  defaults = _as_json(DistillConfig())
  for key, value in old.items():
    default = defaults.get(key)
    if default is not None and not isinstance(value, type(default)) and not (
        isinstance(default, float) and isinstance(value, int)):
      raise ValueError(f"{path}: {key} is {value!r}, a {type(value).__name__}, but the run's "
                       f"{key} is a {type(default).__name__}: restore the file or use a new --workdir")
  return old


def check_resumable(workdir: pathlib.Path, old: dict | None, cfg: DistillConfig) -> None:
  """Refuses to resume the run `old` with other frozen fields."""
  if old is None:
    return
  new = _as_json(cfg)
  changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in FROZEN_FIELDS
             if k in old and old[k] != new[k]]
  if changed:
    raise ValueError(f"{workdir} holds a run with another configuration ({'; '.join(changed)}): "
                     "use a new --workdir, or the same settings to resume")


def corpus_record(cfg: DistillConfig, examples: data.PackedExamples,
                  heldout: data.PackedExamples | None = None) -> dict:
  """What the run reads: local files with their sizes, a SHA-256 of the packed examples
  (the whole corpus) and, with a held-out set, its documents (corpus indices) and size."""
  files = {}
  if cfg.corpus != "demo" and not cfg.corpus.startswith("tfds:"):
    files = {str(p): p.stat().st_size for p in documents.expand_paths(cfg.corpus)}
  digest = hashlib.sha256()
  for array in (examples.tokens, examples.starts, examples.lengths, examples.a_lengths):
    digest.update(np.ascontiguousarray(array).tobytes())
  record = {"files": files, "examples": len(examples), "tokens": int(len(examples.tokens)),
            "sha256": digest.hexdigest()}
  if heldout is not None:
    record["heldout"] = {"documents": np.unique(heldout.documents).tolist(),
                         "examples": len(heldout), "tokens": int(heldout.lengths.sum())}
  return record


def check_corpus(workdir: pathlib.Path, record: dict) -> None:
  """Refuses to resume on a corpus other than the one the run started with, saying what changed."""
  path = workdir / CORPUS_FILE
  if not path.is_file():
    return
  old = _read_json(path)
  if old.get("sha256") == record["sha256"]:
    _check_heldout(workdir, old.get("heldout"), record.get("heldout"))
    return
  before, after = old.get("files", {}), record["files"]
  changes = [f"{f} removed" for f in sorted(set(before) - set(after))]
  changes += [f"{f} added" for f in sorted(set(after) - set(before))]
  changes += [f"{f}: {before[f]} -> {after[f]} bytes" for f in sorted(set(before) & set(after))
              if before[f] != after[f]]
  changes += [f"{k}: {old.get(k)} -> {record[k]}" for k in ("examples", "tokens")
              if old.get(k) != record[k]]
  raise ValueError(f"the corpus changed since the run in {workdir} started "
                   f"({'; '.join(changes or ['same sizes, other tokens'])}): its checkpoints "
                   "continue another data order. Restore the corpus, or use a new --workdir")


def _check_heldout(workdir: pathlib.Path, old: dict | None, new: dict | None) -> None:
  """Refuses to resume with other held-out documents than the run's: it trained on the rest."""
  if old != new:
    def what(r):
      return "none" if r is None else f"documents {r['documents']}"
    raise ValueError(f"the held-out set differs from the one the run in {workdir} started with "
                     f"({what(old)} -> {what(new)}): its checkpoints trained on the other "
                     "documents. Use the run's heldout_documents and seed, or a new --workdir")


def write(workdir: pathlib.Path, cfg: DistillConfig, record: dict) -> None:
  """Records the run's config and corpus (process 0), after every check passed."""
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() != 0:
    return
  atomic.write_file(workdir / CONFIG_FILE,
                    json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
  atomic.write_file(workdir / CORPUS_FILE, json.dumps(record, indent=2) + "\n")
