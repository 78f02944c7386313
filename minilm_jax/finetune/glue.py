"""GLUE tasks of the MiniLM papers: registry, the TSV reader, fixed-length features, and
`task_data`, what `tasks.load` reads for a GLUE task.

The MiniLM tables fine-tune on MNLI (dev_matched), QNLI, QQP, RTE, SST-2, MRPC, CoLA and
STS-B. `TASKS` records, for each, where the original GLUE download keeps it
(`glue_data/<DIR>/{train,dev}.tsv`), which columns hold the text and label (the names of
the GLUE files' own headers, as read by Hugging Face's `run_glue` processors), the label
list in label-id order and the metric family of `metrics.task_metrics`.

GLUE TSVs contain unbalanced quotes inside sentences, so files are read with the csv
module and `quoting=csv.QUOTE_NONE`: every tab is a separator and every quote is text.

Tokenisation uses a Hugging Face `tokenizers` tokenizer (the model's `tokenizer.json`):
truncation `longest_first` (pairs lose tokens from the longer side first, as in BERT) and
padding to a fixed length, so every batch has one shape and the jitted step compiles once.
"""

import csv
import dataclasses
import logging
import pathlib

import numpy as np
import tokenizers

from minilm_jax import tokenization
from minilm_jax.finetune import metrics

SPLITS = ("train", "dev")


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """Where a GLUE task lives on disk and how it is scored."""
  name: str                             # registry key
  dir_name: str                         # folder under glue_data/ in the original download
  text_columns: tuple[str, ...]         # one column (single sentence) or two (pair)
  label_column: str                     # column holding the gold label or score
  labels: tuple[str, ...] | None        # label strings in label-id order; None = regression
  metric: str                           # metric family of metrics.task_metrics
  dev_file: str = "dev.tsv"             # MNLI: dev_matched.tsv (the MiniLM tables' MNLI-m)
  header: tuple[str, ...] | None = None  # column names of a header-less file (CoLA)
  skip_short_rows: bool = False         # drop rows missing fields, as run_glue's processor does

  @property
  def is_regression(self) -> bool:
    return self.labels is None

  @property
  def num_labels(self) -> int:
    """Output width of the task head: number of classes, or 1 for a regression score."""
    return 1 if self.labels is None else len(self.labels)


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS = {t.name: t for t in [
    GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label",
             ("contradiction", "entailment", "neutral"), "accuracy",
             dev_file="dev_matched.tsv"),
    GlueTask("qnli", "QNLI", ("question", "sentence"), "label", _NLI2, "accuracy"),
    GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", _BINARY, "accuracy_f1",
             skip_short_rows=True),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", _NLI2, "accuracy"),
    GlueTask("sst2", "SST-2", ("sentence",), "label", _BINARY, "accuracy"),
    GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", _BINARY, "accuracy_f1"),
    GlueTask("cola", "CoLA", ("sentence",), "label", _BINARY, "matthews",
             header=("source", "label", "original_label", "sentence")),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, "pearson_spearman"),
]}


@dataclasses.dataclass(frozen=True)
class Example:
  """One GLUE example: its text(s) and its label id (classification) or score (STS-B)."""
  text_a: str
  text_b: str | None
  label: int | float


def get_task(task: str | GlueTask) -> GlueTask:
  """The registry entry of a task name (case-insensitive, e.g. "sst2", "SST-2", "mnli")."""
  if isinstance(task, GlueTask):
    return task
  key = str(task).lower().replace("-", "")
  if key not in TASKS:
    raise KeyError(f"unknown GLUE task {task!r}: use one of {', '.join(TASKS)}")
  return TASKS[key]


def tsv_path(task: str | GlueTask, glue_dir: str | pathlib.Path, split: str) -> pathlib.Path:
  """`glue_dir/<DIR>/{train.tsv, dev.tsv}` (MNLI dev: dev_matched.tsv), as GLUE ships it."""
  task = get_task(task)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} for GLUE TSVs: use one of {', '.join(SPLITS)} "
                     "(GLUE test labels are not public)")
  name = "train.tsv" if split == "train" else task.dev_file
  return pathlib.Path(glue_dir).expanduser() / task.dir_name / name


def _parse_label(task: GlueTask, value: str, where: str) -> int | float:
  if task.is_regression:
    try:
      return float(value)
    except ValueError:
      raise ValueError(f"{where}: score {value!r} is not a number") from None
  if value not in task.labels:
    raise ValueError(f"{where}: label {value!r} is not one of {task.name}'s labels "
                     f"{list(task.labels)}")
  return task.labels.index(value)


def _column_indices(task: GlueTask, header: list[str], path: pathlib.Path) -> list[int]:
  wanted = [*task.text_columns, task.label_column]
  missing = [c for c in wanted if c not in header]
  if missing:
    raise ValueError(f"{path}: missing column(s) {missing} for task {task.name}; the file has "
                     f"{header}. Pass the original GLUE download (glue_data/{task.dir_name}/)")
  return [header.index(c) for c in wanted]


