"""The task registry: a task's canonical name, its table metric, and what it reads.

A task is a GLUE task of `glue.TASKS` or SQuAD 2.0 ("squad2"). `load` reads and
featurises its train and dev sets from explicit arguments (`glue.task_data`,
`squad.task_data`) into one `TaskData`, the same for training (`train.run`) and for
scoring a saved model (`score.score_model`), so both see the same dev rows.
"""

import dataclasses
import pathlib
from typing import Any, Callable

import numpy as np
import tokenizers

from minilm_jax.finetune import glue, squad

SQUAD = "squad2"
SQUAD_NAMES = ("squad2", "squad/v2.0", "squad_v2", "squadv2")
MAX_SEQ_LEN = {"glue": 128, SQUAD: 384}  # tokens per row when max_seq_len is 0
DOC_STRIDE = 128                         # SQuAD window overlap in tokens
SQUAD_TRAIN_ARTICLES = 25                # SQuAD dev-split: first N of the 35 dev articles train


@dataclasses.dataclass
class TaskData:
  """Featurised train / dev sets and the official metrics of dev predictions."""
  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray]
  metrics: Callable[[Any], dict[str, float]]  # score.predict_all output -> metrics with "score"
  num_labels: int | None                      # None = extractive QA
  regression: bool = False
  labels: tuple[str, ...] | None = None
  stats: dict = dataclasses.field(default_factory=dict)  # example counts, truncation


def resolve_task(task: str) -> str:
  """Canonical task name: "sst2" for "glue/sst2", "SST-2" or "sst2"; "squad2" for SQuAD 2.0."""
  name = str(task).strip().lower()
  if name in SQUAD_NAMES:
    return SQUAD
  key = name.removeprefix("glue/").replace("-", "")
  if key not in glue.TASKS:
    raise ValueError(f"unknown task {task!r}: use glue/<task> with <task> one of "
                     f"{', '.join(glue.TASKS)}, or squad2 (also squad/v2.0)")
  return key


def task_metric(task: str) -> str:
  """Name of the number a task's `score` holds, for tables."""
  return "f1" if task == SQUAD else {"matthews": "matthews_corrcoef"}.get(
      glue.TASKS[task].metric, glue.TASKS[task].metric)


def load(task: str, data: str | pathlib.Path, tokenizer: tokenizers.Tokenizer, *,
         max_seq_len: int = 0, doc_stride: int = DOC_STRIDE,
         squad_train_articles: int = SQUAD_TRAIN_ARTICLES, max_train_examples: int = 0,
         max_eval_examples: int = 0, with_train: bool = True) -> TaskData:
  """The featurised train (unless `with_train` is False) and dev sets of `task`.

  Args:
    task: "glue/sst2", "sst2", "squad2", ... (see `resolve_task`).
    data: the glue_data folder, or the SQuAD dev-v2.0.json path.
    tokenizer: the model's tokenizer.
    max_seq_len: tokens per row; 0 = 128 for GLUE, 384 for SQuAD.
    doc_stride, squad_train_articles: SQuAD's window overlap and train / dev split.
    max_train_examples, max_eval_examples: 0 = all (GLUE examples / SQuAD questions).
    with_train: False reads only the dev side (scoring a saved model).
  """
  task = resolve_task(task)
  limits = dict(max_train_examples=max_train_examples, max_eval_examples=max_eval_examples,
                with_train=with_train)
  if task == SQUAD:
    train, dev, metrics, stats = squad.task_data(data, tokenizer, max_seq_len or MAX_SEQ_LEN[SQUAD],
                                                 doc_stride, squad_train_articles, **limits)
    return TaskData(train, dev, metrics, None, stats=stats)
  spec = glue.get_task(task)
  train, dev, metrics, stats = glue.task_data(spec, data, tokenizer,
                                              max_seq_len or MAX_SEQ_LEN["glue"], **limits)
  return TaskData(train, dev, metrics, spec.num_labels, spec.is_regression, spec.labels, stats)
