"""Tiny models, batches and runs that several test files share (their fixtures: conftest.py).

Plain functions and constants, imported by name (`from tiny import ...`): the subprocess of
step_test's eight-device check imports them too, where no pytest fixture reaches.
"""

import hashlib
import os

import jax
import numpy as np
import pytest

from experiments.configs import demo
from minilm_jax import checkpoint, cli, optimizer as optimizer_lib, sharding
from minilm_jax import model as model_lib
from minilm_jax import step as step_lib
from minilm_jax.config import DistillConfig
from minilm_jax.model import AttentionInternals

# A small random BERT: with the teacher's tokenizer it is conftest's `tiny_dir`.
TINY_BERT = model_lib.ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                  max_position_embeddings=128)


def smoke_config(**changes):
  """experiments/configs/demo.py's `smoke` variant with `changes` set (paths as strings)."""
  cfg = demo.get_config("smoke")
  for k, v in changes.items():
    setattr(cfg, k, str(v) if isinstance(v, os.PathLike) else v)
  return cfg


def tiny_cfg(**kw):
  """A one-layer student of the packaged teacher that learns within a few hundred steps."""
  base = dict(student_layers=1, student_hidden=96, student_heads=12, max_seq_len=32,
              global_batch_size=8, max_steps=300, warmup_steps=10, learning_rate=1e-3)
  return DistillConfig(**(base | kw))


def random_batch(batch=8, seq=32, seed=0):
  """[CLS] then random word ids, [PAD] past a random length of at least half the row."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, 8000, size=(batch, seq)).astype(np.int32)
  ids[:, 0] = 101
  lengths = rng.integers(seq // 2, seq + 1, size=batch)
  mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
  return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def packed_batch(batch=4, seq=40, seed=0):
  """Rows like the pipeline's: [CLS] text [SEP], then [PAD] past a random length."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(seq // 2, seq + 1, size=batch)
  ids = rng.integers(1000, 8000, size=(batch, seq)).astype(np.int32)
  mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
  ids[:, 0] = 101
  ids[np.arange(batch), lengths - 1] = 102
  return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def ragged_features(n=20, width=64, seed=0):
  """Fine-tuning rows of 3..40 real tokens padded to `width`, with labels."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 41, n)
  ids = rng.integers(1000, 2000, (n, width)).astype(np.int32)
  mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
  types = ((np.arange(width)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
  return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types,
          "labels": rng.integers(2, size=n).astype(np.int32)}


def mask_of(lengths, t=7):
  """An attention mask [len(lengths), t] with `lengths` real tokens per row."""
  return (np.arange(t)[None, :] < np.array(lengths)[:, None]).astype(np.int32)


def internals(rng, width, b=3, t=7):
  """Random query, key and value [b, t, width] of one layer."""
  return AttentionInternals(*(rng.normal(size=(b, t, width)).astype(np.float32) for _ in range(3)))


def write_rte(glue_dir, split, n, seed):
  """An RTE `split` of `n` random pairs whose label the words tell ("yes": entailment), GLUE layout."""
  rng = np.random.default_rng(seed)
  rows = ["index\tsentence1\tsentence2\tlabel"]
  for i in range(n):
    label = int(rng.integers(2))
    word = "yes" if label == 0 else "no"
    rows.append(f"{i}\tthe answer is {word} .\tit is {word} .\t"
                f"{('entailment', 'not_entailment')[label]}")
  (glue_dir / "RTE").mkdir(parents=True, exist_ok=True)
  (glue_dir / "RTE" / f"{split}.tsv").write_text("\n".join(rows) + "\n")


def build(cfg, teacher, mesh, micro_batches=1):
  """The jitted distillation step, its first state and the truncated teacher, on `mesh`."""
  setup = step_lib.make_setup(cfg, teacher[0])
  optimizer = optimizer_lib.for_distillation(cfg)
  state = jax.device_put(step_lib.init_state(cfg, setup, optimizer), sharding.replicated(mesh))
  teacher_params = jax.device_put(step_lib.truncate_teacher(setup, teacher[1]), sharding.replicated(mesh))
  return step_lib.make_train_step(setup, optimizer, mesh, micro_batches), state, teacher_params


def assert_same_training(one, many):
  """(params, metrics) of 1 and several micro-batches: metrics to rtol 1e-5, params to 1e-5."""
  (p1, m1), (p4, m4) = one, many
  for k in m1:
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def params_of(workdir):
  """(step, leaves of the student's parameters) of a run's latest checkpoint."""
  _, params, _, step = checkpoint.restore_params(workdir)
  return step, [np.asarray(x) for x in jax.tree.leaves(params)]


def comparable(records):
  """metrics.jsonl records without their timings, which differ between equal runs."""
  timings = ("time", "tokens_per_sec", "examples_per_sec", "eval_seconds")
  return [{k: v for k, v in r.items() if k not in timings} for r in records]


def fails(argv) -> str:
  """The message `python -m minilm_jax ARGV` exits with (in process)."""
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  return str(e.value.code)


def digest(path) -> dict[str, str]:
  """Every file and directory under `path`, with the SHA-256 of each file's bytes."""
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
          for p in sorted(path.rglob("*"))}