def load_glue(task: str | GlueTask, glue_dir: str | pathlib.Path, split: str) -> list[Example]:
  """Reads `split` ("train" or "dev") of a task from the original GLUE TSV layout.

  Args:
    task: registry name, e.g. "sst2" or "mnli".
    glue_dir: the `glue_data` folder holding CoLA/, SST-2/, MNLI/, ... .
    split: "train" or "dev" (MNLI: dev_matched).

  Returns:
    Examples in file order; labels are ids into `task.labels` (floats for STS-B).
  """
  task = get_task(task)
  path = tsv_path(task, glue_dir, split)
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found: GLUE {task.name} {split} is read from "
        f"<glue_dir>/{task.dir_name}/{'train.tsv' if split == 'train' else task.dev_file} "
        "(the layout of the original GLUE download, download_glue_data.py); pass that "
        "glue_data folder")
  with path.open(encoding="utf-8", newline="") as f:
    # QUOTE_NONE: one record per physical line, so enumerate() gives file line numbers.
    rows = [(line, row) for line, row in
            enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1) if row]
  if task.header is None:
    header = rows.pop(0)[1] if rows else []
  else:
    header = list(task.header)
  indices = _column_indices(task, header, path)
  if not rows:
    raise ValueError(f"{path} has {'a header but ' if task.header is None else ''}no examples: pass the "
                     f"complete GLUE {task.name} {split} file")
  *text_idx, label_idx = indices
  examples, skipped = [], 0
  for line, row in rows:
    where = f"{path} line {line}"
    if len(row) <= max(indices) and task.skip_short_rows:
      skipped += 1
      continue
    if len(row) <= max(indices):
      raise ValueError(f"{where}: {len(row)} tab-separated fields, expected at least "
                       f"{max(indices) + 1} ({', '.join(header)}); is the file truncated?")
    texts = [row[i] for i in text_idx]
    examples.append(Example(texts[0], texts[1] if len(texts) > 1 else None,
                            _parse_label(task, row[label_idx], where)))
  if skipped:
    logging.warning("%s: skipped %d rows with missing fields (as run_glue does for %s)",
                    path, skipped, task.name)
  return examples


def pad_token(tokenizer: tokenizers.Tokenizer) -> tuple[str, int]:
  """(token, id) used for padding: the tokenizer's own setting, else [PAD] or <pad>."""
  if tokenizer.padding:
    return tokenizer.padding["pad_token"], tokenizer.padding["pad_id"]
  for token in ("[PAD]", "<pad>"):
    if (token_id := tokenizer.token_to_id(token)) is not None:
      return token, token_id
  raise ValueError("tokenizer has no padding token ([PAD] or <pad>) and no padding setting: "
                   "save it with padding enabled or add a pad token")


def fixed_length_tokenizer(tokenizer: tokenizers.Tokenizer, max_len: int,
                           **truncation) -> tokenizers.Tokenizer:
  """A copy of `tokenizer` that truncates and pads every input to exactly `max_len`."""
  clone = tokenization.plain(tokenizer)
  token, token_id = pad_token(tokenizer)
  clone.enable_truncation(max_len, **truncation)
  clone.enable_padding(length=max_len, pad_id=token_id, pad_token=token)
  return clone


def encode_examples(examples: list[Example], tokenizer: tokenizers.Tokenizer,
                    task: str | GlueTask, max_len: int = 128) -> dict[str, np.ndarray]:
  """Tokenises examples to fixed-length model inputs.

  Returns:
    {"input_ids", "attention_mask", "token_type_ids"}: int32 [N, max_len];
    "labels": int32 [N] (class ids) or float32 [N] (STS-B scores).
  """
  task = get_task(task)
  if not examples:
    raise ValueError(f"no {task.name} examples to encode")
  tok = fixed_length_tokenizer(tokenizer, max_len, strategy="longest_first")
  pairs = examples[0].text_b is not None
  inputs = [(e.text_a, e.text_b) if pairs else e.text_a for e in examples]
  encodings = tok.encode_batch(inputs)
  as_array = lambda name: np.asarray([getattr(e, name) for e in encodings], np.int32)
  return {
      "input_ids": as_array("ids"),
      "attention_mask": as_array("attention_mask"),
      "token_type_ids": as_array("type_ids"),
      "labels": np.asarray([e.label for e in examples],
                           np.float32 if task.is_regression else np.int32),
  }


def count_truncated(examples: list[Example], tokenizer: tokenizers.Tokenizer, max_len: int) -> int:
  """How many examples are longer than `max_len` tokens (with [CLS]/[SEP]) and get cut."""
  if not examples:
    return 0
  full = tokenization.plain(tokenizer)
  pairs = examples[0].text_b is not None
  encodings = full.encode_batch([(e.text_a, e.text_b) if pairs else e.text_a for e in examples])
  return sum(len(e.ids) > max_len for e in encodings)


def task_data(task: str | GlueTask, glue_dir: str | pathlib.Path, tokenizer: tokenizers.Tokenizer,
              max_len: int, *, max_train_examples: int = 0, max_eval_examples: int = 0,
              with_train: bool = True):
  """(train features, dev features, dev metrics, stats) of a task, for `tasks.load`.

  The train side is empty unless `with_train`; `max_*_examples` keep the first N (0 = all).
  The dev metrics map logits [N, num_labels] to `metrics.task_metrics` of the dev labels.
  """
  task = get_task(task)
  train_ex = load_glue(task, glue_dir, "train")[:max_train_examples or None] if with_train else []
  eval_ex = load_glue(task, glue_dir, "dev")[:max_eval_examples or None]
  train_f = encode_examples(train_ex, tokenizer, task, max_len) if train_ex else {}
  eval_f = encode_examples(eval_ex, tokenizer, task, max_len)
  stats = {"max_seq_len": max_len, "train_examples": len(train_ex), "eval_examples": len(eval_ex),
           "train_truncated": count_truncated(train_ex, tokenizer, max_len),
           "eval_truncated": count_truncated(eval_ex, tokenizer, max_len)}

  def dev_metrics(logits):
    predictions = logits[:, 0] if task.is_regression else np.argmax(logits, axis=-1)
    return metrics.task_metrics(task.metric, predictions, eval_f["labels"])

  return train_f, eval_f, dev_metrics, stats
