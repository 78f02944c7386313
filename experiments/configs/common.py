"""What every config file here shares: one variant syntax and one smoke shrink.

A config file defines `get_config(variant: str)`; the command line passes the text after
`:` (`--config experiments/configs/paper.py:v2-bert-base-L6-H384,smoke`). As in
big_vision, a variant is comma-separated words: at most one of the file's names (its
default when none is given) and `smoke`, which shrinks that run to a few seconds on the
packaged teacher and the demo corpus, for tests and a first try.
"""

import dataclasses
import pathlib

from minilm_jax.config import DistillConfig, check_choice

SMOKE = "smoke"
PACKAGED_TEACHER = {"teacher": "all-MiniLM-L6-v2", "teacher_layer": 0, "corpus": "demo"}


def parse(config_file: str, variant: str, names: tuple[str, ...], default: str) -> tuple[str, bool]:
  """(name, smoke) of `variant`: "", "NAME", "smoke" or "NAME,smoke"; an unknown word
  raises naming the closest valid one."""
  what = f"{pathlib.Path(config_file).name} variant"
  words = variant.split(",") if variant else []
  for word in words:
    check_choice(what, word, (*names, SMOKE))
  named = [word for word in words if word != SMOKE]
  if len(named) > 1:
    raise ValueError(f"{what} {variant!r} names {len(named)} runs: give at most one, e.g. "
                     f"{named[0]},{SMOKE}")
  return (named[0] if named else default), SMOKE in words


def smoke(cfg: DistillConfig, **changes) -> DistillConfig:
  """`cfg` as a 4-step run of batch 8 x 32 tokens (and `changes`): the same code path, seconds."""
  return dataclasses.replace(cfg, max_seq_len=32, global_batch_size=8, max_steps=4, warmup_steps=1,
                             log_every=2, checkpoint_every=2, **changes)
