"""What a `distill` workdir holds, and when a run may reuse it.

A directory is a distill run's when it is empty or new, or its `config.json` is a
`DistillConfig`. Reusing one resumes, so whatever fixes the checkpoints' contents or the
batches they continue with must be unchanged: the frozen config fields and the corpus
itself, recorded in `corpus.json` (file sizes, a SHA-256 of the tokenized examples and the
held-out documents).
Every check reads only; `write` runs after all of them passed, each file written whole
(a temporary file, then `os.replace`), so a refused run leaves the directory as it was.

One run writes a workdir at a time: `locked` holds `lock(workdir)` for a whole command.
"""

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import pathlib
import shlex
import socket
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from minilm_jax import atomic, data, documents
from minilm_jax.config import DistillConfig

CONFIG_FILE = "config.json"
CORPUS_FILE = "corpus.json"
LAUNCH_FILE = "launch.json"  # each start's command line and devices (`record_launch`), for model cards
# Present while a run holds the workdir: its pid, host, start and command (hidden: not a result).
LOCK_FILE = ".lock"
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
    others = sorted(p.name for p in workdir.iterdir() if not p.name.startswith(".")) if workdir.is_dir() else []
    if others:  # a home or source folder, say (`--workdir ''` is the current directory)
      raise ValueError(f"{workdir} is not empty ({', '.join(others[:4])}{', ...' if len(others) > 4 else ''}) "
                       "and holds no distill run, whose files would mix with these: pass a new or "
                       "empty --workdir")
    return None
  old = _read_json(path)
  if (workdir / "hf").is_dir() and not any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
    raise ValueError(f"{workdir} holds a finished run's student (hf/) but no checkpoint: its "
                     "checkpoints/ were removed, and a rerun would train again from step 0 and "
                     "replace hf/; restore checkpoints/, or use a new --workdir")
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
  """Refuses to resume on a corpus other than the one the run started with, saying what
  changed, or without `corpus.json` once the run has checkpoints (they continue its corpus)."""
  path = workdir / CORPUS_FILE
  if not path.is_file():
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())
    if steps:
      raise ValueError(f"{path} is missing, but the run in {workdir} has checkpoints (steps "
                       f"{steps}) that continue the corpus it recorded: restore {CORPUS_FILE}, or use "
                       "a new --workdir")
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


def _command() -> str | None:
  """This process's command line, when it is `python -m minilm_jax ...`."""
  if pathlib.Path(sys.argv[0]).parent.name != "minilm_jax":
    return None
  return shlex.join(["python", "-m", "minilm_jax", *sys.argv[1:]])


def devices() -> str:
  """The devices this run sees, in words (launch.json's and a model card's hardware)."""
  return (f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{jax.process_count()} process(es)")


def record_launch(workdir: pathlib.Path) -> None:
  """Appends this start's command line and devices to the workdir's `launch.json` (process 0)."""
  if jax.process_index() != 0:
    return
  path = pathlib.Path(workdir) / LAUNCH_FILE
  launches = json.loads(path.read_text()) if path.is_file() else []
  launches.append({"command": _command(), "devices": devices(), "jax": jax.__version__})
  atomic.write_file(path, json.dumps(launches, indent=2) + "\n")


@contextlib.contextmanager
def lock(workdir: str | os.PathLike):
  """Holds `workdir` for one writer (process 0 of a pod; the others write only what it
  orders), else fails at once, on every process, naming the holder's pid and host.

  The lock is `fcntl.flock` on `workdir/.lock`, which the kernel (and NFS) releases when
  the holder dies, so a lock left by a killed run is taken over, with a warning naming it;
  the file records the holder for the message and is removed on release. A new workdir
  made for the lock is removed again if the run leaves it empty (a refused run leaves
  nothing). Once held, what killed writers left (`atomic.clean_leftovers`) is cleaned.
  """
  workdir = pathlib.Path(workdir).absolute()
  held, refused = None, None
  if jax.process_index() == 0:
    try:
      held = _take(workdir)
    except OSError as e:
      refused = e
  if jax.process_count() > 1:  # every process of a refused run fails at once, not at a barrier
    taken = multihost_utils.broadcast_one_to_all(np.int32(refused is None))
    if not taken and refused is None:
      raise BlockingIOError(f"process 0 could not take the lock on {workdir} (its error says why): "
                            "one run writes a workdir at a time")
  if refused is not None:
    raise refused
  try:
    yield
  finally:
    if held is not None:
      _release(workdir, *held)


def _take(workdir: pathlib.Path) -> tuple[int, list[pathlib.Path]]:
  """The lock's descriptor and the directories made for it; what killed writers left cleaned."""
  if workdir.exists() and not workdir.is_dir():
    raise NotADirectoryError(f"--workdir {workdir} is a file: pass a directory (new or a run's)")
  made = [p for p in (workdir, *workdir.parents) if not p.exists()]
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    fd = _acquire(workdir / LOCK_FILE)
  except BaseException:
    _remove_empty(made)
    raise
  try:
    atomic.clean_leftovers(workdir)
  except BaseException:
    _release(workdir, fd, made)
    raise
  return fd, made


def _release(workdir: pathlib.Path, fd: int, made: list[pathlib.Path]) -> None:
  (workdir / LOCK_FILE).unlink(missing_ok=True)  # before closing: no one holds a removed file
  os.close(fd)
  _remove_empty(made)


def _remove_empty(made: list[pathlib.Path]) -> None:
  for p in made:  # the new workdir first, then the parents made for it
    if any(p.iterdir()):
      break
    p.rmdir()


def locked(run):
  """`run(cfg, workdir, ...)` holding `lock(workdir)` throughout."""
  @functools.wraps(run)
  def locked_run(cfg, workdir, *args, **kwargs):
    with lock(workdir):
      return run(cfg, workdir, *args, **kwargs)
  return locked_run


def _acquire(path: pathlib.Path) -> int:
  """An open descriptor of `path`, flock-ed, holding this process's record."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_record(fd)
      os.close(fd)
      raise BlockingIOError(
          f"{path.parent} is in use by {_describe(holder)}: one run writes a workdir at a time; "
          "wait for that run to end (or stop it), or use another --workdir") from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:  # its holder released (removed) it after we opened it
      same = False
    if same:
      break
    os.close(fd)
  old = _read_record(fd)
  if old:
    logging.warning("took over the lock on %s left by %s, which no longer holds it (killed before "
                    "it could release it)", path.parent, _describe(old))
  record = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": sys.argv}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
  return fd


def _read_record(fd: int) -> dict:
  try:
    record = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
  except ValueError:  # torn by a kill mid-write
    return {"pid": "?", "host": "?"}
  return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
  words = f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"
  if record.get("started"):
    words += f" (started {record['started']}: {' '.join(record.get('command', []))})"
  return words
