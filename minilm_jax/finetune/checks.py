"""What `finetune` checks before anything runs or is written: the config's values
(`check_config`) and the workdir (`check_workdir`: nothing replaced without `--overwrite`,
no overlap with what the run reads).

A finetune workdir holds `seed-N/` runs and `summary.json` only, so a directory holding
anything else is never replaced, `--overwrite` or not: it is someone else's.
"""

import math
import pathlib

from minilm_jax import atomic
from minilm_jax.config import check_choice
from minilm_jax.finetune import tasks

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SUMMARY_FILE = "summary.json"
SEED_PREFIX = "seed-"
# Integer fields and their smallest value.
_AT_LEAST = {"doc_stride": 1, "squad_train_articles": 1, "batch_size": 1, "eval_batch_size": 1,
             "epochs": 1, "max_seq_len": 0, "length_bucket": 0, "max_train_examples": 0,
             "max_eval_examples": 0, "num_layers": 0}
# Float fields (every one of FinetuneConfig's): the rule in words and the test.
_RANGES = {"learning_rate": ("> 0", lambda x: x > 0),
           "warmup_ratio": ("in [0, 1]", lambda x: 0 <= x <= 1),
           "weight_decay": (">= 0", lambda x: x >= 0),
           "clip_grad_norm": (">= 0 (0 = no clipping)", lambda x: x >= 0),
           "dropout": ("in [0, 1)", lambda x: 0 <= x < 1)}


def check_config(cfg) -> None:
  """Values a `FinetuneConfig` cannot run with, checked before anything is read or written:
  ranges, finiteness (no inf or NaN in any float field) and contradictions."""
  tasks.resolve_task(cfg.task)
  for name, low in _AT_LEAST.items():
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"{name}={value!r} must be an integer >= {low}: pass --config.{name}=N")
  for name, (rule, holds) in _RANGES.items():
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise ValueError(f"{name}={value!r} must be a finite number {rule}: pass --config.{name}=X")
    if not holds(value):
      raise ValueError(f"{name}={value!r} must be {rule}: pass --config.{name}=X with X {rule}")
  if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
    raise ValueError(f"seed={cfg.seed!r} must be an integer in [0, 2**32): pass --seeds 0,1,2")
  check_choice("compute_dtype", cfg.compute_dtype, COMPUTE_DTYPES)
  _check_contradictions(cfg)


def _check_contradictions(cfg) -> None:
  """Fields that are each valid but cannot go together."""
  is_squad = tasks.resolve_task(cfg.task) == tasks.SQUAD
  if is_squad and cfg.max_seq_len and cfg.doc_stride >= cfg.max_seq_len:
    raise ValueError(f"doc_stride={cfg.doc_stride} must be below max_seq_len={cfg.max_seq_len} "
                     "(windows overlap by doc_stride tokens): lower --config.doc_stride")
  if not is_squad and 0 < cfg.max_train_examples < cfg.batch_size:
    raise ValueError(f"max_train_examples={cfg.max_train_examples} do not fill one batch of "
                     f"batch_size={cfg.batch_size}: raise max_train_examples or lower batch_size")


def _entries(path: pathlib.Path) -> list[str]:
  """The names in a directory, hidden ones (a lock, a temporary sibling's) left out."""
  return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))


def check_workdir(workdir: str | pathlib.Path, sources, overwrite: bool) -> None:
  """Refuses a workdir that is a file, overlaps one of `sources` (the model and data read),
  holds what finetune did not write, or holds earlier results without `overwrite`."""
  path = pathlib.Path(workdir).expanduser()  # a file there was refused by its lock (`workdir.lock`)
  atomic.check_not_overlapping(sources, path)
  held = _entries(path) if path.is_dir() else []
  foreign = [n for n in held if n != SUMMARY_FILE and not n.startswith(SEED_PREFIX)]
  if foreign:
    raise ValueError(f"--workdir {workdir} holds {', '.join(foreign[:5])}, which finetune does not "
                     f"write (it writes {SEED_PREFIX}N/ and {SUMMARY_FILE}): it is not a finetune "
                     "workdir and is never replaced; pass a new --workdir")
  if held and not overwrite:
    raise FileExistsError(f"--workdir {workdir} already holds fine-tuning results "
                          f"({', '.join(held[:5])}): pass --overwrite to replace them (the old "
                          "ones stay until the new runs finish), or a new --workdir")
